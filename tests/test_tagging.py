"""Layer tagging: which parameters are found as dense / conv layers, the report, and exact per-example gradients.

The central check: for every model, the per-example gradients rebuilt from the
tagged layers (``Σ_locations a gᵀ`` per layer, plus the exact gradients of the
non-layer uses) equal ``jax.grad`` of the per-example loss to float64 precision.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinf
from jaxinf.layers import find_layers, tag_dense, trace_layers
from jaxinf.solvers.kfac import example_statistics
from tests import models

TOL = 1e-10


def rebuilt_gradients(fn, params, batch):
    """Per-example gradients of ``fn`` (a mean loss) rebuilt from the tagged layers, params-shaped, leading n."""
    tracer = trace_layers(fn, params, batch)
    tags = tracer.tags
    leaves, treedef = jax.tree.flatten(params)

    def one(example):
        b1 = jax.tree.map(lambda a: a[None], example)
        ones = lambda outs, _: ([jnp.ones((1, *o.shape), o.dtype) for o in outs], 1)  # noqa: E731
        rec, pert, diff = example_statistics(tracer, leaves, b1, ones)
        out = [jnp.zeros_like(x) for x in leaves]
        for layer in tags.layers:
            rows, gs = [], []
            for site in layer.sites:
                a = site.inputs_matrix(rec[site.sid])
                if layer.bias is not None:
                    beta = 1.0 if site.bias is not None else 0.0
                    a = jnp.concatenate([a, jnp.full((a.shape[0], 1), beta)], 1)
                rows.append(a)
                gs.append(site.outputs_matrix(pert[site.sid][0]))
            m = jnp.concatenate(rows).T @ jnp.concatenate(gs)
            w, b = layer.from_matrix(m, tags.shapes[layer.bias] if layer.bias is not None else None)
            out[layer.weight] = out[layer.weight] + w
            if layer.bias is not None:
                out[layer.bias] = out[layer.bias] + b
        for leaf, g in diff.items():
            out[leaf] = out[leaf] + g[0]
        return jax.tree.unflatten(treedef, out)

    return tags, jax.jit(jax.vmap(one))(batch)


def reference_gradients(fn, params, batch):
    return jax.jit(jax.vmap(lambda e: jax.grad(fn)(params, jax.tree.map(lambda a: a[None], e))))(batch)


def assert_trees_close(a, b, tol=TOL):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=0)


def treatments(tags):
    return {row[0]: row[2] for row in tags.rows()}


def check_report_complete(tags, params):
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    table = tags.table()
    assert [r[0] for r in tags.rows()] == paths
    for path in paths:
        assert path in table
    covered = (
        {layer.weight for layer in tags.layers}
        | {layer.bias for layer in tags.layers}
        | {f.leaf for f in tags.fallbacks}
    )
    assert covered - {None} == set(range(len(paths)))


# ----------------------------------------------------------------------------
# Flax Linen, NNX, plain JAX
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["linen", "nnx", "plain"])
def test_mlp_layers_found_in_every_flavour(flavour):
    p = models.mlp_problem(flavour)
    tags, grads = rebuilt_gradients(p.loss_fn, p.params, p.train)
    assert len(tags.layers) == 2 and not tags.fallbacks
    assert all(layer.bias is not None and layer.kind == "dense" for layer in tags.layers)
    assert sorted(t for t in treatments(tags).values()) == ["dense bias (auto)"] * 2 + ["dense weight (auto)"] * 2
    check_report_complete(tags, p.params)
    assert_trees_close(grads, reference_gradients(p.loss_fn, p.params, p.train))


def test_weight_transposed_and_einsum_layouts():
    key = jax.random.key(0)
    k1, k2, k3 = jax.random.split(key, 3)
    params = {
        "w_t": jax.random.normal(k1, (5, 3)),  # used as x @ w_t.T
        "b": jnp.linspace(-1, 1, 5),
        "w_e": jax.random.normal(k2, (2, 5)),  # out-major, via einsum
        "w_g": jax.random.normal(k3, (2, 3, 4)),  # contracted over two axes (DenseGeneral-like)
    }
    x = jax.random.normal(key, (7, 3))
    y = jax.random.normal(k2, (7, 4))

    def loss(p, batch):
        h = jnp.tanh(batch[0] @ p["w_t"].T + p["b"])
        h = jnp.tanh(jnp.einsum("ni,oi->no", h, p["w_e"]))
        h3 = jnp.stack([h, h**2, h**3], axis=-1)  # (n, 2, 3)
        out = jnp.einsum("nab,abo->no", h3, p["w_g"])
        return jnp.mean(jnp.sum((out - batch[1]) ** 2, -1))

    tags, grads = rebuilt_gradients(loss, params, (x, y))
    by_weight = {tags.paths[layer.weight]: layer for layer in tags.layers}
    assert set(by_weight) == {"['w_t']", "['w_e']", "['w_g']"}
    assert by_weight["['w_t']"].canon.perm == (1, 0) and by_weight["['w_t']"].bias is not None
    assert (by_weight["['w_g']"].d_in, by_weight["['w_g']"].d_out) == (6, 4)
    check_report_complete(tags, params)
    assert_trees_close(grads, reference_gradients(loss, params, (x, y)))


def test_linen_cnn_conv_and_dense():
    p = models.cnn_problem()
    tags, grads = rebuilt_gradients(p.loss_fn, p.params, p.train)
    kinds = sorted((layer.kind, layer.bias is not None) for layer in tags.layers)
    assert kinds == [("conv", True), ("dense", True)]
    conv = next(layer for layer in tags.layers if layer.kind == "conv")
    size = p.train[0].shape[1]
    assert conv.locations == size * size  # SAME padding, stride 1
    check_report_complete(tags, p.params)
    assert_trees_close(grads, reference_gradients(p.loss_fn, p.params, p.train))


def test_plain_conv_nchw_strided_dilated():
    key = jax.random.key(1)
    kernel = jax.random.normal(key, (4, 2, 3, 2))  # OIHW
    x = jax.random.normal(jax.random.key(2), (3, 2, 7, 6))  # NCHW
    params = {"k": kernel, "b": jnp.arange(4.0)}

    def loss(p, batch):
        y = jax.lax.conv_general_dilated(
            batch, p["k"], (2, 1), ((1, 1), (0, 2)), rhs_dilation=(1, 2), dimension_numbers=("NCHW", "OIHW", "NCHW")
        )
        y = y + p["b"][None, :, None, None]
        return jnp.mean(jnp.sum(jnp.tanh(y) ** 2, axis=(1, 2, 3)))

    tags, grads = rebuilt_gradients(loss, params, x)
    assert len(tags.layers) == 1 and tags.layers[0].kind == "conv" and tags.layers[0].bias is not None
    assert_trees_close(grads, reference_gradients(loss, params, x))


class NNXConvNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 3, (3, 3), strides=2, rngs=rngs, param_dtype=jnp.float64)
        self.out = nnx.Linear(27, 2, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
        h = jnp.tanh(self.conv(x))
        return self.out(h.reshape((h.shape[0], -1)))


def test_nnx_conv():
    model = NNXConvNet(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 2))
    y = jax.random.normal(jax.random.key(1), (4, 2))

    def loss(p, batch):
        return jnp.mean(jnp.sum((nnx.merge(graphdef, p)(batch[0]) - batch[1]) ** 2, -1))

    tags, grads = rebuilt_gradients(loss, params, (x, y))
    assert sorted(layer.kind for layer in tags.layers) == ["conv", "dense"]
    check_report_complete(tags, params)
    assert_trees_close(grads, reference_gradients(loss, params, (x, y)))


# ----------------------------------------------------------------------------
# Shared weights, lax.scan, other uses, fallbacks
# ----------------------------------------------------------------------------


def test_shared_weight_layer_is_one_repeated_layer():
    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(4)
            return dense(jnp.tanh(dense(x)))  # the same Dense applied twice

    module = Shared()
    x = jax.random.normal(jax.random.key(0), (6, 4))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), module.init(jax.random.key(1), x))

    def loss(p, batch):
        return jnp.mean(jnp.sum(module.apply(p, batch) ** 2, -1))

    tags, grads = rebuilt_gradients(loss, params, x)
    assert len(tags.layers) == 1
    layer = tags.layers[0]
    assert len(layer.sites) == 2 and layer.locations == 2 and layer.bias is not None
    assert "shared by 2 uses" in tags.table()
    assert_trees_close(grads, reference_gradients(loss, params, x))


def test_bias_on_one_use_of_a_shared_weight():
    params = {"w": jax.random.normal(jax.random.key(0), (3, 3)), "b": jnp.array([0.1, -0.2, 0.3])}

    def loss(p, x):
        h = jnp.tanh(x @ p["w"] + p["b"])
        return jnp.mean(jnp.sum((h @ p["w"]) ** 2, -1))

    x = jax.random.normal(jax.random.key(1), (5, 3))
    tags, grads = rebuilt_gradients(loss, params, x)
    assert len(tags.layers) == 1 and tags.layers[0].bias is not None
    assert [s.bias is not None for s in tags.layers[0].sites] == [True, False]
    assert_trees_close(grads, reference_gradients(loss, params, x))


def test_layers_inside_lax_scan():
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "w": 0.5 * jax.random.normal(k[0], (3, 3)),
        "u": jax.random.normal(k[1], (2, 3)),
        "b": jnp.zeros(3),
        "v": jax.random.normal(k[2], (3, 1)),
    }
    xs = jax.random.normal(k[3], (4, 5, 2))  # (n, time, features)
    ys = jnp.sum(xs, axis=(1, 2))[:, None]

    def loss(p, batch):
        x, y = batch

        def step(h, x_t):
            h = jnp.tanh(h @ p["w"] + (x_t @ p["u"] + p["b"]))
            return h, None

        h, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], 3)), jnp.swapaxes(x, 0, 1))
        return jnp.mean((h @ p["v"] - y) ** 2)

    tags, grads = rebuilt_gradients(loss, params, (xs, ys))
    by_weight = {tags.paths[layer.weight]: layer for layer in tags.layers}
    assert set(by_weight) == {"['w']", "['u']", "['v']"}
    assert by_weight["['w']"].sites[0].stack == (5,) and by_weight["['w']"].locations == 5
    assert by_weight["['u']"].bias is not None
    assert "inside lax.scan" in tags.table()
    assert_trees_close(grads, reference_gradients(loss, params, (xs, ys)))


def test_l2_penalty_is_kept_as_other_use():
    p = models.logistic_problem(l2=0.3)
    tags, grads = rebuilt_gradients(p.loss_fn, p.params, p.train)
    assert len(tags.layers) == 1
    layer = tags.layers[0]
    assert layer.other_uses and "exact gradient kept" in tags.table()
    assert_trees_close(grads, reference_gradients(p.loss_fn, p.params, p.train))


def test_fallbacks_are_named_with_reasons():
    params = {
        "w": jnp.ones((3, 2)),
        "scale": jnp.full((2,), 0.5),
        "big": jnp.ones((20, 20)),
        "unused": jnp.ones((2,)),
    }

    def loss(p, batch):
        h = (batch @ p["w"]) * p["scale"]
        return jnp.mean(jnp.sum(h**2, -1)) + 1e-3 * jnp.sum(jnp.tanh(p["big"]) * jnp.mean(batch))

    x = jax.random.normal(jax.random.key(0), (4, 3))
    tags = find_layers(loss, params, x, block_max_size=100)
    t = treatments(tags)
    assert t["['w']"] == "dense weight (auto)"
    assert t["['scale']"] == "fallback: block"
    assert t["['big']"] == "fallback: diagonal"
    assert t["['unused']"] == "fallback: block"
    reasons = {tags.paths[f.leaf]: f.reason for f in tags.fallbacks}
    assert "`mul`" in reasons["['scale']"]
    assert "not used" in reasons["['unused']"]
    check_report_complete(tags, params)
    _, grads = rebuilt_gradients(loss, params, x)
    assert_trees_close(grads, reference_gradients(loss, params, x))


def test_tied_weights_with_two_orientations_fall_back():
    params = {"w": jax.random.normal(jax.random.key(0), (4, 2))}

    def loss(p, x):
        return jnp.mean(jnp.sum((jnp.tanh(x @ p["w"]) @ p["w"].T - x) ** 2, -1))

    x = jax.random.normal(jax.random.key(1), (5, 4))
    tags, grads = rebuilt_gradients(loss, params, x)
    assert not tags.layers
    assert "different layouts" in tags.fallbacks[0].reason
    assert_trees_close(grads, reference_gradients(loss, params, x))


# ----------------------------------------------------------------------------
# Explicit tags
# ----------------------------------------------------------------------------


@jax.custom_vjp
def custom_matmul(x, w):
    return x @ w


def _fwd(x, w):
    return x @ w, (x, w)


def _bwd(res, g):
    x, w = res
    return g @ w.T, x.T @ g


custom_matmul.defvjp(_fwd, _bwd)


def _custom_loss(tagged):
    def loss(p, batch):
        x, y = batch
        h = custom_matmul(x, p["w"]) + p["b"]
        if tagged:
            h = tag_dense(h, x, p["w"], p["b"])
        return jnp.mean(jnp.sum((jnp.tanh(h) - y) ** 2, -1))

    return loss


def test_explicit_tag_takes_a_custom_layer():
    params = {"w": jax.random.normal(jax.random.key(0), (3, 2)), "b": jnp.array([0.3, -0.1])}
    batch = (jax.random.normal(jax.random.key(1), (6, 3)), jax.random.normal(jax.random.key(2), (6, 2)))
    untagged = find_layers(_custom_loss(False), params, batch)
    assert not untagged.layers
    assert any("custom_vjp" in f.reason for f in untagged.fallbacks)
    tags, grads = rebuilt_gradients(_custom_loss(True), params, batch)
    assert treatments(tags) == {"['b']": "dense bias (explicit)", "['w']": "dense weight (explicit)"}
    assert_trees_close(grads, reference_gradients(_custom_loss(False), params, batch))


def test_explicit_tag_wins_over_automatic_matching_transposed():
    params = {"w": jax.random.normal(jax.random.key(0), (2, 3))}

    def loss(p, x):
        h = tag_dense(x @ p["w"].T, x, p["w"], transposed=True)
        return jnp.mean(jnp.sum(jnp.sin(h), -1))

    x = jax.random.normal(jax.random.key(1), (5, 3))
    tags, grads = rebuilt_gradients(loss, params, x)
    assert tags.layers[0].source == "explicit" and tags.layers[0].canon.perm == (1, 0)
    assert_trees_close(grads, reference_gradients(loss, params, x))


def test_tag_dense_is_transparent_to_transformations():
    params = {"w": jax.random.normal(jax.random.key(0), (3, 2)), "b": jnp.array([0.3, -0.1])}
    batch = (jax.random.normal(jax.random.key(1), (6, 3)), jax.random.normal(jax.random.key(2), (6, 2)))
    tagged, plain = _custom_loss(True), _custom_loss(False)
    assert_trees_close(jax.jit(jax.grad(tagged))(params, batch), jax.grad(plain)(params, batch))
    per_tagged = jax.vmap(lambda e: tagged(params, jax.tree.map(lambda a: a[None], e)))(batch)
    per_plain = jax.vmap(lambda e: plain(params, jax.tree.map(lambda a: a[None], e)))(batch)
    np.testing.assert_allclose(per_tagged, per_plain, atol=TOL)
    h = jax.hessian(lambda p: tagged(p, batch))(params)
    h_ref = jax.hessian(lambda p: plain(p, batch))(params)
    assert_trees_close(h, h_ref)


def test_tag_dense_rejects_bad_shapes():
    x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    with pytest.raises(ValueError, match="do not form a dense layer"):
        tag_dense(jnp.ones((2, 5)), x, w)
    with pytest.raises(ValueError, match="2-D weight"):
        tag_dense(jnp.ones((2, 4)), x, jnp.ones((3, 4, 1)))
    with pytest.raises(ValueError, match="b must have shape"):
        tag_dense(x @ w, x, w, jnp.ones(3))


def test_public_names():
    assert jaxinf.find_layers is find_layers and jaxinf.tag_dense is tag_dense
    tags = find_layers(
        models.mlp_problem("plain").loss_fn, models.mlp_problem("plain").params, models.mlp_problem("plain").train
    )
    assert "LayerTags(2 layers, 0 fallback leaves)" in repr(tags)
    assert math.prod(tags.shapes[0]) == 6
