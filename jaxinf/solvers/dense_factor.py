"""Dense factorisations of one damped curvature block for :func:`jaxinf.direct`.

:func:`factor_block` factorises ``C + λI`` by Cholesky, ``L Lᵀ = C + λI``,
where it is positive definite and by the eigendecomposition ``C = Q diag(w) Qᵀ``
elsewhere (``factorization="auto"``, decided by ``lax.cond`` on the Cholesky
factor being finite: ``jnp.linalg.cholesky`` returns NaN for a matrix that is
not numerically positive definite), or by the one asked for. One matrix per
LAPACK call. :func:`cholesky_bounds` estimates the extreme eigenvalues of
``L Lᵀ`` in ``O(p²)`` (for the singularity checks an ``eigh`` gets from its
eigenvalues), and :func:`cholesky_inverse` solves with ``L`` and carries the
derivative in the damping, ``d/dλ (C + λI)⁻¹ b = −(C + λI)⁻¹ x``.

References:
  Golub & Van Loan, "Matrix Computations", 4th ed., §4.2 (Cholesky), §8.2
  (power and inverse iteration).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

POWER_STEPS = 6  # inverse / power iteration steps behind the extreme-eigenvalue estimates of a Cholesky block

__all__ = ["POWER_STEPS", "cholesky_bounds", "cholesky_inverse", "factor_block"]


def _cho_solve(low, b):
    return solve_triangular(low, solve_triangular(low, b, lower=True), lower=True, trans="T")


def _unit(x):
    return x / jnp.linalg.norm(x)


def cholesky_bounds(low):
    """Estimates of the ``(smallest, largest)`` eigenvalue of ``A = L Lᵀ``, by ``O(p²)`` work.

    ``POWER_STEPS`` steps of inverse and of plain power iteration from a fixed
    random start give Rayleigh quotients ``1 / uᵀA⁻¹u ≥ λ_min`` and
    ``vᵀAv ≤ λ_max``; the Cholesky pivots ``L_ii²`` lie in
    ``[λ_min, λ_max]`` (interlacing), so the estimates are the smaller and the
    larger of each pair. A near-singular ``A`` shows up in a step or two,
    which is what ``validate`` and the solve's ``converged`` need.
    """
    start = jax.random.normal(jax.random.key(0), (2, low.shape[0]), low.dtype)

    def step(_, uv):
        return _unit(_cho_solve(low, uv[0])), _unit(low @ (low.T @ uv[1]))

    u, v = jax.lax.fori_loop(0, POWER_STEPS, step, (_unit(start[0]), _unit(start[1])))
    pivots = jnp.diagonal(low) ** 2
    smallest = jnp.minimum(1.0 / jnp.sum(solve_triangular(low, u, lower=True) ** 2), jnp.min(pivots))
    return jnp.stack([smallest, jnp.maximum(jnp.sum((low.T @ v) ** 2), jnp.max(pivots))])


def factor_block(matrix, damping, factorization: str):
    """``(factor, eigvals, cholesky, factored_damping, bounds)`` of one symmetric block (see :class:`DirectState`)."""
    dtype, n = matrix.dtype, matrix.shape[0]
    lam = jax.lax.stop_gradient(jnp.asarray(damping).astype(dtype))
    no_bounds = jnp.full((2,), jnp.nan, dtype)
    if factorization == "eigh":
        w, q = jnp.linalg.eigh(matrix)
        return q, w, jnp.asarray(False), lam, no_bounds
    low = jnp.linalg.cholesky(matrix + lam * jnp.eye(n, dtype=dtype))
    nan = jnp.full((n,), jnp.nan, dtype)
    if factorization == "cholesky":
        return low, nan, jnp.asarray(True), lam, cholesky_bounds(low)

    def by_eigh():
        w, q = jnp.linalg.eigh(matrix)
        return q, w, no_bounds

    ok = jnp.all(jnp.isfinite(jnp.diagonal(low)))
    q, w, bounds = jax.lax.cond(ok, lambda: (low, nan, cholesky_bounds(low)), by_eigh)
    return q, w, ok, lam, bounds


@jax.custom_jvp
def cholesky_inverse(low, lam, b):
    """``(L Lᵀ)⁻¹ b``, differentiated in ``lam`` as ``(C + lam I)⁻¹ b`` with ``L Lᵀ = C + lam I``."""
    del lam
    return _cho_solve(low, b)


@cholesky_inverse.defjvp
def _cholesky_inverse_jvp(primals, tangents):
    low, lam, b = primals
    _, dlam, db = tangents  # the factor's tangent is refused by `frozen` before it gets here
    x = _cho_solve(low, b)
    return x, _cho_solve(low, db - dlam.astype(x.dtype) * x)
