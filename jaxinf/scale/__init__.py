"""Scale-out: streamed collections, resumable on-disk results, many devices and hosts.

* :mod:`~jaxinf.scale.sources` — datasets read batch by batch (arrays, memmaps, iterators).
* :mod:`~jaxinf.scale.calculator` — tiled test × train influence written to zarr, resumable.
* :mod:`~jaxinf.scale.storage` — save/load fitted solver states (fit and score in separate jobs).
* :mod:`~jaxinf.scale.sharding` — data parallelism over a ``jax.sharding.Mesh``.
* :mod:`~jaxinf.scale.distributed` — multi-process runs with ``jax.distributed``.
* :mod:`~jaxinf.scale.streaming` — curvature products and exact dense fits from a stream.
* :mod:`~jaxinf.scale.stream_fit` — fit direct, Nyström, Arnoldi, K-FAC and EK-FAC from a stream.
* :mod:`~jaxinf.scale.stream_cg` — pre-conditioned CG with the training data streamed (one pass per iteration).
"""

from jaxinf.scale.calculator import InfluenceCalculator, MemoryPlan, compute_influences, open_influences
from jaxinf.scale.distributed import initialize, shutdown
from jaxinf.scale.sharding import (
    data_mesh,
    fit,
    global_batch,
    host_view,
    pad_batch,
    replicate,
    shard_batch,
    shard_operator,
)
from jaxinf.scale.sources import ArraySource, IterableSource, ListSource, as_source, process_range
from jaxinf.scale.storage import load_state, read_header, save_state, state_skeleton
from jaxinf.scale.stream_cg import StreamCGResult, cg_from_stream, influences_from_stream
from jaxinf.scale.stream_fit import BatchStream, fit_from_stream
from jaxinf.scale.streaming import StreamingCurvature, direct_from_stream

__all__ = [
    "ArraySource",
    "BatchStream",
    "InfluenceCalculator",
    "IterableSource",
    "ListSource",
    "MemoryPlan",
    "StreamCGResult",
    "as_source",
    "cg_from_stream",
    "compute_influences",
    "data_mesh",
    "fit",
    "fit_from_stream",
    "global_batch",
    "host_view",
    "influences_from_stream",
    "initialize",
    "load_state",
    "open_influences",
    "pad_batch",
    "process_range",
    "read_header",
    "replicate",
    "save_state",
    "shard_batch",
    "shard_operator",
    "shutdown",
    "state_skeleton",
    "StreamingCurvature",
    "direct_from_stream",
]
