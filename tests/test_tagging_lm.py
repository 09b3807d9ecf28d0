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
    factors = models.random_factors(params, 2, seed=2)
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
    np.testing.assert_allclose(state.factors_a[0], jnp.bincount(ids[:, 0], length=V) / 8.0, atol=TOL)  # the diagonal
    assert state.eigvecs_a[0] is None  # the identity: no V × V array, no eigendecomposition


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


def _embedding_problem(vocab, ids, seed=8):
    """A table, a tanh, a fixed readout, squared error; ``ids`` ``(n, T)`` (ties in the counts, unseen ids)."""
    readout = jax.random.normal(jax.random.key(seed), (D, 2), jnp.float64)
    table = 0.5 * jax.random.normal(jax.random.key(seed + 1), (vocab, D), jnp.float64)

    def model_fn(p, b):
        rows = jnp.take(p["table"], b[0], axis=0, mode="fill", fill_value=0.0)  # an id out of range: zeros
        return jnp.sum(jnp.tanh(rows), axis=1) @ readout

    return _exact_problem(model_fn, {"table": table}, ids, seed)


def test_embedding_input_factor_is_the_count_vector_and_kfac_equals_the_dense_kronecker_product():
    """``A = diag(counts)`` is held as its diagonal (``Q_A = I``, no eigh): K-FAC's curvature and damped solve
    equal the dense ``diag(counts) ⊗ G (+ λI)``; EK-FAC's eigenvalues are the exact Gauss-Newton diagonal in the
    basis ``(I, Q_G)`` (float64). Scores by gather: the block test above and the 50k test below."""
    ids = jnp.array([[0, 1, 1], [3, 3, 3], [5, 2, 0], [1, 6, 5]])  # 6: out of range ("fill"), 4: unseen
    p = _embedding_problem(V, ids)
    op = jaxinf.curvature_operator(None, p.params, p.train, kind="gauss_newton", model_fn=p.model_fn,
                                   output_loss=p.output_loss, damping=0.05)  # fmt: skip
    state = kfac(fisher="exact").init(op)
    counts = jnp.bincount(ids.ravel(), length=V + 1)[:V] / ids.shape[0]
    np.testing.assert_allclose(state.factors_a[0], counts, atol=TOL, rtol=0)
    assert state.eigvecs_a[0] is None
    kron = jnp.kron(jnp.diag(counts), state.factors_g[0])  # the dense path: A ⊗ G in (row, d_out) order
    np.testing.assert_allclose(dense_matrix(lambda v: approx_curvature_vp(state, v), p.params), kron, atol=TOL, rtol=0)
    v = {"table": jax.random.normal(jax.random.key(9), (V, D), jnp.float64)}
    x = kfac(fisher="exact").solve(state, v)[0]["table"]
    lam = float(state.damping[0])
    np.testing.assert_allclose(x.ravel(), jnp.linalg.solve(kron + lam * jnp.eye(V * D), v["table"].ravel()),
                               atol=TOL, rtol=0)  # fmt: skip
    ek = ekfac(fisher="exact").init(op)
    np.testing.assert_allclose(ek.eigvals[0], rotated_diagonal(ek, 0, dense_ggn(p, p.train), p.params), atol=TOL)


def test_a_50k_vocabulary_fits_without_a_vocabulary_squared_array():
    big = 50_000
    ids = jnp.array([[0, 7, 7], [49_999, 3, 0], [12_345, 7, 1]])
    p = _embedding_problem(big, ids)
    op = jaxinf.curvature_operator(None, p.params, p.train, kind="gauss_newton", model_fn=p.model_fn,
                                   output_loss=p.output_loss, damping=0.01)  # fmt: skip
    for make in (kfac, ekfac):
        state = make(fisher="exact").init(op)
        assert max(leaf.size for leaf in jax.tree.leaves(state)) < big * big // 1000
        seen = np.zeros(big, bool)
        seen[np.asarray(ids).ravel()] = True
        assert np.all(np.asarray(state.eigvals[0])[~seen] == 0) and np.all(np.asarray(state.eigvals[0])[seen] > 0)
    scores = ekfac(fisher="exact").score(state, op, p.train, p.train)
    grads = models.dense_grads(p.loss_fn or (lambda q, b: p.output_loss(p.model_fn(q, b), b)), p.params, p.train)
    solved = jax.vmap(lambda g: ekfac(fisher="exact").solve(state, {"table": g.reshape(big, D)})[0]["table"])(grads)
    np.testing.assert_allclose(scores, solved.reshape(3, -1) @ grads.T, atol=TOL, rtol=0)


def test_ragged_padded_and_cut_batches_give_the_one_batch_fit(block):
    """The in-memory fit visits every batch at one size: a smaller batch padded with masked examples, a larger
    one cut into pieces. Embedding id counts, EK-FAC's scattered squares, attention and LayerNorm fallback
    blocks then equal the fit on one batch (float64), for the three shapes the padding takes."""
    loss_fn, params, _ = block
    ids = jax.random.randint(jax.random.key(3), (11, T), 0, V)
    data = (np.asarray(ids), np.asarray(jnp.roll(ids, -1, axis=1)))
    solver = ekfac(fisher="empirical")

    def fit(batches):
        return solver.init(jaxinf.curvature_operator(loss_fn, params, batches, kind="fisher", damping=1e-3))

    reference = fit(data)
    assert reference.tags.fallbacks and any(layer.one_hot_inputs for layer in reference.tags.layers)
    # stacked + a padded ragged batch; all batches apart (the first is alone in its size); stacked + a larger one
    for sizes in ([4, 4, 3], [3, 4, 4], [2, 2, 7]):
        cuts = np.cumsum(sizes)[:-1]
        got = fit([tuple(part) for part in zip(*(np.split(a, cuts) for a in data))])
        for field in ("factors_a", "factors_g", "eigvals", "fallback_vals"):
            for a, b in zip(jax.tree.leaves(getattr(got, field)), jax.tree.leaves(getattr(reference, field))):
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=f"{field} {sizes}")


def test_haiku_mlp_every_weight_and_bias_is_tagged():
    """``hk.transform`` of ``hk.Linear`` layers (examples/haiku_mlp.py): every weight and bias in a layer."""
    hk = pytest.importorskip("haiku")

    def forward(x):
        return hk.Linear(2)(jnp.tanh(hk.Linear(5)(x)))

    net = hk.without_apply_rng(hk.transform(forward))
    x = jax.random.normal(jax.random.key(0), (6, 3), jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), net.init(jax.random.key(1), x))

    def loss_fn(p, b):
        return jnp.mean((net.apply(p, b[0]) - b[1]) ** 2)

    batch = (x, jnp.cos(x[:, :2]))
    tags = jaxinf.find_layers(loss_fn, params, batch)
    assert not tags.fallbacks and len(tags.layers) == 2
    assert [t for _, _, t, _ in tags.rows()] == ["dense bias (auto)", "dense weight (auto)"] * 2
    factors = models.random_factors(params, 2, seed=2)
    methods = ("layerwise", "gradients")
    by = [jax.jit(lambda f, b, m=m: contract(loss_fn, params, f, b, m))(factors, batch) for m in methods]
    np.testing.assert_allclose(by[0], by[1], atol=TOL, rtol=0)
