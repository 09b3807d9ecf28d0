"""Automatic layer tagging: find the dense and convolution layers of any JAX function.

K-FAC needs, for every layer ``s = W a (+ b)``, the layer inputs ``a`` and the
gradients ``g = ∂f/∂s`` with respect to its outputs. :func:`find_layers`
gets them **without changing the user's model**:

1. Trace ``fn(params, batch)`` (for one example) to a jaxpr, with the calls
   made by ``jax.jit`` and ``jax.checkpoint`` inlined, and loop bodies of
   ``lax.scan`` kept as sub-graphs.
2. Follow every parameter leaf through layout-only operations (transpose,
   reshape, dtype conversion, broadcast) to the operations that use it. A
   ``dot_general`` with one parameter operand is a dense layer, whatever the
   weight layout (``x @ W``, ``x @ W.T``, ``einsum``-style contractions over
   several axes); a ``conv_general_dilated`` with a parameter kernel is a
   convolution. An ``add`` of a parameter to such an output is the layer's
   bias (also Flax's reshaped bias), checked by pushing index probes through
   the broadcast. Layers inside ``lax.scan`` and weights used several times
   (shared layers) are *repeated layers*: their uses add locations, as the
   spatial positions of a convolution do (Grosse & Martens 2016).
3. Re-evaluate the traced graph with a zero perturbation ``δ`` added at each
   layer output and the layer inputs recorded. ``∂f/∂δ`` is the output
   gradient ``g``; the recorded inputs are ``a``. The per-example weight
   gradient is ``Σ_locations a gᵀ``.

Explicit tags (:func:`tag_dense`) take precedence over automatic matching and
cover layers the matcher cannot see (custom kernels, ``custom_vjp``
products). Every parameter leaf ends up either in a layer or in a *fallback*
(diagonal or exact small block) with the reason; :class:`LayerTags` prints
the table. A tagged leaf that is also used outside its layers (e.g. an L2
penalty) keeps that use's exact per-example gradient (it enters scores and
the eigenvalue correction, not the Kronecker factors) and is flagged in the
report.

References:
  Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature", ICML 2015. Grosse & Martens, "A Kronecker-factored
  approximate Fisher matrix for convolution layers", ICML 2016.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad, batching, mlir

PyTree = Any

# Operations that only move, copy or re-type the entries of their operand.
LAYOUT_PRIMITIVES = frozenset(
    {"transpose", "reshape", "convert_element_type", "copy", "copy_p", "broadcast_in_dim", "squeeze", "expand_dims"}
)
_VALUE_ONLY = frozenset({"convert_element_type", "copy", "copy_p"})
# Calls whose body is inlined when building the graph.
_INLINE = frozenset({"jit", "pjit", "closed_call", "core_call", "call", "remat2", "checkpoint", "remat"})


# ----------------------------------------------------------------------------
# Explicit tags
# ----------------------------------------------------------------------------

dense_tag_p = jex.core.Primitive("jaxinf_dense_tag")


def tag_dense(y, x, w, b=None, *, transposed: bool = False):
    """Mark ``y = x @ w (+ b)`` as a dense layer for K-FAC; returns ``y`` unchanged.

    Use it for custom layers that automatic tagging cannot see (a custom
    kernel, a ``custom_vjp`` product, a weight that goes through a
    non-layout operation). The tag is an identity on ``y`` for every JAX
    transformation; it only tells :func:`find_layers` that ``w`` (and ``b``)
    form one dense layer. All other uses of ``w`` and ``b`` are then taken to
    be part of that layer's computation.

    Args:
      y: the layer output, shape ``(..., d_out)``.
      x: the layer input, shape ``(..., d_in)`` (the same leading axes).
      w: the weight, a parameter leaf of shape ``(d_in, d_out)``, or
        ``(d_out, d_in)`` with ``transposed=True``.
      b: optional bias leaf of shape ``(d_out,)``.
      transposed: whether ``w`` is stored output-major (``y = x @ w.T``).

    Returns:
      ``y``.

    Examples:
      >>> import jax.numpy as jnp, jaxinf
      >>> x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
      >>> jaxinf.tag_dense(x @ w, x, w).shape
      (2, 4)
    """
    y, x, w = jnp.asarray(y), jnp.asarray(x), jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"tag_dense: w must be a 2-D weight, got shape {w.shape}.")
    d_in, d_out = (w.shape[1], w.shape[0]) if transposed else w.shape
    if x.shape[-1:] != (d_in,) or y.shape[-1:] != (d_out,) or x.shape[:-1] != y.shape[:-1]:
        raise ValueError(
            f"tag_dense: shapes do not form a dense layer: y {y.shape}, x {x.shape}, w {w.shape}"
            f"{' (transposed)' if transposed else ''}; expected x (..., {d_in}) and y (..., {d_out})."
        )
    args = [y, x, w]
    if b is not None:
        b = jnp.asarray(b)
        if b.shape != (d_out,):
            raise ValueError(f"tag_dense: b must have shape ({d_out},), got {b.shape}.")
        args.append(b)
    return dense_tag_p.bind(*args, transposed=bool(transposed), has_bias=b is not None)


def _tag_abstract(y, *rest, **params):
    del rest, params
    return y


def _tag_jvp(primals, tangents, **params):
    out = dense_tag_p.bind(*primals, **params)
    return out, ad.instantiate_zeros(tangents[0])


def _tag_batch(args, dims, **params):
    y, x, w, *b = args
    if dims[2] is not None or (b and dims[3] is not None) or dims[0] is None:
        return y, dims[0]  # per-example weights: the tag no longer describes a dense layer
    y = jnp.moveaxis(y, dims[0], 0)
    x = jnp.broadcast_to(x, (y.shape[0], *x.shape)) if dims[1] is None else jnp.moveaxis(x, dims[1], 0)
    return dense_tag_p.bind(y, x, w, *b, **params), 0


dense_tag_p.def_impl(lambda y, *rest, **params: y)
dense_tag_p.def_abstract_eval(_tag_abstract)
ad.primitive_jvps[dense_tag_p] = _tag_jvp
batching.primitive_batchers[dense_tag_p] = _tag_batch
mlir.register_lowering(dense_tag_p, mlir.lower_fun(lambda y, *rest, **params: y, multiple_results=False))


# ----------------------------------------------------------------------------
# A flat graph of the traced function (calls inlined, scan bodies kept)
# ----------------------------------------------------------------------------


class _Lit:
    __slots__ = ("val",)

    def __init__(self, val):
        self.val = val


class _Node:
    __slots__ = ("uid", "prim", "params", "inputs", "outputs", "ctx", "body")

    def __init__(self, uid, prim, params, inputs, outputs, ctx, body):
        self.uid, self.prim, self.params = uid, prim, params
        self.inputs, self.outputs, self.ctx, self.body = inputs, outputs, ctx, body

    @property
    def name(self) -> str:
        return self.prim.name


class _Graph:
    def __init__(self):
        self.inputs: list[int] = []
        self.outputs: list = []
        self.nodes: list[_Node] = []
        self.consts: dict[int, Any] = {}


class _Builder:
    def __init__(self):
        self._ids = itertools.count()
        self.avals: dict[int, Any] = {}

    def var(self, aval) -> int:
        i = next(self._ids)
        self.avals[i] = aval
        return i

    def graph(self, jaxpr, consts) -> _Graph:
        g = _Graph()
        env: dict = {}
        for v, c in zip(jaxpr.constvars, consts):
            env[v] = self.var(v.aval)
            g.consts[env[v]] = c
        for v in jaxpr.invars:
            env[v] = self.var(v.aval)
            g.inputs.append(env[v])
        self._emit(g, jaxpr, env)
        g.outputs = [self._read(env, v) for v in jaxpr.outvars]
        return g

    @staticmethod
    def _read(env, v):
        return _Lit(v.val) if isinstance(v, jex.core.Literal) else env[v]

    def _emit(self, g: _Graph, jaxpr, env) -> None:
        for eqn in jaxpr.eqns:
            ins = [self._read(env, v) for v in eqn.invars]
            sub = _called_jaxpr(eqn) if eqn.primitive.name in _INLINE else None
            if sub is not None:
                inner, consts = sub
                inner_env: dict = {}
                for v, c in zip(inner.constvars, consts):
                    inner_env[v] = self.var(v.aval)
                    g.consts[inner_env[v]] = c
                for v, r in zip(inner.invars, ins):
                    inner_env[v] = r
                self._emit(g, inner, inner_env)
                for v, w in zip(eqn.outvars, inner.outvars):
                    env[v] = self._read(inner_env, w)
                continue
            body = None
            if eqn.primitive.name == "scan":
                closed = eqn.params["jaxpr"]
                body = self.graph(closed.jaxpr, closed.consts)
            outs = []
            for v in eqn.outvars:
                outs.append(self.var(v.aval))
                if not isinstance(v, jex.core.DropVar):
                    env[v] = outs[-1]
            g.nodes.append(_Node(next(self._ids), eqn.primitive, eqn.params, ins, outs, eqn.ctx, body))


def _called_jaxpr(eqn):
    for key in ("jaxpr", "call_jaxpr"):
        j = eqn.params.get(key)
        if isinstance(j, jex.core.ClosedJaxpr):
            return j.jaxpr, j.consts
        if isinstance(j, jex.core.Jaxpr):
            return j, ()
    return None


def _bind(node: _Node, vals):
    params = node.prim.get_bind_params(node.params)
    manager = getattr(node.ctx, "manager", None)
    if manager is None:
        out = node.prim.bind(*vals, **params)
    else:
        with manager:
            out = node.prim.bind(*vals, **params)
    return list(out) if node.prim.multiple_results else [out]


def apply_chain(value, chain, *, probe: bool = False):
    """Apply a chain of layout operations (graph nodes) to ``value``.

    With ``probe=True`` dtype conversions are skipped, so an integer index
    array can be pushed through to see where each entry lands.
    """
    for node in chain:
        if probe and node.name in _VALUE_ONLY:
            continue
        value = _bind(node, [value])[0]
    return value


# ----------------------------------------------------------------------------
# Layers, sites and the canonical matrix view of a weight
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Canon:
    """How a weight leaf maps to its canonical ``(d_in, d_out)`` matrix.

    Either a permutation of the leaf's axes followed by a reshape (``perm``),
    or, for layouts that no axis permutation gives, a gather with the flat
    leaf index of every matrix entry (``index``).
    """

    shape: tuple
    d_in: int
    d_out: int
    perm: tuple | None
    index: Any  # np.ndarray (d_in, d_out) or None

    def to_matrix(self, leaf):
        if self.perm is not None:
            return jnp.reshape(jnp.transpose(leaf, self.perm), (self.d_in, self.d_out))
        return jnp.reshape(leaf, (-1,))[jnp.asarray(self.index)]

    def from_matrix(self, m):
        if self.perm is not None:
            shaped = jnp.reshape(m, tuple(self.shape[p] for p in self.perm))
            return jnp.transpose(shaped, np.argsort(self.perm))
        flat = jnp.zeros((math.prod(self.shape),), m.dtype).at[jnp.asarray(self.index).ravel()].set(m.ravel())
        return jnp.reshape(flat, self.shape)

    def same_as(self, other: Canon) -> bool:
        return (self.d_in, self.d_out) == (other.d_in, other.d_out) and np.array_equal(
            self.index_array(), other.index_array()
        )

    def index_array(self) -> np.ndarray:
        if self.index is not None:
            return np.asarray(self.index)
        idx = np.arange(math.prod(self.shape)).reshape(self.shape)
        return np.transpose(idx, self.perm).reshape(self.d_in, self.d_out)


def _canon_from_index(shape, index: np.ndarray) -> Canon | None:
    """A :class:`Canon` from a ``(d_in, d_out)`` array of flat leaf indices, or ``None`` if not a permutation."""
    size = math.prod(shape)
    if index.size != size or not np.array_equal(np.sort(index.ravel()), np.arange(size)):
        return None
    d_in, d_out = index.shape
    base = np.arange(size).reshape(shape)
    if len(shape) <= 5:
        for perm in itertools.permutations(range(len(shape))):
            if np.array_equal(np.transpose(base, perm).reshape(d_in, d_out), index):
                return Canon(tuple(shape), d_in, d_out, tuple(perm), None)
    return Canon(tuple(shape), d_in, d_out, None, index)


@dataclasses.dataclass(frozen=True, eq=False)
class Site:
    """One use of a layer's weight in the traced graph (a layer may have several)."""

    sid: int
    node_uid: int
    kind: str  # "dense" | "conv" | "tag"
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

    @property
    def locations(self) -> int:
        return math.prod(self.stack) * (self._locations_unstacked())

    def _locations_unstacked(self) -> int:
        return math.prod(self.out_shape) // self.canon.d_out

    def inputs_matrix(self, x):
        """Layer input(s) recorded at this site -> ``(locations, d_in)``."""
        fn = self._canon_x
        for _ in self.stack:
            fn = jax.vmap(fn)
        return jnp.reshape(fn(x), (-1, self.canon.d_in))

    def outputs_matrix(self, g):
        """Output gradient(s) at this site -> ``(locations, d_out)``."""
        fn = self._canon_out
        for _ in self.stack:
            fn = jax.vmap(fn)
        return jnp.reshape(fn(g), (-1, self.canon.d_out))

    def _canon_x(self, x):
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

    def _canon_out(self, g):
        if self.kind != "conv":
            return jnp.reshape(jnp.transpose(g, self.out_perm), (-1, self.canon.d_out))
        gn = jnp.transpose(g, self.conv["out_spec"])
        return jnp.reshape(jnp.moveaxis(gn, 1, -1), (-1, self.canon.d_out))


