"""Contracting influence factors with training gradients.

Given factors ``f_i = (C + λI)⁻¹ ∇θℓ(z'_i)`` (one per test point), the
influence matrix is ``I[i, j] = f_iᵀ ∇θℓ(z_j)``. Two ways to get it:

* ``"gradients"``: per-example training gradients ``G`` (one vmapped
  backward pass, memory ``n_train × p``), then ``F Gᵀ`` — cheapest when
  there are many factors.
* ``"jvp"``: for each factor, one forward-mode product of the per-example
  losses, ``jax.jvp(ℓ(·, z_1..z_b), θ, f_i)``, gives ``f_iᵀ g_j`` for every
  ``j`` of the batch at once, with no per-example gradient formed —
  cheapest for one or two factors, and memory-flat in ``p``.

Perturbation influence (Koh & Liang 2017, Eq. 4):
``I_pert[i, j] = ∇x (f_iᵀ ∇θℓ(z_j))``, the gradient with respect to the
training input ``x_j`` of the up-weighting influence, of shape
``(n_test, n_train, *x_shape)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxinf._tree import ravel_batched
from jaxinf.curvature import per_example_losses
from jaxinf.data import add_example_axis

PyTree = Any
SCORING_METHODS = ("auto", "gradients", "jvp")


def per_example_grads(loss_fn: Callable, params: PyTree, batch: PyTree) -> PyTree:
    """``∇θℓ(θ, z_j)`` for each example ``j`` of ``batch``: params-shaped leaves with a leading ``n``."""
    return jax.vmap(lambda example: jax.grad(loss_fn)(params, add_example_axis(example)))(batch)


#: Cost of forming one entry of the per-example gradient matrix ``G`` (``b × p``), in multiply-adds,
#: for models of up to ``GRADIENT_COST_PARAMS`` parameters; it grows as ``sqrt(p)`` above that (bigger
#: per-example outer products stream through memory rather than cache), up to ``GRADIENT_COST_CAP``.
#: Measured on CPU with ``benchmarks/bench_scale.py --pick``.
GRADIENT_COST = 16.0
GRADIENT_COST_PARAMS = 2048
GRADIENT_COST_CAP = 128.0


def choose_method(num_factors: int, batch_examples: int, num_params: int) -> str:
    """Pick the cheaper contraction by a cost model in multiply-adds.

    With ``F`` factors, ``b`` examples and ``p`` parameters (a forward pass
    costs about ``p`` multiply-adds per example):

    * ``"jvp"``: one primal pass plus ``F`` tangent passes of about ``2p``
      each: ``(1 + 2F) b p``;
    * ``"gradients"``: the backward passes (``3 b p``), forming and storing the
      ``b × p`` per-example gradients (``κ b p``) and the ``F × p`` by
      ``p × b`` product (``F b p``): ``(3 + κ + F) b p``.

    So JVPs win for ``F < 2 + κ``. ``κ`` is what one stored gradient entry
    costs in multiply-adds: a memory write and read, worth many arithmetic
    operations (about 16 for small models, growing as ``sqrt(p)`` to 128 for
    large ones, :data:`GRADIENT_COST`). ``b`` cancels: both costs are linear
    in the batch.
    """
    del batch_examples
    kappa = GRADIENT_COST * min(max(1.0, (num_params / GRADIENT_COST_PARAMS) ** 0.5), GRADIENT_COST_CAP / GRADIENT_COST)
    return "jvp" if num_factors < 2 + kappa else "gradients"


def contract(loss_fn: Callable, params: PyTree, factors: PyTree, batch: PyTree, method: str = "gradients"):
    """``I[i, j] = factors_iᵀ ∇θℓ(z_j)``, shape ``(n_factors, n_batch)``."""
    if method == "jvp":

        def along(f):
            return jax.jvp(lambda p: per_example_losses(loss_fn, p, batch), (params,), (f,))[1]

        return jax.vmap(along)(factors)
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
