"""The solver protocol shared by every inverse-curvature-vector solver.

A solver factory (``direct()``, ``cg(...)``, ...) captures static
configuration and returns a :class:`Solver`, a pair of pure functions:

* ``init(operator, *, key=None) -> state``: the one-off work (a dense
  factorisation, a sketch, Kronecker factors; for matrix-free methods the state
  just holds the operator). ``operator`` is a
  :class:`jaxinf.core.curvature.CurvatureOperator`; the state is a pytree.
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

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.data import batch_size
from jaxinf.core.errors import ConvergenceError
from jaxinf.core.fingerprint import tree_digest
from jaxinf.core.tree import tree_all_finite


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


class Scorer(NamedTuple):
    """A solver's own way of scoring, without solving for each test gradient (optional).

    Low-rank solvers project both sides on their basis; K-FAC contracts the
    test factors with layer inputs and output gradients. Two stages, so that
    one test batch against many training batches does the test side once:

    Attributes:
      prepare: ``prepare(state, operator, test_batch) -> prepared`` (a
        pytree: the test side).
      finish: ``finish(state, operator, prepared, train_batch) -> (n_test,
        n_train)``.
    """

    prepare: Callable[..., Any]
    finish: Callable[..., Any]

    def score(self, state, operator, test_batch, train_batch):
        """``(n_test, n_train)`` in one call; the curvature is symmetric, so the smaller side is prepared."""
        if batch_size(test_batch) <= batch_size(train_batch):
            return self.finish(state, operator, self.prepare(state, operator, test_batch), train_batch)
        return self.finish(state, operator, self.prepare(state, operator, train_batch), test_batch).T


class Solver(NamedTuple):
    """What a solver factory returns. Two functions are required; the rest is optional.

    Required:
      init: ``init(operator, *, key=None) -> state`` (a pytree).
      solve: ``solve(state, v) -> (x, SolveInfo)`` with ``x ≈ (C + λI)⁻¹ v``.

    Optional:
      validate: host-side ``validate(state) -> None`` that raises a clear
        error for trouble found while fitting (e.g. a singular matrix).
      name: a short name for reports.
      advice: what to change when this solver fails to converge or diverges
        (appended to the wrapper's error message).
      solve_many: ``solve_many(state, V) -> (X, SolveInfo)`` for a pytree
        ``V`` whose leaves carry a leading axis of right-hand sides, for
        solvers with a genuinely blocked algorithm (block CG); otherwise
        :func:`solve_many` uses ``jax.vmap(solve)``.
      stream_init: ``stream_init(stream, *, key=None) -> state`` for solvers
        fitted in a fixed number of passes over a stream of batches too large
        for memory; ``stream`` is what :func:`jaxinf.scale.fit_from_stream`
        builds (see :class:`BatchStreamLike`). The state equals ``init`` on the
        same batches held in memory.
      scorer: a :class:`Scorer`, for solvers that score faster than "solve
        the test factors, contract with training gradients"; the wrapper uses
        it for ``influences(..., mode="up")``.
      config: the factory's arguments as JSON-able values (filled in by
        :func:`records_config`); stores and saved states record it, so that a
        state is never used with a solver configured differently.
    """

    init: Callable[..., Any]
    solve: Callable[[Any, Any], tuple[Any, SolveInfo]]
    validate: Callable[[Any], None] | None = None
    name: str = "solver"
    advice: str = ""
    solve_many: Callable[[Any, Any], tuple[Any, SolveInfo]] | None = None
    stream_init: Callable[..., Any] | None = None
    scorer: Scorer | None = None
    config: dict | None = None

    def __hash__(self) -> int:  # a static argument of jit: hashable although ``config`` is a dict
        return hash(self[:-1])

    @property
    def score(self) -> Callable[..., Any] | None:
        """``score(state, operator, test_batch, train_batch)`` of the :class:`Scorer`, or ``None``."""
        return None if self.scorer is None else self.scorer.score


class BatchStreamLike(Protocol):
    """What a solver's ``stream_init`` may use (built by :func:`jaxinf.scale.fit_from_stream`).

    Attributes:
      operator: a :class:`jaxinf.CurvatureOperator` on the first batch only:
        the parameter layout, resolved damping, kind and loss (never for
        products, which would see one batch).
      first: the first batch.
      curvature: the streamed curvature (``.dense(column_batch=...)``,
        ``.matmat(tree)``).
      num_examples: examples in the stream.
    """

    operator: Any
    first: Any
    curvature: Any
    num_examples: int

    # (index, batch, weight = n_b / n) per batch, one pass; with_indices: + the examples' global indices;
    # pad_to: pieces of that many examples (a ragged batch padded), + a mask, weight = pad_to / n
    def batches(self, desc: str = ..., *, with_indices: bool = ..., pad_to: int | None = ...) -> Any: ...

    def replicate(self, tree: Any) -> Any: ...

    def zeros(self, shapes: Any) -> Any: ...

    def matmat(self, vectors: jax.Array, *, desc: str = ...) -> jax.Array: ...  # C V for raveled (p, k)

    def matvec(self, vector: jax.Array, *, desc: str = ...) -> jax.Array: ...


def describe(value: Any) -> Any:
    """A JSON-able description of a factory argument (numbers, strings, dtypes, nested solvers, arrays by digest)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    config = getattr(value, "config", None)
    if isinstance(config, dict):  # a Solver or Preconditioner built by a recorded factory
        return config
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        return {"array": tree_digest(value)}
    try:
        return str(np.dtype(value))
    except TypeError:
        pass
    name = getattr(value, "__qualname__", None)
    if name is not None:
        return f"{getattr(value, '__module__', '')}.{name}"
    if isinstance(value, NamedTupleLike):
        return {k: describe(v) for k, v in value._asdict().items()}
    raise TypeError(f"Cannot record a factory argument of type {type(value).__name__} ({value!r}).")


