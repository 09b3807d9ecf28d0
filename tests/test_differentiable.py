"""Differentiable solves: ``jax.grad`` through ``(C(θ) + λI)⁻¹ v`` against finite differences, in float64.

Every check compares a derivative from ``jax.grad`` (or ``jax.jvp``) with a
central finite difference of the same function along random directions
(``h = 1e-5``: truncation ``~h²`` and rounding ``~eps/h``, both far below the
asserted ``1e-6`` relative error), and the implicit identities with their
dense definitions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf.core.curvature import per_example_grads, to_dense
from jaxinf.core.tree import ravel, ravel_batched, unravel
from tests import models

PROBLEM = models.mlp_problem("plain", n_train=10, n_test=3, d_in=3, hidden=4, out=2)  # p = 26
P = sum(x.size for x in jax.tree.leaves(PROBLEM.params))
N = PROBLEM.train[0].shape[0]
TOL = 1e-6


def model_fn(params, batch):
    return PROBLEM.model_fn(params, batch)


def weighted_output_loss(outputs, batch):
    """``(1/n) Σ_i w_i · ½‖f(x_i) − y_i‖²``: per-example weights are the third leaf of the batch."""
    return 0.5 * jnp.mean(batch[2] * jnp.sum((outputs - batch[1]) ** 2, axis=-1))


def weighted_loss(params, batch):
    return weighted_output_loss(model_fn(params, batch), batch)


def operator(params, damping, weights=None, *, kind="gauss_newton"):
    weights = jnp.ones(N) if weights is None else weights
    data = (*PROBLEM.train, weights)
    return jaxinf.curvature_operator(
        weighted_loss, params, data, kind=kind, damping=damping, model_fn=model_fn, output_loss=weighted_output_loss
    )


def objective(x):
    """A nonlinear scalar of the solution (so the cotangent x̄ depends on x)."""
    flat = ravel(x, jnp.float64)
    return jnp.sum(flat**2) + jnp.sum(jnp.sin(3.0 * flat))


def random_like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, jnp.shape(x), jnp.float64) for k, x in zip(keys, leaves)])


def directional_errors(f, args, grads, *, directions=2, h=1e-5):
    """Relative errors of ``⟨∇_k f, d⟩`` (from ``grads``) against ``(f(.., a_k + hd, ..) − f(.., a_k − hd, ..)) / 2h``.

    One random direction ``d`` per argument ``k`` at a time (and ``directions`` of them), so that each gradient
    (right-hand side, params, damping, weights) is checked on its own.
    """
    errors = {}
    for k, (arg, grad) in enumerate(zip(args, grads)):
        for seed in range(directions):
            d = random_like(arg, 100 * k + seed)
            analytic = sum(jnp.vdot(g, e) for g, e in zip(jax.tree.leaves(grad), jax.tree.leaves(d)))
            shifted = [list(args), list(args)]
            shifted[0][k] = jax.tree.map(lambda a, b: a + h * b, arg, d)
            shifted[1][k] = jax.tree.map(lambda a, b: a - h * b, arg, d)
            numeric = (f(*shifted[0]) - f(*shifted[1])) / (2 * h)
            errors[(k, seed)] = abs(float(analytic) - float(numeric)) / max(abs(float(numeric)), 1e-12)
    return errors


def assert_matches_finite_differences(f, *args, directions=2):
    """``jax.grad`` of ``f`` for every argument, under ``jax.jit``, against central differences; returns the grads.

    One compiled ``value_and_grad`` serves both (a single compilation keeps the test fast).
    """
    value_and_grad = jax.jit(jax.value_and_grad(f, argnums=tuple(range(len(args)))))
    grads = value_and_grad(*args)[1]
    errors = directional_errors(lambda *a: value_and_grad(*a)[0], args, grads, directions=directions)
    assert max(errors.values()) <= TOL, errors
    return grads


SOLVERS = {
    "direct": jaxinf.direct(),
    "cg": jaxinf.cg(rtol=1e-13),
    "block_cg": jaxinf.cg(rtol=1e-13, block=True, block_size=2),
    "arnoldi_full": jaxinf.arnoldi(P, krylov_dim=P),
    "nystrom_full": jaxinf.nystrom(P),
}
ARGS = (random_like(PROBLEM.params, 10), PROBLEM.params, jnp.asarray(0.3), jnp.linspace(0.5, 1.5, N))


def spec():
    return operator(PROBLEM.params, 0.3).spec


@jax.jit
def dense_adjoint(v, lam=0.3):
    """Reference ``(A, x, x̄, A⁻¹ x̄)`` for ``x = A⁻¹ v`` with the dense operator (compiled once for the file)."""
    a = to_dense(operator(PROBLEM.params, lam))
    x = jnp.linalg.solve(a, ravel(v, jnp.float64))
    xbar = jax.grad(lambda z: objective(unravel(spec(), z)))(x)
    return a, x, xbar, jnp.linalg.solve(a, xbar)


def solve_with(name, op, v):
    """The differentiable solve of each solver: its own ``solve`` for CG (the state holds the operator, so ``init``
    inside the differentiated function is free), ``solve_many`` on three related right-hand sides for block CG, and
    :func:`jaxinf.implicit_solve` for the solvers whose state is a factorisation."""
    solver = SOLVERS[name]
    if name == "cg":
        return solver.solve(solver.init(op), v)[0]
    if name == "block_cg":  # two blocks of two right-hand sides (one padded)
        vs = jax.tree.map(lambda a: jnp.stack([a, 2.0 * a + 1.0, -a]), v)
        xs = jaxinf.solvers.solve_many(solver, solver.init(op), vs)[0]
        return jax.tree.map(lambda a: a[0] + a[1] ** 2 + jnp.cos(a[2]), xs)
    return jaxinf.implicit_solve(solver, op, v, key=jax.random.key(0))[0]


# ---------------------------------------------------------------------------------------------------------------------
# Gradients with respect to v, params θ, damping λ and per-example training weights
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SOLVERS))
def test_grads_wrt_v_params_damping_and_weights_match_finite_differences(name):
    """Each of the four gradients, under ``jax.jit``, within 1e-6 of central differences (the low-rank solvers at
    full rank, where their state is the exact inverse)."""

    def f(v, params, lam, weights):
        return objective(solve_with(name, operator(params, lam, weights), v))

    grads = assert_matches_finite_differences(f, *ARGS)
    assert bool(jnp.all(grads[3] != 0)) and bool(grads[2] != 0)


@pytest.mark.parametrize("name", ["direct", "cg"])
def test_grad_wrt_params_with_the_hessian_and_theta_in_the_right_hand_side(name):
    """θ enters the Hessian (third derivatives of the loss) and the right-hand side, a mean test gradient."""

    def f(params):
        v = jax.tree.map(lambda g: jnp.mean(g, axis=0), per_example_grads(PROBLEM.loss_fn, params, PROBLEM.test))
        return objective(solve_with(name, operator(params, 5.0, kind="hessian"), v))  # λ = 5: H + λI is PD

    assert_matches_finite_differences(f, PROBLEM.params)


@pytest.mark.parametrize("name", ["direct", "arnoldi_full", "nystrom_full"])
def test_grad_wrt_v_of_plain_solve_is_the_adjoint_solve(name):
    """``solver.solve`` itself (no implicit rule) is linear in ``v``: ``v̄ = A⁻¹ x̄`` exactly."""
    solver = SOLVERS[name]
    state = jax.jit(solver.init)(operator(PROBLEM.params, 0.3), key=jax.random.key(0))
    grad = jax.jit(jax.grad(lambda v, st: objective(solver.solve(st, v)[0])))(ARGS[0], state)
    *_, expected = dense_adjoint(ARGS[0])
    np.testing.assert_allclose(ravel(grad, jnp.float64), expected, rtol=1e-9, atol=1e-12)


def test_grad_wrt_damping_is_its_formula_and_needs_no_implicit_rule_for_direct():
    """``λ̄ = −x̄ᵀ A⁻¹ x``; for ``direct`` the state's damping enters the solve in closed form, so plain
    ``solver.solve`` on ``init`` inside the differentiated function gives it too."""
    solver = jaxinf.direct()

    def plain(lam):
        return objective(solver.solve(solver.init(operator(PROBLEM.params, lam)), ARGS[0])[0])

    def implicit(lam):
        return objective(jaxinf.implicit_solve(solver, operator(PROBLEM.params, lam), ARGS[0])[0])

    a, x, xbar, _ = dense_adjoint(ARGS[0])
    expected = -xbar @ jnp.linalg.solve(a, x)
    np.testing.assert_allclose(jax.jit(jax.grad(plain))(0.3), expected, rtol=1e-9)
    np.testing.assert_allclose(jax.jit(jax.grad(implicit))(0.3), expected, rtol=1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# A scalar of influence scores: the recipe of the README ("Differentiating through influence")
# ---------------------------------------------------------------------------------------------------------------------


def influence_total(solver, params, damping, weights):
    """``Σ_ij I[i, j]``, ``I = ∇ℓ(test_i)ᵀ (C_w(θ) + λI)⁻¹ ∇ℓ(train_j)``: the functional core of InfluenceModel."""
    op = operator(params, damping, weights)
    g_test = per_example_grads(PROBLEM.loss_fn, params, PROBLEM.test)
    factors, info = jaxinf.implicit_solve_many(solver, op, g_test)
    g_train = per_example_grads(PROBLEM.loss_fn, params, PROBLEM.train)
    scores = ravel_batched(factors, jnp.float64) @ ravel_batched(g_train, jnp.float64).T
    return jnp.sum(jnp.tanh(scores))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["direct", "block_cg"])
def test_grad_of_influence_scores_wrt_params_damping_and_weights(name):
    solver = SOLVERS[name]
    args = (PROBLEM.params, jnp.asarray(0.5), jnp.linspace(0.5, 1.5, N))
    assert_matches_finite_differences(lambda *a: influence_total(solver, *a), *args)
    if name == "direct":  # with weights 1 the recipe gives InfluenceModel's scores: the same functional core
        model = jaxinf.InfluenceModel(
            PROBLEM.loss_fn,
            PROBLEM.params,
            solver,
            damping=0.5,
            curvature="gauss_newton",
            model_fn=model_fn,
            output_loss=PROBLEM.output_loss,
        ).fit(PROBLEM.train)
        expected = jnp.sum(jnp.tanh(model.influences(PROBLEM.test, PROBLEM.train)))
        got = jax.jit(influence_total, static_argnums=0)(solver, PROBLEM.params, 0.5, jnp.ones(N))
        np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_forward_mode_and_vmap_agree_with_reverse_mode():
    solver = jaxinf.cg(rtol=1e-13)

    def f(lam):
        return objective(jaxinf.implicit_solve(solver, operator(PROBLEM.params, lam), ARGS[0])[0])

    both = jax.jit(lambda lam: (jax.jvp(f, (lam,), (jnp.ones_like(lam),))[1], jax.grad(f)(lam)))
    lams = jnp.array([0.3, 0.7])
    tangents, grads = jax.vmap(both)(lams)  # forward mode, reverse mode, and both under vmap
    np.testing.assert_allclose(tangents, grads, rtol=1e-9)
    np.testing.assert_allclose(grads[1], both(lams[1])[1], rtol=1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# Low rank below full rank: the documented identity, not the derivative of the truncation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", [jaxinf.arnoldi(6), jaxinf.nystrom(6)], ids=["arnoldi", "nystrom"])
def test_truncated_lowrank_gradient_is_the_implicit_one_with_the_state_as_inverse(solver):
    """``v̄ = S x̄`` and ``θ̄·d = −⟨S x̄, (∂_d A) S v⟩`` for the state's map ``S``."""
    state = jax.jit(solver.init)(operator(PROBLEM.params, 0.3), key=jax.random.key(0))

    def f(params, v):
        return objective(jaxinf.implicit_solve(solver, operator(params, 0.3), v, state=state)[0])

    d = random_like(PROBLEM.params, 5)

    @jax.jit
    def check(params, v, d):
        g_params, g_v = jax.grad(f, argnums=(0, 1))(params, v)
        x = solver.solve(state, v)[0]
        u = solver.solve(state, jax.grad(objective)(x))[0]  # S x̄
        da_x = jax.jvp(lambda p: operator(p, 0.3).matvec(x), (params,), (d,))[1]  # (∂_d A) S v
        expected = -jnp.vdot(ravel(u, jnp.float64), ravel(da_x, jnp.float64))
        got = jnp.vdot(ravel(g_params, jnp.float64), ravel(d, jnp.float64))
        return ravel(g_v, jnp.float64), ravel(u, jnp.float64), got, expected

    g_v, u, got, expected = check(PROBLEM.params, ARGS[0], d)
    np.testing.assert_allclose(g_v, u, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert abs(float(expected)) > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# What is refused, loudly
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solver",
    [jaxinf.lissa(), jaxinf.kfac(), jaxinf.ekfac(), jaxinf.datainf(), jaxinf.gradient_dot()],
    ids=["lissa", "kfac", "ekfac", "datainf", "gradient_dot"],
)
def test_implicit_solve_refuses_solvers_it_cannot_differentiate(solver):
    with pytest.raises(TypeError, match="does not differentiate"):
        jaxinf.implicit_solve(solver, operator(PROBLEM.params, 0.3), ARGS[0])


