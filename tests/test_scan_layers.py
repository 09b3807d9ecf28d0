"""Weights stacked along a ``lax.scan`` over layers (Flax ``nn.scan``): one layer, one set of factors per step."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf.layers import trace_layers
from jaxinf.layers.statistics import example_statistics, layer_matrices
from jaxinf.scoring import layerwise
from jaxinf.scoring.layerwise import contract_by_layer
from jaxinf.solvers.kfac import approx_curvature_vp, ekfac, kfac
from jaxinf.solvers.kfac_plan import validate_state
from tests import models
from tests.test_kfac import dense_ggn, dense_matrix, layer_index_matrix

TOL = 1e-10
L, D, D_IN, K = 3, 4, 3, 2


def _init(seed):
    ks = jax.random.split(jax.random.key(seed), 6)
    return {
        "inp": 0.6 * jax.random.normal(ks[0], (D_IN, D), jnp.float64),
        "w": 0.6 * jax.random.normal(ks[1], (L, D, D), jnp.float64),
        "b": 0.2 * jax.random.normal(ks[2], (L, D), jnp.float64),
        "out": 0.6 * jax.random.normal(ks[3], (D, K), jnp.float64),
        "out_b": 0.2 * jax.random.normal(ks[4], (K,), jnp.float64),
    }


def _scanned(act):
    def model_fn(p, b):
        def step(h, wb):
            return act(h @ wb[0] + wb[1]), None

        h, _ = jax.lax.scan(step, b[0] @ p["inp"], (p["w"], p["b"]))
        return h @ p["out"] + p["out_b"]

    return model_fn


def _unrolled(act):
    def model_fn(p, b):
        h = b[0] @ p["inp"]
        for i in range(L):
            h = act(h @ p[f"w{i}"] + p[f"b{i}"])
        return h @ p["out"] + p["out_b"]

    return model_fn


def _unroll_params(p):
    q = {k: v for k, v in p.items() if k not in ("w", "b")}
    for i in range(L):
        q[f"w{i}"], q[f"b{i}"] = p["w"][i], p["b"][i]
    return q


def _problem(model_fn, params, n=24, n_test=5, seed=7):
    x = jax.random.normal(jax.random.key(seed), (n + n_test, D_IN), jnp.float64)
    y = jnp.sin(x[:, :K]) + 0.1 * jax.random.normal(jax.random.key(seed + 1), (n + n_test, K), jnp.float64)

    def loss_fn(p, b):
        return models.squared_error(model_fn(p, b), b)

    return models.Problem(loss_fn, params, (x[:n], y[:n]), (x[n:], y[n:]), model_fn, models.squared_error)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return nn.tanh(nn.Dense(D, param_dtype=jnp.float64)(h)), None


class _LinenScan(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(D, param_dtype=jnp.float64)(x)
        scan = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
        h, _ = scan(name="layers")(h, None)
        return nn.Dense(K, param_dtype=jnp.float64)(h)


def _linen_problem():
    net = _LinenScan()
    x = jnp.ones((2, D_IN), jnp.float64)
    params = net.init(jax.random.key(0), x)["params"]
    return _problem(lambda p, b: net.apply({"params": p}, b[0]), params)


@pytest.fixture(scope="module")
def problems():
    return {"raw": _problem(_scanned(jnp.tanh), _init(0)), "linen": _linen_problem()}


@pytest.mark.parametrize("name", ["raw", "linen"])
def test_report_tags_stacked_weights_and_biases_as_layers(problems, name):
    p = problems[name]
    tags = jaxinf.find_layers(p.loss_fn, p.params, p.train)
    assert not tags.fallbacks, tags
    stacked = [layer for layer in tags.layers if layer.steps]
    assert len(stacked) == 1 and stacked[0].steps == L and stacked[0].bias is not None
    rows = tags.rows()
    assert rows[stacked[0].weight][2] == "dense weight, stacked ×3 under lax.scan (auto)"
    assert rows[stacked[0].bias][2] == "dense bias, stacked ×3 under lax.scan (auto)"
    assert sum("stacked" in t for _, _, t, _ in rows) == 2
    assert f"{L} sets of Kronecker factors" in str(tags)


@pytest.mark.parametrize("name", ["raw", "linen"])
def test_per_example_layer_gradients_from_the_records_equal_autodiff(problems, name):
    p = problems[name]
    tracer = trace_layers(p.loss_fn, p.params, p.train)
    leaves = jax.tree.leaves(p.params)
    ones = lambda outs, b1: ([jnp.ones((1, *o.shape), o.dtype) for o in outs], 1)  # noqa: E731

    @jax.jit
    def both(b1):
        records, pert, _ = example_statistics(tracer, leaves, b1, ones)
        grads = jax.tree.leaves(jax.grad(p.loss_fn)(p.params, b1))
        out = []
        for layer in tracer.tags.layers:
            a, g = layer_matrices(layer, records, pert, jnp.float64)
            assert a.ndim == (3 if layer.steps else 2) and g.ndim == a.ndim + 1
            out.append((jnp.einsum("...ti,k...to->k...io", a, g)[0], layer.to_matrix(grads)))
        return out

    for i in (0, 5):
        for per_example, reference in both(jax.tree.map(lambda a, i=i: a[i : i + 1], p.train)):
            np.testing.assert_allclose(per_example, reference, atol=TOL, rtol=0)


def test_linear_stacked_steps_kfac_equals_each_steps_exact_gauss_newton_block():
    """Linear steps, linear output, squared error: step l's Jacobian is ``a_l ⊗ B_l`` (``B_l`` fixed), so its
    Gauss-Newton block is ``E[a a ᵀ] ⊗ B_l B_lᵀ = A_l ⊗ G_l``, exactly K-FAC's factors of step l."""
    p = _problem(_scanned(lambda h: h), _init(1))
    op = jaxinf.curvature_operator(None, p.params, p.train, kind="gauss_newton", model_fn=p.model_fn,
                                   output_loss=p.output_loss)  # fmt: skip
    exact = dense_ggn(p, p.train)
    state = kfac(fisher="exact").init(op)
    layer = next(la for la in state.tags.layers if la.steps)
    i = state.tags.layers.index(layer)
    assert state.factors_a[i].shape == (L, D + 1, D + 1) and state.factors_g[i].shape == (L, D, D)
    assert state.eigvecs_a[i].shape == (L, D + 1, D + 1) and state.eigvals[i].shape == (L, D + 1, D)
    idx = layer_index_matrix(layer, p.params)
    assert idx.shape == (L, D + 1, D)
    for step in range(L):
        block = exact[np.ix_(idx[step].ravel(), idx[step].ravel())]
        np.testing.assert_allclose(jnp.kron(state.factors_a[i][step], state.factors_g[i][step]), block,
                                   atol=TOL, rtol=0)  # fmt: skip
    # the solve applies each step's block: K v restricted to step l is (A_l ⊗ G_l) v_l
    approx = dense_matrix(lambda v: approx_curvature_vp(state, v), p.params)
    for step in range(L):
        rows = idx[step].ravel()
        np.testing.assert_allclose(approx[np.ix_(rows, rows)], exact[np.ix_(rows, rows)], atol=TOL, rtol=0)