@runtime_checkable
class NamedTupleLike(Protocol):
    def _asdict(self) -> dict: ...


def records_config(factory: Callable) -> Callable:
    """Decorate a solver or preconditioner factory so that what it returns carries ``config``: its arguments.

    ``config`` is ``{"factory": name, **arguments with defaults applied}``,
    JSON-able (:func:`describe`).
    """
    signature = inspect.signature(factory)
    made_before: dict = {}

    @functools.wraps(factory)
    def wrapped(*args, **kwargs):
        # The same hashable arguments give the same Solver object, so that the jitted steps that take it as a
        # static argument (jaxinf.solvers.compiled) share their compiled programs across models.
        memo = (tuple((type(a), a) for a in args), tuple((k, type(v), v) for k, v in sorted(kwargs.items())))
        try:
            if memo in made_before:
                return made_before[memo]
        except TypeError:  # an unhashable argument (an array, a dict): a new object, compiled anew
            memo = None
        made = factory(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = {}
        for name, value in bound.arguments.items():
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(value)
            else:
                arguments[name] = value
        inner = made.config or {}  # a factory that calls another recorded one (kfac -> ekfac) keeps its defaults
        config = {**inner, "factory": factory.__name__, **{k: describe(v) for k, v in sorted(arguments.items())}}
        made = made._replace(config=config)
        if memo is not None:
            made_before[memo] = made
        return made

    return wrapped


def solve_many(solver: Solver, state, rhs):
    """Solve for every right-hand side along the leading axis of ``rhs``.

    Uses the solver's own blocked algorithm (``solver.solve_many``) when it has
    one, else ``jax.vmap`` of its single-right-hand-side ``solve``.
    """
    if solver.solve_many is not None:
        return solver.solve_many(state, rhs)
    return jax.vmap(solver.solve, in_axes=(None, 0))(state, rhs)


def check_solve(solver: Solver, info: SolveInfo, factors, what: str, *, strict: bool = True) -> None:
    """Turn a batched :class:`SolveInfo` and its solutions into errors or warnings that carry the numbers.

    ``factors``: the solutions (checked for NaN/inf here), or a boolean scalar
    saying whether they are all finite (computed with them, as
    :func:`jaxinf.solvers.compiled.solve_all` does), or ``None`` (no check).

    Raises:
      ConvergenceError: a right-hand side diverged; one did not converge and
        ``strict`` (otherwise a ``RuntimeWarning``); or a solution holds NaN
        or inf. Each message ends with the solver's advice.
    """
    fields = (info.converged, info.diverged, info.iterations, info.residual_norm)
    converged, diverged, iterations, residual = (np.asarray(x) for x in fields)
    total = converged.size
    advice = f" {solver.advice}" if solver.advice else ""
    if diverged.any():
        raise ConvergenceError(
            f"{solver.name} diverged for {int(diverged.sum())} of {total} {what} "
            f"(residual up to {np.nanmax(np.where(np.isfinite(residual), residual, np.inf)):.3g}).{advice}"
        )
    if not converged.all():
        message = (
            f"{solver.name} did not converge for {int((~converged).sum())} of {total} {what}: "
            f"iterations up to {int(iterations.max())}, residual norm up to {float(np.max(residual)):.3g}.{advice}"
        )
        if strict:
            raise ConvergenceError(message + " Pass strict=False to get the results with a warning.")
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    if factors is None:
        return
    finite = factors if _is_flag(factors) else _all_finite(factors)  # one compiled program (eagerly: two per leaf)
    if not bool(finite):
        raise ConvergenceError(f"{solver.name} returned NaN or inf influence factors.{advice}")


_all_finite = jax.jit(tree_all_finite)


def _is_flag(x) -> bool:
    """A boolean scalar (a precomputed finiteness flag), not a pytree of solutions."""
    return isinstance(x, (bool, np.bool_)) or (hasattr(x, "dtype") and np.shape(x) == () and x.dtype == np.bool_)
