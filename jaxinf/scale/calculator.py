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

Memory is planned before any work (:mod:`jaxinf.scale.plan`).

Many devices and hosts: with a ``mesh`` (:func:`jaxinf.scale.data_mesh`)
each training batch is sharded along its examples over all devices of all
processes; each process reads only its own part of the training data (give
each a source for its own range, e.g. ``ArraySource(...).shard()``) and
writes only its own columns. Every process must see the same store path (a
shared file system or an object store that zarr can open).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinf.core.data import batch_size as leading_size
from jaxinf.core.data import is_single_batch
from jaxinf.core.errors import ConvergenceError
from jaxinf.core.memory import available_bytes
from jaxinf.model import MODES
from jaxinf.scale.distributed import barrier, broadcast_from_first
from jaxinf.scale.kernels import factors_kernel, scores_kernel
from jaxinf.scale.plan import MemoryPlan, compiled_peak_bytes, tree_bytes
from jaxinf.scale.progress import progress_bar
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
from jaxinf.scale.sources import _Source, as_source
from jaxinf.scale.store import hash_tree, open_influences, open_store
from jaxinf.scale.tiles import Tiling, check_process_source, local_columns, on_mesh, round_up, shape_key, slice_rows
from jaxinf.scoring import SCORING_METHODS, resolve_input_leaf

PyTree = Any

