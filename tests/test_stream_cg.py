"""Pre-conditioned CG over a stream (jaxinf.scale.cg_from_stream) and pre-conditioners fitted from a stream.

Every streamed result is checked against a dense float64 reference (the Gauss-Newton matrix from ``jax.jacobian``,
``jnp.linalg.solve``) and against the in-memory ``cg(preconditioner=...)`` / ``preconditioner.init`` on the same
batches (two of 8 and a ragged 4).
"""

import inspect

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf import scale
from jaxinf.scale.preconditioner_stream import fit_preconditioner
from tests import models

BATCH, N_TRAIN, DAMPING = 8, 20, 0.05


@pytest.fixture(scope="module")
def problem():
    return models.mlp_problem("plain", n_train=N_TRAIN, n_test=3, d_in=3, hidden=4, out=2)  # p = 26


def source(problem):
    return scale.ArraySource(jax.tree.map(np.asarray, problem.train), batch_size=BATCH)


def batches(problem):
    return [jax.tree.map(lambda a, i=i: a[i : i + BATCH], problem.train) for i in range(0, N_TRAIN, BATCH)]


def make_model(problem, solver, **kw):
    options = dict(
        damping=DAMPING, curvature="gauss_newton", model_fn=problem.model_fn, output_loss=problem.output_loss
    )
    return jaxinf.InfluenceModel(None, problem.params, solver, **{**options, **kw})


def dense_factors(problem):
    """``(G + λI)⁻¹ ∇θℓ(test_i)``, ``(n_test, p)``; ``G = (1/n) Σ J_iᵀ J_i``, the squared error's Gauss-Newton."""
    flat, unravel = jax.flatten_util.ravel_pytree(problem.params)
    x = problem.train[0]
    jac = jax.vmap(lambda xi: jax.jacobian(lambda f: problem.model_fn(unravel(f), (xi[None], None))[0])(flat))(x)
    gn = jnp.einsum("nop,noq->pq", jac, jac) / x.shape[0]
    grads = models.dense_grads(problem.loss_fn, problem.params, problem.test)
    return jnp.linalg.solve(gn + DAMPING * jnp.eye(flat.size), grads.T).T


def raveled(tree):
    return jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(tree)


PRECONDITIONERS = {
    "none": lambda: None,
    "ekfac": lambda: jaxinf.ekfac_preconditioner(),  # the sampled Fisher: draws keyed per example
    "kfac": lambda: jaxinf.kfac_preconditioner(fisher="exact"),
    "nystrom": lambda: jaxinf.nystrom_preconditioner(6),
    "jacobi": lambda: jaxinf.jacobi_preconditioner(12),
}


@pytest.mark.parametrize("name", ["ekfac", "kfac", "nystrom", "jacobi"])
def test_streamed_preconditioner_equals_init(problem, name):
    """The state fitted from a stream applies as ``init``'s on the same batches in memory (same key, same draws)."""
    pre, key = PRECONDITIONERS[name](), jax.random.key(7)
    model = make_model(problem, jaxinf.cg(preconditioner=pre))
    expected = pre.init(model.operator_for(batches(problem)), key)
    stream = scale.BatchStream(
        None, problem.params, source(problem), kind="gauss_newton", damping=DAMPING,
        model_fn=problem.model_fn, output_loss=problem.output_loss,
    )  # fmt: skip
    got = fit_preconditioner(pre.config, stream, key)
    v = jax.tree.map(lambda a: jnp.stack([jnp.cos(jnp.arange(a.size) + k).reshape(a.shape) for k in range(3)]),
                     problem.params)  # fmt: skip
    apply = jax.jit(jax.vmap(pre.apply, in_axes=(None, 0)))
    want = raveled(apply(expected, v))
    np.testing.assert_allclose(raveled(apply(got, v)), want, rtol=1e-10, atol=1e-10 * float(jnp.abs(want).max()))


