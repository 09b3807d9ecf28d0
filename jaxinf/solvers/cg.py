"""Conjugate gradient: plain, pre-conditioned and breakdown-free block CG.

Solves ``(C + Λ) x = v`` matrix-free, with one curvature-vector product per
iteration (Hestenes & Stiefel 1952); ``C + Λ`` must be symmetric positive
definite (a Gauss-Newton or Fisher curvature, or a Hessian with enough
damping). The whole iteration runs inside ``lax.while_loop``.

* ``solve(state, v)``: pre-conditioned CG for one right-hand side on the
  parameter pytree. Under ``jax.vmap`` every right-hand side keeps its own
  iterate and stops on its own criterion (finished lanes are frozen).
* ``solve_many(state, V)`` (``block=True``): the breakdown-free block CG of
  Ji & Li (2017) over blocks of ``block_size`` right-hand sides, which share
  one block Krylov space; the work per iteration is one batched product plus
  ``O(p k²)`` dense algebra, and the iteration count drops when the
  right-hand sides are related (e.g. gradients of similar test points).

Convergence of right-hand side ``v`` means ``‖v − (C + Λ) x‖ ≤ max(rtol‖v‖,
atol)``, with ``rtol`` by default set by the parameters' dtype
(:func:`default_rtol`: ``1e-6`` in float64, ``1e-4`` in float32), since the
reachable relative residual is about ``eps`` times the condition number.
The recursively updated residual only proposes convergence: the true
residual ``‖v − (C + Λ) x‖`` (one product) then decides, and if it is still
above the tolerance the recursive residual is replaced by it and CG goes on
(residual replacement, van der Vorst & Ye 2000; the kernels are in
:mod:`jaxinf.solvers.krylov`). So ``converged`` means the true residual meets
the tolerance, and the reported ``residual_norm`` is that true residual. ``diverged`` flags non-finite values or a
direction of non-positive curvature (``C + Λ`` not positive definite), where
CG stops.

Both solves are differentiable (``jax.grad``, ``jax.jvp``) by implicit
differentiation (:func:`jaxinf.solvers.autodiff.symmetric_solve`), never
through the iterations: with respect to ``v``, ``v̄ = (C + Λ)⁻¹ x̄`` (one
more CG solve, blocked for ``solve_many``), and with respect to what the
state's operator holds (the parameters ``θ`` at which the curvature is taken,
the damping, the training data), ``−v̄ᵀ (∂(C + Λ)) x`` by the VJP of one
curvature-vector product. Build the operator and the state inside the
differentiated function (``init`` only stores the operator, so this costs
nothing) or use :func:`jaxinf.implicit_solve`. The gradient is as accurate as
the two solves (``rtol``); the backward solve's ``SolveInfo`` is not reported.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.curvature import CurvatureOperator
from jaxinf.core.tree import (
    cast_like,
    check_matches,
    is_tracer,
    ravel_batched,
    unravel,
    unravel_batched,
)
from jaxinf.solvers.autodiff import symmetric_solve
from jaxinf.solvers.base import SolveInfo, Solver, records_config
from jaxinf.solvers.krylov import block_pcg, pcg
from jaxinf.solvers.preconditioners import Preconditioner

PyTree = Any

#: ``maxiter=None`` means ``min(10·p, MAXITER_CAP)``.
MAXITER_CAP = 1000

ADVICE = (
    "Increase maxiter, increase the damping, or add a preconditioner (jaxinf.jacobi_preconditioner, "
    "jaxinf.nystrom_preconditioner). CG needs C + λI positive definite: if it reports divergence, "
    "use curvature='gauss_newton' or a larger damping. In float32 the reachable relative residual is "
    "about 1e-7 times the condition number: raise rtol accordingly."
)


class CGState(NamedTuple):
    """The operator and the fitted pre-conditioner state (``None`` without one)."""

    operator: CurvatureOperator
    preconditioner: Any = None


@records_config
def cg(
    *,
    rtol: float | None = None,
    atol: float = 0.0,
    maxiter: int | None = None,
    block: bool = False,
    block_size: int | None = None,
    preconditioner: Preconditioner | None = None,
) -> Solver:
    """Conjugate gradient for ``(C + Λ) x = v``, optionally pre-conditioned and blocked.

    Pre-conditioned CG (Hestenes & Stiefel 1952) with ``M⁻¹ ≈ (C + Λ)⁻¹``:
    ``α = rᵀz / pᵀAp``, ``x ← x + αp``, ``r ← r − αAp``, ``z = M⁻¹r``,
    ``p ← z + (rᵀz)_new / (rᵀz)_old · p``, from ``x₀ = 0``. With
    ``block=True`` the solver also gets ``solve_many(state, V)``, the
    breakdown-free block CG (BF-BPCG) of Ji & Li (2017): for a block ``B`` of
    right-hand sides, ``P = orth(M⁻¹R)``, ``Q = AP``, ``X ← X + Pα``,
    ``R ← R − Qα`` with ``α = (PᵀQ)⁻¹PᵀR``, then
    ``P ← orth(M⁻¹R − P(PᵀQ)⁻¹QᵀM⁻¹R)``, where ``orth`` keeps an orthonormal
    basis of the numerically independent directions only, so a block whose
    directions become dependent (more right-hand sides than parameters,
    repeated right-hand sides) does not break down. Right-hand sides that have
    converged are frozen and leave the search space.

    Args:
      rtol: relative tolerance on the residual, ``‖r‖ ≤ rtol·‖v‖``; ``None``
        (default): :func:`default_rtol` of the dtype the model computes in,
        ``1e-6`` in float64, ``1e-4`` in float32 (float32 rounding alone
        leaves a relative residual of about ``1e-7`` times the condition
        number, so ``1e-6`` would be out of reach at ordinary condition
        numbers) and ``1e-2`` for bfloat16/float16 parameters, whose
        products carry half-precision rounding though CG runs in float32.
      atol: absolute tolerance; the criterion is ``‖r‖ ≤ max(rtol‖v‖, atol)``.
      maxiter: iterations per solve (one product each); default
        ``min(10·p, 1000)`` for ``p`` parameters (in exact arithmetic CG
        needs at most ``p``).
      block: give the solver a blocked ``solve_many`` (used by
        :class:`jaxinf.InfluenceModel` for many right-hand sides);
        ``solve`` stays single-right-hand-side CG.
      block_size: right-hand sides solved together by block CG's
        ``solve_many`` (capped at ``p``; default 32); more are processed
        block after block with ``lax.map``. Only with ``block=True``.
      preconditioner: ``None``, :func:`jaxinf.jacobi_preconditioner`,
        :func:`jaxinf.nystrom_preconditioner`, :func:`jaxinf.kfac_preconditioner`
        or :func:`jaxinf.ekfac_preconditioner`; fitted in ``init`` (with the
        ``key`` given to ``init``) and applied in every iteration.

    Returns:
      A :class:`jaxinf.Solver` (with ``solve_many`` when ``block=True``).
      ``info.iterations`` counts CG iterations; a solve costs that many
      products plus one per check of the true residual (one, unless the
      recursive residual had drifted and was replaced).

    Raises:
      ValueError: negative or non-finite tolerances, both zero, ``rtol >= 1``,
        ``maxiter`` or ``block_size`` below 1, ``block_size`` without
        ``block=True``, or a ``preconditioner`` that is not a
        :class:`jaxinf.solvers.preconditioners.Preconditioner`.

    Examples:
      >>> import jax.numpy as jnp, jaxinf
      >>> loss = lambda w, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> x = jnp.array([[2.0, 0.0], [0.0, 1.0]]); y = jnp.ones(2)
      >>> op = jaxinf.curvature_operator(loss, jnp.zeros(2), (x, y), damping=0.5)
      >>> solver = jaxinf.cg(rtol=1e-6)
      >>> sol, info = solver.solve(solver.init(op), jnp.ones(2))  # (diag(2, 0.5) + 0.5) x = 1
      >>> [round(float(a), 4) for a in sol], int(info.iterations), bool(info.converged)
      ([0.4, 1.0], 2, True)

    References:
      Hestenes & Stiefel, "Methods of conjugate gradients for solving linear
      systems", J. Res. Nat. Bur. Standards 49(6), 1952.
      Ji & Li, "A breakdown-free block conjugate gradient method", BIT
      Numerical Mathematics 57, 2017.
      van der Vorst & Ye, "Residual replacement strategies for Krylov
      subspace iterative methods for the convergence of true residuals",
      SIAM J. Sci. Comput. 22(3), 2000.
    """
    _check_tolerances(rtol, atol)
    if maxiter is not None and (isinstance(maxiter, bool) or int(maxiter) != maxiter or maxiter < 1):
        raise ValueError(f"maxiter must be a positive integer or None, got {maxiter!r}.")
    if block_size is not None and not block:
        raise ValueError(
            f"block_size={block_size!r} applies to block CG only, and would be ignored: pass "
            "cg(block=True, block_size=...) to solve that many right-hand sides together, or drop block_size."
        )
    block_size = 32 if block_size is None else block_size
    if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}.")
    if preconditioner is not None and not isinstance(preconditioner, Preconditioner):
        raise ValueError(
            "preconditioner must be None or a jaxinf Preconditioner (jaxinf.jacobi_preconditioner, "
            "nystrom_preconditioner, kfac_preconditioner or ekfac_preconditioner), "
            f"got {type(preconditioner).__name__}."
        )
    block_size = int(block_size)

    def iterations_for(p: int) -> int:
        return int(maxiter) if maxiter is not None else min(10 * p, MAXITER_CAP)

    def init(operator: CurvatureOperator, *, key: jax.Array | None = None) -> CGState:
        if preconditioner is None:
            return CGState(operator, None)
        key = jax.random.key(0) if key is None else key
        return CGState(operator, preconditioner.init(operator, key))

    def precond_fn(state: CGState):
        if preconditioner is None:
            return lambda r: r
        return lambda r: preconditioner.apply(state.preconditioner, r)

    def rtol_for(dtype) -> Any:
        return default_rtol(dtype) if rtol is None else rtol

    def solve(state: CGState, v: PyTree) -> tuple[PyTree, SolveInfo]:
        op = state.operator
        check_matches(v, op.spec, "v")
        v = cast_like(v, op.spec)
        pre, tolerance, steps = precond_fn(state), rtol_for(op.compute_dtype), iterations_for(op.size)
        return symmetric_solve(op.matvec, lambda b: pcg(op.matvec, pre, b, tolerance, atol, steps), v)

    def solve_many(state: CGState, vs: PyTree) -> tuple[PyTree, SolveInfo]:
        op = state.operator
        check_matches(vs, op.spec, "V", leading=1)
        vs = cast_like(vs, op.spec)
        pre, tolerance, steps = precond_fn(state), rtol_for(op.compute_dtype), iterations_for(op.size)
        block_solve = lambda b: _block_solve(op, pre, b, block_size, tolerance, atol, steps)  # noqa: E731
        return symmetric_solve(jax.vmap(op.matvec), block_solve, vs)

    name = "block_cg" if block else "cg"
    if preconditioner is not None:
        name += f"+{preconditioner.name}"
    return Solver(
        init=init,
        solve=solve,
        name=name,
        advice=ADVICE,
        solve_many=solve_many if block else None,
    )


def _block_solve(op: CurvatureOperator, pre, vs: PyTree, block_size: int, rtol, atol, maxiter: int):
    """Block PCG (:func:`~jaxinf.solvers.krylov.block_pcg`) over ``vs`` in blocks of ``block_size``, zero-padded."""
    spec = op.spec
    dtype = spec.dtype
    b = ravel_batched(vs, dtype)
    n, p = b.shape
    k = max(1, min(block_size, p, n))
    chunks = -(-n // k)
    b = jnp.concatenate([b, jnp.zeros((chunks * k - n, p), dtype)]).reshape(chunks, k, p)

    def matvec(x):
        return jax.vmap(lambda xi: _ravel(op.matvec(unravel(spec, xi)), dtype))(x)

    def precond(r):
        return jax.vmap(lambda ri: _ravel(pre(unravel(spec, ri)), dtype))(r)

    x, info = jax.lax.map(lambda bb: block_pcg(matvec, precond, bb, rtol, atol, maxiter), b)
    x = x.reshape(chunks * k, p)[:n]
    info = jax.tree.map(lambda a: a.reshape(chunks * k)[:n], info)
    return unravel_batched(spec, x), info


def _check_tolerances(rtol, atol) -> None:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is None and name == "rtol":
            continue
        array = isinstance(value, (np.ndarray, jax.Array)) and not value.shape
        number = isinstance(value, (int, float, np.number)) or array
        if isinstance(value, bool) or not (is_tracer(value) or number):
            raise ValueError(f"{name} must be a real number >= 0, got {value!r} ({type(value).__name__}).")
        if not is_tracer(value) and not (math.isfinite(float(value)) and float(value) >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value!r}.")
    if rtol is not None and not is_tracer(rtol) and not is_tracer(atol) and float(rtol) == 0 and float(atol) == 0:
        raise ValueError("rtol and atol are both 0, so CG could never stop early; set rtol > 0 (e.g. 1e-6).")
    if rtol is not None and not is_tracer(rtol) and float(rtol) >= 1:
        raise ValueError(
            f"rtol must be < 1, got {rtol!r}: ‖r‖ ≤ rtol·‖v‖ already holds at x = 0, so every solve would stop "
            "before its first iteration and return zero influences. Use e.g. rtol=1e-6."
        )


def default_rtol(dtype) -> float:
    """The default relative tolerance of :func:`cg` for parameters of ``dtype``.

    ``1e-6`` for 64-bit floats, ``1e-4`` for 32-bit and ``1e-2`` for 16-bit
    ones: the relative residual CG can reach is about ``eps`` times the
    condition number of ``C + λI``, so a fixed ``1e-6`` is out of reach in
    float32 from condition numbers of about 10 on.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxinf.solvers.cg import default_rtol
      >>> default_rtol(jnp.float64), default_rtol(jnp.float32)
      (1e-06, 0.0001)
    """
    eps = float(jnp.finfo(dtype).eps)
    return 1e-6 if eps < 1e-10 else 1e-4 if eps < 1e-5 else 1e-2


def _ravel(tree, dtype):
    return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in jax.tree.leaves(tree)])
