"""End of step 2 of the analysis: group the matched uses into layers and fallbacks; :func:`find_layers`.

Explicit tags claim their leaves first; the remaining site candidates of a weight form one (possibly repeated)
layer when they agree on kind and layout; a bias joins the layer whose outputs it is added to, one value per
output feature; every other leaf becomes a :class:`~jaxinf.layers.Fallback` with the reason.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxinf.layers.graph import _trace_graph, split_at_slice
from jaxinf.layers.report import LayerTags
from jaxinf.layers.structures import Fallback, Layer, Site
from jaxinf.layers.walk import _Analysis, _Use

PyTree = Any


def find_layers(
    fn: Callable,
    params: PyTree,
    batch: PyTree,
    *,
    block_max_size: int = 256,
    restrict_to: LayerTags | None = None,
) -> LayerTags:
    """Find the dense (per-head ones included), convolution and embedding layers of ``fn(params, batch)``.

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


def _leaf_label(path) -> str:
    keys = list(path)
    while keys and isinstance(keys[-1], jax.tree_util.GetAttrKey):
        keys.pop()
    return jax.tree_util.keystr(tuple(keys[:-1])) or "<root>"


@dataclasses.dataclass
class _Grouping:
    """What the grouping steps decide, by parameter leaf (the index of a leaf in flatten order)."""

    paths: tuple  # the parameter paths, for messages
    allowed: dict | None  # restrict_to: weight leaf -> its earlier Layer
    claimed: dict[int, list[dict]] = dataclasses.field(default_factory=dict)  # weight -> its explicit tags
    claimed_bias: set[int] = dataclasses.field(default_factory=set)  # the biases of explicit tags
    layer_sites: dict[int, list[dict]] = dataclasses.field(default_factory=dict)  # weight -> its site candidates
    layer_kind: dict[int, str] = dataclasses.field(default_factory=dict)
    reasons: dict[int, str] = dataclasses.field(default_factory=dict)  # leaf -> why it falls back
    bias_of: dict[int, int] = dataclasses.field(default_factory=dict)  # bias leaf -> weight leaf
    bias_row: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    accepted_bias_uses: set[tuple] = dataclasses.field(default_factory=set)  # (add node uid, operand position)
    uses_by_leaf: dict[int, list] = dataclasses.field(default_factory=dict)  # leaf -> its uses (_Use)
    scan_xs: list = dataclasses.field(default_factory=list)  # (leaf, chain, scan uid, position): scanned leaves


def _analyse(fn, params, batch, *, block_max_size=256, restrict_to=None):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    leaves = [leaf for _, leaf in flat]
    paths = tuple(jax.tree_util.keystr(p) for p, _ in flat)
    shapes = tuple(tuple(np.shape(x)) for x in leaves)
    closed, builder, graph = _trace_graph(fn, params, batch)
    an = _Analysis(builder, leaves)
    origin = {graph.inputs[i]: (i, ()) for i in range(len(leaves))}
    an.walk(graph, origin, ())

    uses_by_leaf: dict[int, list[_Use]] = {}
    for u in an.uses:
        uses_by_leaf.setdefault(u.leaf, []).append(u)

    allowed = None
    if restrict_to is not None:
        allowed = {layer.weight: layer for layer in restrict_to.layers}
    gr = _Grouping(paths, allowed, uses_by_leaf=uses_by_leaf, scan_xs=an.scan_xs)
    _claim_explicit(gr, an.explicit)
    _group_sites(gr, an.sites)
    _attach_biases(gr, an)
    if allowed is not None:
        _check_restricted(gr)
    layers = _assemble_layers(gr, flat, uses_by_leaf)
    fallbacks = _fallbacks(gr, layers, shapes, uses_by_leaf, block_max_size)
    tags = LayerTags(tuple(layers), tuple(fallbacks), paths, shapes, _notes(layers))
    return tags, graph, closed


_KIND_USE = {"dense": "a dense weight", "conv": "a convolution kernel", "embedding": "an embedding table"}


def _claim_explicit(gr: _Grouping, explicit: list[dict]) -> None:
    """Explicit tags claim their leaves: each tagged weight is a dense layer (a zero-size one falls back)."""
    for e in explicit:
        if math.prod(e["canon"].shape) == 0:
            gr.reasons[e["weight"]] = "zero size: no entries, so no curvature and no influence"
            continue
        gr.claimed.setdefault(e["weight"], []).append(e)
    gr.claimed_bias = {e["bias"][0] for e in explicit if e["bias"] is not None}
    for w, group in gr.claimed.items():
        if any(not g["canon"].same_as(group[0]["canon"]) for g in group):
            raise ValueError(f"tag_dense: the weight {gr.paths[w]} is tagged with different layouts.")
        biases = {g["bias"][0] if g["bias"] else None for g in group} - {None}
        if len(biases) > 1:
            raise ValueError(f"tag_dense: the weight {gr.paths[w]} is tagged with different biases.")
        gr.layer_sites[w] = group
        gr.layer_kind[w] = "dense"


