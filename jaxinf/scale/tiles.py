"""Tiling helpers of the calculator: rows of a test source, this process's columns of a score block, placement."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinf.core.data import batch_size as leading_size
from jaxinf.scale.sharding import _place

PyTree = Any

__all__ = ["Tiling", "check_process_source", "local_columns", "on_mesh", "round_up", "shape_key", "slice_rows"]


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
    plan: Any  # jaxinf.scale.plan.MemoryPlan
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

    def rows(self, i: int) -> int:
        """Test rows of block ``i``."""
        return min((i + 1) * self.test_block, self.n_test) - i * self.test_block

    def columns(self, j: int) -> int:
        """Real training columns of step ``j`` over all processes."""
        b, per, n = self.train_batch, self.per, self.n_train
        ends = (min(k * per + (j + 1) * b, (k + 1) * per, n) - (k * per + j * b) for k in range(self.processes))
        return sum(max(0, e) for e in ends)
