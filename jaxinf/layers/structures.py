"""The pieces of the report: a layer (:class:`Layer`), each use of its weight (:class:`Site`), the canonical
``(d_in, d_out)`` matrix view of a weight (:class:`Canon`) and a leaf outside every layer (:class:`Fallback`).

The matching step builds :class:`Canon` and :class:`Site` candidates, the grouping step assembles them into
layers; :class:`Site` also maps recorded layer inputs and output gradients to matrices.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Canon:
    """How a weight leaf maps to its canonical ``(d_in, d_out)`` matrix.

    Either a permutation of the leaf's axes followed by a reshape (``perm``),
    or, for layouts that no axis permutation gives, a gather with the flat
    leaf index of every matrix entry (``index``). A weight stacked along the
    steps of a ``lax.scan`` over layers (``stack = L > 0``) maps to ``L``
    matrices, ``(L, d_in, d_out)``.
    """

    shape: tuple
    d_in: int
    d_out: int
    perm: tuple | None
    index: Any  # np.ndarray ([L,] d_in, d_out) or None
    stack: int = 0  # L: steps of the scan that slices the weight (0: not stacked)

    @property
    def matrix_shape(self) -> tuple:
        return ((self.stack,) if self.stack else ()) + (self.d_in, self.d_out)

    def to_matrix(self, leaf):
        if self.perm is not None:
            return jnp.reshape(jnp.transpose(leaf, self.perm), self.matrix_shape)
        return jnp.reshape(leaf, (-1,))[jnp.asarray(self.index)]

    def from_matrix(self, m):
        if self.perm is not None:
            shaped = jnp.reshape(m, tuple(self.shape[p] for p in self.perm))
            return jnp.transpose(shaped, np.argsort(self.perm))
        flat = jnp.zeros((math.prod(self.shape),), m.dtype).at[jnp.asarray(self.index).ravel()].set(m.ravel())
        return jnp.reshape(flat, self.shape)

    def same_as(self, other: Canon) -> bool:
        return self.matrix_shape == other.matrix_shape and np.array_equal(self.index_array(), other.index_array())

    def index_array(self) -> np.ndarray:
        if self.index is not None:
            return np.asarray(self.index)
        idx = np.arange(math.prod(self.shape)).reshape(self.shape)
        return np.transpose(idx, self.perm).reshape(self.matrix_shape)


def _canon_from_index(shape, index: np.ndarray) -> Canon | None:
    """A :class:`Canon` from a ``([L,] d_in, d_out)`` array of flat leaf indices, or ``None`` if not a permutation."""
    size = math.prod(shape)
    if index.size != size or not np.array_equal(np.sort(index.ravel()), np.arange(size)):
        return None
    d_in, d_out = index.shape[-2:]
    stack = index.shape[0] if index.ndim == 3 else 0
    base = np.arange(size).reshape(shape)
    if len(shape) <= 5:
        for perm in itertools.permutations(range(len(shape))):
            if np.array_equal(np.transpose(base, perm).reshape(index.shape), index):
                return Canon(tuple(shape), d_in, d_out, tuple(perm), None, stack)
    return Canon(tuple(shape), d_in, d_out, None, index, stack)


@dataclasses.dataclass(frozen=True, eq=False)
class Site:
    """One use of a layer's weight in the traced graph (a layer may have several)."""

    sid: int
    node_uid: int
    kind: str  # "dense" | "conv" | "embedding" | "tag"
    weight: int
    x_pos: int
    w_pos: int | None
    w_chain: tuple
    x_shape: tuple
    out_shape: tuple
    out_dtype: Any
    stack: tuple  # lengths of the enclosing lax.scan loops, outermost first
    canon: Canon
    x_perm: tuple = ()  # dense: x axes -> (free..., contracted...)
    out_perm: tuple = ()  # dense: output axes -> (x free..., w free...)
    conv: dict | None = None
    bias: tuple | None = None  # (leaf, chain, add node uid, operand position, row permutation)
    heads: int = 0  # dense: entries of the dot_general batch (head) axes, each head a location; 0: none
    embed: str | None = None  # embedding: "clip" or "fill", how the gather treats an id out of range
    sliced: int | None = None  # stacked weight: the index in ``stack`` of the scan whose steps slice it

    @property
    def locations(self) -> int:
        """Locations over all steps (of a stacked weight: ``L`` times those of one step)."""
        return math.prod(self.stack) * (self._locations_unstacked())

    def _locations_unstacked(self) -> int:
        return math.prod(self.out_shape) // self.canon.d_out

    def inputs_matrix(self, x):
        """Layer input(s) recorded at this site -> ``(locations, d_in)``; stacked: ``(L, locations per step, d_in)``."""
        return self._per_step(self._canon_x, x, self.canon.d_in)

    def outputs_matrix(self, g):
        """Output gradient(s) at this site -> ``(locations, d_out)``; stacked: ``(L, locations per step, d_out)``."""
        return self._per_step(self._canon_out, g, self.canon.d_out)

    def input_ids(self, x):
        """Embedding: the row read at each location, ``(locations,)`` (stacked ``(L, locations per step)``).

        An id out of range reads the clamped row (gather mode "clip") or none (mode "fill": ``d_in`` here).
        """
        return self._per_step(self._ids, x, 1)[..., 0]

    def _ids(self, x):
        ids = jnp.reshape(x, (-1,))
        ids = jnp.clip(ids, 0, self.canon.d_in - 1) if self.embed == "clip" else ids
        return jnp.where((ids >= 0) & (ids < self.canon.d_in), ids, self.canon.d_in)[:, None]

    def _per_step(self, fn, value, width):
        for _ in self.stack:
            fn = jax.vmap(fn)
        out = fn(value)  # (*stack, locations, width)
        if self.sliced is None:
            return jnp.reshape(out, (-1, width))
        out = jnp.moveaxis(out, self.sliced, 0)
        return jnp.reshape(out, (out.shape[0], -1, width))

    def _canon_x(self, x):
        if self.kind == "embedding":  # one-hot ids; out of range: clamped ("clip") or a zero row ("fill")
            ids = jnp.reshape(x, (-1,))
            ids = jnp.clip(ids, 0, self.canon.d_in - 1) if self.embed == "clip" else ids
            return jax.nn.one_hot(ids, self.canon.d_in, dtype=jnp.float32 if self.out_dtype is None else self.out_dtype)
        if self.heads:  # (heads, locations, C) -> per (location, head): e_head ⊗ x, zero outside the head's rows
            xh = jnp.reshape(jnp.transpose(x, self.x_perm), (self.heads, -1, self.canon.d_in // self.heads))
            spread = jnp.einsum("hfc,hk->fhkc", xh, jnp.eye(self.heads, dtype=xh.dtype))
            return jnp.reshape(spread, (-1, self.canon.d_in))
        if self.kind != "conv":
            return jnp.reshape(jnp.transpose(x, self.x_perm), (-1, self.canon.d_in))
        c = self.conv
        xn = jnp.transpose(x, c["lhs_spec"])
        patches = jax.lax.conv_general_dilated_patches(
            xn,
            c["filter_shape"],
            c["window_strides"],
            c["padding"],
            lhs_dilation=c["lhs_dilation"],
            rhs_dilation=c["rhs_dilation"],
            precision=jax.lax.Precision.HIGHEST,
        )
        return jnp.reshape(jnp.moveaxis(patches, 1, -1), (-1, self.canon.d_in))

    def _canon_out(self, g, xp=jnp):
        """``g`` (the layer output's shape) as ``(rows, d_out)``; ``xp=np`` for a host array (nothing compiled)."""
        if self.heads:  # (heads, locations, d_out) -> rows ordered (location, head) as in _canon_x
            gh = xp.reshape(xp.transpose(g, self.out_perm), (self.heads, -1, self.canon.d_out))
            return xp.reshape(xp.swapaxes(gh, 0, 1), (-1, self.canon.d_out))
        if self.kind != "conv":
            return xp.reshape(xp.transpose(g, self.out_perm), (-1, self.canon.d_out))
        gn = xp.transpose(g, self.conv["out_spec"])
        return xp.reshape(xp.moveaxis(gn, 1, -1), (-1, self.canon.d_out))


@dataclasses.dataclass(frozen=True, eq=False)
class Layer:
    """A tagged layer: one weight leaf (and optionally a bias leaf) and its sites.

    A weight stacked along the steps of a ``lax.scan`` over layers (``steps = L > 0``: passed to the scan as a
    scanned input, one slice per step) is ``L`` layers with the same structure: its matrices, and all the
    K-FAC quantities built on them, carry a leading axis of ``L`` (one set of Kronecker factors per step).
    """

    name: str
    kind: str  # "dense" | "conv" | "embedding"
    weight: int
    bias: int | None
    sites: tuple
    canon: Canon
    bias_perm: Any  # np.ndarray ([L,] d_out) of flat bias indices, or None
    source: str  # "auto" | "explicit"
    other_uses: tuple = ()  # descriptions of uses of weight/bias outside the layer
    scan_inputs: tuple = ()  # stacked: (scan node uid, operand position, leaf, chain) feeding the weight/bias slices

    @property
    def d_in(self) -> int:
        return self.canon.d_in

    @property
    def d_out(self) -> int:
        return self.canon.d_out

    @property
    def rows(self) -> int:
        """Rows of the canonical matrix: ``d_in``, plus one for the bias."""
        return self.canon.d_in + (self.bias is not None)

    @property
    def steps(self) -> int:
        """``L`` for a weight stacked along a ``lax.scan`` over layers (one set of factors per step), else 0."""
        return self.canon.stack

    @property
    def one_hot_inputs(self) -> bool:
        """An embedding without bias: one-hot inputs, so ``A`` is diagonal (the id counts) and kept as a vector."""
        return self.kind == "embedding" and self.bias is None

    @property
    def locations(self) -> int:
        """Locations over all sites (and, stacked, all steps)."""
        return sum(s.locations for s in self.sites)

    def to_matrix(self, leaves):
        """Params-ordered leaves -> the canonical ``([L,] rows, d_out)`` matrix ``[W; bᵀ]``."""
        m = self.canon.to_matrix(leaves[self.weight])
        if self.bias is None:
            return m
        return jnp.concatenate([m, self.bias_row(leaves[self.bias])[..., None, :].astype(m.dtype)], axis=-2)

    def bias_row(self, b):
        """The bias leaf as a ``([L,] d_out)`` row (one per step when stacked)."""
        flat = jnp.reshape(b, (-1,))
        if self.bias_perm is not None:
            return flat[jnp.asarray(self.bias_perm)]
        return jnp.reshape(flat, self.canon.matrix_shape[:-2] + (self.d_out,))

    def from_matrix(self, m, bias_shape=None):
        """Inverse of :meth:`to_matrix`: ``(weight leaf, bias leaf or None)``."""
        w = self.canon.from_matrix(m[..., : self.canon.d_in, :])
        if self.bias is None:
            return w, None
        row = m[..., self.canon.d_in, :]
        if self.bias_perm is not None:
            flat = jnp.zeros((row.size,), row.dtype).at[jnp.asarray(self.bias_perm).ravel()].set(row.ravel())
            return w, jnp.reshape(flat, bias_shape)
        return w, jnp.reshape(row, bias_shape)


@dataclasses.dataclass(frozen=True)
class Fallback:
    """A parameter leaf not in any layer: it gets a diagonal or an exact (small) block."""

    leaf: int
    method: str  # "diagonal" | "block"
    reason: str
