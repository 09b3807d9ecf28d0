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

__all__ = ["agree", "agreed", "barrier", "broadcast_from_first", "exchange", "initialize", "is_initialized", "shutdown"]

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


def exchange(value: str, *, step: str, timeout_s: float | None = None) -> list[str]:
    """Every process's ``value`` at ``step``, in process order (``[value]`` in a single process).

    The values travel through the ``jax.distributed`` coordinator's key-value
    store (host side, no device collective), so a process that never
    arrives is named after ``timeout_s`` (default :data:`AGREE_TIMEOUT_S`)
    instead of leaving the others in a collective for ever. Every process
    must call it for the same steps in the same order.

    Raises:
      ValueError: a process gave no value within ``timeout_s`` (naming it and
        the step).
    """
    if jax.process_count() == 1:
        return [value]
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    timeout_ms = int(1000 * (AGREE_TIMEOUT_S if timeout_s is None else timeout_s))
    counter = _STEP_COUNTS.get(step, 0)
    _STEP_COUNTS[step] = counter + 1
    prefix = f"jaxinf/agree/{step}/{counter}"
    client.key_value_set(f"{prefix}/{jax.process_index()}", value)
    values, silent = [], []
    for pid in range(jax.process_count()):
        try:
            values.append(client.blocking_key_value_get(f"{prefix}/{pid}", timeout_ms))
        except Exception as err:  # the coordinator reports a timeout as a runtime error of its own type
            if "DEADLINE_EXCEEDED" not in str(err) and "timed out" not in str(err).lower():
                raise
            silent.append(pid)
            values.append(None)
    # every process has read the values of the exchange before the previous one (it wrote its value for the
    # previous one only after): this process's key of that exchange can go
    _OWN_KEYS.append(f"{prefix}/{jax.process_index()}")
    if len(_OWN_KEYS) > 2:
        client.key_value_delete(_OWN_KEYS.pop(0))
    if silent:
        raise ValueError(
            f"Stopped at step {step!r} on process {jax.process_index()}: process(es) {silent} gave no answer within "
            f"{timeout_ms / 1000:.0f} s (they may have died or be stuck before this step; see their own output)."
        )
    return values


def agree(error: str | None, *, step: str, timeout_s: float | None = None) -> None:
    """Every process states its verdict at ``step``; all raise the same error if any process failed.

    Each process passes ``None`` (all well) or the message of the error it
    found. In a multi-process run the verdicts are exchanged with
    :func:`exchange` (through the coordinator's key-value store, no device
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
    verdicts = exchange("ok" if not error else "error:" + error, step=step, timeout_s=timeout_s)
    failures = [f"process {pid}: {v[len('error:') :]}" for pid, v in enumerate(verdicts) if v.startswith("error:")]
    if failures:
        raise ValueError(f"Stopped at step {step!r} on every process: " + "; ".join(failures))


def agreed(step: str, fn, *args, timeout_s: float | None = None):
    """``fn(*args)`` on every process, then :func:`agree` on whether it raised a ``ValueError`` anywhere.

    In a single process ``fn``'s own error propagates unchanged. With many
    processes, a ``ValueError`` on one process becomes the same error on
    every process (naming it and ``step``), raised before any of them goes
    on to a collective.
    """
    if jax.process_count() == 1:
        return fn(*args)
    try:
        out = fn(*args)
    except ValueError as err:
        agree(str(err), step=step, timeout_s=timeout_s)
        raise  # not reached: agree raised
    agree(None, step=step, timeout_s=timeout_s)
    return out


_STEP_COUNTS: dict = {}
_OWN_KEYS: list = []  # this process's keys of its last exchanges, oldest first
