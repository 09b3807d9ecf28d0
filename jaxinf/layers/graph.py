"""Step 1 of the analysis: trace the loss to a jaxpr and flatten it into a graph.

Calls made by ``jax.jit`` and ``jax.checkpoint`` are inlined and loop bodies
of ``lax.scan`` kept as sub-graphs; :func:`apply_chain` re-applies a chain of
layout-only graph nodes (the way a parameter leaf reaches its use).
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

# Operations that only move, copy or re-type the entries of their operand.
LAYOUT_PRIMITIVES = frozenset(
    {"transpose", "reshape", "convert_element_type", "copy", "copy_p", "broadcast_in_dim", "squeeze", "expand_dims"}
)
_VALUE_ONLY = frozenset({"convert_element_type", "copy", "copy_p"})
# Calls whose body is inlined when building the graph.
_INLINE = frozenset({"jit", "pjit", "closed_call", "core_call", "call", "remat2", "checkpoint", "remat"})


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


class ScanSlice:
    """A link of a chain: the slice of one step of a ``lax.scan`` scanned input (a stacked weight).

    ``level`` is the index of that scan among the scans enclosing the use (outermost 0).
    """

    __slots__ = ("level",)
    name = "scan-slice"

    def __init__(self, level: int):
        self.level = level


def split_at_slice(chain) -> tuple:
    """``(before, ScanSlice or None, after)``: a chain split at its scan slice (if it has one)."""
    for i, link in enumerate(chain):
        if isinstance(link, ScanSlice):
            return tuple(chain[:i]), link, tuple(chain[i + 1 :])
    return tuple(chain), None, ()


def _layout_np(node: _Node, x: np.ndarray):
    """``node`` (a layout primitive) applied to a NumPy array, or ``None`` for one not written here.

    Host-side: evaluating the primitive on a concrete array would compile one XLA program per primitive and shape.
    """
    p, name = node.params, node.name
    if name in _VALUE_ONLY:
        return x
    if name == "transpose":
        return np.transpose(x, tuple(p["permutation"]))
    if name == "reshape" and p.get("dimensions") is None:
        return np.reshape(x, tuple(p["new_sizes"]))
    if name == "squeeze":
        return np.squeeze(x, axis=tuple(p["dimensions"]))
    if name == "broadcast_in_dim":
        shape, dims = tuple(p["shape"]), tuple(p["broadcast_dimensions"])
        expanded = [1] * len(shape)
        for axis, dim in enumerate(dims):
            expanded[dim] = x.shape[axis]
        return np.broadcast_to(np.reshape(x, expanded), shape)
    return None


def probe_chain(value: np.ndarray, chain) -> np.ndarray:
    """:func:`apply_chain` with ``probe=True`` of a NumPy array, on the host: no program is compiled.

    Each layout primitive is applied with its NumPy equivalent (dtype conversions skipped, so an index array
    keeps its integers); a primitive without one is bound eagerly (``jax.ensure_compile_time_eval``). A
    :class:`ScanSlice` maps the array to the stacked ``(L, ...)`` slices, as :func:`apply_chain` does.
    """
    before, cut, after = split_at_slice(chain)
    if cut is not None:
        value = probe_chain(value, before)
        return np.stack([probe_chain(step, after) for step in value])
    value = np.asarray(value)
    for node in chain:
        out = _layout_np(node, value)
        if out is None:
            with jax.ensure_compile_time_eval():
                out = np.asarray(_bind(node, [jnp.asarray(value)])[0])
        value = out
    return value


def apply_chain(value, chain, *, probe: bool = False):
    """Apply a chain of layout operations (graph nodes) to ``value``.

    With ``probe=True`` dtype conversions are skipped, so an integer index
    array can be pushed through to see where each entry lands. A chain with a
    :class:`ScanSlice` maps ``value`` to the stacked ``(L, ...)`` slices
    (each step's slice pushed through the rest of the chain).
    """
    before, cut, after = split_at_slice(chain)
    if cut is not None:
        return jax.vmap(lambda step: apply_chain(step, after, probe=probe))(apply_chain(value, before, probe=probe))
    for node in chain:
        if probe and node.name in _VALUE_ONLY:
            continue
        value = _bind(node, [value])[0]
    return value


def _example(batch):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *np.shape(a)[1:]), jnp.result_type(a)), batch)


def _trace_graph(fn, params, batch):
    """Trace ``fn(params, batch)`` for a batch of one example: ``(closed jaxpr, builder, graph)``."""
    closed = jax.make_jaxpr(fn)(params, _example(batch))
    builder = _Builder()
    graph = builder.graph(closed.jaxpr, closed.consts)
    return closed, builder, graph