def _group_sites(gr: _Grouping, candidates: list[dict]) -> None:
    """The site candidates of a weight form one layer if they agree on kind and layout (or match ``allowed``)."""
    site_by_leaf: dict[int, list[dict]] = {}
    for s in candidates:
        site_by_leaf.setdefault(s["weight"], []).append(s)
    allowed = gr.allowed
    for w, group in site_by_leaf.items():
        if w in gr.claimed or w in gr.claimed_bias:
            continue
        if math.prod(group[0]["canon"].shape) == 0:
            gr.reasons[w] = "zero size: no entries, so no curvature and no influence"
            continue
        stray = _stray_slice_use(gr, w, {(g["node"].uid, g["w_pos"]) for g in group})
        if stray is not None:
            gr.reasons[w] = stray
            continue
        if allowed is not None:
            if w not in allowed:
                continue
            group = [g for g in group if g["canon"].same_as(allowed[w].canon)]
            if group:
                gr.layer_sites[w] = group
                gr.layer_kind[w] = allowed[w].kind
            continue
        kinds = {g["kind"] for g in group}
        if len(kinds) > 1:
            uses = " and as ".join(_KIND_USE[k] for k in sorted(kinds))
            gr.reasons[w] = f"used both as {uses}" + (" (tied weights)" if "embedding" in kinds else "")
            continue
        if any(not g["canon"].same_as(group[0]["canon"]) for g in group):
            gr.reasons[w] = "shared by dense uses with different layouts (e.g. x @ W and h @ W.T)"
            continue
        gr.layer_sites[w] = group
        gr.layer_kind[w] = group[0]["kind"]


def _attach_biases(gr: _Grouping, an: _Analysis) -> None:
    """A bias: a leaf whose bias-candidate uses all sit on sites of one layer, with one row layout."""
    weights = set(gr.layer_sites)
    by_bias: dict[int, list[dict]] = {}
    for cand in an.biases:
        by_bias.setdefault(cand["leaf"], []).append(cand)
    for b, cands in by_bias.items():
        if b in weights or b in gr.claimed_bias or b in gr.claimed:
            continue
        owners = {c["site"]["weight"] for c in cands}
        if len(owners) != 1 or next(iter(owners)) not in weights or next(iter(owners)) in gr.claimed:
            if len(owners) > 1:
                gr.reasons.setdefault(b, "added as a bias to the outputs of different layers")
            continue
        w = next(iter(owners))
        if gr.allowed is not None and gr.allowed[w].bias != b:
            continue
        stray = _stray_slice_use(gr, b, {(c["node"].uid, c["pos"]) for c in cands})
        if stray is not None:
            gr.reasons.setdefault(b, stray)
            continue
        rows = [an.bias_row(c) for c in cands]
        if any(r is None for r in rows) or any(not np.array_equal(r, rows[0]) for r in rows):
            gr.reasons.setdefault(b, "added to a layer's output, but not as one value per output feature")
            continue
        if any(c["site"] not in gr.layer_sites[w] for c in cands):
            continue
        # one bias per layer: the first leaf claiming it wins, a second leaf falls back
        if w in gr.bias_of.values():
            gr.reasons.setdefault(b, "a second bias of the same layer")
            continue
        gr.bias_of[b] = w
        gr.bias_row[b] = rows[0]
        for c in cands:
            c["site"]["bias"] = (b, c["chain"], c["node"].uid, c["pos"], None)
            gr.accepted_bias_uses.add((c["node"].uid, c["pos"]))


def _stray_slice_use(gr: _Grouping, leaf, layer_uses: set):
    """Why a leaf scanned over (stacked) cannot be a layer leaf: a use of its slices outside ``layer_uses``.

    The layer reads a stacked leaf's slices from the scan's input (replaced by the parameter value in the
    traced re-evaluation), so every use of a slice inside the scan must be one of the layer's.
    """
    for u in gr.uses_by_leaf.get(leaf, []):
        if split_at_slice(u.chain)[1] is None or u.what in ("scan-const", "scan-xs"):
            continue
        if u.node is None or (u.node.uid, u.pos) not in layer_uses:
            return f"stacked along a lax.scan (scanned input), and its slices are also used by {u.what}"
    return None


def _check_restricted(gr: _Grouping) -> None:
    """With ``restrict_to``, every earlier layer (and its bias) must be found again."""
    paths = gr.paths
    for w, layer in gr.allowed.items():
        if w not in gr.layer_sites:
            raise ValueError(
                f"The layer {layer.name} ({paths[w]}) found in the model is not used the same way by the loss. "
                "Check that loss_fn(params, batch) == output_loss(model_fn(params, batch), batch)."
            )
        if layer.bias is not None and layer.bias not in gr.bias_of:
            raise ValueError(
                f"The bias {paths[layer.bias]} of layer {layer.name} is not added the same way in the loss "
                "as in the model."
            )


