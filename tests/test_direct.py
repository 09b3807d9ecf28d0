"""The exact solver against jnp.linalg.solve in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf.core.curvature import to_dense
from jaxinf.core.tree import ravel, tree_spec, unravel_batched
from jaxinf.solvers.direct import with_damping
from tests import models


def _rhs(params, k, seed=0):
    spec = tree_spec(params)
    return unravel_batched(spec, jax.random.normal(jax.random.key(seed), (k, spec.size), spec.dtype))


@pytest.mark.parametrize("flavour", ["linen", "nnx", "plain"])
def test_direct_matches_dense_solve_with_more_rhs_than_params(flavour):
    p = models.mlp_problem(flavour)
    op = jaxinf.curvature_operator(
        p.loss_fn, p.params, p.train, kind="gauss_newton", model_fn=p.model_fn, output_loss=p.output_loss, damping=1e-3
    )
    solver = jaxinf.direct()
    state = solver.init(op)
    n_rhs = op.size + 7  # more right-hand sides than parameters
    rhs = _rhs(p.params, n_rhs)
    x, info = jax.jit(jax.vmap(solver.solve, in_axes=(None, 0)))(state, rhs)
    ref = jnp.linalg.solve(to_dense(op), jax.vmap(ravel)(rhs).T).T
    got = jax.vmap(ravel)(x)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-10)
    assert bool(jnp.all(info.converged)) and not bool(jnp.any(info.diverged))
    assert float(jnp.max(info.residual_norm)) < 1e-9


def test_direct_with_layer_blocks_and_per_block_damping():
    p = models.mlp_problem("linen")
    damping = {"['params']['Dense_0']": 0.05, "['params']['Dense_1']": 0.2}
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, blocks="layer", damping=damping)
    solver = jaxinf.direct()
    state = solver.init(op)
    rhs = _rhs(p.params, 3)
    x, _ = jax.vmap(solver.solve, in_axes=(None, 0))(state, rhs)
    ref = jnp.linalg.solve(to_dense(op), jax.vmap(ravel)(rhs).T).T
    np.testing.assert_allclose(jax.vmap(ravel)(x), ref, rtol=1e-9, atol=1e-10)


def test_direct_under_jit_does_not_recompile():
    p = models.mlp_problem("plain")
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.1)
    solver = jaxinf.direct()
    state = jax.jit(solver.init)(op)
    solve = jax.jit(solver.solve)
    rhs = _rhs(p.params, 2)
    first = jax.tree.map(lambda a: a[0], rhs)
    second = jax.tree.map(lambda a: a[1], rhs)
    solve(state, first)
    solve(state, second)
    assert solve._cache_size() == 1


def test_direct_float32():
    p = models.mlp_problem("plain", dtype=jnp.float32)
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.5)
    solver = jaxinf.direct()
    x, info = solver.solve(solver.init(op), jax.tree.map(jnp.ones_like, p.params))
    assert ravel(x).dtype == jnp.float32
    assert bool(info.converged)
    # float64 reference on the same problem
    p64 = models.mlp_problem("plain", dtype=jnp.float64)
    op64 = jaxinf.curvature_operator(p64.loss_fn, p64.params, p64.train, damping=0.5)
    ref = np.linalg.solve(np.asarray(to_dense(op64)), np.ones(op64.size))
    err = np.linalg.norm(np.asarray(ravel(x), np.float64) - ref) / np.linalg.norm(ref)
    assert err < 1e-4, err


@pytest.mark.parametrize("factorization", ["eigh", "auto"])
def test_changing_damping_needs_no_refactorisation(factorization):
    """Free for an ``eigh`` state; a Cholesky state (``auto`` on this PD Hessian) is refactorised to the new λ."""
    p = models.logistic_problem()
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.1)
    solver = jaxinf.direct(factorization=factorization)
    fitted = solver.init(op)
    assert fitted.factorizations == ({"eigh": "eigh", "auto": "cholesky"}[factorization],)
    state = with_damping(fitted, 0.7)
    v = jax.tree.map(jnp.ones_like, p.params)
    x, _ = solver.solve(state, v)
    ref = jnp.linalg.solve(to_dense(op.with_damping(0.7)), ravel(v))
    np.testing.assert_allclose(ravel(x), ref, rtol=1e-10)


def test_singular_curvature_without_damping_is_refused():
    # More parameters than examples: the Gauss-Newton matrix is rank deficient.
    p = models.mlp_problem("plain", n_train=3)
    op = jaxinf.curvature_operator(
        None, p.params, p.train, kind="gauss_newton", model_fn=p.model_fn, output_loss=p.output_loss, damping=0.0
    )
    solver = jaxinf.direct()
    state = solver.init(op)
    with pytest.raises(ValueError, match="singular.*Set damping > 0"):
        solver.validate(state)
    _, info = solver.solve(state, jax.tree.map(jnp.ones_like, p.params))
    assert not bool(info.converged)


def test_direct_refuses_what_does_not_fit_and_says_how_much():
    p = models.mlp_problem("plain")
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.1)
    with pytest.raises(ValueError, match=r"needs about .* GiB .* 44 parameters"):
        jaxinf.direct(max_memory=1000).init(op)


def test_direct_rejects_mismatched_right_hand_side():
    p = models.mlp_problem("plain")
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.1)
    solver = jaxinf.direct()
    state = solver.init(op)
    with pytest.raises(ValueError, match="tree structure"):
        solver.solve(state, [p.params["w1"]])
    with pytest.raises(ValueError, match="shape"):
        solver.solve(state, dict(p.params, b1=jnp.zeros(5)))
    with pytest.raises(ValueError, match="column_batch"):
        jaxinf.direct(column_batch=0)
    with pytest.raises(ValueError, match="factorization must be one of"):
        jaxinf.direct(factorization="lu")


def test_influence_columns_follow_the_order_of_ragged_training_batches():
    # Found by tests/test_fuzz_entry_points.py: batches of sizes (4, 3, 4) were stored as the two of size 4 and
    # then the one of size 3, and the influence columns came out in that stored order, not the order given.
    x = jax.random.normal(jax.random.key(0), (11, 3))
    y = jax.random.normal(jax.random.key(1), (11,))

    def loss(w, batch):
        return jnp.mean((batch[0] @ w - batch[1]) ** 2)

    w = jnp.full(3, 0.1)
    model = jaxinf.InfluenceModel(loss, w, jaxinf.direct(), damping=0.5).fit((x, y))
    whole = model.influences((x[:2], y[:2]), (x, y))
    ragged = model.influences((x[:2], y[:2]), [(x[:4], y[:4]), (x[4:7], y[4:7]), (x[7:], y[7:])])
    np.testing.assert_allclose(ragged, whole, rtol=1e-12, atol=1e-12)
