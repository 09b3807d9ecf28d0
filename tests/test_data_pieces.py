"""Batches cut into pieces of one size with a mask: in memory (``rest_in_pieces``) and on the host (``host_pieces``).

K-FAC/EK-FAC's fits visit every batch at one size so that their per-example statistics compile once (issue 15):
a smaller batch is padded by repeating its last example (masked out), a larger one cut. Checked here against the
plain concatenation of the batches: every example once with mask ``True`` and its global index, padding masked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring

from jaxinf.core.data import as_batches
from jaxinf.core.pieces import host_pieces, rest_in_pieces


def _unpad(pieces, indices, mask):
    """The examples and indices of the unmasked rows, in order."""
    keep = np.asarray(mask).reshape(-1)
    flat = [np.asarray(a).reshape(-1, *np.shape(a)[2:])[keep] for a in pieces]
    return flat, np.asarray(indices).reshape(-1)[keep]


@pytest.mark.parametrize("sizes", [[4, 4, 3], [4, 4, 11, 2], [3, 9, 9], [5]])
def test_rest_pieces_hold_every_rest_example_once_with_its_global_index(sizes):
    n = sum(sizes)
    x, y = np.arange(2 * n, dtype=np.float32).reshape(n, 2), np.arange(n)
    cuts = np.cumsum(sizes)[:-1]
    data = as_batches(list(zip(np.split(x, cuts), np.split(y, cuts))) if len(sizes) > 1 else (x, y))
    size = data.sizes()[0] if data.num_stacked else max(sizes)
    pieces, indices, mask = rest_in_pieces(data, size)
    assert np.shape(mask)[1] == size and np.shape(pieces[0])[:2] == np.shape(mask)
    (px, py), at = _unpad(pieces, indices, mask)
    first = data.num_stacked * size
    rest = np.concatenate([np.asarray(b[1]) for b in data.rest])  # the rest batches' labels, in stored order
    np.testing.assert_array_equal(py, rest)
    np.testing.assert_array_equal(at, np.arange(first, first + len(rest)))
    np.testing.assert_array_equal(px, x[py])
    padded = ~np.asarray(mask)
    assert np.all(np.isfinite(np.asarray(pieces[0])[padded]))  # padding repeats a real example: finite


def test_rest_pieces_refuse_a_size_other_than_the_stacked_batches():
    data = as_batches([np.ones((4, 2)), np.ones((4, 2)), np.ones((3, 2))])
    with pytest.raises(ValueError, match="stacked batches hold 4"):
        rest_in_pieces(data, 3)


@pytest.mark.parametrize("as_jax", [False, True])
@pytest.mark.parametrize("n", [3, 8, 19])
def test_host_pieces_pad_and_cut_one_batch(n, as_jax):
    x = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    batch = {"x": jnp.asarray(x) if as_jax else x}
    indices = np.arange(100, 100 + n, dtype=np.uint32)
    parts = list(host_pieces(batch, indices, 8))
    assert len(parts) == -(-n // 8)
    for piece, at, mask in parts:
        assert np.shape(piece["x"]) == (8, 2) and at.shape == (8,) and mask.shape == (8,)
        assert isinstance(piece["x"], np.ndarray) != as_jax or n == 8
    got_x = np.concatenate([np.asarray(p["x"])[m] for p, _, m in parts])
    got_at = np.concatenate([at[m] for _, at, m in parts])
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_at, indices)
    if n == 8:
        assert parts[0][0] is batch  # a batch of the piece size is passed on unchanged


_EVENTS = {"on": False, "seen": []}


def _record(event: str, *args, **kwargs) -> None:
    if _EVENTS["on"] and event in ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_hits"):
        _EVENTS["seen"].append(event)


monitoring.register_event_listener(_record)
monitoring.register_event_duration_secs_listener(_record)


def test_host_pieces_of_device_arrays_compile_nothing_and_a_sharded_batch_is_cut_on_its_devices():
    x = np.arange(38.0, dtype=np.float32).reshape(19, 2)
    one = {"x": jax.device_put(x, jax.devices()[1])}  # committed to a device other than the default
    _EVENTS["on"], _EVENTS["seen"] = True, []
    try:  # neither a compile nor a persistent-cache hit: no program at all
        parts = [jax.block_until_ready(p) for p in host_pieces(one, np.arange(19, dtype=np.uint32), 8)]
    finally:
        _EVENTS["on"] = False
    assert _EVENTS["seen"] == []
    assert all(p["x"].devices() == {jax.devices()[1]} for p, _, _ in parts)
    np.testing.assert_array_equal(np.concatenate([np.asarray(p["x"])[m] for p, _, m in parts]), x)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    spread = {"x": jax.device_put(x[:16], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))}
    parts = list(host_pieces(spread, np.arange(16, dtype=np.uint32), 24))
    assert len(parts) == 1 and parts[0][0]["x"].shape == (24, 2)
    np.testing.assert_array_equal(np.asarray(parts[0][0]["x"])[:16], x[:16])
    np.testing.assert_array_equal(np.asarray(parts[0][0]["x"])[16:], np.repeat(x[15:16], 8, 0))
    np.testing.assert_array_equal(parts[0][2], np.arange(24) < 16)
