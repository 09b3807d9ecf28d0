"""Faults around the on-disk influence store: foreign paths, changed inputs on resume, reshuffled or non-finite
data, concurrent writers, torn marks and killed jobs. Each asserts that nothing is lost and nothing is mixed."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zarr

import jaxinf
from jaxinf import scale
from jaxinf.scale import store
from tests import models

N_TRAIN, N_TEST, BATCH, BLOCK = 20, 5, 5, 2  # 3 test blocks (the last of 1 point) × 4 training steps
GRID = (3, 4, 1)
DAMPING = 0.5  # C + λI positive definite for the Hessian of this problem
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def problem():
    return models.mlp_problem("plain", n_train=N_TRAIN, n_test=N_TEST, d_in=3, hidden=3, out=1)


@pytest.fixture(scope="module")
def fitted(problem):
    model = jaxinf.InfluenceModel(problem.loss_fn, problem.params, jaxinf.direct(), damping=DAMPING).fit(problem.train)
    return model, np.asarray(model.influences(problem.test, problem.train))


def data(problem):
    return jax.tree.map(np.array, problem.test), jax.tree.map(np.array, problem.train)


def run(model, test, train, path, **kwargs):
    kwargs = {"test_block": BLOCK, "progress": False, "scoring": "gradients", **kwargs}
    return scale.compute_influences(model, test, scale.ArraySource(train, BATCH), path, **kwargs)


def close(out, reference):
    np.testing.assert_allclose(out[:], reference, rtol=1e-10, atol=1e-10 * np.abs(reference).max())


class Killed(Exception):
    pass


def kill_after(n):
    calls = []

    def callback(info):
        calls.append(info)
        if len(calls) == n:
            raise Killed

    return callback


# --------------------------------------------------------------- foreign paths
def test_foreign_directory_or_file_is_refused_untouched(problem, fitted, tmp_path):
    model, reference = fitted
    test, train = data(problem)
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my thesis")
    (foreign / "sub").mkdir()
    for flags in ({}, {"resume": False}, {"overwrite": True}, {"resume": True, "overwrite": True}):
        with pytest.raises(ValueError, match="not a jaxinf influence store.*nothing was written or deleted"):
            run(model, test, train, foreign, **flags)
        assert sorted(os.listdir(foreign)) == ["notes.txt", "sub"]
        assert (foreign / "notes.txt").read_text() == "my thesis"
    plain_file = tmp_path / "file.zarr"
    plain_file.write_text("x")
    with pytest.raises(ValueError, match="existing file, not a directory"):
        run(model, test, train, plain_file, overwrite=True)
    assert plain_file.read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    close(run(model, test, train, empty), reference)  # an empty directory is fine
    (empty / "mine.txt").write_text("kept")  # overwrite deletes only what a store consists of
    close(run(model, test, train, empty, overwrite=True), reference)
    assert (empty / "mine.txt").read_text() == "kept"


# ---------------------------------------------------------------- mixed runs
def test_resume_with_other_inputs_is_refused_naming_them(problem, fitted, tmp_path):
    model, reference = fitted
    test, train = data(problem)
    path = tmp_path / "s"
    close(run(model, test, train, path), reference)

    def refused(pattern, model=model, test=test, train=train, **kwargs):
        with pytest.raises(ValueError, match=pattern):
            run(model, test, train, path, **kwargs)

    other_train = jax.tree.map(np.copy, train)
    other_train[0][17, 1] += 1.0  # training batch 3 only
    refused(r"training batch 3 \(examples 15..19\) differs", train=other_train)
    other_test = jax.tree.map(np.copy, test)
    other_test[1][4] += 1.0  # the last test block only
    refused(r"test block 2 \(test points 4..4\) differs", test=other_test)

    def fresh(*, loss_fn=problem.loss_fn, solver=None, damping=DAMPING, **kwargs):
        return jaxinf.InfluenceModel(loss_fn, problem.params, solver or jaxinf.direct(), damping=damping, **kwargs)

    state = model.state  # the same fitted state: only the named argument differs
    refused(r"loss: stored .* vs now", state=state, model=fresh(loss_fn=lambda p, b: 2.0 * problem.loss_fn(p, b)))
    refused(r"damping: stored 0.5 vs now 0.2", state=state, model=fresh(damping=0.2))
    refused(
        r"solver: stored vs now differ in max_memory",
        state=state,
        model=fresh(solver=jaxinf.direct(max_memory=1 << 30)),
    )
    refused(r"curvature: stored 'hessian' vs now 'fisher'", state=state, model=fresh(curvature="fisher"))
    refused(
        r"params: stored",
        state=state,
        model=jaxinf.InfluenceModel(
            problem.loss_fn, jax.tree.map(lambda a: a + 1e-3, problem.params), jaxinf.direct(), damping=DAMPING
        ),
    )
    refused(r"state: stored", state=jax.tree.map(lambda a: a * (1 + 1e-12), state))  # e.g. fitted on other data
    refused(r"blocks: stored", state=state, model=fresh(blocks="parameter"))
    refused(r"mode: stored 'up' vs now 'perturbation'", mode="perturbation")
    close(scale.open_influences(path), reference)  # nothing was touched


def test_resume_of_a_partial_run_with_other_training_data_is_refused(problem, fitted, tmp_path):
    model, reference = fitted
    test, train = data(problem)
    path = tmp_path / "s"
    with pytest.raises(Killed):
        run(model, test, train, path, callback=kill_after(2))  # block 0, steps 0 and 1
    other = jax.tree.map(np.copy, train)
    other[1][2] += 1.0
    with pytest.raises(ValueError, match=r"training batch 0 \(examples 0..4\) differs"):
        run(model, test, other, path)
    close(run(model, test, train, path), reference)  # the right data resume it


def test_reshuffling_source_is_detected(problem, fitted, tmp_path):
    model, _ = fitted
    test, train = data(problem)
    batches = list(scale.ArraySource(train, BATCH))
    passes = []  # passes that reached the last batch

    def factory():  # after the first full pass, batches 1 and 2 come swapped (a reshuffling loader)
        order = [0, 1, 2, 3] if not passes else [0, 2, 1, 3]
        for n, k in enumerate(order):
            if n == len(order) - 1:
                passes.append(order)
            yield batches[k]

    source = scale.IterableSource(factory, num_examples=N_TRAIN, batch_size=BATCH)
    with pytest.raises(ValueError, match=r"training batch 1 \(examples 5..9\) differs.*same order"):
        scale.compute_influences(model, test, source, tmp_path / "s", test_block=BLOCK, progress=False)
    done = store.done_cells(str(tmp_path / "s"), GRID)
    assert done[0].all() and done[1, 0] and not done[1, 1:].any() and not done[2].any()  # stopped at the swap
    assert zarr.open_group(str(tmp_path / "s")).attrs["complete"] is False


# ------------------------------------------------------------ non-finite data
def test_nan_in_training_or_test_data_stops_naming_it(problem, fitted, tmp_path):
    model, reference = fitted
    test, train = data(problem)
    bad_train = jax.tree.map(np.copy, train)
    bad_train[0][12, 0] = np.nan
    path = tmp_path / "s"
    with pytest.raises(ValueError, match=r"training batch 2 \(examples 10..14\) holds NaN or inf: training example 12"):
        run(model, test, bad_train, path)
    root = zarr.open_group(str(path))
    assert root.attrs["complete"] is False
    done = store.done_cells(str(path), GRID)
    assert done[0, :2].all() and done.sum() == 2
    assert np.isnan(root["influences"][:, 10:]).all()  # nothing written from or after the bad batch
    with pytest.raises(ValueError, match=r"unfinished influence run \(2 of 12 cells done\)"):
        scale.open_influences(path)
    assert scale.open_influences(path, partial=True).shape == (N_TEST, N_TRAIN)

    bad_test = jax.tree.map(np.copy, test)
    bad_test[0][3, 2] = np.inf
    with pytest.raises(ValueError, match=r"test block 1 holds NaN or inf: test point 3"):
        run(model, bad_test, train, path)
    assert store.done_cells(str(path), GRID).sum() == 2
    close(run(model, test, train, path), reference)  # clean data resume it


def test_complete_means_every_cell_has_its_mark(problem, fitted, tmp_path):
    model, reference = fitted
    test, train = data(problem)
    path = tmp_path / "s"
    run(model, test, train, path)
    os.remove(path / "marks" / "1.2.0")  # the cell lost its mark: it is not done, whatever the attribute says
    with pytest.raises(ValueError, match=r"unfinished influence run \(11 of 12 cells done\)"):
        scale.open_influences(path)
    again = []
    close(run(model, test, train, path, callback=again.append), reference)
    assert [(c["test_block"], c["step"]) for c in again] == [(1, 2)]
    close(scale.open_influences(path), reference)


def test_torn_marks_and_partial_chunks_are_cleaned_on_resume(problem, fitted, tmp_path):
    model, reference = fitted
    test, train = data(problem)
    path = tmp_path / "s"
    with pytest.raises(Killed):
        run(model, test, train, path, callback=kill_after(3))
    (path / "marks" / "0.2.0").write_bytes(b"")  # a mark torn by a kill: not done
    (path / "marks" / ".0.3.0.abc.tmp").write_text('{"te')  # an unfinished atomic write
    partial = path / "influences" / "c" / "0" / "3.0f1e.partial"  # zarr's unfinished chunk write
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"\x28\xb5")
    resumed = []
    close(run(model, test, train, path, callback=resumed.append), reference)
    assert (0, 2) in {(c["test_block"], c["step"]) for c in resumed} and len(resumed) == 12 - 2
    leftovers = [f for _, _, files in os.walk(path) for f in files if f.endswith((".partial", ".tmp"))]
    assert leftovers == []


# ------------------------------------------------------------------ writers
def test_a_live_lock_refuses_a_dead_one_is_taken_over(problem, fitted, tmp_path):
    model, reference = fitted
    test, train = data(problem)
    path = tmp_path / "s"
    with pytest.raises(Killed):
        run(model, test, train, path, callback=kill_after(1))
    assert not (path / store.LOCK).exists()  # released on the exception
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = {"pid": other.pid, "host": socket.gethostname(), "time": time.time(), "token": "x"}
        (path / store.LOCK).write_text(json.dumps(owner))
        with pytest.raises(ValueError, match=rf"in use by another job: process {other.pid} on host"):
            run(model, test, train, path)
        assert store.done_cells(str(path), GRID).sum() == 1
    finally:
        other.kill()
        other.wait()
    with pytest.warns(RuntimeWarning, match=rf"stale lock .*process {other.pid} on this host has ended"):
        close(run(model, test, train, path), reference)
    assert not (path / store.LOCK).exists()


def test_two_concurrent_writers_do_not_both_succeed(problem, fitted, tmp_path):
    model, reference = fitted
    test, train = data(problem)
    path = tmp_path / "s"
    started, go_on, results = threading.Event(), threading.Event(), {}

    def first(info):
        started.set()
        assert go_on.wait(60)

    def job(name, callback):
        try:
            results[name] = run(model, test, train, path, callback=callback)
        except ValueError as err:
            results[name] = err

    a = threading.Thread(target=job, args=("a", first))
    a.start()
    assert started.wait(60)  # job a holds the store and is writing
    job("b", None)
    go_on.set()
    a.join(60)
    assert isinstance(results["b"], ValueError)
    assert f"in use by another job: process {os.getpid()}" in str(results["b"])
    close(results["a"], reference)


KILLED_JOB = """
import os, sys
fast = " --xla_backend_optimization_level=0" if os.environ.get("JAXINF_TEST_FAST_COMPILE") else ""  # as conftest
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1" + fast
import jax
jax.config.update("jax_enable_x64", True)
import jaxinf, numpy as np
from jaxinf import scale
from tests import models
problem = models.mlp_problem("plain", n_train={n_train}, n_test={n_test}, d_in=3, hidden=3, out=1)
model = jaxinf.InfluenceModel(problem.loss_fn, problem.params, jaxinf.direct(), damping={damping}).fit(problem.train)
test, train = jax.tree.map(np.array, problem.test), jax.tree.map(np.array, problem.train)
def stall(info):
    if info["test_block"] == 1:
        print("ready", flush=True)
        import time; time.sleep(120)
