"""The fit-time checks as one program, in the same order (issue 15, "first calls").

``check_fit`` used to compile two programs (every form of the loss on 16
examples; the curvature probes) and index the first stacked batch on the
host (a third). It now reads the batch from the stack inside one program
(``_fit_checks``) and raises exactly as before: the shape of each form, then
its values, then the curvature. Checked here: the data helpers against
``Batches.batches()``, the order of the errors (a loss that both sums and has
a zero curvature is named a sum) on the fused and the op-by-op paths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf.core import checks
from jaxinf.core.curvature import curvature_operator
from jaxinf.core.data import as_batches, select


def _batches(sizes):
    x = np.arange(sum(sizes) * 2, dtype=np.float64).reshape(-1, 2)
    starts = np.cumsum([0, *sizes])
    return [(x[s:e], x[s:e, 0]) for s, e in zip(starts[:-1], starts[1:])]


@pytest.mark.parametrize("sizes", [[5, 1, 5, 3], [1, 3, 1], [4], [3, 3], [2, 4, 4]])
def test_sources_are_the_batches_in_the_order_given(sizes):
    data = as_batches(_batches(sizes))
    given = list(data.batches())
    assert data.sizes() == sizes
    for index, batch in enumerate(given):
        tree, i = data.source(index)
        assert jax.tree.all(jax.tree.map(np.array_equal, select(tree, i), batch))
        shapes = jax.tree.map(lambda a: (a.shape, a.dtype), data.abstract(index))
        assert shapes == jax.tree.map(lambda a: (a.shape, a.dtype), batch)
    for at_least in (1, 2, 4, 6):
        first = next((j for j, n in enumerate(sizes) if n >= at_least), None)
        found = data.first_source(at_least)
        assert (found is None) == (first is None)
        if found is not None:
            tree, i, n, index = found
            assert (n, index) == (sizes[first], first)
            assert jax.tree.all(jax.tree.map(np.array_equal, select(tree, i), given[first]))


def model_fn(p, batch):
    return jnp.tanh(batch[0] @ p["w"])


def summed_linear(out, batch):
    """Linear in the outputs (a zero Gauss-Newton curvature) and a sum over the examples."""
    return jnp.sum(out[:, 0] - batch[1])


def mean_linear(out, batch):
    return jnp.mean(out[:, 0] - batch[1])


class Unhashable:
    """A loss that cannot be a static argument of ``jit`` (the op-by-op path)."""

    __hash__ = None

    def __init__(self, output_loss):
        self.output_loss = output_loss

    def __call__(self, p, batch):
        return self.output_loss(model_fn(p, batch), batch)


def _operator(output_loss, sizes=(8, 8, 5)):
    params = {"w": 0.3 * jnp.ones((2, 3))}
    data = _batches(list(sizes))
    op = curvature_operator(
        None, params, data, kind="gauss_newton", damping=0.1, model_fn=model_fn, output_loss=output_loss
    )
    return op


@pytest.mark.parametrize("hashable", [True, False])
def test_a_sum_is_named_before_a_zero_curvature(hashable):
    op = _operator(summed_linear)
    loss = (lambda p, b: summed_linear(model_fn(p, b), b)) if hashable else Unhashable(summed_linear)
    with pytest.raises(ValueError, match="loss_fn sums over the examples"):
        checks.check_fit(op, loss, model_fn, summed_linear)
    with pytest.raises(ValueError, match="sums over the examples"):  # the split form alone
        checks.check_fit(op, None, model_fn, summed_linear)


@pytest.mark.parametrize("sizes", [(8, 8, 5), (1, 1, 1)])
def test_a_zero_curvature_is_named_after_the_losses_pass(sizes):
    op = _operator(mean_linear, sizes)
    with pytest.raises(ValueError, match="curvature of .* is exactly zero"):
        checks.check_fit(op, None, model_fn, mean_linear)
    with pytest.raises(ValueError, match="curvature of .* is exactly zero"):
        checks.check_curvature(op)


def test_a_non_scalar_form_is_named_after_the_earlier_forms_values():
    op = _operator(mean_linear)

    def vector_loss(p, b):
        return model_fn(p, b)[:, 0]

    with pytest.raises(ValueError, match="loss_fn sums over the examples"):  # the first form's values first
        checks.check_fit(op, lambda p, b: summed_linear(model_fn(p, b), b), None, None)
    with pytest.raises(ValueError, match="must return the mean loss over the batch, a float scalar"):
        checks.check_fit(op, vector_loss, model_fn, mean_linear)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_a_curvature_dwarfed_by_the_damping_is_not_called_zero(dtype):
    """The probes take ``C v`` itself: ``(C + λI) v − λ v`` rounds to exactly 0 where ``λ`` dwarfs ``C`` (a loss
    scaled by 1e-12 under λ = 1 here), and the check used to refuse such a fit as a zero curvature."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((12, 3)), dtype)
    y = x @ jnp.asarray([1.0, -2.0, 0.5], dtype)
    w = jnp.asarray([0.9, -1.9, 0.4], dtype)

    def loss(w, batch):
        return 1e-12 * jnp.mean((batch[0] @ w - batch[1]) ** 2)

    model = jaxinf.InfluenceModel(loss, w, jaxinf.direct(), damping=1.0).fit((x, y))
    got = model.influences((x[:2], y[:2]), (x, y))
    x64, y64, w64 = (np.asarray(a, np.float64) for a in (x, y, w))
    per_example = 2e-12 * (x64 @ w64 - y64)[:, None] * x64  # ∇ of each example's loss
    curvature = 2e-12 * x64.T @ x64 / len(x64)
    want = per_example[:2] @ np.linalg.solve(curvature + np.eye(3), per_example.T)
    np.testing.assert_allclose(got, want, rtol=1e-4 if dtype == jnp.float32 else 1e-10)
    op = curvature_operator(loss, w, (x, y), damping=1e30)
    checks.check_curvature(op)  # and in float64 even under λ = 1e30