@pytest.mark.skipif(
    "damping_multiple" not in inspect.signature(jaxinf.kfac_preconditioner).parameters,
    reason="kfac_preconditioner has no damping_multiple",
)
def test_streamed_preconditioner_keeps_its_damping_multiple(problem):
    """``M = K + cλ``: the streamed state carries the multiple as ``init``'s does."""
    pre, key = jaxinf.kfac_preconditioner(fisher="exact", damping_multiple=3.0), jax.random.key(0)
    expected = pre.init(make_model(problem, jaxinf.cg(preconditioner=pre)).operator_for(batches(problem)), key)
    stream = scale.BatchStream(
        None, problem.params, source(problem), kind="gauss_newton", damping=DAMPING,
        model_fn=problem.model_fn, output_loss=problem.output_loss,
    )  # fmt: skip
    got = fit_preconditioner(pre.config, stream, key)
    assert [float(d) for d in got.kfac.damping] == [3.0 * DAMPING] * len(got.kfac.damping)
    for a, b in zip(jax.tree.leaves(got.kfac.damping), jax.tree.leaves(expected.kfac.damping)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-14)
    v = jax.tree.map(lambda a: jnp.sin(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)), problem.params)
    want = jax.flatten_util.ravel_pytree(pre.apply(expected, v))[0]
    got_v = jax.flatten_util.ravel_pytree(pre.apply(got, v))[0]
    np.testing.assert_allclose(got_v, want, rtol=1e-10, atol=1e-10 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("name", ["none", "ekfac", "nystrom"])
def test_cg_from_stream_equals_dense_and_in_memory_cg(problem, name):
    pre = PRECONDITIONERS[name]()
    solver = jaxinf.cg(rtol=1e-10, preconditioner=pre)
    key = jax.random.key(1)
    result = scale.cg_from_stream(make_model(problem, solver), problem.test, source(problem), key=key)
    exact = dense_factors(problem)
    got = raveled(result.factors)
    np.testing.assert_allclose(got, exact, rtol=1e-8, atol=1e-8 * float(jnp.abs(exact).max()))
    in_memory = raveled(make_model(problem, solver).fit(batches(problem), key=key).influence_factors(problem.test))
    np.testing.assert_allclose(got, in_memory, rtol=1e-8, atol=1e-8 * float(jnp.abs(exact).max()))
    assert result.converged.all() and not result.diverged.any()
    assert (result.residual_norm <= 1e-10 * result.rhs_norm).all()  # the true residual, from one more pass
    assert result.preconditioner_passes == {"none": 0, "ekfac": 2, "nystrom": 1}[name]
    assert result.passes == result.preconditioner_passes + int(result.iterations.max()) + 1


def test_streamed_factors_score_like_the_in_memory_model(problem):
    """The factors compose with the model's scoring: the same influences as ``model.influences`` in memory."""
    solver = jaxinf.cg(rtol=1e-10, preconditioner=jaxinf.kfac_preconditioner(fisher="exact"))
    model = make_model(problem, solver)
    result = scale.cg_from_stream(model, problem.test, source(problem))
    assert not model.is_fitted  # the model is not changed
    got = scale.influences_from_stream(model, result.factors, source(problem))
    expected = np.asarray(make_model(problem, solver).fit(batches(problem)).influences(problem.test, problem.train))
    assert got.shape == (3, N_TRAIN)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-8 * np.abs(expected).max())


def test_cg_from_stream_on_a_mesh(problem):
    """Batches sharded over 8 devices (the ragged 4 replicated): the same factors as on one device."""
    solver = jaxinf.cg(rtol=1e-10, preconditioner=jaxinf.kfac_preconditioner(fisher="exact"))
    single = scale.cg_from_stream(make_model(problem, solver), problem.test, source(problem))
    mesh = scale.data_mesh()
    sharded = scale.cg_from_stream(make_model(problem, solver), problem.test, source(problem), mesh=mesh)
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(sharded.factors))
    want = raveled(single.factors)
    np.testing.assert_allclose(raveled(sharded.factors), want, rtol=1e-9, atol=1e-9 * float(jnp.abs(want).max()))


