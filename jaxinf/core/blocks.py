"""Parameter blocks and per-block damping.

A block-diagonal curvature keeps only the diagonal blocks ``C_bb`` of the
curvature and may damp each block by its own ``λ_b``:
``(C + Λ) ≈ diag_b(C_bb + λ_b I)``. This module turns the user's ``blocks=``
argument into one block label per parameter leaf, and ``damping=`` (a scalar
or a ``{block: λ}`` mapping) into one validated damping scalar per leaf.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.tree import is_tracer

PyTree = Any


def _layer_label(path) -> str:
    keys = list(path)
    while keys and isinstance(keys[-1], jax.tree_util.GetAttrKey):
        keys.pop()  # e.g. the ``.value`` of an ``nnx.Param``
    return jax.tree_util.keystr(tuple(keys[:-1])) or "<root>"


def resolve_blocks(params: PyTree, blocks: Any) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Label each parameter leaf with a block.

    Args:
      params: the parameter pytree.
      blocks: ``None`` or ``"full"`` (one block), ``"layer"`` (leaves sharing a
        parent, e.g. a layer's kernel and bias), ``"parameter"`` (each leaf),
        a pytree of string labels with the structure of ``params``, or a
        callable ``params -> labels``.

    Returns:
      ``(block_ids, block_names)``: the block index of each leaf in flatten
      order, and the name of each block.
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    if blocks is None or blocks == "full":
        labels = ["all"] * len(flat)
    elif blocks == "layer":
        labels = [_layer_label(p) for p, _ in flat]
    elif blocks == "parameter":
        labels = [jax.tree_util.keystr(p) for p, _ in flat]
    elif isinstance(blocks, str):
        raise ValueError(
            f"Unknown blocks={blocks!r}. Use 'full', 'layer', 'parameter', a pytree of labels or a callable."
        )
    else:
        tree = blocks(params) if callable(blocks) else blocks
        labels_leaves, treedef = jax.tree.flatten(tree)
        if treedef != jax.tree.structure(params):
            raise ValueError(
                "blocks must be a pytree of labels with the structure of the params "
                f"(expected {jax.tree.structure(params)}, got {treedef})."
            )
        labels = [str(x) for x in labels_leaves]
    names = tuple(dict.fromkeys(labels))
    return tuple(names.index(x) for x in labels), names


def _check_damping_type(value: Any, block: str) -> None:
    """``ValueError`` unless ``value`` is a real number or a real array (not a string, ``None``, bool or complex)."""
    dtype = getattr(value, "dtype", None)
    if dtype is None and isinstance(value, (int, float)) and not isinstance(value, bool):
        return
    if dtype is not None and (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        return
    raise ValueError(
        f"damping for block {block!r} must be a real number >= 0 (e.g. damping=1e-3), "
        f"got {type(value).__name__} {value!r}."
    )


def resolve_damping(damping: Any, block_ids: tuple[int, ...], block_names: tuple[str, ...]) -> tuple:
    """One damping scalar per parameter leaf, from a scalar or a ``{block: λ}`` mapping."""
    if isinstance(damping, str) and damping == "auto":
        raise ValueError(
            "damping='auto' is resolved by InfluenceModel.fit and jaxinf.scale.fit (in-memory data, one process); "
            "here give damping a number, e.g. jaxinf.core.damping.auto_damping(operator) of an operator built on "
            "(a sample of) the training data."
        )
    if isinstance(damping, Mapping):
        unknown = sorted(set(map(str, damping)) - set(block_names))
        missing = [b for b in block_names if b not in damping]
        if unknown or missing:
            raise ValueError(
                f"Per-block damping must give one value for each block {list(block_names)}; "
                f"unknown: {unknown}, missing: {missing}."
            )
        per_block = [damping[name] for name in block_names]
    else:
        per_block = [damping] * len(block_names)
    values = []
    for name, value in zip(block_names, per_block):
        _check_damping_type(value, name)
        # device_put: the same dtype and weak type as jnp.asarray for a float, without compiling a program for it
        arr = jax.device_put(value) if isinstance(value, (float, np.floating)) else jnp.asarray(value)
        if arr.ndim != 0:
            raise ValueError(f"damping for block {name!r} must be a scalar, got shape {arr.shape}.")
        if not jnp.issubdtype(arr.dtype, jnp.inexact):
            arr = arr.astype(jnp.float32 if not jax.config.jax_enable_x64 else jnp.float64)
        if not is_tracer(arr):
            if not np.isfinite(float(arr)) or float(arr) < 0:
                raise ValueError(f"damping for block {name!r} must be finite and >= 0, got {float(arr)}.")
        values.append(arr)
    return tuple(values[i] for i in block_ids)
