"""The solver protocol shared by every inverse-curvature-vector solver.

A solver factory (``direct()``, ``cg(...)``, ...) captures static
configuration and returns a :class:`Solver`, a pair of pure functions:

* ``init(operator, *, key=None) -> state``: the one-off work (a dense
  factorisation, a sketch, Kronecker factors; for matrix-free methods the state
  just holds the operator). ``operator`` is a
  :class:`jaxinf.curvature.CurvatureOperator`; the state is a pytree.
* ``solve(state, v) -> (x, info)``: ``x ≈ (C + λI)⁻¹ v`` for one right-hand
  side ``v`` with the structure of the parameters; ``info`` is a
  :class:`SolveInfo`. Many right-hand sides: ``jax.vmap(solve, in_axes=(None, 0))``.

Both are ``jit``- and ``vmap``-compatible. Numerical trouble (no convergence,
divergence, a singular system) is reported in ``info`` (and, for trouble found
at fit time, by the optional ``validate(state)``, a host-side check that
raises); the :class:`jaxinf.InfluenceModel` wrapper turns it into an error
or a warning with the numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class SolveInfo(NamedTuple):
    """What a solve reports about itself (arrays, so it crosses ``jit``/``vmap``).

    Attributes:
      iterations: iterations (or curvature-vector products) spent.
      residual_norm: ``‖(C + λ) x − v‖`` (or the solver's own estimate of it).
      converged: whether the solver's stopping criterion was met.
      diverged: whether the iteration blew up (NaN/inf or a growing norm).
    """

    iterations: jax.Array
    residual_norm: jax.Array
    converged: jax.Array
    diverged: jax.Array


def make_info(iterations, residual_norm, converged, diverged=False) -> SolveInfo:
    return SolveInfo(
        jnp.asarray(iterations, jnp.int32),
        jnp.asarray(residual_norm),
        jnp.asarray(converged, bool),
        jnp.asarray(diverged, bool),
    )


class Solver(NamedTuple):
    """A pair of pure functions ``init`` and ``solve``; see the module docstring.

    Attributes:
      init: ``init(operator, *, key=None) -> state``.
      solve: ``solve(state, v) -> (x, SolveInfo)``.
      validate: optional host-side ``validate(state) -> None`` that raises a
        clear error for trouble found while fitting (e.g. a singular matrix).
      name: a short name for reports.
      advice: what to change when this solver fails to converge or diverges
        (appended to the wrapper's error message).
      score: optional ``score(state, operator, test_batch, train_batch) ->
        (n_test, n_train)`` influence matrix, for solvers that score faster
        than "solve the test factors, contract with training gradients"
        (e.g. low-rank projections, per-layer Kronecker contractions). The
        wrapper uses it for ``influences(..., mode="up")`` when present.
      solve_many: optional ``solve_many(state, V) -> (X, SolveInfo)`` for a
        pytree ``V`` whose leaves carry a leading axis of right-hand sides
        (``X`` and every ``SolveInfo`` field gain the same leading axis), for
        solvers with a genuinely blocked algorithm (e.g. block CG). When
        absent, use ``jax.vmap(solve, in_axes=(None, 0))``.
      score_prepare, score_finish: optional two-stage form of ``score``:
        ``score_prepare(state, operator, test_batch) -> prepared`` (a pytree:
        the test side, computed once per test batch) and
        ``score_finish(state, operator, prepared, train_batch) -> (n_test,
        n_train)``, so that scoring one test batch against many training
        batches does the test-side work once.
      stream_init: optional ``stream_init(stream, *, key=None) -> state``
        for solvers that can be fitted in a fixed number of passes over a
        stream of batches too large for memory (``stream`` is a
        :class:`jaxinf.scale.stream_fit.BatchStream`); the state equals
        ``init`` on the same batches held in memory. Called by
        :func:`jaxinf.scale.fit_from_stream`.
    """

    init: Callable[..., Any]
    solve: Callable[[Any, Any], tuple[Any, SolveInfo]]
    validate: Callable[[Any], None] | None = None
    name: str = "solver"
    advice: str = ""
    score: Callable[..., Any] | None = None
    solve_many: Callable[[Any, Any], tuple[Any, SolveInfo]] | None = None
    stream_init: Callable[..., Any] | None = None
    score_prepare: Callable[..., Any] | None = None
    score_finish: Callable[..., Any] | None = None
