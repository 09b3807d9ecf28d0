"""Pre-conditioned conjugate gradient over a stream of training batches.

:func:`jaxinf.cg` runs its iterations inside ``lax.while_loop`` over data held
in memory. :func:`cg_from_stream` runs the same pre-conditioned CG with the
training data read batch by batch: the iteration is a host loop, and each
iteration is **one pass** over the source (:class:`StreamingCurvature`
``matmat``) for all right-hand sides at once; the pre-conditioner (K-FAC,
EK-FAC, Nyström, Jacobi) is fitted from the same stream first
(:mod:`jaxinf.scale.preconditioner_stream`) and applied on the device.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.checks import check_like_training
from jaxinf.core.curvature import CurvatureOperator, per_example_grads
from jaxinf.core.damping import is_auto
from jaxinf.core.data import as_batches
from jaxinf.core.precision import refuse_half
from jaxinf.core.tree import check_finite, ravel_batched, unravel, unravel_batched
from jaxinf.model import InfluenceModel
from jaxinf.scale.preconditioner_stream import cg_config, fit_preconditioner, preconditioner_from_config
from jaxinf.scale.sharding import host_view
from jaxinf.scale.sources import as_source
from jaxinf.scale.stream_fit import BatchStream
from jaxinf.solvers.base import check_solve, make_info
from jaxinf.solvers.cg import MAXITER_CAP, default_rtol

PyTree = Any

__all__ = ["StreamCGResult", "cg_from_stream", "influences_from_stream"]


class StreamCGResult(NamedTuple):
    """What :func:`cg_from_stream` returns.

    Attributes:
      factors: ``(C + Λ)⁻¹ ∇θℓ(test_i)``, params-shaped leaves with a leading
        ``n_test`` axis (what :meth:`jaxinf.InfluenceModel.influence_factors`
        returns in memory).
      iterations: CG iterations of each right-hand side, ``(n_test,)``.
      converged: whether the true residual ``‖b − (C + Λ)x‖`` meets
        ``max(rtol‖b‖, atol)``, per right-hand side.
      diverged: a direction of non-positive curvature or a non-finite value.
      residual_norm: the true residual ``‖b − (C + Λ)x‖`` (one more pass).
      rhs_norm: ``‖b‖``.
      passes: passes over the training data in all: the pre-conditioner's
        fit, one per iteration, one for the true residual.
      preconditioner_passes: the pre-conditioner's share of ``passes``.
    """

    factors: PyTree
    iterations: np.ndarray
    converged: np.ndarray
    diverged: np.ndarray
    residual_norm: np.ndarray
    rhs_norm: np.ndarray
    passes: int
    preconditioner_passes: int


class _Iterate(NamedTuple):
    x: jax.Array  # (k, p) raveled iterates
    r: jax.Array
    p: jax.Array
    rz: jax.Array  # (k,) rᵀ M⁻¹ r
    bound: jax.Array  # (k,) max(rtol ‖b‖, atol)
    done: jax.Array  # (k,) converged or diverged: frozen
    diverged: jax.Array
    iterations: jax.Array


def _precondition(pre, pre_state, operator: CurvatureOperator, rows: jax.Array) -> jax.Array:
    if pre is None:
        return rows
    spec = operator.spec
    return ravel_batched(jax.vmap(lambda r: pre.apply(pre_state, unravel(spec, r)))(rows), operator.dtype)


def _damped(operator: CurvatureOperator, curvature_rows: PyTree, rows: jax.Array) -> jax.Array:
    """``(C + Λ) v`` per row from the streamed ``C v`` and the operator's damping."""
    damping = jax.vmap(lambda r: operator.damping_vp(unravel(operator.spec, r)))(rows)
    return ravel_batched(curvature_rows, operator.dtype) + ravel_batched(damping, operator.dtype)


@functools.partial(jax.jit, static_argnums=0)
def _start(pre, pre_state, operator: CurvatureOperator, b: jax.Array, rtol, atol) -> _Iterate:
    z = _precondition(pre, pre_state, operator, b)
    norm = jnp.linalg.norm(b, axis=1)
    bound = jnp.maximum(rtol * norm, atol)
    rz = jnp.sum(b * z, 1)
    bad = ~jnp.isfinite(rz) | ((rz <= 0) & (norm > bound))  # M⁻¹ not positive definite (or NaN from it)
    k = b.shape[0]
    return _Iterate(jnp.zeros_like(b), b, z, rz, bound, (norm <= bound) | bad, bad, jnp.zeros((k,), jnp.int32))


