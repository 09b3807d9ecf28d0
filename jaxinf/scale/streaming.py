"""Curvature from a stream: exact products and an exact dense fit without holding the data.

:class:`jaxinf.CurvatureOperator` keeps its dataset in memory so that solvers
can sweep it inside ``lax`` loops (CG, LiSSA, Arnoldi iterate on device with
no host round-trip). A collection larger than memory cannot be swept that
way; what *can* be streamed is anything that needs a fixed, known set of
products per pass:

* :class:`StreamingCurvature` — ``C V`` for a block of vectors ``V`` in one
  pass over a source: a host loop over batches, one jitted (and, with a
  mesh, data-parallel) product per batch, accumulated as the size-weighted
  mean, so a ragged last batch is exact. Memory: one batch plus ``2 k p``.
* :func:`direct_from_stream` — the exact solver's state
  (:class:`jaxinf.DirectState`) from the dense curvature assembled in **one**
  pass (``p`` products per batch, in column blocks), identical to
  ``jaxinf.direct().init`` on the same data held in memory. Memory ``O(p²)``,
  independent of the number of examples.

Which solvers can fit from a stream (all through
:func:`jaxinf.scale.fit_from_stream`, which returns the state ``init``
gives on the same batches in memory):

============  =====================================================================
direct        yes, one pass (:func:`direct_from_stream`).
nystrom       yes, one pass: the sketch ``Y = C Ω`` from :meth:`StreamingCurvature.matmat`.
arnoldi       yes, ``krylov_dim`` sequential passes (one product each).
kfac / ekfac  yes, one / two passes of per-batch factor statistics.
cg / lissa    no: they iterate inside ``lax`` loops. Fit on an in-memory subset
              (LiSSA samples minibatches anyway) or on a sharded in-memory dataset;
              or solve with CG over the stream: :func:`jaxinf.scale.cg_from_stream`
              (one pass per iteration, its pre-conditioner fitted from the stream).
============  =====================================================================

Many processes (``jax.distributed``): with ``mesh=scale.data_mesh()`` each
process streams **only its own** source (e.g. ``ArraySource(...).shard()``);
step ``j`` of a pass is the global batch made of every process's batch ``j``,
so the products and factor sums are all-reduced by XLA and every process ends
with the state of the whole dataset. Every process must stream the same
number of examples in batches of the same size, from disjoint parts of the
dataset (checked up front, from the sources' ``offset``); every batch is
checked on its process and all processes agree on the verdict
(:func:`jaxinf.scale.distributed.agree`) before the step's collective, so a
NaN, a short stream or a bad batch on one process stops all of them with the
same error, never a hang.

Scoring never needs the training data in memory: see
:class:`jaxinf.scale.InfluenceCalculator`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.curvature import CURVATURES, curvature_operator, fisher_vp, gauss_newton_vp, hessian_vp
from jaxinf.core.data import batch_size as leading_size
from jaxinf.core.pieces import host_pieces
from jaxinf.core.tree import check_finite, check_matches, ravel, tree_spec, unravel
from jaxinf.scale.distributed import agreed, exchange
from jaxinf.scale.progress import progress_bar
from jaxinf.scale.sharding import global_batch, mesh_size, replicate, shard_batch
from jaxinf.scale.sources import as_source
from jaxinf.solvers.direct import DirectState, fit_dense

PyTree = Any

__all__ = ["StreamingCurvature", "direct_from_stream"]


class StreamingCurvature:
    """Undamped curvature ``C`` of the mean loss over a stream of batches.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss (``"hessian"``,
        ``"fisher"``).
      params: the parameters.
      data: a source (:mod:`jaxinf.scale.sources`), one batch or a list.
      kind: ``"hessian"``, ``"gauss_newton"`` or ``"fisher"``.
      model_fn, output_loss: for ``"gauss_newton"``.
      mesh: optional data mesh; batches whose size divides the devices are
        sharded along their examples, others replicated (never padded, which
        would change the mean).
      progress: show a tqdm progress bar for each pass (process 0 only).

    Every batch is checked for NaN or inf on the host as it is read (an
    error names the batch).

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> from jaxinf.scale import ArraySource
      >>> from jaxinf.scale.streaming import StreamingCurvature
      >>> loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> x = np.eye(3)
      >>> c = StreamingCurvature(loss, jnp.zeros(3), ArraySource((x, np.ones(3)), batch_size=2))
      >>> (1.5 * np.asarray(c.matmat(jnp.eye(3)), np.float64)).round(4).tolist()  # H = (2/3) I
      [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """

    def __init__(
        self,
        loss_fn: Callable | None,
        params: PyTree,
        data: Any,
        *,
        kind: str = "hessian",
        model_fn: Callable | None = None,
        output_loss: Callable | None = None,
        mesh=None,
        progress: bool = False,
    ):
        if kind not in CURVATURES:
            raise ValueError(f"Unknown curvature {kind!r}; choose one of {CURVATURES}.")
        if kind == "gauss_newton" and (model_fn is None or output_loss is None):
            raise ValueError("curvature='gauss_newton' needs model_fn and output_loss.")
        if kind != "gauss_newton" and loss_fn is None:
            raise ValueError(f"curvature={kind!r} needs loss_fn(params, batch) -> mean loss.")
        self.source = as_source(data)
        self.processes = jax.process_count()
        self.start = 0  # global index of this process's first example
        if self.processes > 1:
            if mesh is None:
                raise ValueError(
                    "In a multi-process run, stream with mesh=scale.data_mesh() (the devices of every process): each "
                    "process reads its own examples and the products are all-reduced."
                )
            self.start = _stream_start(self.source)
        self.kind = kind
        self.mesh = mesh
        self.progress = progress
        self.params = params if mesh is None else replicate(params, mesh)
        self.spec = tree_spec(params)

        # module-level jitted sums with the functions static: every stream of one loss and shapes shares their programs
        functions = _Product(kind, loss_fn, model_fn, output_loss)
        self._block_sum = functools.partial(_block_sum, functions)
        self._dense_sum = functools.partial(_dense_sum, functions, self.spec)

    @property
    def num_examples(self) -> int:
        """Examples in the stream; in a multi-process run, of every process together."""
        return self.source.num_examples * self.processes

    def place(self, batch):
        """``batch`` on the mesh: sharded along its examples when their number divides the devices, else replicated."""
        if self.mesh is None:
            return batch
        if self.processes > 1:  # every process's part of batch j, concatenated in process order
            return global_batch(batch, self.mesh)
        if leading_size(batch) % mesh_size(self.mesh) == 0:
            return shard_batch(batch, self.mesh)
        return replicate(batch, self.mesh)

    def batches(self, desc: str = "pass", *, with_indices: bool = False, pad_to: int | None = None):
        """One pass: ``(index, batch, weight)`` per batch, placed on the mesh, ``weight = n_b / n``.

        With ``with_indices``, ``(index, batch, weight, example_indices)``:
        the global index of every example of the batch (``uint32``, placed
        like the batch; in a multi-process run, its index in the whole dataset
        across processes). With ``pad_to`` (and ``with_indices``), every batch
        comes as pieces of ``pad_to`` examples (:func:`jaxinf.core.pieces.host_pieces`:
        a ragged batch padded, a larger one cut, on the host before placing),
        ``(index, piece, weight, example_indices, mask)``, ``weight`` the
        piece's padded size over ``n``: one program per pass for per-example
        sums, none for a second batch shape.

        In a multi-process run every process reads and checks its batch, then
        all agree on the verdict (:func:`jaxinf.scale.distributed.agree`)
        before any goes on: a bad batch, a short or long stream on one process
        stops every process with the same error naming the process and the
        batch, never a hang.

        Raises:
          ValueError: a batch holds NaN or inf (naming the batch), the source
            yields fewer or more batches than it declares, or none.
        """
        n = self.num_examples
        count = self.source.num_batches
        if count == 0:
            raise ValueError("The data stream yielded no batches.")
        bar = progress_bar(self.progress, n, desc=desc, unit="ex", leave=False)
        iterator = iter(self.source)
        local_start = self.start
        try:
            for index in range(count):
                batch = agreed(f"{desc}: data[batch {index}]", self._read, iterator, index, count)
                local = leading_size(batch)
                weight = local * self.processes / n
                if with_indices:
                    indices = np.arange(local_start, local_start + local, dtype=np.uint32)
                    if pad_to is None:
                        yield index, self.place(batch), weight, self.place(indices)
                    for piece, at, mask in host_pieces(batch, indices, pad_to) if pad_to else ():
                        yield index, self.place(piece), pad_to * self.processes / n, self.place(at), self.place(mask)
                else:
                    yield index, self.place(batch), weight
                local_start += local
                bar.update(local * self.processes)
            agreed(f"{desc}: end of the data", self._read_end, iterator, count)
        finally:
            bar.close()

    def _read(self, iterator, index: int, count: int):
        """Batch ``index`` of the source, checked (a ``ValueError`` names the batch)."""
        name = f"data[batch {index}]"
        batch = next(iterator, None)
        if batch is None:
            raise ValueError(
                f"The data stream ended after {index} batches, but its source declares {count} "
                f"({self.source.num_examples} examples in batches of {self.source.batch_size}); fix num_examples."
            )
        leading_size(batch, name)
        check_finite(batch, name)
        return batch

    def _read_end(self, iterator, count: int) -> None:
        if next(iterator, None) is not None:
            raise ValueError(
                f"The data stream yields more than the {count} batches its source declares "
                f"({self.source.num_examples} examples in batches of {self.source.batch_size}); fix num_examples."
            )

    def matmat(self, vectors: PyTree, *, desc: str = "curvature products") -> PyTree:
        """``C v_k`` for every ``v_k`` along the leading axis of ``vectors``: one pass over the data."""
        check_matches(vectors, self.spec, "vectors", leading=1)
        if self.mesh is not None:
            vectors = replicate(vectors, self.mesh)
        total = None
        for _, batch, weight in self.batches(desc):
            term = self._block_sum(self.params, batch, vectors, weight)
            total = term if total is None else jax.tree.map(jnp.add, total, term)
        return total

    def curvature_vp(self, v: PyTree) -> PyTree:
        """``C v`` (one pass)."""
        return jax.tree.map(lambda x: x[0], self.matmat(jax.tree.map(lambda x: x[None], v)))

    def dense(self, *, column_batch: int = 128):
        """The dense ``p × p`` curvature (symmetrised) in one pass: ``p`` products per batch."""
        p = self.spec.size
        acc = jnp.zeros((p, p), self.spec.dtype)
        if self.mesh is not None:
            acc = replicate(acc, self.mesh)
        cb = max(1, min(int(column_batch), p))
        for _, batch, weight in self.batches("dense curvature"):
            acc = self._dense_sum(self.params, batch, jnp.asarray(weight, self.spec.dtype), acc, cb)
        return 0.5 * (acc + acc.T)


class _Product(NamedTuple):
    """``C v`` on one batch for a curvature ``kind`` (hashable: a static argument of the jitted sums)."""

    kind: str
    loss_fn: Callable | None
    model_fn: Callable | None
    output_loss: Callable | None

    def __call__(self, params, batch, v):
        if self.kind == "hessian":
            return hessian_vp(self.loss_fn, params, batch, v)
        if self.kind == "gauss_newton":
            return gauss_newton_vp(self.model_fn, self.output_loss, params, batch, v)
        return fisher_vp(self.loss_fn, params, batch, v)


@functools.partial(jax.jit, static_argnums=0)
def _block_sum(product: _Product, params, batch, vectors, weight):
    """``weight · C_batch v`` for every ``v`` along the leading axis of ``vectors``."""
    out = jax.vmap(lambda v: product(params, batch, v))(vectors)
    return jax.tree.map(lambda x: weight * x, out)


@functools.partial(jax.jit, static_argnums=(0, 1, 6), donate_argnums=5)
def _dense_sum(product: _Product, spec, params, batch, weight, acc, column_batch: int):
    """``acc + weight · C_batch`` (dense, ``p × p``), ``column_batch`` columns at a time."""
    p, dtype = spec.size, spec.dtype

    def column(j):
        e = jax.nn.one_hot(j, p, dtype=dtype)
        return ravel(product(params, batch, unravel(spec, e)), dtype)

    return acc + weight * jax.lax.map(column, jnp.arange(p), batch_size=column_batch)


def direct_from_stream(
    loss_fn: Callable | None,
    params: PyTree,
    data: Any,
    *,
    damping: Any = 0.0,
    kind: str = "hessian",
    blocks: Any = None,
    model_fn: Callable | None = None,
    output_loss: Callable | None = None,
    mesh=None,
    max_memory: int | None = None,
    column_batch: int = 128,
    progress: bool = False,
) -> DirectState:
    """The state of :func:`jaxinf.direct` fitted on a stream, in one pass over the data.

    Solves ``(C + λI) x = v`` exactly (Koh & Liang 2017) with ``C`` the dense
    (block-diagonal) curvature of the mean loss over every example of
    ``data``; the result equals ``jaxinf.direct().init`` on the same data in
    memory. Use it with the direct solver's ``solve`` (e.g.
    ``InfluenceCalculator(model, state=state)`` for a model built with
    ``jaxinf.direct()``).

    Args:
      loss_fn, params, kind, model_fn, output_loss: as for
        :func:`jaxinf.curvature_operator`.
      data: a source, one batch or a list of batches.
      damping: ``λ``, scalar or ``{block: λ}``.
      blocks: block structure (``None``, ``"layer"``, ...).
      mesh: optional data mesh for the products.
      max_memory: bytes the dense matrices may use (default: free memory).
      column_batch: products computed at once per batch.
      progress: show a tqdm progress bar (process 0 only).

    Raises:
      ValueError: the dense matrices would not fit (with the bytes needed).

    References:
      Koh & Liang, "Understanding Black-box Predictions via Influence
      Functions", ICML 2017.
    """
    source = as_source(data)
    first = source.first()
    # A one-batch operator gives the block layout and resolved damping (no products run).
    layout = curvature_operator(
        loss_fn, params, first, kind=kind, damping=damping, blocks=blocks, model_fn=model_fn, output_loss=output_loss
    )
    curvature = StreamingCurvature(
        loss_fn, params, source, kind=kind, model_fn=model_fn, output_loss=output_loss, mesh=mesh, progress=progress
    )
    return fit_dense(layout, curvature.dense, max_memory=max_memory, column_batch=column_batch)


def _stream_start(source) -> int:
    """The global index of this process's first example, after checking that the processes' streams fit together.

    Every process must read the same number of examples in batches of the
    same size (each pass is a sequence of collectives) and, where the sources
    say where their examples sit (``offset``), disjoint ranges. Sources that
    do not (every offset 0: lists, iterables) are taken to hold consecutive
    parts in process order. The layouts are exchanged through
    :func:`jaxinf.scale.distributed.exchange`, so every process raises the
    same error.
    """
    mine = f"{source.num_examples},{source.batch_size},{getattr(source, 'offset', 0)}"
    layouts = [tuple(int(v) for v in text.split(",")) for text in exchange(mine, step="stream layout")]
    sizes = [(n, b) for n, b, _ in layouts]
    if any(size != sizes[0] for size in sizes):
        raise ValueError(
            "Stream layout check: every process must stream the same number of examples in batches of the same size; "
            "got (examples, "
            f"batch size) per process {[list(size) for size in sizes]}. Give each process an equal shard (e.g. trim "
            "the data to a multiple of processes × batch size before ArraySource(...).shard())."
        )
    n = sizes[0][0]
    offsets = [offset for _, _, offset in layouts]
    if not any(offsets):
        return jax.process_index() * n
    ranges = sorted((offset, pid) for pid, offset in enumerate(offsets))
    for (lo, p), (hi, q) in zip(ranges, ranges[1:]):
        if hi < lo + n:
            raise ValueError(
                f"Stream layout check: the processes' training sources overlap: process {p} streams examples "
                f"[{lo}, {lo + n}) and process {q} examples [{hi}, {hi + n}) (their sources' offsets). Give each "
                "process its own part, e.g. "
                "ArraySource(data, batch_size).shard() on every process."
            )
    return offsets[jax.process_index()]
