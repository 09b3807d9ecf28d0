"""Gradient-similarity baselines on the solver protocol: gradient dot product, gradient cosine, TracIn.

These are the cheap attributions influence is compared against. As solvers
they put the baselines on the same axes as the real thing
(``InfluenceModel(..., solver).influences(test, train)``, the benchmarks, the
demo), with no curvature:

=====================  ===============================================  ==========================================
``gradient_dot()``     ``∇θℓ(z')ᵀ ∇θℓ(z)``                              identity "curvature": ``solve(v) = v``
``gradient_cosine()``  ``cos(∇θℓ(z'), ∇θℓ(z))``                         a :class:`~jaxinf.solvers.base.Scorer`
``tracin(ckpts, η)``   ``Σ_c η_c ∇θℓ(z'; θ_c)ᵀ ∇θℓ(z; θ_c)`` (TracInCP)  a :class:`~jaxinf.solvers.base.Scorer`
=====================  ===============================================  ==========================================

There is no curvature, so ``damping`` cannot take effect: a damping other
than 0 is refused by ``validate`` (which :class:`jaxinf.InfluenceModel`
runs at fit), and the model's curvature kind is not used. Without
``validate`` (the functional core) ``gradient_dot``'s solve reports
``info.converged = False`` and the scorers return NaN.

``gradient_dot`` is an ordinary solver: influence factors, self-influence
(``‖∇θℓ(z)‖²``), perturbation mode and the tiled calculator all work and agree.

``gradient_cosine`` and ``tracin`` are not bilinear forms in the gradient at
the model's parameters (the cosine divides by both norms; TracIn takes
gradients at other parameters), so no factor ``f(z')`` gives them as
``f(z')ᵀ ∇θℓ(z)``. They score only through their :class:`Scorer`, i.e.
``InfluenceModel.influences(test, train)`` in mode ``"up"``; everything that
needs such a factor (``influence_factors``, hence ``influences_from_factors``;
``self_influence``, mode ``"perturbation"``, the tiled calculator
:func:`jaxinf.scale.compute_influences`, a plain ``solver.solve``) raises a
``ValueError`` saying so, while tracing, before any work. Self-influence there is ``1`` for the cosine (by
definition) and :func:`tracin_self_influence` for TracIn.

Scores cost one per-example gradient per example on each side (per
checkpoint for TracIn), memory ``n × p`` per batch (``× checkpoints`` on the
test side for TracIn).

References:
  Pruthi, Liu, Kale & Sundararajan, "Estimating Training Data Influence by
  Tracing Gradient Descent", NeurIPS 2020 (TracIn, TracInCP).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.curvature import CurvatureOperator, per_example_grads
from jaxinf.core.data import checked_list
from jaxinf.core.fingerprint import tree_digest
from jaxinf.core.tree import TreeSpec, check_finite, check_matches, check_params, ravel_batched, tree_spec
from jaxinf.solvers.base import Scorer, Solver, make_info, records_config
from jaxinf.solvers.lowrank import scoring_loss_fn

PyTree = Any

__all__ = ["SimilarityState", "TracInState", "gradient_cosine", "gradient_dot", "tracin", "tracin_self_influence"]


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class SimilarityState:
    """The layout of the parameters and the damping of each block (which must be 0)."""

    damping: tuple
    spec: TreeSpec
    block_names: tuple

    def tree_flatten(self):
        return (self.damping,), (self.spec, self.block_names)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class TracInState:
    """The checkpoints (leaves stacked along a leading axis), their learning rates, and the damping (0)."""

    checkpoints: PyTree
    learning_rates: jax.Array
    damping: tuple
    spec: TreeSpec
    block_names: tuple

    def tree_flatten(self):
        return (self.checkpoints, self.learning_rates, self.damping), (self.spec, self.block_names)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)


def _block_damping(operator: CurvatureOperator) -> tuple:
    return tuple(operator.damping[operator.block_leaf_indices(b)[0]] for b in range(operator.num_blocks))


def _similarity_state(operator: CurvatureOperator) -> SimilarityState:
    return SimilarityState(_block_damping(operator), operator.spec, operator.block_names)


def _no_damping(state) -> jax.Array:
    return jnp.all(jnp.stack([lam == 0 for lam in state.damping]))


def _validate_no_damping(name: str):
    def validate(state) -> None:
        for block, lam in zip(state.block_names, state.damping):
            if float(lam) != 0:
                raise ValueError(
                    f"{name}() has no curvature, so damping cannot take effect, but block {block!r} has "
                    f"damping={float(lam):.3g}. Build the InfluenceModel (or operator) with damping=0 for this "
                    "baseline."
                )

    return validate


def _unit_rows(rows):
    """Rows scaled to unit norm; a zero row stays zero (its cosine with anything is taken as 0)."""
    norms = jnp.linalg.norm(rows, axis=1, keepdims=True)
    return jnp.where(norms > 0, rows / jnp.where(norms > 0, norms, 1.0), 0.0)


def _scorer_only(name: str, self_influence: str):
    def solve(state, v):
        raise ValueError(
            f"{name}() is not a bilinear form in the gradient at the model's params, so it has no influence factors "
            "(C + λI)⁻¹ ∇θℓ(test) to solve for: it scores only through InfluenceModel.influences(test, train) in "
            "mode 'up' (its Scorer). influence_factors, influences_from_factors, self_influence, mode "
            f"'perturbation' and jaxinf.scale.compute_influences are not available for it; {self_influence}"
        )

    solve.scorer_only = True  # read by jaxinf.scoring.check_scoring: a named scoring method cannot apply
    return solve


@records_config
def gradient_dot() -> Solver:
    """Gradient dot product: ``I(z', z) = ∇θℓ(z')ᵀ ∇θℓ(z)``, the identity in place of ``(C + λI)⁻¹``.

    ``solve(state, v)`` returns ``v``; every path of
    :class:`jaxinf.InfluenceModel` then gives plain gradient dot products
    (self-influence: ``‖∇θℓ(z)‖²``). There is no curvature: a damping other
    than 0 is refused by ``validate`` (and flagged by ``info.converged =
    False``); the curvature kind is not used. Cost: nothing to fit; scores
    as for any solver (no solve).

    Returns:
      A :class:`jaxinf.Solver`.

    Examples:
      >>> import jax.numpy as jnp, jaxinf
      >>> from jaxinf.solvers.similarity import gradient_dot
      >>> loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> x, y = jnp.array([[1.0, 0.0], [1.0, 1.0]]), jnp.array([1.0, 2.0])
      >>> model = jaxinf.InfluenceModel(loss, jnp.zeros(2), gradient_dot()).fit((x, y))
      >>> model.influences((x, y), (x, y)).tolist()  # g_1 = (-2, 0), g_2 = (-4, -4)
      [[4.0, 8.0], [8.0, 32.0]]
    """

    def solve(state: SimilarityState, v):
        check_matches(v, state.spec, "v")
        return v, make_info(0, 0.0, _no_damping(state), False)

    return Solver(
        init=lambda operator, *, key=None: _similarity_state(operator),
        solve=solve,
        validate=_validate_no_damping("gradient_dot"),
        name="gradient_dot",
        stream_init=lambda stream, *, key=None: _similarity_state(stream.operator),
    )


def _unit_gradients(state: SimilarityState, operator: CurvatureOperator, batch: PyTree):
    grads = per_example_grads(scoring_loss_fn(operator), operator.params, batch)
    return _unit_rows(ravel_batched(grads, state.spec.dtype))


def _cosine_finish(state: SimilarityState, operator: CurvatureOperator, prepared, train_batch):
    scores = prepared @ _unit_gradients(state, operator, train_batch).T
    return jnp.where(_no_damping(state), scores, jnp.nan)


@records_config
def gradient_cosine() -> Solver:
    """Gradient cosine similarity: ``I(z', z) = ∇θℓ(z')ᵀ ∇θℓ(z) / (‖∇θℓ(z')‖ ‖∇θℓ(z)‖)``.

    Scores through its :class:`jaxinf.Scorer` (the unit test gradients are
    prepared once per test batch), i.e. ``InfluenceModel.influences(test,
    train)`` in mode ``"up"``; a zero gradient has cosine 0 with everything.
    The cosine is not ``f(z')ᵀ ∇θℓ(z)`` for any factor ``f``, so
    ``influence_factors``, ``self_influence`` (which would be 1),
    perturbation mode and the tiled calculator raise a ``ValueError`` (see
    :mod:`jaxinf.solvers.similarity`). A damping other than 0 is refused by
    ``validate``. Cost: one per-example gradient per example on each side;
    memory ``n × p`` per batch.

    Returns:
      A :class:`jaxinf.Solver`.

    Examples:
      >>> import jax.numpy as jnp, jaxinf
      >>> from jaxinf.solvers.similarity import gradient_cosine
      >>> loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> x, y = jnp.array([[1.0, 0.0], [1.0, 1.0]]), jnp.array([1.0, 2.0])
      >>> model = jaxinf.InfluenceModel(loss, jnp.zeros(2), gradient_cosine()).fit((x, y))
      >>> [round(float(c), 4) for c in model.influences((x, y))[0]]  # g_1 ∝ (1, 0), g_2 ∝ (1, 1)
      [1.0, 0.7071]
    """
    return Solver(
        init=lambda operator, *, key=None: _similarity_state(operator),
        solve=_scorer_only("gradient_cosine", "the cosine of a point with itself is 1."),
        validate=_validate_no_damping("gradient_cosine"),
        name="gradient_cosine",
        stream_init=lambda stream, *, key=None: _similarity_state(stream.operator),
        scorer=Scorer(prepare=_unit_gradients, finish=_cosine_finish),
    )


# ----------------------------------------------------------------------------
# TracIn
# ----------------------------------------------------------------------------


def _checked_checkpoints(checkpoints, learning_rates) -> tuple[PyTree, np.ndarray]:
    """The checkpoints stacked along a leading axis and the learning rates as a float array, checked."""
    if not isinstance(checkpoints, Sequence) or isinstance(checkpoints, str) or not checkpoints:
        raise ValueError(
            "tracin(checkpoints, learning_rates): checkpoints must be a non-empty list of parameter pytrees "
            f"(the params saved during training), got {type(checkpoints).__name__}."
        )
    spec = None
    for c, params in enumerate(checkpoints):
        check_params(params, f"checkpoints[{c}]")
        check_finite(params, f"checkpoints[{c}]")
        if spec is None:
            spec = tree_spec(params)
        elif tree_spec(params) != spec:
            raise ValueError(
                f"checkpoints[{c}] has another layout ({tree_spec(params)}) than checkpoints[0] ({spec}); every "
                "checkpoint must have the structure, shapes and dtypes of the model's params."
            )
    rates = np.asarray(learning_rates, dtype=np.float64)
    if rates.ndim == 0:
        rates = np.full(len(checkpoints), float(rates))
    if rates.shape != (len(checkpoints),):
        raise ValueError(
            f"learning_rates must be one number or one per checkpoint ({len(checkpoints)}), got shape {rates.shape}."
        )
    if not np.all(np.isfinite(rates)) or np.any(rates <= 0):
        raise ValueError(f"learning_rates must be finite and > 0, got {rates.tolist()}.")
    stacked = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *checkpoints)
    return stacked, rates


def _tracin_state(operator: CurvatureOperator, stacked: PyTree, rates: np.ndarray) -> TracInState:
    first = jax.tree.map(lambda a: a[0], stacked)
    if tree_spec(first) != operator.spec:
        raise ValueError(
            f"tracin(): the checkpoints have another layout ({tree_spec(first)}) than the model's params "
            f"({operator.spec}); pass checkpoints of this model, with the params' structure, shapes and dtypes."
        )
    lr = jnp.asarray(rates, operator.spec.dtype)
    return TracInState(stacked, lr, _block_damping(operator), operator.spec, operator.block_names)


def _checkpoint_gradients(loss_fn, state: TracInState, batch):
    """``(c, n, p)``: the per-example gradients of ``batch`` at every checkpoint, raveled."""
    dtype = state.spec.dtype

    def at(params):
        return ravel_batched(per_example_grads(loss_fn, params, batch), dtype)

    return jax.lax.map(at, state.checkpoints)


def _tracin_prepare(state: TracInState, operator: CurvatureOperator, test_batch):
    grads = _checkpoint_gradients(scoring_loss_fn(operator), state, test_batch)
    return grads * state.learning_rates[:, None, None]


def _tracin_finish(state: TracInState, operator: CurvatureOperator, prepared, train_batch):
    loss_fn = scoring_loss_fn(operator)
    dtype = state.spec.dtype

    def add(total, inputs):
        params, test_side = inputs
        train = ravel_batched(per_example_grads(loss_fn, params, train_batch), dtype)
        return total + test_side @ train.T, None

    n_train = jax.tree.leaves(train_batch)[0].shape[0]
    zero = jnp.zeros((prepared.shape[1], n_train), dtype)
    scores, _ = jax.lax.scan(add, zero, (state.checkpoints, prepared))
    return jnp.where(_no_damping(state), scores, jnp.nan)


def tracin(checkpoints: Sequence[PyTree], learning_rates: Any = 1.0) -> Solver:
    """TracInCP (Pruthi et al. 2020): ``I(z', z) = Σ_c η_c ∇θℓ(z'; θ_c)ᵀ ∇θℓ(z; θ_c)``.

    The gradient dot products at every given checkpoint ``θ_c``, weighted by
    its learning rate ``η_c``. With one checkpoint, the final params and
    ``η = 1`` it equals :func:`gradient_dot`. The model's params are used for
    nothing but the layout (the checkpoints must share it); they need not be
    among the checkpoints.

    Scores through its :class:`jaxinf.Scorer` (``InfluenceModel.influences(test,
    train)`` in mode ``"up"``); ``influence_factors``, ``self_influence``,
    perturbation mode and the tiled calculator raise a ``ValueError`` (see
    :mod:`jaxinf.solvers.similarity`); the self-influence
    ``Σ_c η_c ‖∇θℓ(z; θ_c)‖²`` is :func:`tracin_self_influence`. A damping
    other than 0 is refused by ``validate``. Cost: one per-example gradient
    per example and checkpoint on each side; memory ``c × n_test × p`` for
    the test side, ``n_train × p`` per training batch.

    Args:
      checkpoints: a non-empty list of parameter pytrees saved during
        training, each with the structure, shapes and dtypes of the model's
        params.
      learning_rates: ``η_c``: one number for all checkpoints, or one per
        checkpoint; finite and ``> 0``.

    Returns:
      A :class:`jaxinf.Solver`; its ``config`` records the learning rates and a
      digest of the checkpoints.

    Raises:
      ValueError: an empty or malformed list of checkpoints, checkpoints of
        different layouts, non-finite checkpoints, bad learning rates; from
        ``init``, checkpoints whose layout is not the model's.

    Examples:
      >>> import jax.numpy as jnp, jaxinf
      >>> from jaxinf.solvers.similarity import tracin
      >>> loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> x, y = jnp.array([[1.0, 0.0], [1.0, 1.0]]), jnp.array([1.0, 2.0])
      >>> solver = tracin([jnp.zeros(2), jnp.array([0.5, 0.0])], [0.1, 0.2])
      >>> model = jaxinf.InfluenceModel(loss, jnp.zeros(2), solver).fit((x, y))
      >>> [round(float(s), 4) for s in model.influences((x[:1], y[:1]), (x, y))[0]]  # 0.1·4 + 0.2·1, 0.1·8 + 0.2·3
      [0.6, 1.4]

    References:
      Pruthi, Liu, Kale & Sundararajan, "Estimating Training Data Influence
      by Tracing Gradient Descent", NeurIPS 2020.
    """
    stacked, rates = _checked_checkpoints(checkpoints, learning_rates)
    solver = Solver(
        init=lambda operator, *, key=None: _tracin_state(operator, stacked, rates),
        solve=_scorer_only("tracin", "its self-influence is jaxinf.solvers.similarity.tracin_self_influence."),
        validate=_validate_no_damping("tracin"),
        name="tracin",
        stream_init=lambda stream, *, key=None: _tracin_state(stream.operator, stacked, rates),
        scorer=Scorer(prepare=_tracin_prepare, finish=_tracin_finish),
    )
    # recorded by hand: checkpoints of any pytree type (nnx.State, ...) are recorded by digest
    config = {"factory": "tracin", "checkpoints": {"array": tree_digest(stacked)}, "learning_rates": rates.tolist()}
    return solver._replace(config=config)


def tracin_self_influence(loss_fn, checkpoints: Sequence[PyTree], learning_rates: Any, data: Any) -> jax.Array:
    """TracIn self-influence ``Σ_c η_c ‖∇θℓ(z; θ_c)‖²`` of every example of ``data``: shape ``(n,)``.

    The score Pruthi et al. use to find mislabelled examples; what
    ``InfluenceModel.self_influence`` cannot give for :func:`tracin`.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss.
      checkpoints, learning_rates: as for :func:`tracin`.
      data: one batch or a list of batches.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxinf.solvers.similarity import tracin_self_influence
      >>> loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> x, y = jnp.eye(2), jnp.array([1.0, 0.0])
      >>> tracin_self_influence(loss, [jnp.zeros(2)], 0.5, (x, y)).tolist()  # 0.5 · ‖(-2, 0)‖²
      [2.0, 0.0]
    """
    stacked, rates = _checked_checkpoints(checkpoints, learning_rates)
    lr = jnp.asarray(rates, tree_spec(jax.tree.map(lambda a: a[0], stacked)).dtype)
    out = [_self_scores(loss_fn, stacked, lr, batch) for batch in checked_list(data, name="data")]
    return jnp.concatenate(out)


@functools.partial(jax.jit, static_argnums=0)
def _self_scores(loss_fn, stacked, lr, batch):
    def one(params):
        grads = ravel_batched(per_example_grads(loss_fn, params, batch), lr.dtype)
        return jnp.sum(grads * grads, axis=1)

    return lr @ jax.lax.map(one, stacked)
