"""The per-layer contraction (scoring="layerwise") and the three-way cost model.

Reference: the naive contraction with full per-example gradients
(``jax.grad`` per example, raveled), in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf.layers.statistics import loss_tracer
from jaxinf.scoring import choose_method, contract, cost_model
from jaxinf.scoring import layer_profile as scoring_profile
from jaxinf.scoring.layerwise import contract_by_layer, layer_profile
from tests import models


def naive(loss_fn, params, factors, batch):
    grads = models.dense_grads(loss_fn, params, batch)  # (n, p)
    flat = jax.vmap(lambda f: jax.flatten_util.ravel_pytree(f)[0])(factors)
    return flat @ grads.T


def zoo_problem(n=7, dtype=jnp.float64):
    """Dense + conv (9 locations) + a weight shared by two uses + a scan over 3 steps + a fallback scale + L2."""
    k = jax.random.split(jax.random.key(3), 8)
    params = {
        "conv": jax.random.normal(k[0], (3, 3, 2, 3), dtype) / 4,
        "conv_b": jax.random.normal(k[1], (3,), dtype) / 4,
        "shared": jax.random.normal(k[2], (27, 5), dtype) / 5,
        "rnn": jax.random.normal(k[3], (5, 5), dtype) / 3,
        "scale": jnp.asarray(1.3, dtype),
        "out": jax.random.normal(k[4], (5, 2), dtype) / 3,
        "out_b": jnp.zeros((2,), dtype),
    }
    x = jax.random.normal(k[5], (n, 5, 5, 2), dtype)
    y = jax.random.normal(k[6], (n, 2), dtype)

    def loss_fn(p, batch):
        xb, yb = batch
        h = jax.lax.conv_general_dilated(xb, p["conv"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jnp.tanh(h + p["conv_b"]).reshape(xb.shape[0], -1)
        h = jnp.tanh(h @ p["shared"]) + 0.5 * jnp.tanh(jnp.cos(h) @ p["shared"])

        def step(c, _):
            return jnp.tanh(c @ p["rnn"] + h), None

        h, _ = jax.lax.scan(step, h, None, length=3)
        out = p["scale"] * h @ p["out"] + p["out_b"]
        reg = 1e-2 * jnp.sum(p["out"] ** 2)
        return 0.5 * jnp.mean(jnp.sum((out - yb) ** 2, -1)) + reg

    return loss_fn, params, (x, y)


def strided_conv_problem(n=6, dtype=jnp.float64):
    """NCHW input, OIHW kernel, strides (2, 1), uneven padding, kernel dilation (1, 2), then a dense readout."""
    k = jax.random.split(jax.random.key(5), 4)
    params = {
        "kernel": jax.random.normal(k[0], (4, 3, 3, 2), dtype) / 3,  # O I H W
        "bias": jax.random.normal(k[1], (4,), dtype) / 3,
        "readout": jax.random.normal(k[2], (4 * 3 * 6, 2), dtype) / 8,  # 4 channels x 3 x 6 positions
    }
    x = jax.random.normal(k[3], (n, 3, 7, 5), dtype)
    y = jnp.ones((n, 2), dtype)

    def loss_fn(p, batch):
        h = jax.lax.conv_general_dilated(
            batch[0],
            p["kernel"],
            (2, 1),
            ((1, 0), (2, 1)),
            rhs_dilation=(1, 2),
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
        )
        h = jnp.tanh(h + p["bias"][None, :, None, None]).reshape(batch[0].shape[0], -1)
        return 0.5 * jnp.mean(jnp.sum((h @ p["readout"] - batch[1]) ** 2, -1))

    return loss_fn, params, (x, y)


PROBLEMS = {
    "strided_conv": strided_conv_problem,
    "linen": lambda: models.mlp_problem("linen")[:3],
    "nnx": lambda: models.mlp_problem("nnx")[:3],
    "cnn": lambda: models.cnn_problem()[:3],
    "zoo": zoo_problem,
}


@pytest.mark.parametrize("name", sorted(PROBLEMS))
@pytest.mark.parametrize("num_factors", [1, 40])
def test_layerwise_equals_per_example_gradients(name, num_factors):
    loss_fn, params, batch = PROBLEMS[name]()
    factors = models.random_factors(params, num_factors)
    ref = naive(loss_fn, params, factors, batch)
    got = jax.jit(lambda p, f, b: contract(loss_fn, p, f, b, "layerwise"))(params, factors, batch)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12 * float(jnp.max(jnp.abs(ref))))
    for method in ("gradients", "jvp"):
        np.testing.assert_allclose(contract(loss_fn, params, factors, batch, method), ref, rtol=1e-10, atol=1e-12)


def test_both_layer_paths_are_exercised():
    """One factor takes the direct path on every layer; 40 factors form the per-example gradient of the conv layer."""
    loss_fn, params, batch = zoo_problem()
    profile = layer_profile(loss_tracer(loss_fn, params, batch))
    assert all(cost_model.direct_is_cheaper(1, r, o, t) for r, o, t, _ in profile.layers)
    assert not all(cost_model.direct_is_cheaper(40, r, o, t) for r, o, t, _ in profile.layers)
    assert profile.other_params >= 1  # the fallback scale (and the penalised "out" weight's other use)


def test_parts_are_per_layer_and_sum_to_the_whole():
    loss_fn, params, batch = zoo_problem()
    factors = models.random_factors(params, 3)
    tracer = loss_tracer(loss_fn, params, batch)
    parts = contract_by_layer(tracer, params, factors, batch)
    assert "['scale']" in parts  # the fallback leaf is its own term
    # the term of one layer equals the naive contraction restricted to that layer's leaves
    only_conv = jax.tree_util.tree_map_with_path(
        lambda path, f: f if jax.tree_util.keystr(path) in ("['conv']", "['conv_b']") else jnp.zeros_like(f), factors
    )
    conv_name = next(name for name in parts if "conv" in name)
    np.testing.assert_allclose(parts[conv_name], naive(loss_fn, params, only_conv, batch), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(sum(parts.values()), naive(loss_fn, params, factors, batch), rtol=1e-10, atol=1e-12)


def test_float32_and_vmap_over_factor_groups():
    loss_fn, params, batch = models.mlp_problem("linen", dtype=jnp.float32)[:3]
    factors = models.random_factors(params, 6)
    ref = naive(
        loss_fn,
        jax.tree.map(lambda a: a.astype(jnp.float64), params),
        jax.tree.map(lambda a: a.astype(jnp.float64), factors),
        jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, batch),
    )
    got = contract(loss_fn, params, factors, batch, "layerwise")
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    groups = jax.tree.map(lambda a: a.reshape(2, 3, *a.shape[1:]), factors)
    by_group = jax.vmap(lambda f: contract(loss_fn, params, f, batch, "layerwise"))(groups)
    np.testing.assert_allclose(by_group.reshape(6, -1), got, rtol=1e-5, atol=1e-6)


def test_influence_model_layerwise_ragged_and_more_factors_than_parameters():
    p = models.mlp_problem("linen", n_train=23, n_test=40)  # 40 test points > 26 parameters
    x, y = p.train
    batches = [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]  # ragged last batch
    results = {}
    for scoring in ("gradients", "layerwise", "auto"):
        model = jaxinf.InfluenceModel(
            p.loss_fn, p.params, jaxinf.direct(), damping=1e-3, scoring=scoring, curvature="fisher"
        )
        results[scoring] = model.fit(batches).influences(p.test, batches)
    np.testing.assert_allclose(results["layerwise"], results["gradients"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(results["auto"], results["gradients"], rtol=1e-9, atol=1e-12)
    model = jaxinf.InfluenceModel(p.loss_fn, p.params, jaxinf.direct(), damping=1e-3)
    profile = scoring_profile(p.loss_fn, p.params, p.train)
    assert model.scoring_method(40, batches[0]) == choose_method(40, 10, 26, profile)


def test_cost_model_picks_each_method_where_the_arithmetic_says():
    wide = cost_model.LayerProfile(((513, 512, 1), (513, 512, 1)), 0)
    p = 2 * 513 * 512
    assert choose_method(1, 64, p, wide) == "jvp"  # one factor: no per-example work at all
    assert choose_method(16, 64, p, wide) == "layerwise"  # F products of layer size instead of 2F passes
    assert choose_method(16, 64, p, None) == "jvp"  # without tagged layers, layerwise is not a candidate
    im2col_conv = cost_model.LayerProfile(((28, 8, 256), (73, 8, 64), (513, 10, 1)), 0)  # stores T x rows
    p = 28 * 8 + 73 * 8 + 513 * 10
    assert choose_method(1024, 256, p, im2col_conv) == "gradients"  # im2col rows cost more than the gradients
    # the same convolutions contracted with their own kernels store only their inputs (16x16x3 and 8x8x8)
    narrow_conv = cost_model.LayerProfile(((28, 8, 256, 768), (73, 8, 64, 512), (513, 10, 1, 513)), 0)
    assert choose_method(16, 256, p, im2col_conv) == "gradients"
    assert choose_method(16, 256, p, narrow_conv) == "layerwise"
    costs = cost_model.method_costs(16, p, narrow_conv)
    assert set(costs) == {"jvp", "gradients", "layerwise"} and all(c > 0 for c in costs.values())
    # the batch size cancels
    assert choose_method(16, 1, p, narrow_conv) == choose_method(16, 10_000, p, narrow_conv)


def test_unknown_scoring_names_layerwise():
    p = models.mlp_problem("linen")
    with pytest.raises(ValueError, match="layerwise"):
        jaxinf.InfluenceModel(p.loss_fn, p.params, jaxinf.direct(), scoring="per-layer")
