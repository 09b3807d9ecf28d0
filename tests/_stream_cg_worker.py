"""One process of the 2-process loopback test of pre-conditioned CG (tests/test_stream_cg_distributed.py).

Usage: python -m tests._stream_cg_worker PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Each process reads only its own half of the training data and saves the influence factors of
``cg(preconditioner=ekfac_preconditioner(fisher="sampled"))`` (a) fitted in memory by ``scale.fit`` (the
pre-conditioner by passes over the global batches, each example drawing by its global index) and (b) solved
over the stream of its own batches by ``scale.cg_from_stream``.
"""

import os

import jax
import jax.flatten_util
import numpy as np

import jaxinf
from jaxinf import scale
from jaxinf.core.data import add_example_axis
from tests import models
from tests.processes import worker_main

N_TRAIN, N_TEST, BATCH, DAMPING, SEED = 24, 3, 4, 0.05, 7


def make_model(problem):
    pre = jaxinf.ekfac_preconditioner(fisher="sampled", num_samples=2)
    return jaxinf.InfluenceModel(
        None,
        problem.params,
        jaxinf.cg(rtol=1e-10, preconditioner=pre),
        damping=DAMPING,
        curvature="gauss_newton",
        model_fn=problem.model_fn,
        output_loss=problem.output_loss,
    )


def raveled(tree):
    return jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(tree)


def main(process_id: int, num_processes: int, port: int, out_dir: str) -> None:
    scale.initialize(f"127.0.0.1:{port}", num_processes, process_id, timeout=60)
    problem = models.mlp_problem("plain", n_train=N_TRAIN, n_test=N_TEST)
    train = jax.tree.map(np.asarray, problem.train)
    mesh = scale.data_mesh()
    mine = scale.ArraySource(train, BATCH).shard()  # this process's rows only
    key = jax.random.key(SEED)

    model = scale.fit(make_model(problem), list(mine), mesh, key=key)
    grads = jax.vmap(lambda ex: jax.grad(problem.loss_fn)(problem.params, add_example_axis(ex)))(problem.test)
    solve = jax.jit(jax.vmap(model.solver.solve, in_axes=(None, 0)))
    factors, info = solve(model.state, scale.replicate(grads, mesh))
    assert bool(np.all(scale.host_view(info.converged)))
    np.save(os.path.join(out_dir, f"fit-{process_id}.npy"), np.asarray(scale.host_view(raveled(factors))))
    eigvals = [np.ravel(scale.host_view(x)) for x in jax.tree.leaves(model.state.preconditioner.kfac.eigvals)]
    np.save(os.path.join(out_dir, f"fit-eigvals-{process_id}.npy"), np.concatenate(eigvals))

    result = scale.cg_from_stream(make_model(problem), jax.tree.map(np.asarray, problem.test), mine, mesh=mesh, key=key)
    np.save(os.path.join(out_dir, f"stream-{process_id}.npy"), np.asarray(scale.host_view(raveled(result.factors))))
    np.save(os.path.join(out_dir, f"stream-iterations-{process_id}.npy"), result.iterations)
    with open(os.path.join(out_dir, f"ok-{process_id}"), "w") as f:
        f.write("ok")
    scale.shutdown()


if __name__ == "__main__":
    worker_main(main)