def test_a_second_call_compiles_nothing(problem):
    """A new model of the same loss, solver and shapes reuses every program of the streamed solve."""
    from jaxinf.scale import preconditioner_stream, stream_cg, streaming

    jitted = (stream_cg._start, stream_cg._step, stream_cg._test_gradients, streaming._block_sum)
    jitted += (preconditioner_stream._nystrom_from_sketch,)
    solver = jaxinf.cg(rtol=1e-10, preconditioner=jaxinf.nystrom_preconditioner(6))
    first = scale.cg_from_stream(make_model(problem, solver), problem.test, source(problem))
    before = [f._cache_size() for f in jitted]
    second = scale.cg_from_stream(make_model(problem, solver), problem.test, source(problem))
    assert [f._cache_size() for f in jitted] == before
    np.testing.assert_array_equal(raveled(second.factors), raveled(first.factors))


def test_non_convergence_is_reported(problem):
    """maxiter reached: ConvergenceError under strict, else a warning and the numbers (iterations, passes, residual)."""
    solver = jaxinf.cg(rtol=1e-12, maxiter=2)
    with pytest.raises(jaxinf.ConvergenceError, match="did not converge for 3 of 3"):
        scale.cg_from_stream(make_model(problem, solver), problem.test, source(problem))
    with pytest.warns(RuntimeWarning, match="did not converge"):
        result = scale.cg_from_stream(make_model(problem, solver, strict=False), problem.test, source(problem))
    assert result.iterations.tolist() == [2, 2, 2] and result.passes == 3 and not result.converged.any()
    assert (result.residual_norm > 1e-12 * result.rhs_norm).all()


def test_bad_input_raises_before_any_pass(problem):
    src = source(problem)
    kfac_cg = jaxinf.cg(preconditioner=jaxinf.kfac_preconditioner())
    with pytest.raises(ValueError, match="needs damping > 0"):
        scale.cg_from_stream(make_model(problem, kfac_cg, damping=0.0), problem.test, src)
    with pytest.raises(TypeError, match=r"jaxinf.cg\(...\) solver"):
        scale.cg_from_stream(make_model(problem, jaxinf.direct()), problem.test, src)
    with pytest.raises(TypeError, match="InfluenceModel"):
        scale.cg_from_stream(jaxinf.cg(), problem.test, src)
    half = jaxinf.InfluenceModel(problem.loss_fn, jax.tree.map(lambda a: a.astype(jnp.bfloat16), problem.params),
                                 jaxinf.cg(), damping=DAMPING)  # fmt: skip
    with pytest.raises(ValueError, match="cg_from_stream does not take bfloat16"):
        scale.cg_from_stream(half, problem.test, src)
    with pytest.raises(ValueError, match="numeric damping"):
        scale.cg_from_stream(make_model(problem, jaxinf.cg(), damping="auto"), problem.test, src)
    with pytest.raises(ValueError, match="blocks"):
        scale.cg_from_stream(make_model(problem, jaxinf.cg(), blocks="layer"), problem.test, src)
    own_fns = jaxinf.ekfac_preconditioner(model_fn=problem.model_fn, output_loss=problem.output_loss)
    unreproducible = jaxinf.cg(preconditioner=own_fns)
    with pytest.raises(ValueError, match="model_fn=.*cannot be reproduced"):
        scale.cg_from_stream(make_model(problem, unreproducible), problem.test, src)
    x, y = problem.test
    with pytest.raises(ValueError, match="test_data"):
        scale.cg_from_stream(make_model(problem, jaxinf.cg()), (x,), src)  # a different tree
    with pytest.raises(ValueError, match="test_data"):
        scale.cg_from_stream(make_model(problem, jaxinf.cg()), (x.at[1, 0].set(jnp.nan), y), src)
    with pytest.raises(ValueError, match="cg_from_stream"):  # fit_from_stream points to the streamed solve
        scale.fit_from_stream(make_model(problem, kfac_cg), src, progress=False)
    train_x = np.asarray(problem.train[0]).copy()
    train_x[13, 1] = np.inf  # in the second batch
    bad = scale.ArraySource((train_x, np.asarray(problem.train[1])), batch_size=BATCH)
    with pytest.raises(ValueError, match=r"data\[batch 1\]"):
        scale.cg_from_stream(make_model(problem, jaxinf.cg()), problem.test, bad)
