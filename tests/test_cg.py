"""Conjugate gradient (plain, pre-conditioned, block) against dense float64 references.

Compilation dominates the run time of these tests, so solvers and jitted entry
points are built once at module level and shared by the tests that use the
same operator structure.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf.core.curvature import to_dense
from jaxinf.core.tree import ravel, tree_spec, unravel_batched
from jaxinf.solvers.base import solve_many
from tests import models

_dense = jax.jit(to_dense)
_rows = jax.vmap(ravel)

CG = jaxinf.cg(rtol=1e-12, block=True, block_size=4)
CG_VMAP = jax.jit(jax.vmap(CG.solve, in_axes=(None, 0)))
CG_MANY = jax.jit(CG.solve_many)
CG_ONE = jax.jit(CG.solve)


def _rhs(params, k, seed=0):
    spec = tree_spec(params)
    return unravel_batched(spec, jax.random.normal(jax.random.key(seed), (k, spec.size), spec.dtype))


def _gn_operator(problem, damping, data=None):
    return jaxinf.curvature_operator(
        problem.loss_fn, problem.params, problem.train if data is None else data, kind="gauss_newton",
        model_fn=problem.model_fn, output_loss=problem.output_loss, damping=damping,
    )


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref, axis=-1) / np.linalg.norm(ref, axis=-1)


def _vmap(solver):
    return jax.jit(jax.vmap(solver.solve, in_axes=(None, 0)))


def _dense_solve(op, rhs):
    return np.linalg.solve(np.asarray(_dense(op)), np.asarray(_rows(rhs)).T).T


@pytest.fixture(scope="module")
def mlp():
    """Plain tanh MLP (p = 44), Gauss-Newton with damping 1e-3, six right-hand sides and their exact solutions."""
    problem = models.mlp_problem("plain")
    op = _gn_operator(problem, 1e-3)
    rhs = _rhs(problem.params, 6)
    return problem, op, rhs, _dense_solve(op, rhs)


def test_cg_and_block_cg_match_direct_under_jit_without_recompiling(mlp):
    _, op, rhs, ref = mlp
    state = CG.init(op)
    x, info = CG_VMAP(state, rhs)
    xb, info_b = CG_MANY(state, rhs)  # 6 = a block of 4 and a zero-padded block of 2
    rnorm = jnp.linalg.norm(_rows(rhs), axis=1)
    for got, inf in ((x, info), (xb, info_b)):
        assert np.max(_rel_err(_rows(got), ref)) <= 1e-8
        assert inf.iterations.shape == (6,)
        assert bool(jnp.all(inf.converged)) and not bool(jnp.any(inf.diverged))
        assert bool(jnp.all(inf.residual_norm <= 1e-12 * rnorm))  # the true residual meets the criterion
    # block CG agrees with per-right-hand-side CG and, sharing one Krylov space, needs fewer iterations
    np.testing.assert_allclose(_rows(xb), _rows(x), rtol=1e-8, atol=1e-10)
    assert int(jnp.max(info_b.iterations[:4])) < int(jnp.min(info.iterations[:4]))
    # a single jitted solve agrees with its vmapped lane
    x1, info1 = CG_ONE(state, jax.tree.map(lambda a: a[1], rhs))
    np.testing.assert_allclose(ravel(x1), _rows(x)[1], rtol=1e-8, atol=1e-10)
    # second calls with new values (right-hand sides, damping) do not compile again
    CG_ONE(state, jax.tree.map(lambda a: a[2], rhs))
    CG_ONE(state._replace(operator=op.with_damping(0.5)), jax.tree.map(lambda a: a[2], rhs))
    CG_MANY(state, jax.tree.map(lambda a: 2 * a, rhs))
    CG_VMAP(state, jax.tree.map(lambda a: 2 * a, rhs))
    assert CG_ONE._cache_size() == 1 and CG_MANY._cache_size() == 1 and CG_VMAP._cache_size() == 1


def test_dependent_and_zero_right_hand_sides_do_not_break_block_cg(mlp):
    """Breakdown-free: a block whose directions are linearly dependent still converges."""
    _, op, rhs, _ = mlp
    base = _rows(rhs)
    block = jnp.stack([base[0], base[1], base[0], 2 * base[0] - base[1], jnp.zeros_like(base[0]), base[2]])
    rhs = unravel_batched(op.spec, block)
    x, info = CG_MANY(CG.init(op), rhs)
    got, ref = _rows(x), _dense_solve(op, rhs)
    keep = np.array([0, 1, 2, 3, 5])
    assert np.max(_rel_err(got[keep], ref[keep])) <= 1e-8
    assert bool(jnp.all(got[4] == 0)) and int(info.iterations[4]) == 0  # zero right-hand side: x = 0 at once
    assert bool(jnp.all(info.converged)) and not bool(jnp.any(info.diverged))


def test_ragged_last_batch(mlp):
    problem, op, rhs, ref = mlp
    batches = [jax.tree.map(lambda a, i=i: a[i:i + 8], problem.train) for i in (0, 8, 16)]  # 8, 8, 7 examples
    state = CG.init(_gn_operator(problem, 1e-3, data=batches))
    x, _ = CG_VMAP(state, rhs)
    xb, _ = CG_MANY(state, rhs)
    assert np.max(_rel_err(_rows(x), ref)) <= 1e-8
    assert np.max(_rel_err(_rows(xb), ref)) <= 1e-8


def test_more_right_hand_sides_than_parameters_with_blocks_and_per_block_damping():
    """pyDVL bug 1: rows past index p came back as zeros. Every row must be the solution."""
    p = models.logistic_problem(l2=1e-2)
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, blocks="parameter",
                                   damping={"['b']": 1e-2, "['w']": 1e-3})
    n_rhs = op.size * 2 + 5  # 29 right-hand sides, 12 parameters
    rhs = _rhs(p.params, n_rhs, seed=1)
    ref = _dense_solve(op, rhs)
    solver = jaxinf.cg(rtol=1e-12, block=True, block_size=64)  # capped at p = 12: blocks of 12, 12, 5 (+7 padding)
    state = solver.init(op)
    for x, info in (jax.jit(solver.solve_many)(state, rhs), _vmap(solver)(state, rhs)):
        got = _rows(x)
        assert got.shape == (n_rhs, op.size)
        assert bool(jnp.all(jnp.linalg.norm(got, axis=1) > 0))
        assert np.max(_rel_err(got, ref)) <= 1e-8
        assert bool(jnp.all(info.converged))


def test_nystrom_preconditioner_cuts_iterations_threefold():
    """An over-parameterised MLP (GN rank <= 48 < p = 147) with damping 1e-4: condition number >= 1e4."""
    p = models.mlp_problem("plain", n_train=16, d_in=8, hidden=12, out=3)
    op = _gn_operator(p, 1e-4)
    dense = np.asarray(_dense(op))
    eig = np.linalg.eigvalsh(dense)
    assert eig[-1] / eig[0] >= 1e4
    rhs = jax.vmap(jax.grad(p.loss_fn), in_axes=(None, 0))(p.params, jax.tree.map(lambda a: a[:, None], p.test))
    ref = np.linalg.solve(dense, np.asarray(_rows(rhs)).T).T
    plain = jaxinf.cg(rtol=1e-8, maxiter=2000)
    pre = jaxinf.cg(rtol=1e-8, maxiter=2000, preconditioner=jaxinf.nystrom_preconditioner(rank=40))
    x0, info0 = _vmap(plain)(jax.jit(plain.init)(op), rhs)
    state = jax.jit(lambda o: pre.init(o, key=jax.random.key(3)))(op)
    x1, info1 = _vmap(pre)(state, rhs)
    assert bool(jnp.all(info0.converged & info1.converged))
    assert int(jnp.max(info1.iterations)) * 3 <= int(jnp.min(info0.iterations))
    bound = 1e-8 * eig[-1] / eig[0]  # relative error <= condition number x relative residual
    for x in (x0, x1):
        assert np.max(_rel_err(_rows(x), ref)) <= bound


def test_jacobi_preconditioner_helps_when_the_diagonal_varies():
    d, n = 30, 200
    features = jax.random.normal(jax.random.key(0), (n, d)) * jnp.logspace(0, 2, d)  # feature scales 1 ... 100
    targets = jax.random.normal(jax.random.key(1), (n,))

    def loss(w, batch):
        return 0.5 * jnp.mean((batch[0] @ w["w"] + w["b"] - batch[1]) ** 2)

    params = {"w": jnp.zeros(d), "b": jnp.zeros(())}
    op = jaxinf.curvature_operator(loss, params, (features, targets), damping=1e-4)
    dense = np.asarray(_dense(op))
    assert np.max(np.diag(dense)) / np.min(np.diag(dense)) > 1e3
    rhs = _rhs(params, 4)
    ref = np.linalg.solve(dense, np.asarray(_rows(rhs)).T).T
    plain = jaxinf.cg(rtol=1e-10)
    pre = jaxinf.cg(rtol=1e-10, block=True, block_size=2, preconditioner=jaxinf.jacobi_preconditioner(50))
    x0, info0 = _vmap(plain)(jax.jit(plain.init)(op), rhs)
    state = jax.jit(pre.init)(op)
    x1, info1 = _vmap(pre)(state, rhs)
    xb, info_b = jax.jit(pre.solve_many)(state, rhs)
    assert bool(jnp.all(info0.converged & info1.converged & info_b.converged))
    assert int(jnp.max(info1.iterations)) < int(jnp.min(info0.iterations))
    for x in (x0, x1, xb):  # condition number ~1e4: relative error <= 1e4 x 1e-10
        assert np.max(_rel_err(_rows(x), ref)) <= 1e-6


def test_float32():
    p = models.mlp_problem("plain", dtype=jnp.float32)
    op = _gn_operator(p, 1e-1)
    rhs = _rhs(p.params, 3)
    solver = jaxinf.cg(rtol=1e-5, block=True, preconditioner=jaxinf.nystrom_preconditioner(rank=8))
    state = jax.jit(solver.init)(op)
    x, info = _vmap(solver)(state, rhs)
    xb, info_b = jax.jit(solver.solve_many)(state, rhs)
    assert _rows(x).dtype == jnp.float32 and _rows(xb).dtype == jnp.float32
    assert bool(jnp.all(info.converged & info_b.converged))
    p64 = models.mlp_problem("plain", dtype=jnp.float64)
    dense = np.asarray(_dense(_gn_operator(p64, 1e-1)))
    ref = np.linalg.solve(dense, np.asarray(_rows(rhs), np.float64).T).T
    kappa = np.linalg.cond(dense)
    assert kappa < 1e2
    # relative residual 1e-5 (reachable: float32 rounding adds ~1e-7 x kappa) bounds the relative error by kappa x 1e-5
    assert np.max(_rel_err(_rows(x), ref)) <= kappa * 1e-5
    assert np.max(_rel_err(_rows(xb), ref)) <= kappa * 1e-5


def test_non_convergence_is_reported(mlp):
    _, op, rhs, _ = mlp
    solver = jaxinf.cg(rtol=1e-10, maxiter=3, block=True)
    state = solver.init(op)
    rhs = jax.tree.map(lambda a: a[:2], rhs)
    for x, info in (_vmap(solver)(state, rhs), jax.jit(solver.solve_many)(state, rhs)):
        assert not bool(jnp.any(info.converged)) and not bool(jnp.any(info.diverged))
        assert info.iterations.tolist() == [3, 3]
        true = jnp.linalg.norm(jax.vmap(lambda v, x: ravel(v) - ravel(op.matvec(x)))(rhs, x), axis=1)
        np.testing.assert_allclose(info.residual_norm, true, rtol=1e-10)
    assert "maxiter" in solver.advice


def test_indefinite_curvature_is_reported_as_divergence():
    def loss(w, batch):  # Hessian diag(1, -1) times mean(batch) = 1
        return jnp.mean(batch) * 0.5 * (w[0] ** 2 - w[1] ** 2)

    op = jaxinf.curvature_operator(loss, jnp.zeros(2), jnp.ones(4), damping=0.0)
    solver = jaxinf.cg(block=True)
    state = solver.init(op)
    x, info = jax.jit(solver.solve)(state, jnp.ones(2))
    assert bool(info.diverged) and not bool(info.converged)
    assert bool(jnp.all(jnp.isfinite(x)))
    _, info_b = jax.jit(solver.solve_many)(state, jnp.ones((2, 2)))
    assert bool(jnp.all(info_b.diverged)) and not bool(jnp.any(info_b.converged))
    assert "positive definite" in solver.advice


def test_bad_configuration_and_input_and_default_maxiter():
    with pytest.raises(ValueError, match="rtol must be finite and >= 0"):
        jaxinf.cg(rtol=-1.0)
    with pytest.raises(ValueError, match="both 0"):
        jaxinf.cg(rtol=0.0, atol=0.0)
    with pytest.raises(ValueError, match="maxiter must be a positive integer"):
        jaxinf.cg(maxiter=0)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        jaxinf.cg(block=True, block_size=0)
    with pytest.raises(ValueError, match=r"block_size=8 applies to block CG only, and would be ignored"):
        jaxinf.cg(block_size=8)  # was silently ignored
    for rtol in (1, 2.0):  # stopped at x = 0: zero influences, reported as converged
        with pytest.raises(ValueError, match="rtol must be < 1"):
            jaxinf.cg(rtol=rtol)
        with pytest.raises(ValueError, match="rtol must be < 1"):
            jaxinf.lissa(rtol=rtol)
    with pytest.raises(ValueError, match="preconditioner must be None"):
        jaxinf.cg(preconditioner="jacobi")
    p = models.logistic_problem()
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.0)  # singular (softmax shift)
    solver = jaxinf.cg(rtol=1e-14, block=True)
    state = solver.init(op)
    with pytest.raises(ValueError, match="tree structure of the parameters"):
        solver.solve(state, {"w": p.params["w"]})
    with pytest.raises(ValueError, match=r"v\['w'\] has shape"):
        solver.solve(state, {"w": jnp.ones(4), "b": p.params["b"]})
    with pytest.raises(ValueError, match="leading batch axis"):
        solver.solve_many(state, p.params)
    with pytest.raises(ValueError, match="exceeds the number of parameters"):
        jaxinf.cg(preconditioner=jaxinf.nystrom_preconditioner(rank=op.size + 1)).init(op)
    _, info = solver.solve(state, jax.tree.map(jnp.ones_like, p.params))
    assert 0 < int(info.iterations) <= 10 * op.size  # default maxiter min(10 p, 1000)
    assert jaxinf.cg().name == "cg" and jaxinf.cg().solve_many is None
    assert jaxinf.cg(block=True, preconditioner=jaxinf.jacobi_preconditioner(4)).name == "block_cg+jacobi(4)"


def test_through_influence_model(mlp):
    problem, op, _, _ = mlp
    solver = jaxinf.cg(rtol=1e-12, block=True, preconditioner=jaxinf.nystrom_preconditioner(5))
    model = jaxinf.InfluenceModel(problem.loss_fn, problem.params, solver, curvature="gauss_newton",
                                  model_fn=problem.model_fn, output_loss=problem.output_loss, damping=1e-3)
    got = model.fit(problem.train, key=jax.random.key(0)).influences(problem.test, problem.train)
    g_test = models.dense_grads(problem.loss_fn, problem.params, problem.test)
    g_train = models.dense_grads(problem.loss_fn, problem.params, problem.train)
    ref = g_test @ np.linalg.solve(np.asarray(_dense(op)), np.asarray(g_train).T)
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())


def test_default_rtol_follows_the_dtype():
    """rtol=None: 1e-6 in float64, 1e-4 in float32 (1e-6 is out of float32's reach from condition numbers ~10)."""
    from jaxinf.solvers.cg import default_rtol

    assert (default_rtol(jnp.float64), default_rtol(jnp.float32), default_rtol(jnp.bfloat16)) == (1e-6, 1e-4, 1e-2)
    assert jaxinf.cg().config["rtol"] is None
    p = models.mlp_problem("plain", dtype=jnp.float32, n_train=23, hidden=16)
    op = _gn_operator(p, 1e-2)
    rhs = _rhs(p.params, 3)
    solver, block = jaxinf.cg(), jaxinf.cg(block=True)
    for _, info in (_vmap(solver)(solver.init(op), rhs), jax.jit(block.solve_many)(block.init(op), rhs)):
        assert bool(jnp.all(info.converged)), info.residual_norm
        assert bool(jnp.all(info.residual_norm <= 1e-4 * jnp.linalg.norm(_rows(rhs), axis=1)))
    with pytest.raises(ValueError, match="rtol must be a real number"):
        jaxinf.cg(rtol="1e-6")


def _true_relative_residuals(op, x, rhs):
    """``‖b − (C + λI)x‖ / ‖b‖`` per right-hand side, from the dense float64 matrix."""
    dense, b = np.asarray(_dense(op), np.float64), np.asarray(_rows(rhs), np.float64)
    return np.linalg.norm(b - np.asarray(_rows(x), np.float64) @ dense, axis=1) / np.linalg.norm(b, axis=1)


def test_converged_means_the_true_residual_meets_rtol():
    """Residual replacement: the recursive residual reaching rtol no longer counts as converged by itself.

    Damping 1e-6 (κ ≈ 1e7) at rtol 1e-10: the recursive residual drifts from the true one, and before residual
    replacement CG reported a true residual of 2.1e-10 (converged 0/4; block CG 1/4). Now both go on until the true
    residual meets rtol (117 and 53 iterations).
    """
    p = models.mlp_problem("plain", n_train=23, hidden=16)
    op = _gn_operator(p, 1e-6)
    rhs = _rhs(p.params, 4)
    reference = _dense_solve(op, rhs)
    kappa = np.linalg.cond(np.asarray(_dense(op)))
    assert kappa > 1e6
    rtol = 1e-10
    solver, block = jaxinf.cg(rtol=rtol), jaxinf.cg(rtol=rtol, block=True, block_size=4)
    for x, info in (_vmap(solver)(solver.init(op), rhs), jax.jit(block.solve_many)(block.init(op), rhs)):
        assert bool(jnp.all(info.converged)) and not bool(jnp.any(info.diverged)), info
        reported = np.asarray(info.residual_norm) / np.linalg.norm(np.asarray(_rows(rhs)), axis=1)
        assert np.all(reported <= rtol), reported  # the true residual, as the operator's products evaluate it
        # evaluated with the dense matrix instead: the same up to the rounding of b − Ax itself (≲ 6e-11 here)
        np.testing.assert_allclose(_true_relative_residuals(op, x, rhs), reported, rtol=0, atol=rtol)
        assert np.max(_rel_err(_rows(x), reference)) <= 10 * kappa * rtol


def test_float32_at_small_damping_converges_at_the_default_rtol():
    """float32, damping 1e-4, default rtol (1e-4): CG and block CG converge (before replacement: 0/3 each)."""
    p = models.mlp_problem("plain", dtype=jnp.float32, n_train=23, hidden=16)
    op = _gn_operator(p, 1e-4)
    rhs = _rhs(p.params, 3)
    solver, block = jaxinf.cg(), jaxinf.cg(block=True)
    op64 = _gn_operator(models.mlp_problem("plain", n_train=23, hidden=16), 1e-4)
    reference = _dense_solve(op64, jax.tree.map(lambda a: a.astype(jnp.float64), rhs))
    for x, info in (_vmap(solver)(solver.init(op), rhs), jax.jit(block.solve_many)(block.init(op), rhs)):
        assert bool(jnp.all(info.converged)), info.residual_norm
        # the float64 residual of the float32 answer: rtol plus float32's own error in evaluating b − Ax
        # (≈ eps₃₂·‖A‖‖x‖, up to ~1e-2 relative at κ ≈ 1e5; measured 2.4e-4)
        assert np.all(_true_relative_residuals(op64, x, rhs) <= 1e-3)
        assert np.max(_rel_err(_rows(x), reference)) < 0.5  # κ ≈ 1e5 × rtol 1e-4 bounds the error only loosely



@pytest.mark.parametrize("name", ["cg", "block_cg", "lissa", "direct", "arnoldi"])
def test_a_float32_right_hand_side_of_a_float64_operator_is_solved_in_float64(name):
    """CG and LiSSA used to fail inside jax.jvp (tangent dtype ≠ primal dtype) for float32 right-hand sides of a
    float64 model, while direct and Arnoldi accepted them: every solver now casts them to the params' dtype."""
    problem = models.mlp_problem("plain", n_train=12, n_test=3)
    op = _gn_operator(problem, 0.1)
    solver = {"cg": jaxinf.cg(rtol=1e-12), "block_cg": CG, "lissa": jaxinf.lissa(batch_size=None, rtol=1e-10),
              "direct": jaxinf.direct(), "arnoldi": jaxinf.arnoldi(4)}[name]
    state = solver.init(op, key=jax.random.key(0))
    v32 = jax.tree.map(lambda a: a.astype(jnp.float32), _rhs(problem.params, 2))
    want = solve_many(solver, state, jax.tree.map(lambda a: a.astype(jnp.float64), v32))[0]
    one = solver.solve(state, jax.tree.map(lambda a: a[0], v32))[0]
    many = solve_many(solver, state, v32)[0]
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves((one, many)))
    np.testing.assert_allclose(ravel(one), ravel(jax.tree.map(lambda a: a[0], want)), rtol=1e-9)
    np.testing.assert_allclose(_rows(many), _rows(want), rtol=1e-9)
