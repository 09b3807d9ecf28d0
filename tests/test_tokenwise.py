"""Token-wise and per-layer scores (jaxinf.breakdown, jaxinf.scoring.tokenwise / positions) against brute force.

The brute force gives every weight of the tiny NNX transformer block of tests/test_tagging_lm.py a copy per
sequence position, ``W_t = W + δ_t`` used only at position ``t``; the share of token ``t`` of training sequence
``j`` in the score of factor ``F_i`` is ``F_iᵀ ∂ℓ_j/∂δ_t`` at ``δ = 0`` (float64), and the LayerNorm leaves
(outside every layer) are the unattributed part.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinf
from jaxinf import breakdown
from jaxinf.layers.statistics import loss_tracer
from jaxinf.scoring.positions import token_map
from jaxinf.scoring.tokenwise import contract_by_token
from tests import models
from tests.test_tagging_lm import Block, D, H, T, V, _attention

TOL = 1e-10
LN = ("ln1", "ln2")


def _logits(graphdef, p, ids, deltas=None):
    """The block's forward pass; with ``deltas`` (params-shaped, leading ``T``), ``W + δ_t`` at position ``t``."""
    m = nnx.merge(graphdef, p)
    if deltas is None:
        return m(ids)
    d = lambda *path: _get(deltas, path)  # noqa: E731

    def lin(mod, path, x, spec):  # a linear layer plus, at each position t, x_t δK_t + δb_t
        return mod(x) + jnp.einsum(spec, x, d(*path, "kernel")) + d(*path, "bias")

    x = m.embed(ids) + d("embed", "embedding")[jnp.arange(T), ids]
    h = m.ln1(x)
    q, k, v = (lin(getattr(m.attn, n), ("attn", n), h, "...ti,tihc->...thc") for n in ("query", "key", "value"))
    att = _attention(q, k, v, mask=nnx.make_causal_mask(ids))
    x = x + lin(m.attn.out, ("attn", "out"), att, "...thc,thco->...to")
    x = x + lin(m.mlp2, ("mlp2",), jnp.tanh(lin(m.mlp1, ("mlp1",), m.ln2(x), "...ti,tio->...to")), "...ti,tio->...to")
    xh = x.reshape(*x.shape[:-1], H, D // H)
    heads = jnp.einsum("...hd,hdk->...hk", xh, m.per_head[...]) + jnp.einsum("...thd,thdk->...thk", xh, d("per_head"))
    return lin(m.out, ("out",), jnp.concatenate([x, heads.reshape(*heads.shape[:-2], -1)], -1), "...ti,tio->...to")


def _get(state, path):
    for key in path:
        state = state[key]
    return state.get_value() if isinstance(state, nnx.Variable) else state


def _ce(logits, targets):
    return jnp.mean(jnp.sum(-jax.nn.log_softmax(logits) * jax.nn.one_hot(targets, V), -1))


@pytest.fixture(scope="module")
def lm():
    graphdef, params = nnx.split(Block(nnx.Rngs(0)), nnx.Param)

    def loss_fn(p, b):
        return _ce(_logits(graphdef, p, b[0]), b[1])

    ids = jax.random.randint(jax.random.key(1), (7, T), 0, V)
    train = (ids, jnp.roll(ids, -1, axis=1))
    test_ids = jax.random.randint(jax.random.key(2), (3, T), 0, V)
    model = jaxinf.InfluenceModel(
        loss_fn, params, jaxinf.direct(), damping=0.5, curvature="gauss_newton",
        model_fn=lambda p, b: _logits(graphdef, p, b[0]), output_loss=lambda out, b: _ce(out, b[1]),
    ).fit(train)  # fmt: skip
    return graphdef, params, loss_fn, model, train, (test_ids, jnp.roll(test_ids, -1, axis=1))


def _brute(graphdef, params, factors, batch):
    """``(by_token (F, n, T), unattributed (F, n))`` from per-position weight copies and the LayerNorm gradients."""
    deltas = jax.tree.map(lambda p: jnp.zeros((T, *p.shape), p.dtype), params)

    def per_example(ex):
        loss = lambda p, dl: _ce(_logits(graphdef, p, ex[0][None], dl), ex[1][None])  # noqa: E731
        return jax.grad(loss, argnums=(0, 1))(params, deltas)

    g_params, g_deltas = jax.vmap(per_example)(batch)
    pairs = zip(jax.tree.leaves(factors), jax.tree.leaves(g_deltas))
    by_token = sum(jnp.einsum("f...,nt...->fnt", f, g) for f, g in pairs)
    ln = lambda tree: [_get(tree, (name,)) for name in LN]  # noqa: E731
    rest = 0.0
    for f_state, g_state in zip(ln(factors), ln(g_params)):
        for f, g in zip(jax.tree.leaves(f_state), jax.tree.leaves(g_state)):
            rest = rest + jnp.einsum("f...,n...->fn", f, g)
    return by_token, rest


def test_brute_force_forward_is_the_block(lm):
    graphdef, params, _, _, train, _ = lm
    zeros = jax.tree.map(lambda p: jnp.zeros((T, *p.shape), p.dtype), params)
    np.testing.assert_allclose(
        _logits(graphdef, params, train[0], zeros), _logits(graphdef, params, train[0]), atol=1e-12
    )


def test_token_map_of_the_block(lm):
    _, params, loss_fn, _, train, _ = lm
    tracer = loss_tracer(loss_fn, params, train)
    tm = token_map(tracer, params, train, 1)
    assert tm.length == T
    for layer, pos in zip(tracer.tags.layers, tm.positions):
        expect = np.repeat(np.arange(T), H) if "per_head" in layer.name else np.arange(T)
        np.testing.assert_array_equal(pos, expect, err_msg=layer.name)


@pytest.mark.parametrize("measured", [False, True])
def test_by_token_matches_per_position_weight_copies(lm, measured):
    graphdef, params, _, model, train, test = lm

    def last_logprob(p, b):  # the log-probability of the last target token
        return jnp.mean(jax.nn.log_softmax(_logits(graphdef, p, b[0]))[:, -1][jnp.arange(b[1].shape[0]), b[1][:, -1]])

    f = last_logprob if measured else None
    factors = model.influence_factors(test, measurement=f)
    got = breakdown.influences_by_token(model, test, train, sequence_axis=1, measurement=f)
    by_token, rest = jax.jit(_brute, static_argnums=0)(graphdef, params, factors, train)  # one program, not op by op
    assert got.by_token.shape == (3, 7, T) and got.unattributed.shape == (3, 7)
    np.testing.assert_allclose(got.by_token, by_token, atol=TOL, rtol=0)
    np.testing.assert_allclose(got.unattributed, rest, atol=TOL, rtol=0)
    full = model.influences(test, train, measurement=f)
    np.testing.assert_allclose(got.by_token.sum(-1) + got.unattributed, full, atol=TOL, rtol=0)
    assert float(jnp.max(jnp.abs(got.unattributed))) > 1e-8  # the LayerNorm part is not dropped


def test_by_token_lists_ragged_batches_and_jit(lm):
    _, params, loss_fn, model, train, test = lm
    whole = breakdown.influences_by_token(model, test, train, sequence_axis=1)
    parts = [jax.tree.map(lambda a, s=s: a[s], train) for s in (slice(0, 3), slice(3, 6), slice(6, 7))]
    listed = breakdown.influences_by_token(model, [test], parts, sequence_axis=(1, 1))
    np.testing.assert_allclose(listed.by_token, whole.by_token, atol=TOL, rtol=0)
    np.testing.assert_allclose(listed.unattributed, whole.unattributed, atol=TOL, rtol=0)
    tracer = loss_tracer(loss_fn, params, train)
    tm = token_map(tracer, params, train, 1)
    factors = model.influence_factors(test)
    fn = jax.jit(contract_by_token, static_argnums=(0, 1))
    jitted = fn(tracer, tm, params, factors, train)
    np.testing.assert_allclose(jitted.by_token, whole.by_token, atol=TOL, rtol=0)
    compiled = fn._cache_size()
    fn(tracer, tm, params, factors, train)
    assert fn._cache_size() == compiled  # no retracing


def test_locations_that_are_not_positions_raise(lm):
    _, params, loss_fn, _, train, _ = lm
    with pytest.raises(ValueError, match="sequence_axis"):
        token_map(loss_tracer(loss_fn, params, train), params, train, 0)  # the example axis
    with pytest.raises(ValueError, match="one per batch leaf"):
        token_map(loss_tracer(loss_fn, params, train), params, train, (1,))

    def pooled(p, b):  # a readout after mean-pooling over the sequence: no location reads one token
        w = p["w"]
        return jnp.mean((jnp.mean(b[0], axis=1) @ w - b[1]) ** 2)

    p = {"w": jnp.ones((4, 2))}
    batch = (jnp.ones((5, T, 4)), jnp.ones((5, 2)))
    with pytest.raises(ValueError, match="do not map one-to-one"):
        token_map(loss_tracer(pooled, p, batch), p, batch, (1, None))
    labels = (jnp.ones((5, T, 4)), jnp.ones((5,)))  # one label per sequence: the error spells the per-leaf form
    with pytest.raises(ValueError, match=r"batch leaf 1 .* of shape \(5,\).*give None.*sequence_axis=\(1, None\)"):
        token_map(loss_tracer(pooled, {"w": jnp.ones(4)}, labels), {"w": jnp.ones(4)}, labels, 1)

    def mixer(p, b):  # token mixing: a dense layer over the sequence axis
        return jnp.mean((jnp.einsum("ntd,ts->nsd", b[0], p["w"]) - b[1]) ** 2)

    p = {"w": jnp.ones((T, T))}
    batch = (jnp.ones((5, T, 4)), jnp.ones((5, T, 4)))
    with pytest.raises(ValueError, match="mixes several sequence positions"):
        token_map(loss_tracer(mixer, p, batch), p, batch, 1)


SOLVERS = {
    "direct": lambda: jaxinf.direct(),
    "cg": lambda: jaxinf.cg(rtol=1e-12, maxiter=400),
    "arnoldi": lambda: jaxinf.arnoldi(rank=8),
    "nystrom": lambda: jaxinf.nystrom(rank=8),
    "lissa": lambda: jaxinf.lissa(scale=10.0, maxiter=300),
    "kfac": lambda: jaxinf.kfac(),
    "ekfac": lambda: jaxinf.ekfac(),
}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_by_layer_sums_to_influences_for_every_solver(name):
    p = models.mlp_problem("plain", n_train=12, n_test=4)
    model = jaxinf.InfluenceModel(
        p.loss_fn, p.params, SOLVERS[name](), damping=0.5, curvature="gauss_newton", model_fn=p.model_fn,
        output_loss=p.output_loss,
    ).fit(p.train, key=jax.random.key(0))  # fmt: skip
    parts = [jax.tree.map(lambda a, s=s: a[s], p.train) for s in (slice(0, 4), slice(4, 8), slice(8, 12))]
    by_layer = breakdown.influences_by_layer(model, p.test, parts)
    full = model.influences(p.test, p.train)
    assert all(v.shape == (4, 12) for v in by_layer.values())
    np.testing.assert_allclose(sum(by_layer.values()), full, atol=1e-8 * float(jnp.max(jnp.abs(full))), rtol=0)
    whole = breakdown.influences_by_layer(model, p.test, p.train)
    for key, value in whole.items():
        np.testing.assert_allclose(by_layer[key], value, atol=1e-12, rtol=0)


def _scan_lm(p, ids, d=None):
    """Token and positional embeddings, a ``lax.scan`` over stacked residual layers (weight and bias per step), a
    readout. The positional table is read with ``arange(T)``: its locations get their positions from their uses.

    With ``d`` (params-shaped, leading ``T``): ``W + δ_t`` at position ``t`` (of every step's slice)."""
    pos = jnp.arange(ids.shape[-1])
    x = p["emb"][ids] + p["pos"][pos] + (0 if d is None else d["emb"][pos, ids] + d["pos"][pos, pos])

    def body(x, inp):
        w, b, dw, db = inp
        y = x @ w + b + (0 if dw is None else jnp.einsum("...td,tde->...te", x, dw) + db)
        return x + jnp.tanh(y), None

    moved = (None, None) if d is None else (jnp.moveaxis(d["w"], 1, 0), jnp.moveaxis(d["b"], 1, 0))
    x, _ = jax.lax.scan(body, x, (p["w"], p["b"], *moved))
    return x @ p["out"] + (0 if d is None else jnp.einsum("...td,tdv->...tv", x, d["out"]))


def test_scan_over_layers_by_token_matches_per_position_copies():
    steps, width, seq = 3, 3, 4
    k = jax.random.split(jax.random.key(0), 5)
    p = {
        "emb": jax.random.normal(k[0], (V, width)),
        "w": jax.random.normal(k[1], (steps, width, width)),
        "b": 0.1 * jax.random.normal(k[2], (steps, width)),
        "out": jax.random.normal(k[3], (width, V)),
        "pos": jax.random.normal(k[4], (seq, width)),
    }
    ids = jax.random.randint(k[4], (6, seq), 0, V)
    batch = (ids, jnp.roll(ids, -1, 1))

    def loss(params, b, d=None):
        return _ce(_scan_lm(params, b[0], d), b[1])

    tracer = loss_tracer(loss, p, batch)
    assert {layer.name: layer.steps for layer in tracer.tags.layers} == {"['emb']": 0, "['out']": 0, "['pos']": 0,
                                                                         "['w']": steps}  # fmt: skip
    tm = token_map(tracer, p, batch, 1)
    factors = models.random_factors(p, 2, seed=9)
    got = jax.jit(contract_by_token, static_argnums=(0, 1))(tracer, tm, p, factors, batch)
    zeros = jax.tree.map(lambda a: jnp.zeros((seq, *a.shape)), p)
    grads = jax.jit(jax.vmap(lambda ex: jax.grad(lambda d: loss(p, (ex[0][None], ex[1][None]), d))(zeros)))(batch)
    brute = sum(jnp.einsum("f...,nt...->fnt", factors[n], grads[n]) for n in p)
    np.testing.assert_allclose(got.by_token, brute, atol=TOL, rtol=0)
    np.testing.assert_allclose(got.unattributed, 0.0, atol=TOL)  # every leaf is in a layer


def test_shifted_targets_from_one_token_array():
    """``inputs = tokens[:, :-1]``, ``targets = tokens[:, 1:]``: locations read positions 0..T-2 of T tokens."""
    from jaxinf.scoring import contract
    from jaxinf.scoring.tokenwise import tokenwise_scores

    k = jax.random.split(jax.random.key(3), 3)
    p = {"emb": jax.random.normal(k[0], (V, 3)), "out": jax.random.normal(k[1], (3, V))}

    def loss(params, tokens):
        return _ce(params["emb"][tokens[:, :-1]] @ params["out"], tokens[:, 1:])

    tokens = jax.random.randint(k[2], (4, 5), 0, V)
    tracer = loss_tracer(loss, p, tokens)
    tm = token_map(tracer, p, tokens, 1)
    assert tm.length == 5
    for pos in tm.positions:
        np.testing.assert_array_equal(pos, np.arange(4))
    factors = jax.tree.map(lambda a: jax.random.normal(jax.random.key(5), (2, *a.shape)), p)
    got = tokenwise_scores(tracer, p, factors, tokens, sequence_axis=1)
    np.testing.assert_allclose(got.by_token.sum(-1), contract(loss, p, factors, tokens, "gradients"), atol=TOL, rtol=0)
    np.testing.assert_array_equal(got.by_token[..., -1], 0.0)  # the last token is only a target