def _assemble_layers(gr: _Grouping, flat, uses_by_leaf) -> list[Layer]:
    """One :class:`Layer` per grouped weight, in leaf order, with its sites, bias and other uses."""
    layers = []
    label = {w: _leaf_label(flat[w][0]) for w in gr.layer_sites}
    counts: dict[str, int] = {}
    for name in label.values():
        counts[name] = counts.get(name, 0) + 1
    sid = itertools.count()
    site_uses = set()
    for w in sorted(gr.layer_sites):
        group = gr.layer_sites[w]
        explicit = w in gr.claimed
        b = _layer_bias(gr, w, group, explicit)
        sites = _make_sites(w, group, b, sid, site_uses)
        bperm = _bias_perm(gr, group, explicit, b)
        name = label[w] if counts[label[w]] == 1 and label[w] != "<root>" else gr.paths[w]
        kind = "dense" if explicit else gr.layer_kind[w]
        if gr.allowed is not None:
            name = gr.allowed[w].name
        other = [] if explicit else _other_uses(gr, w, b, uses_by_leaf, site_uses)
        canon = group[0]["canon"]
        scanned = tuple((uid, pos, leaf, chain) for leaf, chain, uid, pos in gr.scan_xs if leaf in (w, b))
        layers.append(
            Layer(
                name,
                kind,
                w,
                b,
                tuple(sites),
                canon,
                bperm,
                "explicit" if explicit else "auto",
                tuple(dict.fromkeys(other)),
                scanned if canon.stack else (),
            )
        )
    return layers


def _layer_bias(gr: _Grouping, w, group, explicit):
    """The bias leaf of weight ``w``'s layer, or ``None``."""
    if explicit:
        bs = [g["bias"][0] for g in group if g["bias"] is not None]
        b = bs[0] if bs else None
    else:
        bs = [k for k, v in gr.bias_of.items() if v == w]
        b = bs[0] if bs else None
    return b


def _make_sites(w, group, b, sid, site_uses: set) -> list[Site]:
    """The :class:`Site` of each candidate (numbered by ``sid``); adds their weight uses to ``site_uses``."""
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
                heads=g.get("heads", 0),
                embed=g.get("embed"),
                sliced=g.get("sliced"),
            )
        )
        site_uses.add((g["node"].uid, g["w_pos"]))
    return sites


def _bias_perm(gr: _Grouping, group, explicit, b):
    """The flat bias index at each output feature, or ``None`` for the identity."""
    if explicit:
        bperm = next((g["bias"][4] for g in group if g["bias"] is not None), None)
    else:
        row = gr.bias_row.get(b) if b is not None else None
        bperm = None if row is None or np.array_equal(row, np.arange(row.size).reshape(row.shape)) else row
    return bperm


def _other_uses(gr: _Grouping, w, b, uses_by_leaf, site_uses) -> list[str]:
    """The uses of a layer's weight and bias outside its sites and bias adds (described for the report)."""
    members = {w} if b is None else {w, b}
    other = []
    for leaf in members:
        for u in uses_by_leaf.get(leaf, []):
            key = (u.node.uid if u.node is not None else None, u.pos)
            if u.what in ("site", "bias") and (key in site_uses or key in gr.accepted_bias_uses):
                continue
            if u.what in ("scan-const", "scan-xs"):
                continue
            other.append(f"{u.what} ({gr.paths[leaf]})" if leaf != w else u.what)
    return other


def _fallbacks(gr: _Grouping, layers, shapes, uses_by_leaf, block_max_size) -> list[Fallback]:
    """A :class:`Fallback` (exact block if small, else diagonal) for every leaf in no layer, with the reason."""
    in_layer = {layer.weight for layer in layers} | {layer.bias for layer in layers if layer.bias is not None}
    fallbacks = []
    for i in range(len(shapes)):
        if i in in_layer:
            continue
        method = "block" if math.prod(shapes[i]) <= block_max_size else "diagonal"
        if i in gr.reasons:
            reason = gr.reasons[i]
        else:
            reason = _unmatched_reason(uses_by_leaf.get(i, []))
        fallbacks.append(Fallback(i, method, reason))
    return fallbacks


def _unmatched_reason(uses) -> str:
    """Why a leaf with no recorded reason falls back, from its uses."""
    whats = [u.what for u in uses if u.what not in ("scan-const", "scan-xs")]
    kinds = list(dict.fromkeys(whats))
    if not kinds:
        reason = "not used by the function (zero gradient)"
    elif set(kinds) <= {"site", "bias"}:
        reason = "a weight or bias use that could not be matched to one layer"
    else:
        readable = [k.replace("site", "a dense/conv operand").replace("bias", "an add") for k in kinds]
        reason = "used by " + ", ".join(readable)
    return reason


def _notes(layers) -> tuple:
    """The report's notes on repeated layers (inside ``lax.scan``, or shared)."""
    notes: list[str] = []
    for layer in layers:
        if layer.steps:
            notes.append(
                f"{layer.name} is stacked along a lax.scan over {layer.steps} steps (scan over layers): one layer, "
                "with its own Kronecker factors, per step."
            )
        if any(len(s.stack) > (s.sliced is not None) for s in layer.sites):
            notes.append(
                f"{layer.name} is used inside lax.scan: each loop step counts as extra locations of one repeated layer."
            )
        if len(layer.sites) > 1:
            notes.append(f"{layer.name} is shared by {len(layer.sites)} uses: treated as one repeated layer.")
    return tuple(dict.fromkeys(notes))
