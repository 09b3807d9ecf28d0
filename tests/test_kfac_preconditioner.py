"""K-FAC / EK-FAC pre-conditioners of CG, against dense float64 references (``jnp.linalg.solve``, ``direct``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf.core.curvature import to_dense
from jaxinf.core.tree import ravel, ravel_batched, unravel
from tests import models

_dense = jax.jit(to_dense)
PRECONDITIONERS = {"kfac": jaxinf.kfac_preconditioner, "ekfac": jaxinf.ekfac_preconditioner}


def _dense_layer(damping=0.1):
    """One dense layer with a squared error: the Gauss-Newton is exactly ``E[a aᵀ] ⊗ I`` (K-FAC is exact)."""
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (20, 4)) * jnp.array([1.0, 3.0, 0.3, 10.0])  # badly scaled: CG alone needs many
    y = jax.random.normal(ky, (20, 3))
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}

    def model(p, b):
        return b[0] @ p["w"] + p["b"]

    return jaxinf.curvature_operator(
        None, params, (x, y), kind="gauss_newton", model_fn=model, output_loss=models.squared_error, damping=damping
    )


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_exact_kronecker_curvature_converges_at_once(name):
    op = _dense_layer()
    v = unravel(op.spec, jnp.linspace(-1.0, 2.0, op.size))
    dense = np.asarray(_dense(op))  # C + λI
    expected = np.linalg.solve(dense, np.asarray(ravel(v)))
    solver = jaxinf.cg(rtol=1e-12, preconditioner=PRECONDITIONERS[name](fisher="exact"))
    x, info = solver.solve(solver.init(op), v)
    assert bool(info.converged) and int(info.iterations) <= 2
    np.testing.assert_allclose(ravel(x), expected, rtol=1e-10, atol=1e-12)
    plain_x, plain = jaxinf.cg(rtol=1e-12).solve(jaxinf.cg().init(op), v)
    assert int(plain.iterations) > 4 * int(info.iterations)
    # M⁻¹ is then exactly (C + λI)⁻¹
    state = solver.init(op).preconditioner
    apply = PRECONDITIONERS[name]().apply
    inv = np.asarray(jax.vmap(lambda e: ravel(apply(state, unravel(op.spec, e))))(jnp.eye(op.size)))
    np.testing.assert_allclose(inv, np.linalg.inv(dense), rtol=1e-9, atol=1e-12)


def _mlp():
    p = models.mlp_problem("linen", n_train=40, hidden=8)
    op = jaxinf.curvature_operator(
        None, p.params, p.train, kind="gauss_newton", model_fn=p.model_fn, output_loss=p.output_loss, damping=1e-3
    )
    return p, op


def _cnn():
    p = models.cnn_problem(n_train=100, size=4)  # N·(classes − 1) > P: a full-rank curvature
    op = jaxinf.curvature_operator(
        None, p.params, p.train, kind="gauss_newton", model_fn=p.model_fn, output_loss=p.output_loss, damping=1e-3
    )
    return p, op


def _test_grads(p, op):
    return jaxinf.scoring.per_example_grads(p.loss_fn, op.params, p.test)


@pytest.mark.parametrize("problem, name", [("mlp", "ekfac"), ("cnn", "kfac")])
def test_preconditioned_cg_matches_direct_in_fewer_products(problem, name):
    p, op = {"mlp": _mlp, "cnn": _cnn}[problem]()
    grads = _test_grads(p, op)
    direct = jaxinf.direct()
    exact, _ = jax.vmap(direct.solve, in_axes=(None, 0))(direct.init(op), grads)
    plain = jaxinf.cg(rtol=1e-10)
    pre = jaxinf.cg(rtol=1e-10, preconditioner=PRECONDITIONERS[name](fisher="exact"))
    _, plain_info = jax.jit(jax.vmap(plain.solve, in_axes=(None, 0)))(plain.init(op), grads)
    x, info = jax.jit(jax.vmap(pre.solve, in_axes=(None, 0)))(pre.init(op), grads)
    assert bool(jnp.all(info.converged)) and bool(jnp.all(plain_info.converged))
    scale = float(jnp.max(jnp.abs(ravel_batched(exact))))
    np.testing.assert_allclose(ravel_batched(x), ravel_batched(exact), rtol=1e-7, atol=1e-9 * scale)
    # fewer curvature-vector products (one per iteration, plus one for the true residual in both)
    assert int(info.iterations.sum()) < int(plain_info.iterations.sum()), (info.iterations, plain_info.iterations)


def _with_fallback():
    """A dense layer followed by an elementwise scale: ``s`` is a fallback leaf (diagonal or exact block)."""
    kx, ky = jax.random.split(jax.random.key(1))
    x, y = jax.random.normal(kx, (24, 4)), jax.random.normal(ky, (24, 3))
    params = {"w": 0.5 * jnp.ones((4, 3)), "b": jnp.zeros(3), "s": jnp.array([1.0, 2.0, 0.5])}

    def model(p, b):
        return jnp.tanh(b[0] @ p["w"] + p["b"]) * p["s"]

    op = jaxinf.curvature_operator(
        None, params, (x, y), kind="gauss_newton", model_fn=model, output_loss=models.squared_error, damping=1e-2
    )
    return None, op


@pytest.mark.parametrize("name, problem", [("kfac", _mlp), ("ekfac", _mlp), ("ekfac", _with_fallback)])
def test_preconditioner_is_symmetric_positive_definite_and_is_the_solvers_inverse(name, problem):
    _, op = problem()
    pre = PRECONDITIONERS[name](fisher="exact")
    state = jax.jit(pre.init)(op, jax.random.key(0))
    inv = np.asarray(jax.vmap(lambda e: ravel(pre.apply(state, unravel(op.spec, e))))(jnp.eye(op.size)))
    np.testing.assert_allclose(inv, inv.T, atol=1e-12 * np.abs(inv).max())
    assert np.linalg.eigvalsh(0.5 * (inv + inv.T)).min() > 0
    # the same (K + λ)⁻¹ as the solver (with the operator's damping, no heuristic)
    solver = (jaxinf.ekfac if name == "ekfac" else jaxinf.kfac)(fisher="exact", damping_heuristic=None)
    sstate = solver.init(op)
    ref = np.asarray(jax.vmap(lambda e: ravel(solver.solve(sstate, unravel(op.spec, e))[0]))(jnp.eye(op.size)))
    np.testing.assert_allclose(inv, ref, rtol=1e-12, atol=1e-14 * np.abs(ref).max())
    if problem is _with_fallback:
        assert [fb for fb in sstate.tags.fallbacks], "the scale leaf should be a fallback"


def test_influence_model_with_the_preconditioner_matches_direct_and_zero_damping_fails_loudly():
    op = _dense_layer()
    data = next(op.data.batches())
    kw = dict(curvature="gauss_newton", model_fn=op.model_fn, output_loss=op.output_loss)
    solver = jaxinf.cg(rtol=1e-12, preconditioner=jaxinf.ekfac_preconditioner(fisher="exact"))
    got = jaxinf.InfluenceModel(None, op.params, solver, damping=0.1, **kw).fit(data).influences(data, data)
    ref = jaxinf.InfluenceModel(None, op.params, jaxinf.direct(), damping=0.1, **kw).fit(data).influences(data, data)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12 * float(np.max(np.abs(ref))))
    # the model's fit is jitted (damping traced): a zero damping surfaces as CG's divergence, with the advice
    model = jaxinf.InfluenceModel(None, op.params, solver, damping=0.0, **kw).fit(data)
    with pytest.raises(jaxinf.ConvergenceError, match="diverged.*damping"):
        model.influences(data, data)


def test_block_cg_with_the_preconditioner_matches_direct():
    p, op = _cnn()
    grads = _test_grads(p, op)
    direct = jaxinf.direct()
    exact, _ = jax.vmap(direct.solve, in_axes=(None, 0))(direct.init(op), grads)
    plain = jaxinf.cg(rtol=1e-10, block=True, block_size=3)
    pre = jaxinf.cg(rtol=1e-10, block=True, block_size=3, preconditioner=jaxinf.ekfac_preconditioner(fisher="exact"))
    x, info = jax.jit(pre.solve_many)(pre.init(op), grads)
    _, plain_info = jax.jit(plain.solve_many)(plain.init(op), grads)
    assert bool(jnp.all(info.converged))
    scale = float(jnp.max(jnp.abs(ravel_batched(exact))))
    np.testing.assert_allclose(ravel_batched(x), ravel_batched(exact), rtol=1e-7, atol=1e-9 * scale)
    assert int(info.iterations.max()) < int(plain_info.iterations.max())


def test_under_jit_the_fit_and_solve_compile_once_and_traced_zero_damping_diverges():
    _, op = _mlp()
    solver = jaxinf.cg(rtol=1e-10, preconditioner=jaxinf.kfac_preconditioner(fisher="exact"))
    traces = []

    def run(o, v):
        traces.append(1)
        return solver.solve(solver.init(o), v)

    run = jax.jit(run)
    v = unravel(op.spec, jnp.ones(op.size))
    x, info = run(op, v)
    expected = np.linalg.solve(np.asarray(_dense(op)), np.ones(op.size))
    assert bool(info.converged)
    np.testing.assert_allclose(ravel(x), expected, rtol=1e-8)
    x2, _ = run(op.with_damping(1e-2), v)  # new damping: same program
    assert len(traces) == 1
    expected2 = np.linalg.solve(np.asarray(_dense(op.with_damping(1e-2))), np.ones(op.size))
    np.testing.assert_allclose(ravel(x2), expected2, rtol=1e-8)
    # a zero damping seen only under jit cannot raise: the pre-conditioner returns NaN and CG reports divergence
    _, bad = run(op.with_damping(0.0), v)
    assert bool(bad.diverged) and not bool(bad.converged)


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_zero_damping_raises_naming_the_fix(name):
    op = _dense_layer(damping=0.0)
    solver = jaxinf.cg(preconditioner=PRECONDITIONERS[name](fisher="exact"))
    with pytest.raises(ValueError, match=rf"{name}_preconditioner needs damping > 0.*damping=1e-3"):
        solver.init(op)
    blocked = jaxinf.curvature_operator(
        None, op.params, next(op.data.batches()), kind="gauss_newton", model_fn=op.model_fn,
        output_loss=op.output_loss, blocks="parameter", damping={"['b']": 0.1, "['w']": 0.0},
    )
    with pytest.raises(ValueError, match="needs damping > 0"):
        solver.init(blocked)


def test_options_pass_through_and_ineffective_ones_raise():
    p, op = _mlp()
    hess = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=1e-3)  # loss only: no model outputs
    with pytest.raises(ValueError, match="likelihood"):
        jaxinf.cg(preconditioner=jaxinf.kfac_preconditioner(likelihood="categorical")).init(hess)
    with pytest.raises(ValueError, match="num_samples"):
        jaxinf.cg(preconditioner=jaxinf.ekfac_preconditioner(fisher="exact", num_samples=3)).init(op)
    with pytest.raises(ValueError, match="Unknown fisher"):
        jaxinf.kfac_preconditioner(fisher="true")
    with pytest.raises(TypeError, match="damping_heuristic"):
        jaxinf.ekfac_preconditioner(damping_heuristic=0.1)
    # model_fn/output_loss given to the pre-conditioner reach the fit: the Hessian operator gets a sampled Fisher
    pre = jaxinf.ekfac_preconditioner(fisher="exact", model_fn=p.model_fn, output_loss=p.output_loss)
    state = jaxinf.cg(preconditioner=pre).init(hess)
    assert state.preconditioner.kfac.plan.fisher == "exact"
    assert pre.config["fisher"] == "exact" and pre.config["factory"] == "ekfac_preconditioner"


def _dense_of(fn, spec):
    return np.asarray(jax.vmap(lambda e: ravel(fn(unravel(spec, e))))(jnp.eye(spec.size)))


def test_exact_fisher_ekfac_is_the_gauss_newton_projected_on_its_eigenbasis():
    """The curvature the pre-conditioner fits is the one CG solves, at the same scale (mean over examples).

    With ``fisher="exact"`` EK-FAC's eigenvalues are ``diag(Qᵀ C_l Q)`` for each layer block ``C_l`` of the
    Gauss-Newton (George et al. 2018), so ``K`` is the orthogonal projection of ``C_l`` on the matrices
    diagonal in ``Q``: ``⟨K, C_blk − K⟩ = 0`` and ``tr K = tr C_blk``. A sum instead of a mean over examples, the
    empirical Fisher or a wrong damping in ``M`` breaks one of these.
    """
    _, op = _mlp()
    from jaxinf.solvers.kfac import approx_curvature_vp

    state = jax.jit(jaxinf.ekfac_preconditioner(fisher="exact").init)(op, jax.random.key(0)).kfac
    k = _dense_of(lambda v: approx_curvature_vp(state, v), op.spec)
    c = np.asarray(_dense(op.with_damping(0.0)))
    block = np.abs(k) > 0  # the layer blocks (weight with bias) and the fallback blocks
    c_blk = np.where(block, c, 0.0)
    assert block.sum() < 0.8 * block.size  # really block-diagonal: two layers
    np.testing.assert_allclose(np.trace(k), np.trace(c), rtol=1e-10)
    assert abs(np.sum(k * (c_blk - k))) < 1e-10 * np.sum(k * k)
    # ... and the pre-conditioner's M⁻¹ is (K + λI)⁻¹ with the operator's λ
    inv = _dense_of(lambda v: jaxinf.ekfac_preconditioner().apply(
        jaxinf.solvers.kfac_preconditioner.KFACPreconditionerState(state, jnp.asarray(True)), v), op.spec)
    lam = float(op.damping[0])
    np.testing.assert_allclose(inv, np.linalg.inv(k + lam * np.eye(op.size)), rtol=1e-8, atol=1e-10 * np.abs(inv).max())
    # the empirical Fisher is not the Gauss-Newton: the same check fails by far
    emp = jax.jit(jaxinf.ekfac_preconditioner(fisher="empirical").init)(op, jax.random.key(0)).kfac
    k_emp = _dense_of(lambda v: approx_curvature_vp(emp, v), op.spec)
    assert abs(np.sum(k_emp * (c_blk - k_emp))) > 1e-3 * np.sum(k_emp * k_emp)


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_damping_multiple_damps_only_the_preconditioner(name):
    _, op = _mlp()
    multiple = 10.0
    pre = PRECONDITIONERS[name](fisher="exact", damping_multiple=multiple)
    assert pre.name == f"{name}(damping×10)" and pre.config["damping_multiple"] == multiple
    state = jax.jit(pre.init)(op, jax.random.key(0))
    from jaxinf.solvers.kfac import approx_curvature_vp

    k = _dense_of(lambda v: approx_curvature_vp(state.kfac, v), op.spec)  # undamped K
    inv = _dense_of(lambda v: pre.apply(state, v), op.spec)
    lam = float(op.damping[0])
    ref = np.linalg.inv(k + multiple * lam * np.eye(op.size))
    np.testing.assert_allclose(inv, ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())
    # CG's answer is still (C + λI)⁻¹ v, under jit
    solver = jaxinf.cg(rtol=1e-11, preconditioner=pre)
    v = unravel(op.spec, jnp.linspace(-1.0, 1.0, op.size))
    x, info = jax.jit(lambda o, b: solver.solve(solver.init(o), b))(op, v)
    assert bool(info.converged)
    np.testing.assert_allclose(ravel(x), np.linalg.solve(np.asarray(_dense(op)), np.asarray(ravel(v))), rtol=1e-8)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "10"])
def test_bad_damping_multiple_raises(bad):
    with pytest.raises(ValueError, match="damping_multiple must be a finite number > 0"):
        jaxinf.kfac_preconditioner(damping_multiple=bad)
