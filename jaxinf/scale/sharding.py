"""Data parallelism over a :class:`jax.sharding.Mesh`, with JAX's own sharding.

Everything here places arrays; the computations stay the library's ordinary
jitted functions and XLA's partitioner splits them along the data
(example) axis: per-example work runs where the examples live, and the
means over examples (curvature products, Kronecker factors) become partial
sums plus an all-reduce. The parameters and solver states are replicated.

* :func:`data_mesh` — a one-axis mesh over all (or the given) devices,
  ordered by process, so each process's devices hold a contiguous slice.
* :func:`shard_batch` / :func:`replicate` — place a batch along the example
  axis, or any pytree on every device.
* :func:`global_batch` — assemble one global batch from the process-local
  parts (multi-process; in one process it is :func:`shard_batch`).
* :func:`shard_operator` — a :class:`jaxinf.CurvatureOperator` whose
  dataset is sharded along the example axis (stacked batches along their
  second axis), so that ``solver.init(operator)`` runs data-parallel for any
  solver (direct, CG, LiSSA, Arnoldi, Nyström, K-FAC).
* :func:`fit` — fit an :class:`jaxinf.InfluenceModel` on sharded data
  (also from process-local shards on many hosts).

Results equal the single-device ones up to the order of floating-point
sums (float tolerance, not bitwise).

Examples:
  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from jaxinf.scale import data_mesh, shard_batch
  >>> mesh = data_mesh()
  >>> x = shard_batch(np.ones((8, 3)), mesh)
  >>> [s.data.shape for s in x.addressable_shards] == [(8 // len(jax.devices()), 3)] * len(jax.devices())
  True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinf.core.curvature import CurvatureOperator
from jaxinf.core.data import Batches, as_batches, batch_size
from jaxinf.core.pieces import host_pieces
from jaxinf.core.precision import refuse_half
from jaxinf.scale.distributed import agreed, exchange
from jaxinf.scale.preconditioner_stream import cg_state_from_passes, draws_per_example

PyTree = Any
AXIS = "data"

__all__ = [
    "AXIS",
    "data_mesh",
    "data_sharding",
    "fit",
    "global_batch",
    "host_view",
    "mesh_size",
    "pad_batch",
    "replicate",
    "replicated_sharding",
    "shard_batch",
    "shard_operator",
    "to_host",
]


def data_mesh(devices=None, *, axis_name: str = AXIS) -> Mesh:
    """A one-axis mesh for data parallelism over ``devices`` (default: all, every process).

    Devices are ordered by (process, id), so the devices of one process hold
    one contiguous slice of every sharded batch.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device.")
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (axis_name,))


def mesh_size(mesh: Mesh) -> int:
    return int(np.prod(list(mesh.shape.values())))


def _axis(mesh: Mesh) -> str:
    if len(mesh.axis_names) != 1:
        raise ValueError(f"Expected a one-axis data mesh (see data_mesh), got axes {mesh.axis_names}.")
    return mesh.axis_names[0]


def data_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Sharding of an array along dimension ``axis`` over the mesh's (single) axis."""
    spec = [None] * axis + [_axis(mesh)]
    return NamedSharding(mesh, P(*spec))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _place(x, sharding: NamedSharding):
    """Put a host value (the same on every process) on a possibly multi-process sharding."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.device_put(x, sharding)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Copy every array leaf of ``tree`` to every device of ``mesh`` (every process passes the same values)."""
    sharding = replicated_sharding(mesh)
    return jax.tree.map(lambda x: _place(x, sharding) if _is_array(x) else x, tree)


def _is_array(x) -> bool:
    return isinstance(x, (np.ndarray, jax.Array, np.generic)) or hasattr(x, "__array__")


