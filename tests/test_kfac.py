"""K-FAC / EK-FAC: exact identities, the eigenvalue correction, solves, layer-wise scores, damping, errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jaxinf
from jaxinf.solvers.kfac import approx_curvature_vp, ekfac, influences_by_layer, kfac
from tests import models

TOL = 1e-10


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def dense_matrix(linear_map, params):
    """The matrix of a params -> params linear map, in ravel order."""
    flat, unravel = ravel_pytree(params)
    cols = jax.jit(jax.vmap(lambda e: ravel_pytree(linear_map(unravel(e)))[0]))(jnp.eye(flat.size, dtype=flat.dtype))
    return cols.T


def dense_ggn(p, batch):
    """Reference Gauss-Newton ``mean_i J_iᵀ H_i J_i`` over the examples of ``batch`` (ravel order)."""
    flat, unravel = ravel_pytree(p.params)
    _, unravel_out = ravel_pytree(p.model_fn(p.params, jax.tree.map(lambda a: a[:1], batch)))

    def per_example(example):
        b1 = jax.tree.map(lambda a: a[None], example)

        def outputs(w):
            return ravel_pytree(p.model_fn(unravel(w), b1))[0]

        jac = jax.jacrev(outputs)(flat)
        hess = jax.hessian(lambda o: p.output_loss(unravel_out(o), b1))(outputs(flat))
        return jac.T @ hess @ jac

    return jax.jit(lambda b: jnp.mean(jax.vmap(per_example)(b), axis=0))(batch)


def dense_fisher(loss_fn, params, batch):
    """Reference empirical Fisher ``mean_i g_i g_iᵀ``."""
    g = models.dense_grads(loss_fn, params, batch)
    return g.T @ g / g.shape[0]


def layer_index_matrix(layer, params):
    """Flat (ravel-order) parameter index of every entry of the layer's canonical ``(rows, d_out)`` matrix."""
    leaves = jax.tree.leaves(params)
    starts = np.cumsum([0] + [x.size for x in leaves])
    idx = [np.arange(starts[i], starts[i + 1]).reshape(leaves[i].shape) for i in range(len(leaves))]  # host
    return np.asarray(layer.to_matrix(idx))


def rotated_diagonal(state, i, curvature, params):
    """``diag((Q_A ⊗ Q_G)ᵀ C_layer (Q_A ⊗ Q_G))`` as a ``(rows, d_out)`` grid."""
    layer = state.tags.layers[i]
    idx = layer_index_matrix(layer, params)
    block = curvature[np.ix_(idx.ravel(), idx.ravel())].reshape(*idx.shape, *idx.shape)
    qa, qg = state.eigvecs_a[i], state.eigvecs_g[i]
    qa = jnp.eye(idx.shape[0], dtype=qg.dtype) if qa is None else qa  # one-hot inputs: the identity
    return jnp.einsum("ai,bj,abcd,ci,dj->ij", qa, qg, block, qa, qg)


def gn_operator(p, damping=0.0, data=None, **kw):
    return jaxinf.curvature_operator(
        p.loss_fn,
        p.params,
        p.train if data is None else data,
        kind="gauss_newton",
        model_fn=p.model_fn,
        output_loss=p.output_loss,
        damping=damping,
        **kw,
    )


class ClassifierMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(8)(x))
        x = nn.tanh(nn.Dense(8)(x))
        return nn.Dense(3)(x)


class ClassifierCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(3, (3, 3), padding="SAME")(x))
        x = nn.tanh(nn.Conv(3, (3, 3), strides=2, padding="VALID")(x))
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def classifier_problem(kind, n_train=48, n_test=6, seed=0):
    """A softmax classifier (Linen MLP or two-conv CNN) on labels drawn from a random teacher."""
    kx, kw, ky = jax.random.split(jax.random.key(seed), 3)
    n = n_train + n_test
    if kind == "mlp":
        x = jax.random.normal(kx, (n, 5))
        module, logits = ClassifierMLP(), x @ jax.random.normal(kw, (5, 3))
    else:
        x = jax.random.normal(kx, (n, 5, 5, 2))
        module, logits = ClassifierCNN(), x.reshape(n, -1) @ jax.random.normal(kw, (50, 3)) / 3
    y = jax.random.categorical(ky, 2 * logits)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), jax.jit(module.init)(jax.random.key(seed + 1), x[:1]))

    def model_fn(p, b):
        return module.apply(p, b[0])

    def loss_fn(p, b):
        return models.softmax_cross_entropy(model_fn(p, b), b)

    return models.Problem(
        loss_fn, params, (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:]), model_fn, models.softmax_cross_entropy
    )


def gradients_of_points(p):
    """Dense per-example gradients of the test and training points (one compiled pass)."""
    n_test = jax.tree.leaves(p.test)[0].shape[0]
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), p.test, p.train)
    g = jax.jit(lambda b: models.dense_grads(p.loss_fn, p.params, b))(both)
    return g[:n_test], g[n_test:]


def reference_scores(p, curvature, damping):
    tg, trg = gradients_of_points(p)
    return tg @ jnp.linalg.solve(curvature + damping * jnp.eye(curvature.shape[0]), trg.T)


def kfac_scores_by_solve(solver, state, p):
    """``solve`` on each test gradient, contracted with dense per-example training gradients."""
    _, unravel = ravel_pytree(p.params)
    tg, trg = gradients_of_points(p)
    x = jax.jit(jax.vmap(lambda g: ravel_pytree(solver.solve(state, unravel(g))[0])[0]))(tg)
    return x @ trg.T


# ----------------------------------------------------------------------------
# Exact identities
# ----------------------------------------------------------------------------


def _single_dense(n=40, d=4, seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, d))
    y = jax.random.normal(ky, (n, 1))
    params = {"w": 0.3 * jnp.ones((d, 1)), "b": jnp.array([0.2])}

    def model_fn(p, b):
        return b[0] @ p["w"] + p["b"]

    def loss_fn(p, b):
        return models.squared_error(model_fn(p, b), b)

    return models.Problem(loss_fn, params, (x, y), None, model_fn, models.squared_error)


def test_single_dense_layer_one_output_is_exact():
    """Squared error with one output: GGN = E[x̃ x̃ᵀ] ⊗ 1 = A ⊗ G exactly (ragged batches, weighted by size)."""
    p = _single_dense()
    x, y = p.train
    data = [(x[:16], y[:16]), (x[16:32], y[16:32]), (x[32:], y[32:])]  # 16, 16, 8
    op = gn_operator(p, data=data)
    exact = dense_ggn(p, p.train)
    for make in (kfac, ekfac):
        state = make(fisher="exact").init(op)
        approx = dense_matrix(lambda v, s=state: approx_curvature_vp(s, v), p.params)
        np.testing.assert_allclose(approx, exact, atol=TOL, rtol=0)


def test_linear_softmax_with_constant_output_hessian_is_exact():
    """Zero weights: every example has H_out = diag(p) - ppᵀ with p uniform, so the GGN factorises exactly."""
    p = models.logistic_problem(n_train=20, d=3, classes=4)
    params = jax.tree.map(jnp.zeros_like, p.params)
    p = p._replace(params=params)
    op = gn_operator(p)
    exact = dense_ggn(p, p.train)
    for likelihood in (None, "categorical"):
        state = kfac(fisher="exact", likelihood=likelihood).init(op)
        approx = dense_matrix(lambda v, s=state: approx_curvature_vp(s, v), params)
        np.testing.assert_allclose(approx, exact, atol=TOL, rtol=0)


