"""Differentiable solves: ``x = (C(θ) + λI)⁻¹ v`` with gradients for ``v``, ``θ``, ``λ`` and the training data.

Research code differentiates *through* influence: meta-learning per-example
data weights, optimising a training set, the sensitivity of a score to the
damping. :func:`implicit_solve` (one right-hand side) and
:func:`implicit_solve_many` (a leading axis of them) solve with any
differentiable solver and differentiate the result implicitly. From
``A(w) x = v`` with ``A = C + Λ`` and ``w`` everything the operator holds (its
``params``, ``damping`` and ``data``),

    ``v̄ = A⁻¹ x̄``,    ``w̄ = −∂_w ⟨v̄, A(w) x⟩``  (``x`` fixed),

so the backward pass is one more solve with the (symmetric) operator plus one
VJP of a curvature-vector product (:func:`jaxinf.solvers.autodiff.symmetric_solve`,
``jax.lax.custom_linear_solve``); the solver's iterations and its
factorisation are never differentiated. Forward mode (``jax.jvp``) works too.

Which solvers, and which identity holds (``S`` is the solver's map
``x = S v``):

* ``direct``: ``S = A⁻¹`` exactly, so every gradient is exact.
* ``cg`` (also pre-conditioned, and ``block=True`` through
  :func:`implicit_solve_many`): ``S = A⁻¹`` up to ``rtol``; the backward pass
  is another (block) CG solve, as accurate as the forward one. ``cg``'s own
  ``solve``/``solve_many`` are differentiable in the same way, since its state
  holds the operator.
* ``arnoldi`` and ``nystrom``: the gradient is the implicit one with ``A⁻¹``
  replaced by ``S`` (``v̄ = S x̄``, ``w̄ = −∂_w⟨S x̄, A(w) S v⟩``): exact when
  ``S = A⁻¹`` (full rank; or the Woodbury completion with a basis spanning
  the range of ``C``), otherwise the approximation consistent
  with the solve (not the derivative of the truncated factorisation).
* ``lissa``, ``kfac``, ``ekfac``, ``datainf`` and the gradient-similarity
  baselines are not supported: ``implicit_solve`` raises ``TypeError``.

The state, when given, is treated as a constant (``stop_gradient``) and
rebound to the operator's damping, so the forward solve and its derivative
always describe the same ``A``. Gradients with respect to the right-hand side
and to a state's damping also flow through ``solver.solve`` directly (for
every solver above); the factorisation of ``direct``, ``arnoldi`` and
``nystrom`` raises ``TypeError`` if ``jax`` tries to differentiate it.

Examples:
  The derivative of a score with respect to per-example training weights
  (the loss is a weighted mean, the weights a leaf of the data), the damping
  and the parameters, by ``jax.grad`` (see the README, "Differentiating
  through influence"):

  >>> import jax, jax.numpy as jnp, jaxinf
  >>> def loss(w, batch):
  ...     x, y, weight = batch
  ...     return jnp.mean(weight * (x @ w - y) ** 2)
  >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]); y = jnp.array([1.0, 0.0, 1.0])
  >>> g_test = jnp.array([1.0, -1.0])
  >>> def score(params, damping, weights):
  ...     op = jaxinf.curvature_operator(loss, params, (x, y, weights), damping=damping)
  ...     factor, info = jaxinf.implicit_solve(jaxinf.direct(), op, g_test)
  ...     return jnp.vdot(factor, g_test)
  >>> grads = jax.grad(score, argnums=(0, 1, 2))(jnp.zeros(2), 0.1, jnp.ones(3))
  >>> [g.shape for g in grads]
  [(2,), (), (3,)]
"""

from __future__ import annotations

from typing import Any

import jax

from jaxinf.core.curvature import CurvatureOperator
from jaxinf.core.tree import check_matches
from jaxinf.solvers import direct as _direct
from jaxinf.solvers import lowrank as _lowrank
from jaxinf.solvers.autodiff import symmetric_solve
from jaxinf.solvers.base import SolveInfo, Solver, solve_many
from jaxinf.solvers.cg import CGState

PyTree = Any

__all__ = ["implicit_solve", "implicit_solve_many", "DIFFERENTIABLE"]

#: The solver factories whose solves :func:`implicit_solve` differentiates.
DIFFERENTIABLE = ("direct", "cg", "arnoldi", "nystrom")