def test_ekfac_eigenvalues_are_the_exact_diagonal_in_each_steps_eigenbasis(problems):
    p = problems["raw"]
    op = jaxinf.curvature_operator(None, p.params, p.train, kind="gauss_newton", model_fn=p.model_fn,
                                   output_loss=p.output_loss)  # fmt: skip
    curvature = dense_ggn(p, p.train)
    state = ekfac(fisher="exact").init(op)
    for i, layer in enumerate(state.tags.layers):
        idx = layer_index_matrix(layer, p.params)
        for step in range(max(layer.steps, 1)):
            where = idx[step] if layer.steps else idx
            qa = state.eigvecs_a[i][step] if layer.steps else state.eigvecs_a[i]
            qg = state.eigvecs_g[i][step] if layer.steps else state.eigvecs_g[i]
            block = curvature[np.ix_(where.ravel(), where.ravel())].reshape(*where.shape, *where.shape)
            diag = jnp.einsum("ai,bj,abcd,ci,dj->ij", qa, qg, block, qa, qg)
            ev = state.eigvals[i][step] if layer.steps else state.eigvals[i]
            np.testing.assert_allclose(ev, diag, atol=TOL, rtol=0)


def _influences(p, solver, damping):
    model = jaxinf.InfluenceModel(p.loss_fn, p.params, solver, damping=damping, curvature="gauss_newton",
                                  model_fn=p.model_fn, output_loss=p.output_loss)  # fmt: skip
    return model.fit(p.train).influences(p.test, p.train)


