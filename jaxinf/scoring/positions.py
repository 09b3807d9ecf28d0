"""Which sequence position each location of each tagged layer is: the map token-wise scores need.

The user names the sequence axis of the batch leaves (``sequence_axis``). That
label is pushed through the traced loss (the graph of :mod:`jaxinf.layers`,
equation by equation, on shapes only): every array axis carries ``None`` (not
a position), an offset ``o`` (entry ``k`` of the axis is position ``k + o``)
or "unknown" (an operation not modelled here: a sort, a reversal, a reshape
merging the sequence axis with another). Followed: element-wise operations
(and same-shape ``custom_jvp`` calls such as softmax), reductions,
``broadcast_in_dim``, ``reshape``, ``transpose``, ``dot_general`` (a
contracted sequence axis, as in attention, leaves the other axes'
positions), ``slice``/``pad`` (shifted targets), ``split``, ``concatenate``
off the sequence axis, gathers (embeddings) and ``lax.scan``.

A layer location is then mapped to a position from its recorded input: the
location's row of the canonical ``(locations, d_in)`` input matrix must be
read from exactly one sequence position; a location that mixes positions
(a layer contracting over the sequence axis), has none (a readout after
pooling) or an unknown one raises a ``ValueError`` naming the layer. A layer
whose input carries no position at all (a positional table read with
``arange(T)``) is mapped by its output instead: labels are also inferred
backwards, from the uses of an array (element-wise with a labelled array,
through ``broadcast_in_dim``, ``transpose``, ``reshape``), and the row of the
canonical ``(locations, d_out)`` output matrix must sit at one position.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.layers import Tracer

PyTree = Any
_UNKNOWN = "unknown"
_ELEMENTWISE = frozenset(
    "add sub mul div rem pow integer_pow max min neg sign floor ceil round is_finite exp exp2 log log1p expm1 "
    "tanh logistic sin cos tan asin acos atan atan2 sinh cosh asinh acosh atanh sqrt rsqrt cbrt abs square erf "
    "erfc erf_inv lgamma digamma select_n convert_element_type stop_gradient eq ne lt le gt ge and or not xor "
    "clamp nextafter copy copy_p real imag conj reduce_precision cumsum cumprod cummax cummin cumlogsumexp "
    "custom_jvp_call custom_vjp_call custom_vjp_call_jaxpr".split()
)
_REDUCE = frozenset("reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin".split())


@dataclasses.dataclass(frozen=True, eq=False)
class TokenMap:
    """Per tagged layer, the sequence position of each of its per-example locations (sites concatenated).

    ``positions[k]``: ints ``([L,] locations of layer k)`` in the order of :func:`jaxinf.layers.statistics.
    layer_matrices`; ``length``: ``T``. Hashable by identity (a static argument of ``jit``).
    """

    positions: tuple
    length: int


def _union(a, b):
    if a is None or a == b:
        return b if a is None else a
    if b is None:
        return a
    return a if isinstance(a, str) else (b if isinstance(b, str) else _UNKNOWN)


def _labelled(labels) -> bool:
    return any(lab is not None for lab in labels)


def _elementwise(in_labels, in_shapes, out_shape):
    out = [None] * len(out_shape)
    for lab, shape in zip(in_labels, in_shapes):
        if len(shape) == 0:
            continue
        if len(shape) != len(out_shape) or any(s not in (1, o) for s, o in zip(shape, out_shape)):
            if _labelled(lab):
                return [_UNKNOWN] * len(out_shape)
            continue
        grown = [s != o and x is not None for s, o, x in zip(shape, out_shape, lab)]  # a size-1 position broadcast
        out = [_UNKNOWN if gr else _union(o, x) for o, x, gr in zip(out, lab, grown)]
    return out


def _reshape(lab, in_shape, out_shape):
    out = [None] * len(out_shape)
    for a, x in enumerate(lab):
        if x is None:
            continue
        stride = math.prod(in_shape[a + 1 :])
        match = [
            b for b in range(len(out_shape)) if out_shape[b] == in_shape[a] and math.prod(out_shape[b + 1 :]) == stride
        ]
        if len(match) != 1 and in_shape[a] != 1:
            return [_UNKNOWN] * len(out_shape)
        if match:
            out[match[0]] = _union(out[match[0]], x)
    return out


def _dot_general(node, labs, shapes):
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    (ll, rl), (ls, rs) = labs, shapes
    out = [_union(ll[i], rl[j]) for i, j in zip(lb, rb)]
    out += [ll[i] for i in range(len(ls)) if i not in lc and i not in lb]
    out += [rl[i] for i in range(len(rs)) if i not in rc and i not in rb]
    return out


def _gather(node, labs, shapes, out_shape):
    dn = node.params["dimension_numbers"]
    (op_lab, idx_lab), (op_shape, _) = labs, shapes
    batch_axes = [d for d in range(len(out_shape)) if d not in dn.offset_dims]
    out = [None] * len(out_shape)
    for d, x in zip(batch_axes, idx_lab[:-1]):
        out[d] = x
    skipped = set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()))
    kept = [a for a in range(len(op_shape)) if a not in skipped]
    for d, a in zip(dn.offset_dims, kept):
        if op_lab[a] is not None and node.params["slice_sizes"][a] != op_shape[a]:
            return [_UNKNOWN] * len(out_shape)
        out[d] = op_lab[a]
    idx_batch = list(getattr(dn, "start_indices_batching_dims", ()))
    for a, i in zip(getattr(dn, "operand_batching_dims", ()), idx_batch):
        d = batch_axes[i if i < len(batch_axes) else -1]
        out[d] = _union(out[d], op_lab[a])
    if any(op_lab[a] is not None for a in dn.start_index_map):
        return [_UNKNOWN] * len(out_shape)
    return out


def _shift(node, lab, in_shape):
    """``slice`` and ``pad``: entry ``k`` of the output is entry ``k + start`` (``k - low``) of the input."""
    out = list(lab)
    for a, x in enumerate(lab):
        if x is None or isinstance(x, str):
            continue
        if node.name == "slice":
            start, stride = node.params["start_indices"][a], (node.params["strides"] or (1,) * len(lab))[a]
            out[a] = x + start if stride == 1 else _UNKNOWN
        else:
            low, _, interior = node.params["padding_config"][a]
            out[a] = x - low if interior == 0 else _UNKNOWN
    return out


def _rule(node, labs, shapes, out_shapes):
    """Output labels of one graph node from its input labels (all on shapes)."""
    name, p = node.name, node.params
    if not any(_labelled(lab) for lab in labs):
        return [[None] * len(s) for s in out_shapes]
    out_shape = out_shapes[0] if out_shapes else ()
    if name == "split":  # e.g. fused q, k, v: every piece keeps the labels off the split axis
        lab = list(labs[0])
        lab[p["axis"]] = None if lab[p["axis"]] is None else _UNKNOWN
        return [list(lab) for _ in out_shapes]
    if name == "jaxinf_dense_tag":  # jaxinf.tag_dense(y, x, w, b): returns y
        res = list(labs[0])
    elif name in _ELEMENTWISE and len(out_shapes) == 1:
        res = _elementwise(labs, shapes, out_shape)
    elif name in _REDUCE:
        res = [x for a, x in enumerate(labs[0]) if a not in p["axes"]]
    elif name == "broadcast_in_dim":
        res = [None] * len(out_shape)
        for i, d in enumerate(p["broadcast_dimensions"]):
            grown = shapes[0][i] == 1 and out_shape[d] != 1 and labs[0][i] is not None
            res[d] = _UNKNOWN if grown else labs[0][i]
    elif name == "reshape":
        res = _reshape(labs[0], shapes[0], out_shape)
    elif name == "transpose":
        res = [labs[0][a] for a in p["permutation"]]
    elif name == "squeeze":
        res = [x for a, x in enumerate(labs[0]) if a not in p["dimensions"]]
    elif name == "dot_general":
        res = _dot_general(node, labs, shapes)
    elif name == "gather":
        res = _gather(node, labs, shapes, out_shape)
    elif name in ("slice", "pad"):
        res = _shift(node, labs[0], shapes[0])
    elif name == "concatenate":
        res = [None] * len(out_shape)
        for lab in labs:
            res = [_union(r, x) for r, x in zip(res, lab)]
        if any(lab[p["dimension"]] is not None for lab in labs):
            res[p["dimension"]] = _UNKNOWN
    else:
        return [[_UNKNOWN] * len(s) for s in out_shapes]
    return [res] + [[_UNKNOWN] * len(s) for s in out_shapes[1:]]


def _bind(node, vals):
    """Evaluate one graph node (here on abstract values: only the output shapes are used)."""
    out = node.prim.bind(*vals, **node.prim.get_bind_params(node.params))
    return list(out) if node.prim.multiple_results else [out]


def _backward_rule(node, in_shape, out, out_shape):
    """The labels an input of ``node`` takes from its output's (``None``: none inferred)."""
    name, p = node.name, node.params
    if name in _ELEMENTWISE and len(in_shape) == len(out_shape):
        return [o if s == t else None for s, t, o in zip(in_shape, out_shape, out)]
    if name == "broadcast_in_dim" and len(in_shape) == len(p["broadcast_dimensions"]):
        return [out[d] if in_shape[i] == out_shape[d] else None for i, d in enumerate(p["broadcast_dimensions"])]
    if name == "transpose":
        res = [None] * len(in_shape)
        for j, a in enumerate(p["permutation"]):
            res[a] = out[j]
        return res
    if name == "reshape":
        return _reshape(out, out_shape, in_shape)
    return None


