"""One process of the 2-process loopback test (tests/test_scale_distributed.py).

Usage: python -m tests._distributed_worker PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Each process reads only its own half of the training data, fits the direct
solver and a sampled-Fisher EK-FAC collectively (gloo CPU collectives), saves
the state, fits direct and EK-FAC from a stream of its own batches (saving
their solves), and writes its columns of the influence matrix to
OUT_DIR/store; the first run is interrupted after two blocks and resumed.
At the end it records how many coordinator keys ``agree`` left behind.
"""

import os
import re
import time

import jax
import jax.flatten_util
import numpy as np
from jax._src import distributed as jax_distributed

import jaxinf
from jaxinf import scale
from jaxinf.core.data import add_example_axis
from jaxinf.scale import distributed
from tests import models
from tests.processes import worker_main

N_TRAIN, N_TEST, BATCH, DAMPING = 24, 5, 4, 0.05


def reference_model(problem):
    # max_memory: direct() reads the free memory of jax.devices()[0], which another process owns.
    return jaxinf.InfluenceModel(
        None,
        problem.params,
        jaxinf.direct(max_memory=1 << 30),
        damping=DAMPING,
        curvature="gauss_newton",
        model_fn=problem.model_fn,
        output_loss=problem.output_loss,
    )


SAMPLED_SEED = 7  # a key made at import would start the backend before jax.distributed


def sampled_model(problem):
    return jaxinf.InfluenceModel(
        None,
        problem.params,
        jaxinf.ekfac(fisher="sampled", num_samples=2),
        damping=DAMPING,
        curvature="gauss_newton",
        model_fn=problem.model_fn,
        output_loss=problem.output_loss,
    )


def stream_solvers() -> dict:
    # max_memory: direct() reads the free memory of jax.devices()[0], which another process owns.
    # ekfac-sampled: every draw is keyed by the example's global index, so 2 processes equal 1 (issue 16)
    return {
        "direct": jaxinf.direct(max_memory=1 << 30),
        "ekfac": jaxinf.ekfac(fisher="exact"),
        "ekfac-sampled": jaxinf.ekfac(fisher="sampled", num_samples=2),
    }


def test_gradients(problem):
    """Per-example gradients of the test points (the right-hand sides of the streamed solves)."""
    return jax.vmap(lambda ex: jax.grad(problem.loss_fn)(problem.params, add_example_axis(ex)))(problem.test)


def expect_error(fn, pattern: str) -> None:
    try:
        fn()
    except ValueError as err:
        assert re.search(pattern, str(err)), str(err)
        return
    raise AssertionError(f"no ValueError matching {pattern!r}")


def expect_error_everywhere(fn, pattern: str, log: list) -> None:
    """``fn`` raises the same ValueError matching ``pattern`` on every process, in bounded time (logged per case)."""
    start = time.monotonic()
    expect_error(fn, pattern)
    log.append(f"{pattern}: {time.monotonic() - start:.1f} s")


def bad_inputs(process_id: int, problem, local, mesh, stream_fit) -> None:
    """Every cross-process check stops every process with one clear error naming the process and the step."""
    log = []
    # agree itself: one process's verdict reaches the other; a silent process is named after the timeout
    expect_error_everywhere(
        lambda: distributed.agree("bad" if process_id == 1 else None, step="probe"), r"'probe'.*process 1: bad", log
    )
    if process_id == 0:
        expect_error_everywhere(
            lambda: distributed.agree(None, step="only process 0", timeout_s=2), r"\[1\] gave no answer", log
        )
    # a source at the wrong offset (overlapping the other process's rows): both name the overlap
    train = jax.tree.map(np.asarray, problem.train)
    wrong = scale.ArraySource(train, BATCH, start=4 if process_id == 1 else 0, stop=16 if process_id == 1 else 12)
    expect_error_everywhere(lambda: stream_fit(jaxinf.ekfac(fisher="exact"), wrong), r"overlap: process 0", log)
    # NaN in one process's FIRST batch: both stop, naming process 1 and its batch 0
    poisoned = jax.tree.map(np.array, local)
    if process_id == 1:
        poisoned[0][1, 0] = np.nan
    expect_error_everywhere(
        lambda: stream_fit(jaxinf.ekfac(fisher="exact"), scale.ArraySource(poisoned, BATCH)),
        r"process 1: .*data\[batch 0\]",
        log,
    )
    expect_error_everywhere(lambda: scale.fit(reference_model(problem), poisoned, mesh), r"process 1: .*NaN", log)
    # a mismatch that shows up late: process 1's iterator ends a batch early (at batch 2 of 3)
    sizes = [BATCH, BATCH, BATCH] if process_id == 0 else [BATCH, BATCH]
    batches = [jax.tree.map(lambda a, i=i: a[i * BATCH : (i + 1) * BATCH], local) for i in range(len(sizes))]
    short = scale.IterableSource(lambda: iter(batches), num_examples=3 * BATCH, batch_size=BATCH)
    expect_error_everywhere(
        lambda: stream_fit(jaxinf.ekfac(fisher="exact"), short), r"process 1: .*yielded 8 examples", log
    )
    print(f"process {process_id}: bad inputs stopped every process: {log}", flush=True)