@pytest.mark.slow
def test_scanned_model_matches_the_unrolled_one_and_agrees_with_direct():
    """The stacked layer is L layers: the same states as the model unrolled by hand, the same agreement with the
    exact influence (Pearson of EK-FAC against direct(); printed with python -m pytest -s -k unrolled)."""
    params = _init(2)
    damping = 1e-3
    corr, states, scores = {}, {}, {}
    for name, p in (("scanned", _problem(_scanned(jnp.tanh), params)),
                    ("unrolled", _problem(_unrolled(jnp.tanh), _unroll_params(params)))):  # fmt: skip
        op = jaxinf.curvature_operator(None, p.params, p.train, kind="gauss_newton", model_fn=p.model_fn,
                                       output_loss=p.output_loss, damping=damping)  # fmt: skip
        solver = ekfac(fisher="exact")
        states[name] = solver.init(op)
        scores[name] = solver.score(states[name], op, p.test, p.train)
        exact = _influences(p, jaxinf.direct(), damping)
        corr[name] = float(np.corrcoef(np.ravel(exact), np.ravel(scores[name]))[0, 1])
    print(f"EK-FAC vs direct() Pearson: scanned {corr['scanned']:.6f}, unrolled {corr['unrolled']:.6f}")
    np.testing.assert_allclose(scores["scanned"], scores["unrolled"], atol=1e-9, rtol=1e-9)
    assert corr["scanned"] >= corr["unrolled"] - 1e-9 and corr["scanned"] > 0.5
    s, u = states["scanned"], states["unrolled"]
    names = {layer.name: i for i, layer in enumerate(u.tags.layers)}
    stacked = next(i for i, layer in enumerate(s.tags.layers) if layer.steps)
    for step in range(L):
        j = names[f"['w{step}']"]
        for field in ("factors_a", "factors_g", "eigvals", "damping"):
            np.testing.assert_allclose(getattr(s, field)[stacked][step], getattr(u, field)[j], atol=TOL, rtol=0)


def test_layerwise_influences_equal_gradient_influences(problems):
    p = problems["linen"]
    solver = ekfac(fisher="exact")
    model = jaxinf.InfluenceModel(p.loss_fn, p.params, solver, damping=0.01, curvature="gauss_newton",
                                  model_fn=p.model_fn, output_loss=p.output_loss, scoring="layerwise")  # fmt: skip
    model.fit(p.train)
    layerwise = model.influences(p.test, p.train)
    model.scoring = "gradients"
    np.testing.assert_allclose(layerwise, model.influences(p.test, p.train), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["raw", "linen"])
@pytest.mark.parametrize("direct", [True, False])
def test_per_layer_contraction_under_jit_on_both_paths(problems, name, direct, monkeypatch):
    """The direct contraction and the per-example layer gradient (the cost model's two choices), per step."""
    monkeypatch.setattr(layerwise, "direct_is_cheaper", lambda *_: direct)
    p = problems[name]
    tracer = trace_layers(p.loss_fn, p.params, p.train)
    factors = jax.tree.map(lambda a: jnp.stack([a, -2.0 * a, jnp.ones_like(a)]), p.params)
    scores = jax.jit(lambda q, f, b: contract_by_layer(tracer, q, f, b))(p.params, factors, p.train)
    grads = models.dense_grads(p.loss_fn, p.params, p.train)
    flat = jax.vmap(lambda f: jax.flatten_util.ravel_pytree(f)[0])(factors)
    np.testing.assert_allclose(sum(scores.values()), flat @ grads.T, atol=TOL, rtol=0)


