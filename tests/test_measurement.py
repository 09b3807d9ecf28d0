"""Measurement functions: ``influences(test, train, measurement=f)`` against dense float64 references.

``I[i, j] = ∇θf(test_i)ᵀ (H + λI)⁻¹ ∇θℓ(train_j)`` with ``H = jax.hessian`` of the mean training loss; the
measurement replaces the loss on the test side only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jaxinf
from jaxinf import scale
from tests import models

DAMPING = 4.0  # above -(most negative Hessian eigenvalue) = 3.24: CG needs H + λI positive definite


def _problem():
    p = models.mlp_problem("plain", n_train=12, n_test=5)

    def first_output(params, batch):  # "one logit": the mean of output 0 over the batch
        return jnp.mean(p.model_fn(params, batch)[:, 0])

    return p, first_output


def _reference(p, measurement, test, train):
    flat, unravel = ravel_pytree(p.params)
    hess = models.dense_hessian(p.loss_fn, p.params, p.train)
    g_test = models.dense_grads(measurement, p.params, test)
    g_train = models.dense_grads(p.loss_fn, p.params, train)
    factors = jnp.linalg.solve(hess + DAMPING * jnp.eye(flat.size), g_test.T).T
    return factors, factors @ g_train.T


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_measurement_matches_dense_reference(solver):
    p, f = _problem()
    made = jaxinf.direct() if solver == "direct" else jaxinf.cg(rtol=1e-13, maxiter=500)
    tol = 1e-10 if solver == "direct" else 1e-8
    model = jaxinf.InfluenceModel(p.loss_fn, p.params, made, damping=DAMPING).fit(p.train)
    ref_factors, ref = _reference(p, f, p.test, p.train)
    np.testing.assert_allclose(model.influences(p.test, p.train, measurement=f), ref, atol=tol, rtol=0)
    factors = model.influence_factors(p.test, measurement=f)
    np.testing.assert_allclose(jax.vmap(lambda t: ravel_pytree(t)[0])(factors), ref_factors, atol=tol, rtol=0)
    # more test points than training points: the training side is solved and contracted with ∇f(test)
    small = jax.tree.map(lambda a: a[:3], p.train)
    for scoring in ("jvp", "gradients") if solver == "direct" else ("auto",):
        model.scoring = scoring
        got = model.influences(p.test, [small], measurement=f)
        np.testing.assert_allclose(got, _reference(p, f, p.test, small)[1], atol=tol, rtol=0)
    # and it differs from the loss's influences (the measurement is used)
    assert not np.allclose(model.influences(p.test, p.train), ref, atol=1e-3)


def test_measurement_equal_to_the_loss_gives_the_default_with_a_scorer():
    """With a solver that has its own scorer (EK-FAC), ``measurement=loss_fn`` goes through ``solve``: same numbers."""
    p, _ = _problem()
    op = jaxinf.curvature_operator(
        None, p.params, p.train, kind="gauss_newton", model_fn=p.model_fn, output_loss=p.output_loss, damping=0.1
    )
    solver = jaxinf.ekfac(fisher="exact")
    model = jaxinf.InfluenceModel(
        p.loss_fn, p.params, solver, damping=0.1, curvature="gauss_newton", model_fn=p.model_fn,
        output_loss=p.output_loss,
    ).fit(p.train)  # fmt: skip
    assert op.num_examples == model.n_train
    default = model.influences(p.test, p.train)
    np.testing.assert_allclose(model.influences(p.test, p.train, measurement=p.loss_fn), default, atol=1e-10, rtol=0)


def test_bad_measurements_raise_clearly():
    p, f = _problem()
    model = jaxinf.InfluenceModel(p.loss_fn, p.params, jaxinf.direct(), damping=DAMPING).fit(p.train)
    per_example = lambda q, b: p.model_fn(q, b)[:, 0]  # noqa: E731
    summed = lambda q, b: jnp.sum(p.model_fn(q, b)[:, 0])  # noqa: E731
    with pytest.raises(ValueError, match=r"measurement must return a float scalar.*shape \(5,\)"):
        model.influences(p.test, p.train, measurement=per_example)
    with pytest.raises(ValueError, match=r"measurement sums over the examples"):
        model.influence_factors(p.test, measurement=summed)
    with pytest.raises(TypeError, match=r"measurement must be a callable"):
        model.influences(p.test, p.train, measurement="logit")
    with pytest.raises(TypeError):  # self-influence has the loss on both sides: no measurement
        model.self_influence(p.test, measurement=f)


def test_calculator_with_measurement(tmp_path):
    p, f = _problem()
    model = jaxinf.InfluenceModel(p.loss_fn, p.params, jaxinf.direct(), damping=DAMPING).fit(p.train)
    train = scale.ArraySource(p.train, batch_size=4)
    out = scale.compute_influences(model, p.test, train, tmp_path / "m", measurement=f, test_block=3, progress=False)
    np.testing.assert_allclose(out[:], _reference(p, f, p.test, p.train)[1], atol=1e-10, rtol=0)
    # a store computed with a measurement is not resumed without it (nor the other way round)
    with pytest.raises(ValueError, match=r"measurement"):
        scale.compute_influences(model, p.test, train, tmp_path / "m", test_block=3, progress=False)
    with pytest.raises(ValueError, match=r"measurement must return a float scalar"):
        scale.compute_influences(
            model, p.test, train, tmp_path / "n", measurement=lambda q, b: p.model_fn(q, b), progress=False
        )
