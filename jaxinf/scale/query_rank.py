"""``query_rank``: the tiled calculator's low-rank compression of each test block's factors.

Each block's factors are compressed layer by layer to rank ``r``
(:func:`jaxinf.scoring.query_compression.compress_layers`: truncated SVD of
each tagged layer's ``(rows, d_out)`` factor matrix, leaves outside every
layer kept exactly) before they are contracted with the training batches.
Every block's :class:`~jaxinf.scoring.query_compression.CompressionReport`
(relative Frobenius error per layer and factor) is appended to
``calc.compression_reports``; the first block's report also carries the change
in its scores on the first training batch (the first tile), scored both ways.
The rank is part of the store's fingerprint: a store is resumed only with
the same ``query_rank``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinf.core.data import batch_size as leading_size
from jaxinf.layers.statistics import loss_tracer
from jaxinf.scale.sharding import global_batch, pad_batch
from jaxinf.scale.tiles import local_columns
from jaxinf.scoring.query_compression import CompressionReport, check_rank, compress_layers

__all__ = ["check_query_rank", "compress_block"]

_compress = jax.jit(compress_layers, static_argnums=(0, 2))


def check_query_rank(calc, train_first) -> int | None:
    """The calculator's ``query_rank`` for the fingerprint; ``ValueError`` if there is nothing to compress.

    Traces the loss's layers once (kept in ``calc._compiled``).
    """
    if calc.query_rank is None:
        return None
    rank = check_rank(calc.query_rank)
    if "query_tracer" not in calc._compiled:
        calc._compiled["query_tracer"] = loss_tracer(calc.model.loss_fn, calc.model.params, train_first)
    if not calc._compiled["query_tracer"].tags.layers:
        raise ValueError(
            "query_rank compresses the factors of tagged layers, and this loss has none (jaxinf.find_layers shows "
            "its report); pass query_rank=None."
        )
    return rank


def compress_block(calc, job, factors, rows: int):
    """The block's factors compressed to ``calc.query_rank``, replicated on the mesh; records the report."""
    tracer = calc._compiled["query_tracer"]
    compressed, errors = _compress(tracer, factors, calc.query_rank)
    compressed = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(calc.mesh, P())), compressed)
    errors = {k: jax.device_get(v)[:rows] for k, v in errors.items()}
    report = CompressionReport(calc.query_rank, errors, max((float(e.max()) for e in errors.values()), default=0.0))
    if not calc.compression_reports:  # the first tile, scored with the exact and the compressed factors
        first = job.train_source.first()
        placed = global_batch(pad_batch(first, job.train_pad), calc.mesh)
        real = leading_size(first)
        exact = local_columns(job.s_compiled(calc.params, factors, placed), rows, real)
        approx = local_columns(job.s_compiled(calc.params, compressed, placed), rows, real)
        norm, diff = float(jnp.linalg.norm(exact)), approx - exact
        change = float(jnp.linalg.norm(diff)) / norm if norm > 0 else float(jnp.linalg.norm(diff))
        report = report._replace(score_change=change, max_score_change=float(abs(diff).max()))
    calc.compression_reports.append(report)
    return compressed