@dataclasses.dataclass(frozen=True, eq=False)
class Layer:
    """A tagged layer: one weight leaf (and optionally a bias leaf) and its sites."""

    name: str
    kind: str  # "dense" | "conv"
    weight: int
    bias: int | None
    sites: tuple
    canon: Canon
    bias_perm: Any  # np.ndarray (d_out,) of flat bias indices, or None
    source: str  # "auto" | "explicit"
    other_uses: tuple = ()  # descriptions of uses of weight/bias outside the layer

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
    def locations(self) -> int:
        return sum(s.locations for s in self.sites)

    def to_matrix(self, leaves):
        """Params-ordered leaves -> the canonical ``(rows, d_out)`` matrix ``[W; bᵀ]``."""
        m = self.canon.to_matrix(leaves[self.weight])
        if self.bias is None:
            return m
        return jnp.concatenate([m, self.bias_row(leaves[self.bias])[None].astype(m.dtype)], axis=0)

    def bias_row(self, b):
        flat = jnp.reshape(b, (-1,))
        return flat if self.bias_perm is None else flat[jnp.asarray(self.bias_perm)]

    def from_matrix(self, m, bias_shape=None):
        """Inverse of :meth:`to_matrix`: ``(weight leaf, bias leaf or None)``."""
        w = self.canon.from_matrix(m[: self.canon.d_in])
        if self.bias is None:
            return w, None
        row = m[self.canon.d_in]
        if self.bias_perm is not None:
            row = jnp.zeros_like(row).at[jnp.asarray(self.bias_perm)].set(row)
        return w, jnp.reshape(row, bias_shape)


