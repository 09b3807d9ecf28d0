"""Tiled test × train influence written block by block to an on-disk zarr array.

:class:`InfluenceCalculator` computes ``I[i, j] = ∇θℓ(test_i)ᵀ (C + λI)⁻¹
∇θℓ(train_j)`` (or the perturbation influence) for collections too large for
memory:

1. the test points are cut into blocks of ``test_block``; for each block the
   factors ``(C + λI)⁻¹ ∇θℓ(test_i)`` are solved **once**;
2. the training batches are streamed from a source
   (:mod:`jaxinf.scale.sources`); each is contracted with the block's factors
   (:func:`jaxinf.scoring.contract`, method picked by
   :func:`jaxinf.scoring.choose_method`) and written to the chunk
   ``[test block, train batch]`` of a zarr array;
3. a block is marked done (in a small ``done`` array of the same store)
   only after its chunk is written, so a run killed part-way and started
   again with the same arguments skips the done blocks and gives a result
   identical to an uninterrupted run.

The store (a zarr v3 group at ``path``) holds ``influences`` (``(n_test,
n_train)``, or ``(n_test, n_train, *x_shape)`` in perturbation mode; NaN where
not computed yet), ``done`` and the run's fingerprint in its attributes.
Open it lazily with :func:`open_influences` (or ``zarr.open_group``).

Memory, per device, with ``T = test_block``, ``B`` the training batch size
(rounded up to a multiple of the devices), ``p`` parameters, ``s`` bytes per
float:

* factors: the solver state, plus ``2 T p s`` (test gradients and factors)
  and the solver's workspace for ``T`` right-hand sides;
* scoring with ``"gradients"``: ``B p s`` of per-example gradients (split
  over the devices) plus ``T p s`` of factors and ``T B s`` of scores;
* scoring with ``"jvp"``: ``T`` forward-mode passes over the batch at once
  (``T ×`` the activations of ``B`` examples), no per-example gradients;
* scoring with ``"layerwise"``: the layer inputs and output gradients of
  ``B`` examples, plus per layer either ``T B`` outputs per location (direct
  contraction) or the ``B`` per-example gradients of that one layer;
* host: one training batch, one result block ``T B s`` (twice while it is
  encoded) and one test block.

None of it grows with the number of training points. The exact figures are
read from XLA's compiled memory analysis of the two kernels before any work
is done (:meth:`InfluenceCalculator.plan`); a configuration that does not fit
in ``max_memory`` (default: the free memory) or a result larger than the
free disk space is refused with the numbers and what to lower.

Many devices and hosts: with a ``mesh`` (:func:`jaxinf.scale.data_mesh`)
each training batch is sharded along its examples over all devices of all
processes; each process reads only its own part of the training data (give
each a source for its own range, e.g. ``ArraySource(...).shard()``) and
writes only its own columns. Every process must see the same store path (a
shared file system or an object store that zarr can open).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinf.core.data import batch_size as leading_size
from jaxinf.core.memory import available_bytes
from jaxinf.model import MODES
from jaxinf.scale.sharding import (
    _place,
    data_mesh,
    data_sharding,
    global_batch,
    mesh_size,
    pad_batch,
    replicate,
    to_host,
)
from jaxinf.scale.sources import as_source
from jaxinf.scoring import SCORING_METHODS, contract, per_example_grads, perturbation, resolve_input_leaf
from jaxinf.solvers.base import solve_many

PyTree = Any
FORMAT = "jaxinf-influences"
VERSION = 1

__all__ = ["InfluenceCalculator", "MemoryPlan", "compute_influences", "open_influences"]


# ----------------------------------------------------------------------------
# Memory plan
# ----------------------------------------------------------------------------


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What one configuration of the calculator needs.

    Attributes:
      test_block, train_batch: block sizes (train batch padded to the devices).
      method: the scoring contraction (``"gradients"``, ``"jvp"``, ``"layerwise"`` or
        ``"perturbation"``).
      num_params: ``p``.
      devices: devices in the mesh (``local_devices`` on this host).
      factors_bytes: peak bytes per device of the factor kernel (state,
        test gradients, solver workspace, factors).
      scoring_bytes: peak bytes per device of the scoring kernel.
      host_bytes: host buffers (a training batch, a result block, a test block).
      disk_bytes: size of the full result on disk (uncompressed).
      budget_bytes: per-device budget the plan was checked against.
      shared_host_memory: the devices are host (CPU) devices, so their memory
        and the host buffers share the host RAM.
    """

    test_block: int
    train_batch: int
    method: str
    num_params: int
    devices: int
    local_devices: int
    factors_bytes: int
    scoring_bytes: int
    host_bytes: int
    disk_bytes: int
    budget_bytes: int
    shared_host_memory: bool

    @property
    def device_bytes(self) -> int:
        """Peak per device: the larger of the two kernels (they do not run at once)."""
        return max(self.factors_bytes, self.scoring_bytes)

    @property
    def total_bytes(self) -> int:
        """What this host needs when devices share its memory (CPU), else the per-device peak."""
        if self.shared_host_memory:
            return self.device_bytes * self.local_devices + self.host_bytes
        return self.device_bytes

    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def __str__(self) -> str:
        rows = [
            ("test block × train batch", f"{self.test_block} × {self.train_batch}"),
            ("scoring, parameters", f"{self.method}, p = {self.num_params}"),
            ("devices (this host)", f"{self.devices} ({self.local_devices})"),
            ("factor kernel / device", _fmt(self.factors_bytes)),
            ("scoring kernel / device", _fmt(self.scoring_bytes)),
            ("host buffers", _fmt(self.host_bytes)),
            ("needed" + (" (host RAM)" if self.shared_host_memory else " / device"), _fmt(self.total_bytes)),
            ("budget", _fmt(self.budget_bytes)),
            ("result on disk", _fmt(self.disk_bytes)),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _peak(compiled, fallback: int) -> int:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # pragma: no cover - backend without analysis
        stats = None
    if stats is None:
        return fallback
    return int(
        stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes
    )


def _nbytes(tree) -> int:
    return sum(int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------
# Host helpers
# ----------------------------------------------------------------------------


def _hash_tree(tree, h) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        h.update(jax.tree_util.keystr(path).encode())
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if isinstance(leaf, jax.Array) and not (leaf.is_fully_addressable or leaf.is_fully_replicated):
            h.update(repr((leaf.shape, str(leaf.dtype))).encode())  # sharded over processes: shape only
            continue
        value = to_host(leaf)
        h.update(repr((value.shape, str(value.dtype))).encode())
        h.update(np.ascontiguousarray(value).tobytes())


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _broadcast(value: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(value))


@functools.partial(jax.jit, static_argnames=("loss_fn", "solver"))
def _factors_kernel(params, state, batch, *, loss_fn, solver):
    """``(C + λI)⁻¹ ∇θℓ(test_i)`` for a block, the solve infos and a finiteness flag per row."""
    grads = per_example_grads(loss_fn, params, batch)
    factors, info = solve_many(solver, state, grads)
    finite = jnp.stack([jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))) for x in jax.tree.leaves(factors)]).all(
        axis=0
    )
    return factors, info, finite


