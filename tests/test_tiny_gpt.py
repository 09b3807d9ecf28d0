"""examples/tiny_gpt.py at its tiny size (float64): it trains, every weight is tagged (the norms as exact blocks), in
the plain and the scan-over-layers build, EK-FAC scores a completion, and the completion-measurement influence
equals a dense float64 reference ``∇f(test)ᵀ (G + λI)⁻¹ ∇ℓ(train_j)`` built from the full Jacobian."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jaxinf

PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "tiny_gpt.py"
_spec = importlib.util.spec_from_file_location("tiny_gpt", PATH)
tiny_gpt = sys.modules.setdefault("tiny_gpt", importlib.util.module_from_spec(_spec))  # dataclasses look it up
_spec.loader.exec_module(tiny_gpt)

DAMPING = 1e-2


@pytest.fixture(scope="module")
def trained():
    lm, params = tiny_gpt.build("tiny", dtype=jnp.float64)
    data = lm.sequences(jnp.float64)
    before = float(lm.loss_fn(params, data)) / lm.config.seq_len
    params, losses = tiny_gpt.train(lm, params, steps=80)
    return lm, params, data, before, losses


def _query(lm):
    """Two prompts with a completion each (tiny: 9 characters per sequence)."""
    a, b = lm.query("better th", "an", jnp.float64), lm.query("is bet", "ter", jnp.float64)
    return jnp.concatenate([a[0], b[0]]), jnp.concatenate([a[1], b[1]])


def test_tiny_gpt_trains_below_the_unigram_entropy(trained):
    lm, params, data, before, losses = trained
    after = float(lm.loss_fn(params, data)) / lm.config.seq_len  # nats per character
    assert losses.shape == (80,) and np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.5 * lm.config.seq_len
    assert after < lm.unigram_entropy() < before  # better than any context-free model of the characters


def test_query_batch_masks_the_completion():
    lm, _ = tiny_gpt.build("tiny")
    tokens, mask = lm.query("Sparse is better than ", "dense.")
    assert lm.decode(tokens[0]) == "an dense."[-9:]
    np.testing.assert_array_equal(mask[0], [0, 0, 1, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="completion"):
        lm.query("x", "123456789")


@pytest.mark.parametrize("scan", [False, True], ids=["blocks", "scan_over_layers"])
def test_every_weight_is_tagged_and_norms_are_exact_blocks(scan):
    cfg = dataclasses.replace(tiny_gpt.SIZES["tiny"], layers=2)
    lm, params = tiny_gpt.build(cfg, scan=scan, dtype=jnp.float64)
    tokens, mask = lm.sequences(jnp.float64)
    rows = {path: (treatment, detail) for path, _, treatment, detail in
            jaxinf.find_layers(lm.loss_fn, params, (tokens[:4], mask[:4])).rows()}  # fmt: skip
    assert len(rows) == len(jax.tree.leaves(params))
    norms = {path for path in rows if any(f"['{ln}']" in path for ln in ("ln1", "ln2", "ln_f"))}
    assert len(norms) == (6 if scan else 10)  # scale and bias of ln_f and of each block's ln1, ln2 (stacked if scan)
    for path, (treatment, detail) in rows.items():
        if path in norms:
            assert treatment == "fallback: block", (path, treatment, detail)  # an exact block of the curvature
        else:
            assert not treatment.startswith("fallback"), (path, treatment, detail)
    assert rows["['embed']['embedding'].value"][0] == "embedding table (auto)"
    assert rows["['pos']['embedding'].value"][0] == "embedding table (auto)"
    if scan:
        assert "stacked ×2 under lax.scan" in rows["['blocks']['attn']['query']['kernel'].value"][0]


def test_scan_over_layers_build_equals_the_loop_build():
    """The stacked blocks under ``jax.lax.scan`` compute what the same weights do as a Python loop of blocks."""
    cfg = dataclasses.replace(tiny_gpt.SIZES["tiny"], layers=2)
    lm_scan, stacked = tiny_gpt.build(cfg, scan=True, dtype=jnp.float64)
    lm_loop, looped = tiny_gpt.build(cfg, dtype=jnp.float64, seed=1)
    looped = dict(looped, **{k: stacked[k] for k in ("embed", "pos", "ln_f", "head")})
    looped["blocks"] = {i: jax.tree.map(lambda a, i=i: a[i], stacked["blocks"]) for i in range(2)}
    batch = jax.tree.map(lambda a: a[:4], lm_scan.sequences(jnp.float64))
    np.testing.assert_allclose(lm_scan.model_fn(stacked, batch), lm_loop.model_fn(looped, batch), atol=1e-12, rtol=0)


def _fitted(lm, params, data, solver):
    model = jaxinf.InfluenceModel(None, params, solver, damping=DAMPING, curvature="gauss_newton",
                                  model_fn=lm.model_fn, output_loss=lm.output_loss)  # fmt: skip
    return model.fit(data, key=jax.random.key(0))


@pytest.mark.slow
def test_ekfac_scores_a_completion(trained):
    lm, params, data, _, _ = trained
    model = _fitted(lm, params, data, jaxinf.ekfac(likelihood="categorical"))
    scores = model.influences(_query(lm), data, measurement=lm.completion_logprob)
    assert scores.shape == (2, data[0].shape[0])
    assert np.all(np.isfinite(scores)) and np.abs(scores).max() > 0


def _dense_ggn(lm, params, batch):
    """``G = Σ_{n,t} w_nt J_ntᵀ (diag p_nt − p_nt p_ntᵀ) J_nt`` with the full Jacobian of the logits (jacfwd)."""
    return jax.jit(_ggn, static_argnums=0)(lm, params, batch)  # jitted: eager op-by-op dispatch is slow


def _ggn(lm, params, batch):
    flat, unravel = ravel_pytree(params)
    jac = jax.jacfwd(lambda w: lm.model_fn(unravel(w), batch))(flat)  # (n, T, V, P)
    probs = jax.nn.softmax(lm.model_fn(params, batch), -1)
    w = batch[1] / batch[1].shape[0]  # the loss's weight of each token
    pj = jnp.einsum("ntv,ntvp->ntp", probs, jac)
    return jnp.einsum("ntvp,ntv,ntvq->pq", jac, probs * w[..., None], jac) - jnp.einsum("ntp,nt,ntq->pq", pj, w, pj)


def _per_example_grads(fn, params, batch):
    flat, unravel = ravel_pytree(params)
    one = jax.grad(lambda f, b: fn(unravel(f), jax.tree.map(lambda a: a[None], b)))
    return jax.jit(jax.vmap(one, in_axes=(None, 0)))(flat, batch)


@pytest.mark.slow
def test_completion_influence_equals_dense_float64_reference(trained):
    """``I[i, j] = ∇f(query_i)ᵀ (G + λI)⁻¹ ∇ℓ(train_j)``, f = log p(completion | prompt), G the dense GGN."""
    lm, params, data, _, _ = trained
    train = jax.tree.map(lambda a: a[:16], data)
    query = _query(lm)
    got = _fitted(lm, params, train, jaxinf.direct()).influences(query, train, measurement=lm.completion_logprob)

    ggn = _dense_ggn(lm, params, train)
    g_query = _per_example_grads(lm.completion_logprob, params, query)
    g_train = _per_example_grads(lm.loss_fn, params, train)
    want = g_query @ jnp.linalg.solve(ggn + DAMPING * jnp.eye(ggn.shape[0]), g_train.T)
    assert np.abs(want).max() > 1e-3  # a non-trivial reference
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.abs(want).max())
    # the measurement is not the loss: with the loss of the whole query sequence in place of f the reference differs
    whole = (query[0], jnp.ones_like(query[1]))
    loss_side = _per_example_grads(lm.loss_fn, params, whole) @ jnp.linalg.solve(
        ggn + DAMPING * jnp.eye(ggn.shape[0]), g_train.T
    )
    assert not np.allclose(loss_side, want, rtol=0.1, atol=0)