@dataclasses.dataclass(frozen=True)
class Fallback:
    """A parameter leaf not in any layer: it gets a diagonal or an exact (small) block."""

    leaf: int
    method: str  # "diagonal" | "block"
    reason: str


# ----------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class LayerTags:
    """Which parameter went where: the result of :func:`find_layers`.

    ``print(tags)`` shows one row per parameter leaf. Attributes: ``layers``
    (tuple of :class:`Layer`), ``fallbacks`` (tuple of :class:`Fallback`),
    ``paths`` and ``shapes`` of the parameter leaves, ``notes``.
    """

    layers: tuple
    fallbacks: tuple
    paths: tuple
    shapes: tuple
    notes: tuple = ()

    def rows(self) -> list[tuple[str, str, str, str]]:
        """``(parameter, shape, treatment, detail)`` for every parameter leaf, in flatten order."""
        out: dict[int, tuple] = {}
        for layer in self.layers:
            nsites = len(layer.sites)
            in_scan = sum(1 for s in layer.sites if s.stack)
            where = f"{nsites} use{'s' if nsites > 1 else ''}"
            if in_scan:
                where += f", {in_scan} inside lax.scan"
            detail = f"{layer.name}: d_in={layer.d_in}{'+1' if layer.bias is not None else ''}, d_out={layer.d_out}, "
            detail += f"{layer.locations} location(s), {where}"
            if layer.other_uses:
                detail += "; also used by " + ", ".join(layer.other_uses) + " (exact gradient kept, not in factors)"
            out[layer.weight] = (f"{layer.kind} weight ({layer.source})", detail)
            if layer.bias is not None:
                out[layer.bias] = (f"{layer.kind} bias ({layer.source})", f"{layer.name}")
        for fb in self.fallbacks:
            out[fb.leaf] = (f"fallback: {fb.method}", fb.reason)
        return [(path, str(tuple(shape)), *out[i]) for i, (path, shape) in enumerate(zip(self.paths, self.shapes))]

    def table(self) -> str:
        rows = [("parameter", "shape", "treatment", "layer / reason"), *self.rows()]
        widths = [max(len(r[c]) for r in rows) for c in range(3)]
        lines = ["  ".join(r[c].ljust(widths[c]) for c in range(3)) + "  " + r[3] for r in rows]
        lines.insert(1, "-" * min(120, max(len(x) for x in lines)))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    __str__ = table

    def __repr__(self) -> str:
        return f"LayerTags({len(self.layers)} layers, {len(self.fallbacks)} fallback leaves)\n{self.table()}"


