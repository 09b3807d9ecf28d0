"""Pre-conditioners for conjugate gradient, fitted once per curvature operator.

A pre-conditioner is a :class:`Preconditioner`, a pair of pure functions:

* ``init(operator, key) -> state``: the one-off estimate (a diagonal, a
  sketch), from curvature-vector products of the damped operator; ``key`` is
  a ``jax.random`` key. The state is a pytree.
* ``apply(state, r) -> z``: ``z = M⁻¹ r ≈ (C + Λ)⁻¹ r`` for one residual
  ``r`` with the structure of the parameters.

:func:`jaxinf.cg` calls ``init`` inside its own ``init`` (so the state lives
in the solver state) and ``apply`` once per iteration. Any symmetric
positive definite ``M`` leaves the solution of CG unchanged; a good one cuts
the number of iterations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxinf.core.curvature import CurvatureOperator
from jaxinf.core.sketch import NystromApproximation, nystrom_of_operator, nystrom_precondition
from jaxinf.core.tree import ravel, tree_spec, unravel
from jaxinf.solvers.base import records_config

PyTree = Any


class Preconditioner(NamedTuple):
    """``init(operator, key) -> state`` and ``apply(state, r) -> M⁻¹ r``; see the module docstring."""

    init: Callable[[CurvatureOperator, jax.Array], Any]
    apply: Callable[[Any, PyTree], PyTree]
    name: str = "preconditioner"
    config: dict | None = None

    def __hash__(self) -> int:  # hashable although ``config`` is a dict (solvers are static arguments of jit)
        return hash(self[:-1])


class JacobiState(NamedTuple):
    """``inverse_diagonal``: ``1 / d`` with the structure of the parameters, where ``d``
    is the (floored) estimate of ``diag(C + Λ)``; ``diagonal`` the raw estimate,
    ``std_error`` its per-entry standard error (both raveled)."""

    inverse_diagonal: PyTree
    diagonal: jax.Array
    std_error: jax.Array


def damping_vector(operator: CurvatureOperator) -> jax.Array:
    """``diag(Λ)`` on the raveled parameters (the operator's per-block damping, one entry per parameter)."""
    dtype = operator.dtype
    return ravel(operator.damping_vp(unravel(operator.spec, jnp.ones((operator.size,), dtype))), dtype)


def hutchinson_probe(key: jax.Array, index, size: int, dtype) -> jax.Array:
    """Probe ``index`` of :func:`hutchinson_diagonal`: a Rademacher vector keyed by ``fold_in(key, index)``."""
    return jax.random.rademacher(jax.random.fold_in(key, index), (size,), dtype)


def diagonal_estimate(total: jax.Array, total_sq: jax.Array, num_samples: int):
    """``(mean, std_error)`` of ``s = num_samples`` samples ``z_k ⊙ A z_k`` from their sum and sum of squares.

    ``std_error = sqrt(var / s)`` with the unbiased sample variance
    ``var = (Σ x² − s·mean²) / (s − 1)`` (clipped at 0 against rounding; 0 when ``s = 1``).
    """
    mean = total / num_samples
    if num_samples > 1:
        var = jnp.maximum(total_sq - num_samples * mean**2, 0.0) / (num_samples - 1)
        return mean, jnp.sqrt(var / num_samples)
    return mean, jnp.zeros_like(mean)


def jacobi_state(operator: CurvatureOperator, diagonal: jax.Array, std_error: jax.Array) -> JacobiState:
    """The Jacobi state from a Hutchinson estimate of ``diag(C + Λ)`` (the floors of :func:`jacobi_preconditioner`).

    ``d_i ← max(d_i, 2·se_i, λ_i)``, then at ``eps · max(d)``; the state holds ``1/d`` as a parameter pytree.
    """
    safe = jnp.maximum(jnp.maximum(diagonal, 2.0 * std_error), damping_vector(operator))
    top = jnp.max(safe)
    safe = jnp.maximum(safe, jnp.where(top > 0, jnp.finfo(operator.dtype).eps * top, 1.0))
    return JacobiState(unravel(operator.spec, 1.0 / safe), diagonal, std_error)


def hutchinson_diagonal(operator: CurvatureOperator, num_samples: int, key: jax.Array, *, batch_size: int = 16):
    """Hutchinson estimate of ``diag(C + Λ)`` (Bekas, Kokiopoulou & Saad 2007).

    ``d = (1/s) Σ_k z_k ⊙ (C + Λ) z_k`` with Rademacher ``z_k`` (``z ⊙ z = 1``),
    an unbiased estimate; entry ``i`` has variance ``Σ_{j≠i} A_ij² / s``.

    Args:
      operator: the damped curvature operator (block-diagonal if it has blocks).
      num_samples: ``s``, the number of operator products.
      key: ``jax.random`` key for the probes.
      batch_size: products evaluated at once (memory of that many products).

    Returns:
      ``(d, std_error)``, raveled, each of shape ``(p,)``; ``std_error`` is the
      sample standard deviation of ``z ⊙ Az`` over ``sqrt(s)`` (0 when ``s = 1``).
    """
    spec = operator.spec
    p, dtype = spec.size, spec.dtype
    chunk = max(1, min(int(batch_size), int(num_samples)))
    num_chunks = -(-int(num_samples) // chunk)

    def probe(i):
        z = hutchinson_probe(key, i, p, dtype)
        return z * ravel(operator.matvec(unravel(spec, z)), dtype)

    def body(carry, c):
        total, total_sq = carry
        idx = c * chunk + jnp.arange(chunk)
        weight = (idx < num_samples).astype(dtype)[:, None]  # the last chunk may overshoot
        samples = jax.vmap(probe)(idx) * weight
        return (total + samples.sum(0), total_sq + (samples**2).sum(0)), None

    zero = jnp.zeros((p,), dtype)
    (total, total_sq), _ = jax.lax.scan(body, (zero, zero), jnp.arange(num_chunks))
    return diagonal_estimate(total, total_sq, int(num_samples))


@records_config
def jacobi_preconditioner(num_samples: int = 100, *, batch_size: int = 16) -> Preconditioner:
    """Jacobi (diagonal) pre-conditioner ``M = diag(C + Λ)``, diagonal estimated by Hutchinson.

    The diagonal is estimated matrix-free from ``num_samples`` products with
    Rademacher probes (:func:`hutchinson_diagonal`). Entries that the
    estimate cannot resolve are floored so that ``M`` stays positive and never
    over-amplifies a direction: ``d_i ← max(d_i, 2·se_i, λ_i)`` with ``se_i``
    the standard error of entry ``i`` and ``λ_i`` its damping (for a PSD
    curvature ``A_ii ≥ λ_i``), then at ``eps · max(d)``.

    Useful when the diagonal of the curvature spans orders of magnitude (badly
    scaled features, layers of very different sizes); it cannot help with
    ill-conditioning that lives off the diagonal.

    Args:
      num_samples: Hutchinson probes (``init`` costs that many products).
      batch_size: products evaluated at once while fitting.

    Returns:
      A :class:`Preconditioner`.

    Raises:
      ValueError: ``num_samples`` or ``batch_size`` below 1.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxinf
      >>> loss = lambda w, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> x = jnp.eye(3) * jnp.array([1.0, 10.0, 100.0]); y = jnp.ones(3)
      >>> op = jaxinf.curvature_operator(loss, jnp.zeros(3), (x, y), damping=0.0)
      >>> pre = jaxinf.jacobi_preconditioner(num_samples=4)
      >>> state = pre.init(op, jax.random.key(0))  # diagonal H: the estimate is exact
      >>> [round(float(a)) for a in state.diagonal * 3]
      [1, 100, 10000]

    References:
      Bekas, Kokiopoulou & Saad, "An estimator for the diagonal of a matrix",
      Applied Numerical Mathematics 57(11-12), 2007.
    """
    num_samples, batch_size = _positive_int(num_samples, "num_samples"), _positive_int(batch_size, "batch_size")

    def init(operator: CurvatureOperator, key: jax.Array) -> JacobiState:
        return jacobi_state(operator, *hutchinson_diagonal(operator, num_samples, key, batch_size=batch_size))

    def apply(state: JacobiState, r: PyTree) -> PyTree:
        return jax.tree.map(lambda w, x: w.astype(x.dtype) * x, state.inverse_diagonal, r)

    return Preconditioner(init=init, apply=apply, name=f"jacobi({num_samples})")


class NystromPreconditionerState(NamedTuple):
    """The rank-``r`` approximation ``C ≈ U diag(Λ) Uᵀ`` and the scalar damping ``μ`` used in ``P⁻¹``."""

    approximation: NystromApproximation
    damping: jax.Array


@records_config
def nystrom_preconditioner(rank: int, *, batch_size: int | None = None) -> Preconditioner:
    """Randomized Nyström pre-conditioner (Frangella, Tropp & Udell 2023).

    ``init`` sketches the undamped (block-diagonal) curvature with ``rank``
    products, ``C ≈ U diag(Λ) Uᵀ`` (:func:`jaxinf.core.sketch.randomized_nystrom`),
    and ``apply`` uses

        ``P⁻¹ = (Λ_r + μ) U (Λ + μI)⁻¹ Uᵀ + (I − UUᵀ)``,

    with ``Λ_r`` the smallest retained eigenvalue and ``μ`` the damping. It
    maps the top ``r`` eigenvalues of ``C + μI`` to about ``Λ_r + μ``, so the
    condition number seen by CG drops from ``(λ₁ + μ)/(λ_p + μ)`` to about
    ``(λ_{r+1} + μ)/(λ_p + μ)``: a large gain when the spectrum decays fast,
    as it does for neural-network curvature. With per-block damping ``μ`` is
    the size-weighted mean damping (any ``μ > 0`` gives a symmetric positive
    definite ``P⁻¹``, so CG still solves the exact per-block system); ``μ`` is
    floored at ``eps · Λ₁`` so that ``P⁻¹`` stays positive definite without
    damping.

    Args:
      rank: sketch size ``r`` (``1 ≤ r ≤ p``); ``init`` costs ``r`` products
        and ``O(p r)`` memory.
      batch_size: products evaluated at once while sketching (default all).

    Returns:
      A :class:`Preconditioner`.

    Raises:
      ValueError: ``rank`` below 1 here, or above ``p`` in ``init``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxinf
      >>> loss = lambda w, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> x = jnp.diag(jnp.array([4.0, 2.0, 1.0])); y = jnp.ones(3)
      >>> op = jaxinf.curvature_operator(loss, jnp.zeros(3), (x, y), damping=1.0)
      >>> solver = jaxinf.cg(rtol=1e-5, preconditioner=jaxinf.nystrom_preconditioner(rank=3))
      >>> sol, info = solver.solve(solver.init(op), jnp.ones(3))
      >>> int(info.iterations)  # exact sketch: P⁻¹ (C + I) = (Λ_r + 1) I
      1

    References:
      Frangella, Tropp & Udell, "Randomized Nyström Preconditioning",
      SIAM J. Matrix Anal. Appl. 44(2), 2023.
    """
    rank = _positive_int(rank, "rank")
    if batch_size is not None:
        batch_size = _positive_int(batch_size, "batch_size")

    def init(operator: CurvatureOperator, key: jax.Array) -> NystromPreconditionerState:
        check_nystrom_rank(rank, operator.size)
        return nystrom_state(operator, nystrom_of_operator(operator, rank, key, batch_size=batch_size))

    def apply(state: NystromPreconditionerState, r: PyTree) -> PyTree:
        dtype = state.approximation.basis.dtype
        return unravel(tree_spec(r), nystrom_precondition(state.approximation, state.damping, ravel(r, dtype)))

    return Preconditioner(init=init, apply=apply, name=f"nystrom({rank})")


def check_nystrom_rank(rank: int, size: int) -> None:
    """Raises ``ValueError`` when the sketch has more columns than the ``size`` parameters."""
    if rank > size:
        raise ValueError(
            f"nystrom_preconditioner(rank={rank}) exceeds the number of parameters ({size}); use rank <= {size}."
        )


def nystrom_state(operator: CurvatureOperator, approx: NystromApproximation) -> NystromPreconditionerState:
    """The Nyström state of a sketch of the undamped curvature: ``μ`` = the mean damping, floored at ``eps · Λ₁``."""
    dtype = operator.dtype
    mu = jnp.mean(damping_vector(operator))
    mu = jnp.maximum(mu, jnp.finfo(dtype).eps * jnp.maximum(approx.eigvals[0], jnp.finfo(dtype).tiny))
    return NystromPreconditionerState(approx, mu)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)