def shard_batch(batch: PyTree, mesh: Mesh, *, axis: int = 0) -> PyTree:
    """Shard every leaf of ``batch`` along its example axis ``axis`` over ``mesh``.

    Raises:
      ValueError: the example count is not a multiple of the number of devices
        (pad with :func:`pad_batch`, or choose a batch size that divides).
    """
    size = mesh_size(mesh)
    for leaf in jax.tree.leaves(batch):
        n = np.shape(leaf)[axis]
        if n % size:
            raise ValueError(
                f"A batch of {n} examples cannot be split evenly over {size} devices. Use a batch size that is a "
                f"multiple of {size}, or pad it with jaxinf.scale.pad_batch (padding must then be masked out)."
            )
    sharding = data_sharding(mesh, axis)
    return jax.tree.map(lambda x: _place(x, sharding), batch)


def pad_batch(batch: PyTree, size: int) -> PyTree:
    """Repeat the last example until the batch has ``size`` examples (numpy, host-side).

    The copies are real examples, so every computation on them stays finite;
    callers discard their results.
    """
    n = batch_size(batch)
    if n > size:
        raise ValueError(f"Cannot pad a batch of {n} examples to {size}.")
    if n == size:
        return batch
    return jax.tree.map(lambda a: np.concatenate([np.asarray(a), np.repeat(np.asarray(a)[-1:], size - n, 0)]), batch)


