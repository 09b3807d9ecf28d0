"""Arnoldi low-rank solver and projected scoring, against dense float64 references."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf._tree import ravel, tree_spec, unravel, unravel_batched
from jaxinf.curvature import to_dense
from jaxinf.lowrank import with_damping
from tests import models


def _rhs(params, k, seed=0):
    spec = tree_spec(params)
    return unravel_batched(spec, jax.random.normal(jax.random.key(seed), (k, spec.size), spec.dtype))


def _solve_many(solver, state, rhs):
    x, info = jax.jit(jax.vmap(solver.solve, in_axes=(None, 0)))(state, rhs)
    return jax.vmap(ravel)(x), info


def _quadratic(diag):
    """Loss ``0.5 wᵀ A w`` (independent of the data) with a given diagonal Hessian ``A``."""
    a = jnp.asarray(diag, jnp.float64)

    def loss(w, batch):
        return 0.5 * jnp.sum(a * w * w) + 0.0 * jnp.mean(batch)

    return loss, jnp.ones(a.shape[0], jnp.float64), jnp.ones((3, 1))


def _quiet_init(solver, op, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = solver.init(op, **kw)
        solver.validate(state)
    return state


@pytest.mark.parametrize("completion", [False, True])
def test_full_rank_reproduces_direct_on_indefinite_hessian(completion):
    p = models.mlp_problem("plain")
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.1)
    dense = to_dense(op)
    assert float(jnp.linalg.eigvalsh(dense)[0]) < 0  # the test exercises negative eigenvalues
    n = op.size
    solver = jaxinf.arnoldi(n, krylov_dim=n, completion=completion)
    state = solver.init(op, key=jax.random.key(1))
    with pytest.warns(UserWarning, match="negative"):
        solver.validate(state)
    rhs = _rhs(p.params, n + 5)  # more right-hand sides than parameters
    x, info = _solve_many(solver, state, rhs)
    ref = jnp.linalg.solve(dense, jax.vmap(ravel)(rhs).T).T
    assert float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref)) <= 1e-8
    assert bool(jnp.all(info.converged)) and not bool(jnp.any(info.diverged))
    np.testing.assert_allclose(state.basis.T @ state.basis, np.eye(n), atol=1e-12)
    # ... and equals the direct solver's answer.
    direct = jaxinf.direct()
    xd, _ = _solve_many(direct, direct.init(op), rhs)
    assert float(jnp.linalg.norm(x - xd) / jnp.linalg.norm(xd)) <= 1e-8


def test_top_eigenvalues_match_eigh():
    p = models.mlp_problem("nnx")
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.0)
    w, q = np.linalg.eigh(np.asarray(models.dense_hessian(p.loss_fn, p.params, p.train)))
    top = np.argsort(-np.abs(w))[:6]
    state = jaxinf.arnoldi(6, krylov_dim=30).init(op, key=jax.random.key(0))
    np.testing.assert_allclose(state.raw_eigvals, w[top], rtol=1e-8)
    # Ritz vectors align with the eigenvectors (up to sign).
    overlap = np.abs(np.sum(np.asarray(state.basis) * q[:, top], axis=0))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-6)
    assert float(jnp.max(state.extras["ritz_residuals"])) < 1e-6


def test_low_rank_fisher_breakdown_restart_and_woodbury_exact():
    # Empirical Fisher of 4 examples: rank <= 4, the Krylov space is invariant after 5 steps.
    p = models.mlp_problem("plain", n_train=4)
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, kind="fisher", damping=1e-2)
    solver = jaxinf.arnoldi(4, krylov_dim=12, completion=True)
    state = solver.init(op, key=jax.random.key(3))
    solver.validate(state)
    assert int(state.extras["breakdowns"]) >= 1
    np.testing.assert_allclose(state.basis.T @ state.basis, np.eye(4), atol=1e-12)
    rhs = _rhs(p.params, 3)
    x, info = _solve_many(solver, state, rhs)
    ref = jnp.linalg.solve(to_dense(op), jax.vmap(ravel)(rhs).T).T
    assert float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref)) <= 1e-8
    assert bool(jnp.all(info.converged))


def test_completion_is_woodbury_inverse_of_low_rank_model():
    p = models.logistic_problem(l2=0.01)
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.05)
    solver = jaxinf.arnoldi(4, completion=True)
    state = solver.init(op)
    v, d = np.asarray(state.basis), np.asarray(state.eigvals)
    model = (v * d) @ v.T + 0.05 * np.eye(op.size)
    rhs = _rhs(p.params, 4)
    x, info = _solve_many(solver, state, rhs)
    np.testing.assert_allclose(x, np.linalg.solve(model, np.asarray(jax.vmap(ravel)(rhs)).T).T, rtol=1e-10)
    # The residual reports the part of the right-hand side outside the basis.
    b = np.asarray(jax.vmap(ravel)(rhs))
    np.testing.assert_allclose(info.residual_norm, np.linalg.norm(b - (b @ v) @ v.T, axis=1), rtol=1e-10)


def test_ragged_batches_jit_and_no_retrace():
    p = models.mlp_problem("linen", n_train=23)
    batches = [jax.tree.map(lambda a: a[:8], p.train), jax.tree.map(lambda a: a[8:16], p.train),
               jax.tree.map(lambda a: a[16:], p.train)]  # 8, 8, 7
    op_ragged = jaxinf.curvature_operator(p.loss_fn, p.params, batches, kind="gauss_newton", model_fn=p.model_fn,
                                          output_loss=p.output_loss, damping=1e-3)
    op_full = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, kind="gauss_newton", model_fn=p.model_fn,
                                        output_loss=p.output_loss, damping=1e-3)
    solver = jaxinf.arnoldi(10, krylov_dim=op_full.size)
    state = jax.jit(solver.init)(op_ragged, key=jax.random.key(0))
    ref_state = solver.init(op_full, key=jax.random.key(0))
    np.testing.assert_allclose(state.eigvals, ref_state.eigvals, rtol=1e-9)
    solve = jax.jit(solver.solve)
    rhs = _rhs(p.params, 2)
    x0, _ = solve(state, jax.tree.map(lambda a: a[0], rhs))
    solve(state, jax.tree.map(lambda a: a[1], rhs))
    assert solve._cache_size() == 1
    xr, _ = solver.solve(ref_state, jax.tree.map(lambda a: a[0], rhs))
    np.testing.assert_allclose(ravel(x0), ravel(xr), rtol=1e-7, atol=1e-9)


def test_float32_full_rank():
    p = models.logistic_problem(l2=0.1, dtype=jnp.float32)
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.1)
    n = op.size
    solver = jaxinf.arnoldi(n, krylov_dim=n)
    state = solver.init(op)
    assert state.basis.dtype == jnp.float32
    x, info = solver.solve(state, jax.tree.map(jnp.ones_like, p.params))
    p64 = models.logistic_problem(l2=0.1)
    op64 = jaxinf.curvature_operator(p64.loss_fn, p64.params, p64.train, damping=0.1)
    ref = np.linalg.solve(np.asarray(to_dense(op64)), np.ones(n))
    err = np.linalg.norm(np.asarray(ravel(x), np.float64) - ref) / np.linalg.norm(ref)
    assert err < 1e-4, err
    assert bool(info.converged)


@pytest.mark.parametrize(
    "negative, expected",
    [("keep", [3.0, -2.0, 1.0]), ("abs", [3.0, 2.0, 1.0]), ("clip", [3.0, 1.0, 0.5])],
)
def test_negative_eigenvalue_treatments(negative, expected):
    loss, w, data = _quadratic([3.0, -2.0, 1.0, 0.5, 0.1])
    op = jaxinf.curvature_operator(loss, w, data, damping=0.5)
    solver = jaxinf.arnoldi(3, krylov_dim=5, negative=negative)
    state = solver.init(op, key=jax.random.key(0))
    np.testing.assert_allclose(state.eigvals, expected, atol=1e-12)
    if negative == "clip":
        solver.validate(state)  # the selected eigenvalues are all positive
    else:
        with pytest.warns(UserWarning, match="negative") as record:
            solver.validate(state)
        # keep: D + λ = -1.5 < 0 gets its own warning.
        assert any("D + λ < 0" in str(r.message) for r in record) == (negative == "keep")
    x, info = solver.solve(state, jnp.ones(5))
    diag = np.array([3.0, -2.0, 1.0, 0.5, 0.1])
    order = {"keep": [0, 1, 2], "abs": [0, 1, 2], "clip": [0, 2, 3]}[negative]
    ref = np.zeros(5)
    ref[order] = 1.0 / (np.asarray(expected) + 0.5)
    np.testing.assert_allclose(x, ref, atol=1e-12)
    assert bool(info.converged)


def test_singular_shifted_eigenvalue_is_not_inverted():
    loss, w, data = _quadratic([3.0, -2.0, 1.0])
    op = jaxinf.curvature_operator(loss, w, data, damping=2.0)  # D + λ = 0 for D = -2
    solver = jaxinf.arnoldi(3, krylov_dim=3)
    state = solver.init(op)
    with pytest.raises(ValueError, match="singular"):
        solver.validate(state)
    x, info = solver.solve(state, jnp.ones(3))
    assert not bool(info.converged)
    assert np.all(np.isfinite(x)) and float(jnp.max(jnp.abs(x))) < 1.0  # 1/5, 0, 1/3
    # negative="clip" keeps the PSD part: no singular direction, no warning.
    clipped = jaxinf.arnoldi(2, krylov_dim=3, negative="clip")
    state = clipped.init(op)
    clipped.validate(state)
    np.testing.assert_allclose(clipped.solve(state, jnp.ones(3))[0], [0.2, 0.0, 1 / 3], atol=1e-12)


def test_zero_damping_with_completion_raises_and_flags():
    p = models.logistic_problem(l2=0.01)
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.0)
    solver = jaxinf.arnoldi(3, completion=True)
    state = solver.init(op)
    with pytest.raises(ValueError, match="completion.*damping > 0"):
        solver.validate(state)
    x, info = solver.solve(state, jax.tree.map(jnp.ones_like, p.params))
    assert not bool(info.converged) and np.all(np.isfinite(ravel(x)))
    # Changing the damping needs no new products.
    state = with_damping(state, 0.1)
    solver.validate(state)
    assert bool(solver.solve(state, jax.tree.map(jnp.ones_like, p.params))[1].converged)


def test_configuration_errors():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        jaxinf.arnoldi(0)
    with pytest.raises(ValueError, match="krylov_dim .* must be >= rank"):
        jaxinf.arnoldi(5, krylov_dim=3)
    with pytest.raises(ValueError, match="negative must be one of"):
        jaxinf.arnoldi(2, negative="flip")
    with pytest.raises(ValueError, match="positive int"):
        jaxinf.arnoldi(2.5)
    p = models.logistic_problem()
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.1)
    with pytest.raises(ValueError, match="exceeds the number of parameters"):
        jaxinf.arnoldi(op.size + 1).init(op)
    with pytest.raises(ValueError, match="krylov_dim .* exceeds"):
        jaxinf.arnoldi(2, krylov_dim=op.size + 1).init(op)
    blocked = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.1, blocks="parameter")
    with pytest.raises(ValueError, match="block-diagonal curvature"):
        jaxinf.arnoldi(2).init(blocked)
    state = jaxinf.arnoldi(2).init(op)
    with pytest.raises(ValueError, match="tree structure"):
        jaxinf.arnoldi(2).solve(state, {"w": p.params["w"]})


# ---------------------------------------------------------------------------
# Projected scoring
# ---------------------------------------------------------------------------


def _naive_scores(solver, state, loss_fn, params, test, train):
    g_test = models.dense_grads(loss_fn, params, test)
    g_train = models.dense_grads(loss_fn, params, train)
    spec = tree_spec(params)
    x = jax.vmap(lambda g: ravel(solver.solve(state, unravel(spec, g))[0]))(g_test)
    return x @ g_train.T


@pytest.mark.parametrize("completion", [False, True])
@pytest.mark.parametrize("n_test", [3, 9])  # smaller and larger than... the other side of the completion
def test_projected_scoring_equals_naive(completion, n_test):
    p = models.mlp_problem("linen", n_train=23, n_test=9)
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, kind="gauss_newton", model_fn=p.model_fn,
                                   output_loss=p.output_loss, damping=0.01)
    solver = jaxinf.arnoldi(8, completion=completion, projection_batch=3)
    state = solver.init(op)
    test = jax.tree.map(lambda a: a[:n_test], p.test)
    train = jax.tree.map(lambda a: a[:5], p.train)
    got = jax.jit(solver.score)(state, op, test, train)
    ref = _naive_scores(solver, state, p.loss_fn, p.params, test, train)
    assert got.shape == (n_test, 5)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12 * float(jnp.max(jnp.abs(ref))))


def test_scoring_uses_model_fn_when_loss_fn_is_missing():
    p = models.mlp_problem("plain")
    op = jaxinf.curvature_operator(None, p.params, p.train, kind="gauss_newton", model_fn=p.model_fn,
                                   output_loss=p.output_loss, damping=0.01)
    solver = jaxinf.arnoldi(5)
    state = solver.init(op)
    got = solver.score(state, op, p.test, p.train)
    np.testing.assert_allclose(got, _naive_scores(solver, state, p.loss_fn, p.params, p.test, p.train), rtol=1e-9)


def test_influence_model_scores_correlate_with_direct():
    p = models.mlp_problem("nnx", n_train=40, n_test=10, hidden=8)
    kw = dict(curvature="gauss_newton", model_fn=p.model_fn, output_loss=p.output_loss, damping=1e-2)
    exact = jaxinf.InfluenceModel(None, p.params, jaxinf.direct(), **kw).fit(p.train)
    n = exact.operator.size
    ref = np.asarray(exact.influences(p.test, p.train)).ravel()
    low = jaxinf.InfluenceModel(None, p.params, jaxinf.arnoldi(n // 3, completion=True), **kw).fit(p.train)
    got = np.asarray(low.influences(p.test, p.train)).ravel()
    assert np.corrcoef(got, ref)[0, 1] > 0.9
    # Through the wrapper the factors path and the scoring path agree.
    factors = low.influence_factors(p.test)
    np.testing.assert_allclose(low.influences_from_factors(factors, p.train).ravel(), got, rtol=1e-8, atol=1e-10)
