"""Tiling helpers of the calculator: rows of a test source, this process's columns of a score block, placement,
and what every tile checks: finite data, the digests of its blocks and the run's fingerprint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinf.core.blocks import resolve_blocks
from jaxinf.core.data import batch_size as leading_size
from jaxinf.core.errors import ConvergenceError
from jaxinf.core.fingerprint import hash_tree, loss_digest
from jaxinf.scale.distributed import agree
from jaxinf.scale.sharding import _place, data_sharding, pad_batch, to_host
from jaxinf.solvers.base import check_solve

PyTree = Any

__all__ = [
    "Tiling",
    "check_process_source",
    "check_test_blocks",
    "digest",
    "local_columns",
    "nonfinite",
    "nonfinite_scores",
    "on_mesh",
    "process_split",
    "round_up",
    "run_fingerprint",
    "shape_key",
    "slice_rows",
    "solve_factors",
    "train_steps",
]


def on_mesh(tree: PyTree, mesh: Mesh) -> PyTree:
    """``tree`` replicated on ``mesh`` (arrays already placed on exactly its devices are kept)."""
    devices = set(mesh.devices.flat)

    def one(x):
        if isinstance(x, jax.Array) and x.sharding.device_set == devices:
            return x
        if isinstance(x, (jax.Array, np.ndarray, np.generic)):
            return _place(x, NamedSharding(mesh, P()))
        return x

    return jax.tree.map(one, tree)


def local_columns(scores: jax.Array, rows: int, real: int) -> np.ndarray:
    """This process's first ``real`` columns (and first ``rows`` rows) of a score block sharded along columns."""
    shards = {}
    for shard in scores.addressable_shards:
        shards.setdefault(shard.index[1].start or 0, shard)  # replicas of one slice: keep one
    block = np.concatenate([np.asarray(shards[s].data)[:rows] for s in sorted(shards)], axis=1)
    return block[:, :real]


def solve_factors(calc, job: Tiling, test_batch: PyTree):
    """``(C + λI)⁻¹ ∇θℓ(test_i)`` for one test block, replicated on the calculator's mesh; checks the solve."""
    real, mesh = leading_size(test_batch), calc.mesh
    placed = jax.tree.map(lambda a: _place(np.asarray(a), data_sharding(mesh)), pad_batch(test_batch, job.test_pad))
    factors, info, finite = job.f_compiled(calc.params, calc.state, placed)
    solver = calc.model.solver
    info = jax.tree.map(lambda x: to_host(x)[:real], info)
    check_solve(solver, info, None, "right-hand sides", strict=calc.model.strict)
    if not to_host(finite)[:real].all():
        raise ConvergenceError(f"{solver.name} returned NaN or inf influence factors. {solver.advice}".strip())
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), factors)


def slice_rows(source, r0: int, r1: int):
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


def process_split(source, processes: int) -> int:
    """Training examples per process (see :func:`jaxinf.scale.process_range`); refuses a source that does not fit.

    Raises:
      ValueError: a single process without the whole training set, a split
        that leaves the last process without examples, or a process's source
        that does not start where its range does.
    """
    n_train, b = source.total_examples, source.batch_size
    if processes == 1 and source.num_examples != n_train:
        raise ValueError(
            "A single-process run needs the whole training set; this source holds examples "
            f"[{source.offset}, {source.offset + source.num_examples}) of {n_train}."
        )
    per = math.ceil(n_train / (processes * b)) * b
    if (processes - 1) * per >= n_train:  # the same verdict on every process
        raise ValueError(
            f"{n_train} training points in batches of {b} leave the last of {processes} processes without "
            "examples; use a smaller batch size or fewer processes."
        )
    if processes > 1:
        check_process_source(source, per, b)
    return per


