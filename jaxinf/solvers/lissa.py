"""LiSSA: a stochastic Neumann-series estimate of ``(C + Λ)⁻¹ v``.

The recursion of Agarwal, Bullins & Hazan (2017), as used for influence
functions by Koh & Liang (2017)::

    h₀ = v,   h_{t+1} = v + (1 − d) h_t − (A_t h_t) / s,   x = h_T / s,

with ``A_t = C_t + Λ`` the damped curvature of a minibatch drawn afresh at
every step (``C_t`` its mean curvature), ``s`` the ``scale`` and ``d`` the
``dampen`` factor. Its fixed point is ``h/s = (C + Λ + d·s·I)⁻¹ v``, so
``dampen > 0`` adds ``d·s`` of extra damping. The iteration contracts when
every eigenvalue of ``A_t / s`` lies in ``(−d, 2 − d)``: ``s`` must exceed
about half the largest eigenvalue of the damped minibatch curvature, and
``C + Λ`` must be positive definite.

The steps run as one ``lax.scan`` of ``maxiter`` steps. Early stopping
(``‖h_{t+1} − h_t‖ ≤ rtol·‖h_{t+1}‖``) and divergence freeze the iterate
without leaving the scan (a ``lax.cond`` skips the product when running
alone; under ``vmap`` the lanes are masked).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxinf.core.curvature import CurvatureOperator
from jaxinf.core.data import Batches
from jaxinf.core.data import batch_size as leading_size
from jaxinf.core.tree import check_matches, is_tracer, tree_norm, tree_scale, tree_sub, tree_where
from jaxinf.solvers.base import SolveInfo, Solver, make_info, records_config

PyTree = Any

#: ``h_t`` is flagged as diverging once ``‖h_t‖ > GROWTH · (‖h₀‖ + t‖v‖)``; a
#: contracting recursion keeps ``‖h_t‖ ≤ ‖h₀‖ + t‖v‖``.
GROWTH = 10.0

ADVICE = (
    "LiSSA needs scale above the largest eigenvalue of the damped curvature of a minibatch "
    "(try 10x larger scale; then raise maxiter, since the number of steps grows with scale / smallest "
    "eigenvalue), C + λI positive definite (raise the damping or use curvature='gauss_newton'), and, "
    "to reach rtol with minibatches, a larger batch_size."
)


class LissaState(NamedTuple):
    """The operator and the PRNG key from which the minibatches are drawn."""

    operator: CurvatureOperator
    key: jax.Array


@records_config
def lissa(
    *,
    maxiter: int = 1000,
    dampen: float = 0.0,
    scale: float = 10.0,
    h0: PyTree | None = None,
    rtol: float = 1e-4,
    batch_size: int | None = 64,
) -> Solver:
    """LiSSA: ``x ≈ (C + Λ + d·s·I)⁻¹ v`` by a stochastic Neumann series.

    ``h_{t+1} = v + (1 − d) h_t − ((C_t + Λ) h_t) / s``, result ``h_T / s``;
    see the module docstring.

    Args:
      maxiter: steps of the recursion (one minibatch product each); the
        length of the ``lax.scan``.
      dampen: ``d ∈ [0, 1)``; shrinks the series and adds ``d·scale`` to the
        damping of the system actually solved.
      scale: ``s > 0``; must exceed about half the largest eigenvalue of every
        damped minibatch curvature, or the recursion diverges (which is
        detected and reported). Larger is safer but needs more steps.
      h0: starting value of ``h`` (a pytree with the parameters' structure);
        default ``v``. It is ``s`` times an initial guess of ``x``.
      rtol: stop a right-hand side once ``‖h_{t+1} − h_t‖ ≤ rtol·‖h_{t+1}‖``.
        With small minibatches the steps keep a noise floor, so this may
        never trigger: the solve then runs ``maxiter`` steps and reports
        ``converged=False``.
      batch_size: examples per minibatch, drawn uniformly with replacement
        from the whole dataset with the ``key`` given to ``init``; ``None``,
        or a size of at least the dataset, uses every example at every step
        (deterministic).

    Returns:
      A :class:`jaxinf.Solver`. ``info.iterations`` counts steps taken;
      ``info.residual_norm`` is the true residual ``‖(C + Λ) x − v‖`` on the
      whole dataset (one extra full pass); ``info.diverged`` flags NaN/inf
      or a growing norm, in which case the last finite iterate is returned.

    Raises:
      ValueError: ``maxiter`` or ``batch_size`` below 1, ``scale <= 0``,
        ``dampen`` outside ``[0, 1)``, ``rtol < 0``.

    Notes:
      Blocks are honoured: with a block-diagonal operator every minibatch
      product is restricted to the diagonal blocks
      (:meth:`jaxinf.CurvatureOperator.batch_matvec`), as ``op.matvec`` is.
      Every right-hand side solved with one state sees the same minibatch
      sequence; pass a different ``key`` to ``init`` for another draw.

    Examples:
      >>> import jax.numpy as jnp, jaxinf
      >>> loss = lambda w, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> x = jnp.array([[2.0, 0.0], [0.0, 1.0]]); y = jnp.ones(2)
      >>> op = jaxinf.curvature_operator(loss, jnp.zeros(2), (x, y), damping=0.5)
      >>> solver = jaxinf.lissa(scale=4.0, maxiter=200, rtol=1e-6, batch_size=None)
      >>> sol, info = solver.solve(solver.init(op), jnp.ones(2))
      >>> [round(float(a), 4) for a in sol], bool(info.converged)
      ([0.4, 1.0], True)

    References:
      Agarwal, Bullins & Hazan, "Second-Order Stochastic Optimization for
      Machine Learning in Linear Time", JMLR 18, 2017.
      Koh & Liang, "Understanding Black-box Predictions via Influence
      Functions", ICML 2017.
    """
    if isinstance(maxiter, bool) or int(maxiter) != maxiter or maxiter < 1:
        raise ValueError(f"maxiter must be a positive integer, got {maxiter!r}.")
    maxiter = int(maxiter)
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None (the whole dataset), got {batch_size!r}.")
    if not is_tracer(scale) and not (math.isfinite(float(scale)) and float(scale) > 0):
        raise ValueError(f"scale must be finite and > 0 (above the largest curvature eigenvalue), got {scale!r}.")
    if not is_tracer(dampen) and not 0.0 <= float(dampen) < 1.0:
        raise ValueError(f"dampen must be in [0, 1), got {dampen!r}.")
    if not is_tracer(rtol) and not (math.isfinite(float(rtol)) and float(rtol) >= 0):
        raise ValueError(f"rtol must be finite and >= 0, got {rtol!r}.")

    def init(operator: CurvatureOperator, *, key: jax.Array | None = None) -> LissaState:
        return LissaState(operator, jax.random.key(0) if key is None else key)

    def solve(state: LissaState, v: PyTree) -> tuple[PyTree, SolveInfo]:
        op = state.operator
        check_matches(v, op.spec, "v")
        if h0 is not None:
            check_matches(h0, op.spec, "h0")
        dtype = op.dtype
        n = op.num_examples
        if batch_size is None or batch_size >= n:
            product = lambda t, h: op.matvec(h)  # noqa: E731
        else:
            pool = _example_pool(op.data)

            def product(t, h):
                batch = sample_minibatch(pool, jax.random.fold_in(state.key, t), batch_size)
                return op.batch_matvec(batch, h)

        s = jnp.asarray(scale, dtype)
        d = jnp.asarray(dampen, dtype)
        tol = jnp.asarray(rtol, dtype)
        start = jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), h0, v) if h0 is not None else v
        vnorm = tree_norm(v)
        start_norm = tree_norm(start)

        def step(t, carry):
            h, _, _, _ = carry
            ah = product(t, h)
            h_new = jax.tree.map(lambda vi, hi, ai: vi + (1 - d) * hi - ai / s, v, h, ah)
            new_norm = tree_norm(h_new)
            change = tree_norm(tree_sub(h_new, h))
            bound = GROWTH * (start_norm + (t + 1).astype(dtype) * vnorm)
            diverged = ~jnp.isfinite(new_norm) | ~jnp.isfinite(change) | (new_norm > bound)
            converged = ~diverged & (change <= tol * new_norm)
            return tree_where(diverged, h, h_new), converged, diverged, t + 1

        def body(carry, t):
            _, converged, diverged, _ = carry
            carry = jax.lax.cond(converged | diverged, lambda c: c, lambda c: step(t, c), carry)
            return carry, None

        init_carry = (start, jnp.zeros((), bool), jnp.zeros((), bool), jnp.zeros((), jnp.int32))
        (h, converged, diverged, steps), _ = jax.lax.scan(body, init_carry, jnp.arange(maxiter, dtype=jnp.int32))
        x = tree_scale(1 / s, h)
        residual = tree_norm(tree_sub(op.matvec(x), v))
        diverged = diverged | ~jnp.isfinite(residual)
        return x, make_info(steps, residual, converged & ~diverged, diverged)

    return Solver(init=init, solve=solve, name="lissa", advice=ADVICE)


# ----------------------------------------------------------------------------
# Minibatches drawn inside jit
# ----------------------------------------------------------------------------


class _Pool(NamedTuple):
    """The dataset as (at most) two flat example arrays: the stacked batches and the rest."""

    stacked: PyTree  # leaves (K·B, ...) or None
    rest: PyTree  # leaves (R, ...) or None
    num_stacked: int


def _example_pool(data: Batches) -> _Pool:
    stacked, num_stacked = None, 0
    if data.stacked is not None:
        stacked = jax.tree.map(lambda a: a.reshape(a.shape[0] * a.shape[1], *a.shape[2:]), data.stacked)
        num_stacked = leading_size(stacked)
    rest = None
    if data.rest:
        rest = jax.tree.map(lambda *xs: jnp.concatenate([jnp.asarray(x) for x in xs]), *data.rest)
    return _Pool(stacked, rest, num_stacked)


def sample_minibatch(pool: _Pool | Batches, key: jax.Array, size: int) -> PyTree:
    """``size`` examples drawn uniformly with replacement from every example of the dataset.

    Args:
      pool: the dataset, a :class:`jaxinf.Batches` (or its flattened pool).
      key: ``jax.random`` key.
      size: static number of examples in the minibatch.

    Returns:
      A batch with the data's structure and leading size ``size``.
    """
    if isinstance(pool, Batches):
        pool = _example_pool(pool)
    num_rest = 0 if pool.rest is None else leading_size(pool.rest)
    total = pool.num_stacked + num_rest
    idx = jax.random.randint(key, (size,), 0, total)
    if pool.rest is None:
        return jax.tree.map(lambda a: a[idx], pool.stacked)
    if pool.stacked is None:
        return jax.tree.map(lambda a: a[idx], pool.rest)
    in_stacked = idx < pool.num_stacked
    first = jnp.clip(idx, 0, pool.num_stacked - 1)
    second = jnp.clip(idx - pool.num_stacked, 0, num_rest - 1)

    def pick(a, b):
        mask = in_stacked.reshape((size,) + (1,) * (a.ndim - 1))
        return jnp.where(mask, a[first], b[second])

    return jax.tree.map(pick, pool.stacked, pool.rest)

