"""Digests of what determines a result: pytrees of arrays, a loss function's program, configurations.

A store or a saved state records these so that a later run can tell, and
say, what differs (other params, another loss, other data) instead of mixing
two computations.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = ["config_digest", "hash_tree", "loss_digest", "tree_digest"]


def hash_tree(tree: PyTree, h) -> None:
    """Feed every leaf of ``tree`` (key path, shape, dtype and bytes) to the hash object ``h``.

    PRNG keys contribute their key data; arrays sharded over several processes
    (not addressable here) contribute their shape and dtype only.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        h.update(jax.tree_util.keystr(path).encode())
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if isinstance(leaf, jax.Array) and not (leaf.is_fully_addressable or leaf.is_fully_replicated):
            h.update(repr((leaf.shape, str(leaf.dtype))).encode())
            continue
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:  # replicated over processes: local copy
            leaf = leaf.addressable_data(0)
        value = np.asarray(leaf)
        h.update(repr((value.shape, str(value.dtype))).encode())
        h.update(np.ascontiguousarray(value).tobytes())


def tree_digest(tree: PyTree) -> str:
    """SHA-256 (hex) of the key paths, shapes, dtypes and bytes of the leaves of ``tree``.

    Stable across processes and runs: the tree structure enters through the
    leaves' key paths only (a treedef's text can hold object addresses).
    """
    h = hashlib.sha256()
    hash_tree(tree, h)
    return h.hexdigest()


def loss_digest(loss_fn: Callable, params: PyTree, batch: PyTree) -> str:
    """SHA-256 (hex) of the program ``loss_fn(params, batch)`` traces to (its jaxpr, from shapes only).

    Two loss functions with the same jaxpr compute the same numbers; a change
    of the loss (another output loss, a regulariser, a different model) changes
    the digest. Constants closed over by ``loss_fn`` are included by value.
    """
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), (params, batch))
    closed = jax.make_jaxpr(loss_fn)(*shapes)
    h = hashlib.sha256(str(closed.jaxpr).encode())
    hash_tree(list(closed.consts), h)
    return h.hexdigest()


def config_digest(config: Any) -> str:
    """SHA-256 (hex) of a JSON-able configuration (keys sorted)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
