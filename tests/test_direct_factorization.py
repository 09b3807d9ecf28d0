"""direct(): Cholesky where the damped curvature is positive definite, eigh where it is not (issue 15).

Both paths against ``jnp.linalg.solve`` in float64, under ``jax.jit`` and ``jax.vmap`` over right-hand sides;
the choice recorded in the state; an explicit ``factorization="cholesky"`` on an indefinite curvature raises.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf.core.curvature import to_dense
from jaxinf.core.tree import ravel, tree_spec, unravel_batched
from jaxinf.solvers.dense_factor import cholesky_bounds
from jaxinf.solvers.direct import with_damping
from tests import models


def _rhs(params, k, seed=0):
    spec = tree_spec(params)
    return unravel_batched(spec, jax.random.normal(jax.random.key(seed), (k, spec.size), spec.dtype))


def _gauss_newton(damping=1e-2, blocks=None):
    p = models.mlp_problem("linen")
    return p, jaxinf.curvature_operator(None, p.params, p.train, kind="gauss_newton", model_fn=p.model_fn,
                                        output_loss=p.output_loss, damping=damping, blocks=blocks)


def _indefinite(damping=1e-2):
    """A Hessian away from a minimum: ``H + λI`` has negative eigenvalues."""
    p = models.mlp_problem("plain")
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=damping)
    assert np.linalg.eigvalsh(np.asarray(to_dense(op.with_damping(1e-2))))[0] < 0  # indefinite at λ = 0.01
    return p, op


def _check_against_dense_solve(solver, state, op, params):
    rhs = _rhs(params, 9)
    x, info = jax.jit(jax.vmap(solver.solve, in_axes=(None, 0)))(state, rhs)
    ref = jnp.linalg.solve(to_dense(op), jax.vmap(ravel)(rhs).T).T
    np.testing.assert_allclose(jax.vmap(ravel)(x), ref, rtol=1e-9, atol=1e-11)
    assert bool(jnp.all(info.converged)) and not bool(jnp.any(info.diverged))
    assert float(jnp.max(info.residual_norm)) < 1e-9


@pytest.mark.parametrize("factorization", ["auto", "cholesky", "eigh"])
def test_positive_definite_gauss_newton_by_each_factorization(factorization):
    p, op = _gauss_newton()
    solver = jaxinf.direct(factorization=factorization)
    state = jax.jit(solver.init)(op)
    assert state.factorizations == ("eigh",) if factorization == "eigh" else ("cholesky",)
    assert f"factorizations={state.factorizations}" in repr(state)
    solver.validate(state)
    _check_against_dense_solve(solver, state, op, p.params)


def test_auto_uses_eigh_for_an_indefinite_hessian_and_still_warns():
    p, op = _indefinite()
    solver = jaxinf.direct()
    state = jax.jit(solver.init)(op)  # the choice is made inside the compiled init
    assert state.factorizations == ("eigh",)
    with pytest.warns(UserWarning, match="negative eigenvalue"):
        solver.validate(state)
    _check_against_dense_solve(solver, state, op, p.params)


def test_layer_blocks_may_each_take_their_own_factorization():
    p = models.mlp_problem("plain")
    damping = {"['b1']": 0.2, "['b2']": 0.2, "['w1']": 1e-3, "['w2']": 1e-3}
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, blocks="parameter", damping=damping)
    solver = jaxinf.direct()
    state = solver.init(op)
    assert set(state.factorizations) == {"cholesky", "eigh"}, state.factorizations
    _check_against_dense_solve(solver, state, op, p.params)


def test_explicit_cholesky_on_an_indefinite_hessian_raises_not_nan():
    p, op = _indefinite()
    solver = jaxinf.direct(factorization="cholesky")
    with pytest.raises(ValueError, match="not positive definite.*factorization='auto'"):
        solver.init(op)
    state = jax.jit(solver.init)(op)  # under jit init cannot raise: validate does, and the solve reports it
    with pytest.raises(ValueError, match="not positive definite"):
        solver.validate(state)
    _, info = solver.solve(state, jax.tree.map(jnp.ones_like, p.params))
    assert bool(info.diverged) and not bool(info.converged)
    model = jaxinf.InfluenceModel(p.loss_fn, p.params, solver, damping=1e-2)
    with pytest.raises(ValueError, match="not positive definite"):
        model.fit(p.train)


def test_redamping_a_cholesky_state_refactorises_and_moves_to_eigh_when_indefinite():
    p, op = _indefinite(damping=10.0)  # PD at λ = 10 ...
    solver = jaxinf.direct()
    state = solver.init(op)
    assert state.factorizations == ("cholesky",)
    small = jax.jit(with_damping)(state, 1e-2)  # ... indefinite at λ = 0.01
    assert small.factorizations == ("eigh",)
    _check_against_dense_solve(solver, small, op.with_damping(1e-2), p.params)
    back = with_damping(small, 3.0)  # an eigh block stays eigh: free re-damping
    assert back.factorizations == ("eigh",)
    _check_against_dense_solve(solver, back, op.with_damping(3.0), p.params)
    with pytest.raises(ValueError, match="not positive definite"):
        with_damping(jaxinf.direct(factorization="cholesky").init(op), 1e-2)


def test_a_cholesky_factor_at_another_damping_is_not_used_silently():
    import dataclasses

    p, op = _gauss_newton()
    solver = jaxinf.direct()
    state = solver.init(op)
    stale = dataclasses.replace(state, damping=tuple(jnp.asarray(0.5) for _ in state.damping))
    _, info = solver.solve(stale, jax.tree.map(jnp.ones_like, p.params))
    assert not bool(info.converged)
    with pytest.raises(ValueError, match="with_damping"):
        solver.validate(stale)


def test_grad_wrt_v_and_damping_through_a_cholesky_state():
    """``v̄ = A⁻¹ x̄`` and ``λ̄ = −x̄ᵀ A⁻¹ x`` (custom JVP of the Cholesky solve), under jit, vs the dense solve."""
    p, op = _gauss_newton(damping=0.3)
    solver = jaxinf.direct()
    v = jax.tree.map(lambda a: a[0], _rhs(p.params, 1, seed=3))

    def f(lam, v):
        state = solver.init(op.with_damping(lam))
        x, _ = solver.solve(state, v)
        return jnp.sum(jnp.sin(ravel(x)))

    g_lam, g_v = jax.jit(jax.grad(f, argnums=(0, 1)))(0.3, v)
    a = to_dense(op.with_damping(0.3))
    x = jnp.linalg.solve(a, ravel(v))
    xbar = jnp.cos(x)
    np.testing.assert_allclose(g_lam, -xbar @ jnp.linalg.solve(a, x), rtol=1e-9)
    np.testing.assert_allclose(ravel(g_v), jnp.linalg.solve(a, xbar), rtol=1e-9, atol=1e-12)
    assert solver.init(op).factorizations == ("cholesky",)


def test_cholesky_bounds_bracket_the_spectrum_and_find_a_near_singular_matrix():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    for spectrum in (np.linspace(1.0, 5.0, 30), np.r_[1e-12, np.linspace(1.0, 2.0, 29)]):
        a = (q * spectrum) @ q.T
        low = jnp.linalg.cholesky(0.5 * (a + a.T))
        assert bool(jnp.all(jnp.isfinite(low)))
        small, top = np.asarray(jax.jit(cholesky_bounds)(low))
        assert spectrum.min() * (1 - 1e-9) - 1e-15 <= small and top <= spectrum.max() * (1 + 1e-9)
        assert small < 10 * spectrum.min() + 1e-13 and top > 0.5 * spectrum.max()


def test_near_singular_positive_definite_curvature_is_refused_by_the_cholesky_path_too():
    # H = diag(1, 1e-18): Cholesky succeeds, but C + λI at λ = 0 is singular to working precision.
    def loss(w, batch):
        return jnp.mean(0.5 * jnp.sum(batch * w**2, axis=-1))

    op = jaxinf.curvature_operator(loss, jnp.ones(2), jnp.array([[1.0, 1e-18]]), damping=0.0)
    solver = jaxinf.direct()
    state = solver.init(op)
    assert state.factorizations == ("cholesky",)
    with pytest.raises(ValueError, match="singular.*Set damping > 0"):
        solver.validate(state)
    _, info = solver.solve(state, jnp.ones(2))
    assert not bool(info.converged)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solver.validate(with_damping(state, 1e-3))
