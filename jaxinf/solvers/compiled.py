"""The jitted steps of :class:`jaxinf.InfluenceModel`, shared by every model: one program per configuration.

A jitted function keeps its compiled programs in a cache of its own, keyed on
the static arguments and the shapes of the others. Jitting a fresh lambda per
model (as ``jax.jit(lambda op, key: solver.init(op, key=key))`` in a
constructor does) therefore compiles everything again for a second model with
the same loss, solver and shapes: in a user's loop (a model per damping, per
checkpoint, per experiment) every model paid the first call's compile time.

Here each step is jitted once, at module level, with the functions that
define it — the solver (a :class:`jaxinf.Solver`; factories return the same
object for the same hashable arguments, see :func:`jaxinf.solvers.base.records_config`),
the loss or measurement, the scoring method — as static arguments. Two models
of the same loss function, solver configuration and shapes share every
compiled program; only a new shape or a new function compiles.
"""

from __future__ import annotations

import functools

import jax

from jaxinf.core.tree import tree_all_finite
from jaxinf.scoring import contract, per_example_grads, perturbation
from jaxinf.solvers.base import solve_many

__all__ = ["call", "contract_columns", "example_grads", "init", "perturbation_columns", "solve_all"]


@functools.partial(jax.jit, static_argnames=("solver",))
def init(operator, key, *, solver):
    """``solver.init(operator, key=key)``."""
    return solver.init(operator, key=key)


@functools.partial(jax.jit, static_argnames=("solver",))
def solve_all(state, rhs, *, solver):
    """``(factors, info, finite)``: :func:`jaxinf.solvers.base.solve_many` of every right-hand side along the
    leading axis of ``rhs``, and whether every factor is finite (``check_solve``'s test, in the same program)."""
    factors, info = solve_many(solver, state, rhs)
    return factors, info, tree_all_finite(factors)


#: ``(fn, params, batch)``: per-example gradients of a loss or a measurement ``fn``.
example_grads = jax.jit(per_example_grads, static_argnums=0)
#: ``(fn, params, factors, batch, method)``: :func:`jaxinf.scoring.contract`.
contract_columns = jax.jit(contract, static_argnums=(0, 4))
#: ``(loss_fn, params, factors, batch, leaf)``: :func:`jaxinf.scoring.perturbation`.
perturbation_columns = jax.jit(perturbation, static_argnums=(0, 4))


@functools.partial(jax.jit, static_argnums=0)
def call(fn, *args):
    """``fn(*args)`` jitted with ``fn`` static (e.g. a solver's ``scorer.prepare`` / ``scorer.finish``)."""
    return fn(*args)
