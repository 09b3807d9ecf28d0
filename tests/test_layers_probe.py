"""The layer analysis probes index arrays on the host: nothing compiled (issue 15, "first calls").

Matching a layer use pushes an index array of the parameter leaf through the
layout operations between the leaf and its use (``graph.probe_chain``), and a
bias candidate through the layer's output layout (``Site._canon_out``). Bound
eagerly, each primitive compiled a program of its own (8 on the benchmark
MLP); on NumPy they compile nothing. Checked here: the same arrays as the
eager JAX path for every layout primitive, a chain through a ``lax.scan``
slice, and no compile event.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.layers.graph import LAYOUT_PRIMITIVES, ScanSlice, _trace_graph, apply_chain, probe_chain
from jaxinf.layers.structures import Canon, Site
from tests.test_first_calls import _COUNT  # the backend-compile counter (its listener is registered there)


def _chain(fn, shape):
    """The graph nodes of ``fn`` applied to an array of ``shape`` (every one a layout primitive)."""
    graph = _trace_graph(lambda w, _: fn(w), jnp.zeros(shape), (jnp.zeros((1, 1)),))[2]
    assert all(node.name in LAYOUT_PRIMITIVES for node in graph.nodes), [n.name for n in graph.nodes]
    return tuple(graph.nodes)


def _eager(base, chain):
    with jax.ensure_compile_time_eval():
        return np.asarray(apply_chain(jnp.asarray(base), chain, probe=True))


def _host(base, chain):
    jax.clear_caches()
    _COUNT["on"], _COUNT["n"] = True, 0
    try:
        return probe_chain(base, chain), _COUNT["n"]
    finally:
        _COUNT["on"] = False


CHAINS = {
    "transpose": (lambda w: w.T, (3, 4)),
    "reshape": (lambda w: w.reshape(2, 6), (3, 4)),
    "convert": (lambda w: w.astype(jnp.float32).reshape(12), (3, 4)),
    "squeeze": (lambda w: jnp.squeeze(w, 1), (3, 1, 4)),
    "expand": (lambda w: jnp.expand_dims(w, 1), (3, 4)),
    "broadcast": (lambda w: jnp.broadcast_to(w[:, None, :], (3, 5, 4)), (3, 4)),
    "mixed": (lambda w: jnp.transpose(w.reshape(4, 3, 2), (2, 0, 1))[None].astype(jnp.float32), (6, 4)),
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_a_probe_is_the_eager_chain_and_compiles_nothing(name):
    fn, shape = CHAINS[name]
    chain = _chain(fn, shape)
    base = np.arange(np.prod(shape), dtype=np.int64).reshape(shape)
    got, compiled = _host(base, chain)
    want = _eager(base, chain)
    assert compiled == 0
    assert got.shape == want.shape and np.array_equal(got, want)
    assert np.array_equal(got, np.asarray(fn(base)).astype(np.int64))  # and what the function itself does


def test_a_chain_through_a_scan_slice_probes_each_step():
    """``(transpose, scan slice, reshape)``: the stacked ``(L, ...)`` steps, as :func:`apply_chain`'s ``vmap``."""
    before = _chain(lambda w: jnp.transpose(w, (1, 0, 2)), (3, 4, 5))
    after = _chain(lambda s: s.reshape(15), (3, 5))
    chain = (*before, ScanSlice(0), *after)
    base = np.arange(60, dtype=np.int64).reshape(3, 4, 5)
    got, compiled = _host(base, chain)
    assert compiled == 0
    assert got.shape == (4, 15) and np.array_equal(got, _eager(base, chain))


@pytest.mark.parametrize("kind", ["dense", "heads", "conv"])
def test_canon_out_on_the_host_is_the_jax_one(kind):
    out_shape = {"dense": (2, 3, 4), "heads": (2, 3, 5, 4), "conv": (2, 4, 3, 3)}[kind]
    kw = {"dense": dict(out_perm=(0, 1, 2)), "heads": dict(out_perm=(0, 2, 1, 3), heads=3)}.get(kind, {})
    if kind == "conv":
        kw = dict(conv={"out_spec": (0, 1, 2, 3)})
    d_out = out_shape[-1] if kind != "conv" else out_shape[1]
    canon = Canon((1,), 1, d_out, None, None)
    site = Site(0, 0, "conv" if kind == "conv" else "dense", 0, 0, None, (), (), out_shape, None, (), canon, **kw)
    g = np.arange(np.prod(out_shape), dtype=np.int64).reshape(out_shape)
    assert np.array_equal(site._canon_out(g, xp=np), np.asarray(site._canon_out(jnp.asarray(g))))


def test_finding_the_layers_of_a_flax_model_compiles_nothing():
    """A convolution and a dense layer with Flax's reshaped biases: found, and no program compiled."""
    import flax.linen as nn

    from jaxinf.layers import find_layers

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.tanh(nn.Conv(3, (3, 3))(x))
            return nn.Dense(2)(x.reshape((x.shape[0], -1)))

    net, x = Net(), jnp.ones((2, 5, 5, 1))
    params = net.init(jax.random.key(0), x)
    jax.clear_caches()
    _COUNT["on"], _COUNT["n"] = True, 0
    try:
        tags = find_layers(lambda p, b: net.apply(p, b[0]), params, (x,))
    finally:
        _COUNT["on"] = False
    assert _COUNT["n"] == 0
    kinds = sorted(row[2] for row in tags.rows())
    assert kinds == ["conv bias (auto)", "conv weight (auto)", "dense bias (auto)", "dense weight (auto)"], kinds