@functools.partial(jax.jit, static_argnames=("loss_fn", "method", "leaf", "sharding"))
def _scores_kernel(params, factors, batch, *, loss_fn, method, leaf, sharding):
    """The block ``factors_iᵀ ∇θℓ(train_j)`` (or its perturbation), sharded along the training columns."""
    if method == "perturbation":
        out = perturbation(loss_fn, params, factors, batch, leaf)
    else:
        out = contract(loss_fn, params, factors, batch, method)
    return jax.lax.with_sharding_constraint(out, sharding)


# ----------------------------------------------------------------------------
# The calculator
# ----------------------------------------------------------------------------


class InfluenceCalculator:
    """Streamed, tiled, resumable influence matrix on disk, for any solver.

    Args:
      model: a :class:`jaxinf.InfluenceModel` (its ``loss_fn``, ``params``,
        ``solver``, ``scoring``, ``input_leaf``, ``strict``). It must be
        fitted unless ``state`` is given.
      state: a fitted solver state to use instead of ``model.state`` (e.g.
        from :func:`jaxinf.scale.load_state` or a streamed fit).
      mesh: a data mesh (:func:`jaxinf.scale.data_mesh`); default: the
        first local device only.
      test_block: test points whose factors are solved together (rows per
        block). Larger blocks mean fewer passes over the training data
        (``ceil(n_test / test_block)`` passes) and more memory.
      mode: ``"up"`` or ``"perturbation"``.
      scoring: ``None`` (the model's setting), ``"auto"``, ``"gradients"``,
        ``"jvp"`` or ``"layerwise"``.
      max_memory: bytes available per device (host RAM for CPU devices);
        default: the free memory now.
      progress: show a tqdm progress bar (throughput and ETA) on process 0.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, jaxinf, tempfile
      >>> from jaxinf.scale import InfluenceCalculator, ArraySource
      >>> loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> x = np.random.default_rng(0).normal(size=(10, 3)); y = x.sum(1)
      >>> model = jaxinf.InfluenceModel(loss, jnp.ones(3), jaxinf.direct(), damping=0.1).fit((x, y))
      >>> calc = InfluenceCalculator(model, test_block=2, progress=False)
      >>> out = calc.run((x[:3], y[:3]), ArraySource((x, y), batch_size=4), tempfile.mkdtemp())
      >>> out.shape
      (3, 10)
      >>> bool(np.allclose(out[:], model.influences((x[:3], y[:3]), (x, y))))
      True
    """

    def __init__(
        self,
        model,
        *,
        state: PyTree = None,
        mesh: Mesh | None = None,
        test_block: int = 128,
        mode: str = "up",
        scoring: str | None = None,
        max_memory: int | None = None,
        progress: bool = True,
    ):
        if mode not in MODES:
            raise ValueError(f"Unknown mode {mode!r}; choose 'up' (up-weighting) or 'perturbation'.")
        scoring = model.scoring if scoring is None else scoring
        if scoring not in SCORING_METHODS:
            raise ValueError(f"Unknown scoring {scoring!r}; choose one of {SCORING_METHODS}.")
        if isinstance(test_block, bool) or int(test_block) < 1:
            raise ValueError(f"test_block must be a positive int, got {test_block!r}.")
        if state is None:
            model._require_fit()
            state = model.state
        self.model = model
        self.mesh = data_mesh([jax.local_devices()[0]]) if mesh is None else mesh
        self.devices = mesh_size(self.mesh)
        self.local_devices = self.mesh.local_mesh.size
        self.test_block = int(test_block)
        self.mode = mode
        self.scoring = scoring
        self.max_memory = max_memory
        self.progress = progress
        self.spec = model._spec
        self.params = replicate(model.params, self.mesh)
        self.state = _on_mesh(state, self.mesh)
        self._compiled: dict = {}

    # ------------------------------------------------------------ kernels
    def _method(self, train_like) -> str:
        if self.mode == "perturbation":
            return "perturbation"
        if self.scoring != "auto":
            return self.scoring
        return self.model.scoring_method(self.test_block, train_like)

    def _kernels(self, test_like, train_like, method: str, leaf: int | None):
        """The factor and scoring kernels compiled for these block shapes (cached by JAX across calculators)."""
        cache_key = (method, leaf, _shape_key(test_like), _shape_key(train_like))
        if cache_key in self._compiled:
            return self._compiled[cache_key]
        loss_fn, solver = self.model.loss_fn, self.model.solver
        f_compiled = _factors_kernel.lower(self.params, self.state, test_like, loss_fn=loss_fn, solver=solver).compile()
        factors_like = jax.eval_shape(
            lambda p, s, b: _factors_kernel(p, s, b, loss_fn=loss_fn, solver=solver),
            self.params,
            self.state,
            test_like,
        )[0]
        replicated = NamedSharding(self.mesh, P())
        factors_like = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), factors_like)
        scores_sharding = NamedSharding(self.mesh, P(None, self.mesh.axis_names[0]))
        s_compiled = _scores_kernel.lower(
            self.params, factors_like, train_like, loss_fn=loss_fn, method=method, leaf=leaf, sharding=scores_sharding
        ).compile()
        self._compiled[cache_key] = (f_compiled, s_compiled)
        return f_compiled, s_compiled

    # -------------------------------------------------------------- shapes
    def _layout(self, test_source, train_source):
        n_local_dev = self.local_devices
        tb_pad = _round_up(self.test_block, self.devices)
        b = train_source.batch_size
        b_local_pad = _round_up(b, n_local_dev)
        first_train = train_source.first()
        first_test = test_source.first()
        leaf = resolve_input_leaf(first_train, self.model.input_leaf) if self.mode == "perturbation" else None

        def like(batch, rows, sharding_axis_size, global_rows):
            def one(a):
                a = np.asarray(a)
                sharding = data_sharding(self.mesh) if sharding_axis_size else NamedSharding(self.mesh, P())
                return jax.ShapeDtypeStruct((global_rows, *a.shape[1:]), a.dtype, sharding=sharding)

            return jax.tree.map(one, batch)

        processes = self.devices // n_local_dev
        test_like = like(first_test, tb_pad, True, tb_pad)
        train_like = like(first_train, b_local_pad, True, b_local_pad * processes)
        x_shape = ()
        if self.mode == "perturbation":
            x_shape = tuple(np.shape(jax.tree.leaves(first_train)[leaf])[1:])
        return tb_pad, b_local_pad, test_like, train_like, leaf, x_shape

    def plan(self, test_data: Any, train_data: Any, *, batch_size: int | None = None) -> MemoryPlan:
        """The memory and disk this configuration needs (compiles the kernels; runs nothing).

        Args:
          test_data, train_data: as for :meth:`run`.
          batch_size: cut in-memory ``train_data`` into batches of this size.
        """
        test_source = as_source(test_data, self.test_block if _is_one_batch(test_data) else None)
        train_source = as_source(train_data, batch_size)
        return self._plan(test_source, train_source)[0]

    def _plan(self, test_source, train_source):
        tb_pad, b_local_pad, test_like, train_like, leaf, x_shape = self._layout(test_source, train_source)
        method = self._method(train_like)
        train_like_size = jax.tree.leaves(train_like)[0].shape[0]
        f_compiled, s_compiled = self._kernels(test_like, train_like, method, leaf)
        p = self.spec.size
        itemsize = jnp.dtype(self.spec.dtype).itemsize
        per_dev_rows = train_like_size // self.devices
        fallback_f = _nbytes(self.state) + 2 * tb_pad * p * itemsize
        fallback_s = tb_pad * p * itemsize + (
            per_dev_rows * p * itemsize if method in ("gradients", "layerwise") else 0
        )
        out_cells = tb_pad * b_local_pad * int(np.prod(x_shape, dtype=np.int64))
        batch_bytes = _nbytes(train_like) // max(1, self.devices // self.local_devices)
        host = batch_bytes + 2 * out_cells * itemsize + _nbytes(test_like)
        n_test, n_train = test_source.total_examples, train_source.total_examples
        disk = n_test * n_train * int(np.prod(x_shape, dtype=np.int64)) * itemsize
        device = self.mesh.local_mesh.devices.flat[0]
        budget = available_bytes(device) if self.max_memory is None else int(self.max_memory)
        plan = MemoryPlan(
            test_block=tb_pad,
            train_batch=train_like_size,
            method=method,
            num_params=p,
            devices=self.devices,
            local_devices=self.local_devices,
            factors_bytes=_peak(f_compiled, fallback_f),
            scoring_bytes=_peak(s_compiled, fallback_s),
            host_bytes=host,
            disk_bytes=disk,
            budget_bytes=budget,
            shared_host_memory=device.platform == "cpu",
        )
        return plan, (tb_pad, b_local_pad, test_like, train_like, leaf, x_shape, method, f_compiled, s_compiled)

    # ----------------------------------------------------------------- run
    def run(
        self,
        test_data: Any,
        train_data: Any,
        path: str | os.PathLike,
        *,
        batch_size: int | None = None,
        resume: bool = True,
        overwrite: bool = False,
        callback: Callable[[dict], None] | None = None,
    ):
        """Compute the influence matrix into the zarr store at ``path``.

        Args:
          test_data: the test points (rows): one batch, a list of batches, or
            a source. Every process passes all of them.
          train_data: the training points (columns): a source
            (:class:`~jaxinf.scale.ArraySource`, :class:`~jaxinf.scale.IterableSource`),
            one batch or a list of batches. In a multi-process run each
            process passes the source of its own part.
          path: directory of the zarr store (created if needed).
          batch_size: cut in-memory ``train_data`` into batches of this size.
          resume: continue a run found at ``path`` if it was started with the
            same arguments (else ``ValueError``).
          overwrite: delete what is at ``path`` first.
          callback: called after every completed block with a dict
            (``test_block``, ``step``, ``rows``, ``columns``, ``done``,
            ``total``).

        Returns:
          The ``influences`` zarr array (read it lazily, ``arr[i0:i1, j0:j1]``).

        Raises:
          ValueError: the configuration does not fit in memory or on disk (with
            the plan), the store holds another computation, or bad data.
          ConvergenceError: the solver did not converge for some test point
            (strict models; else a warning).
        """
        import zarr

        test_source = as_source(test_data, self.test_block if _is_one_batch(test_data) else None)
        train_source = as_source(train_data, batch_size)
        if test_source.num_examples != test_source.total_examples:
            raise ValueError("Every process must pass all the test points (the rows); shard only the training data.")
        plan, layout = self._plan(test_source, train_source)
        tb_pad, b_local_pad, test_like, train_like, leaf, x_shape, method, f_compiled, s_compiled = layout
        if not plan.fits():
            raise ValueError(
                "This influence computation does not fit in memory:\n"
                f"{plan}\n"
                "Lower test_block (factor kernel) or the training batch size (scoring kernel), use "
                "scoring='jvp' for few test points, shard over more devices, or raise max_memory if you know it fits."
            )
        n_test = test_source.num_examples
        n_train = train_source.total_examples
        b = train_source.batch_size
        processes = self.devices // self.local_devices
        if processes == 1 and train_source.num_examples != n_train:
            raise ValueError(
                "A single-process run needs the whole training set; this source holds examples "
                f"[{train_source.offset}, {train_source.offset + train_source.num_examples}) of {n_train}."
            )
        per = math.ceil(n_train / (processes * b)) * b  # examples per process (see process_range)
        steps = per // b
        if (processes - 1) * per >= n_train:  # the same verdict on every process
            raise ValueError(
                f"{n_train} training points in batches of {b} leave the last of {processes} processes without "
                "examples; use a smaller batch size or fewer processes."
            )
        if processes > 1:
            _check_process_source(train_source, per, b)
        n_blocks = math.ceil(n_test / self.test_block)
        dtype = np.dtype(jnp.dtype(self.spec.dtype))
        shape = (n_test, n_train, *x_shape)
        chunks = (min(self.test_block, n_test), min(b, n_train), *x_shape)
        fingerprint = self._fingerprint(shape, chunks, dtype, method, b, processes, test_source)

        pid = jax.process_index()
        path = os.fspath(path)
        if pid == 0:
            root = self._open_store(
                path, fingerprint, shape, chunks, dtype, (n_blocks, steps, processes), plan, resume, overwrite
            )
        _barrier("jaxinf-calculator-open")
        if pid != 0:
            root = zarr.open_group(path, mode="r+")
        out = root["influences"]
        done_arr = root["done"]
        all_done = _broadcast(np.asarray(done_arr[:], np.uint8)).all(axis=2)

        def rows(i):
            return min((i + 1) * self.test_block, n_test) - i * self.test_block

        def columns(j):  # real columns of step j over all processes
            return sum(
                max(0, min(k * per + (j + 1) * b, (k + 1) * per, n_train) - (k * per + j * b)) for k in range(processes)
            )

        total = n_test * n_train
        finished = sum(rows(i) * columns(j) for i, j in zip(*np.nonzero(all_done)))
        bar = _progress(self.progress and pid == 0, total, finished)
        first_example = None
        try:
            for i in range(n_blocks):
                if all_done[i].all():
                    continue
                r0, r1 = i * self.test_block, i * self.test_block + rows(i)
                factors = self._factors(f_compiled, _slice_rows(test_source, r0, r1), r1 - r0, tb_pad)
                start = int(np.argmin(all_done[i]))
                batches = train_source.batches(min(start, train_source.num_batches))
                for j in range(start, steps):
                    batch = next(batches, None) if j < train_source.num_batches else None
                    if all_done[i, j]:
                        continue
                    c0 = train_source.offset + j * b
                    real = 0 if batch is None else leading_size(batch)
                    if batch is None:  # this process has no examples left: score a stand-in, write nothing
                        if first_example is None:
                            first_example = jax.tree.map(lambda a: np.asarray(a)[:1], train_source.first())
                        batch = first_example
                    placed = global_batch(pad_batch(batch, b_local_pad), self.mesh)
                    scores = s_compiled(self.params, factors, placed)
                    if real:
                        index = (slice(r0, r1), slice(c0, c0 + real)) + (slice(None),) * len(x_shape)
                        out[index] = _local_columns(scores, r1 - r0, real)
                    done_arr[i, j, pid] = 1
                    bar.update((r1 - r0) * columns(j))
                    if callback is not None:
                        callback(
                            {
                                "test_block": i,
                                "step": j,
                                "rows": (r0, r1),
                                "columns": (c0, c0 + real),
                                "done": bar.n,
                                "total": total,
                            }
                        )
        finally:
            bar.close()
        _barrier("jaxinf-calculator-done")
        if pid == 0:
            root.attrs.update({"complete": True})
        return out

    # ------------------------------------------------------------ helpers
    def _factors(self, compiled, test_batch, real: int, tb_pad: int):
        placed = jax.tree.map(lambda a: _place(np.asarray(a), data_sharding(self.mesh)), pad_batch(test_batch, tb_pad))
        factors, info, finite = compiled(self.params, self.state, placed)
        info = jax.tree.map(lambda x: to_host(x)[:real], info)
        self.model._check_info(info, "right-hand sides")
        if not to_host(finite)[:real].all():
            solver = self.model.solver
            raise _convergence_error()(f"{solver.name} returned NaN or inf influence factors. {solver.advice}".strip())
        return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(self.mesh, P())), factors)

    def _fingerprint(self, shape, chunks, dtype, method, b, processes, test_source) -> dict:
        h = hashlib.sha256()
        _hash_tree(self.model.params, h)
        _hash_tree(self.state, h)
        _hash_tree(_slice_rows(test_source, 0, min(self.test_block, test_source.num_examples)), h)
        return {
            "shape": list(shape),
            "chunks": list(chunks),
            "dtype": str(dtype),
            "mode": self.mode,
            "method": method,
            "solver": self.model.solver.name,
            "test_block": self.test_block,
            "train_batch": b,
            "processes": processes,
            "devices": self.devices,
            "digest": h.hexdigest(),
        }

    def _open_store(self, path, fingerprint, shape, chunks, dtype, done_shape, plan, resume, overwrite):
        import zarr

        exists = os.path.exists(os.path.join(path, "zarr.json"))
        if exists and overwrite:
            shutil.rmtree(path)
            exists = False
        if exists:
            root = zarr.open_group(path, mode="r+")
            meta = dict(root.attrs).get(FORMAT)
            if meta is None:
                raise ValueError(
                    f"{path} holds a zarr group that is not a jaxinf influence store; choose another path."
                )
            if not resume:
                raise ValueError(
                    f"{path} already holds an influence run. Pass resume=True to continue it or overwrite=True "
                    "to start again."
                )
            differ = sorted(k for k in fingerprint if meta.get(k) != fingerprint[k])
            if differ:
                detail = ", ".join(f"{k}: stored {meta.get(k)!r} vs now {fingerprint[k]!r}" for k in differ)
                raise ValueError(
                    f"{path} holds a run with other arguments ({detail}); a resumed run must use the same model, "
                    "state, data sizes and block sizes. Pass overwrite=True or choose another path."
                )
            return root
        parent = os.path.dirname(os.path.abspath(path)) or "."
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        free = shutil.disk_usage(parent).free
        if plan.disk_bytes > free:
            raise ValueError(
                f"The result needs {_fmt(plan.disk_bytes)} on disk, but {parent} has {_fmt(free)} free. Choose "
                "another path, or fewer test points per run."
            )
        root = zarr.open_group(path, mode="w")
        fill = np.nan if dtype.kind == "f" else 0
        root.create_array("influences", shape=shape, chunks=chunks, dtype=dtype, fill_value=fill)
        root.create_array("done", shape=done_shape, chunks=(1, 1, 1), dtype="uint8", fill_value=0)
        root.attrs.update({FORMAT: {**fingerprint, "version": VERSION}, "complete": False})
        return root