# ----------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------


def _leaf_label(path) -> str:
    keys = list(path)
    while keys and isinstance(keys[-1], jax.tree_util.GetAttrKey):
        keys.pop()
    return jax.tree_util.keystr(tuple(keys[:-1])) or "<root>"


class _Use:
    __slots__ = ("leaf", "chain", "node", "pos", "what", "in_scan")

    def __init__(self, leaf, chain, node, pos, what, in_scan):
        self.leaf, self.chain, self.node, self.pos, self.what, self.in_scan = leaf, chain, node, pos, what, in_scan


class _Analysis:
    def __init__(self, builder: _Builder, params_leaves):
        self.b = builder
        self.params = params_leaves
        self.sites: list[dict] = []  # site candidates
        self.biases: list[dict] = []  # bias candidates
        self.uses: list[_Use] = []  # every non-layout use of a parameter-derived value
        self.explicit: list[dict] = []
        self.rejected: dict[int, str] = {}  # node uid -> why a dot/conv with a parameter is not a layer

    # -- helpers -------------------------------------------------------------
    def shape(self, ref):
        return tuple(ref.val.shape) if isinstance(ref, _Lit) else tuple(self.b.avals[ref].shape)

    def walk(self, g: _Graph, origin: dict, stack: tuple) -> None:
        site_out: dict[int, dict] = {}
        for node in g.nodes:
            org = [origin.get(r) if isinstance(r, int) else None for r in node.inputs]
            name = node.name
            if name in LAYOUT_PRIMITIVES and org and org[0] is not None and all(o is None for o in org[1:]):
                if len(node.outputs) == 1:
                    origin[node.outputs[0]] = (org[0][0], org[0][1] + (node,))
                    continue
            handled: set[int] = set()
            if node.prim is dense_tag_p:
                self._explicit(node, org, stack)
                handled = {i for i in range(1, len(node.inputs))}
                for i in range(2, len(node.inputs)):
                    if org[i] is not None:
                        self.uses.append(_Use(org[i][0], org[i][1], node, i, "tag", bool(stack)))
            elif name == "dot_general" and (org[0] is None) != (org[1] is None):
                w_pos = 0 if org[0] is not None else 1
                cand = self._dense(node, w_pos, org[w_pos], stack)
                if cand is not None:
                    site_out[node.outputs[0]] = cand
                    handled = {w_pos}
                    self.uses.append(_Use(org[w_pos][0], org[w_pos][1], node, w_pos, "site", bool(stack)))
            elif name == "conv_general_dilated" and org[1] is not None and org[0] is None:
                cand = self._conv(node, org[1], stack)
                if cand is not None:
                    site_out[node.outputs[0]] = cand
                    handled = {1}
                    self.uses.append(_Use(org[1][0], org[1][1], node, 1, "site", bool(stack)))
            elif name == "add" and len(node.inputs) == 2:
                for pos in (0, 1):
                    other = node.inputs[1 - pos]
                    if org[pos] is not None and isinstance(other, int) and other in site_out and org[1 - pos] is None:
                        self.biases.append(
                            dict(site=site_out[other], leaf=org[pos][0], chain=org[pos][1], node=node, pos=pos)
                        )
                        self.uses.append(_Use(org[pos][0], org[pos][1], node, pos, "bias", bool(stack)))
                        handled = {pos}
            elif name == "scan" and node.body is not None:
                nc = node.params["num_consts"]
                inner = {}
                for i in range(nc):
                    if org[i] is not None:
                        inner[node.body.inputs[i]] = org[i]
                        self.uses.append(_Use(org[i][0], org[i][1], node, i, "scan-const", bool(stack)))
                        handled.add(i)
                self.walk(node.body, inner, stack + (node.params["length"],))
            for i, o in enumerate(org):
                if o is not None and i not in handled:
                    what = self.rejected.get(node.uid) or f"`{name}`" + (" inside lax.scan" if stack else "")
                    if name == "scan":
                        nc, ncar = node.params["num_consts"], node.params["num_carry"]
                        what = (
                            "a lax.scan loop carry"
                            if i < nc + ncar
                            else "lax.scan as a scanned input (stacked per-step weights, e.g. a scan over layers)"
                        )
                    elif name in ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
                        what = f"an opaque `{name}`" + (" inside lax.scan" if stack else "")
                    self.uses.append(_Use(o[0], o[1], node, i, what, bool(stack)))
        for ref in g.outputs:
            if isinstance(ref, int) and ref in origin:
                leaf, chain = origin[ref]
                self.uses.append(_Use(leaf, chain, None, None, "the function's output", bool(stack)))

    def _probe(self, leaf, chain):
        shape = tuple(np.shape(self.params[leaf]))
        base = np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
        dtype = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
        with jax.ensure_compile_time_eval():  # concrete even when fitting under an outer jit
            return np.asarray(apply_chain(jnp.asarray(base, dtype), chain, probe=True))

    def _dense(self, node, w_pos, org, stack):
        (lc, rc), (lb, rb) = node.params["dimension_numbers"]
        if lb or rb:
            self._reject(org, node, "a dot_general with batch dimensions (e.g. per-head weights)", stack)
            return None
        x_pos = 1 - w_pos
        x_shape, w_shape = self.shape(node.inputs[x_pos]), self.shape(node.inputs[w_pos])
        x_con, w_con = (tuple(lc), tuple(rc)) if x_pos == 0 else (tuple(rc), tuple(lc))
        x_free = tuple(i for i in range(len(x_shape)) if i not in x_con)
        w_free = tuple(i for i in range(len(w_shape)) if i not in w_con)
        if not w_free or not x_con:
            self._reject(org, node, "a dot_general without output features or contraction", stack)
            return None
        d_in = math.prod(w_shape[i] for i in w_con)
        d_out = math.prod(w_shape[i] for i in w_free)
        probe = np.transpose(self._probe(*org), w_con + w_free).reshape(d_in, d_out)
        canon = _canon_from_index(np.shape(self.params[org[0]]), probe)
        if canon is None:
            self._reject(org, node, "a dot_general after a broadcast of the weight", stack)
            return None
        nx, nw = len(x_free), len(w_free)
        out_perm = tuple(range(nx + nw)) if x_pos == 0 else tuple(range(nw, nw + nx)) + tuple(range(nw))
        return self._site(node, "dense", org, x_pos, w_pos, canon, stack, x_perm=x_free + x_con, out_perm=out_perm)

    def _conv(self, node, org, stack):
        p = node.params
        if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
            self._reject(org, node, f"a grouped convolution (feature_group_count={p['feature_group_count']})", stack)
            return None
        dn = p["dimension_numbers"]
        lhs_spec, rhs_spec, out_spec = tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)
        k_shape = self.shape(node.inputs[1])
        perm = (rhs_spec[1], *rhs_spec[2:], rhs_spec[0])
        d_out = k_shape[rhs_spec[0]]
        d_in = math.prod(k_shape) // d_out
        probe = np.transpose(self._probe(*org), perm).reshape(d_in, d_out)
        canon = _canon_from_index(np.shape(self.params[org[0]]), probe)
        if canon is None:
            self._reject(org, node, "a convolution after a broadcast of the kernel", stack)
            return None
        conv = dict(
            lhs_spec=lhs_spec,
            out_spec=out_spec,
            filter_shape=tuple(k_shape[i] for i in rhs_spec[2:]),
            window_strides=tuple(p["window_strides"]),
            padding=tuple(tuple(q) for q in p["padding"]),
            lhs_dilation=tuple(p["lhs_dilation"]),
            rhs_dilation=tuple(p["rhs_dilation"]),
        )
        return self._site(node, "conv", org, 0, 1, canon, stack, conv=conv)

    def _site(self, node, kind, org, x_pos, w_pos, canon, stack, **kw):
        out_aval = self.b.avals[node.outputs[0]]
        cand = dict(
            node=node,
            kind=kind,
            weight=org[0],
            chain=org[1],
            x_pos=x_pos,
            w_pos=w_pos,
            x_shape=self.shape(node.inputs[x_pos]),
            out_shape=tuple(out_aval.shape),
            out_dtype=out_aval.dtype,
            stack=stack,
            canon=canon,
            **kw,
        )
        self.sites.append(cand)
        return cand

    def _reject(self, org, node, what, stack):
        """Remember why ``node`` is not a layer; the use is then reported with this description."""
        del org
        self.rejected[node.uid] = what + (" inside lax.scan" if stack else "")

    def _explicit(self, node, org, stack):
        y_shape = self.shape(node.inputs[0])
        transposed = node.params["transposed"]
        if org[2] is None:
            raise ValueError(
                "tag_dense was given a weight that is not a parameter leaf (or a transpose/reshape of one); "
                "pass the parameter array itself."
            )
        w_con = (1,) if transposed else (0,)
        w_free = (0,) if transposed else (1,)
        probe = np.transpose(self._probe(*org[2]), w_con + w_free)
        canon = _canon_from_index(np.shape(self.params[org[2][0]]), probe.reshape(probe.shape[0], -1))
        if canon is None:
            raise ValueError("tag_dense: the weight must be a parameter leaf, not a broadcast of one.")
        x_shape = self.shape(node.inputs[1])
        n = len(x_shape)
        bias = None
        if node.params["has_bias"]:
            if org[3] is None:
                raise ValueError("tag_dense was given a bias that is not a parameter leaf.")
            row = self._probe(*org[3]).ravel()
            bias = (org[3][0], org[3][1], None, None, None if np.array_equal(row, np.arange(row.size)) else row)
        out_aval = self.b.avals[node.outputs[0]]
        self.explicit.append(
            dict(
                node=node,
                kind="tag",
                weight=org[2][0],
                chain=org[2][1],
                x_pos=1,
                w_pos=None,
                x_shape=x_shape,
                out_shape=tuple(out_aval.shape),
                out_dtype=out_aval.dtype,
                stack=stack,
                canon=canon,
                x_perm=tuple(range(n)),
                out_perm=tuple(range(len(y_shape))),
                bias=bias,
            )
        )

    def bias_row(self, cand) -> np.ndarray | None:
        """Flat bias index at each output feature if ``cand`` is a valid bias add, else ``None``."""
        site = cand["site"]
        shape = np.shape(self.params[cand["leaf"]])
        probe = self._probe(cand["leaf"], cand["chain"])
        if math.prod(shape) != site["canon"].d_out:
            return None
        try:  # `add` broadcasts size-1 axes (Flax's reshaped bias)
            probe = np.broadcast_to(probe, site["out_shape"])
        except ValueError:
            return None
        tmp = Site(
            0,
            0,
            site["kind"],
            0,
            0,
            None,
            (),
            site["x_shape"],
            site["out_shape"],
            None,
            (),
            site["canon"],
            x_perm=site.get("x_perm", ()),
            out_perm=site.get("out_perm", ()),
            conv=site.get("conv"),
        )
        with jax.ensure_compile_time_eval():
            rows = np.asarray(tmp._canon_out(jnp.asarray(probe)))
        if not np.all(rows == rows[:1]):
            return None
        row = rows[0]
        if not np.array_equal(np.sort(row), np.arange(row.size)):
            return None
        return row


