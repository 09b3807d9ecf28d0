"""Step 3 of the analysis: re-evaluate the traced graph with perturbations at the layer outputs.

:class:`Tracer` does it, :func:`trace_layers` builds one (with :func:`~jaxinf.layers.find_layers`).

A zero perturbation ``δ`` is added at each layer output and the layer inputs are recorded: ``∂f/∂δ`` is the
output gradient ``g``, the recorded inputs are ``a``, and the per-example weight gradient is ``Σ_locations a gᵀ``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxinf.layers.find import _analyse
from jaxinf.layers.graph import _bind, _example, _Graph, _Lit, apply_chain, split_at_slice
from jaxinf.layers.primitive import dense_tag_p
from jaxinf.layers.report import LayerTags

PyTree = Any


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
        for s in self.sites.values():  # a stacked leaf's slices: the scan's input is replaced (below)
            if s.w_pos is not None and s.sliced is None:
                self.overrides.setdefault(s.node_uid, {})[s.w_pos] = (s.weight, s.w_chain)
            if s.bias is not None and s.bias[2] is not None and split_at_slice(s.bias[1])[1] is None:
                leaf, chain, uid, pos, _ = s.bias
                self.overrides.setdefault(uid, {})[pos] = (leaf, chain)
        for layer in tags.layers:
            for uid, pos, leaf, chain in layer.scan_inputs:
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