def _convergence_error():
    from jaxinf.core.errors import ConvergenceError

    return ConvergenceError


def _on_mesh(tree: PyTree, mesh: Mesh) -> PyTree:
    devices = set(mesh.devices.flat)

    def one(x):
        if isinstance(x, jax.Array) and x.sharding.device_set == devices:
            return x
        if isinstance(x, (jax.Array, np.ndarray, np.generic)):
            return _place(x, NamedSharding(mesh, P()))
        return x

    return jax.tree.map(one, tree)


def _local_columns(scores: jax.Array, rows: int, real: int) -> np.ndarray:
    """This process's first ``real`` columns (and first ``rows`` rows) of a score block sharded along columns."""
    shards = {}
    for shard in scores.addressable_shards:
        shards.setdefault(shard.index[1].start or 0, shard)  # replicas of one slice: keep one
    block = np.concatenate([np.asarray(shards[s].data)[:rows] for s in sorted(shards)], axis=1)
    return block[:, :real]


def _slice_rows(source, r0: int, r1: int):
    """Test rows ``[r0, r1)`` from a source (reads the batches that hold them)."""
    b = source.batch_size
    j0, j1 = r0 // b, (r1 - 1) // b
    parts = []
    for j, batch in zip(range(j0, j1 + 1), source.batches(j0)):
        lo = max(r0 - j * b, 0)
        hi = min(r1 - j * b, leading_size(batch))
        parts.append(jax.tree.map(lambda a, lo=lo, hi=hi: np.asarray(a)[lo:hi], batch))
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def _check_process_source(source, per: int, b: int) -> None:
    expect_start = (source.offset // per) * per if per else 0
    if source.offset % b or source.offset != expect_start:
        raise ValueError(
            f"In a multi-process run each process's training source must cover the range given by "
            f"jaxinf.scale.process_range (start a multiple of {per}); this one starts at {source.offset}. "
            "Use ArraySource(...).shard()."
        )


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _shape_key(tree) -> tuple:
    return tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(tree)) + (jax.tree.structure(tree),)


