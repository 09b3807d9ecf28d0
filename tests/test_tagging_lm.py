"""Layer tagging for transformers: embeddings, per-head projections, Equinox biases, zero-size weights.

A tiny Flax NNX transformer block (embedding, LayerNorm, ``nnx.MultiHeadAttention``, MLP, a per-head einsum
projection) and an Equinox MLP: the report names every weight's treatment; per-example layer gradients from the
recorded inputs and output gradients equal autodiff; EK-FAC's eigenvalues are the exact Fisher's diagonal in its
eigenbasis; and on a single embedding or per-head layer whose curvature factorises, K-FAC and EK-FAC with the
exact Fisher equal the exact Gauss-Newton block (dense float64 references).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinf
from jaxinf.scoring import contract
from jaxinf.solvers.kfac import approx_curvature_vp, ekfac, kfac
from tests import models
from tests.test_kfac import dense_fisher, dense_ggn, dense_matrix, rotated_diagonal

TOL = 1e-10
V, D, H, T = 6, 4, 2, 3  # vocabulary, width, heads, sequence length


def _attention(query, key, value, mask=None, **_):
    """Softmax attention in the inputs' dtype (Flax's default softmax runs in float32)."""
    logits = jnp.einsum("...qhd,...khd->...hqk", query, key) / jnp.sqrt(query.shape[-1])
    weights = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1)
    return jnp.einsum("...hqk,...khd->...qhd", weights, value)


class Block(nnx.Module):
    """Embedding, pre-norm causal self-attention and MLP, a per-head einsum projection, a readout."""

    def __init__(self, rngs):
        f64 = {"param_dtype": jnp.float64, "rngs": rngs}
        self.embed = nnx.Embed(V, D, **f64)
        self.ln1, self.ln2 = nnx.LayerNorm(D, **f64), nnx.LayerNorm(D, **f64)
        self.attn = nnx.MultiHeadAttention(H, D, decode=False, attention_fn=_attention, **f64)
        self.mlp1, self.mlp2 = nnx.Linear(D, 5, **f64), nnx.Linear(5, D, **f64)
        self.per_head = nnx.Param(0.5 * jax.random.normal(rngs.params(), (H, D // H, 2), jnp.float64))
        self.out = nnx.Linear(D + 2 * H, V, **f64)

    def __call__(self, ids):
        x = self.embed(ids)
        x = x + self.attn(self.ln1(x), mask=nnx.make_causal_mask(ids))
        x = x + self.mlp2(jnp.tanh(self.mlp1(self.ln2(x))))
        heads = jnp.einsum("...hd,hdk->...hk", x.reshape(*x.shape[:-1], H, D // H), self.per_head[...])
        return self.out(jnp.concatenate([x, heads.reshape(*heads.shape[:-2], -1)], -1))


@pytest.fixture(scope="module")
def block():
    graphdef, params = nnx.split(Block(nnx.Rngs(0)), nnx.Param)

    def loss_fn(p, b):
        logits = nnx.merge(graphdef, p)(b[0])
        return jnp.mean(jnp.sum(-jax.nn.log_softmax(logits) * jax.nn.one_hot(b[1], V), -1))

    ids = jax.random.randint(jax.random.key(1), (5, T), 0, V)
    return loss_fn, params, (ids, jnp.roll(ids, -1, axis=1))


def _treatments(tags):
    return {path: (treatment, detail) for path, _, treatment, detail in tags.rows()}


def test_transformer_block_report_names_every_weight(block):
    loss_fn, params, batch = block
    rows = _treatments(jaxinf.find_layers(loss_fn, params, batch))
    assert rows["['embed']['embedding'].value"][0] == "embedding table (auto)"
    assert "one-hot inputs" in rows["['embed']['embedding'].value"][1]
    assert rows["['per_head'].value"][0] == "dense weight (auto)"
    assert "2 heads as locations" in rows["['per_head'].value"][1]
    for name in ("query", "key", "value", "out"):
        assert rows[f"['attn']['{name}']['kernel'].value"][0] == "dense weight (auto)"
        assert rows[f"['attn']['{name}']['bias'].value"][0] == "dense bias (auto)"
    for name in ("mlp1", "mlp2", "out"):
        assert rows[f"['{name}']['kernel'].value"][0] == "dense weight (auto)"
        assert rows[f"['{name}']['bias'].value"][0] == "dense bias (auto)"
    fallbacks = {path: treatment for path, (treatment, _) in rows.items() if treatment.startswith("fallback")}
    norms = {f"['{ln}']['{leaf}'].value" for ln in ("ln1", "ln2") for leaf in ("scale", "bias")}
    assert fallbacks == dict.fromkeys(norms, "fallback: block")  # norms: exact blocks


@pytest.mark.slow
def test_transformer_block_layer_gradients_and_ekfac_identity(block):
    """Per-example gradients from the layer records equal autodiff (layer-wise scores); EK-FAC's eigenvalues are
    ``diag((Q_A ⊗ Q_G)ᵀ F (Q_A ⊗ Q_G))`` of the exact empirical Fisher for the embedding and per-head layers."""
    loss_fn, params, batch = block
    factors = jax.tree.map(lambda a: jax.random.normal(jax.random.key(2), (2, *a.shape), a.dtype), params)
    by_layer = jax.jit(lambda f, b: contract(loss_fn, params, f, b, "layerwise"))(factors, batch)
    by_autodiff = jax.jit(lambda f, b: contract(loss_fn, params, f, b, "gradients"))(factors, batch)  # one compile
    np.testing.assert_allclose(by_layer, by_autodiff, atol=TOL, rtol=0)
    op = jaxinf.curvature_operator(loss_fn, params, batch, kind="fisher")
    state = ekfac(fisher="empirical").init(op)
    fisher = dense_fisher(loss_fn, params, batch)
    names = {layer.name: i for i, layer in enumerate(state.tags.layers)}
    for name in ("['embed']", "['per_head'].value", "['attn']['query']"):
        i = names[name]
        np.testing.assert_allclose(state.eigvals[i], rotated_diagonal(state, i, fisher, params), atol=TOL, rtol=0)


def _exact_problem(model_fn, params, x, seed=0):
    y = jax.random.normal(jax.random.key(seed), jax.eval_shape(model_fn, params, (x, None)).shape, jnp.float64)
    return models.Problem(None, params, (x, y), None, model_fn, models.squared_error)


def _assert_kfac_equals_exact_block(p):
    op = jaxinf.curvature_operator(
        None, p.params, p.train, kind="gauss_newton", model_fn=p.model_fn, output_loss=p.output_loss
    )
    exact = dense_ggn(p, p.train)
    for make in (kfac, ekfac):
        state = make(fisher="exact").init(op)
        assert len(state.tags.layers) == 1 and not state.tags.fallbacks
        np.testing.assert_allclose(dense_matrix(lambda v, s=state: approx_curvature_vp(s, v), p.params), exact,
                                   atol=TOL, rtol=0)  # fmt: skip
    return state


def test_single_embedding_layer_with_exact_fisher_equals_the_exact_block():
    """One token per example, a fixed linear readout, squared error: GN = Σ_v p_v e_v e_vᵀ ⊗ R Rᵀ = A ⊗ G."""
    readout = jax.random.normal(jax.random.key(3), (D, 3), jnp.float64)
    table = jax.random.normal(jax.random.key(4), (V, D), jnp.float64)

    def model_fn(p, b):
        return jnp.take(p["table"], b[0][:, 0], axis=0) @ readout

    ids = jnp.array([[0], [1], [1], [3], [3], [3], [5], [2]])  # id 4 unseen; ties in the counts
    state = _assert_kfac_equals_exact_block(_exact_problem(model_fn, {"table": table}, ids))
    np.testing.assert_allclose(state.factors_a[0], jnp.diag(jnp.bincount(ids[:, 0], length=V) / 8.0), atol=TOL)


@pytest.mark.parametrize("order", ["x_first", "w_first"])
def test_single_per_head_layer_with_exact_fisher_equals_the_exact_block(order):
    """``s[h, k] = Σ_c x[h, c] W[h, c, k]`` (dot_general batch axis h), outputs concatenated, squared error:
    GN = E[Σ_h (e_h e_hᵀ ⊗ x_h x_hᵀ)] ⊗ I, exactly K-FAC's block-diagonal A ⊗ G."""
    w = jax.random.normal(jax.random.key(5), (H, 3, 2), jnp.float64)

    def model_fn(p, b):
        if order == "x_first":
            s = jnp.einsum("nhc,hck->nhk", b[0], p["w"])
        else:
            s = jnp.einsum("hck,nhc->nhk", p["w"], b[0])
        return s.reshape(s.shape[0], -1)

    x = jax.random.normal(jax.random.key(6), (9, H, 3), jnp.float64)
    state = _assert_kfac_equals_exact_block(_exact_problem(model_fn, {"w": w}, x))
    assert state.tags.layers[0].sites[0].heads == H