class _Propagation:
    def __init__(self, tracer: Tracer):
        self.tracer = tracer
        self.sites: dict = {}  # sid -> (stack labels, x labels)
        self.outputs: dict = {}  # sid -> (stack labels, output labels, also inferred from the output's uses)

    def run(self, g, vals, labs, stack):
        env = {**{k: (v, [None] * np.ndim(v)) for k, v in g.consts.items()}}
        env.update({k: (v, lab) for k, v, lab in zip(g.inputs, vals, labs)})

        def read(r):
            return (r.val, [None] * np.ndim(r.val)) if not isinstance(r, int) else env[r]

        trail = []
        for node in g.nodes:
            ins = [read(r) for r in node.inputs]
            in_vals, in_labs = [v for v, _ in ins], [lab for _, lab in ins]
            site = self.tracer.site_at.get(node.uid)
            if site is not None:
                self.sites[site.sid] = (stack, in_labs[site.x_pos])
            if node.body is not None:
                out_vals, out_labs = self._scan(node, in_vals, in_labs, stack)
            else:
                out_vals = _bind(node, in_vals)
                shapes = [np.shape(v) for v in in_vals]
                out_labs = _rule(node, in_labs, shapes, [np.shape(v) for v in out_vals])
                out_labs = [[f"{x} ({node.name})" if x == _UNKNOWN else x for x in lab] for lab in out_labs]
            trail.append((node, [np.shape(v) for v in in_vals], [np.shape(v) for v in out_vals]))
            env.update({k: (v, lab) for k, v, lab in zip(node.outputs, out_vals, out_labs)})
        self._backward(trail, {k: lab for k, (_, lab) in env.items()}, stack)
        outs = [read(r) for r in g.outputs]
        return [v for v, _ in outs], [lab for _, lab in outs]

    def _backward(self, trail, labels, stack):
        """Labels of unlabelled axes from their uses (a positional embedding ``table[arange(T)]`` added to the
        token stream is read at the stream's positions); recorded for every site's output."""
        back: dict = {}

        def final(v):
            b = back.get(v)
            return labels[v] if b is None else [f if f is not None else x for f, x in zip(labels[v], b)]

        for node, in_shapes, out_shapes in reversed(trail):
            out = final(node.outputs[0]) if node.outputs else []
            site = self.tracer.site_at.get(node.uid)
            if site is not None:
                self.outputs[site.sid] = (stack, out)
            if len(node.outputs) != 1 or node.body is not None:
                continue
            for r, shape in zip(node.inputs, in_shapes):
                got = _backward_rule(node, shape, [None if isinstance(x, str) else x for x in out], out_shapes[0])
                if isinstance(r, int) and got is not None:
                    prev = back.get(r, [None] * len(shape))
                    back[r] = [x if x is not None else y for x, y in zip(prev, got)]

    def _scan(self, node, vals, labs, stack):
        p = node.params
        nc, ncar = p["num_consts"], p["num_carry"]
        x_labs = [lab[1:] for lab in labs[nc + ncar :]]
        axis_lab = None
        for lab in labs[nc + ncar :]:
            axis_lab = _union(axis_lab, lab[0] if lab else None)
        inner = [*vals[:nc], *vals[nc : nc + ncar], *(v[0] for v in vals[nc + ncar :])]
        carry = list(labs[nc : nc + ncar])
        for _ in range(3):  # the carry's labels to a fixed point
            _, out_labs = self.run(node.body, inner, [*labs[:nc], *carry, *x_labs], (*stack, axis_lab))
            new = [[_union(a, b) for a, b in zip(c, o)] for c, o in zip(carry, out_labs[:ncar])]
            if new == carry:
                break
            carry = new
        out_vals = _bind(node, vals)
        return out_vals, [*carry, *([axis_lab, *lab] for lab in out_labs[ncar:])]


