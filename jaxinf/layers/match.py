"""Step 2 of the analysis: follow every parameter leaf to its uses and match the dense/conv/bias uses.

:class:`_Matcher` checks one use (a ``dot_general`` or ``conv_general_dilated`` with a parameter operand, an
``add`` of a parameter to such an output, an explicit :func:`~jaxinf.layers.tag_dense`) and records it as a
candidate; :class:`_Analysis` walks the graph, following each leaf through layout-only operations, and records
every use it cannot match (for the fallback reasons and the "also used by" column of the report).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.layers.graph import LAYOUT_PRIMITIVES, _Builder, _Graph, _Lit, apply_chain
from jaxinf.layers.primitive import dense_tag_p
from jaxinf.layers.structures import Site, _canon_from_index

# Layout operations that move the entries of a layer's output one to one (a bias may be added after them).
_BIJECTIVE_LAYOUT = frozenset({"transpose", "reshape", "squeeze", "expand_dims", "convert_element_type", "copy"})


class _Use:
    __slots__ = ("leaf", "chain", "node", "pos", "what", "in_scan")

    def __init__(self, leaf, chain, node, pos, what, in_scan):
        self.leaf, self.chain, self.node, self.pos, self.what, self.in_scan = leaf, chain, node, pos, what, in_scan


class _Matcher:
    """Recognises single layer uses in the graph and keeps the candidates (site, bias, explicit tag)."""

    def __init__(self, builder: _Builder, params_leaves):
        self.b = builder
        self.params = params_leaves
        self.sites: list[dict] = []  # site candidates
        self.biases: list[dict] = []  # bias candidates
        self.explicit: list[dict] = []
        self.rejected: dict[int, str] = {}  # node uid -> why a dot/conv with a parameter is not a layer

    def shape(self, ref):
        return tuple(ref.val.shape) if isinstance(ref, _Lit) else tuple(self.b.avals[ref].shape)

    def _probe(self, leaf, chain):
        shape = tuple(np.shape(self.params[leaf]))
        base = np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
        dtype = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
        with jax.ensure_compile_time_eval():  # concrete even when fitting under an outer jit
            return np.asarray(apply_chain(jnp.asarray(base, dtype), chain, probe=True))

    def _dense(self, node, w_pos, org, stack):
        """A ``dot_general`` with a weight operand; batch dimensions (per-head weights) make heads locations.

        With batch (head) axes ``h`` in ``s[h, k] = Σ_c x[h, c] W[h, c, k]``, the weight is one layer with
        ``d_in = H·C`` rows and each head a location whose input ``e_h ⊗ x[h]`` is zero outside head ``h``'s
        rows: the per-example gradient ``Σ_h (e_h ⊗ x_h) g_hᵀ`` is exact, the factor ``A`` block-diagonal.
        """
        (lc, rc), (lb, rb) = node.params["dimension_numbers"]
        x_pos = 1 - w_pos
        x_shape, w_shape = self.shape(node.inputs[x_pos]), self.shape(node.inputs[w_pos])
        x_con, w_con = (tuple(lc), tuple(rc)) if x_pos == 0 else (tuple(rc), tuple(lc))
        x_bat, w_bat = (tuple(lb), tuple(rb)) if x_pos == 0 else (tuple(rb), tuple(lb))
        x_free = tuple(i for i in range(len(x_shape)) if i not in x_con + x_bat)
        w_free = tuple(i for i in range(len(w_shape)) if i not in w_con + w_bat)
        if not w_free or not x_con:
            self._reject(org, node, "a dot_general without output features or contraction", stack)
            return None
        heads = math.prod(w_shape[i] for i in w_bat)
        d_in = heads * math.prod(w_shape[i] for i in w_con)
        d_out = math.prod(w_shape[i] for i in w_free)
        probe = np.transpose(self._probe(*org), w_bat + w_con + w_free).reshape(d_in, d_out)
        canon = _canon_from_index(np.shape(self.params[org[0]]), probe)
        if canon is None:
            self._reject(org, node, "a dot_general after a broadcast of the weight", stack)
            return None
        nb, nx, nw = len(x_bat), len(x_free), len(w_free)
        free = tuple(range(nb, nb + nx + nw)) if x_pos == 0 else tuple(range(nb + nw, nb + nw + nx))
        out_perm = tuple(range(nb)) + (free if x_pos == 0 else free + tuple(range(nb, nb + nw)))
        kw = {"x_perm": x_bat + x_free + x_con, "out_perm": out_perm, "heads": heads if w_bat else 0}
        return self._site(node, "dense", org, x_pos, w_pos, canon, stack, **kw)

    def _embed(self, node, org, stack):
        """A ``gather`` of whole rows of a parameter table by integer ids (``jnp.take(table, ids, axis=0)``).

        The layer ``s = Wᵀ onehot(id)``: ``d_in`` = the rows (vocabulary), ``d_out`` = the row size; its input
        factor ``A = E[Σ_t onehot onehotᵀ]`` is diagonal (the id counts).
        """
        dn, table = node.params["dimension_numbers"], self.shape(node.inputs[0])
        ids, out = self.shape(node.inputs[1]), tuple(self.b.avals[node.outputs[0]].shape)
        whole_rows = len(table) == 2 and tuple(node.params["slice_sizes"]) == (1, table[1])
        if not (
            whole_rows
            and tuple(dn.collapsed_slice_dims) == (0,)
            and tuple(dn.start_index_map) == (0,)
            and tuple(dn.offset_dims) == (len(out) - 1,)
            and not tuple(dn.operand_batching_dims)
            and ids[-1:] == (1,)
        ):
            self._reject(org, node, "a gather that does not take whole rows of a 2-D table by integer ids", stack)
            return None
        canon = _canon_from_index(np.shape(self.params[org[0]]), self._probe(*org))
        if canon is None:
            self._reject(org, node, "a gather from a broadcast of the table", stack)
            return None
        mode = "clip" if "CLIP" in str(node.params["mode"]) or "PROMISE" in str(node.params["mode"]) else "fill"
        return self._site(node, "embedding", org, 1, 0, canon, stack, out_perm=tuple(range(len(out))), embed=mode)

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
        """Flat bias index at each output feature if ``cand`` is a valid bias add, else ``None``.

        The add may come after layout operations on the layer's output (``cand["out_chain"]``: Equinox's
        ``W @ x + b`` under ``vmap`` transposes first); their index map takes the bias back to the output.
        """
        site, out_chain = cand["site"], cand.get("out_chain", ())
        shape = np.shape(self.params[cand["leaf"]])
        probe = self._probe(cand["leaf"], cand["chain"])
        if math.prod(shape) != site["canon"].d_out or site.get("heads"):
            return None
        added = self.shape(cand["node"].inputs[1 - cand["pos"]])
        try:  # `add` broadcasts size-1 axes (Flax's reshaped bias)
            probe = np.broadcast_to(probe, added)
        except ValueError:
            return None
        if out_chain:
            size = math.prod(site["out_shape"])
            with jax.ensure_compile_time_eval():
                where = np.asarray(apply_chain(jnp.arange(size).reshape(site["out_shape"]), out_chain, probe=True))
            if not np.array_equal(np.sort(where.ravel()), np.arange(size)):
                return None
            back = np.empty(size, probe.dtype)
            back[where.ravel()] = probe.ravel()
            probe = back.reshape(site["out_shape"])
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
            heads=site.get("heads", 0),
        )
        with jax.ensure_compile_time_eval():
            rows = np.asarray(tmp._canon_out(jnp.asarray(probe)))
        if not np.all(rows == rows[:1]):
            return None
        row = rows[0]
        if not np.array_equal(np.sort(row), np.arange(row.size)):
            return None
        return row


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
        """Walk a ``lax.scan`` body with the leaves passed as loop constants; those positions are handled."""
        handled: set[int] = set()
        nc = node.params["num_consts"]
        inner = {}
        for i in range(nc):
            if org[i] is not None:
                inner[node.body.inputs[i]] = org[i]
                self.uses.append(_Use(org[i][0], org[i][1], node, i, "scan-const", bool(stack)))
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