def test_equinox_mlp_biases_are_layer_biases():
    """``W @ x + b`` under a per-example vmap transposes before the add: the bias still joins its layer."""
    mlp = eqx.nn.MLP(3, 2, 4, 1, activation=jnp.tanh, key=jax.random.key(0))
    params, static = eqx.partition(mlp, eqx.is_array)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)

    def loss_fn(p, b):
        return jnp.mean((jax.vmap(eqx.combine(p, static))(b[0]) - b[1]) ** 2)

    x = jax.random.normal(jax.random.key(1), (7, 3), jnp.float64)
    batch = (x, jnp.sin(x[:, :2]))
    tags = jaxinf.find_layers(loss_fn, params, batch)
    assert not tags.fallbacks
    assert [t for _, _, t, _ in tags.rows()] == ["dense weight (auto)", "dense bias (auto)"] * 2
    factors = jax.tree.map(lambda a: jax.random.normal(jax.random.key(2), (3, *a.shape), a.dtype), params)
    by = {m: jax.jit(lambda f, b, m=m: contract(loss_fn, params, f, b, m))(factors, batch)  # one compile, not one
          for m in ("layerwise", "gradients")}  # per primitive (eager); the zero-size test below runs eagerly
    np.testing.assert_allclose(by["layerwise"], by["gradients"], atol=TOL, rtol=0)
    state = ekfac(fisher="empirical").init(jaxinf.curvature_operator(loss_fn, params, batch, kind="fisher"))
    fisher = dense_fisher(loss_fn, params, batch)
    for i in range(2):
        np.testing.assert_allclose(state.eigvals[i], rotated_diagonal(state, i, fisher, params), atol=TOL, rtol=0)