def _batch_labels(batch, sequence_axis):
    leaves = jax.tree.leaves(batch)
    axes = [sequence_axis] * len(leaves) if isinstance(sequence_axis, int) else list(sequence_axis)
    if len(axes) != len(leaves) or not all(a is None or isinstance(a, int) for a in axes):
        raise ValueError(
            f"sequence_axis must be an int (the sequence axis of every batch leaf) or a sequence of int or None, one "
            f"per batch leaf ({len(leaves)} here); got {sequence_axis!r}."
        )
    labels, lengths = [], set()
    for i, (leaf, a) in enumerate(zip(leaves, axes)):
        nd = np.ndim(leaf)
        if a is not None and not (nd >= 2 and -nd < a < nd and a % nd != 0):
            per_leaf = tuple(None if j == i else b for j, b in enumerate(axes))  # None for a leaf with no sequence
            raise ValueError(f"sequence_axis {a} is not an axis after the example axis of batch leaf {i} (in "
                             f"jax.tree.leaves order), of shape {np.shape(leaf)}; give None for a leaf without a "
                             f"sequence axis (e.g. one label per sequence): sequence_axis={per_leaf!r}.")  # fmt: skip
        lab = [None] * nd
        if a is not None:
            lab[a % nd] = 0
            lengths.add(np.shape(leaf)[a % nd])
        labels.append(lab)
    if len(lengths) != 1:
        raise ValueError(
            f"The sequence axes of the batch leaves must have one length; got {sorted(lengths)}. Pass one int or "
            "None per leaf (None: no sequence axis, e.g. a mask of the shifted targets)."
        )
    return labels, lengths.pop()


