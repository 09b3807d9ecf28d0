"""LiSSA against dense float64 references: deterministic and stochastic recursions, divergence, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf.core.curvature import to_dense
from jaxinf.core.tree import ravel, tree_spec, unravel, unravel_batched
from jaxinf.solvers.lissa import sample_minibatch
from tests import models

_dense = jax.jit(to_dense)
_rows = jax.vmap(ravel)


def _vmap(solver):
    return jax.jit(jax.vmap(solver.solve, in_axes=(None, 0)))


def _rhs(params, k, seed=0):
    spec = tree_spec(params)
    return unravel_batched(spec, jax.random.normal(jax.random.key(seed), (k, spec.size), spec.dtype))


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref, axis=-1) / np.linalg.norm(ref, axis=-1)


def _split(batch, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(jax.tree.map(lambda a, start=start, s=s: a[start:start + s], batch))
        start += s
    return out


@pytest.fixture(scope="module")
def logistic():
    """L2-regularised softmax regression (p = 12), 30 examples in batches of 8, 8, 8 and a ragged 6."""
    p = models.logistic_problem(l2=1e-2)
    op = jaxinf.curvature_operator(p.loss_fn, p.params, _split(p.train, (8, 8, 8, 6)), damping=0.05)
    dense = np.asarray(_dense(op))
    return p, op, dense


def test_deterministic_recursion_matches_direct_with_ragged_batches_and_dampen(logistic):
    p, op, dense = logistic
    top = np.linalg.eigvalsh(dense)[-1]
    rhs = _rhs(p.params, 3)
    solver = jaxinf.lissa(scale=float(top), maxiter=5000, rtol=1e-13, batch_size=None)  # full data every step
    x, info = _vmap(solver)(solver.init(op), rhs)
    ref = np.linalg.solve(dense, np.asarray(_rows(rhs)).T).T
    assert bool(jnp.all(info.converged)) and not bool(jnp.any(info.diverged))
    assert bool(jnp.all(info.iterations < 5000))
    # stopping at a relative step of 1e-13 leaves an error of at most 1e-13 x scale / smallest eigenvalue
    assert np.max(_rel_err(_rows(x), ref)) <= 1e-8
    true = np.linalg.norm(np.asarray(_rows(x)) @ dense - np.asarray(_rows(rhs)), axis=1)  # the reported residual
    np.testing.assert_allclose(info.residual_norm, true, rtol=1e-3, atol=1e-13)
    # dampen d: the fixed point solves (C + λ + d·s) x = v
    damped = jaxinf.lissa(scale=float(top), dampen=0.2, maxiter=5000, rtol=1e-13, batch_size=10_000)  # >= n: full
    xd, info_d = _vmap(damped)(damped.init(op), rhs)
    ref_d = np.linalg.solve(dense + 0.2 * top * np.eye(op.size), np.asarray(_rows(rhs)).T).T
    assert bool(jnp.all(info_d.converged))
    assert np.max(_rel_err(_rows(xd), ref_d)) <= 1e-8


def test_stochastic_minibatches_are_within_one_percent_of_direct():
    """Minibatches of 500 of 1000 examples drawn with replacement; a large scale averages the noise out."""
    p = models.logistic_problem(n_train=1000, n_test=2)
    op = jaxinf.curvature_operator(p.loss_fn, p.params, _split(p.train, (128,) * 7 + (104,)), damping=0.05)
    rhs = jax.vmap(jax.grad(p.loss_fn), in_axes=(None, 0))(p.params, jax.tree.map(lambda a: a[:, None], p.test))
    ref = np.linalg.solve(np.asarray(_dense(op)), np.asarray(_rows(rhs)).T).T
    solver = jaxinf.lissa(scale=100.0, maxiter=6000, rtol=1e-10, batch_size=500)
    x, info = _vmap(solver)(solver.init(op, key=jax.random.key(0)), rhs)
    assert not bool(jnp.any(info.diverged))
    assert not bool(jnp.any(info.converged))  # the minibatch noise floor keeps the steps above rtol
    assert info.iterations.tolist() == [6000] * 2
    assert np.max(_rel_err(_rows(x), ref)) <= 1e-2


def test_too_small_scale_reports_divergence(logistic):
    p, op, dense = logistic
    top = np.linalg.eigvalsh(dense)[-1]
    rhs = _rhs(p.params, 2)
    solver = jaxinf.lissa(scale=float(top) / 4, maxiter=500, batch_size=4)
    x, info = _vmap(solver)(solver.init(op), rhs)
    assert bool(jnp.all(info.diverged)) and not bool(jnp.any(info.converged))
    assert bool(jnp.all(info.iterations < 500))  # stopped once the norm outgrew the bound
    assert bool(jnp.all(jnp.isfinite(_rows(x))))  # the last finite iterate, flagged, not NaN
    assert "scale" in solver.advice
    model = jaxinf.InfluenceModel(p.loss_fn, p.params, solver, damping=0.05).fit(p.train)
    with pytest.raises(jaxinf.ConvergenceError, match="diverged.*larger scale"):
        model.influence_factors(p.test)


def test_blocks_are_honoured():
    p = models.mlp_problem("linen")
    damping = {"['params']['Dense_0']": 0.05, "['params']['Dense_1']": 0.2}
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, blocks="layer", damping=damping, kind="gauss_newton",
                                   model_fn=p.model_fn, output_loss=p.output_loss)
    dense = np.asarray(_dense(op))  # block-diagonal
    v = unravel(op.spec, jnp.ones(op.size))
    # one minibatch holding the whole dataset gives exactly the operator's (block-restricted) product
    whole = jax.jit(lambda o, u: o.batch_matvec(p.train, u))(op, v)
    np.testing.assert_allclose(ravel(whole), dense @ np.ones(op.size), rtol=1e-12)
    solver = jaxinf.lissa(scale=float(np.linalg.eigvalsh(dense)[-1]), maxiter=3000, rtol=1e-13, batch_size=None)
    x, info = jax.jit(solver.solve)(solver.init(op), v)
    assert bool(info.converged)
    assert _rel_err(ravel(x), np.linalg.solve(dense, np.ones(op.size))) <= 1e-8


def test_sampling_is_uniform_over_every_example_and_size_correct():
    ids = jnp.arange(23.0)
    data = jaxinf.as_batches([{"id": ids[:8], "y": -ids[:8]}, {"id": ids[8:16], "y": -ids[8:16]},
                              {"id": ids[16:], "y": -ids[16:]}])  # 8, 8 stacked and a ragged 7
    keys = jax.random.split(jax.random.key(0), 2000)
    draws = jax.jit(jax.vmap(lambda k: sample_minibatch(data, k, 5)))(keys)
    assert draws["id"].shape == (2000, 5)
    np.testing.assert_array_equal(draws["y"], -draws["id"])  # examples stay whole
    counts = np.bincount(np.asarray(draws["id"], int).ravel(), minlength=23)
    assert counts.shape == (23,) and counts.min() > 0
    expected = 2000 * 5 / 23
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 < 60  # 22 degrees of freedom: P(chi2 > 60) < 1e-4
    only_rest = jaxinf.as_batches({"id": ids})  # one batch: kept apart, no stacked group
    assert sample_minibatch(only_rest, jax.random.key(1), 30)["id"].shape == (30,)
    only_stacked = jaxinf.as_batches([{"id": ids[:8]}, {"id": ids[8:16]}])  # two equal batches, nothing apart
    drawn = np.asarray(sample_minibatch(only_stacked, jax.random.key(2), 200)["id"])
    assert set(drawn.astype(int).tolist()) == set(range(16))


def test_h0_jit_vmap_and_no_recompilation(logistic):
    p, op, dense = logistic
    top = float(np.linalg.eigvalsh(dense)[-1])
    v = jax.tree.map(jnp.ones_like, p.params)
    exact = unravel(op.spec, jnp.asarray(np.linalg.solve(dense, np.ones(op.size))))
    start = jaxinf.lissa(scale=top, maxiter=50, rtol=1e-8, batch_size=None, h0=jax.tree.map(lambda a: top * a, exact))
    _, info = jax.jit(start.solve)(start.init(op), v)  # h0 = s·x* is the fixed point: one step
    assert int(info.iterations) == 1 and bool(info.converged)
    solver = jaxinf.lissa(scale=top, maxiter=300, rtol=1e-6, batch_size=8)
    state = solver.init(op, key=jax.random.key(4))
    solve = jax.jit(solver.solve)
    rhs = _rhs(p.params, 3)
    x0, _ = solve(state, jax.tree.map(lambda a: a[0], rhs))
    solve(state, jax.tree.map(lambda a: a[1], rhs))
    solve(state._replace(key=jax.random.key(5), operator=op.with_damping(0.3)), jax.tree.map(lambda a: a[1], rhs))
    assert solve._cache_size() == 1
    xv, _ = _vmap(solver)(state, rhs)
    np.testing.assert_allclose(_rows(xv)[0], ravel(x0), rtol=1e-10, atol=1e-12)


def test_float32():
    p = models.logistic_problem(l2=1e-2, dtype=jnp.float32)
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.1)
    solver = jaxinf.lissa(scale=2.0, maxiter=2000, rtol=1e-6, batch_size=None)
    x, info = jax.jit(solver.solve)(solver.init(op), jax.tree.map(jnp.ones_like, p.params))
    assert ravel(x).dtype == jnp.float32 and bool(info.converged)
    p64 = models.logistic_problem(l2=1e-2)
    dense = np.asarray(_dense(jaxinf.curvature_operator(p64.loss_fn, p64.params, p64.train, damping=0.1)))
    # rtol 1e-6 on the step, contraction 1 - λ_min / s = 0.95: error <= 20 x 1e-6, plus float32 rounding
    assert _rel_err(ravel(x), np.linalg.solve(dense, np.ones(op.size))) <= 1e-4


def test_bad_configuration():
    with pytest.raises(ValueError, match="maxiter must be a positive integer"):
        jaxinf.lissa(maxiter=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer or None"):
        jaxinf.lissa(batch_size=0)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        jaxinf.lissa(scale=0.0)
    with pytest.raises(ValueError, match=r"dampen must be in \[0, 1\)"):
        jaxinf.lissa(dampen=1.0)
    with pytest.raises(ValueError, match="rtol must be finite and >= 0"):
        jaxinf.lissa(rtol=-1e-3)
    p = models.logistic_problem()
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.1)
    solver = jaxinf.lissa(h0={"w": p.params["w"]})
    with pytest.raises(ValueError, match="h0 must have the tree structure"):
        solver.solve(solver.init(op), p.params)
    with pytest.raises(ValueError, match="v must have the tree structure"):
        jaxinf.lissa().solve(solver.init(op), [p.params["w"]])


def test_tail_averaging_meets_rtol_where_the_last_iterate_stalls():
    """Minibatches of 64 of 200: the tail average passes rtol and is closer to direct than the noisy last iterate."""
    p = models.logistic_problem(n_train=200, n_test=2, l2=1e-2)
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.1)
    dense = np.asarray(_dense(op))
    rhs = np.random.default_rng(0).standard_normal(op.size)  # not ones: softmax logits shifted alike are a null space
    v = unravel(op.spec, jnp.asarray(rhs))
    ref = np.linalg.solve(dense, rhs)
    top = float(np.linalg.eigvalsh(dense)[-1])
    averaged = jaxinf.lissa(scale=2 * top, maxiter=4000, rtol=5e-3, batch_size=64)
    x, info = jax.jit(averaged.solve)(averaged.init(op, key=jax.random.key(1)), v)
    assert bool(info.converged) and not bool(info.diverged)
    assert int(info.iterations) < 4000 and int(info.iterations) % 8 == 0  # stopped at the end of a window
    err_avg = _rel_err(ravel(x), ref)
    assert err_avg <= 3 * 5e-3
    last = jaxinf.lissa(scale=2 * top, maxiter=int(info.iterations), rtol=0.0, batch_size=64, averaging=False)
    with pytest.warns(UserWarning, match="noise floor"):
        x_last, info_last = jax.jit(last.solve)(last.init(op, key=jax.random.key(1)), v)
    err_last = _rel_err(ravel(x_last), ref)
    print(f"tail average: {int(info.iterations)} steps, error {err_avg:.2e}; last iterate: "
          f"{int(info_last.iterations)} steps, converged={bool(info_last.converged)}, error {err_last:.2e}")
    assert err_avg < err_last / 5  # same steps, same draws
    with pytest.raises(ValueError, match="averaging"):
        jaxinf.lissa(averaging="yes")


def test_a_large_scale_is_not_taken_for_convergence(logistic):
    """With a scale far above the curvature every step is small, yet the answer is far off: not converged.

    The stopping rule compares the step with ``‖v‖`` (the step is the current residual), not with ``‖h‖``: relative
    to ``‖h‖`` this solve reported convergence with a 56 % error. At a scale that can converge the answer meets rtol.
    """
    p, op, dense = logistic
    top = float(np.linalg.eigvalsh(dense)[-1])
    v = _rhs(p.params, 1)
    ref = np.linalg.solve(dense, np.asarray(_rows(v)).T).T
    far = jaxinf.lissa(scale=1000 * top, maxiter=20000, rtol=1e-4, batch_size=None)  # old rule: "converged" at 5850
    x, info = _vmap(far)(far.init(op), v)
    assert not bool(info.converged[0]) and not bool(info.diverged[0])
    assert _rel_err(_rows(x), ref)[0] > 0.1  # the steps were small, the error is not
    near = jaxinf.lissa(scale=2 * top, maxiter=4000, rtol=1e-6, batch_size=None)
    x, info = _vmap(near)(near.init(op), v)
    assert bool(info.converged[0]) and float(info.residual_norm[0]) <= 1e-6 * float(np.linalg.norm(_rows(v)))
    assert _rel_err(_rows(x), ref)[0] <= 1e-5
    model = jaxinf.InfluenceModel(p.loss_fn, p.params, far, damping=0.05).fit(p.train)
    with pytest.raises(jaxinf.ConvergenceError, match="did not converge.*lower a given scale"):
        model.influence_factors(p.test)