def test_zero_size_weights_are_fallbacks_not_layers():
    """A zero-size weight used by a dot_general (or tag_dense) has nothing to fit: a fallback. It used to be a
    dense layer with ``d_out = 0`` or ``d_in = 0``, and the report and layer-wise scoring divided by zero."""
    params = {"w": jnp.full((3, 2), 0.3), "e": jnp.zeros((2, 0)), "f": jnp.zeros((0, 2))}

    def loss_fn(p, b):
        h = b[0] @ p["w"]
        h = h + jnp.sum(h @ p["e"]) + jnp.zeros((h.shape[0], 0)) @ p["f"]
        return jnp.mean((h - b[1]) ** 2)

    x = jax.random.normal(jax.random.key(0), (5, 3), jnp.float64)
    batch = (x, jnp.ones((5, 2)))
    tags = jaxinf.find_layers(loss_fn, params, batch)
    rows = _treatments(tags)
    assert [layer.name for layer in tags.layers] == ["['w']"]
    for leaf in ("['e']", "['f']"):
        assert rows[leaf][0].startswith("fallback") and "zero size" in rows[leaf][1]
    factors = jax.tree.map(lambda a: jnp.ones((2, *a.shape)), params)
    np.testing.assert_allclose(
        contract(loss_fn, params, factors, batch, "layerwise"), contract(loss_fn, params, factors, batch, "gradients"),
        atol=TOL, rtol=0,
    )  # fmt: skip


def test_tied_embedding_and_unmatched_gather_are_reported():
    """A table used both by ``jnp.take`` and as the readout ``h @ E.T`` (tied weights) falls back, saying so; so
    does a gather of single entries."""
    params = {"table": jnp.ones((V, D)), "scale": jnp.ones((V, D))}

    def loss_fn(p, b):
        h = jnp.take(p["table"], b[0], axis=0)  # (n, T, D)
        picked = p["scale"][b[0], 0]  # single entries: not whole rows
        return jnp.mean(jnp.sum(h @ p["table"].T, -1) * picked)

    rows = _treatments(jaxinf.find_layers(loss_fn, params, (jnp.zeros((2, T), jnp.int32),)))
    tied = "used both as a dense weight and as an embedding table (tied weights)"
    assert rows["['table']"] == ("fallback: block", tied)
    assert rows["['scale']"][0] == "fallback: block"
    assert "a gather that does not take whole rows" in rows["['scale']"][1]