def token_map(tracer: Tracer, params: PyTree, batch: PyTree, sequence_axis) -> TokenMap:
    """The position of every location of every tagged layer of ``tracer`` (see the module docstring).

    Args:
      tracer: :func:`jaxinf.layers.statistics.loss_tracer` of the training loss.
      params: the parameters (only their shapes and dtypes are read).
      batch: a training batch (only its shapes are read).
      sequence_axis: the sequence axis of the batch leaves (counting the
        example axis as 0): one int for every leaf, or one int or ``None``
        per leaf (``jax.tree.leaves`` order).

    Raises:
      ValueError: a bad ``sequence_axis``; a layer location that does not
        read exactly one sequence position (the message names the layer).
    """
    labels, length = _batch_labels(batch, sequence_axis)
    prop = _Propagation(tracer)

    def walk(params_leaves, batch_leaves):
        param_labels = [[None] * np.ndim(p) for p in params_leaves]
        return prop.run(tracer.graph, [*params_leaves, *batch_leaves], [*param_labels, *labels], ())[0]

    example = [jax.ShapeDtypeStruct((1, *np.shape(x)[1:]), jnp.result_type(x)) for x in jax.tree.leaves(batch)]
    leaves = [jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(params)]
    jax.eval_shape(walk, leaves, example)
    return TokenMap(tuple(_layer_positions(layer, prop, length) for layer in tracer.tags.layers), length)


