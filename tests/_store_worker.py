"""One process of the 2-process store test (tests/test_store_faults.py::test_two_processes_stop_together_on_nan).

Usage: python -m tests._store_worker PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Each process scores its own half of the training data into one shared store.
Process 1's second training batch holds a NaN: both processes must stop with
the same error (written to OUT_DIR/error-K.txt) before anything of that batch
is written, and the store must not be complete. Run again with clean data,
the store is completed (OUT_DIR/ok-K marks success).
"""

import os

import jax
import numpy as np

import jaxinf
from jaxinf import scale
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


def main(process_id: int, num_processes: int, port: int, out_dir: str) -> None:
    scale.initialize(f"127.0.0.1:{port}", num_processes, process_id, timeout=60)
    problem = models.mlp_problem("plain", n_train=N_TRAIN, n_test=N_TEST)
    train = jax.tree.map(np.array, problem.train)
    test = jax.tree.map(np.asarray, problem.test)
    model = reference_model(problem).fit(problem.train)  # every process fits on all rows (the same state)
    mesh = scale.data_mesh()
    path = os.path.join(out_dir, "store")
    calc = scale.InfluenceCalculator(model, mesh=mesh, test_block=2, progress=False)

    poisoned = jax.tree.map(np.copy, train)
    poisoned[0][N_TRAIN // 2 + BATCH + 1, 0] = np.nan  # process 1's second batch (global example 17)
    try:
        calc.run(test, scale.ArraySource(poisoned, BATCH).shard(), path)
        raise AssertionError("a run over NaN data succeeded")
    except ValueError as err:
        with open(os.path.join(out_dir, f"error-{process_id}.txt"), "w") as f:
            f.write(str(err))
    try:
        scale.open_influences(path)
        raise AssertionError("the stopped store opens as complete")
    except ValueError as err:
        assert "unfinished influence run" in str(err), str(err)

    calc.run(test, scale.ArraySource(train, BATCH).shard(), path)
    with open(os.path.join(out_dir, f"ok-{process_id}"), "w") as f:
        f.write("ok")
    scale.shutdown()


if __name__ == "__main__":
    worker_main(main)