def _bind(solver: Solver, state, operator: CurvatureOperator):
    """The state, rebound to the operator's damping (and, for CG, to the operator itself)."""
    factory = (solver.config or {}).get("factory")
    kinds = {"direct": _direct.DirectState, "cg": CGState, "arnoldi": _lowrank.LowRankState}
    kind = kinds.get(factory, _lowrank.LowRankState if factory == "nystrom" else None)
    if not isinstance(state, kind):
        raise TypeError(f"state must be the {factory}() solver's state, got {type(state).__name__}.")
    if isinstance(state, _direct.DirectState):
        return _direct.bind(state, operator)
    if isinstance(state, _lowrank.LowRankState):
        return _lowrank.bind(state, operator)
    if state.operator.spec != operator.spec:
        raise ValueError("The cg() state was built for another parameter layout than the operator.")
    return state._replace(operator=operator)


def _fitted(solver: Solver, operator: CurvatureOperator, state, key):
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a jaxinf.Solver (e.g. jaxinf.direct()), got {type(solver).__name__}.")
    if (solver.config or {}).get("factory") not in DIFFERENTIABLE:
        raise TypeError(
            f"jaxinf.implicit_solve does not differentiate the {solver.name!r} solver: only {list(DIFFERENTIABLE)} "
            "are supported (lissa, kfac, ekfac, datainf and the gradient-similarity baselines approximate the "
            "inverse in ways whose derivative would not be that of the solve). Use jaxinf.direct() or "
            "jaxinf.cg() to differentiate through influence."
        )
    if not isinstance(operator, CurvatureOperator):
        raise TypeError(
            "operator must be a jaxinf.CurvatureOperator (jaxinf.curvature_operator(...)), "
            f"got {type(operator).__name__}."
        )
    if state is None:
        state = solver.init(jax.lax.stop_gradient(operator), key=key)
    return jax.lax.stop_gradient(_bind(solver, state, operator))


def implicit_solve(
    solver: Solver, operator: CurvatureOperator, v: PyTree, *, state: Any = None, key: jax.Array | None = None
) -> tuple[PyTree, SolveInfo]:
    """``x = (C + Λ)⁻¹ v`` by ``solver``, differentiable with respect to ``v`` and the operator.

    Args:
      solver: ``jaxinf.direct()``, ``jaxinf.cg(...)``, ``jaxinf.arnoldi(...)``
        or ``jaxinf.nystrom(...)``.
      operator: the damped curvature ``A = C + Λ``
        (:func:`jaxinf.curvature_operator`), built inside the differentiated
        function from the values to differentiate (``params``, ``damping``,
        ``data``, e.g. a per-example weight leaf of the batch).
      v: the right-hand side, with the structure of the parameters.
      state: a state fitted by ``solver.init`` (e.g. ``InfluenceModel.state``)
        on the operator's params and data; treated as a constant and rebound
        to the operator's damping (only the damping: a state fitted at other
        params or data would solve with their curvature, while the
        derivative uses the operator's). ``None``: ``solver.init`` of the
        operator (held constant), at the cost of a fit per call; needed when
        the differentiated params or data change the curvature between calls
        (e.g. finite differences, an optimisation loop).
      key: PRNG key for ``solver.init`` (random sketches and start vectors).

    Returns:
      ``(x, info)`` as ``solver.solve`` (check ``info.converged``: the
      gradient is that of the solve only when it converged; the backward
      solve's own info is not reported). Gradients (``jax.grad``,
      ``jax.vjp``, ``jax.jvp``, under ``jax.jit`` and ``jax.vmap``):
      ``v̄ = S x̄`` and ``w̄ = −∂_w⟨S x̄, A(w) x⟩`` for every value ``w`` the
      operator holds; ``S`` is the solver's inverse (module docstring).

    Raises:
      TypeError: a solver that is not differentiable (``lissa``, ``kfac``,
        ``ekfac``, ``datainf``, the baselines), or arguments of the wrong type.
      ValueError: a ``state`` fitted for another parameter layout or block
        structure, or a ``v`` that does not match the parameters.
    """
    bound = _fitted(solver, operator, state, key)
    check_matches(v, operator.spec, "v")
    return symmetric_solve(operator.matvec, lambda b: solver.solve(bound, b), v)


def implicit_solve_many(
    solver: Solver, operator: CurvatureOperator, vs: PyTree, *, state: Any = None, key: jax.Array | None = None
) -> tuple[PyTree, SolveInfo]:
    """:func:`implicit_solve` for every right-hand side along the leading axis of ``vs``.

    Uses the solver's blocked ``solve_many`` when it has one (``cg(block=True)``:
    the backward pass is then block CG on the cotangents too), else
    ``jax.vmap`` of ``solve``, as :func:`jaxinf.solvers.base.solve_many`.

    Returns:
      ``(xs, info)`` with a leading axis on every leaf of ``xs`` and ``info``.
    """
    bound = _fitted(solver, operator, state, key)
    check_matches(vs, operator.spec, "vs", leading=1)
    return symmetric_solve(jax.vmap(operator.matvec), lambda b: solve_many(solver, bound, b), vs)
