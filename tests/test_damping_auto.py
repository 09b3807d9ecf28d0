"""``damping="auto"``: λ = AUTO_SCALE · tr(C)/P with tr(C) estimated by per-example Rademacher probes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf.core.curvature import curvature_operator, to_dense
from jaxinf.core.damping import AUTO_SCALE, auto_damping, mean_eigenvalue
from tests import models

model_fn, output_loss, loss_fn = models.tanh_model_fn, models.mse_output_loss, models.tanh_loss_fn


@pytest.fixture(scope="module")
def problem():
    kx, kw, kv = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (90, 4))
    y = jnp.sin(x @ jnp.ones(4))
    params = {"w1": 0.5 * jax.random.normal(kw, (4, 5)), "w2": jax.random.normal(kv, (5,))}
    train = [(x[:40], y[:40]), (x[40:80], y[40:80]), (x[80:], y[80:])]  # ragged last batch
    return params, train


def _operator(problem, kind, *, one_batch=False):
    params, train = problem
    data = jax.tree.map(lambda *xs: jnp.concatenate(xs), *train) if one_batch else train
    return curvature_operator(loss_fn, params, data, kind=kind, model_fn=model_fn, output_loss=output_loss)


@pytest.mark.parametrize("kind", ["gauss_newton", "fisher"])
def test_trace_estimate_is_unbiased_against_the_dense_trace(problem, kind):
    op = _operator(problem, kind, one_batch=True)  # one compile; ragged batches: the model test below
    exact = float(np.trace(np.asarray(to_dense(op)))) / op.size
    estimates = np.array([mean_eigenvalue(op, seed=s) for s in range(24)])
    standard_error = estimates.std(ddof=1) / np.sqrt(len(estimates))
    assert estimates.std() > 0  # the probes really are random across seeds
    assert abs(estimates.mean() - exact) < 4 * standard_error + 1e-12


def test_one_parameter_trace_is_exact():
    # P = 1: v_i = ±1, so v_i C_i v_i = C_i and the estimate is the exact mean curvature
    x = jnp.linspace(-1.0, 2.0, 7)
    loss = lambda w, b: jnp.mean(jnp.exp(w * b) - w * b)  # noqa: E731
    op = curvature_operator(loss, jnp.array(0.3), [x[:4], x[4:]])
    exact = float(jnp.mean(x**2 * jnp.exp(0.3 * x)))
    np.testing.assert_allclose(mean_eigenvalue(op), exact, rtol=1e-12)
    np.testing.assert_allclose(auto_damping(op), AUTO_SCALE * exact, rtol=1e-12)


def test_model_with_auto_damping_equals_the_model_with_that_number(problem):
    params, train = problem
    kw = dict(curvature="gauss_newton", model_fn=model_fn, output_loss=output_loss)
    auto = jaxinf.InfluenceModel(loss_fn, params, jaxinf.direct(), damping="auto", **kw)
    assert auto.damping_value is None  # not fitted yet
    auto.fit(train)
    lam = auto.damping_value
    assert auto.damping == "auto"
    np.testing.assert_allclose(lam, AUTO_SCALE * mean_eigenvalue(_operator(problem, "gauss_newton")), rtol=1e-12)
    fixed = jaxinf.InfluenceModel(loss_fn, params, jaxinf.direct(), damping=lam, **kw).fit(train)
    test = (train[0][0][:3], train[0][1][:3])
    np.testing.assert_allclose(auto.influences(test, train), fixed.influences(test, train), rtol=1e-10)
    # new params: the rule runs again on the refit, never keeps the old λ
    auto.params = jax.tree.map(lambda a: 2.0 * a, params)
    assert auto.damping_value != pytest.approx(lam)
    refit = curvature_operator(
        loss_fn, auto.params, train, kind="gauss_newton", model_fn=model_fn, output_loss=output_loss
    )
    np.testing.assert_allclose(auto.damping_value, auto_damping(refit), rtol=1e-12)
    auto.damping = 0.5  # and back to a number
    assert auto.damping_value == pytest.approx(0.5)


def test_auto_damping_refuses_a_hessian_with_non_positive_trace():
    loss = lambda w, b: jnp.mean(jnp.cos(w * b))  # noqa: E731  (negative curvature at w = 0)
    model = jaxinf.InfluenceModel(loss, jnp.array(0.0), jaxinf.direct(), damping="auto")
    with pytest.raises(ValueError, match="gauss_newton"):
        model.fit(jnp.linspace(0.5, 1.0, 6))


def test_auto_is_refused_where_it_cannot_take_effect(problem):
    params, train = problem
    with pytest.raises(ValueError, match="InfluenceModel.fit"):
        curvature_operator(loss_fn, params, train, damping="auto")
    with pytest.raises(ValueError, match="real number"):
        jaxinf.InfluenceModel(loss_fn, params, jaxinf.direct(), damping="Auto")
