"""The tiled, streamed, resumable influence calculator (jaxinf.scale.calculator)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zarr

import jaxinf
from jaxinf import scale
from jaxinf.scale import store
from tests import models

N_TRAIN, N_TEST, BATCH = 23, 5, 5  # ragged last training batch (3) and test block (1 of test_block=2)


@pytest.fixture(scope="module")
def problem():
    return models.mlp_problem("plain", n_train=N_TRAIN, n_test=N_TEST)


def make_model(problem, solver=None, **kwargs):
    return jaxinf.InfluenceModel(
        None,
        problem.params,
        solver or jaxinf.direct(),
        damping=1e-3,
        curvature="gauss_newton",
        model_fn=problem.model_fn,
        output_loss=problem.output_loss,
        **kwargs,
    ).fit(problem.train)


@pytest.fixture(scope="module")
def fitted(problem):
    model = make_model(problem)
    return model, np.asarray(model.influences(problem.test, problem.train))


def numpy_data(problem):
    return jax.tree.map(np.asarray, problem.train), jax.tree.map(np.asarray, problem.test)


def sources(kind, train, tmp_path):
    if kind == "array":
        return scale.ArraySource(train, BATCH)
    if kind == "memmap":
        maps = []
        for i, a in enumerate(train):
            m = np.lib.format.open_memmap(tmp_path / f"leaf{i}.npy", mode="w+", dtype=a.dtype, shape=a.shape)
            m[:] = a
            m.flush()
            maps.append(np.load(tmp_path / f"leaf{i}.npy", mmap_mode="r"))
        return scale.ArraySource(tuple(maps), BATCH)
    if kind == "iterable":
        return scale.IterableSource(
            lambda: scale.ArraySource(train, BATCH).batches(), num_examples=N_TRAIN, batch_size=BATCH
        )
    return [jax.tree.map(lambda a, i=i: a[i : i + BATCH], train) for i in range(0, N_TRAIN, BATCH)]


@pytest.mark.parametrize("kind", ["array", "memmap", "iterable", "list"])
def test_matches_in_memory_influences(problem, fitted, tmp_path, kind):
    model, reference = fitted
    train, test = numpy_data(problem)
    out = scale.compute_influences(
        model, test, sources(kind, train, tmp_path), tmp_path / "store", test_block=2, progress=False
    )
    assert out.shape == (N_TEST, N_TRAIN)
    assert out.chunks == (2, BATCH)
    np.testing.assert_allclose(out[:], reference, rtol=1e-10, atol=1e-10 * np.abs(reference).max())
    lazy = scale.open_influences(tmp_path / "store")
    np.testing.assert_array_equal(lazy[1:3, 4:9], out[1:3, 4:9])
    assert zarr.open_group(str(tmp_path / "store")).attrs["complete"] is True


def test_in_memory_batch_cut_by_batch_size(problem, fitted, tmp_path):
    model, reference = fitted
    out = scale.compute_influences(
        model, problem.test, problem.train, tmp_path / "s", batch_size=7, test_block=3, progress=True
    )
    assert out.chunks == (3, 7)
    np.testing.assert_allclose(out[:], reference, rtol=1e-10, atol=1e-10 * np.abs(reference).max())


def test_resumed_run_is_identical_to_an_uninterrupted_one(problem, fitted, tmp_path):
    model, _ = fitted
    train, test = numpy_data(problem)
    source = scale.ArraySource(train, BATCH)
    full = scale.compute_influences(model, test, source, tmp_path / "full", test_block=2, progress=False)[:]

    class Killed(Exception):
        pass

    calls = []

    def die_after_four(info):
        calls.append(info)
        if len(calls) == 4:  # the 4th block is written and marked, then the job dies
            raise Killed

    calc = scale.InfluenceCalculator(model, test_block=2, progress=False)
    with pytest.raises(Killed):
        calc.run(test, source, tmp_path / "part", callback=die_after_four)
    root = zarr.open_group(str(tmp_path / "part"))
    assert root.attrs["complete"] is False
    assert int(store.done_cells(str(tmp_path / "part"), (3, 5, 1)).sum()) == 4  # 3 test blocks × 5 steps
    assert np.isnan(root["influences"][:]).any()  # not computed yet

    resumed = []
    again = scale.InfluenceCalculator(model, test_block=2, progress=False)  # a fresh job, same arguments
    out = again.run(test, source, tmp_path / "part", callback=resumed.append)
    blocks = 3 * 5  # ceil(5 / 2) test blocks × ceil(23 / 5) training batches
    assert len(resumed) == blocks - 4
    assert {(c["test_block"], c["step"]) for c in calls}.isdisjoint({(c["test_block"], c["step"]) for c in resumed})
    np.testing.assert_array_equal(out[:], full)  # bitwise
    # running a finished store again does nothing
    nothing = []
    again.run(test, source, tmp_path / "part", callback=nothing.append)
    assert nothing == []


def test_store_with_other_arguments_is_refused(problem, fitted, tmp_path):
    model, reference = fitted
    path = tmp_path / "store"
    scale.compute_influences(model, problem.test, problem.train, path, batch_size=BATCH, test_block=2, progress=False)
    with pytest.raises(ValueError, match="other arguments.*test_block"):
        scale.compute_influences(
            model, problem.test, problem.train, path, batch_size=BATCH, test_block=3, progress=False
        )
    other = make_model(problem)
    other.damping = 0.5
    with pytest.raises(ValueError, match="other arguments.*damping: stored 0.001 vs now 0.5"):
        scale.compute_influences(
            other, problem.test, problem.train, path, batch_size=BATCH, test_block=2, progress=False
        )
    with pytest.raises(ValueError, match="already holds an influence run.*overwrite=True"):
        scale.compute_influences(
            model, problem.test, problem.train, path, batch_size=BATCH, test_block=2, progress=False, resume=False
        )
    out = scale.compute_influences(
        model, problem.test, problem.train, path, batch_size=BATCH, test_block=3, progress=False, overwrite=True
    )
    np.testing.assert_allclose(out[:], reference, rtol=1e-10, atol=1e-10 * np.abs(reference).max())
    zarr.open_group(str(tmp_path / "foreign"), mode="w")
    with pytest.raises(ValueError, match="not a jaxinf influence store"):
        scale.compute_influences(
            model, problem.test, problem.train, tmp_path / "foreign", batch_size=BATCH, progress=False
        )
    with pytest.raises(ValueError, match="not a jaxinf influence store"):
        scale.open_influences(tmp_path / "foreign")


def test_memory_plan_and_refusal(problem, fitted, tmp_path):
    model, _ = fitted
    calc = scale.InfluenceCalculator(model, test_block=4, scoring="gradients", progress=False)
    small = calc.plan(problem.test, problem.train, batch_size=4)
    large = calc.plan(problem.test, problem.train, batch_size=16)
    p = model._spec.size
    assert small.method == large.method == "gradients"
    # per-example gradients of the batch are in the scoring kernel: they grow with the batch
    assert large.scoring_bytes - small.scoring_bytes >= (16 - 4) * p * 8
    assert small.factors_bytes >= 2 * 4 * p * 8  # test gradients and factors
    assert small.disk_bytes == N_TEST * N_TRAIN * 8
    assert "scoring kernel" in str(small) and "budget" in str(small)
    tight = scale.InfluenceCalculator(model, test_block=4, progress=False, max_memory=1000)
    with pytest.raises(ValueError, match="does not fit in memory(.|\n)*Lower test_block"):
        tight.run(problem.test, problem.train, tmp_path / "s", batch_size=4)
    assert not (tmp_path / "s").exists()  # refused before anything was written


@pytest.mark.parametrize("scoring", ["gradients", "jvp", "layerwise", "auto"])
def test_scoring_methods_agree(problem, fitted, tmp_path, scoring):
    model, reference = fitted
    out = scale.compute_influences(
        model,
        problem.test,
        problem.train,
        tmp_path / "s",
        batch_size=BATCH,
        test_block=2,
        scoring=scoring,
        progress=False,
    )
    np.testing.assert_allclose(out[:], reference, rtol=1e-10, atol=1e-10 * np.abs(reference).max())


def test_perturbation_mode(problem, fitted, tmp_path):
    model, _ = fitted
    reference = np.asarray(model.influences(problem.test, problem.train, mode="perturbation"))
    out = scale.compute_influences(
        model,
        problem.test,
        problem.train,
        tmp_path / "s",
        batch_size=BATCH,
        test_block=2,
        mode="perturbation",
        progress=False,
    )
    assert out.shape == reference.shape == (N_TEST, N_TRAIN, 4)
    np.testing.assert_allclose(out[:], reference, rtol=1e-10, atol=1e-10 * np.abs(reference).max())


def test_low_rank_solver_and_more_test_points_than_parameters(tmp_path):
    problem = models.mlp_problem("plain", n_train=12, n_test=60, d_in=2, hidden=3, out=1)  # p = 13 < 60
    model = make_model(problem, jaxinf.arnoldi(rank=6, krylov_dim=10))
    reference = np.asarray(model.influences(problem.test, problem.train))  # the solver's projected score
    out = scale.compute_influences(
        model, problem.test, problem.train, tmp_path / "s", batch_size=5, test_block=64, progress=False
    )
    np.testing.assert_allclose(out[:], reference, rtol=1e-9, atol=1e-9 * np.abs(reference).max())


def test_float32(fitted, tmp_path):
    _, reference = fitted  # float64
    p32 = models.mlp_problem("plain", n_train=N_TRAIN, n_test=N_TEST, dtype=jnp.float32)
    out = scale.compute_influences(
        make_model(p32), p32.test, p32.train, tmp_path / "s", batch_size=BATCH, test_block=2, progress=False
    )
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:], reference, rtol=2e-3, atol=1e-4 * np.abs(reference).max())


def test_eight_devices_match_one(problem, fitted, tmp_path):
    model, reference = fitted
    assert jax.device_count() == 8
    mesh = scale.data_mesh()
    calc = scale.InfluenceCalculator(model, mesh=mesh, test_block=3, progress=False)
    out = calc.run(problem.test, scale.ArraySource(numpy_data(problem)[0], BATCH), tmp_path / "s")  # 5 -> padded 8
    np.testing.assert_allclose(out[:], reference, rtol=1e-10, atol=1e-10 * np.abs(reference).max())
    assert len(calc._compiled) == 1  # one compilation for every (ragged, padded) block


def test_bad_arguments(problem, fitted, tmp_path):
    model, _ = fitted
    with pytest.raises(ValueError, match="Unknown mode"):
        scale.InfluenceCalculator(model, mode="down")
    with pytest.raises(ValueError, match="Unknown scoring"):
        scale.InfluenceCalculator(model, scoring="fast")
    with pytest.raises(ValueError, match="test_block must be a positive int"):
        scale.InfluenceCalculator(model, test_block=0)
    unfitted = jaxinf.InfluenceModel(problem.loss_fn, problem.params, jaxinf.direct())
    with pytest.raises(jaxinf.NotFittedError):
        scale.InfluenceCalculator(unfitted)
    train = numpy_data(problem)[0]
    uneven = [
        jax.tree.map(lambda a: a[:5], train),
        jax.tree.map(lambda a: a[5:8], train),
        jax.tree.map(lambda a: a[8:], train),
    ]
    with pytest.raises(ValueError, match="batches of one size except a smaller last one"):
        scale.compute_influences(model, problem.test, uneven, tmp_path / "s", progress=False)
    wrong = scale.IterableSource(lambda: scale.ArraySource(train, BATCH).batches(), num_examples=30, batch_size=BATCH)
    with pytest.raises(ValueError, match="Batch 4 has 3 examples but 5 were expected"):
        scale.compute_influences(model, problem.test, wrong, tmp_path / "w", progress=False)
    short = scale.IterableSource(
        lambda: list(scale.ArraySource(train, BATCH).batches())[:2], num_examples=N_TRAIN, batch_size=BATCH
    )
    with pytest.raises(ValueError, match="yielded 10 examples, but num_examples=23"):
        scale.compute_influences(model, problem.test, short, tmp_path / "x", progress=False)
    more = scale.IterableSource(lambda: scale.ArraySource(train, BATCH).batches(), num_examples=15, batch_size=BATCH)
    with pytest.raises(ValueError, match="yields more than num_examples=15"):
        scale.compute_influences(model, problem.test, more, tmp_path / "m", progress=False)
    with pytest.raises(ValueError, match="whole training set"):
        scale.compute_influences(
            model, problem.test, scale.ArraySource(train, BATCH).shard(0, 2), tmp_path / "h", progress=False
        )
    with pytest.raises(TypeError, match="factory"):
        scale.IterableSource(iter([]), num_examples=1, batch_size=1)


def test_sources():
    x = np.arange(10.0)[:, None]
    src = scale.ArraySource((x, np.arange(10)), batch_size=4)
    assert src.num_batches == 3 and src.batch_bounds(2) == (8, 10)
    assert [b[1].tolist() for b in src.batches(1)] == [[4, 5, 6, 7], [8, 9]]
    parts = [src.shard(k, 3) for k in range(3)]
    assert [(p.offset, p.num_examples) for p in parts] == [(0, 4), (4, 4), (8, 2)]
    assert scale.process_range(10, 4, 1, 2) == (8, 10)
    assert scale.process_range(3, 4, 1, 2) == (3, 3)  # nothing left for process 1
    with pytest.raises(ValueError, match="leading example axis"):
        scale.ArraySource((x, np.arange(9)), batch_size=2)