def find_layers(
    fn: Callable,
    params: PyTree,
    batch: PyTree,
    *,
    block_max_size: int = 256,
    restrict_to: LayerTags | None = None,
) -> LayerTags:
    """Find the dense and convolution layers of ``fn(params, batch)``.

    Args:
      fn: a function of ``(params, batch)`` (a loss or a model); traced once,
        never modified.
      params: the parameter pytree.
      batch: an example batch; only shapes and dtypes matter. The graph is
        traced for a batch of **one** example (its first), so per-example
        quantities come from ``vmap``.
      block_max_size: fallback leaves up to this size get an exact block,
        larger ones a diagonal.
      restrict_to: tag exactly the layers of an earlier result (used to read
        a second function, e.g. the loss beside the model, with the same
        layers); raises if one of them is missing.

    Returns:
      A :class:`LayerTags`; ``print`` it for the table.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxinf
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2), "scale": jnp.ones(())}
      >>> def loss(p, batch):
      ...     return jnp.mean((batch[0] @ p["w"] + p["b"]) * p["scale"] - batch[1]) ** 2
      >>> tags = jaxinf.find_layers(loss, params, (jnp.ones((4, 3)), jnp.ones((4, 2))))
      >>> [(row[0], row[2]) for row in tags.rows()]
      [("['b']", 'dense bias (auto)'), ("['scale']", 'fallback: block'), ("['w']", 'dense weight (auto)')]
    """
    return _analyse(fn, params, batch, block_max_size=block_max_size, restrict_to=restrict_to)[0]