def _is_one_batch(data) -> bool:
    from jaxinf.core.data import is_single_batch
    from jaxinf.scale.sources import _Source

    return not isinstance(data, _Source) and is_single_batch(data)


class _NoBar:
    n = 0

    def update(self, k):
        self.n += k

    def close(self):
        pass


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        bar = _NoBar()
        bar.n = initial
        return bar
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="score", unit_scale=True, desc="influences", smoothing=0.1)


def compute_influences(model, test_data, train_data, path, **kwargs):
    """One call: ``InfluenceCalculator(model, ...).run(test_data, train_data, path, ...)``.

    Keyword arguments go to the constructor (``state``, ``mesh``,
    ``test_block``, ``mode``, ``scoring``, ``max_memory``, ``progress``) or to
    :meth:`InfluenceCalculator.run` (``batch_size``, ``resume``,
    ``overwrite``, ``callback``).
    """
    run_keys = {"batch_size", "resume", "overwrite", "callback"}
    run_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in run_keys}
    return InfluenceCalculator(model, **kwargs).run(test_data, train_data, path, **run_kwargs)


def open_influences(path: str | os.PathLike):
    """Open the influence array of a store lazily (read-only zarr array)."""
    import zarr

    root = zarr.open_group(os.fspath(path), mode="r")
    if FORMAT not in dict(root.attrs):
        raise ValueError(f"{path} is not a jaxinf influence store.")
    return root["influences"]
