"""The Krylov kernels of :func:`jaxinf.cg`: pre-conditioned CG and breakdown-free block CG, with residual replacement.

Both solve ``A x = b`` for a symmetric positive definite ``A = C + Λ`` from
``x₀ = 0`` inside ``lax.while_loop`` (jit- and vmap-safe), one product with
``A`` (a block of products for block CG) per iteration.

* :func:`pcg` — Hestenes & Stiefel (1952) pre-conditioned CG with
  ``M⁻¹ ≈ A⁻¹``: ``α = rᵀz / pᵀAp``, ``x ← x + αp``, ``r ← r − αAp``,
  ``z = M⁻¹r``, ``p ← z + (rᵀz)_new / (rᵀz)_old · p``.
* :func:`block_pcg` — the breakdown-free block PCG of Ji & Li (2017), a
  block CG (O'Leary 1980) on ``k`` right-hand sides that share one block
  Krylov space: ``P = orth(M⁻¹R)``, ``Q = AP``, ``α = (PᵀQ)⁻¹PᵀR``,
  ``X ← X + Pα``, ``R ← R − Qα``, ``P ← orth(M⁻¹R − P(PᵀQ)⁻¹QᵀM⁻¹R)``, with
  :func:`orth` keeping the numerically independent directions only.

**Residual replacement.** In floating point the recursively updated residual
``r`` drifts from the true residual ``b − Ax``: when the recursion reaches
the tolerance, ``‖b − Ax‖`` can sit well above it (4–19× at ``rtol=1e-6`` in
``benchmarks/preconditioners.py``, more at large condition numbers). So the
recursion only proposes convergence: then the true residual is computed (one
product) and decides. If it is above the tolerance, ``r`` is replaced by it
(van der Vorst & Ye 2000), the direction restarts from ``z = M⁻¹r`` and the
iteration goes on, within the same ``maxiter``. ``converged`` therefore
means ``‖b − Ax‖ ≤ max(rtol·‖b‖, atol)``, and the reported residual is that
true residual (the last replacement's product: no extra one at the end). A
tolerance below what the precision can reach (about ``eps·κ(A)``) ends at
``maxiter`` with ``converged = False``, never with a false claim. Each
replacement is an outer step around the inner CG loop, so under ``jax.vmap``
it costs one product per replacement, not one per iteration.

References:
  Hestenes & Stiefel, "Methods of conjugate gradients for solving linear
  systems", J. Res. Nat. Bur. Standards 49(6), 1952.
  O'Leary, "The block conjugate gradient algorithm and related methods",
  Linear Algebra and its Applications 29, 1980.
  Ji & Li, "A breakdown-free block conjugate gradient method", BIT Numerical
  Mathematics 57, 2017.
  van der Vorst & Ye, "Residual replacement strategies for Krylov subspace
  iterative methods for the convergence of true residuals", SIAM J. Sci.
  Comput. 22(3), 2000.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxinf.core.tree import tree_axpy, tree_norm, tree_sub, tree_vdot, tree_where, tree_zeros_like
from jaxinf.solvers.base import SolveInfo, make_info

PyTree = Any

__all__ = ["block_pcg", "orth", "pcg", "tolerance"]


def tolerance(bnorm, rtol, atol):
    """``max(rtol·‖b‖, atol)`` in the dtype of ``‖b‖``."""
    return jnp.maximum(jnp.asarray(rtol, bnorm.dtype) * bnorm, jnp.asarray(atol, bnorm.dtype))


def pcg(matvec, precond, b: PyTree, rtol, atol, maxiter: int) -> tuple[PyTree, SolveInfo]:
    """Pre-conditioned CG on pytrees from ``x₀ = 0``, converged on the true residual (see the module).

    Args:
      matvec: ``v ↦ Av`` on pytrees shaped like ``b``.
      precond: ``r ↦ M⁻¹r`` (the identity for plain CG).
      b: the right-hand side.
      rtol, atol: stop when ``‖b − Ax‖ ≤ max(rtol·‖b‖, atol)``.
      maxiter: CG iterations at most (replacement products not counted).

    Returns:
      ``(x, info)``: ``info.iterations`` CG iterations, ``info.residual_norm``
      the true ``‖b − Ax‖``, ``converged`` decided on it, ``diverged`` for a
      direction of non-positive curvature or a non-finite value.
    """
    tol = tolerance(tree_norm(b), rtol, atol)

    def restart(r):
        z = precond(r)
        return z, tree_vdot(r, z)

    def step(carry):
        i, x, r, p, rz, rnorm, _ = carry
        ap = matvec(p)
        pap = tree_vdot(p, ap)
        # pᵀAp ≤ 0 (or NaN): A is not positive definite along p; stop without taking the step.
        bad = ~(pap > 0) | ~jnp.isfinite(rz)
        alpha = rz / jnp.where(bad, 1.0, pap)
        x_new = tree_axpy(alpha, p, x)
        r_new = tree_axpy(-alpha, ap, r)
        z_new, rz_new = restart(r_new)
        p_new = tree_axpy(rz_new / jnp.where(rz == 0, 1.0, rz), p, z_new)
        keep = lambda new, old: tree_where(bad, old, new)  # noqa: E731
        rnorm = jnp.where(bad, rnorm, tree_norm(r_new))
        return i + 1, keep(x_new, x), keep(r_new, r), keep(p_new, p), jnp.where(bad, rz, rz_new), rnorm, bad

    def iterate(carry):
        return (carry[0] < maxiter) & (carry[5] > tol) & ~carry[6]

    def replace(outer):
        inner, _ = outer
        i, x, _, _, _, _, bad = jax.lax.while_loop(iterate, step, inner)
        true_r = tree_sub(b, matvec(x))  # the recursion proposes convergence; the true residual decides
        true_norm = tree_norm(true_r)
        done = bad | (i >= maxiter) | ~(true_norm > tol)  # NaN ends it too
        z, rz = restart(true_r)
        return (i, x, true_r, z, rz, true_norm, bad), done

    def more(outer):
        return ~outer[1]

    z, rz = restart(b)
    start = (jnp.zeros((), jnp.int32), tree_zeros_like(b), b, z, rz, tree_norm(b), jnp.zeros((), bool))
    (iterations, x, _, _, _, residual, breakdown), _ = jax.lax.while_loop(more, replace, (start, jnp.zeros((), bool)))
    finite = jnp.isfinite(residual)
    return x, make_info(iterations, residual, finite & (residual <= tol), breakdown | ~finite)


def orth(w, dtype):
    """Rows spanning the numerically independent directions of the rows of ``w`` (``k × p``).

    Returns ``(P, keep)``: ``P`` has orthonormal rows where ``keep`` and zero
    rows elsewhere. Rows of ``w`` are normalised first, so that a nearly
    converged right-hand side (a tiny residual) is not mistaken for a
    dependent one. The basis comes from the ``k × k`` Gram matrix ``WWᵀ =
    VS²Vᵀ`` (``P = S⁻¹VᵀW``, dropping ``s² ≤ 100·k·eps·s²_max``), then one
    symmetric re-orthonormalisation ``P ← (PPᵀ)^{-1/2} P`` (as in Cholesky-QR2),
    which keeps the zero rows zero: two small eigendecompositions and matrix
    products instead of a QR of the tall ``p × k`` block, which is much slower
    on CPU.
    """
    tiny = jnp.finfo(dtype).tiny
    norms = jnp.linalg.norm(w, axis=1, keepdims=True)
    w = jnp.where(norms > 0, w / jnp.where(norms > 0, norms, 1.0), 0.0)
    s2, v = jnp.linalg.eigh(w @ w.T)
    # Gram eigenvalues carry an absolute error ~k·eps·s²_max; trust those 100x above it
    keep = s2 > 100 * w.shape[0] * jnp.finfo(dtype).eps * jnp.maximum(s2[-1], tiny)
    basis = (v * jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, s2, 1.0)), 0.0)).T @ w
    s2, v = jnp.linalg.eigh(basis @ basis.T + jnp.diag((~keep).astype(dtype)))
    basis = ((v / jnp.sqrt(jnp.maximum(s2, tiny))) @ v.T) @ basis
    return basis, keep


def _block_step(matvec, precond, tol, dtype):
    """One BF-BPCG iteration on the carry ``(i, X, R, P, keep, active, its, breakdown)`` (rows: right-hand sides)."""

    def body(carry):
        i, x, r, p, keep, active, its, _ = carry
        q = matvec(p)  # zero rows stay zero
        delta = p @ q.T
        delta = 0.5 * (delta + delta.T) + jnp.diag((~keep).astype(dtype))
        w, v = jnp.linalg.eigh(delta)
        # Not positive definite on the block (or NaN): a curvature pᵀCp at rounding level of ‖Cp‖ counts as zero,
        # else its inverse would throw the iterate out by ~1/eps.
        scale = jnp.maximum(jnp.max(jnp.abs(w)), jnp.max(jnp.linalg.norm(q, axis=1)))
        bad = ~jnp.all(w > 100 * p.shape[0] * jnp.finfo(dtype).eps * scale)
        inv = (v / jnp.where(bad, 1.0, w)) @ v.T
        alpha = (inv @ (p @ r.T)) * active[None, :]  # column j: coefficients for right-hand side j
        x_new = x + alpha.T @ p
        r_new = r - alpha.T @ q
        still = active & (jnp.linalg.norm(r_new, axis=1) > tol)
        z = precond(r_new) * still[:, None]
        beta = -inv @ (q @ z.T)
        p_new, keep_new = orth(z + beta.T @ p, dtype)
        pick = lambda old, new: jnp.where(bad, old, new)  # noqa: E731
        new = (x_new, r_new, p_new, keep_new, still)
        return (i + 1, *map(pick, (x, r, p, keep, active), new), its + active.astype(jnp.int32), bad)

    return body


def block_pcg(matvec, precond, b, rtol, atol, maxiter: int) -> tuple[jax.Array, SolveInfo]:
    """Breakdown-free block PCG (Ji & Li 2017) on a ``(k, p)`` block of raveled right-hand sides.

    Rows are right-hand sides. Converged rows are frozen (their step is masked
    to zero) and their residuals leave the search space. When every active
    row's recursive residual meets the tolerance, the true residuals
    ``B − AX`` (one block product) decide: rows still above it are
    reactivated with their true residual and the block directions restart
    from them (residual replacement, van der Vorst & Ye 2000).

    Returns:
      ``(X, info)`` with per-row ``iterations`` (the iterations in which the
      row was active), true residual norms, ``converged`` decided on them and
      ``diverged`` for a breakdown on a still-active row or a non-finite
      residual.
    """
    dtype = b.dtype
    bnorm = jnp.linalg.norm(b, axis=1)
    tol = tolerance(bnorm, rtol, atol)
    step = _block_step(matvec, precond, tol, dtype)

    def directions(r, active):
        return orth(precond(r) * active[:, None], dtype)

    def iterate(carry):
        return (carry[0] < maxiter) & jnp.any(carry[5]) & ~carry[7]

    def replace(outer):
        inner, _, _ = outer
        i, x, _, _, _, _, its, bad = jax.lax.while_loop(iterate, step, inner)
        true_r = b - matvec(x)  # the recursion proposes convergence; the true residuals decide
        true_norm = jnp.linalg.norm(true_r, axis=1)
        active = true_norm > tol  # NaN rows are not reactivated
        done = bad | (i >= maxiter) | ~jnp.any(active)
        p, keep = directions(true_r, active)
        return (i, x, true_r, p, keep, active, its, bad), true_norm, done

    active = bnorm > tol
    p, keep = directions(b, active)
    zero = jnp.zeros((), jnp.int32)
    start = (zero, jnp.zeros_like(b), b, p, keep, active, jnp.zeros(b.shape[:1], jnp.int32), jnp.zeros((), bool))
    outer = (start, bnorm, jnp.zeros((), bool))
    (_, x, _, _, _, active, its, breakdown), residual, _ = jax.lax.while_loop(lambda o: ~o[2], replace, outer)
    finite = jnp.isfinite(residual)
    ok = finite & (residual <= tol)
    return x, make_info(its, residual, ok, (breakdown & active) | ~finite)