def test_ekfac_empirical_fisher_with_penalty_and_fallback():
    """Empirical mode against the empirical-Fisher operator, with an L2 penalty (a non-layer use)."""
    p = models.logistic_problem(n_train=15, l2=0.3)
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, kind="fisher")
    state = ekfac().init(op)  # auto -> empirical for a Fisher operator
    assert state.plan.fisher == "empirical"
    assert state.tags.layers[0].other_uses
    curvature = dense_fisher(p.loss_fn, p.params, p.train)
    np.testing.assert_allclose(state.eigvals[0], rotated_diagonal(state, 0, curvature, p.params), atol=TOL, rtol=0)


def test_conv_factors_match_explicit_im2col():
    """A and G of a strided, padded NHWC convolution against numpy im2col and autodiff output gradients."""
    k = jax.random.split(jax.random.key(3), 4)
    params = {
        "k": 0.5 * jax.random.normal(k[0], (3, 3, 2, 4)),  # HWIO
        "b": jnp.array([0.1, -0.2, 0.3, 0.0]),
        "w": 0.3 * jax.random.normal(k[1], (36, 3)),
    }
    x = jax.random.normal(k[2], (7, 6, 6, 2))
    y = jax.random.randint(k[3], (7,), 0, 3)

    def conv(p, images):
        z = jax.lax.conv_general_dilated(
            images, p["k"], (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return z + p["b"]

    def head(p, z, labels):
        logits = jnp.tanh(z).reshape((z.shape[0], -1)) @ p["w"]
        return models.softmax_cross_entropy(logits, (None, labels))

    def loss_fn(p, b):
        return head(p, conv(p, b[0]), b[1])

    op = jaxinf.curvature_operator(loss_fn, params, (x, y), kind="fisher")
    state = kfac(fisher="empirical").init(op)
    layer_ids = {state.tags.paths[layer.weight]: i for i, layer in enumerate(state.tags.layers)}
    i = layer_ids["['k']"]

    xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = []
    for n in range(x.shape[0]):
        rows = []
        for r in range(3):
            for c in range(3):
                patch = xp[n, 2 * r : 2 * r + 3, 2 * c : 2 * c + 3, :]  # (kh, kw, c_in)
                rows.append(np.concatenate([patch.transpose(2, 0, 1).ravel(), [1.0]]))  # (c_in, kh, kw) + bias
        patches.append(rows)
    a = np.asarray(patches)  # (n, T, d_in + 1)
    a_ref = np.einsum("nti,ntj->ij", a, a) / x.shape[0]
    z = conv(params, x)
    g = jax.vmap(jax.grad(lambda zi, yi: head(params, zi[None], yi[None])))(z, y).reshape(x.shape[0], 9, 4)
    g_ref = np.einsum("nto,ntp->op", g, g) / (x.shape[0] * 9)
    np.testing.assert_allclose(state.factors_a[i], a_ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(state.factors_g[i], g_ref, atol=TOL, rtol=0)
    # the kernel canonical layout is (c_in, kh, kw) x c_out
    assert state.tags.layers[i].canon.perm == (2, 0, 1, 3)


def test_layers_inside_scan_fit_and_identity():
    """An RNN: the recurrent weight inside lax.scan is a repeated layer; EK-FAC's Λ identity still holds."""
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "w": 0.5 * jax.random.normal(k[0], (3, 3)),
        "u": jax.random.normal(k[1], (2, 3)),
        "v": jax.random.normal(k[2], (3, 1)),
    }
    xs = jax.random.normal(k[3], (10, 4, 2))
    ys = jnp.sum(xs, axis=(1, 2))[:, None]

    def loss_fn(p, b):
        def step(h, x_t):
            return jnp.tanh(h @ p["w"] + x_t @ p["u"]), None

        h, _ = jax.lax.scan(step, jnp.zeros((b[0].shape[0], 3)), jnp.swapaxes(b[0], 0, 1))
        return jnp.mean((h @ p["v"] - b[1]) ** 2)

    op = jaxinf.curvature_operator(loss_fn, params, (xs, ys), kind="fisher")
    state = ekfac().init(op)
    curvature = dense_fisher(loss_fn, params, (xs, ys))
    assert len(state.tags.layers) == 3
    for i in range(3):
        np.testing.assert_allclose(state.eigvals[i], rotated_diagonal(state, i, curvature, params), atol=TOL, rtol=0)


# ----------------------------------------------------------------------------
# Solves and scores
# ----------------------------------------------------------------------------


def test_solve_inverts_the_damped_approximation_jit_vmap_many_rhs():
    p = models.mlp_problem("nnx")
    op = gn_operator(p, damping=0.05)
    solver = ekfac(fisher="exact")
    state = solver.init(op)
    solver.validate(state)
    size = ravel_pytree(p.params)[0].size
    _, unravel = ravel_pytree(p.params)
    rhs = jax.random.normal(jax.random.key(1), (size + 3, size))  # more right-hand sides than parameters
    v_tree = jax.vmap(unravel)(rhs)
    x, info = jax.jit(jax.vmap(solver.solve, in_axes=(None, 0)))(state, v_tree)
    assert bool(jnp.all(info.converged)) and not bool(jnp.any(info.diverged))
    assert float(jnp.max(info.residual_norm)) < 1e-9
    back = jax.jit(jax.vmap(lambda xi: approx_curvature_vp(state, xi, damped=True)))(x)
    np.testing.assert_allclose(jax.vmap(lambda t: ravel_pytree(t)[0])(back), rhs, atol=TOL, rtol=0)
    one, _ = solver.solve(state, jax.tree.map(lambda a: a[-1], v_tree))
    np.testing.assert_allclose(ravel_pytree(one)[0], ravel_pytree(jax.tree.map(lambda a: a[-1], x))[0], atol=TOL)


@pytest.fixture(scope="module")
def plain_kfac():
    """K-FAC (exact Fisher) fitted on the plain-JAX MLP at damping 0.1, shared by several tests."""
    p = models.mlp_problem("plain")
    op = gn_operator(p, damping=0.1)
    solver = kfac(fisher="exact")
    return p, op, solver, solver.init(op)


def test_solve_compiles_once(plain_kfac):
    p, _, solver, state = plain_kfac
    traces = []

    def counted(s, v):
        traces.append(1)
        return solver.solve(s, v)

    jitted = jax.jit(counted)
    jitted(state, p.params)
    jitted(state, jax.tree.map(lambda a: a + 1.0, p.params))
    assert len(traces) == 1


def test_layerwise_scores_equal_solve_then_contract():
    """Both score paths (contraction for one test point; per-example matrices for a CNN with several) against
    solve + dense per-example gradients."""
    p = models.cnn_problem(n_train=8, n_test=3)
    op = gn_operator(p, damping=0.01)
    solver = ekfac(fisher="exact")
    state = solver.init(op)
    for n_test in (1, 3):
        q = p._replace(test=jax.tree.map(lambda a, k=n_test: a[:k], p.test))
        parts = influences_by_layer(state, op, q.test, q.train)
        assert set(parts) == {layer.name for layer in state.tags.layers}
        np.testing.assert_allclose(sum(parts.values()), kfac_scores_by_solve(solver, state, q), atol=TOL, rtol=0)
    np.testing.assert_allclose(solver.score(state, op, q.test, q.train), sum(parts.values()), atol=TOL, rtol=0)


def test_scores_with_fallback_leaves_and_penalty():
    p = models.logistic_problem(n_train=12, l2=0.2)
    params = dict(p.params, scale=jnp.array(1.5))

    def model_fn(q, b):
        return q["scale"] * (b[0] @ q["w"] + q["b"])

    def loss_fn(q, b):
        reg = 0.1 * jnp.sum(q["w"] ** 2)
        return models.softmax_cross_entropy(model_fn(q, b), b) + reg

    q = models.Problem(loss_fn, params, p.train, p.test, model_fn, models.softmax_cross_entropy)
    op = gn_operator(q, damping=0.01)
    solver = kfac(fisher="exact")
    state = solver.init(op)
    assert [state.tags.paths[f.leaf] for f in state.tags.fallbacks] == ["['scale']"]
    assert state.plan.score.tags.layers[0].other_uses  # the penalty appears in the loss only
    parts = influences_by_layer(state, op, q.test, q.train)
    assert "['scale']" in parts
    np.testing.assert_allclose(
        solver.score(state, op, q.test, q.train), kfac_scores_by_solve(solver, state, q), atol=TOL, rtol=0
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ekfac_identity_and_correlation_with_direct(kind):
    """EK-FAC's Λ is diag((Q_A ⊗ Q_G)ᵀ C (Q_A ⊗ Q_G)) per layer exactly, and its scores correlate with the exact
    Gauss-Newton influence at least as well as K-FAC's (damping 0.1 × mean eigenvalue of C)."""
    p = classifier_problem(kind)
    curvature = dense_ggn(p, p.train)
    damping = 0.1 * float(jnp.trace(curvature)) / curvature.shape[0]
    op = gn_operator(p, damping=damping)
    ref = reference_scores(p, curvature, damping)
    corr = {}
    for make in (kfac, ekfac):
        solver = make(fisher="exact")
        state = solver.init(op)
        corr[solver.name] = np.corrcoef(ref.ravel(), solver.score(state, op, p.test, p.train).ravel())[0, 1]
    assert len(state.tags.layers) == 3 and not state.tags.fallbacks
    for i in range(3):
        np.testing.assert_allclose(state.eigvals[i], rotated_diagonal(state, i, curvature, p.params), atol=TOL, rtol=0)
    assert corr["ekfac"] >= corr["kfac"] > 0.5, corr


# ----------------------------------------------------------------------------
# Fisher modes, sampling, damping, dtypes
# ----------------------------------------------------------------------------


def test_sampled_factors_approach_the_exact_ones():
    p = models.logistic_problem(n_train=30, d=3, classes=3)
    op = gn_operator(p)
    exact = kfac(fisher="exact").init(op)
    n = 30
    for likelihood in (None, "categorical"):
        sampled = kfac(fisher="sampled", likelihood=likelihood, num_samples=400).init(op, key=jax.random.key(7))
        np.testing.assert_allclose(sampled.factors_a[0], exact.factors_a[0], atol=TOL, rtol=0)  # A has no sampling
        err = jnp.linalg.norm(sampled.factors_g[0] - exact.factors_g[0]) / jnp.linalg.norm(exact.factors_g[0])
        assert float(err) < 5 / np.sqrt(400 * n) * 3, (likelihood, float(err))


def test_auto_fisher_modes(plain_kfac):
    p = plain_kfac[0]
    assert kfac().init(gn_operator(p)).plan.fisher == "sampled"
    hess = jaxinf.curvature_operator(p.loss_fn, p.params, p.train)
    with pytest.warns(UserWarning, match="empirical Fisher"):  # the fallback is named, with the fix
        assert kfac().init(hess).plan.fisher == "empirical"
    with_model = kfac(model_fn=p.model_fn, output_loss=p.output_loss).init(hess)
    assert with_model.plan.fisher == "sampled"
    gaussian = kfac(model_fn=p.model_fn, likelihood="gaussian", fisher="exact").init(hess)
    exact = plain_kfac[3]
    np.testing.assert_allclose(gaussian.factors_g[1], exact.factors_g[1], atol=TOL, rtol=0)


def test_damping_heuristic_and_operator_damping():
    p = models.mlp_problem("linen")
    state = kfac(fisher="exact").init(gn_operator(p))
    for lam, ev in zip(state.damping, state.eigvals):
        np.testing.assert_allclose(lam, 0.1 * jnp.mean(ev), rtol=1e-12)
    state = kfac(fisher="exact", damping_heuristic=0.5).init(gn_operator(p, damping=0.25))
    assert all(float(lam) == 0.25 for lam in state.damping)
    op = gn_operator(p, damping={"['params']['Dense_0']": 0.3, "['params']['Dense_1']": 0.0}, blocks="layer")
    state = kfac(fisher="exact").init(op)
    assert float(state.damping[0]) == 0.3
    np.testing.assert_allclose(state.damping[1], 0.1 * jnp.mean(state.eigvals[1]), rtol=1e-12)


def test_zero_damping_without_heuristic_is_reported_singular():
    p = _single_dense(n=3, d=4)  # 3 examples, 5 inputs: A is singular
    solver = kfac(fisher="exact", damping_heuristic=None)
    state = solver.init(gn_operator(p))
    with pytest.raises(ValueError, match="singular"):
        solver.validate(state)


def test_float32_and_float64_factors(plain_kfac):
    p64, op64, s64, state64 = plain_kfac
    p32 = models.mlp_problem("plain", dtype=jnp.float32)
    ref = s64.score(state64, op64, p64.test, p64.train)
    for factor_dtype in (None, jnp.float64):
        solver = kfac(fisher="exact", factor_dtype=factor_dtype)
        op = gn_operator(p32, damping=0.1)
        state = solver.init(op)
        assert state.eigvals[0].dtype == (jnp.float64 if factor_dtype else jnp.float32)
        x, _ = solver.solve(state, p32.params)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(x))
        got = solver.score(state, op, p32.test, p32.train)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(ref))))


