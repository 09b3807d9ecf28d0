"""Step 2 of the analysis, matching: recognise one layer use of a parameter leaf and record it as a candidate.

:class:`_Matcher` checks one use (a ``dot_general``, ``conv_general_dilated`` or ``gather`` with a parameter
operand, an ``add`` of a parameter to such an output, an explicit :func:`~jaxinf.layers.tag_dense`) and
records it as a candidate; :class:`jaxinf.layers.walk._Analysis` walks the graph and calls it.
"""

from __future__ import annotations

import math

import numpy as np

from jaxinf.layers.graph import _Builder, _Lit, probe_chain, split_at_slice
from jaxinf.layers.structures import Site, _canon_from_index


class _Matcher:
    """Recognises single layer uses in the graph and keeps the candidates (site, bias, explicit tag)."""

    def __init__(self, builder: _Builder, params_leaves):
        self.b = builder
        self.params = params_leaves
        self.sites: list[dict] = []  # site candidates
        self.biases: list[dict] = []  # bias candidates
        self.explicit: list[dict] = []
        self.rejected: dict[int, str] = {}  # node uid -> why a dot/conv with a parameter is not a layer
        self.scan_xs: list[tuple] = []  # (leaf, chain, scan node uid, operand position): leaves scanned over

    def shape(self, ref):
        return tuple(ref.val.shape) if isinstance(ref, _Lit) else tuple(self.b.avals[ref].shape)

    def _probe(self, leaf, chain):
        """The flat index of each entry of leaf ``leaf`` where ``chain`` takes it (NumPy: nothing compiled)."""
        shape = tuple(np.shape(self.params[leaf]))
        return probe_chain(np.arange(math.prod(shape), dtype=np.int64).reshape(shape), chain)

    def _probe_matrix(self, org, axes, d_in, d_out) -> np.ndarray:
        """The probe of a weight use with its axes ordered ``axes`` as a ``([L,] d_in, d_out)`` index matrix.

        A weight sliced by a ``lax.scan`` (stacked) probes to one slice per step: a leading axis of ``L``.
        """
        probe = self._probe(*org)
        lead = probe.ndim - len(axes)
        probe = np.transpose(probe, tuple(range(lead)) + tuple(lead + a for a in axes))
        return probe.reshape(probe.shape[:lead] + (d_in, d_out))

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
        probe = self._probe_matrix(org, w_bat + w_con + w_free, d_in, d_out)
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
        probe = self._probe_matrix(org, perm, d_in, d_out)
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
        cut = split_at_slice(org[1])[1]
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
            sliced=None if cut is None else cut.level,
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
        if split_at_slice(org[2][1])[1] is not None:
            raise ValueError(
                "tag_dense was given one step's slice of a weight stacked along a lax.scan (scan over layers); "
                "drop the tag: a stacked weight used by dot_general, a convolution or a gather is tagged "
                "automatically, one layer per step."
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
        A bias stacked along a ``lax.scan`` (sliced by the scan that slices the weight) gives ``(L, d_out)``.
        """
        site = cand["site"]
        cut = split_at_slice(cand["chain"])[1]
        if (None if cut is None else cut.level) != site.get("sliced") or site.get("heads"):
            return None
        probe = self._probe(cand["leaf"], cand["chain"])
        steps = [probe] if cut is None else list(probe)
        if math.prod(np.shape(self.params[cand["leaf"]])) != len(steps) * site["canon"].d_out:
            return None
        rows = [self._bias_step_row(cand, p) for p in steps]
        if any(r is None for r in rows):
            return None
        row = rows[0] if cut is None else np.stack(rows)
        if not np.array_equal(np.sort(row.ravel()), np.arange(row.size)):
            return None
        return row

    def _bias_step_row(self, cand, probe) -> np.ndarray | None:
        """The bias index at each output feature of one step (the same at every location), or ``None``."""
        site, out_chain = cand["site"], cand.get("out_chain", ())
        added = self.shape(cand["node"].inputs[1 - cand["pos"]])
        try:  # `add` broadcasts size-1 axes (Flax's reshaped bias)
            probe = np.broadcast_to(probe, added)
        except ValueError:
            return None
        if out_chain:
            size = math.prod(site["out_shape"])
            where = probe_chain(np.arange(size).reshape(site["out_shape"]), out_chain)
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
        rows = tmp._canon_out(probe, xp=np)  # NumPy: nothing compiled
        if not np.all(rows == rows[:1]):
            return None
        return rows[0]