@pytest.mark.parametrize("name", ["direct", "arnoldi_full", "nystrom_full"])
def test_differentiating_a_factorisation_raises_instead_of_a_wrong_gradient(name):
    """Without the guard, ``jax.grad`` through ``direct().init`` differentiated ``eigh`` and returned a gradient off by
    two orders of magnitude on a Gauss-Newton curvature of rank below ``p`` (repeated zero eigenvalues)."""
    solver = SOLVERS[name]

    def f(params):
        state = solver.init(operator(params, 0.3), key=jax.random.key(0))
        return objective(solver.solve(state, ARGS[0])[0])

    with pytest.raises(TypeError, match="implicit_solve"):
        jax.jit(jax.grad(f))(PROBLEM.params)


def test_a_given_state_is_rebound_to_the_operators_damping_and_checked():
    solver = jaxinf.direct()
    state = jax.jit(solver.init)(operator(PROBLEM.params, 0.3))
    x, _ = jaxinf.implicit_solve(solver, operator(PROBLEM.params, 0.8), ARGS[0], state=state)
    _, expected, _, _ = dense_adjoint(ARGS[0], 0.8)
    np.testing.assert_allclose(ravel(x, jnp.float64), expected, rtol=1e-10)
    with pytest.raises(TypeError, match="state must be the direct"):
        cg_state = jaxinf.cg().init(operator(PROBLEM.params, 0.3))
        jaxinf.implicit_solve(solver, operator(PROBLEM.params, 0.3), ARGS[0], state=cg_state)
    with pytest.raises(TypeError, match="CurvatureOperator"):
        jaxinf.implicit_solve(solver, lambda v: v, ARGS[0])


def test_differentiating_kfac_eigenbases_raises_a_clear_error():
    """Before: jax's own 'Linearization failed' error; K-FAC has no implicit rule, so the message names the way out."""
    p = models.mlp_problem("plain", n_train=12)
    v = jax.tree.map(jnp.ones_like, p.params)

    def f(params):
        op = jaxinf.curvature_operator(None, params, p.train, kind="gauss_newton", damping=0.1,
                                       model_fn=p.model_fn, output_loss=p.output_loss)
        solver = jaxinf.ekfac()
        x, _ = solver.solve(solver.init(op, key=jax.random.key(0)), v)
        return sum(jnp.sum(a) for a in jax.tree.leaves(x))

    with pytest.raises(TypeError, match="not differentiable in the operator.*implicit_solve"):
        jax.grad(f)(p.params)
