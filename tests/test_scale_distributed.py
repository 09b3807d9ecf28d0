"""Two processes on loopback with jax.distributed and gloo CPU collectives.

Each process reads only its half of the training data; the collectively
fitted state and the influence matrix (written by both processes into one
zarr store, interrupted and resumed) equal the single-process ones.
"""


import jax
import jax.flatten_util
import numpy as np
import pytest

import jaxinf
from jaxinf import scale
from jaxinf.scoring import per_example_grads
from tests import _distributed_worker as worker
from tests import models
from tests.processes import run_workers


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path):
    run_workers("tests._distributed_worker", tmp_path)
    assert all((tmp_path / f"ok-{k}").exists() for k in range(2))

    problem = models.mlp_problem("plain", n_train=worker.N_TRAIN, n_test=worker.N_TEST)
    model = worker.reference_model(problem).fit(problem.train)
    reference = np.asarray(model.influences(problem.test, problem.train))
    out = scale.open_influences(tmp_path / "store")
    assert out.shape == (worker.N_TEST, worker.N_TRAIN)
    np.testing.assert_allclose(out[:], reference, rtol=1e-9, atol=1e-10 * np.abs(reference).max())

    state = scale.load_state(
        tmp_path / "state.npz", scale.state_skeleton(model.solver, model.operator), solver=model.solver
    )
    x = jax.tree.map(lambda a: a[0], per_example_grads(model.loss_fn, model.params, problem.test))
    np.testing.assert_allclose(
        np.asarray(jax.flatten_util.ravel_pytree(model.solver.solve(state, x)[0])[0]),
        np.asarray(jax.flatten_util.ravel_pytree(model.solver.solve(model.state, x)[0])[0]),
        rtol=1e-9,
    )

    # Sampled-Fisher EK-FAC fitted in memory on two processes equals one process: draws keyed by global index.
    sampled = worker.sampled_model(problem).fit(problem.train, key=jax.random.key(worker.SAMPLED_SEED))
    rhs = worker.test_gradients(problem)
    expected = jax.vmap(sampled.solver.solve, in_axes=(None, 0))(sampled.state, rhs)[0]
    expected = np.asarray(jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(expected))
    for k in range(2):
        got = np.load(tmp_path / f"fit-sampled-{k}.npy")
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-10 * np.abs(expected).max())

    # agree's coordinator keys do not accumulate: at most the last two per process remain after many exchanges
    for k in range(2):
        exchanges, left = map(int, (tmp_path / f"keys-{k}").read_text().split())
        assert exchanges >= 10 and left <= 2 * 2, (exchanges, left)

    # Streamed fits (each process streamed only its rows) solve like one process fitting all rows in memory.
    for name, solver in worker.stream_solvers().items():
        op = jaxinf.curvature_operator(
            None,
            problem.params,
            problem.train,
            kind="gauss_newton",
            damping=worker.DAMPING,
            model_fn=problem.model_fn,
            output_loss=problem.output_loss,
        )
        single = solver.init(op)
        expected = jax.vmap(solver.solve, in_axes=(None, 0))(single, worker.test_gradients(problem))[0]
        expected = np.asarray(jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(expected))
        for k in range(2):
            got = np.load(tmp_path / f"stream-{name}-{k}.npy")
            np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-10 * np.abs(expected).max(), err_msg=name)