def _example(batch):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *np.shape(a)[1:]), jnp.result_type(a)), batch)


def _analyse(fn, params, batch, *, block_max_size=256, restrict_to=None):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    leaves = [leaf for _, leaf in flat]
    paths = tuple(jax.tree_util.keystr(p) for p, _ in flat)
    shapes = tuple(tuple(np.shape(x)) for x in leaves)
    closed = jax.make_jaxpr(fn)(params, _example(batch))
    builder = _Builder()
    graph = builder.graph(closed.jaxpr, closed.consts)
    an = _Analysis(builder, leaves)
    origin = {graph.inputs[i]: (i, ()) for i in range(len(leaves))}
    an.walk(graph, origin, ())

    uses_by_leaf: dict[int, list[_Use]] = {}
    for u in an.uses:
        uses_by_leaf.setdefault(u.leaf, []).append(u)

    # explicit tags claim their leaves
    claimed: dict[int, list[dict]] = {}
    for e in an.explicit:
        claimed.setdefault(e["weight"], []).append(e)
    claimed_bias = {e["bias"][0] for e in an.explicit if e["bias"] is not None}

    layer_sites: dict[int, list[dict]] = {}
    layer_kind: dict[int, str] = {}
    reasons: dict[int, str] = {}
    notes: list[str] = []
    for w, group in claimed.items():
        if any(not g["canon"].same_as(group[0]["canon"]) for g in group):
            raise ValueError(f"tag_dense: the weight {paths[w]} is tagged with different layouts.")
        biases = {g["bias"][0] if g["bias"] else None for g in group} - {None}
        if len(biases) > 1:
            raise ValueError(f"tag_dense: the weight {paths[w]} is tagged with different biases.")
        layer_sites[w] = group
        layer_kind[w] = "dense"

    site_by_leaf: dict[int, list[dict]] = {}
    for s in an.sites:
        site_by_leaf.setdefault(s["weight"], []).append(s)
    allowed = None
    if restrict_to is not None:
        allowed = {layer.weight: layer for layer in restrict_to.layers}
    for w, group in site_by_leaf.items():
        if w in claimed or w in claimed_bias:
            continue
        if allowed is not None:
            if w not in allowed:
                continue
            group = [g for g in group if g["canon"].same_as(allowed[w].canon)]
            if group:
                layer_sites[w] = group
                layer_kind[w] = allowed[w].kind
            continue
        kinds = {g["kind"] for g in group}
        if len(kinds) > 1:
            reasons[w] = "used both as a dense weight and as a convolution kernel"
            continue
        if any(not g["canon"].same_as(group[0]["canon"]) for g in group):
            reasons[w] = "shared by dense uses with different layouts (e.g. x @ W and h @ W.T)"
            continue
        layer_sites[w] = group
        layer_kind[w] = group[0]["kind"]
    weights = set(layer_sites)

    # biases: a leaf whose bias-candidate uses all sit on sites of one layer, with one row layout
    bias_of: dict[int, int] = {}  # bias leaf -> weight leaf
    bias_row: dict[int, np.ndarray] = {}
    accepted_bias_uses: set[tuple] = set()
    by_bias: dict[int, list[dict]] = {}
    for cand in an.biases:
        by_bias.setdefault(cand["leaf"], []).append(cand)
    for b, cands in by_bias.items():
        if b in weights or b in claimed_bias or b in claimed:
            continue
        owners = {c["site"]["weight"] for c in cands}
        if len(owners) != 1 or next(iter(owners)) not in weights or next(iter(owners)) in claimed:
            if len(owners) > 1:
                reasons.setdefault(b, "added as a bias to the outputs of different layers")
            continue
        w = next(iter(owners))
        if allowed is not None and allowed[w].bias != b:
            continue
        rows = [an.bias_row(c) for c in cands]
        if any(r is None for r in rows) or any(not np.array_equal(r, rows[0]) for r in rows):
            reasons.setdefault(b, "added to a layer's output, but not as one value per output feature")
            continue
        if any(c["site"] not in layer_sites[w] for c in cands):
            continue
        # one bias per layer: the first leaf claiming it wins, a second leaf falls back
        if w in bias_of.values():
            reasons.setdefault(b, "a second bias of the same layer")
            continue
        bias_of[b] = w
        bias_row[b] = rows[0]
        for c in cands:
            c["site"]["bias"] = (b, c["chain"], c["node"].uid, c["pos"], None)
            accepted_bias_uses.add((c["node"].uid, c["pos"]))
    if allowed is not None:
        for w, layer in allowed.items():
            if w not in layer_sites:
                raise ValueError(
                    f"The layer {layer.name} ({paths[w]}) found in the model is not used the same way by the loss. "
                    "Check that loss_fn(params, batch) == output_loss(model_fn(params, batch), batch)."
                )
            if layer.bias is not None and layer.bias not in bias_of:
                raise ValueError(
                    f"The bias {paths[layer.bias]} of layer {layer.name} is not added the same way in the loss "
                    "as in the model."
                )

    # assemble layers
    layers = []
    label = {w: _leaf_label(flat[w][0]) for w in layer_sites}
    counts: dict[str, int] = {}
    for name in label.values():
        counts[name] = counts.get(name, 0) + 1
    sid = itertools.count()
    site_uses = set()
    for w in sorted(layer_sites):
        group = layer_sites[w]
        explicit = w in claimed
        b = None
        if explicit:
            bs = [g["bias"][0] for g in group if g["bias"] is not None]
            b = bs[0] if bs else None
        else:
            bs = [k for k, v in bias_of.items() if v == w]
            b = bs[0] if bs else None
        sites = []
        for g in group:
            bias = g.get("bias")
            if bias is not None and bias[0] != b:
                bias = None
            sites.append(
                Site(
                    next(sid),
                    g["node"].uid,
                    g["kind"],
                    w,
                    g["x_pos"],
                    g["w_pos"],
                    g["chain"],
                    g["x_shape"],
                    g["out_shape"],
                    g["out_dtype"],
                    g["stack"],
                    g["canon"],
                    x_perm=g.get("x_perm", ()),
                    out_perm=g.get("out_perm", ()),
                    conv=g.get("conv"),
                    bias=bias,
                )
            )
            site_uses.add((g["node"].uid, g["w_pos"]))
        if explicit:
            bperm = next((g["bias"][4] for g in group if g["bias"] is not None), None)
        else:
            row = bias_row.get(b) if b is not None else None
            bperm = None if row is None or np.array_equal(row, np.arange(row.size)) else row
        name = label[w] if counts[label[w]] == 1 and label[w] != "<root>" else paths[w]
        kind = "dense" if explicit else layer_kind[w]
        if allowed is not None:
            name = allowed[w].name
        members = {w} if b is None else {w, b}
        other = []
        if not explicit:
            for leaf in members:
                for u in uses_by_leaf.get(leaf, []):
                    key = (u.node.uid if u.node is not None else None, u.pos)
                    if u.what in ("site", "bias") and (key in site_uses or key in accepted_bias_uses):
                        continue
                    if u.what == "scan-const":
                        continue
                    other.append(f"{u.what} ({paths[leaf]})" if leaf != w else u.what)
        layers.append(
            Layer(
                name,
                kind,
                w,
                b,
                tuple(sites),
                group[0]["canon"],
                bperm,
                "explicit" if explicit else "auto",
                tuple(dict.fromkeys(other)),
            )
        )

    in_layer = {layer.weight for layer in layers} | {layer.bias for layer in layers if layer.bias is not None}
    fallbacks = []
    for i in range(len(leaves)):
        if i in in_layer:
            continue
        method = "block" if math.prod(shapes[i]) <= block_max_size else "diagonal"
        if i in reasons:
            reason = reasons[i]
        else:
            whats = [u.what for u in uses_by_leaf.get(i, []) if u.what not in ("scan-const",)]
            kinds = list(dict.fromkeys(whats))
            if not kinds:
                reason = "not used by the function (zero gradient)"
            elif set(kinds) <= {"site", "bias"}:
                reason = "a weight or bias use that could not be matched to one layer"
            else:
                readable = [k.replace("site", "a dense/conv operand").replace("bias", "an add") for k in kinds]
                reason = "used by " + ", ".join(readable)
        fallbacks.append(Fallback(i, method, reason))
    for layer in layers:
        if any(s.stack for s in layer.sites):
            notes.append(
                f"{layer.name} is used inside lax.scan: each loop step counts as extra locations of one repeated layer."
            )
        if len(layer.sites) > 1:
            notes.append(f"{layer.name} is shared by {len(layer.sites)} uses: treated as one repeated layer.")
    tags = LayerTags(tuple(layers), tuple(fallbacks), paths, shapes, tuple(dict.fromkeys(notes)))
    return tags, graph, closed