__all__ = ["InfluenceCalculator", "MemoryPlan", "compute_influences", "open_influences"]


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
        self.state = on_mesh(state, self.mesh)
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
        cache_key = (method, leaf, shape_key(test_like), shape_key(train_like))
        if cache_key in self._compiled:
            return self._compiled[cache_key]
        loss_fn, solver = self.model.loss_fn, self.model.solver
        f_compiled = factors_kernel.lower(self.params, self.state, test_like, loss_fn=loss_fn, solver=solver).compile()
        factors_like = jax.eval_shape(
            lambda p, s, b: factors_kernel(p, s, b, loss_fn=loss_fn, solver=solver),
            self.params,
            self.state,
            test_like,
        )[0]
        replicated = NamedSharding(self.mesh, P())
        factors_like = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), factors_like)
        scores_sharding = NamedSharding(self.mesh, P(None, self.mesh.axis_names[0]))
        s_compiled = scores_kernel.lower(
            self.params, factors_like, train_like, loss_fn=loss_fn, method=method, leaf=leaf, sharding=scores_sharding
        ).compile()
        self._compiled[cache_key] = (f_compiled, s_compiled)
        return f_compiled, s_compiled

    # -------------------------------------------------------------- shapes
    def _layout(self, test_source, train_source):
        n_local_dev = self.local_devices
        tb_pad = round_up(self.test_block, self.devices)
        b = train_source.batch_size
        b_local_pad = round_up(b, n_local_dev)
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
        fallback_f = tree_bytes(self.state) + 2 * tb_pad * p * itemsize
        fallback_s = tb_pad * p * itemsize + (
            per_dev_rows * p * itemsize if method in ("gradients", "layerwise") else 0
        )
        out_cells = tb_pad * b_local_pad * int(np.prod(x_shape, dtype=np.int64))
        batch_bytes = tree_bytes(train_like) // max(1, self.devices // self.local_devices)
        host = batch_bytes + 2 * out_cells * itemsize + tree_bytes(test_like)
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
            factors_bytes=compiled_peak_bytes(f_compiled, fallback_f),
            scoring_bytes=compiled_peak_bytes(s_compiled, fallback_s),
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
        job = self._job(test_data, train_data, batch_size)
        root = self._open(job, os.fspath(path), resume, overwrite)
        out = root["influences"]
        done = broadcast_from_first(np.asarray(root["done"][:], np.uint8)).all(axis=2)
        finished = sum(job.rows(i) * job.columns(j) for i, j in zip(*np.nonzero(done)))
        bar = progress_bar(self.progress, job.n_test * job.n_train, desc="influences", unit="score", initial=finished)
        try:
            for i in range(job.n_blocks):
                if not done[i].all():
                    self._score_block(job, i, done[i], out, root["done"], bar, callback)
        finally:
            bar.close()
        barrier("jaxinf-calculator-done")
        if jax.process_index() == 0:
            root.attrs.update({"complete": True})
        return out

    def _job(self, test_data, train_data, batch_size) -> Tiling:
        """Sources, plan, compiled kernels and the tiling of one run; refuses what cannot run."""
        test_source = as_source(test_data, self.test_block if _is_one_batch(test_data) else None)
        train_source = as_source(train_data, batch_size)
        if test_source.num_examples != test_source.total_examples:
            raise ValueError("Every process must pass all the test points (the rows); shard only the training data.")
        plan, layout = self._plan(test_source, train_source)
        if not plan.fits():
            raise ValueError(
                "This influence computation does not fit in memory:\n"
                f"{plan}\n"
                "Lower test_block (factor kernel) or the training batch size (scoring kernel), use "
                "scoring='jvp' for few test points, shard over more devices, or raise max_memory if you know it fits."
            )
        n_train, b = train_source.total_examples, train_source.batch_size
        processes = self.devices // self.local_devices
        if processes == 1 and train_source.num_examples != n_train:
            raise ValueError(
                "A single-process run needs the whole training set; this source holds examples "
                f"[{train_source.offset}, {train_source.offset + train_source.num_examples}) of {n_train}."
            )
        per = math.ceil(n_train / (processes * b)) * b  # examples per process (see process_range)
        if (processes - 1) * per >= n_train:  # the same verdict on every process
            raise ValueError(
                f"{n_train} training points in batches of {b} leave the last of {processes} processes without "
                "examples; use a smaller batch size or fewer processes."
            )
        if processes > 1:
            check_process_source(train_source, per, b)
        return Tiling(self.test_block, test_source, train_source, plan, *layout, processes=processes, per=per)

    def _open(self, job: Tiling, path: str, resume: bool, overwrite: bool):
        """Process 0 creates or reopens the store (checking the fingerprint); the others open it after."""
        import zarr

        dtype = np.dtype(jnp.dtype(self.spec.dtype))
        b, n_test, n_train = job.train_batch, job.n_test, job.n_train
        shape = (n_test, n_train, *job.x_shape)
        chunks = (min(self.test_block, n_test), min(b, n_train), *job.x_shape)
        fingerprint = self._fingerprint(shape, chunks, dtype, job.method, b, job.processes, job.test_source)
        done_shape = (job.n_blocks, job.steps, job.processes)
        if jax.process_index() == 0:
            root = open_store(
                path, fingerprint, shape, chunks, dtype, done_shape, job.plan.disk_bytes,
                resume=resume, overwrite=overwrite,
            )
        barrier("jaxinf-calculator-open")
        if jax.process_index() != 0:
            root = zarr.open_group(path, mode="r+")
        return root

    def _score_block(self, job: Tiling, i: int, done_row, out, done_arr, bar, callback) -> None:
        """Test block ``i``: solve its factors once, then score every training step not yet done."""
        r0, r1 = i * self.test_block, i * self.test_block + job.rows(i)
        factors = self._factors(job.f_compiled, slice_rows(job.test_source, r0, r1), r1 - r0, job.test_pad)
        start = int(np.argmin(done_row))
        source, b, pid = job.train_source, job.train_batch, jax.process_index()
        batches = source.batches(min(start, source.num_batches))
        for j in range(start, job.steps):
            batch = next(batches, None) if j < source.num_batches else None
            if done_row[j]:
                continue
            c0 = source.offset + j * b
            real = 0 if batch is None else leading_size(batch)
            if batch is None:  # this process has no examples left: score a stand-in, write nothing
                batch = jax.tree.map(lambda a: np.asarray(a)[:1], source.first())
            placed = global_batch(pad_batch(batch, job.train_pad), self.mesh)
            scores = job.s_compiled(self.params, factors, placed)
            if real:
                index = (slice(r0, r1), slice(c0, c0 + real)) + (slice(None),) * len(job.x_shape)
                out[index] = local_columns(scores, r1 - r0, real)
            done_arr[i, j, pid] = 1
            bar.update((r1 - r0) * job.columns(j))
            if callback is not None:
                callback(
                    {"test_block": i, "step": j, "rows": (r0, r1), "columns": (c0, c0 + real), "done": bar.n,
                     "total": job.n_test * job.n_train}
                )

    # ------------------------------------------------------------ helpers
    def _factors(self, compiled, test_batch, real: int, tb_pad: int):
        placed = jax.tree.map(lambda a: _place(np.asarray(a), data_sharding(self.mesh)), pad_batch(test_batch, tb_pad))
        factors, info, finite = compiled(self.params, self.state, placed)
        info = jax.tree.map(lambda x: to_host(x)[:real], info)
        self.model._check_info(info, "right-hand sides")
        if not to_host(finite)[:real].all():
            solver = self.model.solver
            raise ConvergenceError(f"{solver.name} returned NaN or inf influence factors. {solver.advice}".strip())
        return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(self.mesh, P())), factors)

    def _fingerprint(self, shape, chunks, dtype, method, b, processes, test_source) -> dict:
        h = hashlib.sha256()
        hash_tree(self.model.params, h)
        hash_tree(self.state, h)
        hash_tree(slice_rows(test_source, 0, min(self.test_block, test_source.num_examples)), h)
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

def _is_one_batch(data) -> bool:
    return not isinstance(data, _Source) and is_single_batch(data)


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
