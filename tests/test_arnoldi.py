"""Arnoldi low-rank solver and projected scoring, against dense float64 references.

Problems are built once per module (``functools.cache``) so that compiled
functions are reused across tests.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf.core.curvature import to_dense
from jaxinf.core.tree import ravel, tree_spec, unravel_batched
from jaxinf.solvers.lowrank import lowrank_solve, with_damping
from tests import models


@functools.cache
def _mlp():
    return models.mlp_problem("plain")


@functools.cache
def _hessian_op():
    p = _mlp()
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.1)
    return op, np.asarray(to_dense(op))


def _rhs(params, k, seed=0):
    spec = tree_spec(params)
    return unravel_batched(spec, jax.random.normal(jax.random.key(seed), (k, spec.size), spec.dtype))


@jax.jit
def _flat_solves(state, rhs):
    x, info = jax.vmap(lowrank_solve, in_axes=(None, 0))(state, rhs)
    return jax.vmap(ravel)(x), info


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def _quadratic(diag, damping):
    """Operator of the loss ``0.5 wᵀ diag(a) w`` (data-independent Hessian ``diag(a)``)."""
    a = jnp.asarray(diag, jnp.float64)

    def loss(w, batch):
        return 0.5 * jnp.sum(a * w * w) + 0.0 * jnp.mean(batch)

    return jaxinf.curvature_operator(loss, jnp.ones(a.shape[0]), jnp.ones((3, 1)), damping=damping)


def test_full_rank_reproduces_direct_on_indefinite_hessian():
    op, dense = _hessian_op()
    assert np.linalg.eigvalsh(dense)[0] < 0  # the test exercises negative eigenvalues
    n = op.size
    rhs = _rhs(_mlp().params, n + 5)  # more right-hand sides than parameters
    b = np.asarray(jax.vmap(ravel)(rhs))
    ref = np.linalg.solve(dense, b.T).T
    direct = jaxinf.direct()
    x_direct, _ = jax.vmap(direct.solve, in_axes=(None, 0))(direct.init(op), rhs)
    for completion in (False, True):
        solver = jaxinf.arnoldi(n, krylov_dim=n, completion=completion)
        state = solver.init(op, key=jax.random.key(1))
        with pytest.warns(UserWarning, match="negative"):
            solver.validate(state)
        x, info = _flat_solves(state, rhs)
        assert _rel(x, ref) <= 1e-8
        assert _rel(x, np.asarray(jax.vmap(ravel)(x_direct))) <= 1e-8
        assert bool(jnp.all(info.converged)) and not bool(jnp.any(info.diverged))
    np.testing.assert_allclose(state.basis.T @ state.basis, np.eye(n), atol=1e-12)


def test_top_eigenvalues_match_eigh_and_woodbury_completion():
    op, dense = _hessian_op()
    w, q = np.linalg.eigh(dense - 0.1 * np.eye(op.size))
    top = np.argsort(-np.abs(w))[:6]
    state = jaxinf.arnoldi(6, krylov_dim=30).init(op, key=jax.random.key(0))
    np.testing.assert_allclose(state.raw_eigvals, w[top], rtol=1e-8)
    overlap = np.abs(np.sum(np.asarray(state.basis) * q[:, top], axis=0))  # Ritz vectors, up to sign
    np.testing.assert_allclose(overlap, 1.0, atol=1e-6)
    assert float(jnp.max(state.extras["ritz_residuals"])) < 1e-6
    # Completion: the exact inverse of the damped low-rank model V D Vᵀ + λI.
    state = dataclasses.replace(state, completion=True)
    v, d = np.asarray(state.basis), np.asarray(state.eigvals)
    b = np.asarray(jax.random.normal(jax.random.key(5), (4, op.size)))
    x, info = _flat_solves(state, unravel_batched(op.spec, jnp.asarray(b)))
    np.testing.assert_allclose(x, np.linalg.solve((v * d) @ v.T + 0.1 * np.eye(op.size), b.T).T, rtol=1e-10)
    # residual_norm is the part of the right-hand side outside the basis.
    np.testing.assert_allclose(info.residual_norm, np.linalg.norm(b - (b @ v) @ v.T, axis=1), rtol=1e-10)


def test_low_rank_fisher_breakdown_restart_and_exact_woodbury():
    # Empirical Fisher of 4 examples: rank <= 4, the Krylov space is invariant after 5 steps.
    p = _mlp()
    data = jax.tree.map(lambda a: a[:4], p.train)
    op = jaxinf.curvature_operator(p.loss_fn, p.params, data, kind="fisher", damping=1e-2)
    solver = jaxinf.arnoldi(4, krylov_dim=12, completion=True)
    state = solver.init(op, key=jax.random.key(3))
    solver.validate(state)
    assert int(state.extras["breakdowns"]) >= 1
    np.testing.assert_allclose(state.basis.T @ state.basis, np.eye(4), atol=1e-12)
    rhs = _rhs(p.params, 3)
    x, info = _flat_solves(state, rhs)
    assert _rel(x, np.linalg.solve(to_dense(op), np.asarray(jax.vmap(ravel)(rhs)).T).T) <= 1e-8
    assert bool(jnp.all(info.converged))


def test_ragged_batches_jit_and_no_retrace():
    p = _mlp()
    batches = [jax.tree.map(lambda a, s=s: a[s : s + 8], p.train) for s in (0, 8, 16)]  # 8, 8, 7
    kw = dict(kind="gauss_newton", model_fn=p.model_fn, output_loss=p.output_loss, damping=1e-3)
    op_ragged = jaxinf.curvature_operator(p.loss_fn, p.params, batches, **kw)
    op_full = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, **kw)
    solver = jaxinf.arnoldi(10, krylov_dim=op_full.size)
    state = jax.jit(solver.init)(op_ragged, key=jax.random.key(0))
    ref_state = solver.init(op_full, key=jax.random.key(0))
    np.testing.assert_allclose(state.eigvals, ref_state.eigvals, rtol=1e-9)
    solve = jax.jit(solver.solve)
    rhs = _rhs(p.params, 2)
    x0, _ = solve(state, jax.tree.map(lambda a: a[0], rhs))
    compiled = solve._cache_size()  # jit caches per function: other tests may have compiled lowrank_solve too
    solve(state, jax.tree.map(lambda a: a[1], rhs))
    assert solve._cache_size() == compiled
    xr, _ = solve(ref_state, jax.tree.map(lambda a: a[0], rhs))
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
    dense = np.asarray(to_dense(jaxinf.curvature_operator(p64.loss_fn, p64.params, p64.train, damping=0.1)))
    ref = np.linalg.solve(dense, np.ones(n))
    # float32: Ritz values carry errors ~ sqrt(p) eps ||C||, amplified by 1/λ_min(C + λ).
    bound = 10 * np.sqrt(n) * np.finfo(np.float32).eps * np.linalg.norm(dense, 2) / np.linalg.eigvalsh(dense)[0]
    assert _rel(np.asarray(ravel(x), np.float64), ref) < bound
    assert bool(info.converged)


@pytest.mark.parametrize(
    "negative, expected",
    [("keep", [3.0, -2.0, 1.0]), ("abs", [3.0, 2.0, 1.0]), ("clip", [3.0, 1.0, 0.5])],
)
def test_negative_eigenvalue_treatments(negative, expected):
    op = _quadratic([3.0, -2.0, 1.0, 0.5, 0.1], damping=0.5)
    solver = jaxinf.arnoldi(3, krylov_dim=5, negative=negative, completion=False)  # span only: 0 off the basis
    state = solver.init(op, key=jax.random.key(0))
    np.testing.assert_allclose(state.eigvals, expected, atol=1e-12)
    if negative == "clip":
        solver.validate(state)  # the selected eigenvalues are all positive: no warning
    else:
        with pytest.warns(UserWarning, match="negative") as record:
            solver.validate(state)
        # keep: D + λ = -1.5 < 0 gets its own warning.
        assert any("D + λ < 0" in str(r.message) for r in record) == (negative == "keep")
    x, info = solver.solve(state, jnp.ones(5))
    ref = np.zeros(5)
    ref[{"keep": [0, 1, 2], "abs": [0, 1, 2], "clip": [0, 2, 3]}[negative]] = 1.0 / (np.asarray(expected) + 0.5)
    np.testing.assert_allclose(x, ref, atol=1e-12)
    assert bool(info.converged)


def test_singular_shifted_eigenvalue_is_not_inverted():
    op = _quadratic([3.0, -2.0, 1.0], damping=2.0)  # D + λ = 0 for D = -2
    solver = jaxinf.arnoldi(3, krylov_dim=3)
    state = solver.init(op)
    with pytest.raises(ValueError, match="singular"):
        solver.validate(state)
    x, info = solver.solve(state, jnp.ones(3))
    assert not bool(info.converged)
    np.testing.assert_allclose(x, [0.2, 0.0, 1 / 3], atol=1e-12)  # the singular direction gets 0, not 1/0
    # negative="clip" keeps the PSD part: nothing singular, no warning.
    clipped = jaxinf.arnoldi(2, krylov_dim=3, negative="clip", completion=False)
    state = clipped.init(op)
    clipped.validate(state)
    np.testing.assert_allclose(clipped.solve(state, jnp.ones(3))[0], [0.2, 0.0, 1 / 3], atol=1e-12)


def test_zero_damping_with_completion_raises_and_flags():
    op = _quadratic([3.0, 1.0, 0.5, 0.1], damping=0.0)
    solver = jaxinf.arnoldi(2, krylov_dim=4, completion=True)
    with pytest.raises(ValueError, match=r"completion=True.*damping > 0.*completion='auto'"):
        solver.init(op)  # a concrete damping: at once
    state = jax.jit(solver.init)(op)  # traced: validate raises, the solve flags
    with pytest.raises(ValueError, match="completion.*damping > 0"):
        solver.validate(state)
    x, info = solver.solve(state, jnp.ones(4))
    assert not bool(info.converged) and np.all(np.isfinite(x))
    state = with_damping(state, 0.5)  # no new curvature products
    solver.validate(state)
    x, info = solver.solve(state, jnp.ones(4))
    np.testing.assert_allclose(x, [1 / 3.5, 1 / 1.5, 2.0, 2.0], rtol=1e-12)
    assert bool(info.converged)


def test_completion_auto_is_the_default_and_on_exactly_when_damping_is_positive():
    """``completion="auto"``: the Woodbury term for λ > 0; at λ = 0 (concrete or traced) the span-only solve."""
    rhs = jnp.ones(4)
    auto = jaxinf.arnoldi(2, krylov_dim=4)
    assert auto.config["completion"] == "auto"
    span = jaxinf.arnoldi(2, krylov_dim=4, completion=False)
    op = _quadratic([3.0, 1.0, 0.5, 0.1], damping=0.5)
    for init in (auto.init, jax.jit(auto.init)):
        state = init(op)
        assert state.completion
        auto.validate(state)
        x, info = jax.jit(auto.solve)(state, rhs)
        np.testing.assert_allclose(x, [1 / 3.5, 1 / 1.5, 2.0, 2.0], rtol=1e-12)  # (V D Vᵀ + λI)⁻¹ 1
        assert bool(info.converged)
    zero = _quadratic([3.0, 1.0, 0.5, 0.1], damping=0.0)
    assert not auto.init(zero).completion  # concrete λ = 0: decided in init, recorded in the state
    traced = jax.jit(auto.init)(zero)
    assert traced.completion  # traced λ: gated in the solve, the scores and validate
    for state in (auto.init(zero), traced):
        auto.validate(state)  # no error: the completion is off at λ = 0
        x, info = jax.jit(auto.solve)(state, rhs)
        np.testing.assert_allclose(x, span.solve(span.init(zero), rhs)[0], rtol=1e-12)
        np.testing.assert_allclose(x, [1 / 3, 1.0, 0.0, 0.0], rtol=1e-12, atol=1e-12)
        assert bool(info.converged)
    with pytest.raises(ValueError, match="completion must be 'auto', True or False"):
        jaxinf.arnoldi(2, completion="yes")


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_influence_model_default_completion_scores(damping):
    """Through InfluenceModel (a jitted init: traced damping) the default gives the completed scores for λ > 0
    and the span-only scores at λ = 0, never NaN or an error."""
    p = _mlp()
    kw = dict(curvature="gauss_newton", model_fn=p.model_fn, output_loss=p.output_loss, damping=damping)
    got = jaxinf.InfluenceModel(None, p.params, jaxinf.arnoldi(6), **kw).fit(p.train).influences(p.test, p.train)
    ref = jaxinf.InfluenceModel(None, p.params, jaxinf.arnoldi(6, completion=damping > 0), **kw)
    ref = ref.fit(p.train).influences(p.test, p.train)
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12 * float(np.max(np.abs(ref))))


def test_configuration_errors():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        jaxinf.arnoldi(0)
    with pytest.raises(ValueError, match="krylov_dim .* must be >= rank"):
        jaxinf.arnoldi(5, krylov_dim=3)
    with pytest.raises(ValueError, match="negative must be one of"):
        jaxinf.arnoldi(2, negative="flip")
    with pytest.raises(ValueError, match="positive int"):
        jaxinf.arnoldi(2.5)
    op = _quadratic([3.0, 1.0, 0.5], damping=0.1)
    with pytest.raises(ValueError, match="exceeds the number of parameters"):
        jaxinf.arnoldi(4).init(op)
    with pytest.raises(ValueError, match="krylov_dim .* exceeds"):
        jaxinf.arnoldi(2, krylov_dim=4).init(op)
    p = models.logistic_problem()
    blocked = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.1, blocks="parameter")
    with pytest.raises(ValueError, match="block-diagonal curvature"):
        jaxinf.arnoldi(2).init(blocked)
    state = jaxinf.arnoldi(2, krylov_dim=3).init(op)
    with pytest.raises(ValueError, match="tree structure"):
        jaxinf.arnoldi(2).solve(state, (jnp.ones(3),))


# ---------------------------------------------------------------------------
# Projected scoring
# ---------------------------------------------------------------------------


def test_projected_scoring_equals_naive_per_example_gradients():
    p = _mlp()
    # loss_fn=None: scoring rebuilds the loss from model_fn and output_loss.
    op = jaxinf.curvature_operator(
        None, p.params, p.train, kind="gauss_newton", model_fn=p.model_fn, output_loss=p.output_loss, damping=0.01
    )
    solver = jaxinf.arnoldi(8, projection_batch=3)
    state = solver.init(op)
    v, d = np.asarray(state.basis), np.asarray(state.eigvals)
    score = jax.jit(solver.score)
    train = jax.tree.map(lambda a: a[:4], p.train)
    g_train = np.asarray(models.dense_grads(p.loss_fn, p.params, train))
    for completion, n_test in [(False, 5), (True, 2), (True, 5)]:  # completion on the test side, then train side
        test = jax.tree.map(lambda a, n=n_test: a[:n], p.test)
        g_test = np.asarray(models.dense_grads(p.loss_fn, p.params, test))
        inverse = (v / (d + 0.01)) @ v.T + (np.eye(op.size) - v @ v.T) / 0.01 * completion
        ref = g_test @ inverse @ g_train.T
        got = score(dataclasses.replace(state, completion=completion), op, test, train)
        assert got.shape == (n_test, 4)
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12 * np.max(np.abs(ref)))


@pytest.mark.parametrize("name", ["arnoldi", "nystrom"])
def test_influence_model_scores_correlate_with_direct(name):
    p = models.mlp_problem("nnx", n_train=40, n_test=10, hidden=8)  # p = 58, GGN of rank 58
    kw = dict(curvature="gauss_newton", model_fn=p.model_fn, output_loss=p.output_loss, damping=0.1)
    ref = np.asarray(
        jaxinf.InfluenceModel(None, p.params, jaxinf.direct(), **kw).fit(p.train).influences(p.test, p.train)
    ).ravel()
    solver = {"arnoldi": jaxinf.arnoldi(20, completion=True), "nystrom": jaxinf.nystrom(20)}[name]
    model = jaxinf.InfluenceModel(None, p.params, solver, **kw).fit(p.train, key=jax.random.key(0))
    got = np.asarray(model.influences(p.test, p.train)).ravel()
    assert np.corrcoef(got, ref)[0, 1] > 0.95  # measured: 0.999 (arnoldi), 0.99 (nystrom)
    # Through the wrapper, the projected scores equal factors contracted with training gradients.
    factors = model.influence_factors(p.test)
    np.testing.assert_allclose(
        model.influences_from_factors(factors, p.train).ravel(), got, rtol=1e-8, atol=1e-10 * np.max(np.abs(got))
    )


def test_fit_traces_the_curvature_product_a_fixed_number_of_times_and_refits_without_compiling():
    """Issue 15 (``arnoldi(100)`` with the Hessian of a CNN, slower than its product count): the Krylov steps run
    in one compiled loop, so the curvature product (here: the loss) is traced as often for 4 steps as for 16, not
    once per step, and a refit on new data of the same shapes traces and compiles nothing. A Python loop over the
    steps, or a retrace per fit, fails this without timing anything."""
    from jaxinf.solvers.arnoldi import _fit

    p = models.cnn_problem(n_train=12)
    traces = []

    def loss(params, batch):
        traces.append(1)  # runs only while jax traces it
        return p.loss_fn(params, batch)

    counts = {}
    for m in (4, 16):
        op = jaxinf.curvature_operator(loss, p.params, p.train, damping=0.1)
        traces.clear()
        jaxinf.arnoldi(2, krylov_dim=m).init(op, key=jax.random.key(0))
        counts[m] = len(traces)
    assert counts[4] == counts[16] and 0 < counts[16] <= 2, counts
    x, y = p.train
    op = jaxinf.curvature_operator(loss, p.params, (x + 0.5, y), damping=0.2)
    compiled = _fit._cache_size()
    traces.clear()
    state = jaxinf.arnoldi(2, krylov_dim=16).init(op, key=jax.random.key(1))
    assert traces == [] and _fit._cache_size() == compiled
    assert state.products == 16
