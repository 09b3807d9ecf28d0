"""Saving and loading fitted solver states (jaxinf.scale.storage)."""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxinf
from jaxinf import scale
from tests import models


@pytest.fixture(scope="module")
def problem():
    return models.mlp_problem("linen", n_train=20, n_test=4)


def operator(problem, damping=1e-2):
    return jaxinf.curvature_operator(
        None,
        problem.params,
        problem.train,
        kind="gauss_newton",
        damping=damping,
        model_fn=problem.model_fn,
        output_loss=problem.output_loss,
    )


SOLVERS = {
    "direct": lambda: jaxinf.direct(),
    "arnoldi": lambda: jaxinf.arnoldi(rank=5, krylov_dim=8),
    "nystrom": lambda: jaxinf.nystrom(rank=5),
}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_round_trip_through_a_skeleton(problem, tmp_path, name):
    solver = SOLVERS[name]()
    op = operator(problem)
    state = solver.init(op, key=jax.random.key(3))
    path = tmp_path / "state.npz"
    scale.save_state(path, state, solver=solver, metadata={"damping": 1e-2})
    assert scale.read_header(path)["metadata"] == {"damping": 1e-2}
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []  # atomic write leaves nothing behind
    skeleton = scale.state_skeleton(solver, op, key=jax.random.key(3))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(skeleton))
    loaded = scale.load_state(path, skeleton, solver=solver)
    assert jax.tree.structure(loaded) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    v = jax.tree.map(lambda a: jnp.full(a.shape, 0.1, a.dtype), problem.params)
    solve = jax.jit(solver.solve)
    for a, b in zip(jax.tree.leaves(solve(loaded, v)[0]), jax.tree.leaves(solve(state, v)[0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fit_and_score_in_separate_jobs(problem, tmp_path):
    def new_model():
        return jaxinf.InfluenceModel(
            None,
            problem.params,
            jaxinf.direct(),
            damping=1e-2,
            curvature="gauss_newton",
            model_fn=problem.model_fn,
            output_loss=problem.output_loss,
        )

    fitted = new_model().fit(problem.train)  # job 1: fit and save
    scale.save_state(tmp_path / "state.npz", fitted.state, solver=fitted.solver)
    reference = np.asarray(fitted.influences(problem.test, problem.train))

    scorer = new_model()  # job 2: load (no curvature product runs) and score to disk
    skeleton = scale.state_skeleton(scorer.solver, operator(problem))
    state = scale.load_state(tmp_path / "state.npz", skeleton, solver=scorer.solver)
    out = scale.compute_influences(
        scorer, problem.test, problem.train, tmp_path / "store", state=state, batch_size=8, progress=False
    )
    np.testing.assert_allclose(out[:], reference, rtol=1e-12, atol=1e-12 * np.abs(reference).max())


def test_prng_keys_and_low_precision_leaves(tmp_path):
    state = {
        "key": jax.random.key(7),
        "raw": jax.random.PRNGKey(1),
        "bf16": jnp.arange(4, dtype=jnp.bfloat16) / 3,
        "i": np.arange(3, dtype=np.int32),
    }
    scale.save_state(tmp_path / "s.npz", state)
    loaded = scale.load_state(tmp_path / "s.npz", jax.eval_shape(lambda: state))
    assert jax.dtypes.issubdtype(loaded["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(loaded["key"]), jax.random.key_data(state["key"]))
    np.testing.assert_array_equal(loaded["raw"], state["raw"])
    assert loaded["bf16"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(loaded["bf16"], np.float32), np.asarray(state["bf16"], np.float32))
    np.testing.assert_array_equal(loaded["i"], state["i"])


def test_mismatches_are_named(problem, tmp_path):
    solver = jaxinf.direct()
    op = operator(problem)
    scale.save_state(tmp_path / "s.npz", solver.init(op), solver=solver)
    other = models.mlp_problem("linen", n_train=20, n_test=4, hidden=5)
    with pytest.raises(ValueError, match=r"does not match the skeleton: saved .*\(44, 44\).*skeleton .*\(37, 37\)"):
        scale.load_state(tmp_path / "s.npz", scale.state_skeleton(solver, operator(other)))
    with pytest.raises(ValueError, match="solver 'direct', not 'arnoldi'"):
        scale.load_state(tmp_path / "s.npz", None, solver=jaxinf.arnoldi(rank=2))
    with pytest.raises(ValueError, match="holds .* arrays, but the skeleton state has"):
        scale.load_state(tmp_path / "s.npz", {"a": np.zeros(2)})
    np.savez(tmp_path / "plain.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="not a jaxinf state file"):
        scale.load_state(tmp_path / "plain.npz", {"a": np.zeros(2)})


def test_loaded_state_on_a_mesh(problem, tmp_path):
    solver = jaxinf.direct()
    op = operator(problem)
    state = solver.init(op)
    scale.save_state(tmp_path / "s.npz", state)
    mesh = scale.data_mesh()
    loaded = scale.load_state(tmp_path / "s.npz", state, mesh=mesh)
    leaf = jax.tree.leaves(loaded)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