def global_batch(local_batch: PyTree, mesh: Mesh, *, axis: int = 0) -> PyTree:
    """One batch sharded over ``mesh`` from each process's local part.

    Each process passes its own examples (all processes the same count,
    a multiple of their local device count); the global batch concatenates
    them in process order along ``axis``. In a single process this is
    :func:`shard_batch`.
    """
    if jax.process_count() == 1:
        return shard_batch(local_batch, mesh, axis=axis)
    sharding = data_sharding(mesh, axis)
    local = mesh.local_mesh.size

    def one(x):
        x = np.asarray(x)
        if x.shape[axis] % local:
            raise ValueError(
                f"This process holds {x.shape[axis]} examples for {local} local devices; use a multiple of {local}."
            )
        shape = list(x.shape)
        shape[axis] = x.shape[axis] * (mesh_size(mesh) // local)
        return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

    return jax.tree.map(one, local_batch)


def shard_operator(operator: CurvatureOperator, mesh: Mesh) -> CurvatureOperator:
    """The same operator with its dataset sharded along the example axis over ``mesh``.

    Stacked equal-size batches are sharded along their second (example)
    axis; other batches (a ragged last one) are sharded when their size
    divides the number of devices, else replicated. Parameters and damping
    are replicated. ``solver.init`` on the result runs data-parallel.
    """
    size = mesh_size(mesh)
    data = operator.data
    stacked = data.stacked
    if stacked is not None:
        first = jax.tree.leaves(stacked)[0]
        if first.shape[1] % size:
            raise ValueError(
                f"The training batches hold {first.shape[1]} examples each, which does not divide over {size} "
                f"devices. Use a batch size that is a multiple of {size}."
            )
        stacked = jax.tree.map(lambda x: _place(x, data_sharding(mesh, 1)), stacked)
    rest = tuple(shard_batch(b, mesh) if batch_size(b) % size == 0 else replicate(b, mesh) for b in data.rest)
    return dataclasses.replace(
        operator,
        params=replicate(operator.params, mesh),
        data=Batches(stacked, rest),
        damping=tuple(replicate(d, mesh) for d in operator.damping),
    )


def to_host(x) -> np.ndarray:
    """The whole value of array ``x`` on this host: copied, taken from a replica, or gathered from every process.

    Gathering (an array sharded over processes) is a collective: every process must call it.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def host_view(tree: PyTree) -> PyTree:
    """Leaves as numpy where this process can read them whole (single-process, or replicated).

    Leaves sharded over other processes stay as they are. Used to run
    host-side checks (``solver.validate``) on multi-process states.
    """

    def one(x):
        if not isinstance(x, jax.Array):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return x
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return x

    return jax.tree.map(one, tree)


def _global_batches(local: Batches, mesh: Mesh) -> Batches:
    """Globalise process-local :class:`Batches` (every process with the same layout)."""
    stacked = local.stacked
    if stacked is not None:
        stacked = global_batch(jax.tree.map(np.asarray, stacked), mesh, axis=1)
    rest = tuple(global_batch(jax.tree.map(np.asarray, b), mesh) for b in local.rest)
    return Batches(stacked, rest)


def fit(model, train_data: Any, mesh: Mesh, *, key: jax.Array | None = None):
    """Fit ``model`` (a :class:`jaxinf.InfluenceModel`) with its data sharded over ``mesh``.

    Args:
      model: the model to fit (any solver).
      train_data: one batch or a list of batches. In a multi-process run,
        each process passes **only its own examples**, with the same batch
        layout on every process; the curvature is that of the mean loss over
        all processes' examples.
      mesh: a data mesh (:func:`data_mesh`).
      key: PRNG key for randomised solvers. Per-example draws (K-FAC/EK-FAC,
        also as CG pre-conditioners, with ``fisher="sampled"``) are keyed by
        the example's index in the whole dataset, process ``p``'s examples
        after those of processes ``0 … p−1``, so the state is the same on any
        number of processes and devices (multi-process, these fits run as
        passes over the batches, one jitted call per batch, as
        :func:`jaxinf.scale.fit_from_stream` does). Fitted states are replicated.

    Returns:
      ``model``, fitted; its operator and state live on ``mesh``.

    Raises:
      ValueError: what :meth:`jaxinf.InfluenceModel.fit` refuses (a loss
        that is not a finite mean over the examples, a zero or non-finite
        curvature: :mod:`jaxinf.core.checks`), on every process at once.
    """
    refuse_half(model.params, "jaxinf.scale.fit")
    if jax.process_count() > 1:
        # each process checks its own part; all stop together, with one error, before the first collective
        local = agreed("scale.fit: train_data", lambda: _checked_local(train_data, mesh))
        _check_same_layout(local)
        # the fit-time checks of the loss and curvature (jaxinf.core.checks), each process on its own examples
        agreed("scale.fit: loss and curvature", lambda: model._check_loss(model.operator_for(local)))
        data = _global_batches(local, mesh)
        operator = model.operator_for(data)
        # fits that key per-example draws by position (K-FAC/EK-FAC, also as CG pre-conditioners) go by passes:
        # the global batches interleave the processes' examples, so positions are not global indices there
        if draws_per_example(model.solver):
            return _fit_by_passes(model, operator, local, mesh, key)
    else:
        data = as_batches(train_data, name="train_data")  # checks shapes and finiteness on the host
        operator = model.operator_for(data)
        model._check_loss(operator)  # before sharding: on this process's host arrays
    operator = shard_operator(operator, mesh) if jax.process_count() == 1 else _replicate_rest(operator, mesh)
    state = model.solver.init(operator, key=key)  # eager: every op follows the data's sharding
    if model.solver.validate is not None:
        model.solver.validate(host_view(state))
    model._fit_key = key
    model._refit_stream = None  # fitted on this data now: a new damping refits on it, not on an earlier stream
    model.operator, model.state = operator, state
    model.n_train = operator.num_examples
    return model


def _fit_by_passes(model, operator: CurvatureOperator, local: Batches, mesh: Mesh, key):
    """Fit ``model`` by the solver's passes over the global batches, each example drawing by its global index.

    Process ``p``'s example at position ``j`` of its concatenated batches is
    example ``p·n_local + j`` of the whole dataset (the processes' parts in
    process order: :meth:`jaxinf.scale.ArraySource.shard` and the streamed
    fits number them so), on any number of processes and devices.
    """
    passes = _GlobalPasses(model.operator_for(next(iter(local.batches()))), local, mesh)
    operator = _replicate_rest(operator, mesh)
    if model.solver.stream_init is None:  # cg with a K-FAC/EK-FAC pre-conditioner
        state = cg_state_from_passes(model.solver, operator, passes, key)
    else:
        state = model.solver.stream_init(passes, key=key)
    if model.solver.validate is not None:
        model.solver.validate(host_view(state))
    model._fit_key = key
    model._refit_stream = None
    model.operator, model.state = operator, state
    model.n_train = operator.num_examples
    return model


class _GlobalPasses:
    """Passes over process-local in-memory batches as global batches, for a solver's ``stream_init``.

    Implements what :func:`jaxinf.solvers.kfac_fit.fit_stream` reads of a
    :class:`jaxinf.solvers.base.BatchStreamLike` (``operator``, ``first``,
    ``num_examples``, ``batches``, ``replicate``, ``zeros``); it has no
    streamed ``curvature``.
    """

    def __init__(self, operator: CurvatureOperator, local: Batches, mesh: Mesh):
        self.operator, self.local, self.mesh = operator, local, mesh
        self.first = next(iter(local.batches()))
        self.num_examples = local.num_examples * jax.process_count()

    def batches(self, desc: str = "pass", *, with_indices: bool = False, pad_to: int | None = None):
        """``(index, batch, weight[, example_indices[, mask]])`` per global batch, ``weight = n_b / n``; ``pad_to``:
        pieces of that many examples per process, with a mask (:meth:`~jaxinf.scale.StreamingCurvature.batches`)."""
        del desc
        start, processes = jax.process_index() * self.local.num_examples, jax.process_count()
        for index, batch in enumerate(self.local.batches()):
            size = batch_size(batch)
            host, indices = jax.tree.map(np.asarray, batch), np.arange(start, start + size, dtype=np.uint32)
            start += size
            for piece, at, mask in host_pieces(host, indices, pad_to) if pad_to else [(host, indices, None)]:
                out = (index, global_batch(piece, self.mesh), (pad_to or size) * processes / self.num_examples)
                out += (global_batch(at, self.mesh),) if with_indices or pad_to else ()
                yield out + ((global_batch(mask, self.mesh),) if pad_to else ())

    def replicate(self, tree: PyTree) -> PyTree:
        return replicate(tree, self.mesh)

    def zeros(self, shapes: PyTree) -> PyTree:
        return self.replicate(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))


def _replicate_rest(operator: CurvatureOperator, mesh: Mesh) -> CurvatureOperator:
    return dataclasses.replace(
        operator,
        params=replicate(operator.params, mesh),
        damping=tuple(replicate(d, mesh) for d in operator.damping),
    )


def _checked_local(train_data: Any, mesh: Mesh) -> Batches:
    """This process's batches, checked on the host (shapes, finiteness, a multiple of the local devices)."""
    local = as_batches(train_data, name="train_data")
    devices = mesh.local_mesh.size
    for i, b in enumerate(local.batches()):
        if batch_size(b) % devices:
            raise ValueError(
                f"train_data[batch {i}] holds {batch_size(b)} examples on process {jax.process_index()} for its "
                f"{devices} local devices; use batches of a multiple of {devices} examples on every process."
            )
    return local


def _check_same_layout(local: Batches) -> None:
    """Every process must hold the same batch layout (exchanged with :func:`jaxinf.scale.distributed.exchange`)."""
    stacked = None if local.stacked is None else np.shape(jax.tree.leaves(local.stacked)[0])[:2]
    layout = [-1 if stacked is None else stacked[0], -1 if stacked is None else stacked[1], len(local.rest)]
    layout += [batch_size(b) for b in local.rest]
    everyone = [[int(v) for v in text.split(",")] for text in exchange(",".join(map(str, layout)), step="fit layout")]
    if any(other != everyone[0] for other in everyone):
        raise ValueError(
            "Every process must hold the same batch layout (number and sizes of batches) for a multi-process fit; "
            f"got {everyone} (per process: stacked count, batch size, other batches, their sizes)."
        )