@functools.partial(jax.jit, static_argnums=0)
def _step(pre, pre_state, operator: CurvatureOperator, it: _Iterate, curvature_p: PyTree) -> _Iterate:
    """One PCG step for every right-hand side not yet done, given ``C p`` (one pass)."""
    ap = _damped(operator, curvature_p, it.p)
    pap = jnp.sum(it.p * ap, 1)
    active = ~it.done
    bad = active & ~(pap > 0)  # non-positive curvature, or NaN
    alpha = jnp.where(active & ~bad, it.rz / jnp.where(pap > 0, pap, 1.0), 0.0)[:, None]
    x, r = it.x + alpha * it.p, it.r - alpha * ap
    z = _precondition(pre, pre_state, operator, r)
    rz = jnp.sum(r * z, 1)
    converged = jnp.linalg.norm(r, axis=1) <= it.bound
    bad = bad | (active & ~converged & ~(rz > 0))  # M⁻¹ not positive definite, or NaN
    beta = jnp.where(it.rz > 0, rz / jnp.where(it.rz > 0, it.rz, 1.0), 0.0)[:, None]
    keep = it.done[:, None]
    return _Iterate(
        jnp.where(keep, it.x, x),
        jnp.where(keep, it.r, r),
        jnp.where(keep, it.p, z + beta * it.p),
        jnp.where(it.done, it.rz, rz),
        it.bound,
        it.done | converged | bad,
        it.diverged | bad,
        it.iterations + (active & ~bad).astype(jnp.int32),
    )


@functools.partial(jax.jit, static_argnums=(0, 3))
def _test_gradients(loss_fn, params: PyTree, batch: PyTree, dtype) -> jax.Array:
    return ravel_batched(per_example_grads(loss_fn, params, batch), dtype)


def _checked_model(model) -> dict:
    if not isinstance(model, InfluenceModel):
        name = type(model).__name__
        raise TypeError(f"cg_from_stream needs a jaxinf.InfluenceModel built with jaxinf.cg(...), got {name}.")
    config = cg_config(model.solver)
    refuse_half(model.params, "jaxinf.scale.cg_from_stream")
    if model.blocks is not None:
        raise ValueError(
            "cg_from_stream streams the full curvature; a model with blocks= (block-diagonal curvature) cannot be "
            "solved this way. Build the InfluenceModel without blocks, or fit it in memory (model.fit)."
        )
    if is_auto(model.damping):
        raise ValueError(
            "cg_from_stream needs a numeric damping: damping='auto' is estimated from data held in memory. Fit the "
            "model on a subset with damping='auto', read model.damping_value, and pass that number."
        )
    for name in ("rtol", "atol", "maxiter"):
        value = config.get(name)
        if value is not None and not isinstance(value, (int, float)):
            raise ValueError(f"cg_from_stream needs a number for cg({name}=...), got {value!r}.")
    return config


