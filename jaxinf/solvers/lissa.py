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

Minibatches make every ``h_t`` noisy around the fixed point, so the plain
stopping rule below has a noise floor it may never cross. With minibatches
(``averaging=None``, the default, or ``True``) the answer is instead the
**tail average** (Polyak–Ruppert) of the iterates over doubling windows
``[w·2^(k−1), w·2^k)`` (each the second half of the steps so far, ``w =``
:data:`FIRST_WINDOW`): its noise shrinks like one over the square root of
the window while the transient of the first half is left out. The solve
stops at the end of a window whose average moved by at most ``rtol``
(relative) from the previous window's, a statistical test that a
stochastic method can pass; the result is the last complete window's
average. Since the recursion is linear in the freshly drawn ``C_t``, the
expected iterate follows the full-data recursion and the average is
unbiased for its fixed point.

The steps run as one ``lax.scan`` of ``maxiter`` steps. Early stopping
(``‖h_{t+1} − h_t‖ ≤ rtol·‖v‖``) and divergence freeze the iterate
without leaving the scan (a ``lax.cond`` skips the product when running
alone; under ``vmap`` the lanes are masked).
"""

from __future__ import annotations

import math
import warnings
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

#: Steps in the first averaging window (see the module docstring); later windows double.
FIRST_WINDOW = 8

ADVICE = (
    "If it diverged: LiSSA needs scale above about half the largest eigenvalue of the damped curvature of a "
    "minibatch; try a 10x larger scale. If it ran out of steps without diverging: the steps it needs grow like "
    "scale / (smallest eigenvalue + damping), so lower scale to just above that largest eigenvalue (the default 10 "
    "is far above it for many networks: 0.11-0.26 on the demo MLP's minibatches) or raise maxiter; with "
    "minibatches, a larger batch_size lowers the noise of the averages that rtol compares. C + λI must be positive "
    "definite (raise the damping or use curvature='gauss_newton')."
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
    averaging: bool | None = None,
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
      rtol: without averaging, stop a right-hand side once
        ``‖h_{t+1} − h_t‖ ≤ rtol·‖v‖``: on the full data that change is
        the residual ``‖v − (C + Λ + d·s·I) x_t‖`` of the current answer,
        so ``rtol`` is a relative residual as in CG, whatever the scale
        (relative to ``‖h‖`` instead, a large scale, whose steps are small,
        passed it with a 10-56 % error; with minibatches the steps keep
        a noise floor, so this may never trigger); with averaging, once two
        consecutive window averages differ by at most ``rtol`` relative.
        Either way a solve that runs out of ``maxiter`` reports
        ``converged=False``.
      batch_size: examples per minibatch, drawn uniformly with replacement
        from the whole dataset with the ``key`` given to ``init``; ``None``,
        or a size of at least the dataset, uses every example at every step
        (deterministic).
      averaging: return the tail average over doubling windows (module
        docstring). ``None``: on exactly when minibatches are drawn
        (``batch_size`` below the number of examples), off for the
        deterministic full-data recursion, whose last iterate is its best.

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
    if averaging not in (None, True, False):
        raise ValueError(f"averaging must be None (automatic), True or False, got {averaging!r}.")

    def init(operator: CurvatureOperator, *, key: jax.Array | None = None) -> LissaState:
        return LissaState(operator, jax.random.key(0) if key is None else key)

    def solve(state: LissaState, v: PyTree) -> tuple[PyTree, SolveInfo]:
        op = state.operator
        check_matches(v, op.spec, "v")
        if h0 is not None:
            check_matches(h0, op.spec, "h0")
        dtype = op.dtype
        stochastic = batch_size is not None and batch_size < op.num_examples
        if not stochastic:
            product = lambda t, h: op.matvec(h)  # noqa: E731
        else:
            pool = _example_pool(op.data)

            def product(t, h):
                batch = sample_minibatch(pool, jax.random.fold_in(state.key, t), batch_size)
                return op.batch_matvec(batch, h)

        s = jnp.asarray(scale, dtype)
        start = jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), h0, v) if h0 is not None else v
        step = _step_fn(product, v, start, s, jnp.asarray(dampen, dtype), jnp.asarray(rtol, dtype))
        steps = jnp.arange(maxiter, dtype=jnp.int32)
        if stochastic and averaging is False:
            _warn_noise_floor_once()
        if stochastic if averaging is None else averaging:
            h, converged, diverged, taken = _averaged(step, start, jnp.asarray(rtol, dtype), steps)
        else:
            h, converged, diverged, taken = _last_iterate(step, start, steps)
        x = tree_scale(1 / s, h)
        residual = tree_norm(tree_sub(op.matvec(x), v))
        diverged = diverged | ~jnp.isfinite(residual)
        return x, make_info(taken, residual, converged & ~diverged, diverged)

    return Solver(init=init, solve=solve, name="lissa", advice=ADVICE)


# ----------------------------------------------------------------------------
# The recursion, plain and tail-averaged
# ----------------------------------------------------------------------------


def _step_fn(product, v, start, s, d, tol):
    """One step ``h → v + (1 − d) h − A_t h / s`` with its divergence and (plain) convergence flags."""
    vnorm = tree_norm(v)
    start_norm = tree_norm(start)
    dtype = vnorm.dtype

    def step(t, h):
        ah = product(t, h)
        h_new = jax.tree.map(lambda vi, hi, ai: vi + (1 - d) * hi - ai / s, v, h, ah)
        new_norm = tree_norm(h_new)
        change = tree_norm(tree_sub(h_new, h))
        bound = GROWTH * (start_norm + (t + 1).astype(dtype) * vnorm)
        diverged = ~jnp.isfinite(new_norm) | ~jnp.isfinite(change) | (new_norm > bound)
        converged = ~diverged & (change <= tol * vnorm)  # change = ‖v − (C + Λ + d·s)x_t‖ on the full data
        return tree_where(diverged, h, h_new), converged, diverged

    return step


def _last_iterate(step, start, steps):
    """Run until the step change is below ``rtol`` (or divergence): the last iterate."""

    def body(carry, t):
        def advance(c):
            h, _, _, taken = c
            h, converged, diverged = step(t, h)
            return h, converged, diverged, taken + 1

        carry = jax.lax.cond(carry[1] | carry[2], lambda c: c, advance, carry)
        return carry, None

    init = (start, jnp.zeros((), bool), jnp.zeros((), bool), jnp.zeros((), jnp.int32))
    return jax.lax.scan(body, init, steps)[0]


def _averaged(step, start, tol, steps):
    """Tail averages over the windows ``[w·2^(k−1), w·2^k)``; stop when two consecutive ones agree to ``tol``.

    Returns the last complete window's average (the last iterate while no
    window is complete), the flags and the steps taken.
    """
    zeros = jax.tree.map(jnp.zeros_like, start)

    def body(carry, t):
        def advance(c):
            h, total, count, previous, have, result, _, _, taken = c
            h, _, diverged = step(t, h)
            total, count = jax.tree.map(jnp.add, total, h), count + 1
            end = t + 1
            boundary = (end % FIRST_WINDOW == 0) & _power_of_two(end // FIRST_WINDOW)
            average = tree_scale(1 / jnp.maximum(count, 1).astype(tree_norm(h).dtype), total)
            moved = tree_norm(tree_sub(average, previous))
            agreed = boundary & have & (moved <= tol * tree_norm(average)) & ~diverged
            result = tree_where(boundary, average, tree_where(have, result, h))
            previous = tree_where(boundary, average, previous)
            total = tree_where(boundary, zeros, total)
            count = jnp.where(boundary, 0, count)
            return h, total, count, previous, have | boundary, result, agreed, diverged, taken + 1

        carry = jax.lax.cond(carry[6] | carry[7], lambda c: c, advance, carry)
        return carry, None

    false, zero = jnp.zeros((), bool), jnp.zeros((), jnp.int32)
    init = (start, zeros, zero, zeros, false, start, false, false, zero)
    h, _, _, _, have, result, converged, diverged, taken = jax.lax.scan(body, init, steps)[0]
    return tree_where(have & ~diverged, result, h), converged, diverged, taken


_WARNED = []


def _warn_noise_floor_once() -> None:
    if not _WARNED:
        _WARNED.append(True)
        warnings.warn(
            "lissa(averaging=False) with minibatches returns the last iterate, which keeps the minibatch noise: "
            "its accuracy stalls at a noise floor that rtol may never pass. Drop averaging=False (tail averaging "
            "is the default with minibatches) or use batch_size=None.",
            stacklevel=4,
        )


def _power_of_two(k):
    return (k > 0) & ((k & (k - 1)) == 0)


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