def check_process_source(source, per: int, b: int) -> None:
    """``ValueError`` unless a process's training source starts where :func:`jaxinf.scale.process_range` says."""
    expect_start = (source.offset // per) * per if per else 0
    if source.offset % b or source.offset != expect_start:
        raise ValueError(
            f"In a multi-process run each process's training source must cover the range given by "
            f"jaxinf.scale.process_range (start a multiple of {per}); this one starts at {source.offset}. "
            "Use ArraySource(...).shard()."
        )


def round_up(n: int, k: int) -> int:
    """The smallest multiple of ``k`` that is ``>= n``."""
    return -(-n // k) * k


def shape_key(tree) -> tuple:
    """A hashable key of the structure, shapes and dtypes of ``tree``."""
    return tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(tree)) + (jax.tree.structure(tree),)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """The tiling of one calculator run: sources, plan, compiled kernels, block and step counts."""

    test_block: int
    test_source: Any
    train_source: Any
    plan: Any  # jaxinf.scale.plan.MemoryPlan (None while only the fingerprint is needed)
    test_pad: int
    train_pad: int
    test_like: Any
    train_like: Any
    leaf: int | None
    x_shape: tuple
    method: str
    f_compiled: Any
    s_compiled: Any
    processes: int
    per: int  # training examples per process

    @property
    def n_test(self) -> int:
        return self.test_source.num_examples

    @property
    def n_train(self) -> int:
        return self.train_source.total_examples

    @property
    def train_batch(self) -> int:
        return self.train_source.batch_size

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.n_test / self.test_block)

    @property
    def steps(self) -> int:
        return self.per // self.train_batch

    @property
    def shape(self) -> tuple:
        """The shape of the influence array: ``(n_test, n_train, *x_shape)``."""
        return (self.n_test, self.n_train, *self.x_shape)

    @property
    def chunks(self) -> tuple:
        """Its chunks: ``[test block, training batch]``."""
        return (min(self.test_block, self.n_test), min(self.train_batch, self.n_train), *self.x_shape)

    @property
    def grid(self) -> tuple[int, int, int]:
        """The cells of the done-mask: ``(test blocks, training steps, processes)``."""
        return self.n_blocks, self.steps, self.processes

    def rows(self, i: int) -> int:
        """Test rows of block ``i``."""
        return min((i + 1) * self.test_block, self.n_test) - i * self.test_block

    def row_range(self, i: int) -> tuple[int, int]:
        """Test rows ``[r0, r1)`` of block ``i``."""
        return i * self.test_block, i * self.test_block + self.rows(i)

    def columns(self, j: int) -> int:
        """Real training columns of step ``j`` over all processes."""
        b, per, n = self.train_batch, self.per, self.n_train
        ends = (min(k * per + (j + 1) * b, (k + 1) * per, n) - (k * per + j * b) for k in range(self.processes))
        return sum(max(0, e) for e in ends)


# ------------------------------------------------------------------ checks
def digest(tree: PyTree) -> str:
    """SHA-256 (hex) of the key paths, shapes, dtypes and bytes of ``tree``'s leaves.

    Unlike the printed tree structure (which can hold the addresses of
    functions in a solver state's static data), this is the same in every
    process and every run for the same values.
    """
    h = hashlib.sha256()
    hash_tree(tree, h)
    return h.hexdigest()


def nonfinite(batch: PyTree, what: str, first: int, unit: str) -> str | None:
    """The message naming the first example of ``batch`` that holds NaN or inf, or ``None`` when all are finite.

    ``what`` names the batch (``"training batch 3"``), ``first`` is the
    global index of its first example and ``unit`` names one example
    (``"training example"``).
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        a = np.asarray(leaf)
        if a.dtype.kind not in "fc" or a.size == 0:
            continue
        ok = np.isfinite(a).reshape(a.shape[0], -1).all(axis=1) if a.ndim else np.isfinite(a).reshape(1)
        if not ok.all():
            k = int(np.argmin(ok))
            return (
                f"{what} holds NaN or inf: {unit} {first + k} (leaf {jax.tree_util.keystr(path) or 'the batch'}), "
                f"{int((~ok).sum())} example(s) in all. Influence scores need finite data (NaN marks a cell not "
                "computed yet in the store); clean the data."
            )
    return None


def check_test_blocks(job: Tiling, recorded: dict) -> list[str]:
    """The digest of every test block, checked finite and equal to the store's record (all processes agree)."""
    digests, error = [], None
    for i in range(job.n_blocks):
        r0, r1 = job.row_range(i)
        rows = slice_rows(job.test_source, r0, r1)
        digests.append(digest(rows))
        error = nonfinite(rows, f"test block {i}", r0, "test point")
        if error is None and recorded.get(i, digests[i]) != digests[i]:
            error = (
                f"test block {i} (test points {r0}..{r1 - 1}) differs from the test points this store was "
                "computed with; a resumed run must pass the same test data. Pass overwrite=True or choose "
                "another path."
            )
        if error is not None:
            break
    agree(error, step="test data")
    return digests