def cg_from_stream(
    model: InfluenceModel,
    test_data: Any,
    train_data: Any,
    *,
    mesh=None,
    key: jax.Array | None = None,
    progress: bool = False,
) -> StreamCGResult:
    """Influence factors ``(C + Λ)⁻¹ ∇θℓ(test_i)`` by pre-conditioned CG with the training data streamed.

    Solves ``(C + Λ) x_i = b_i = ∇θℓ(test_i)`` for every test point ``i`` at
    once, ``C`` the curvature of the mean loss over **every** example of
    ``train_data``, read batch by batch and never held in memory. The model's
    :func:`jaxinf.cg` solver gives the options (``rtol``, ``atol``,
    ``maxiter``, ``preconditioner``); ``block`` and ``block_size`` do not
    apply (every right-hand side runs its own CG, side by side).

    The algorithm is pre-conditioned CG (Hestenes & Stiefel 1952) as in
    :func:`jaxinf.cg`, from ``x₀ = 0``: ``α = rᵀz / pᵀ(C + Λ)p``,
    ``x ← x + αp``, ``r ← r − α(C + Λ)p``, ``z = M⁻¹r``,
    ``p ← z + (rᵀz)_new/(rᵀz)_old · p``, with ``M⁻¹`` the pre-conditioner
    fitted from the stream (:mod:`jaxinf.scale.preconditioner_stream`: the
    state ``init`` gives on the same data in memory). The host loops over the
    iterations; each iteration is **one pass** over ``train_data`` computing
    ``C P`` for all ``k`` right-hand sides at once
    (:meth:`jaxinf.scale.StreamingCurvature.matmat`, one jitted product per
    batch, data-parallel on a ``mesh``); ``Λ P``, ``M⁻¹ R`` and the updates
    run on the device. A right-hand side that converged (recursive residual
    ``‖r‖ ≤ max(rtol‖b‖, atol)``) is frozen; the loop ends when all are done
    or after ``maxiter`` iterations. A last pass computes the **true**
    residual ``‖b − (C + Λ)x‖``, which decides ``converged`` (no residual
    replacement: a right-hand side whose recursive residual drifted is
    reported as not converged).

    Cost: ``passes = preconditioner passes + iterations + 1`` passes over the
    training data (pre-conditioner: K-FAC 1, EK-FAC 2, Nyström 1, Jacobi 1,
    none 0), each pass ``k`` curvature-vector products per example (frozen
    right-hand sides are still multiplied, so the shapes, and the compiled
    programs, stay the same). Memory: one batch plus ``O(k p)``. A run cannot
    be resumed part-way.

    Args:
      model: an :class:`jaxinf.InfluenceModel` built with :func:`jaxinf.cg`
        (no ``blocks``, a numeric ``damping``); it need not be fitted, and is
        not changed. Its ``strict`` decides whether non-convergence raises
        or warns.
      test_data: the test points (one batch or a list, in memory).
      train_data: a source (:class:`jaxinf.scale.ArraySource`, ...), one batch
        or a list of batches; every batch but the last of the same size.
      mesh: optional data mesh (:func:`jaxinf.scale.data_mesh`); in a
        multi-process run each process streams its own part and passes the
        same ``test_data``.
      key: PRNG key of the pre-conditioner's fit (as ``model.fit(key=...)``).
      progress: a progress bar per pass.

    Returns:
      A :class:`StreamCGResult`: ``factors`` for
      :meth:`jaxinf.InfluenceModel.influences_from_factors` or
      :func:`influences_from_stream`, and the iterations, residuals and passes.

    Raises:
      TypeError: ``model`` is not an ``InfluenceModel`` with a ``cg`` solver.
      ValueError: bfloat16/float16 params, ``blocks``, ``damping="auto"``, a K-FAC/EK-FAC
        pre-conditioner with damping ``≤ 0``, NaN or inf in a test or training
        batch (naming it), test batches whose structure differs from the
        training batches, what :meth:`jaxinf.InfluenceModel.fit` refuses
        (checked on the first training batch).
      jaxinf.ConvergenceError: a right-hand side diverged, or did not
        converge and ``model.strict``.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, jaxinf
      >>> from jaxinf import scale
      >>> x = np.random.default_rng(0).normal(size=(10, 3)); y = x @ np.ones((3, 1))
      >>> loss = lambda w, b: 0.5 * jnp.mean(jnp.sum((b[0] @ w - b[1]) ** 2, -1))
      >>> solver = jaxinf.cg(preconditioner=jaxinf.nystrom_preconditioner(2))
      >>> model = jaxinf.InfluenceModel(loss, jnp.zeros((3, 1)), solver, damping=0.1)
      >>> train = scale.ArraySource((x, y), batch_size=4)  # batches of 4, 4 and 2, read one at a time
      >>> result = scale.cg_from_stream(model, (x[:2], y[:2]), train)
      >>> result.factors.shape, result.converged.tolist(), result.passes == 1 + int(result.iterations.max()) + 1
      ((2, 3, 1), [True, True], True)
      >>> scale.influences_from_stream(model, result.factors, train).shape
      (2, 10)

    References:
      Hestenes & Stiefel, "Methods of conjugate gradients for solving linear
      systems", J. Res. Nat. Bur. Standards 49(6), 1952.
    """
    config = _checked_model(model)
    stream = BatchStream(
        model.loss_fn,
        model.params,
        as_source(train_data),
        kind=model.curvature,
        damping=model.damping,
        model_fn=model.model_fn,
        output_loss=model.output_loss,
        mesh=mesh,
        progress=progress,
        check=model._check_loss,
    )
    operator = stream.operator
    b = _right_hand_sides(model, stream, test_data)
    counted = _CountingStream(stream)
    pre_config = config.get("preconditioner")
    pre_state = None if pre_config is None else fit_preconditioner(pre_config, counted, key)
    pre = None if pre_config is None else preconditioner_from_config(pre_config)
    pre_passes = counted.passes
    rtol = default_rtol(operator.compute_dtype) if config.get("rtol") is None else config["rtol"]
    maxiter = config.get("maxiter") or min(10 * operator.size, MAXITER_CAP)
    it = _start(pre, pre_state, operator, b, rtol, config.get("atol", 0.0))
    steps = 0
    while steps < maxiter and not np.all(host_view(it.done)):
        curvature_p = stream.curvature.matmat(unravel_batched(operator.spec, it.p), desc=f"CG iteration {steps + 1}")
        it = _step(pre, pre_state, operator, it, curvature_p)
        steps += 1
    factors = unravel_batched(operator.spec, it.x)
    curvature_x = stream.curvature.matmat(factors, desc="CG true residual")
    true = np.asarray(host_view(jnp.linalg.norm(b - _damped(operator, curvature_x, it.x), axis=1)))
    diverged = np.asarray(host_view(it.diverged))
    result = StreamCGResult(
        factors=factors,
        iterations=np.asarray(host_view(it.iterations)),
        converged=(true <= np.asarray(host_view(it.bound))) & ~diverged,
        diverged=diverged,
        residual_norm=true,
        rhs_norm=np.asarray(host_view(jnp.linalg.norm(b, axis=1))),
        passes=pre_passes + steps + 1,
        preconditioner_passes=pre_passes,
    )
    info = make_info(result.iterations, result.residual_norm, result.converged, result.diverged)
    check_solve(model.solver, info, factors, "right-hand sides (streamed)", strict=model.strict)
    return result


