"""Saving and loading fitted solver states (jaxinf.scale.storage)."""

import io
import json
import os
import warnings
import zipfile

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


# --------------------------------------------------------------------------- what a state records (issue 16)


def test_a_state_fitted_for_another_problem_is_refused_naming_what_differs(problem, tmp_path):
    solver = jaxinf.arnoldi(rank=5, krylov_dim=8)
    op = operator(problem)
    path = tmp_path / "s.npz"
    state = solver.init(op, key=jax.random.key(0))
    scale.save_state(path, state, solver=solver, operator=op)
    fit = scale.read_header(path)["fit"]
    assert fit["curvature"] == "gauss_newton" and fit["damping"] == {"all": 1e-2}
    assert fit["solver_config"]["krylov_dim"] == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything recorded and equal: no warning
        loaded = scale.load_state(path, solver=solver, operator=op, key=jax.random.key(0))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    moved = jax.tree.map(lambda a: a * 1.01, problem.params)
    hessian = jaxinf.curvature_operator(problem.loss_fn, problem.params, problem.train, damping=1e-2)
    cases = [
        (solver, operator(problem, damping=0.1), r"damping: saved \{'all': 0.01\}, now \{'all': 0.1\}"),
        (solver, operator(problem._replace(params=moved)), r"params \(digest\): saved '[0-9a-f]{12}…'"),
        (solver, hessian, "curvature kind: saved 'gauss_newton', now 'hessian'"),
        (jaxinf.arnoldi(rank=5, krylov_dim=9), op, r"solver configuration \(krylov_dim: saved 8, now 9\)"),
    ]
    for other_solver, other_op, match in cases:
        with pytest.raises(ValueError, match="was fitted for another problem or solver: .*" + match):
            scale.load_state(path, solver=other_solver, operator=other_op, key=jax.random.key(0))
    layered = jaxinf.curvature_operator(
        None, problem.params, problem.train, kind="gauss_newton", damping=1e-2, blocks="layer",
        model_fn=problem.model_fn, output_loss=problem.output_loss,
    )  # fmt: skip
    with pytest.raises(ValueError, match="block layout.*damping"):
        scale.load_state(path, scale.state_skeleton(solver, op), solver=solver, operator=layered)

    # on_mismatch="refit": a warning naming the difference, and the state of a fresh fit
    other = operator(problem, damping=0.1)
    with pytest.warns(UserWarning, match=r"damping: saved .*refitting"):
        refit = scale.load_state(path, solver=solver, operator=other, on_mismatch="refit", key=jax.random.key(0))
    for a, b in zip(jax.tree.leaves(refit), jax.tree.leaves(solver.init(other, key=jax.random.key(0)))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="on_mismatch must be one of"):
        scale.load_state(path, solver=solver, operator=op, on_mismatch="ignore")
    with pytest.raises(ValueError, match="on_mismatch='refit' needs solver= and operator="):
        scale.load_state(path, scale.state_skeleton(solver, op), on_mismatch="refit")


def test_a_state_saved_without_its_operator_loads_with_a_warning(problem, tmp_path):
    solver = jaxinf.direct()
    op = operator(problem)
    scale.save_state(tmp_path / "s.npz", solver.init(op), solver=solver)
    with pytest.warns(UserWarning, match="does not record the curvature kind, block layout, damping, params"):
        scale.load_state(tmp_path / "s.npz", solver=solver, operator=op)


def test_metadata_that_json_cannot_store_is_named(tmp_path):
    for metadata, match in [
        ({"damping": np.float32(0.1)}, r"metadata\['damping'\] is a numpy.float32"),
        ({"run": {"sizes": [1, jnp.ones(2)]}}, r"metadata\['run'\]\['sizes'\]\[1\] is a jaxlib"),
        ({"ok": 1, 2: "x"}, "has the key 2 \\(int\\); JSON keys must be strings"),
        ([1, 2], "metadata must be a dict"),
    ]:
        with pytest.raises(ValueError, match=match):
            scale.save_state(tmp_path / "s.npz", {"a": np.zeros(2)}, metadata=metadata)
    assert os.listdir(tmp_path) == []  # nothing written


