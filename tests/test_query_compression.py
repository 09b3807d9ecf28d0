"""Low-rank query compression (jaxinf.scoring.query_compression, scale's query_rank, breakdown's query_rank)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf import breakdown, scale
from jaxinf.layers.statistics import loss_tracer
from jaxinf.scoring.layerwise import contract_by_layer
from jaxinf.scoring.low_rank_scores import contract_low_rank, low_rank_factors
from jaxinf.scoring.query_compression import compress_factors
from tests import models

N_TRAIN, N_TEST, BATCH = 13, 5, 5  # a ragged last training batch


@pytest.fixture(scope="module")
def setup():
    p = models.mlp_problem("plain", n_train=N_TRAIN, n_test=N_TEST)
    model = jaxinf.InfluenceModel(
        None, p.params, jaxinf.direct(), damping=1e-2, curvature="gauss_newton", model_fn=p.model_fn,
        output_loss=p.output_loss,
    ).fit(p.train)  # fmt: skip
    tracer = loss_tracer(model.loss_fn, model.params, p.train)
    return p, model, tracer, model.influence_factors(p.test)


def _layer_leaves(tracer, tree, layer):
    leaves = jax.tree.leaves(tree)
    return [leaves[i] for i in (layer.weight, layer.bias) if i is not None]


def test_full_rank_is_exact(setup):
    p, model, tracer, factors = setup
    full = max(min(layer.rows, layer.d_out) for layer in tracer.tags.layers)
    compressed, report = compress_factors(tracer, factors, full)
    for a, b in zip(jax.tree.leaves(compressed), jax.tree.leaves(factors)):
        np.testing.assert_allclose(a, b, atol=1e-10, rtol=0)
    assert report.max_error < 1e-10 and report.rank == full


def test_rank_one_error_is_the_reported_one(setup):
    p, model, tracer, factors = setup
    compressed, report = compress_factors(tracer, factors, 1, params=model.params, batch=p.train)
    assert report.max_error > 1e-3  # a real compression
    for layer in tracer.tags.layers:
        old, new = _layer_leaves(tracer, factors, layer), _layer_leaves(tracer, compressed, layer)
        num = sum(jnp.sum(jnp.reshape(a - b, (N_TEST, -1)) ** 2, axis=1) for a, b in zip(old, new))
        den = sum(jnp.sum(jnp.reshape(a, (N_TEST, -1)) ** 2, axis=1) for a in old)
        np.testing.assert_allclose(report.layer_errors[layer.name], jnp.sqrt(num / den), atol=1e-10, rtol=0)
        for i in range(N_TEST):  # each compressed layer factor has rank one
            assert np.linalg.matrix_rank(np.asarray(layer.to_matrix([x[i] for x in jax.tree.leaves(compressed)]))) == 1
    for fb in tracer.tags.fallbacks:  # leaves outside every layer are kept
        np.testing.assert_array_equal(jax.tree.leaves(compressed)[fb.leaf], jax.tree.leaves(factors)[fb.leaf])
    exact = model.influences_from_factors(factors, p.train)
    approx = model.influences_from_factors(compressed, p.train)
    change = float(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact))
    assert change > 1e-4
    np.testing.assert_allclose(report.score_change, change, rtol=1e-8)
    np.testing.assert_allclose(report.max_score_change, float(jnp.max(jnp.abs(approx - exact))), rtol=1e-8)
    # the per-layer breakdown with query_rank scores the same compressed factors
    by_layer = breakdown.influences_by_layer(model, p.test, p.train, query_rank=1)
    np.testing.assert_allclose(sum(by_layer.values()), approx, atol=1e-10, rtol=0)


def test_bad_rank_and_nothing_to_compress(setup, tmp_path):
    p, model, tracer, factors = setup
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="query_rank must be a positive int"):
            compress_factors(tracer, factors, bad)
        with pytest.raises(ValueError, match="query_rank must be a positive int"):
            scale.InfluenceCalculator(model, query_rank=bad, progress=False)
    with pytest.raises(ValueError, match="both params and batch"):
        compress_factors(tracer, factors, 1, batch=p.train)
    x = np.random.default_rng(0).normal(size=(8, 3))
    plain = jaxinf.InfluenceModel(
        lambda w, b: jnp.mean((b[0] * w - b[1]) ** 2), jnp.ones(3), jaxinf.direct(), damping=0.1
    )
    plain.fit((x, x))
    with pytest.raises(ValueError, match="has none"):
        scale.compute_influences(plain, (x[:2], x[:2]), (x, x), tmp_path / "s", query_rank=1, progress=False)


def test_calculator_query_rank_scores_and_resume(setup, tmp_path):
    p, model, tracer, factors = setup
    kw = {"batch_size": BATCH, "test_block": 2, "progress": False}
    full = scale.compute_influences(model, p.test, p.train, tmp_path / "full", query_rank=64, **kw)
    np.testing.assert_allclose(full[:], model.influences(p.test, p.train), atol=1e-10, rtol=0)
    calc = scale.InfluenceCalculator(model, query_rank=1, test_block=2, progress=False)
    out = calc.run(p.test, p.train, tmp_path / "r1", batch_size=BATCH)
    compressed, _ = compress_factors(tracer, factors, 1)
    exact = model.influences(p.test, p.train)
    np.testing.assert_allclose(out[:], model.influences_from_factors(compressed, p.train), atol=1e-10, rtol=0)
    reports = calc.compression_reports
    assert len(reports) == 3  # test blocks of 2, 2, 1
    tile = (slice(0, 2), slice(0, BATCH))
    change = np.linalg.norm(out[tile] - exact[tile]) / np.linalg.norm(exact[tile])
    np.testing.assert_allclose(reports[0].score_change, change, rtol=1e-8)
    assert reports[0].score_change > 1e-4 and reports[1].score_change is None
    assert all(e.shape == (1,) for e in reports[2].layer_errors.values())  # the last block's one real row
    with pytest.raises(ValueError, match="other arguments.*query_rank"):
        scale.compute_influences(model, p.test, p.train, tmp_path / "r1", query_rank=2, **kw)
    with pytest.raises(ValueError, match="other arguments.*query_rank"):
        scale.compute_influences(model, p.test, p.train, tmp_path / "r1", **kw)
    again = scale.compute_influences(model, p.test, p.train, tmp_path / "r1", query_rank=1, **kw)  # same rank: resumes
    np.testing.assert_array_equal(again[:], out[:])


def test_factored_scores_equal_the_rebuilt_factors_on_transformer_layers():
    """Embedding (ids gathered), per-head projection, attention and a scan over stacked layers, kept factored."""
    from flax import nnx

    from tests.test_tagging_lm import Block, T, V
    from tests.test_tokenwise import _ce, _scan_lm

    graphdef, block = nnx.split(Block(nnx.Rngs(0)), nnx.Param)
    k = jax.random.split(jax.random.key(0), 5)
    scan = {
        "emb": jax.random.normal(k[0], (V, 3)),
        "w": jax.random.normal(k[1], (3, 3, 3)),
        "b": jax.random.normal(k[2], (3, 3)),
        "out": jax.random.normal(k[3], (3, V)),
        "pos": jax.random.normal(k[3], (T, 3)),
    }
    ids = jax.random.randint(k[4], (5, T), 0, V)
    batch = (ids, jnp.roll(ids, -1, axis=1))
    cases = [
        (lambda p, b: _ce(nnx.merge(graphdef, p)(b[0]), b[1]), block),
        (lambda p, b: _ce(_scan_lm(p, b[0]), b[1]), scan),
    ]
    for loss, params in cases:
        tracer = loss_tracer(loss, params, batch)
        factors = models.random_factors(params, 3, seed=7)
        low = low_rank_factors(tracer, factors, 2)
        compressed, _ = compress_factors(tracer, factors, 2)
        got = jax.jit(contract_low_rank, static_argnums=0)(tracer, params, low, batch)
        ref = jax.jit(contract_by_layer, static_argnums=0)(tracer, params, compressed, batch)
        assert got.keys() == ref.keys()
        for name in ref:
            np.testing.assert_allclose(got[name], ref[name], atol=1e-9 * float(jnp.max(jnp.abs(ref[name]))), rtol=0)
