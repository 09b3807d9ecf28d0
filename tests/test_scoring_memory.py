"""Scoring memory plan of InfluenceModel (issue 15): chunked scoring gives the same numbers, or a clear refusal.

The issue's case (``ekfac(factor_dtype=jnp.float64)`` on the 5,110-parameter
Linen CNN of ``benchmarks/bench_slow_paths.py``, 1,000 × 1,000 points): XLA's
memory analysis of the scorer's ``finish`` step shows a float64
``(1000, 1000·30, 8, 8)`` temporary (15.4 GB: every training input convolved
with all factors as kernels), and ``prepare`` as much; planned at a 1 GiB
budget both run in chunks of 70 examples (peak RSS 0.6 GiB) and give the
same scores as at 2 GiB (139 per chunk) to 7e-17 relative. Here a small CNN
and a budget between one example's and the whole batch's bytes force the
same chunking.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf.core.memory import extra_bytes, plan_rows, take_rows
from jaxinf.solvers import compiled
from jaxinf.solvers.planned import check_budget
from tests import models


@pytest.fixture(scope="module")
def cnn():
    return models.cnn_problem(n_train=12, n_test=5, size=6)


def _model(p, solver, budget=None, **kw):
    model = jaxinf.InfluenceModel(p.loss_fn, p.params, solver, damping=0.1, memory_budget_bytes=budget, **kw)
    return model.fit(p.train)


def test_ekfac_float64_scores_are_the_same_in_chunks(cnn):
    p = cnn
    whole = _model(p, jaxinf.ekfac(factor_dtype=jnp.float64))
    expected = whole.influences(p.test, p.train)
    scorer = whole.solver.scorer
    prepared = compiled.call(scorer.prepare, whole.state, whole.operator, p.test)
    full = extra_bytes(compiled.call, scorer.finish, whole.state, whole.operator, prepared, p.train)
    one = extra_bytes(compiled.call, scorer.finish, whole.state, whole.operator, prepared, take_rows(p.train, 0, 1))
    prep = extra_bytes(compiled.call, scorer.prepare, whole.state, whole.operator, take_rows(p.test, 0, 1))
    budget = max((full + one) // 2, prep)
    assert one < budget < full
    chunked = _model(p, jaxinf.ekfac(factor_dtype=jnp.float64), budget)
    got = chunked.influences(p.test, p.train)
    rows = chunked._planner.last_rows
    assert rows["scorer.finish (training side)"] < 12, (rows, prep, budget)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10 * float(jnp.max(jnp.abs(expected))))


@pytest.mark.parametrize("scoring", ["gradients", "jvp"])
def test_direct_columns_and_factors_are_the_same_in_chunks(scoring):
    p = models.cnn_problem(n_train=160, n_test=5, size=6)
    kw = dict(scoring=scoring, curvature="gauss_newton", model_fn=p.model_fn, output_loss=p.output_loss)
    whole = _model(p, jaxinf.direct(), **kw)
    expected, factors = whole.influences(p.test, p.train), whole.influence_factors(p.test)
    fn, state = whole.operator.loss_fn, whole.state
    full = extra_bytes(compiled.contract_columns, fn, p.params, factors, p.train, scoring)
    one = extra_bytes(compiled.contract_columns, fn, p.params, factors, take_rows(p.train, 0, 1), scoring)
    grads = jax.eval_shape(compiled.example_grads, fn, p.params, p.test)
    test_side = extra_bytes(compiled.example_grads, fn, p.params, p.test) + extra_bytes(
        compiled.solve_all, state, grads, solver=whole.solver
    )
    budget = max((full + one) // 2, test_side)
    assert budget < full
    chunked = _model(p, jaxinf.direct(), budget, **kw)
    got = chunked.influences(p.test, p.train)
    assert chunked._planner.last_rows[f"scoring ({scoring})"] < 160
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10 * float(jnp.max(jnp.abs(expected))))
    got_self = chunked.self_influence(p.train)  # 160 test-side examples: the factors are chunked too
    assert chunked._planner.last_rows["test gradients and factors"] < 160
    np.testing.assert_allclose(got_self, whole.self_influence(p.train), rtol=1e-10)


def test_an_impossible_budget_raises_with_the_number(cnn):
    p = cnn
    model = _model(p, jaxinf.ekfac(factor_dtype=jnp.float64), 1000)
    with pytest.raises(ValueError, match=r"needs .* even for one example at a time .* memory budget of 1000 B\. "
                                         r"Pass fewer test points"):
        model.influences(p.test, p.train)
    with pytest.raises(ValueError, match="memory budget of 1000 B"):
        _model(p, jaxinf.direct(), 1000).influences(p.test, p.train)


def test_plan_rows_arithmetic():
    measure = lambda r: 100 + 10 * r  # noqa: E731  affine bytes
    assert plan_rows(measure, 50, 10_000, "x", "") == 50  # fits: one call
    assert plan_rows(measure, 50, 300, "x", "") == 20  # 100 + 10·20 = 300
    with pytest.raises(ValueError, match=r"x needs 110 B even for one example .* 600 B\)"):
        plan_rows(measure, 50, 109, "x", "")
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="memory_budget_bytes must be a positive int"):
            check_budget(bad)
    assert check_budget(None) is None and check_budget(np.int64(5)) == 5


def test_take_rows_pads_with_the_last_example():
    tree = {"x": jnp.arange(5.0)}
    assert take_rows(tree, 0, 5) is tree
    np.testing.assert_array_equal(take_rows(tree, 3, 4)["x"], [3.0, 4.0, 4.0, 4.0])
    jax.block_until_ready(take_rows(tree, 0, 2))
