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
``[w·2^(k−1), w·2^k)`` (each the second half of the steps so far, ``w = 8``):
its noise shrinks like one over the square root of the window while the
transient of the first half is left out. The solve stops at the end of a
window whose average moved by at most ``rtol`` from the previous window's,
relative and in the curvature norm ``‖u‖_A = √|uᵀ A_c u|`` (``A_c`` a fresh
check batch), the norm in which the scores ``g_jᵀ x`` see a change; a
statistical test that a stochastic method can pass. The result is the last
complete window's average. Since the recursion is linear in the freshly
drawn ``C_t``, the expected iterate follows the full-data recursion and the
average is unbiased for its fixed point.

Defaults (measured on the digits MLP of :mod:`jaxinf.demo`, P = 2,410,
1,000 examples, λ = 1e-3, 20 test gradients): ``scale="auto"`` estimates the
largest norm of the damped curvature of 8 minibatches by power iteration
(1.6 there, where the full data's is 0.56 and the old default was 10);
``rtol`` 5e-2 for the averaged rule; ``maxiter`` 32,768. At these defaults
every solve stopped at step 16,384 with a relative error of at most 2.4 %
against ``direct`` (Pearson 0.9996, Spearman 0.9986 of the influence
matrix). The old defaults (``scale=10``, 1,000 steps, ``rtol`` 1e-4 on the
plain norm) converged for none of 20 test points on the 300-example MLP of
``examples/flax_nnx.py``, nor on the four MLPs of ``benchmarks/lds_methods.py``.

Every right-hand side of one state takes the same minibatch sequence, so
:func:`jaxinf.solvers.base.solve_many` runs them as lanes of one recursion
(one vmapped minibatch product per step) in ``lax.scan`` chunks of 8 steps
inside a ``lax.while_loop`` that leaves once every lane has stopped
(:mod:`jaxinf.solvers.lissa_loop`); a lane that has stopped or diverged is
frozen meanwhile.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxinf.core.curvature import CurvatureOperator
from jaxinf.core.minibatch import example_pool, sample_minibatch
from jaxinf.core.tree import cast_like, check_matches, is_tracer, tree_scale, tree_sub
from jaxinf.solvers.base import SolveInfo, Solver, make_info, records_config
from jaxinf.solvers.lissa_loop import CHECK_BATCHES, lane_norms, recursion
from jaxinf.solvers.lissa_scale import auto_scale

__all__ = ["LissaState", "lissa", "sample_minibatch"]

PyTree = Any

#: Default ``rtol`` without minibatches: a relative residual, as CG's.
RTOL = 1e-4
#: Default ``rtol`` with minibatches (tail averaging): two window averages agree to 5 % in the curvature norm.
AVERAGED_RTOL = 5e-2
#: Default ``maxiter``.
MAXITER = 32_768

ADVICE = (
    "If it diverged: LiSSA needs scale above about half the largest eigenvalue of the damped curvature of every "
    "minibatch (scale='auto' takes the largest of 8 minibatches, see state.scale); try a 2-10x larger scale. If it "
    "ran out of steps without diverging: the steps it needs grow like scale / (smallest eigenvalue + damping), so "
    "raise the damping (damping='auto' chooses one from the curvature), lower a given scale to just above that "
    "largest eigenvalue (or use scale='auto'), or raise maxiter; with minibatches, a larger batch_size lowers the "
    "noise of the averages that rtol compares. C + λI must be positive definite (raise the damping or use "
    "curvature='gauss_newton')."
)


class LissaState(NamedTuple):
    """The operator, the PRNG key from which the minibatches are drawn, and the scale ``s`` in use."""

    operator: CurvatureOperator
    key: jax.Array
    scale: jax.Array  # given, or estimated by init (scale="auto": jaxinf.solvers.lissa_scale)


@records_config
def lissa(
    *,
    maxiter: int = MAXITER,
    dampen: float = 0.0,
    scale: float | str = "auto",
    h0: PyTree | None = None,
    rtol: float | None = None,
    batch_size: int | None = 64,
    averaging: bool | None = None,
) -> Solver:
    """LiSSA: ``x ≈ (C + Λ + d·s·I)⁻¹ v`` by a stochastic Neumann series.

    ``h_{t+1} = v + (1 − d) h_t − ((C_t + Λ) h_t) / s``, result ``h_T / s``;
    see the module docstring.

    Args:
      maxiter: the most steps of the recursion (one minibatch product each).
        Steps run as ``lax.scan`` chunks of 8 inside a ``lax.while_loop``
        that stops once every right-hand side solved together has stopped
        (:mod:`jaxinf.solvers.lissa_loop`).
      dampen: ``d ∈ [0, 1)``; shrinks the series and adds ``d·scale`` to the
        damping of the system actually solved.
      scale: ``s > 0``, or ``"auto"`` (default): the largest norm of
        the damped curvature of 8 minibatches of ``batch_size``, estimated in
        ``init`` by power iteration (:mod:`jaxinf.solvers.lissa_scale`; the
        value is ``state.scale``). The recursion diverges (detected and
        reported) unless ``s`` exceeds about half the largest eigenvalue of
        every damped minibatch curvature, and the steps it needs grow like
        ``s / (λ_min + damping)``: a scale far above the curvature is slow.
      h0: starting value of ``h`` (a pytree with the parameters' structure);
        default ``v``. It is ``s`` times an initial guess of ``x``.
      rtol: ``None`` (default): :data:`RTOL` without minibatches,
        :data:`AVERAGED_RTOL` with them. Without averaging, stop a
        right-hand side once ``‖h_{t+1} − h_t‖ ≤ rtol·‖v‖``: on the full
        data that change is the residual ``‖v − (C + Λ + d·s·I) x_t‖`` of
        the current answer, so ``rtol`` is a relative residual as in CG,
        whatever the scale (with minibatches the steps keep a noise floor,
        so this may never trigger). With averaging, stop once two
        consecutive window averages differ by at most ``rtol``, relative and
        in the curvature norm ``√|uᵀ A_c u|`` (a fresh check batch ``A_c``):
        a statistical test whose noise falls like ``1/√(steps · batch_size)``,
        hence the looser default (on the demo MLP the error of the answer
        was about 0.4 times the last change; module docstring). Either way a
        solve that runs out of ``maxiter`` reports ``converged=False``.
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
      ValueError: ``maxiter`` or ``batch_size`` below 1, ``scale`` neither
        ``"auto"`` nor finite and ``> 0``, ``dampen`` outside ``[0, 1)``,
        ``rtol`` outside ``[0, 1)``.

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
    automatic = isinstance(scale, str)
    if automatic and scale != "auto":
        raise ValueError(f"scale must be 'auto' or a number > 0, got {scale!r}.")
    if not automatic and not is_tracer(scale) and not (math.isfinite(float(scale)) and float(scale) > 0):
        raise ValueError(f"scale must be finite and > 0 (above the largest curvature eigenvalue), got {scale!r}.")
    if not is_tracer(dampen) and not 0.0 <= float(dampen) < 1.0:
        raise ValueError(f"dampen must be in [0, 1), got {dampen!r}.")
    if rtol is not None and not is_tracer(rtol) and not (math.isfinite(float(rtol)) and float(rtol) >= 0):
        raise ValueError(f"rtol must be finite and >= 0, got {rtol!r}.")
    if rtol is not None and not is_tracer(rtol) and float(rtol) >= 1:
        raise ValueError(f"rtol must be < 1 (a relative tolerance), got {rtol!r}; e.g. rtol=1e-4.")
    if averaging not in (None, True, False):
        raise ValueError(f"averaging must be None (automatic), True or False, got {averaging!r}.")

    def init(operator: CurvatureOperator, *, key: jax.Array | None = None) -> LissaState:
        key = jax.random.key(0) if key is None else key
        if not automatic:
            return LissaState(operator, key, jnp.asarray(scale, operator.dtype))
        key, scale_key = jax.random.split(key)
        return LissaState(operator, key, auto_scale(operator, scale_key, batch_size))

    def solve_many(state: LissaState, V: PyTree) -> tuple[PyTree, SolveInfo]:
        config = dict(maxiter=maxiter, dampen=dampen, h0=h0, rtol=rtol, batch_size=batch_size, averaging=averaging)
        return _solve_lanes(state, V, **config)

    def solve(state: LissaState, v: PyTree) -> tuple[PyTree, SolveInfo]:
        check_matches(v, state.operator.spec, "v")
        X, info = solve_many(state, jax.tree.map(lambda a: a[None], v))
        return jax.tree.map(lambda a: a[0], (X, info))

    return Solver(init=init, solve=solve, name="lissa", advice=ADVICE, solve_many=solve_many)


def _solve_lanes(state: LissaState, V: PyTree, *, maxiter, dampen, h0, rtol, batch_size, averaging):
    """LiSSA for every right-hand side along the leading axis of ``V`` (:func:`jaxinf.solvers.lissa_loop.recursion`)."""
    op = state.operator
    check_matches(V, op.spec, "rhs", leading=1)
    V = cast_like(V, op.spec)
    if h0 is not None:
        check_matches(h0, op.spec, "h0")
    dtype = op.dtype
    stochastic = batch_size is not None and batch_size < op.num_examples
    pool = example_pool(op.data) if stochastic else None

    def on_batch(key, size):
        """``(t, H) ↦ (C_b + Λ) H`` per lane, ``b`` the minibatch of ``fold_in(key, t)``; the full data for None."""

        def product(t, H):
            if size is None:
                return jax.vmap(op.matvec)(H)
            batch = sample_minibatch(pool, jax.random.fold_in(key, t), size)
            return jax.vmap(lambda h: op.batch_matvec(batch, h))(H)

        return product

    check_size = min(CHECK_BATCHES * batch_size, op.num_examples) if stochastic else None
    check_key = jax.random.fold_in(state.key, 1)  # the steps fold the step index into a key of their own
    step_key = jax.random.fold_in(state.key, 0)
    if check_size == op.num_examples:
        check_size = None
    average = stochastic if averaging is None else averaging
    tol = jnp.asarray((AVERAGED_RTOL if average else RTOL) if rtol is None else rtol, dtype)
    s = state.scale.astype(dtype)
    start = V
    if h0 is not None:  # the same h0 for every lane
        start = jax.tree.map(lambda a, b: jnp.broadcast_to(jnp.asarray(a, b.dtype), b.shape), h0, V)
    if stochastic and averaging is False:
        _warn_noise_floor_once()
    product = on_batch(step_key, batch_size if stochastic else None)
    h, converged, diverged, taken = recursion(
        product, on_batch(check_key, check_size), V, start, s, jnp.asarray(dampen, dtype), tol, maxiter, average
    )
    X = tree_scale(1 / s, h)
    residual = lane_norms(tree_sub(jax.vmap(op.matvec)(X), V))
    diverged = diverged | ~jnp.isfinite(residual)
    return X, make_info(taken, residual, converged & ~diverged, diverged)


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