class Interrupt(Exception):
    pass


def main(process_id: int, num_processes: int, port: int, out_dir: str) -> None:
    scale.initialize(f"127.0.0.1:{port}", num_processes, process_id, timeout=60)
    assert jax.process_count() == num_processes and jax.device_count() == 2 * num_processes
    problem = models.mlp_problem("plain", n_train=N_TRAIN, n_test=N_TEST)
    train = jax.tree.map(np.asarray, problem.train)
    test = jax.tree.map(np.asarray, problem.test)
    mesh = scale.data_mesh()
    mine = scale.ArraySource(train, BATCH).shard()  # this process's rows only
    assert mine.num_examples == N_TRAIN // num_processes

    model = reference_model(problem)
    scale.fit(model, list(mine), mesh)
    scale.save_state(os.path.join(out_dir, "state.npz"), model.state, solver=model.solver)
    # sampled-Fisher EK-FAC fitted in memory: every draw keyed by the example's global index (issue 16)
    sampled = sampled_model(problem)
    scale.fit(sampled, list(mine), mesh, key=jax.random.key(SAMPLED_SEED))
    rhs = scale.replicate(test_gradients(problem), mesh)
    solves = jax.jit(jax.vmap(sampled.solver.solve, in_axes=(None, 0)))(sampled.state, rhs)[0]
    flat = jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(solves)
    np.save(os.path.join(out_dir, f"fit-sampled-{process_id}.npy"), np.asarray(scale.host_view(flat)))

    def stream_fit(solver, source):
        return scale.fit_from_stream(
            solver,
            None,
            problem.params,
            source,
            kind="gauss_newton",
            damping=DAMPING,
            model_fn=problem.model_fn,
            output_loss=problem.output_loss,
            mesh=mesh,
            progress=False,
        )

    # Fits from a stream: each process streams only its own rows; the solves equal one process fitting all rows.
    for name, solver in stream_solvers().items():
        solves = jax.jit(jax.vmap(solver.solve, in_axes=(None, 0)))(stream_fit(solver, mine), rhs)[0]
        flat = jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(solves)
        np.save(os.path.join(out_dir, f"stream-{name}-{process_id}.npy"), np.asarray(scale.host_view(flat)))

    # Bad streams stop every process with the same clear error (none is left waiting in a collective).
    local = jax.tree.map(lambda a: np.array(a[mine.start : mine.stop]), mine.data)  # this process's 12 rows
    uneven = jax.tree.map(lambda a: a[: 8 if process_id == 0 else 12], local)  # 8 rows on one process, 12 on the other
    expect_error(
        lambda: stream_fit(jaxinf.ekfac(fisher="exact"), scale.ArraySource(uneven, BATCH)), "same number of examples"
    )
    poisoned = jax.tree.map(np.array, local)
    if process_id == 1:
        poisoned[0][BATCH + 1, 0] = np.nan  # second batch of process 1 only
    expect_error(lambda: stream_fit(jaxinf.ekfac(fisher="exact"), scale.ArraySource(poisoned, BATCH)), r"batch 1\]")

    bad_inputs(process_id, problem, local, mesh, stream_fit)

    calc = scale.InfluenceCalculator(model, mesh=mesh, test_block=2, progress=False)
    path = os.path.join(out_dir, "store")
    seen = []

    def stop_after_two(info):
        seen.append(info)
        if len(seen) == 2:
            raise Interrupt

    try:
        calc.run(test, mine, path, callback=stop_after_two)
        raise AssertionError("the interrupted run finished")
    except Interrupt:
        pass
    resumed = []
    calc.run(test, mine, path, callback=resumed.append)
    steps = -(-(N_TRAIN // num_processes) // BATCH)
    assert len(resumed) == 3 * steps - 2, (len(resumed), steps)
    # agree's key-value entries do not pile up: each process keeps only its last two (issue 16)
    distributed.barrier("every exchange done")
    keys = jax_distributed.global_state.client.key_value_dir_get("jaxinf/agree/")
    with open(os.path.join(out_dir, f"keys-{process_id}"), "w") as f:
        f.write(f"{sum(distributed._STEP_COUNTS.values())} {len(keys)}")
    with open(os.path.join(out_dir, f"ok-{process_id}"), "w") as f:
        f.write("ok")
    scale.shutdown()


if __name__ == "__main__":
    worker_main(main)
