"""Curvature products and the exact dense fit from a stream (jaxinf.scale.streaming)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf import scale
from jaxinf.core.curvature import to_dense
from tests import models


@pytest.fixture(scope="module")
def problem():
    return models.mlp_problem("plain", n_train=23, n_test=4)


def source(problem, batch=5):
    return scale.ArraySource(jax.tree.map(np.asarray, problem.train), batch)  # ragged last batch of 3


def operator(problem, kind, **kwargs):
    return jaxinf.curvature_operator(
        problem.loss_fn,
        problem.params,
        problem.train,
        kind=kind,
        model_fn=problem.model_fn,
        output_loss=problem.output_loss,
        **kwargs,
    )


@pytest.mark.parametrize("kind", ["hessian", "gauss_newton", "fisher"])
def test_products_equal_in_memory_operator(problem, kind):
    op = operator(problem, kind)
    stream = scale.StreamingCurvature(
        problem.loss_fn,
        problem.params,
        source(problem),
        kind=kind,
        model_fn=problem.model_fn,
        output_loss=problem.output_loss,
    )
    assert stream.num_examples == 23
    k = jax.random.split(jax.random.key(0), 3)
    vs = jax.tree.map(lambda a: jax.random.normal(k[0], (3, *a.shape), a.dtype), problem.params)
    got = stream.matmat(vs)
    expected = jax.jit(jax.vmap(op.curvature_vp))(vs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-13)
    if kind == "hessian":
        dense = np.asarray(stream.dense(column_batch=7))
        np.testing.assert_allclose(dense, np.asarray(to_dense(op)), rtol=1e-11, atol=1e-12)
    one = stream.curvature_vp(jax.tree.map(lambda a: a[0], vs))
    np.testing.assert_allclose(np.asarray(one["w1"]), np.asarray(got["w1"][0]), rtol=1e-14)


@pytest.mark.parametrize("blocks", [None, "layer"])
def test_direct_from_stream_equals_direct_in_memory(problem, blocks, tmp_path):
    model = jaxinf.InfluenceModel(problem.loss_fn, problem.params, jaxinf.direct(), damping=0.05, blocks=blocks)
    with pytest.warns(UserWarning, match="negative eigenvalue"):
        model.fit(problem.train)
    reference = np.asarray(model.influences(problem.test, problem.train))
    state = scale.direct_from_stream(
        problem.loss_fn, problem.params, source(problem), damping=0.05, blocks=blocks, mesh=scale.data_mesh()
    )
    assert state.block_names == model.state.block_names
    for w1, w2 in zip(state.eigvals, model.state.eigvals):
        np.testing.assert_allclose(np.asarray(w1), np.asarray(w2), rtol=1e-10, atol=1e-12)
    out = scale.compute_influences(model, problem.test, source(problem), tmp_path / "s", state=state, progress=False)
    np.testing.assert_allclose(out[:], reference, rtol=1e-9, atol=1e-10 * np.abs(reference).max())


def test_errors(problem):
    with pytest.raises(ValueError, match="Unknown curvature"):
        scale.StreamingCurvature(problem.loss_fn, problem.params, source(problem), kind="newton")
    with pytest.raises(ValueError, match="needs model_fn and output_loss"):
        scale.StreamingCurvature(problem.loss_fn, problem.params, source(problem), kind="gauss_newton")
    stream = scale.StreamingCurvature(problem.loss_fn, problem.params, source(problem))
    with pytest.raises(ValueError, match="leading batch axis"):
        stream.matmat(problem.params)
    with pytest.raises(ValueError, match="from a stream needs about .* GiB .* Use blocks='layer'"):
        scale.direct_from_stream(problem.loss_fn, problem.params, source(problem), damping=0.1, max_memory=100)


def test_float32():
    p32 = models.mlp_problem("plain", n_train=23, n_test=4, dtype=jnp.float32)
    p64 = models.mlp_problem("plain", n_train=23, n_test=4)
    dense32 = scale.StreamingCurvature(p32.loss_fn, p32.params, source(p32)).dense()
    assert dense32.dtype == jnp.float32
    dense64 = to_dense(operator(p64, "hessian"))
    np.testing.assert_allclose(np.asarray(dense32), np.asarray(dense64), rtol=1e-4, atol=1e-5)
