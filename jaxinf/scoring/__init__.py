"""Contracting influence factors with training gradients.

Given factors ``f_i = (C + λI)⁻¹ ∇θℓ(z'_i)`` (one per test point), the
influence matrix is ``I[i, j] = f_iᵀ ∇θℓ(z_j)``. Three ways to get it:

* ``"gradients"``: per-example training gradients ``G`` (one vmapped
  backward pass, memory ``n_train × p``), then ``F Gᵀ`` — cheapest when
  there are many factors and the model is small.
* ``"jvp"``: for each factor, one forward-mode product of the per-example
  losses, ``jax.jvp(ℓ(·, z_1..z_b), θ, f_i)``, gives ``f_iᵀ g_j`` for every
  ``j`` of the batch at once, with no per-example gradient formed —
  cheapest for one or two factors, and memory-flat in ``p``.
* ``"layerwise"``: one forward pass recording layer inputs and one backward
  pass to layer outputs, shared by all factors, then per layer
  ``Σ_t (a_tᵀ F_i) · g_t`` (:mod:`jaxinf.scoring.layerwise`) — no per-example
  gradient of a whole model, and ``F`` products of layer size instead of
  ``2F`` tangent passes; needs layers :mod:`jaxinf.layers` can find.

``"auto"`` picks by the cost model of :mod:`jaxinf.scoring.cost_model`
(:func:`choose_method`); all three give the same matrix to float tolerance.

Perturbation influence (Koh & Liang 2017, Eq. 4):
``I_pert[i, j] = ∇x (f_iᵀ ∇θℓ(z_j))``, the gradient with respect to the
training input ``x_j`` of the up-weighting influence, of shape
``(n_test, n_train, *x_shape)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxinf.core.curvature import per_example_grads, per_example_losses
from jaxinf.core.data import add_example_axis
from jaxinf.core.tree import ravel_batched
from jaxinf.layers.statistics import loss_tracer
from jaxinf.scoring.cost_model import LayerProfile, cheapest
from jaxinf.scoring.layerwise import contract_by_layer
from jaxinf.scoring.layerwise import layer_profile as profile_of
from jaxinf.scoring.measurement import check_measurement as check_measurement

PyTree = Any
SCORING_METHODS = ("auto", "gradients", "jvp", "layerwise")


def check_scoring(scoring: str, solver) -> None:
    """``ValueError`` for an unknown ``scoring``, or a named method that ``solver`` cannot take.

    A solver whose ``solve`` is marked ``scorer_only`` (TracIn, gradient cosine: no influence factors) scores only
    through its own scorer, so a method named here would be ignored.
    """
    if scoring not in SCORING_METHODS:
        raise ValueError(f"Unknown scoring {scoring!r}; choose one of {SCORING_METHODS}.")
    if scoring != "auto" and getattr(solver.solve, "scorer_only", False):
        raise ValueError(
            f"scoring={scoring!r} cannot take effect: {solver.name}() has no influence factors to contract and "
            "scores only through its own scorer. Leave scoring='auto'."
        )


def choose_method(num_factors: int, batch_examples: int, num_params: int, profile: LayerProfile | None = None) -> str:
    """The cheapest contraction by the cost model of :mod:`jaxinf.scoring.cost_model`.

    ``"jvp"`` costs ``(1 + 2F) p`` multiply-adds per training example,
    ``"gradients"`` ``(3 + κ + F) p`` and ``"layerwise"`` ``2p`` plus, per
    tagged layer, the cheaper of contracting inputs and output gradients
    directly or through the per-example layer gradient; ``"layerwise"`` is a
    candidate only when ``profile`` (:func:`layer_profile`) is given. The
    batch size cancels: every cost is linear in it.

    Examples:
      >>> from jaxinf.scoring.cost_model import LayerProfile
      >>> wide = LayerProfile(layers=((513, 512, 1),), other_params=0)
      >>> [choose_method(f, 64, 513 * 512, wide) for f in (1, 16)]
      ['jvp', 'layerwise']
      >>> choose_method(4096, 64, 2000)  # many factors, small model
      'gradients'
    """
    del batch_examples
    return cheapest(num_factors, num_params, profile)


def layer_profile(loss_fn: Callable, params: PyTree, batch: PyTree) -> LayerProfile | None:
    """The layer sizes of ``loss_fn`` for :func:`choose_method`, or ``None`` if its layers can't be read.

    The layer analysis of :mod:`jaxinf.layers` raises ``ValueError`` when the
    loss's layers cannot be read as layers (e.g. ``tag_dense`` given a weight
    that is not a parameter leaf); ``"layerwise"`` then leaves the choice,
    with one ``UserWarning`` per reason naming it. Every other error (a loss
    that fails on a batch of one example, a bug) propagates.

    The profile is kept per loss function, parameter shapes and per-example
    batch shapes (``_PROFILES``): a second :class:`jaxinf.InfluenceModel` of
    the same loss does not trace it again (as it compiles nothing again).
    """
    key = _profile_key(loss_fn, params, batch)
    if key is not None and key in _PROFILES:
        return _PROFILES[key]
    profile = _traced_profile(loss_fn, params, batch)
    if key is not None:
        _PROFILES[key] = profile
        if len(_PROFILES) > _MAX_PROFILES:  # the oldest first: a long process holds a bounded number of losses
            _PROFILES.pop(next(iter(_PROFILES)))
    return profile


def _profile_key(loss_fn: Callable, params: PyTree, batch: PyTree) -> tuple | None:
    """What a layer profile depends on: the loss, the params' and the examples' shapes; ``None``: unhashable."""
    try:
        hash(loss_fn)
    except TypeError:
        return None
    shapes = tuple((jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(params))
    examples = tuple((jnp.shape(x)[1:], jnp.result_type(x)) for x in jax.tree.leaves(batch))
    return loss_fn, jax.tree.structure(params), shapes, jax.tree.structure(batch), examples


def _traced_profile(loss_fn: Callable, params: PyTree, batch: PyTree) -> LayerProfile | None:
    try:
        return profile_of(loss_tracer(loss_fn, params, batch))
    except ValueError as error:
        reason = str(error)
        if reason not in _DROPPED:
            _DROPPED.add(reason)
            warnings.warn(
                f"Layer-wise scoring is left out of scoring='auto' because the loss's layers cannot be read: "
                f"{reason} The influences are computed with scoring 'gradients' or 'jvp' instead (same numbers); "
                "fix the tagging to get the layer-wise contraction back.",
                UserWarning,
                stacklevel=3,
            )
        return None


_DROPPED: set[str] = set()  # reasons already warned about (warn once each)
_PROFILES: dict = {}  # (loss, params layout, example shapes) -> LayerProfile or None, shared by every model
_MAX_PROFILES = 32


def contract(loss_fn: Callable, params: PyTree, factors: PyTree, batch: PyTree, method: str = "gradients"):
    """``I[i, j] = factors_iᵀ ∇θℓ(z_j)``, shape ``(n_factors, n_batch)``."""
    if method == "jvp":

        def along(f):
            return jax.jvp(lambda p: per_example_losses(loss_fn, p, batch), (params,), (f,))[1]

        return jax.vmap(along)(factors)
    if method == "layerwise":
        dtype = jnp.result_type(*jax.tree.leaves(factors))
        parts = contract_by_layer(loss_tracer(loss_fn, params, batch), params, factors, batch)
        return sum(parts.values()).astype(dtype)
    grads = ravel_batched(per_example_grads(loss_fn, params, batch))
    return ravel_batched(factors, grads.dtype) @ grads.T


def perturbation(loss_fn: Callable, params: PyTree, factors: PyTree, batch: PyTree, leaf: int):
    """``∇_{x_j} (factors_iᵀ ∇θℓ(z_j))`` for the input leaf number ``leaf`` of the batch.

    Returns shape ``(n_factors, n_batch, *x_shape)``.
    """
    leaves, treedef = jax.tree.flatten(batch)

    def one_example(example_leaves):
        def scores(x):
            parts = list(example_leaves)
            parts[leaf] = x
            one = add_example_axis(jax.tree.unflatten(treedef, parts))
            return jax.vmap(lambda f: jax.jvp(lambda p: loss_fn(p, one), (params,), (f,))[1])(factors)

        return jax.jacrev(scores)(example_leaves[leaf])

    out = jax.vmap(one_example)(leaves)  # (n_batch, n_factors, *x_shape)
    return jnp.swapaxes(out, 0, 1)


def resolve_input_leaf(batch: PyTree, input_leaf: int | str) -> int:
    """Index (in flatten order) of the batch leaf that perturbation mode differentiates.

    ``input_leaf`` is a position in ``jax.tree.leaves(batch)`` (``0``: the
    ``x`` of ``(x, y)``) or a key path as printed by
    ``jax.tree_util.keystr`` (e.g. ``"['image']"``).
    """
    flat = jax.tree_util.tree_flatten_with_path(batch)[0]
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    if isinstance(input_leaf, str):
        if input_leaf not in paths:
            raise ValueError(f"input_leaf={input_leaf!r} is not a leaf of the batch; its leaves are {paths}.")
        index = paths.index(input_leaf)
    else:
        index = int(input_leaf)
        if not 0 <= index < len(flat):
            raise ValueError(f"input_leaf={input_leaf} is out of range; the batch has leaves {paths}.")
    if not jnp.issubdtype(jnp.result_type(flat[index][1]), jnp.inexact):
        raise ValueError(
            f"input_leaf {paths[index]} has dtype {jnp.result_type(flat[index][1])}; perturbation mode "
            "differentiates with respect to a float input. Choose the input leaf with input_leaf=..."
        )
    return index