@pytest.mark.parametrize("factory", [kfac, ekfac])
def test_sampled_fisher_keeps_float32_models_float32(factory):
    """Regression: sampled output gradients once promoted a float32 model to float64 under x64 and broke the VJP."""
    p32 = models.mlp_problem("plain", dtype=jnp.float32)
    solver = factory(fisher="sampled")
    state = solver.init(gn_operator(p32, damping=0.1), key=jax.random.key(0))
    x, info = solver.solve(state, p32.params)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(x))
    assert bool(info.converged)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(x))


# ----------------------------------------------------------------------------
# Errors and integration
# ----------------------------------------------------------------------------


def test_bad_configuration_and_input(plain_kfac):
    with pytest.raises(ValueError, match="Unknown fisher"):
        ekfac(fisher="true")
    with pytest.raises(ValueError, match="Unknown likelihood"):
        ekfac(likelihood="poisson")
    with pytest.raises(ValueError, match="num_samples"):
        ekfac(num_samples=0)
    with pytest.raises(ValueError, match="damping_heuristic"):
        ekfac(damping_heuristic=-1.0)
    with pytest.raises(ValueError, match="factor_dtype"):
        ekfac(factor_dtype=jnp.int32)
    with pytest.raises(ValueError, match="both model_fn and output_loss"):
        ekfac(model_fn=lambda p, b: b)
    with pytest.raises(ValueError, match="no update_diagonal"):
        kfac(update_diagonal=True)
    p, _, solver, state = plain_kfac
    hess = jaxinf.curvature_operator(p.loss_fn, p.params, p.train)
    with pytest.raises(ValueError, match="needs the model outputs"):
        ekfac(fisher="exact").init(hess)
    with pytest.raises(ValueError, match="tree structure"):
        solver.solve(state, {"w1": p.params["w1"]})
    with pytest.raises(ValueError, match="shape"):
        solver.solve(state, dict(p.params, w1=jnp.ones((2, 2))))


def test_influence_model_integration():
    p = classifier_problem("mlp", n_train=20, n_test=3)
    solver = ekfac(fisher="exact")
    model = jaxinf.InfluenceModel(
        p.loss_fn,
        p.params,
        solver,
        damping=0.05,
        curvature="gauss_newton",
        model_fn=p.model_fn,
        output_loss=p.output_loss,
    )
    x, y = p.train
    model.fit([(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])])
    scores = model.influences(p.test, p.train)
    via_factors = model.influences_from_factors(model.influence_factors(p.test), p.train)
    np.testing.assert_allclose(scores, via_factors, atol=TOL, rtol=0)
    assert bool(jnp.all(model.self_influence(p.test) > 0))
