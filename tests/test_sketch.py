"""Tests of the shared randomized Nyström sketch (jaxinf.core.sketch)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf.core.sketch import curvature_matvec, nystrom_inverse, nystrom_precondition, randomized_nystrom
from jaxinf.core.tree import ravel, unravel
from tests import models


@functools.partial(jax.jit, static_argnames=("rank", "batch_size"))
def _sketch(a, key, *, rank, batch_size=None):
    return randomized_nystrom(lambda x: a @ x, a.shape[0], rank, key, dtype=a.dtype, batch_size=batch_size)


def _low_rank_psd(p, k, seed, dtype=np.float64):
    """A PSD matrix of rank k with eigenvalues spread over 1e-2..1e1 (built in numpy)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((p, p)))
    w = np.concatenate([np.logspace(1, -2, k), np.zeros(p - k)])
    return jnp.asarray((q * w) @ q.T, dtype), q[:, :k], w[:k]


@pytest.mark.parametrize("rank", [6, 8, 20])
def test_exact_when_rank_at_least_matrix_rank(rank):
    a, _, w = _low_rank_psd(20, 6, 0)
    approx = _sketch(a, jax.random.key(1), rank=rank)
    u, lam = np.asarray(approx.basis), np.asarray(approx.eigvals)
    assert u.shape == (20, rank) and lam.shape == (rank,)
    np.testing.assert_allclose(u.T @ u, np.eye(rank), atol=1e-12)
    np.testing.assert_allclose((u * lam) @ u.T, a, atol=1e-11 * float(jnp.max(w)))
    np.testing.assert_allclose(lam[:6], w, rtol=1e-9)
    np.testing.assert_allclose(lam[6:], 0.0, atol=1e-12)
    assert np.all(np.diff(np.asarray(lam)) <= 0)
    assert float(approx.core_min_eigval) > -1e-10


def test_full_rank_spd_exact():
    m = np.random.default_rng(3).standard_normal((12, 12))
    a = m @ m.T + 0.1 * np.eye(12)
    approx = _sketch(jnp.asarray(a), jax.random.key(4), rank=12)
    u, w = np.asarray(approx.basis), np.asarray(approx.eigvals)
    np.testing.assert_allclose((u * w) @ u.T, a, rtol=1e-10, atol=1e-10)


def test_error_falls_with_rank():
    p = 60
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((p, p)))
    a = (q * 0.7 ** np.arange(p)) @ q.T
    errors = []
    for rank in (5, 15, 40):
        ap = _sketch(jnp.asarray(a), jax.random.key(2), rank=rank)
        u, w = np.asarray(ap.basis), np.asarray(ap.eigvals)
        errors.append(np.linalg.norm((u * w) @ u.T - a, 2))
    assert all(e2 < 0.5 * e1 for e1, e2 in zip(errors, errors[1:])), errors


def test_inverse_and_preconditioner_formulas():
    a, _, _ = _low_rank_psd(15, 4, 5)
    approx = _sketch(a, jax.random.key(6), rank=4)
    b = np.random.default_rng(7).standard_normal(15)
    lam = 0.3
    a = np.asarray(a)
    x = jax.jit(nystrom_inverse)(approx, lam, jnp.asarray(b))
    np.testing.assert_allclose(x, np.linalg.solve(a + lam * np.eye(15), b), rtol=1e-10)
    u, w = np.asarray(approx.basis), np.asarray(approx.eigvals)
    p_inv = (w[-1] + lam) * (u / (w + lam)) @ u.T + np.eye(15) - u @ u.T
    np.testing.assert_allclose(jax.jit(nystrom_precondition)(approx, lam, jnp.asarray(b)), p_inv @ b, rtol=1e-10)
    # With the exact low-rank part, P^{-1}(A + λI) has eigenvalues in {Λ_r + λ, λ}.
    ev = np.sort(np.linalg.eigvals(p_inv @ (a + lam * np.eye(15))).real)
    np.testing.assert_allclose(ev, np.sort(np.r_[np.full(4, w[-1] + lam), np.full(11, lam)]), rtol=1e-8)


def test_jit_vmap_batch_size_and_float32():
    a, _, w = _low_rank_psd(16, 5, 8, np.float32)
    f = jax.jit(lambda key: _sketch(a, key, rank=8, batch_size=3))
    approx = f(jax.random.key(9))
    assert approx.basis.dtype == jnp.float32
    u, lam = np.asarray(approx.basis, np.float64), np.asarray(approx.eigvals, np.float64)
    np.testing.assert_allclose((u * lam) @ u.T, a, atol=1e-4 * w[0])
    keys = jax.random.split(jax.random.key(10), 3)
    batched = jax.vmap(f)(keys)
    assert batched.eigvals.shape == (3, 8)
    # float32: eigenvalue errors are ~ sqrt(p) eps ||A|| in absolute terms.
    np.testing.assert_allclose(batched.eigvals[:, :5], np.broadcast_to(w, (3, 5)), atol=1e-4 * w[0])


def test_zero_operator_is_finite():
    approx = _sketch(jnp.zeros((5, 5)), jax.random.key(0), rank=3)
    assert np.all(np.isfinite(approx.basis))
    np.testing.assert_allclose(approx.eigvals, 0.0, atol=1e-300)


def test_indefinite_operator_flagged():
    a = jnp.diag(jnp.array([2.0, 1.0, -1.0, 0.5, 0.0, 0.0]))
    approx = _sketch(a, jax.random.key(0), rank=6)
    assert float(approx.core_min_eigval) < -1e-3
    assert np.all(np.isfinite(approx.basis)) and np.all(approx.eigvals >= 0)


def test_bad_rank():
    with pytest.raises(ValueError, match="rank must be between 1"):
        randomized_nystrom(lambda x: x, 4, 5, jax.random.key(0))
    with pytest.raises(ValueError, match="batch_size"):
        randomized_nystrom(lambda x: x, 4, 2, jax.random.key(0), batch_size=0)


def test_operator_matvec_is_undamped_and_block_diagonal():
    prob = models.mlp_problem("plain", n_train=5)
    op = jaxinf.curvature_operator(prob.loss_fn, prob.params, prob.train, kind="fisher", damping=0.5)
    x = jax.random.normal(jax.random.key(0), (op.size,))
    full = jax.jit(curvature_matvec(op))(x)
    np.testing.assert_allclose(full, jax.jit(lambda v: ravel(op.curvature_vp(unravel(op.spec, v))))(x), rtol=1e-12)
    opb = jaxinf.curvature_operator(
        prob.loss_fn, prob.params, prob.train, kind="fisher", blocks="parameter", damping=0.5
    )
    assert opb.num_blocks == 4
    damped = jax.jit(lambda v: ravel(opb.matvec(unravel(op.spec, v))))(x)
    blocked = jax.jit(curvature_matvec(opb))(x)
    np.testing.assert_allclose(blocked, damped - 0.5 * x, rtol=1e-10, atol=1e-12)
    assert float(jnp.linalg.norm(blocked - full)) > 1e-6  # the blocks matter