def _layer_positions(layer, sites, length):
    """``([L,] locations)``: the position of each location (per step of a layer stacked along a scan)."""
    parts = []
    for site in layer.sites:
        stack_labs, x_labs = sites.sites[site.sid]
        if any(x is not None for x in [*stack_labs, *x_labs]) or site.sid not in sites.outputs:
            parts.append(_site_positions(layer, site, [*stack_labs, *x_labs], length))
        else:  # the input holds no position (ids from arange): the positions the output is used at
            stack_labs, out_labs = sites.outputs[site.sid]
            parts.append(_site_positions(layer, site, [*stack_labs, *out_labs], length, output=True))
    return np.concatenate(parts, axis=-1)


def _site_positions(layer, site, labs, length, output=False):
    where = f"layer {layer.name!r}"
    lost = [x for x in labs if isinstance(x, str)]
    if lost:
        raise ValueError(
            f"Cannot tell which sequence position each location of {where} reads: the sequence axis went "
            f"through an operation not followed here ({lost[0]}: e.g. a sort, a reversal, a reshape "
            "merging it with another axis). Token-wise scores need each location to read one position."
        )
    pos_axes = [a for a, x in enumerate(labs) if x is not None]
    if site.kind == "conv" or len(pos_axes) != 1:
        why = "a convolution" if site.kind == "conv" else f"{len(pos_axes)} sequence axes in its input"
        raise ValueError(f"The locations of {where} do not map one-to-one to sequence positions ({why}).")
    (a,) = pos_axes
    shape = (*site.stack, *(site.out_shape if output else site.x_shape))
    pos = np.arange(shape[a]) + labs[a]
    if pos.min() < 0 or pos.max() >= length:
        raise ValueError(f"Some locations of {where} read no token of the batch (positions {pos.min()}..{pos.max()}).")
    probe = np.broadcast_to(np.reshape(pos + 1.0, (-1,) + (1,) * (len(shape) - a - 1)), shape)
    if output:
        rows = np.asarray(site.outputs_matrix(jnp.asarray(probe, jnp.float32)))
    elif site.kind == "embedding":  # ids: the locations are the entries, in order (a stacked site: per step)
        flat = np.reshape(probe, (*site.stack, -1))
        sliced = getattr(site, "sliced", None)
        out = flat if sliced is None else np.reshape(np.moveaxis(flat, sliced, 0), (flat.shape[sliced], -1))
        return (out if sliced is not None else np.reshape(out, (-1,))).astype(int) - 1
    else:
        rows = np.asarray(site.inputs_matrix(jnp.asarray(probe, jnp.float32)))
    hi = rows.max(axis=-1)
    lo = np.where(rows > 0, rows, np.inf).min(axis=-1)
    if not np.array_equal(hi, lo):
        raise ValueError(
            f"Each location of {where} mixes several sequence positions (the layer contracts over the "
            "sequence axis); its scores cannot be split by token."
        )
    return hi.astype(int) - 1


__all__ = ["TokenMap", "token_map"]