# ----------------------------------------------------------------------------
# Re-evaluation with perturbations at the layer outputs
# ----------------------------------------------------------------------------


class Tracer:
    """Re-evaluates a traced function with perturbations at its layers' outputs.

    Built by :func:`trace_layers`; static (hashable by identity), so it can sit
    in a solver state's metadata.

    ``run(params_leaves, diff, perts, batch)`` evaluates the function on a
    batch of one with:

    * ``perts[sid]`` added at the output of layer site ``sid`` (zeros give
      the original function; ``∂f/∂perts`` are the output gradients);
    * the layer weights (and biases) at their layer uses taken from
      ``params_leaves`` as constants;
    * ``diff[i]`` used for every other use of parameter leaf ``i`` (fallback
      leaves and the non-layer uses of tagged leaves), so that ``∂f/∂diff``
      is the rest of the per-example gradient.

    It returns the output leaves and the recorded layer inputs ``{sid: x}``.
    """

    def __init__(self, tags: LayerTags, graph: _Graph, closed, fn, params, batch):
        self.tags = tags
        self.graph = graph
        self.fn = fn
        self.out_tree = jax.tree.structure(jax.eval_shape(fn, params, _example(batch)))
        self.out_avals = [v.aval for v in closed.jaxpr.outvars]
        self.num_leaves = len(tags.paths)
        self.sites = {s.sid: s for layer in tags.layers for s in layer.sites}
        self.site_at = {s.node_uid: s for s in self.sites.values()}
        self.overrides: dict[int, dict[int, tuple]] = {}
        for s in self.sites.values():
            if s.w_pos is not None:
                self.overrides.setdefault(s.node_uid, {})[s.w_pos] = (s.weight, s.w_chain)
            if s.bias is not None and s.bias[2] is not None:
                leaf, chain, uid, pos, _ = s.bias
                self.overrides.setdefault(uid, {})[pos] = (leaf, chain)
        explicit_leaves = set()
        for layer in tags.layers:
            if layer.source == "explicit":
                explicit_leaves.add(layer.weight)
                if layer.bias is not None:
                    explicit_leaves.add(layer.bias)
        self.diff_leaves = tuple(
            sorted(
                {f.leaf for f in tags.fallbacks}
                | {
                    leaf
                    for layer in tags.layers
                    if layer.other_uses
                    for leaf in (layer.weight, layer.bias)
                    if leaf is not None and leaf not in explicit_leaves
                }
            )
        )
        self.scan_sites: dict[int, frozenset] = {}
        self._index_scans(graph)

    def _index_scans(self, g: _Graph) -> frozenset:
        found = set()
        for node in g.nodes:
            if node.uid in self.site_at:
                found.add(self.site_at[node.uid].sid)
            if node.body is not None:
                inner = self._index_scans(node.body)
                if inner or self._has_override(node.body):
                    self.scan_sites[node.uid] = inner
                found |= inner
        return frozenset(found)

    def _has_override(self, g: _Graph) -> bool:
        return any(n.uid in self.overrides or (n.body is not None and self._has_override(n.body)) for n in g.nodes)

    def zero_perts(self):
        return {sid: jnp.zeros((*s.stack, *s.out_shape), s.out_dtype) for sid, s in self.sites.items()}

    def run(self, params_leaves, diff: dict, perts: dict, batch):
        batch_leaves = jax.tree.leaves(batch)
        env_params = [diff.get(i, p) for i, p in enumerate(params_leaves)]
        records: dict = {}
        outs = self._eval(self.graph, [*env_params, *batch_leaves], params_leaves, perts, records)
        return outs, records

    def _eval(self, g: _Graph, inputs, params_leaves, perts, records):
        env = dict(g.consts)
        env.update(zip(g.inputs, inputs))

        def read(r):
            return r.val if isinstance(r, _Lit) else env[r]

        for node in g.nodes:
            vals = [read(r) for r in node.inputs]
            for pos, (leaf, chain) in self.overrides.get(node.uid, {}).items():
                vals[pos] = apply_chain(params_leaves[leaf], chain)
            if node.prim is dense_tag_p:
                outs = [vals[0]]
            elif node.uid in self.scan_sites:
                outs = self._eval_scan(node, vals, params_leaves, perts, records)
            else:
                outs = _bind(node, vals)
            site = self.site_at.get(node.uid)
            if site is not None:
                records[site.sid] = vals[site.x_pos]
                outs = [outs[0] + perts[site.sid].astype(outs[0].dtype)]
            env.update(zip(node.outputs, outs))
        return [read(r) for r in g.outputs]

    def _eval_scan(self, node, vals, params_leaves, perts, records):
        p = node.params
        nc, ncar = p["num_consts"], p["num_carry"]
        consts, carry, xs = vals[:nc], vals[nc : nc + ncar], vals[nc + ncar :]
        inner = {s: perts[s] for s in self.scan_sites[node.uid]}

        def body(c, inp):
            x_t, p_t = inp
            rec: dict = {}
            outs = self._eval(node.body, [*consts, *c, *x_t], params_leaves, p_t, rec)
            return outs[:ncar], (outs[ncar:], rec)

        carry, (ys, rec) = jax.lax.scan(
            body, list(carry), (list(xs), inner), length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
        )
        records.update(rec)
        return [*carry, *ys]


def trace_layers(fn: Callable, params: PyTree, batch: PyTree, *, block_max_size: int = 256, restrict_to=None) -> Tracer:
    """:func:`find_layers` plus the machinery to re-evaluate ``fn`` with perturbations (see :class:`Tracer`)."""
    tags, graph, closed = _analyse(fn, params, batch, block_max_size=block_max_size, restrict_to=restrict_to)
    return Tracer(tags, graph, closed, fn, params, batch)


__all__ = [
    "Canon",
    "Fallback",
    "Layer",
    "LayerTags",
    "Site",
    "Tracer",
    "dense_tag_p",
    "find_layers",
    "tag_dense",
    "trace_layers",
]