def train_steps(job: Tiling, start: int, seen: dict):
    """``(j, batch, digest)`` for this process's training steps from ``start``; ``batch`` is ``None`` past its
    data. Every batch is checked finite and equal to the batch of step ``j`` on earlier passes or in the store,
    and every process states its verdict before anyone goes on (:func:`jaxinf.scale.distributed.agree`)."""
    source = job.train_source
    batches = source.batches(min(start, source.num_batches))
    for j in range(start, job.steps):
        batch, error, found = None, None, "-"
        try:
            batch = next(batches, None) if j < source.num_batches else None
        except ValueError as err:  # a source that breaks its own promise (sizes): stop every process
            if jax.process_count() == 1:
                raise
            error = f"training step {j}: {err}"
        if batch is not None:
            lo, hi = source.batch_bounds(j)
            found = digest(batch)
            error = nonfinite(batch, f"training batch {j} (examples {lo}..{hi - 1})", lo, "training example")
            if error is None and seen.get(j, found) != found:
                error = (
                    f"training batch {j} (examples {lo}..{hi - 1}) differs from the batch of step {j} read on an "
                    "earlier pass or recorded in this store. The training data are read once per test block and "
                    "must come in the same batches in the same order every time (a shuffling loader must use "
                    "a fixed order), and a resumed run must pass the same data; else pass overwrite=True."
                )
        agree(error, step="training batch")
        seen[j] = found
        yield j, batch, found
    error = None
    try:
        next(batches, None)  # past the last batch: the source checks its end (an IterableSource counts examples)
    except ValueError as err:
        if jax.process_count() == 1:
            raise
        error = str(err)
    agree(error, step="training data end")


def nonfinite_scores(scores: np.ndarray, i: int, j: int, r0: int, c0: int) -> str | None:
    bad = ~np.isfinite(scores)
    if not bad.any():
        return None
    r, c = (int(k[0]) for k in np.nonzero(bad)[:2])
    return (
        f"The scores of test block {i} × training step {j} hold NaN or inf (test point {r0 + r}, training example "
        f"{c0 + c}, {int(bad.sum())} values in all) although the data are finite: the loss or its gradient "
        "overflows at these parameters. Nothing was written for this cell."
    )


def run_fingerprint(calc, job: Tiling, dtype) -> dict:
    """Everything that determines the numbers of a calculator run, as JSON values (what a store records).

    ``calc`` is the :class:`~jaxinf.scale.InfluenceCalculator`: its model
    (params, loss, damping, curvature, blocks, solver configuration), fitted
    state, measurement (``None`` for the loss), query rank, mode and block sizes; ``job`` gives the data's
    sizes, shapes and dtypes. The contents of every test block and training batch are recorded
    per cell in the store's done-marks.
    """
    model = calc.model
    first, test_first = job.train_source.first(), job.test_source.first()
    ids, names = resolve_blocks(model.params, model.blocks)
    solver = model.solver
    if not isinstance(solver.config, dict):
        warnings.warn(
            f"Solver {solver.name!r} records no configuration (build it with a factory decorated with "
            "jaxinf.solvers.base.records_config), so a resumed influence store cannot check its options.",
            RuntimeWarning,
            stacklevel=4,
        )
    fingerprint = {
        "shape": list(job.shape),
        "chunks": list(job.chunks),
        "dtype": str(dtype),
        "grid": list(job.grid),
        "mode": calc.mode,
        "method": job.method,
        "input_leaf": job.leaf,
        "test_block": calc.test_block,
        "train_batch": job.train_batch,
        "processes": job.processes,
        "devices": calc.devices,
        "params": digest(model.params),
        "state": digest(calc.state),
        "damping": _plain(model.damping),
        "curvature": model.curvature,
        "blocks": {"ids": list(ids), "names": list(names)},
        "solver": solver.config if isinstance(solver.config, dict) else {"name": solver.name},
        "loss": loss_digest(model.loss_fn, model.params, first),
        "measurement": None if calc.measurement is None else loss_digest(calc.measurement, model.params, test_first),
        "query_rank": getattr(calc, "query_rank", None),
        "test_data": _data_spec(test_first, job.n_test),
        "train_data": _data_spec(first, job.n_train),
    }
    return json.loads(json.dumps(fingerprint, default=str))  # as the store will read it back (tuples -> lists)


def _data_spec(batch: PyTree, examples: int) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    return {
        "examples": int(examples),
        "leaves": [[jax.tree_util.keystr(p), list(np.shape(x)[1:]), str(np.asarray(x).dtype)] for p, x in leaves],
    }


def _plain(value):
    """``value`` (a damping: scalar, array or ``{block: λ}``) as JSON values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    arr = np.asarray(value)
    return arr.tolist() if arr.dtype.kind in "biuf" else repr(value)
