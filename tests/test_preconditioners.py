"""Pre-conditioners: the Hutchinson diagonal and the randomized Nyström pre-conditioner, on dense references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf.core.curvature import to_dense
from jaxinf.core.tree import ravel, unravel
from jaxinf.solvers.preconditioners import hutchinson_diagonal
from tests import models

_dense = jax.jit(to_dense)


@pytest.fixture(scope="module")
def logistic():
    p = models.logistic_problem(l2=1e-2)
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, blocks="parameter",
                                   damping={"['b']": 0.2, "['w']": 0.05})
    return op, np.asarray(_dense(op))


def _apply_dense(pre, state, op):
    """``M⁻¹`` as a dense matrix, column by column."""
    return np.asarray(jax.jit(jax.vmap(lambda e: ravel(pre.apply(state, unravel(op.spec, e)))))(jnp.eye(op.size))).T


def test_hutchinson_diagonal_is_unbiased_within_its_standard_error(logistic):
    op, dense = logistic
    estimate = jax.jit(hutchinson_diagonal, static_argnums=(1,), static_argnames="batch_size")
    d, se = estimate(op, 400, jax.random.key(0), batch_size=64)  # 400 = 6 chunks of 64 + 16, last chunk masked
    truth = np.diag(dense)
    assert bool(jnp.all(se > 0))
    assert np.all(np.abs(np.asarray(d) - truth) <= 5 * np.asarray(se))
    # the standard error matches its formula sqrt(Σ_{j≠i} A_ij² / s) to sampling accuracy
    off = np.sqrt((np.sum(dense**2, axis=1) - truth**2) / 400)
    np.testing.assert_allclose(se, off, rtol=0.25)


def test_hutchinson_is_exact_on_a_diagonal_operator():
    def loss(w, batch):
        return 0.5 * jnp.mean((batch[0] @ w - batch[1]) ** 2)

    x = jnp.diag(jnp.array([1.0, 10.0, 100.0, 0.0]))
    op = jaxinf.curvature_operator(loss, jnp.zeros(4), (x, jnp.ones(4)), damping=1e-3)
    pre = jaxinf.jacobi_preconditioner(num_samples=3)
    state = pre.init(op, jax.random.key(1))
    np.testing.assert_allclose(state.diagonal, np.array([1.0, 100.0, 1e4, 0.0]) / 4 + 1e-3, rtol=1e-12)
    # no spread across probes: the standard error is zero up to the cancellation in Σx² − s·mean² (~sqrt(eps)·d)
    assert np.all(np.asarray(state.std_error) <= 1e-6 * np.asarray(state.diagonal))
    # M⁻¹ = diag(C + λ)⁻¹ exactly; the zero-curvature entry is floored at its damping, not at 0
    got = ravel(pre.apply(state, jnp.ones(4)))
    np.testing.assert_allclose(got, 1.0 / (np.array([1.0, 100.0, 1e4, 0.0]) / 4 + 1e-3), rtol=1e-12)


def test_jacobi_floor_keeps_the_preconditioner_positive(logistic):
    op, dense = logistic
    pre = jaxinf.jacobi_preconditioner(num_samples=2)  # a very noisy estimate
    state = jax.jit(pre.init)(op, jax.random.key(2))
    m = 1.0 / np.asarray(ravel(state.inverse_diagonal))
    damping = np.asarray(ravel(op.damping_vp(unravel(op.spec, jnp.ones(op.size)))))
    assert np.all(m >= damping) and np.all(m >= 2 * np.asarray(state.std_error) - 1e-15)
    assert np.all(np.isfinite(m))
    inv = _apply_dense(pre, state, op)
    np.testing.assert_allclose(inv, np.diag(1.0 / m), atol=1e-15)


def test_nystrom_preconditioner_full_rank_and_spd(logistic):
    op, _ = logistic
    # full rank: the sketch is exact and P⁻¹ (C + μI) = (Λ_r + μ) I, with μ the size-weighted mean damping
    mean_damping = (0.2 * 3 + 0.05 * 9) / 12
    single = jaxinf.curvature_operator(*_scalar_damping_problem(), damping=mean_damping)
    c_mu = np.asarray(_dense(single))
    pre = jaxinf.nystrom_preconditioner(rank=single.size)
    state = jax.jit(pre.init)(single, jax.random.key(0))
    np.testing.assert_allclose(state.damping, mean_damping, rtol=1e-12)
    inv = _apply_dense(pre, state, single)
    lam_r = float(state.approximation.eigvals[-1])
    np.testing.assert_allclose(inv @ c_mu, (lam_r + mean_damping) * np.eye(single.size), atol=1e-8)
    # rank < p, per-block damping: P⁻¹ symmetric positive definite
    pre4 = jaxinf.nystrom_preconditioner(rank=4, batch_size=2)
    state4 = jax.jit(pre4.init)(op, jax.random.key(1))
    np.testing.assert_allclose(state4.damping, mean_damping, rtol=1e-12)
    inv4 = _apply_dense(pre4, state4, op)
    np.testing.assert_allclose(inv4, inv4.T, atol=1e-12)
    assert np.linalg.eigvalsh(inv4).min() > 0


def _scalar_damping_problem():
    p = models.logistic_problem(l2=1e-2)
    return p.loss_fn, p.params, p.train


def test_bad_configuration():
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        jaxinf.jacobi_preconditioner(num_samples=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        jaxinf.jacobi_preconditioner(batch_size=0)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        jaxinf.nystrom_preconditioner(rank=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        jaxinf.nystrom_preconditioner(rank=2, batch_size=1.5)
