"""Nyström sketch-and-solve against dense float64 references.

The influence-score correlation with ``direct`` for both low-rank solvers is in
``tests/test_arnoldi.py::test_influence_model_scores_correlate_with_direct``.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf.core.curvature import to_dense
from jaxinf.core.tree import ravel
from tests import models
from tests.test_arnoldi import _flat_solves, _quadratic, _rhs


@functools.cache
def _mlp(n_train=23, hidden=6):
    return models.mlp_problem("plain", n_train=n_train, hidden=hidden)


def _ggn(p, data, damping):
    return jaxinf.curvature_operator(
        p.loss_fn, p.params, data, kind="gauss_newton", model_fn=p.model_fn, output_loss=p.output_loss, damping=damping
    )


def _woodbury(state, b):
    """``(U Λ Uᵀ + λI)⁻¹ b`` in numpy, rows of ``b``."""
    u, w, lam = np.asarray(state.basis), np.asarray(state.eigvals), float(state.damping)
    c = b @ u
    return (c / (w + lam)) @ u.T + (b - c @ u.T) / lam


def test_exact_when_rank_covers_the_curvature():
    p = _mlp()
    b = np.random.default_rng(0).standard_normal((4, 44))
    # Empirical Fisher of 5 examples: rank <= 5. GGN of 3 examples with 2 outputs: rank <= 6.
    fisher = jaxinf.curvature_operator(
        p.loss_fn, p.params, jax.tree.map(lambda a: a[:5], p.train), kind="fisher", damping=1e-3
    )
    ggn = _ggn(p, jax.tree.map(lambda a: a[:3], p.train), 1e-3)
    for op, rank in [(fisher, 5), (fisher, 9), (ggn, 6)]:
        solver = jaxinf.nystrom(rank)
        state = solver.init(op, key=jax.random.key(1))
        solver.validate(state)
        ref = np.linalg.solve(to_dense(op), b.T).T
        assert np.linalg.norm(_woodbury(state, b) - ref) <= 1e-8 * np.linalg.norm(ref)
    # The jitted, vmapped solve with more right-hand sides than parameters.
    rhs = _rhs(p.params, op.size + 3)
    x, info = _flat_solves(state, rhs)
    ref = np.linalg.solve(to_dense(op), np.asarray(jax.vmap(ravel)(rhs)).T).T
    assert np.linalg.norm(x - ref) <= 1e-8 * np.linalg.norm(ref)
    assert bool(jnp.all(info.converged)) and not bool(jnp.any(info.diverged))


def test_error_falls_with_rank_on_mlp():
    p = _mlp(40, 8)  # p = 58, GGN of 40 examples x 2 outputs: full rank
    op = _ggn(p, p.train, 1e-3)
    dense = np.asarray(to_dense(op))
    b = np.random.default_rng(1).standard_normal((6, op.size))
    ref = np.linalg.solve(dense, b.T).T
    errors = []
    for rank in (6, 20, op.size):
        state = jaxinf.nystrom(rank).init(op, key=jax.random.key(0))
        errors.append(np.linalg.norm(_woodbury(state, b) - ref) / np.linalg.norm(ref))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[0] > 1e-2  # the small rank leaves a real error
    assert errors[2] <= 1e-8  # full rank: exact


def test_zero_damping_is_rejected():
    op = _quadratic([3.0, 1.0, 0.5, 0.0], damping=0.0)
    with pytest.raises(ValueError, match="damping > 0"):
        jaxinf.nystrom(2).init(op)
    # A traced damping cannot be checked at init: the solve flags it and validate raises.
    for completion in (True, False):
        solver = jaxinf.nystrom(2, completion=completion)
        state = jax.jit(lambda lam, s=solver: s.init(op.with_damping(lam)))(0.0)
        x, info = solver.solve(state, jnp.ones(4))
        assert not bool(info.converged)
        with pytest.raises(ValueError, match="damping > 0"):
            solver.validate(state)
    # Through the wrapper (which compiles init, so the damping is traced there too).
    with pytest.raises(ValueError, match="damping > 0"):
        jaxinf.InfluenceModel(op.loss_fn, op.params, jaxinf.nystrom(2), damping=0.0).fit(jnp.ones((3, 1)))


def test_indefinite_curvature_warns():
    op = _quadratic([3.0, -2.0, 1.0, 0.5], damping=0.1)
    solver = jaxinf.nystrom(4)
    state = solver.init(op)
    with pytest.warns(UserWarning, match="indefinite"):
        solver.validate(state)
    assert np.all(np.asarray(state.eigvals) >= 0) and np.all(np.isfinite(state.basis))


def test_ragged_batches_jit_and_no_retrace():
    p = _mlp()
    batches = [jax.tree.map(lambda a, s=s: a[s : s + 10], p.train) for s in (0, 10, 20)]  # 10, 10, 3
    solver = jaxinf.nystrom(12, sketch_batch=5)
    state = jax.jit(solver.init)(_ggn(p, batches, 0.05), key=jax.random.key(0))
    ref_state = solver.init(_ggn(p, p.train, 0.05), key=jax.random.key(0))  # same key, same sketch
    np.testing.assert_allclose(state.eigvals, ref_state.eigvals, rtol=1e-9)
    np.testing.assert_allclose(np.abs(state.basis.T @ ref_state.basis), np.eye(12), atol=1e-7)
    solve = jax.jit(solver.solve)
    rhs = _rhs(p.params, 2)
    _, info = solve(state, jax.tree.map(lambda a: a[0], rhs))
    compiled = solve._cache_size()  # jit caches per function: other tests may share the solve function
    solve(state, jax.tree.map(lambda a: a[1], rhs))
    assert solve._cache_size() == compiled and bool(info.converged)


def test_float32_full_rank():
    p = models.mlp_problem("plain", dtype=jnp.float32)
    op = _ggn(p, p.train, 0.1)
    solver = jaxinf.nystrom(op.size)
    state = solver.init(op)
    assert state.basis.dtype == jnp.float32
    x, info = solver.solve(state, jax.tree.map(jnp.ones_like, p.params))
    assert bool(info.converged)
    p64 = _mlp()
    dense = np.asarray(to_dense(_ggn(p64, p64.train, 0.1)))
    ref = np.linalg.solve(dense, np.ones(op.size))
    # float32: eigenvalue errors ~ sqrt(p) eps ||C||, amplified by 1/λ.
    bound = 10 * np.sqrt(op.size) * np.finfo(np.float32).eps * np.linalg.norm(dense, 2) / 0.1
    err = np.linalg.norm(np.asarray(ravel(x), np.float64) - ref) / np.linalg.norm(ref)
    assert err < bound, (err, bound)


def test_configuration_errors():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        jaxinf.nystrom(0)
    with pytest.raises(ValueError, match="sketch_batch must be >= 1"):
        jaxinf.nystrom(2, sketch_batch=0)
    op = _quadratic([3.0, 1.0, 0.5], damping=0.1)
    with pytest.raises(ValueError, match="exceeds the number of parameters"):
        jaxinf.nystrom(4).init(op)
    p = models.logistic_problem()
    blocked = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.1, blocks="parameter")
    with pytest.raises(ValueError, match="block-diagonal curvature"):
        jaxinf.nystrom(2).init(blocked)


def test_projected_scoring_equals_naive_per_example_gradients():
    p = _mlp()
    op = _ggn(p, p.train, 0.01)
    solver = jaxinf.nystrom(10)
    state = solver.init(op)
    test, train = p.test, jax.tree.map(lambda a: a[:7], p.train)
    g_test = np.asarray(models.dense_grads(p.loss_fn, p.params, test))
    g_train = np.asarray(models.dense_grads(p.loss_fn, p.params, train))
    score = jax.jit(solver.score)
    np.testing.assert_allclose(score(state, op, test, train), _woodbury(state, g_test) @ g_train.T, rtol=1e-9)
    u, w = np.asarray(state.basis), np.asarray(state.eigvals)
    projected = dataclasses.replace(state, completion=False)
    ref = (g_test @ u / (w + 0.01)) @ (g_train @ u).T
    np.testing.assert_allclose(score(projected, op, test, train), ref, rtol=1e-9)
