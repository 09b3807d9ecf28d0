"""Tests of the shared randomized Nyström sketch (jaxinf.sketch)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf.sketch import (
    curvature_matvec,
    nystrom_inverse,
    nystrom_of_operator,
    nystrom_precondition,
    randomized_nystrom,
)
from tests import models


def _low_rank_psd(p, k, key, dtype=jnp.float64):
    """A PSD matrix of rank k with eigenvalues spread over 1e-2..1e1."""
    q, _ = jnp.linalg.qr(jax.random.normal(key, (p, p), dtype))
    w = jnp.concatenate([jnp.logspace(1, -2, k, dtype=dtype), jnp.zeros(p - k, dtype)])
    return (q * w) @ q.T, q[:, :k], w[:k]


@pytest.mark.parametrize("rank", [6, 8, 20])
def test_exact_when_rank_at_least_matrix_rank(rank):
    a, _, w = _low_rank_psd(20, 6, jax.random.key(0))
    approx = randomized_nystrom(lambda x: a @ x, 20, rank, jax.random.key(1))
    u, lam = approx.basis, approx.eigvals
    assert u.shape == (20, rank) and lam.shape == (rank,)
    np.testing.assert_allclose(u.T @ u, np.eye(rank), atol=1e-12)
    np.testing.assert_allclose((u * lam) @ u.T, a, atol=1e-11 * float(jnp.max(w)))
    np.testing.assert_allclose(lam[:6], w, rtol=1e-9)
    np.testing.assert_allclose(lam[6:], 0.0, atol=1e-12)
    assert np.all(np.diff(np.asarray(lam)) <= 0)
    assert float(approx.core_min_eigval) > -1e-10


def test_full_rank_spd_exact():
    key = jax.random.key(3)
    m = jax.random.normal(key, (12, 12))
    a = m @ m.T + 0.1 * jnp.eye(12)
    approx = randomized_nystrom(lambda x: a @ x, 12, 12, jax.random.key(4))
    np.testing.assert_allclose((approx.basis * approx.eigvals) @ approx.basis.T, a, rtol=1e-10, atol=1e-10)


def test_error_falls_with_rank():
    p = 60
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (p, p)))
    w = 0.7 ** jnp.arange(p)
    a = (q * w) @ q.T
    errors = []
    for rank in (5, 10, 20, 40):
        ap = randomized_nystrom(lambda x: a @ x, p, rank, jax.random.key(2))
        errors.append(float(jnp.linalg.norm((ap.basis * ap.eigvals) @ ap.basis.T - a, 2)))
    assert all(e2 < 0.5 * e1 for e1, e2 in zip(errors, errors[1:])), errors


def test_inverse_and_preconditioner_formulas():
    a, _, _ = _low_rank_psd(15, 4, jax.random.key(5))
    approx = randomized_nystrom(lambda x: a @ x, 15, 4, jax.random.key(6))
    b = jax.random.normal(jax.random.key(7), (15,))
    lam = 0.3
    x = nystrom_inverse(approx, lam, b)
    np.testing.assert_allclose(x, jnp.linalg.solve(a + lam * jnp.eye(15), b), rtol=1e-10)
    u, w = approx.basis, approx.eigvals
    p_inv = (w[-1] + lam) * (u / (w + lam)) @ u.T + jnp.eye(15) - u @ u.T
    np.testing.assert_allclose(nystrom_precondition(approx, lam, b), p_inv @ b, rtol=1e-10)
    # With the exact low-rank part, P^{-1}(A + λI) has eigenvalues in {Λ_r + λ, λ}.
    ev = jnp.linalg.eigvals(p_inv @ (a + lam * jnp.eye(15))).real
    np.testing.assert_allclose(jnp.sort(ev), jnp.sort(jnp.concatenate([jnp.full(4, w[-1] + lam), jnp.full(11, lam)])),
                               rtol=1e-8)


def test_jit_vmap_batch_size_and_float32():
    a, _, w = _low_rank_psd(16, 5, jax.random.key(8), jnp.float32)
    f = jax.jit(lambda key: randomized_nystrom(lambda x: a @ x, 16, 8, key, dtype=jnp.float32, batch_size=3))
    approx = f(jax.random.key(9))
    assert approx.basis.dtype == jnp.float32
    np.testing.assert_allclose((approx.basis * approx.eigvals) @ approx.basis.T, a, atol=1e-4 * float(w[0]))
    keys = jax.random.split(jax.random.key(10), 3)
    batched = jax.vmap(f)(keys)
    assert batched.eigvals.shape == (3, 8)
    # float32: eigenvalue errors are ~ sqrt(p) eps ||A|| in absolute terms.
    np.testing.assert_allclose(batched.eigvals[:, :5], jnp.broadcast_to(w, (3, 5)), atol=1e-4 * float(w[0]))


def test_zero_operator_is_finite():
    approx = randomized_nystrom(lambda x: 0.0 * x, 5, 3, jax.random.key(0))
    assert np.all(np.isfinite(approx.basis)) and np.all(approx.eigvals == 0)


def test_indefinite_operator_flagged():
    a = jnp.diag(jnp.array([2.0, 1.0, -1.0, 0.5, 0.0, 0.0]))
    approx = randomized_nystrom(lambda x: a @ x, 6, 6, jax.random.key(0))
    assert float(approx.core_min_eigval) < -1e-3
    assert np.all(np.isfinite(approx.basis)) and np.all(approx.eigvals >= 0)


def test_bad_rank():
    with pytest.raises(ValueError, match="rank must be between 1"):
        randomized_nystrom(lambda x: x, 4, 5, jax.random.key(0))
    with pytest.raises(ValueError, match="batch_size"):
        randomized_nystrom(lambda x: x, 4, 2, jax.random.key(0), batch_size=0)


def test_operator_fisher_exact_and_blocks():
    # Empirical Fisher of n examples has rank <= n.
    prob = models.mlp_problem("plain", n_train=5)
    op = jaxinf.curvature_operator(prob.loss_fn, prob.params, prob.train, kind="fisher")
    grads = models.dense_grads(prob.loss_fn, prob.params, prob.train)
    fisher = grads.T @ grads / 5
    approx = nystrom_of_operator(op, 7, jax.random.key(0))
    np.testing.assert_allclose((approx.basis * approx.eigvals) @ approx.basis.T, fisher,
                               atol=1e-10 * float(jnp.linalg.norm(fisher, 2)))
    # Block-diagonal: the sketch sees the block-diagonal curvature.
    opb = jaxinf.curvature_operator(prob.loss_fn, prob.params, prob.train, kind="fisher", blocks="layer",
                                    damping=0.5)
    mv = curvature_matvec(opb)
    dense = jax.vmap(mv, in_axes=1, out_axes=1)(jnp.eye(op.size))
    mask = np.zeros((op.size, op.size), bool)
    for b in range(opb.num_blocks):
        idx = opb.block_flat_indices(b)
        mask[np.ix_(idx, idx)] = True
    np.testing.assert_allclose(dense, np.where(mask, fisher, 0.0), atol=1e-12)
