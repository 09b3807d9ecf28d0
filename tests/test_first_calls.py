"""A ragged last batch runs the programs of the full batches (issue 15, "first calls").

Scoring a list of batches whose last one is smaller (1,000 examples in
batches of 64: the last has 40) used to compile every per-batch step again
at the last batch's shape. The planner now pads it to the size of the
largest batch (:func:`jaxinf.solvers.planned.pad_rows`) and drops the padded
rows' outputs when the parts are joined. Checked here: the same influences as
one batch (float64, 1e-12), and no more XLA compilations than a list of equal
batches (counted from JAX's compile events, caches cleared before each count).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring

import jaxinf
from jaxinf.solvers import compiled, planned
from tests import models

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_COUNT = {"on": False, "n": 0}


def _listen(event: str, duration: float, **kwargs) -> None:
    if _COUNT["on"] and event == BACKEND_COMPILE:
        _COUNT["n"] += 1


monitoring.register_event_duration_secs_listener(_listen)


model_fn, output_loss, loss_fn = models.tanh_model_fn, models.mse_output_loss, models.tanh_loss_fn


@pytest.fixture(scope="module")
def data():
    kx, kw, kv = jax.random.split(jax.random.key(11), 3)
    x = jax.random.normal(kx, (48, 3))
    y = jnp.cos(x @ jnp.ones(3))
    params = {"w1": 0.5 * jax.random.normal(kw, (3, 4)), "w2": jax.random.normal(kv, (4,))}
    return params, (x[:40], y[:40]), (x[40:], y[40:])


def _split(batch, sizes):
    starts = np.cumsum([0, *sizes])
    return [jax.tree.map(lambda a, s=s, e=e: a[s:e], batch) for s, e in zip(starts[:-1], starts[1:])]


def _model(params, train, factory):
    kw = dict(damping=0.1, curvature="gauss_newton", model_fn=model_fn, output_loss=output_loss)
    return jaxinf.InfluenceModel(loss_fn, params, factory(), **kw).fit(train)


def _all(model, batches, test):
    """Every scoring entry point with ``batches`` on the training side, then on the test side."""
    return [
        model.influences(test, batches),
        model.self_influence(batches),
        model.influence_factors(batches),
        model.influences(batches, test),  # more test than training points: factors of the training side
        model.influences(test, batches, mode="perturbation"),
    ]


SOLVERS = [jaxinf.direct, jaxinf.ekfac, jaxinf.cg]  # no scorer / a scorer / an iterative solve


@pytest.mark.parametrize("factory", SOLVERS, ids=lambda f: f.__name__)
def test_a_ragged_list_gives_the_numbers_of_one_batch(data, factory):
    params, train, test = data
    model = _model(params, train, factory)
    whole = _all(model, train, test)
    for sizes in ([16, 16, 8], [16, 16, 3, 5]):
        got = _all(model, _split(train, sizes), test)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(whole)):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12 * float(jnp.max(jnp.abs(w))))
    assert model.influences(test, _split(train, [16, 16, 8])).shape == (8, 40)


def _compilations(model, batches, test) -> int:
    jax.clear_caches()
    planned._ROWS.clear()  # the chunk plan is measured again too: both counts start from nothing
    _COUNT["on"], _COUNT["n"] = True, 0
    try:
        jax.block_until_ready(_all(model, batches, test))
    finally:
        _COUNT["on"] = False
    return _COUNT["n"]


@pytest.mark.parametrize("factory", [jaxinf.direct, jaxinf.ekfac], ids=lambda f: f.__name__)
def test_a_ragged_last_batch_compiles_nothing_more(data, factory):
    params, train, test = data
    model = _model(params, train, factory)
    equal = _compilations(model, _split(train, [8] * 5), test)
    ragged = _compilations(model, _split(train, [8, 8, 8, 8, 5]), test)  # 37 examples: last batch of 5
    assert equal > 0  # the listener sees compilations
    assert ragged <= equal, (ragged, equal)
    # and every per-batch step has one program for the list: a further ragged batch size adds none
    steps = (compiled.example_grads, compiled.solve_all, compiled.contract_columns, compiled.call)
    sizes = [f._cache_size() for f in steps]
    jax.block_until_ready(_all(model, _split(train, [8, 8, 8, 8, 3]), test))
    assert [f._cache_size() for f in steps] == sizes


def test_pad_rows_repeats_the_last_example_and_compiles_nothing():
    host = {"x": np.arange(6.0).reshape(3, 2), "y": np.arange(3)}
    padded = planned.pad_rows(host, 5)
    np.testing.assert_array_equal(padded["x"][3:], [[4.0, 5.0], [4.0, 5.0]])
    np.testing.assert_array_equal(padded["y"], [0, 1, 2, 2, 2])
    assert planned.pad_rows(host, 3) is host
    device = jax.tree.map(jnp.asarray, host)
    _COUNT["on"], _COUNT["n"] = True, 0
    try:
        out = jax.block_until_ready(planned.pad_rows(device, 5))
    finally:
        _COUNT["on"] = False
    assert _COUNT["n"] == 0
    np.testing.assert_array_equal(out["y"], [0, 1, 2, 2, 2])


def test_join_drops_the_padded_entries():
    parts = [jnp.arange(8.0).reshape(2, 4), jnp.arange(8.0, 16.0).reshape(2, 4)]
    np.testing.assert_array_equal(planned.join(parts, [4, 1], axis=1), [[0, 1, 2, 3, 8], [4, 5, 6, 7, 12]])
    assert planned.join(parts[:1], [4], axis=1) is parts[0]


def test_a_second_model_reads_the_layer_profile_without_tracing(data, monkeypatch):
    import jaxinf.scoring as scoring

    params, train, test = data
    traced, tracer = [], scoring.loss_tracer
    monkeypatch.setattr(scoring, "loss_tracer", lambda *a: traced.append(1) or tracer(*a))
    monkeypatch.setattr(scoring, "_PROFILES", {})

    def profile_loss(p, batch):  # a loss of its own: no profile of it is kept yet
        return loss_fn(p, batch)

    for _ in range(2):
        model = jaxinf.InfluenceModel(profile_loss, params, jaxinf.direct(), damping=0.1)
        assert model.scoring_method(4, train) in ("gradients", "jvp", "layerwise")
    assert len(traced) == 1
    other = {"w1": params["w1"][:2], "w2": params["w2"]}  # other shapes: traced again
    narrow = (train[0][:, :2], train[1])
    jaxinf.InfluenceModel(profile_loss, other, jaxinf.direct(), damping=0.1).scoring_method(4, narrow)
    assert len(traced) == 2


def test_a_nan_gradient_in_a_ragged_batch_is_counted_without_the_padding(data):
    params, train, _ = data
    x, y = jnp.abs(train[0]), train[1]

    def root_loss(p, batch):  # NaN where x[:, 0] < 0: a loss that is fine on the training data
        return jnp.mean((model_fn(p, batch) - batch[1]) ** 2 * jnp.sqrt(batch[0][:, 0]))

    model = jaxinf.InfluenceModel(root_loss, params, jaxinf.direct(), damping=2.0).fit((x, y))  # positive definite
    bad = (x[8:11].at[2, 0].set(-1.0), y[8:11])
    with pytest.raises(ValueError, match=r"batch 1\].*example 2 first; 1 example\(s\) in all"):
        model.influence_factors([(x[:8], y[:8]), bad])
