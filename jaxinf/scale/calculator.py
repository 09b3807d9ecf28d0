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
3. a cell is marked done (an atomic done-mark recording the digests of its
   test block and training batch) only after its chunk is written, so a run
   killed part-way and started again with the same arguments and data skips
   the done cells and gives a result identical to an uninterrupted run.

The store (:mod:`jaxinf.scale.store`: a zarr v3 group at ``path``, locked
while a job writes) holds ``influences`` (``(n_test, n_train)``, or
``(n_test, n_train, *x_shape)`` in perturbation mode; NaN where not computed
yet), the done-marks and the run's fingerprint. Open it lazily with
:func:`open_influences`.

Memory is planned before any work (:mod:`jaxinf.scale.plan`).

Many devices and hosts: with a ``mesh`` (:func:`jaxinf.scale.data_mesh`)
each training batch is sharded along its examples over all devices of all
processes; each process reads only its own part of the training data (give
each a source for its own range, e.g. ``ArraySource(...).shard()``) and
writes only its own columns. Every process must see the same store path (a
shared file system or an object store that zarr can open).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxinf.core.data import batch_size as leading_size
from jaxinf.core.data import is_single_batch
from jaxinf.core.precision import refuse_half
from jaxinf.model import check_mode
from jaxinf.scale.distributed import agree, barrier, broadcast_from_first
from jaxinf.scale.kernels import compile_kernels
from jaxinf.scale.plan import MemoryPlan, plan_memory
from jaxinf.scale.progress import progress_bar
from jaxinf.scale.query_rank import check_query_rank, compress_block
from jaxinf.scale.sharding import data_mesh, data_sharding, global_batch, mesh_size, pad_batch, replicate
from jaxinf.scale.sources import _Source, as_source
from jaxinf.scale.store import (
    FORMAT,
    check_fingerprint,
    check_store,
    done_cells,
    mark_done,
    open_influences,
    open_store,
    read_marks,
    recorded_digests,
    set_complete,
)
from jaxinf.scale.tiles import (
    Tiling,
    check_test_blocks,
    local_columns,
    nonfinite_scores,
    on_mesh,
    process_split,
    round_up,
    run_fingerprint,
    slice_rows,
    solve_factors,
    train_steps,
)
from jaxinf.scoring import SCORING_METHODS, check_measurement, resolve_input_leaf
from jaxinf.scoring.query_compression import check_rank

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
      measurement: ``f(params, batch) -> scalar mean`` replacing the loss on
        the test side (default: the loss), as in :meth:`jaxinf.InfluenceModel.influences`.
      query_rank: compress each test block's factors to this rank per tagged
        layer (truncated SVD, :mod:`jaxinf.scale.query_rank`); the errors are
        in ``compression_reports`` (one per block; the first also gives the
        change in its first tile's scores). Recorded in the store's fingerprint.

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
        measurement: Callable | None = None,
        query_rank: int | None = None,
    ):
        check_mode(mode)
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
        self.measurement = measurement
        self.query_rank, self.compression_reports = None if query_rank is None else check_rank(query_rank), []
        self.spec = model._spec
        refuse_half(model.params, "jaxinf.scale.InfluenceCalculator")
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
        """The factor and scoring kernels compiled for these block shapes (cached per calculator and by JAX)."""
        return compile_kernels(self, test_like, train_like, method, leaf)

    # -------------------------------------------------------------- shapes
    def _layout(self, test_source, train_source):
        n_local_dev = self.local_devices
        tb_pad = round_up(self.test_block, self.devices)
        b = train_source.batch_size
        b_local_pad = round_up(b, n_local_dev)
        first_train = train_source.first()
        first_test = test_source.first()
        leaf = resolve_input_leaf(first_train, self.model.input_leaf) if self.mode == "perturbation" else None

        def like(batch, global_rows):  # sharded along the examples
            sharding = data_sharding(self.mesh)
            return jax.tree.map(
                lambda a: jax.ShapeDtypeStruct((global_rows, *np.shape(a)[1:]), np.asarray(a).dtype, sharding=sharding),
                batch,
            )

        test_like = like(first_test, tb_pad)
        train_like = like(first_train, b_local_pad * (self.devices // n_local_dev))
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
        return plan_memory(self, test_source, train_source)

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
            process passes the source of its own part. The source is read
            once per test block and must yield the same batches in the same
            order every time (each batch's digest is checked).
          path: directory of the store: new, empty, or a store of an earlier
            run. Any other existing file or directory is refused, never
            written to or deleted.
          batch_size: cut in-memory ``train_data`` into batches of this size.
          resume: continue a run found at ``path`` if it was started with the
            same arguments and data (else ``ValueError`` naming what differs).
          overwrite: start again, deleting the store found at ``path`` (only
            a jaxinf store is ever deleted).
          callback: called after every completed block with a dict
            (``test_block``, ``step``, ``rows``, ``columns``, ``done``,
            ``total``).

        Returns:
          The ``influences`` zarr array (read it lazily, ``arr[i0:i1, j0:j1]``).

        Raises:
          ValueError: the configuration does not fit in memory or on disk (with
            the plan); ``path`` is not a store of ours, holds another
            computation or is locked by another running job; a test point or
            training batch holds NaN or inf, or differs from the one this
            store was computed with or from an earlier pass. In a
            multi-process run every process raises the same error.
          ConvergenceError: the solver did not converge for some test point
            (strict models; else a warning).
        """
        path, self.compression_reports = os.fspath(path), []
        job, fingerprint = self._job(test_data, train_data, batch_size, path, resume, overwrite)
        root, lock = self._open(job, fingerprint, path, resume, overwrite)
        try:
            return self._run(job, root, path, callback)
        finally:
            if lock is not None:
                lock.release()

    def _run(self, job: Tiling, root, path: str, callback):
        out = root["influences"]
        marks = read_marks(path)
        done = broadcast_from_first(done_cells(path, job.grid, marks).astype(np.uint8)).all(axis=2)
        pid = jax.process_index()
        if pid == 0 and not done.all() and root.attrs.get("complete"):
            root.attrs.update({"complete": False})  # cells without a done-mark: not complete, whatever it said
        recorded, seen = recorded_digests(marks, pid)
        tests = check_test_blocks(job, recorded)
        finished = sum(job.rows(i) * job.columns(j) for i, j in zip(*np.nonzero(done)))
        bar = progress_bar(self.progress, job.n_test * job.n_train, desc="influences", unit="score", initial=finished)
        ctx = (job, path, out, seen, bar, callback)
        read_all = False
        try:
            for i in range(job.n_blocks):
                if not done[i].all():
                    self._score_block(ctx, i, done[i], tests[i], start=int(np.argmin(done[i])) if read_all else 0)
                    read_all = True
            if not read_all:  # a finished store: read the training data once, to check it is the same
                for _ in train_steps(job, 0, seen):
                    pass
        finally:
            bar.close()
        barrier("jaxinf-calculator-done")
        agree(set_complete(root, path, job.grid) if pid == 0 else None, step="store complete")
        return out

    def _job(self, test_data, train_data, batch_size, path: str, resume: bool, overwrite: bool):
        """The tiling of one run (sources, plan, compiled kernels) and its fingerprint; refuses what cannot run.

        A store at ``path`` that would be refused is found before anything is compiled or written.
        """
        test_source = as_source(test_data, self.test_block if _is_one_batch(test_data) else None)
        train_source = as_source(train_data, batch_size)
        if test_source.num_examples != test_source.total_examples:
            raise ValueError("Every process must pass all the test points (the rows); shard only the training data.")
        if self.measurement is not None:
            check_measurement(self.measurement, self.model.params, [test_source.first()])
        check_query_rank(self, train_source.first())
        processes = self.devices // self.local_devices
        per = process_split(train_source, processes)
        layout = self._layout(test_source, train_source)
        sketch = Tiling(self.test_block, test_source, train_source, None, *layout, self._method(layout[3]), None, None,
                        processes=processes, per=per)  # fmt: skip
        fingerprint = run_fingerprint(self, sketch, np.dtype(jnp.dtype(self.spec.dtype)))
        agree(check_store(path, fingerprint, resume=resume, overwrite=overwrite), step="check store")
        plan, layout = self._plan(test_source, train_source)
        plan.check()
        job = Tiling(self.test_block, test_source, train_source, plan, *layout, processes=processes, per=per)
        return job, fingerprint

    def _open(self, job: Tiling, fingerprint: dict, path: str, resume: bool, overwrite: bool):
        """Process 0 locks and creates or reopens the store; every process checks the fingerprint; all agree."""
        import zarr

        dtype = np.dtype(jnp.dtype(self.spec.dtype))
        root = lock = error = None
        if jax.process_index() == 0:
            try:
                root, lock = open_store(
                    path, fingerprint, job.shape, job.chunks, dtype, job.plan.disk_bytes, resume=resume,
                    overwrite=overwrite,
                )  # fmt: skip
            except ValueError as err:
                if job.processes == 1:
                    raise
                error = str(err)
        try:
            agree(error, step="open store")
            if jax.process_index() != 0:
                root = zarr.open_group(path, mode="r+")
                error = check_fingerprint(dict(root.attrs).get(FORMAT, {}), fingerprint, path)
            agree(error, step="store fingerprint")
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return root, lock

    def _score_block(self, ctx, i: int, done_row, test_digest: str, start: int) -> None:
        """Test block ``i``: solve its factors once, then score every training step from ``start`` not yet done."""
        job, path, out, seen, bar, callback = ctx
        r0, r1 = job.row_range(i)
        factors = solve_factors(self, job, slice_rows(job.test_source, r0, r1))
        if self.query_rank is not None:
            factors = compress_block(self, job, factors, r1 - r0)
        source, b, pid = job.train_source, job.train_batch, jax.process_index()
        for j, batch, found in train_steps(job, start, seen):
            if done_row[j]:
                continue
            c0 = source.offset + j * b
            real = 0 if batch is None else leading_size(batch)
            if batch is None:  # this process has no examples left: score a stand-in, write nothing
                batch = jax.tree.map(lambda a: np.asarray(a)[:1], source.first())
            placed = global_batch(pad_batch(batch, job.train_pad), self.mesh)
            scores = local_columns(job.s_compiled(self.params, factors, placed), r1 - r0, real)
            agree(nonfinite_scores(scores, i, j, r0, c0), step="scores")
            if real:
                out[(slice(r0, r1), slice(c0, c0 + real)) + (slice(None),) * len(job.x_shape)] = scores
            mark_done(
                path, (i, j, pid), {"test": test_digest, "train": found, "rows": [r0, r1], "columns": [c0, c0 + real]}
            )
            bar.update((r1 - r0) * job.columns(j))
            info = {"test_block": i, "step": j, "rows": (r0, r1), "columns": (c0, c0 + real), "done": bar.n}
            if callback is not None:
                callback({**info, "total": job.n_test * job.n_train})


def _is_one_batch(data) -> bool:
    return not isinstance(data, _Source) and is_single_batch(data)


def compute_influences(model, test_data, train_data, path, **kwargs):
    """One call: ``InfluenceCalculator(model, ...).run(test_data, train_data, path, ...)``.

    Keyword arguments go to the constructor (``state``, ``mesh``, ``test_block``,
    ``mode``, ``scoring``, ``max_memory``, ``progress``, ``measurement``, ``query_rank``) or to
    :meth:`InfluenceCalculator.run` (``batch_size``, ``resume``,
    ``overwrite``, ``callback``).
    """
    run_keys = {"batch_size", "resume", "overwrite", "callback"}
    run_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in run_keys}
    return InfluenceCalculator(model, **kwargs).run(test_data, train_data, path, **run_kwargs)