scale.compute_influences(model, test, scale.ArraySource(train, {batch}), sys.argv[1], test_block={block},
                         progress=False, scoring="gradients", callback=stall)
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkilled_job_leaves_a_stale_lock_that_is_taken_over(problem, fitted, tmp_path):
    model, reference = fitted
    test, train = data(problem)
    path = tmp_path / "s"
    code = KILLED_JOB.format(n_train=N_TRAIN, n_test=N_TEST, batch=BATCH, block=BLOCK, damping=DAMPING)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    job = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert job.stdout.readline().strip() == "ready", "the job did not reach test block 1"
        os.kill(job.pid, signal.SIGKILL)
    finally:
        job.kill()
        job.wait()
    assert (path / store.LOCK).exists()
    with pytest.warns(RuntimeWarning, match="stale lock"):
        close(run(model, test, train, path), reference)


# ------------------------------------------------------------------ solvers
def test_lissa_model(problem, tmp_path):
    model = jaxinf.InfluenceModel(
        problem.loss_fn, problem.params, jaxinf.lissa(scale=20.0, maxiter=600, rtol=1e-3), damping=1.0
    ).fit(problem.train)
    reference = np.asarray(model.influences(problem.test, problem.train))  # the same seeded LiSSA draws
    test, train = data(problem)
    out = run(model, test, train, tmp_path / "s", test_block=3)
    np.testing.assert_allclose(out[:], reference, rtol=1e-9, atol=1e-9 * np.abs(reference).max())
    assert out.dtype == jnp.float64


# ---------------------------------------------------------------- processes
@pytest.mark.multiprocess
def test_two_processes_stop_together_on_nan(tmp_path):
    from tests import _store_worker as worker
    from tests.processes import run_workers

    run_workers("tests._store_worker", tmp_path, timeout=300)
    errors = [(tmp_path / f"error-{k}.txt").read_text() for k in range(2)]
    assert errors[0] == errors[1]  # the same error on both processes
    assert "process 1: training batch 1 (examples 16..19) holds NaN or inf: training example 17" in errors[0]
    assert all((tmp_path / f"ok-{k}").exists() for k in range(2))

    problem = models.mlp_problem("plain", n_train=worker.N_TRAIN, n_test=worker.N_TEST)
    model = worker.reference_model(problem).fit(problem.train)
    close(scale.open_influences(tmp_path / "store"), np.asarray(model.influences(problem.test, problem.train)))