def test_swapped_arguments_are_named(tmp_path):
    """save_state(model_or_state, path) used to fail with "data type 'u72' not understood" (the path saved as a
    state); every entry point now names its first argument, the file path."""
    state = {"a": np.zeros(2)}
    path_first = r"first argument is the file path \(str or os.PathLike\), got "
    with pytest.raises(TypeError, match="save_state's " + path_first + "dict"):
        scale.save_state(state, tmp_path / "s.npz")
    scale.save_state(tmp_path / "s.npz", state)
    with pytest.raises(TypeError, match="load_state's " + path_first + "dict"):
        scale.load_state(state, tmp_path / "s.npz")
    with pytest.raises(TypeError, match="read_header's " + path_first + "int"):
        scale.read_header(3)
    for directory in (tmp_path, f"{tmp_path}/new/"):
        with pytest.raises(ValueError, match="is a directory; save_state writes one file"):
            scale.save_state(directory, state)
    assert os.listdir(tmp_path) == ["s.npz"]


def test_truncated_and_corrupted_files_give_a_clear_error(problem, tmp_path):
    solver = jaxinf.direct()
    op = operator(problem)
    good = tmp_path / "s.npz"
    scale.save_state(good, solver.init(op), solver=solver)
    raw = good.read_bytes()
    skeleton = scale.state_skeleton(solver, op)
    data_start = raw.index(b"leaf_00000.npy") + 200  # inside the first leaf's data
    header_text = raw.index(b'"leaves"')  # inside the JSON header
    variants = {f"cut{n}": raw[:n] for n in (0, 30, len(raw) // 2, len(raw) - 10)}
    for name, at in [("data", data_start), ("json", header_text)]:
        flipped = bytearray(raw)
        flipped[at] ^= 0x55
        variants[name] = bytes(flipped)
    for name, content in variants.items():
        bad = tmp_path / f"{name}.npz"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=f"{bad.name} is not a readable jaxinf state file"):
            scale.load_state(bad, skeleton, solver=solver)
        if name != "data":
            with pytest.raises(ValueError, match="not a readable jaxinf state file"):
                scale.read_header(bad)


def _forged(path, declared_shape, data: bytes, json_shape=None):
    """A state file whose single leaf's .npy header declares ``declared_shape`` float64 but holds ``data``."""
    header = {"format": "jaxinf-state", "version": 2, "solver": None, "fit": {}, "metadata": {}}
    header["leaves"] = [{"path": "['a']", "shape": list(json_shape or declared_shape), "dtype": "float64"}]
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in [("__header__", np.frombuffer(json.dumps(header).encode(), np.uint8))]:
            buffer = io.BytesIO()
            np.save(buffer, array)
            archive.writestr(name + ".npy", buffer.getvalue())
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buffer, {"descr": "<f8", "fortran_order": False, "shape": tuple(declared_shape)}
        )
        archive.writestr("leaf_00000.npy", buffer.getvalue() + data)


def test_headers_declaring_huge_arrays_are_refused_before_allocating(tmp_path):
    huge = (10**15,)  # 8 PB: allocating it would fail (or swap) long before any check
    _forged(tmp_path / "huge.npz", huge, np.zeros(2).tobytes())
    with pytest.raises(ValueError, match=r"declares shape \(1000000000000000,\) float64 .* but 16 bytes follow"):
        scale.load_state(tmp_path / "huge.npz", {"a": jax.ShapeDtypeStruct(huge, jnp.float64)})
    _forged(tmp_path / "lying.npz", huge, np.zeros(2).tobytes(), json_shape=(2,))
    with pytest.raises(ValueError, match="declares shape"):
        scale.load_state(tmp_path / "lying.npz", {"a": jax.ShapeDtypeStruct((2,), jnp.float64)})
    _forged(tmp_path / "fine.npz", (2,), np.arange(2.0).tobytes())
    loaded = scale.load_state(tmp_path / "fine.npz", {"a": jax.ShapeDtypeStruct((2,), jnp.float64)})
    np.testing.assert_array_equal(loaded["a"], [0.0, 1.0])
