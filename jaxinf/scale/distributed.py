"""Multi-process (multi-host) runs with ``jax.distributed``: JAX's own runtime, no other cluster.

Every process runs the same script. After :func:`initialize`, ``jax.devices()``
lists the devices of every process; a :func:`jaxinf.scale.data_mesh` over
them shards each batch along its examples across hosts, and XLA inserts the
collectives (all-reduces of curvature products and Kronecker factors). Each
process reads **only its own part** of the training data:

.. code-block:: python

    import jax, jaxinf
    from jaxinf import scale

    scale.initialize()                      # TPU pods / SLURM GPU clusters: arguments auto-detected
    mesh = scale.data_mesh()                # all devices of all processes
    train = scale.ArraySource(x_y_memmap, batch_size=1024).shard()   # this process's rows only
    model = jaxinf.InfluenceModel(loss_fn, params, jaxinf.direct(), damping=1e-3)
    scale.fit(model, list(scale.ArraySource(fit_subset, 256).shard()), mesh)   # collective fit, in memory
    # or, for a fit on all of the data: every process streams its own rows
    # scale.fit_from_stream(model, train, mesh=mesh)                             # direct/nystrom/arnoldi/(e)kfac
    scale.save_state("state.npz", model.state, solver=model.solver)           # process 0 writes
    scale.compute_influences(model, test, train, "/shared/influences.zarr", mesh=mesh)

* **TPU pods**: call :func:`initialize` with no arguments on every host
  (``jax.distributed`` reads the pod's metadata); one process per host.
* **GPU clusters**: under SLURM or Open MPI the arguments are detected too;
  otherwise pass ``coordinator_address="host0:port"``, ``num_processes`` and
  ``process_id`` (one process per host, or one per GPU with
  ``local_device_ids``).
* **CPU** (tests, laptops): collectives need an implementation;
  :func:`initialize` selects ``"gloo"`` for the CPU platform. Set
  ``XLA_FLAGS=--xla_force_host_platform_device_count=k`` before importing
  JAX for ``k`` devices per process.

The result store must be reachable by every process under the same path (a
shared file system); each process writes only the chunks of its own
training columns, and process 0 writes the metadata. The test points are
read by every process. Fitting across processes needs every process to hold
the same batch layout (same number and sizes of batches, each a multiple of
the process's local devices); both :func:`jaxinf.scale.fit` and
:func:`jaxinf.scale.fit_from_stream` check it up front.
"""

from __future__ import annotations

import jax
import numpy as np

__all__ = ["agree", "barrier", "broadcast_from_first", "initialize", "is_initialized", "shutdown"]

AGREE_TIMEOUT_S = 120  # how long a process waits for the others' verdict at one step before it gives up


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids=None,
    cpu_collectives: str | None = "gloo",
    timeout: int = 300,
) -> None:
    """Start ``jax.distributed`` (and CPU collectives) in this process.

    Args:
      coordinator_address: ``"host:port"`` of process 0; ``None`` lets JAX
        detect it (TPU pods, SLURM, Open MPI).
      num_processes, process_id: this run's size and this process's rank.
      local_device_ids: devices this process uses (e.g. one GPU each).
      cpu_collectives: cross-process collectives for CPU devices (``"gloo"``
        or ``"mpi"``); ``None`` leaves JAX's setting. Ignored on GPU and TPU.
      timeout: seconds to wait for the other processes.

    Must be called before any JAX computation.
    """
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs = dict(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout,
    )
    if local_device_ids is not None:
        kwargs["local_device_ids"] = local_device_ids
    jax.distributed.initialize(**kwargs)


def is_initialized() -> bool:
    """Whether this process is part of a ``jax.distributed`` run."""
    return jax.process_count() > 1


def shutdown() -> None:
    """Leave the ``jax.distributed`` run (waits for the other processes)."""
    jax.distributed.shutdown()


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_from_first(value: np.ndarray) -> np.ndarray:
    """Process 0's ``value`` on every process (``value`` itself in a single process)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(value))


def agree(error: str | None, *, step: str, timeout_s: float | None = None) -> None:
    """Every process states its verdict at ``step``; all raise the same error if any process failed.

    Each process passes ``None`` (all well) or the message of the error it
    found. In a multi-process run the verdicts are exchanged through the
    ``jax.distributed`` coordinator's key-value store (host side, no device
    collective), so a process that found nothing wrong still learns why its
    peers stop and stops with them, instead of waiting in the next
    collective. A process that does not state its verdict within
    ``timeout_s`` is named in the error: the run never hangs here.

    Raises:
      ValueError: some process failed (every process raises the same message,
        naming the processes and the step), or a process did not answer in
        time.
    """
    if jax.process_count() == 1:
        if error:
            raise ValueError(error)
        return
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    timeout_ms = int(1000 * (AGREE_TIMEOUT_S if timeout_s is None else timeout_s))
    counter = _STEP_COUNTS.get(step, 0)
    _STEP_COUNTS[step] = counter + 1
    prefix = f"jaxinf/agree/{step}/{counter}"
    client.key_value_set(f"{prefix}/{jax.process_index()}", "ok" if not error else "error:" + error)
    failures = []
    for pid in range(jax.process_count()):
        try:
            value = client.blocking_key_value_get(f"{prefix}/{pid}", timeout_ms)
        except Exception as err:  # the coordinator reports a timeout as a runtime error of its own type
            if "DEADLINE_EXCEEDED" not in str(err) and "timed out" not in str(err).lower():
                raise
            failures.append(f"process {pid} gave no verdict within {timeout_ms / 1000:.0f} s (it may have died)")
            continue
        if value.startswith("error:"):
            failures.append(f"process {pid}: {value[len('error:'):]}")
    if failures:
        raise ValueError(f"Stopped at step {step!r} on every process: " + "; ".join(failures))


_STEP_COUNTS: dict = {}