def test_a_singular_step_is_named_by_validate(problems):
    p = problems["raw"]
    op = jaxinf.curvature_operator(None, p.params, p.train, kind="gauss_newton", model_fn=p.model_fn,
                                   output_loss=p.output_loss)  # fmt: skip
    state = kfac(fisher="exact", damping_heuristic=None).init(op)
    i = next(i for i, layer in enumerate(state.tags.layers) if layer.steps)
    broken = list(state.eigvals)
    broken[i] = jnp.ones_like(broken[i]).at[1, 0, 0].set(0.0)
    with pytest.raises(ValueError, match=r"\['w'\] \(scan step 1\).*singular"):
        validate_state(state.__class__(*(getattr(state, f) for f in ("factors_a", "factors_g", "eigvecs_a",
                       "eigvecs_g")), tuple(broken), *(getattr(state, f) for f in ("damping", "fallback_vecs",
                       "fallback_vals", "fallback_damping", "plan"))))  # fmt: skip


def test_a_slice_used_outside_its_layer_falls_back_and_nested_scans_keep_one_set_per_outer_step():
    params = _init(3)
    x = jax.random.normal(jax.random.key(4), (4, 2, D_IN), jnp.float64)  # (n, time, features)
    batch = (x, jnp.ones((4, K), jnp.float64))

    def stray(p, b):
        def step(h, wb):
            return jnp.tanh(h @ wb[0] + wb[1]) + jnp.sum(wb[0]), None

        h, _ = jax.lax.scan(step, b[0][:, 0] @ p["inp"], (p["w"], p["b"]))
        return jnp.mean((h @ p["out"] + p["out_b"] - b[1]) ** 2)

    rows = {path: (t, why) for path, _, t, why in jaxinf.find_layers(stray, params, batch).rows()}
    assert rows["['w']"][0].startswith("fallback") and "its slices are also used by `reduce_sum`" in rows["['w']"][1]
    assert rows["['b']"][0] == "fallback: block"

    def nested(p, b):  # a scan over layers, each running a scan over time with its slice as a loop constant
        def layer(hs, wb):
            def t_step(c, h):
                c = jnp.tanh(h @ wb[0] + wb[1] + c)
                return c, c

            return jax.lax.scan(t_step, jnp.zeros(hs.shape[1:]), hs)[1], None

        hs, _ = jax.lax.scan(layer, jnp.swapaxes(b[0] @ p["inp"], 0, 1), (p["w"], p["b"]))
        return jnp.mean((hs[-1] @ p["out"] + p["out_b"] - b[1]) ** 2)

    tracer = trace_layers(nested, params, batch)
    stacked = next(layer for layer in tracer.tags.layers if layer.steps)
    assert not tracer.tags.fallbacks and stacked.steps == L and stacked.sites[0].stack == (L, 2)
    b1 = jax.tree.map(lambda a: a[:1], batch)
    ones = lambda outs, _: ([jnp.ones((1, *o.shape), o.dtype) for o in outs], 1)  # noqa: E731
    records, pert, _ = jax.jit(lambda b: example_statistics(tracer, jax.tree.leaves(params), b, ones))(b1)
    a, g = layer_matrices(stacked, records, pert, jnp.float64)
    assert a.shape == (L, 2, D + 1)  # two time steps are two locations of each layer step
    reference = stacked.to_matrix(jax.tree.leaves(jax.grad(nested)(params, b1)))
    np.testing.assert_allclose(jnp.einsum("lti,klto->lio", a, g), reference, atol=TOL, rtol=0)
