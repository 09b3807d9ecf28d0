"""LiSSA's defaults: the scale from the curvature, the curvature-weighted averaged stop, early exit for many lanes.

Every number is checked against dense float64 references (``to_dense`` of the
operator and of each drawn minibatch, ``numpy.linalg``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import spearmanr

import jaxinf
from jaxinf.core.curvature import to_dense
from jaxinf.core.minibatch import sample_minibatch
from jaxinf.core.tree import ravel, tree_spec, unravel, unravel_batched
from jaxinf.solvers import lissa_scale
from jaxinf.solvers.lissa import AVERAGED_RTOL, MAXITER
from tests import models

_dense = jax.jit(to_dense)
_rows = jax.vmap(ravel)


def _rhs(params, k, seed=0):
    spec = tree_spec(params)
    return unravel_batched(spec, jax.random.normal(jax.random.key(seed), (k, spec.size), spec.dtype))


@pytest.fixture(scope="module")
def logistic200():
    p = models.logistic_problem(n_train=200, n_test=4, l2=1e-2)
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.1)
    return p, op, np.asarray(_dense(op))


def test_auto_scale_is_the_largest_minibatch_norm_times_the_safety_factor(logistic200):
    """The drawn minibatches rebuilt from the key: the estimate is their largest top eigenvalue (power iteration)."""
    p, op, dense = logistic200
    key = jax.random.key(3)
    state = jax.jit(jaxinf.lissa().init)(op, key=key)
    scale_key = jax.random.split(key)[1]
    tops = []
    for k in jax.random.split(scale_key, lissa_scale.NUM_BATCHES):
        batch = sample_minibatch(op.data, jax.random.split(k)[0], 64)
        mini = jaxinf.curvature_operator(p.loss_fn, p.params, batch, damping=0.1)
        tops.append(np.linalg.eigvalsh(np.asarray(_dense(mini)))[-1])
    expected = lissa_scale.SAFETY * max(tops)
    assert 0.95 * expected <= float(state.scale) <= expected * (1 + 1e-9)  # power iteration approaches from below
    assert max(tops) > 1.2 * np.linalg.eigvalsh(dense)[-1]  # minibatches are sharper than the full data
    full = jaxinf.lissa(batch_size=None).init(op, key=key)
    top = np.linalg.eigvalsh(dense)[-1]
    assert 0.95 * lissa_scale.SAFETY * top <= float(full.scale) <= lissa_scale.SAFETY * top * (1 + 1e-9)
    assert float(jaxinf.lissa(scale=2.5).init(op).scale) == 2.5  # a given scale is kept as it is


def test_auto_scale_does_not_move_the_minibatches_of_a_given_scale(logistic200):
    """scale="auto" draws from a key of its own: with the same scale given, the solve is the same."""
    p, op, _ = logistic200
    v = jax.tree.map(lambda a: a[0], _rhs(p.params, 1))
    auto = jaxinf.lissa(maxiter=256, rtol=0.0)
    state = auto.init(op, key=jax.random.key(1))
    given = jaxinf.lissa(scale=float(state.scale), maxiter=256, rtol=0.0)
    x_auto = auto.solve(state, v)[0]
    x_given = given.solve(given.init(op, key=state.key), v)[0]
    np.testing.assert_allclose(ravel(x_auto), ravel(x_given), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_defaults_converge_and_rank_like_the_exact_solve(dtype):
    """An MLP with flat directions (damping 1e-3), 240 examples in minibatches of 64: lissa() at its defaults.

    The wrapper is strict: a solve that did not converge would raise. The stop certifies the change in the
    curvature norm, the norm the scores see: their error against the exact solve stays within rtol (1.7 % here).
    """
    p = models.mlp_problem("linen", n_train=240, n_test=8, d_in=5, hidden=8, out=3, dtype=dtype)
    kw = dict(damping=1e-3, curvature="gauss_newton", model_fn=p.model_fn, output_loss=p.output_loss)
    exact = jaxinf.InfluenceModel(None, p.params, jaxinf.direct(), **kw).fit(p.train)
    model = jaxinf.InfluenceModel(None, p.params, jaxinf.lissa(), **kw).fit(p.train, key=jax.random.key(0))
    want = np.asarray(exact.influences(p.test, p.train), np.float64)
    got = np.asarray(model.influences(p.test, p.train), np.float64)
    errors = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert errors.max() <= AVERAGED_RTOL
    assert min(spearmanr(a, b)[0] for a, b in zip(got, want)) >= 0.98
    info = jaxinf.lissa().solve_many(model.state, _rhs(model.state.operator.params, 4))[1]
    assert bool(jnp.all(info.converged)) and int(jnp.max(info.iterations)) < MAXITER  # it stopped early


def test_many_lanes_equal_one_at_a_time_under_jit_and_vmap(logistic200):
    """solve_many (one while_loop, lanes frozen as they stop) = vmap of solve = each right-hand side alone.

    13 right-hand sides, more than the 12 parameters, of norms 1 to 13³.
    """
    p, op, dense = logistic200
    m = op.size + 1
    V = _rhs(p.params, m)
    V = jax.tree.map(lambda a: a * jnp.arange(1, m + 1, dtype=a.dtype).reshape((m,) + (1,) * (a.ndim - 1)) ** 3, V)
    solver = jaxinf.lissa(rtol=1e-2)
    state = solver.init(op, key=jax.random.key(2))
    X, info = jax.jit(solver.solve_many)(state, V)
    Xv, info_v = jax.jit(jax.vmap(solver.solve, in_axes=(None, 0)))(state, V)
    np.testing.assert_allclose(_rows(X), _rows(Xv), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(info.iterations, info_v.iterations)
    for i in (0, m - 1):
        x, one = solver.solve(state, jax.tree.map(lambda a, i=i: a[i], V))
        np.testing.assert_allclose(ravel(x), _rows(X)[i], rtol=1e-10, atol=1e-12)
        assert int(one.iterations) == int(info.iterations[i])
    assert bool(jnp.all(info.converged))
    ref = np.linalg.solve(dense, np.asarray(_rows(V)).T).T
    assert np.max(np.linalg.norm(_rows(X) - ref, axis=1) / np.linalg.norm(ref, axis=1)) <= 2e-2


def test_the_chunked_loop_runs_exactly_maxiter_steps(logistic200):
    """maxiter = 13 (not a multiple of the scan chunk): the deterministic recursion, step by step in NumPy."""
    p, op, dense = logistic200
    v = jax.tree.map(lambda a: a[0], _rhs(p.params, 1))
    s, d = 1.3, 0.1
    x, info = jaxinf.lissa(scale=s, dampen=d, maxiter=13, rtol=0.0, batch_size=None).solve(
        jaxinf.lissa(scale=s, dampen=d, maxiter=13, rtol=0.0, batch_size=None).init(op), v
    )
    b = np.asarray(ravel(v))
    h = b.copy()
    for _ in range(13):
        h = b + (1 - d) * h - dense @ h / s
    assert int(info.iterations) == 13 and not bool(info.converged)
    np.testing.assert_allclose(ravel(x), h / s, rtol=1e-12)


def test_bad_scale_is_refused():
    with pytest.raises(ValueError, match="'auto' or a number"):
        jaxinf.lissa(scale="fast")
    with pytest.raises(ValueError, match="scale must be finite"):
        jaxinf.lissa(scale=-1.0)


def test_zero_curvature_gives_a_finite_scale():
    """No curvature and no damping: the estimate is 0, the scale 1 (the system is singular: no NaN scale)."""
    params = jnp.zeros(3)
    op = jaxinf.curvature_operator(lambda w, b: jnp.mean(b @ w), params, jnp.ones((20, 3)), damping=0.0)
    assert float(jaxinf.lissa().init(op).scale) == 1.0
    assert float(jaxinf.lissa(batch_size=None).init(op, key=jax.random.key(1)).scale) == 1.0
    assert unravel(op.spec, jnp.ones(3)).shape == (3,)


def test_a_mesh_fit_gives_the_same_scale_and_scores():
    """scale.fit over 8 devices: the auto scale and the influences equal the one-device fit's (same key)."""
    from jaxinf import scale

    p = models.mlp_problem("linen", n_train=256, n_test=4, d_in=5, hidden=8, out=3)
    kw = dict(damping=1e-2, curvature="gauss_newton", model_fn=p.model_fn, output_loss=p.output_loss)
    train = [jax.tree.map(lambda a, i=i: a[i : i + 64], p.train) for i in range(0, 256, 64)]
    key = jax.random.key(5)
    one = jaxinf.InfluenceModel(None, p.params, jaxinf.lissa(), **kw).fit(train, key=key)
    mesh = scale.data_mesh()
    assert mesh.size == len(jax.devices()) > 1
    sharded = scale.fit(jaxinf.InfluenceModel(None, p.params, jaxinf.lissa(), **kw), train, mesh, key=key)
    np.testing.assert_allclose(float(sharded.state.scale), float(one.state.scale), rtol=1e-12)
    got, want = np.asarray(sharded.influences(p.test, train)), np.asarray(one.influences(p.test, train))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