def _right_hand_sides(model: InfluenceModel, stream: BatchStream, test_data: Any) -> jax.Array:
    """``∇θℓ(test_i)`` raveled, ``(n_test, p)``, checked (structure like the training batches, finite)."""
    batches = list(as_batches(test_data, name="test_data").batches())
    rows = []
    for i, batch in enumerate(batches):
        name = f"test_data[batch {i}]" if len(batches) > 1 else "test_data"
        check_like_training(batch, stream.first, name)
        check_finite(batch, name)
        grads = _test_gradients(model.loss_fn, stream.curvature.params, stream.replicate(batch), stream.operator.dtype)
        check_finite(host_view(grads), f"the loss_fn gradient on {name}", per_example=True)
        rows.append(grads)
    return stream.replicate(jnp.concatenate(rows)) if len(rows) > 1 else rows[0]


class _CountingStream:
    """``stream`` with its passes counted (``batches`` and ``matmat`` calls)."""

    def __init__(self, stream: BatchStream):
        self._stream, self.passes = stream, 0
        self.operator, self.first, self.num_examples = stream.operator, stream.first, stream.num_examples

    def batches(self, *args, **kwargs):
        self.passes += 1
        return self._stream.batches(*args, **kwargs)

    def matmat(self, *args, **kwargs):
        self.passes += 1
        return self._stream.matmat(*args, **kwargs)

    def matvec(self, *args, **kwargs):
        self.passes += 1
        return self._stream.matvec(*args, **kwargs)

    def replicate(self, tree: PyTree) -> PyTree:
        return self._stream.replicate(tree)

    def zeros(self, shapes: PyTree) -> PyTree:
        return self._stream.zeros(shapes)


def influences_from_stream(model: InfluenceModel, factors: PyTree, train_data: Any, mode: str = "up") -> np.ndarray:
    """``factorsᵀ ∇θℓ(z_j)`` for every training example, one pass over ``train_data``: ``(n_test, n_train)``.

    Each batch is scored by :meth:`jaxinf.InfluenceModel.influences_from_factors`
    (its scoring method); the result is held in memory (for results larger
    than memory, score tile by tile with :class:`jaxinf.scale.InfluenceCalculator`
    from a fitted state).
    """
    columns = [np.asarray(model.influences_from_factors(factors, batch, mode)) for batch in as_source(train_data)]
    return np.concatenate(columns, axis=1)
