"""Step 2 of the analysis, walking: follow every parameter leaf to its uses, matching the layer uses.

:class:`_Analysis` walks the graph, following each leaf through layout-only operations (and into ``lax.scan``
bodies, as a loop constant or, sliced per step, as a scanned input), has :class:`~jaxinf.layers.match._Matcher`
match each use, and records every use it cannot match (for the fallback reasons and the "also used by" column
of the report).
"""

from __future__ import annotations

from jaxinf.layers.graph import LAYOUT_PRIMITIVES, ScanSlice, _Builder, _Graph, split_at_slice
from jaxinf.layers.match import _Matcher
from jaxinf.layers.primitive import dense_tag_p

# Layout operations that move the entries of a layer's output one to one (a bias may be added after them).
_BIJECTIVE_LAYOUT = frozenset({"transpose", "reshape", "squeeze", "expand_dims", "convert_element_type", "copy"})


class _Use:
    __slots__ = ("leaf", "chain", "node", "pos", "what", "in_scan")

    def __init__(self, leaf, chain, node, pos, what, in_scan):
        self.leaf, self.chain, self.node, self.pos, self.what, self.in_scan = leaf, chain, node, pos, what, in_scan


class _Analysis(_Matcher):
    """Walks the graph from the parameter leaves, matching layer uses and recording every use."""

    def __init__(self, builder: _Builder, params_leaves):
        super().__init__(builder, params_leaves)
        self.uses: list[_Use] = []  # every non-layout use of a parameter-derived value

    def walk(self, g: _Graph, origin: dict, stack: tuple) -> None:
        site_out: dict[int, dict] = {}
        for node in g.nodes:
            org = [origin.get(r) if isinstance(r, int) else None for r in node.inputs]
            if self._follow_layout(node, org, origin):
                continue
            if node.name in _BIJECTIVE_LAYOUT and node.inputs and node.inputs[0] in site_out:
                cand, chain = site_out[node.inputs[0]]  # a layout operation on a layer output (a bias may follow)
                site_out[node.outputs[0]] = (cand, chain + (node,))
            handled = self._match(node, org, stack, site_out)
            for i, o in enumerate(org):
                if o is not None and i not in handled:
                    self.uses.append(_Use(o[0], o[1], node, i, self._describe_use(node, i, stack), bool(stack)))
        for ref in g.outputs:
            if isinstance(ref, int) and ref in origin:
                leaf, chain = origin[ref]
                self.uses.append(_Use(leaf, chain, None, None, "the function's output", bool(stack)))

    @staticmethod
    def _follow_layout(node, org, origin) -> bool:
        """Extend a leaf's chain through a layout-only operation on it; ``True`` if ``node`` is one."""
        if node.name in LAYOUT_PRIMITIVES and org and org[0] is not None and all(o is None for o in org[1:]):
            if len(node.outputs) == 1:
                origin[node.outputs[0]] = (org[0][0], org[0][1] + (node,))
                return True
        return False

    def _match(self, node, org, stack, site_out) -> set[int]:
        """Match ``node`` as a tag, dense, conv or bias use (or walk into a scan); the operand positions it handled."""
        name = node.name
        if node.prim is dense_tag_p:
            return self._match_tag(node, org, stack)
        if name == "dot_general" and (org[0] is None) != (org[1] is None):
            return self._match_dot(node, org, stack, site_out)
        if name == "conv_general_dilated" and org[1] is not None and org[0] is None:
            return self._match_conv(node, org, stack, site_out)
        if name == "gather" and org[0] is not None and org[1] is None:
            return self._match_site(node, 0, self._embed(node, org[0], stack), site_out, stack)
        if name == "add" and len(node.inputs) == 2:
            return self._match_add(node, org, stack, site_out)
        if name == "scan" and node.body is not None:
            return self._walk_scan(node, org, stack)
        return set()

    def _match_tag(self, node, org, stack) -> set[int]:
        self._explicit(node, org, stack)
        handled = {i for i in range(1, len(node.inputs))}
        for i in range(2, len(node.inputs)):
            if org[i] is not None:
                self.uses.append(_Use(org[i][0], org[i][1], node, i, "tag", bool(stack)))
        return handled

    def _match_dot(self, node, org, stack, site_out) -> set[int]:
        w_pos = 0 if org[0] is not None else 1
        return self._match_site(node, w_pos, self._dense(node, w_pos, org[w_pos], stack), site_out, stack)

    def _match_conv(self, node, org, stack, site_out) -> set[int]:
        return self._match_site(node, 1, self._conv(node, org[1], stack), site_out, stack)

    def _match_site(self, node, w_pos, cand, site_out, stack) -> set[int]:
        """Record a matched site (``cand``, or ``None``: no match) whose weight is operand ``w_pos``."""
        if cand is None:
            return set()
        site_out[node.outputs[0]] = (cand, ())
        self.uses.append(_Use(cand["weight"], cand["chain"], node, w_pos, "site", bool(stack)))
        return {w_pos}

    def _match_add(self, node, org, stack, site_out) -> set[int]:
        handled: set[int] = set()
        for pos in (0, 1):
            other = node.inputs[1 - pos]
            if org[pos] is not None and isinstance(other, int) and other in site_out and org[1 - pos] is None:
                site, out_chain = site_out[other]
                self.biases.append(
                    dict(site=site, leaf=org[pos][0], chain=org[pos][1], node=node, pos=pos, out_chain=out_chain)
                )
                self.uses.append(_Use(org[pos][0], org[pos][1], node, pos, "bias", bool(stack)))
                handled = {pos}
        return handled

    def _walk_scan(self, node, org, stack) -> set[int]:
        """Walk a ``lax.scan`` body with the leaves passed as loop constants or scanned inputs (handled).

        A leaf passed as a scanned input (``xs``: a weight stacked along a scan over layers) reaches the body
        one slice per step: its chain gets a :class:`~jaxinf.layers.graph.ScanSlice` (at most one per chain;
        a slice scanned again is an unmatched use).
        """
        handled: set[int] = set()
        nc, ncar = node.params["num_consts"], node.params["num_carry"]
        inner = {}
        for i in range(nc):
            if org[i] is not None:
                inner[node.body.inputs[i]] = org[i]
                self.uses.append(_Use(org[i][0], org[i][1], node, i, "scan-const", bool(stack)))
                handled.add(i)
        for i in range(nc + ncar, len(node.inputs)):
            if org[i] is not None and split_at_slice(org[i][1])[1] is None:
                inner[node.body.inputs[i]] = (org[i][0], org[i][1] + (ScanSlice(len(stack)),))
                self.uses.append(_Use(org[i][0], org[i][1], node, i, "scan-xs", bool(stack)))
                self.scan_xs.append((org[i][0], org[i][1], node.uid, i))
                handled.add(i)
        self.walk(node.body, inner, stack + (node.params["length"],))
        return handled

    def _describe_use(self, node, i, stack) -> str:
        """How the report names an unmatched use of a leaf as operand ``i`` of ``node``."""
        name = node.name
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
        return what
