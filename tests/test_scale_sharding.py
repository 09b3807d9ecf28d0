"""Data parallelism over 8 simulated CPU devices (XLA_FLAGS set in tests/conftest.py)."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf import scale
from tests import models

BATCH = 8


@pytest.fixture(scope="module")
def problem():
    return models.mlp_problem("nnx", n_train=28, n_test=5)  # 3 batches of 8 and a ragged 4


def batches(problem):
    x, y = problem.train
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, 28, BATCH)]


def make_model(problem, solver):
    return jaxinf.InfluenceModel(
        None,
        problem.params,
        solver,
        damping=1e-2,
        curvature="gauss_newton",
        model_fn=problem.model_fn,
        output_loss=problem.output_loss,
    )


def test_mesh_and_batch_placement():
    mesh = scale.data_mesh()
    assert jax.device_count() == 8 and mesh.devices.size == 8
    x = scale.shard_batch({"x": np.arange(16.0).reshape(8, 2)}, mesh)["x"]
    assert {s.data.shape for s in x.addressable_shards} == {(1, 2)}
    np.testing.assert_array_equal(np.asarray(x), np.arange(16.0).reshape(8, 2))
    with pytest.raises(ValueError, match="cannot be split evenly over 8 devices"):
        scale.shard_batch(np.ones((7, 2)), mesh)
    padded = scale.pad_batch((np.arange(3.0), np.arange(3)), 8)
    assert padded[0].tolist() == [0, 1, 2, 2, 2, 2, 2, 2]
    assert scale.global_batch(padded, mesh)[1].sharding.spec == jax.sharding.PartitionSpec("data")
    r = scale.replicate({"w": jnp.ones(3)}, mesh)["w"]
    assert r.sharding.is_fully_replicated and len(r.sharding.device_set) == 8


def test_sharded_operator_products(problem):
    op = jaxinf.curvature_operator(problem.loss_fn, problem.params, batches(problem), damping=0.1)
    sharded = scale.shard_operator(op, scale.data_mesh())
    stacked = jax.tree.leaves(sharded.data.stacked)[0]
    assert stacked.sharding.spec == jax.sharding.PartitionSpec(None, "data")  # the example axis
    assert jax.tree.leaves(sharded.data.rest)[0].sharding.is_fully_replicated  # 4 examples: not divisible by 8
    v = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)), problem.params)
    expected = jax.jit(op.matvec)(v)
    got = jax.jit(sharded.matvec)(v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="multiple of 8"):
        scale.shard_operator(
            jaxinf.curvature_operator(
                problem.loss_fn, problem.params, [(problem.train[0][:6], problem.train[1][:6])] * 2
            ),
            scale.data_mesh(),
        )


SOLVERS = {
    "direct": lambda: jaxinf.direct(),
    "arnoldi": lambda: jaxinf.arnoldi(rank=8, krylov_dim=12),
}
if importlib.util.find_spec("jaxinf.solvers.cg") is not None and hasattr(jaxinf, "cg"):
    SOLVERS["cg"] = lambda: jaxinf.cg(rtol=1e-10)
if importlib.util.find_spec("jaxinf.solvers.kfac") is not None and hasattr(jaxinf, "ekfac"):
    SOLVERS["ekfac"] = lambda: jaxinf.ekfac()


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_sharded_fit_equals_single_device(problem, name):
    """Fitting (curvature products, Kronecker factors) data-parallel over 8 devices gives the same solves."""
    key = jax.random.key(0)
    solver = SOLVERS[name]()
    op = jaxinf.curvature_operator(
        None,
        problem.params,
        batches(problem),
        kind="gauss_newton",
        damping=1e-2,
        model_fn=problem.model_fn,
        output_loss=problem.output_loss,
    )
    rhs = jax.tree.map(
        lambda a: jnp.stack([jnp.sin(jnp.arange(a.size) + k).reshape(a.shape) for k in range(3)]), problem.params
    )
    solve = jax.jit(lambda state, v: jax.vmap(solver.solve, in_axes=(None, 0))(state, v)[0])
    expected = solve(solver.init(op, key=key), rhs)
    mesh = scale.data_mesh()
    state = solver.init(scale.shard_operator(op, mesh), key=key)
    if name == "ekfac":
        assert fitted_state_is_replicated(state)  # the rule a pre-conditioner's state follows (test below)
    got = solve(state, scale.replicate(rhs, mesh))
    tol = 1e-6 if name == "cg" else 1e-9
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol * float(np.abs(b).max()))


def fitted_state_is_replicated(state) -> bool:
    """Every array the fit made (not the operator, whose data is sharded) is on all 8 devices, whole."""
    fitted = {k: v for k, v in state._asdict().items() if k != "operator"} if hasattr(state, "_asdict") else state
    leaves = [x for x in jax.tree.leaves(fitted) if isinstance(x, jax.Array)]
    return bool(leaves) and all(x.sharding.is_fully_replicated and len(x.sharding.device_set) == 8 for x in leaves)


PRECONDITIONERS = {
    "ekfac": lambda: jaxinf.ekfac_preconditioner(),  # sampled Fisher: per-example draws
    "kfac": lambda: jaxinf.kfac_preconditioner(fisher="exact"),
    "nystrom": lambda: jaxinf.nystrom_preconditioner(8),
}


@pytest.mark.parametrize("name", sorted(PRECONDITIONERS))
def test_fit_with_preconditioned_cg(problem, name):
    """scale.fit of a cg(preconditioner=...) model: the factors of one device; the state replicated like ekfac's.

    (Equal factors give equal influences: the scoring is the same code; test_fit_helper scores on the mesh.)
    """
    solver, key = jaxinf.cg(rtol=1e-10, preconditioner=PRECONDITIONERS[name]()), jax.random.key(2)
    single = make_model(problem, solver).fit(batches(problem), key=key).influence_factors(problem.test)
    model = scale.fit(make_model(problem, solver), batches(problem), scale.data_mesh(), key=key)
    assert fitted_state_is_replicated(model.state.preconditioner)
    for a, b in zip(jax.tree.leaves(model.influence_factors(problem.test)), jax.tree.leaves(single)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-8, atol=1e-8 * float(np.abs(b).max()))


def test_fit_helper(problem, tmp_path):
    mesh = scale.data_mesh()
    single = make_model(problem, jaxinf.direct()).fit(batches(problem))
    reference = np.asarray(single.influences(problem.test, problem.train))
    model = scale.fit(make_model(problem, jaxinf.direct()), batches(problem), mesh)
    assert jax.tree.leaves(model.operator.data.stacked)[0].sharding.spec[1] == "data"
    assert model.n_train == 28
    out = scale.compute_influences(model, problem.test, batches(problem), tmp_path / "s", mesh=mesh, progress=False)
    np.testing.assert_allclose(out[:], reference, rtol=1e-9, atol=1e-9 * np.abs(reference).max())


@pytest.mark.parametrize("scoring", ["layerwise", "jvp"])
def test_sharded_scoring_methods_equal_single_device(problem, tmp_path, scoring):
    """Every scoring contraction runs on training batches sharded over 8 devices (batches of 8 and a ragged 4)."""
    single = make_model(problem, jaxinf.direct()).fit(batches(problem))
    reference = np.asarray(single.influences(problem.test, problem.train))
    mesh = scale.data_mesh()
    out = scale.compute_influences(
        single, problem.test, batches(problem), tmp_path / "s", mesh=mesh, scoring=scoring, progress=False
    )
    np.testing.assert_allclose(out[:], reference, rtol=1e-9, atol=1e-9 * np.abs(reference).max())


def test_fit_helper_runs_the_fit_time_checks(problem):
    """scale.fit refuses what model.fit refuses (core/checks.py): here a loss that sums over the examples."""

    def summed(p, batch):
        return problem.loss_fn(p, batch) * jax.tree.leaves(batch)[0].shape[0]

    model = jaxinf.InfluenceModel(summed, problem.params, jaxinf.direct(), damping=0.1)
    with pytest.raises(ValueError, match="sums over the examples"):
        scale.fit(model, batches(problem), scale.data_mesh())
    assert not model.is_fitted


def test_sampled_fisher_is_the_same_on_any_number_of_devices():
    """Sampled-Fisher EK-FAC: every example draws by its global index, so 1, 2 or 8 devices fit one state.

    (Each fit compiles anew, about 5 s each on the two-core machine.)

    The multi-process path of scale.fit (passes over global batches, each example keyed by its global index
    ``process·n_local + position``) is run here in one process too; tests/test_scale_distributed.py runs it on two.
    """
    from jaxinf.scale import sharding

    p = models.logistic_problem(n_train=24, n_test=2)
    train = [jax.tree.map(lambda a, i=i: a[i : i + BATCH], p.train) for i in range(0, 24, BATCH)]
    key = jax.random.key(5)

    def fitted(key, mesh=None):
        model = make_model(p, jaxinf.ekfac(fisher="sampled", likelihood="categorical"))
        return model.fit(train, key=key) if mesh is None else scale.fit(model, train, mesh, key=key)

    def assert_same(got, expected):
        for field in ("factors_a", "factors_g", "eigvals"):
            for a, b in zip(jax.tree.leaves(getattr(got, field)), jax.tree.leaves(getattr(expected, field))):
                a, b = np.asarray(a), np.asarray(b)
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max(), err_msg=field)

    expected = fitted(key).state  # unsharded: one device
    for count in (2, 8):
        assert_same(fitted(key, scale.data_mesh(jax.devices()[:count])).state, expected)
    model = make_model(p, jaxinf.ekfac(fisher="sampled", likelihood="categorical"))
    local = jaxinf.as_batches(train)
    sharding._fit_by_passes(model, model.operator_for(local), local, scale.data_mesh(), key)
    assert_same(model.state, expected)


def test_preconditioner_fitted_by_global_passes_is_the_in_memory_one():
    """cg with a sampled-Fisher EK-FAC pre-conditioner takes the multi-process path of scale.fit (passes over global
    batches, each example drawing by its global index), run here in one process: the state of model.fit."""
    from jaxinf.scale import sharding
    from jaxinf.scale.preconditioner_stream import draws_per_example

    p = models.logistic_problem(n_train=24, n_test=2)
    train = [jax.tree.map(lambda a, i=i: a[i : i + BATCH], p.train) for i in range(0, 24, BATCH)]
    key = jax.random.key(5)
    solver = jaxinf.cg(preconditioner=jaxinf.ekfac_preconditioner(fisher="sampled", likelihood="categorical"))
    assert draws_per_example(solver) and draws_per_example(jaxinf.ekfac())
    assert not draws_per_example(jaxinf.cg(preconditioner=jaxinf.nystrom_preconditioner(4)))
    assert not draws_per_example(jaxinf.cg())
    expected = make_model(p, solver).fit(train, key=key).state.preconditioner
    model = make_model(p, solver)
    local = jaxinf.as_batches(train)
    sharding._fit_by_passes(model, model.operator_for(local), local, scale.data_mesh(), key)
    got = model.state.preconditioner
    assert bool(got.positive) and model.state.operator.num_examples == 24
    for field in ("factors_a", "factors_g", "eigvals"):
        for a, b in zip(jax.tree.leaves(getattr(got.kfac, field)), jax.tree.leaves(getattr(expected.kfac, field))):
            a, b = np.asarray(a), np.asarray(b)
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max(), err_msg=field)
