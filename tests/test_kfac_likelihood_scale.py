"""A likelihood's output Hessian is scaled to the output loss's own: a loss that averages over positions or outputs.

``ekfac(likelihood="categorical")`` reads an example's loss as ``-Σ_t log p(y_t)`` over its positions and
``"gaussian"`` as ``½‖z - y‖²``. A loss that averages over the ``T`` positions (or a mean squared error over
``m`` outputs) has ``1/T`` (``2/m``) of that curvature; before the scaling, K-FAC's curvature was ``T``
(``m/2``) times too large, silently. The reference is the exact Gauss-Newton matrix of the loss (dense,
float64): EK-FAC with the exact Fisher keeps its trace (the corrected eigenvalues are the exact second
moments in the eigenbasis; trace is basis-free), so the traces must agree to rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxinf
from jaxinf.core.tree import ravel, unravel

B, T, D, V = 24, 4, 3, 5


def _problem():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (B, T, D))
    y = jax.random.randint(k2, (B, T), 0, V)
    params = {"w": 0.3 * jax.random.normal(k3, (D, V)), "b": jnp.zeros(V)}
    return params, (x, y)


def model_fn(p, batch):
    return jnp.tanh(batch[0]) @ p["w"] + p["b"]


def ce_mean(z, batch):  # mean over examples and positions: optax's usual reduction
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, batch[1]))


def ce_sum(z, batch):  # summed over positions, mean over examples
    return jnp.mean(jnp.sum(optax.softmax_cross_entropy_with_integer_labels(z, batch[1]), axis=-1))


def mse_mean(z, batch):  # mean squared error over every output of every position
    return jnp.mean((z - jax.nn.one_hot(batch[1], V)) ** 2)


def _dense(op, apply):
    eye = jnp.eye(op.size, dtype=jnp.float64)
    return jax.jit(jax.vmap(lambda e: ravel(apply(unravel(op.spec, e)))))(eye)


def _ekfac_curvature(op, solver):
    state = solver.init(op)
    inverse = _dense(op, lambda v: solver.solve(state, v)[0])  # (K + λI)⁻¹
    return np.linalg.inv(np.asarray(inverse)) - op.damping[0] * np.eye(op.size)


def _gauss_newton(output_loss, damping=1e-6):
    params, data = _problem()
    return jaxinf.curvature_operator(
        None, params, data, kind="gauss_newton", model_fn=model_fn, output_loss=output_loss, damping=damping
    )


@pytest.mark.parametrize(
    "output_loss, likelihood", [(ce_mean, "categorical"), (ce_sum, "categorical"), (mse_mean, "gaussian")]
)
def test_likelihood_curvature_has_the_loss_trace(output_loss, likelihood):
    op = _gauss_newton(output_loss)
    ggn = np.asarray(_dense(op, op.curvature_vp))
    k_lik = _ekfac_curvature(op, jaxinf.ekfac(fisher="exact", likelihood=likelihood))
    np.testing.assert_allclose(np.trace(k_lik), np.trace(ggn), rtol=1e-6)


def test_scaled_categorical_equals_the_fit_by_the_loss_hessian():
    op = _gauss_newton(ce_mean)
    k_lik = _ekfac_curvature(op, jaxinf.ekfac(fisher="exact", likelihood="categorical"))
    k_loss = _ekfac_curvature(op, jaxinf.ekfac(fisher="exact"))  # the output loss's own Hessian, no likelihood
    np.testing.assert_allclose(k_lik, k_loss, atol=1e-8 * np.abs(k_loss).max())


def test_sampled_categorical_draws_have_the_loss_scale():
    op = _gauss_newton(ce_mean)
    ggn_trace = np.trace(np.asarray(_dense(op, op.curvature_vp)))
    sampled = jaxinf.ekfac(fisher="sampled", likelihood="categorical", num_samples=64)
    trace = np.trace(_ekfac_curvature(op, sampled))
    # a Monte-Carlo estimate (24 examples x 4 positions x 64 draws): within 10 %; unscaled it was 4x (T) too large
    assert abs(trace / ggn_trace - 1.0) < 0.1, trace / ggn_trace


def test_without_an_output_loss_the_sum_convention_is_assumed():
    params, data = _problem()

    def loss(p, batch):
        return ce_sum(model_fn(p, batch), batch)

    hess = jaxinf.curvature_operator(loss, params, data, kind="hessian", damping=1e-6)
    ggn = _gauss_newton(ce_sum)
    solver = jaxinf.ekfac(fisher="exact", likelihood="categorical", model_fn=model_fn)
    np.testing.assert_allclose(
        np.trace(_ekfac_curvature(hess, solver)), np.trace(np.asarray(_dense(ggn, ggn.curvature_vp))), rtol=1e-6
    )
