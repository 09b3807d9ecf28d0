"""Save and load fitted solver states, so that fitting and scoring can run in separate jobs.

A solver state is a pytree whose *leaves* are arrays (eigenvectors,
Kronecker factors, a sketch, the training data of a matrix-free solver) and
whose *structure* carries static metadata that cannot be serialised
portably (parameter layouts, traced layer plans holding functions). So only
the leaves are written, with their key paths, shapes and dtypes; loading
rebuilds the state from a *skeleton* made in the new job:

    skeleton = state_skeleton(solver, operator)   # jax.eval_shape: no work done
    state = load_state(path, skeleton)

where ``operator`` is built exactly as for fitting (same ``loss_fn``,
params, curvature, blocks, damping and data *shapes*); no curvature product
runs. :func:`load_state` checks that every leaf's path, shape and dtype
match and says which one does not.

Format: one ``.npz`` file (numpy, uncompressed) holding the leaves and a
JSON header; written to a temporary file and renamed, so a killed job never
leaves a truncated state. PRNG-key leaves and low-precision dtypes (bfloat16)
round-trip. In a multi-process run, process 0 writes (leaves sharded over
processes are gathered first); every process reads.

Examples:
  >>> import jax.numpy as jnp, jaxinf, tempfile, os
  >>> from jaxinf.scale import save_state, load_state, state_skeleton
  >>> loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
  >>> op = jaxinf.curvature_operator(loss, jnp.zeros(2), (jnp.eye(2), jnp.ones(2)), damping=0.1)
  >>> solver = jaxinf.direct()
  >>> path = os.path.join(tempfile.mkdtemp(), "state.npz")
  >>> save_state(path, solver.init(op), solver=solver)
  >>> state = load_state(path, state_skeleton(solver, op))
  >>> round(float(solver.solve(state, jnp.ones(2))[0][0]), 4)  # (H + λ)⁻¹ = 1 / (1 + 0.1)
  0.9091
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.scale.sharding import replicate, to_host

PyTree = Any
FORMAT = "jaxinf-state"
VERSION = 1

__all__ = ["load_state", "save_state", "state_skeleton"]


def state_skeleton(solver, operator, *, key: jax.Array | None = None) -> PyTree:
    """The structure of ``solver.init(operator, key=key)`` with shapes only (``jax.eval_shape``; no products run)."""
    return jax.eval_shape(lambda op, k: solver.init(op, key=k), operator, key)


def save_state(path: str | os.PathLike, state: PyTree, *, solver=None, metadata: dict | None = None) -> None:
    """Write the array leaves of ``state`` to ``path`` (``.npz``), atomically.

    Args:
      path: the file to write (the ``.npz`` suffix is not added).
      state: a fitted solver state (or any pytree of arrays).
      solver: optional; its ``name`` is recorded and checked on loading.
      metadata: optional JSON-serialisable dict stored with the state (e.g.
        the damping or the fitting data's description).
    """
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    arrays, leaves = {}, []
    for i, (path_key, leaf) in enumerate(flat):
        entry = {"path": jax.tree_util.keystr(path_key)}
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            entry["key_impl"] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        value = to_host(leaf)
        entry["shape"] = list(value.shape)
        entry["dtype"] = str(jnp.dtype(value.dtype))
        if value.dtype.kind not in "biufc":  # bfloat16, float8...: store the bytes
            value = value.view(np.dtype(f"u{value.dtype.itemsize}"))
        arrays[f"leaf_{i:05d}"] = value
        leaves.append(entry)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "solver": getattr(solver, "name", None),
        "leaves": leaves,
        "metadata": metadata or {},
    }
    if jax.process_index() != 0:
        return
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-state-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, __header__=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a saved state (solver name, leaf paths, shapes, dtypes, metadata)."""
    with np.load(os.fspath(path)) as f:
        return _header(f, path)


def _header(f, path) -> dict:
    if "__header__" not in f.files:
        raise ValueError(f"{path} is not a jaxinf state file (no header); write it with jaxinf.scale.save_state.")
    header = json.loads(bytes(f["__header__"]).decode())
    if header.get("format") != FORMAT or header.get("version", 0) > VERSION:
        raise ValueError(
            f"{path} has format {header.get('format')!r} v{header.get('version')}; expected {FORMAT} v<={VERSION}."
        )
    return header


def load_state(path: str | os.PathLike, like: PyTree, *, solver=None, mesh=None) -> PyTree:
    """Read a state written by :func:`save_state` into the structure of ``like``.

    Args:
      path: the ``.npz`` file.
      like: a skeleton with the state's structure: :func:`state_skeleton`
        (shapes only) or any state of the same solver and problem.
      solver: optional; when given, its ``name`` must match the saved one.
      mesh: optional :class:`jax.sharding.Mesh`; the leaves are then
        replicated on it (multi-device and multi-process scoring).

    Returns:
      The state, with the static metadata of ``like`` and the saved arrays.

    Raises:
      ValueError: not a state file, another solver, or a leaf whose path,
        shape or dtype differs from the skeleton's (named in the message).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    with np.load(os.fspath(path)) as f:
        header = _header(f, path)
        if solver is not None and header.get("solver") not in (None, solver.name):
            raise ValueError(f"{path} holds a state of solver {header['solver']!r}, not {solver.name!r}.")
        saved = header["leaves"]
        if len(saved) != len(flat):
            raise ValueError(
                f"{path} holds {len(saved)} arrays, but the skeleton state has {len(flat)} leaves. Build the skeleton "
                "with the same solver configuration, curvature, blocks and data shapes as when fitting."
            )
        leaves = []
        for i, ((key_path, ref), entry) in enumerate(zip(flat, saved)):
            name = jax.tree_util.keystr(key_path)
            value = f[f"leaf_{i:05d}"]
            dtype = jnp.dtype(entry["dtype"])
            if value.dtype != dtype:
                value = value.view(dtype)
            ref_is_key = jax.dtypes.issubdtype(ref.dtype, jax.dtypes.prng_key)
            ref_shape = tuple(jax.random.key_data(ref).shape) if ref_is_key and isinstance(ref, jax.Array) else None
            if ref_is_key:
                expect_shape = ref_shape if ref_shape is not None else tuple(value.shape)
                expect_dtype = dtype
            else:
                expect_shape, expect_dtype = tuple(np.shape(ref)), jnp.dtype(ref.dtype)
            if entry["path"] != name or tuple(value.shape) != expect_shape or dtype != expect_dtype:
                raise ValueError(
                    f"Leaf {i} of {path} does not match the skeleton: saved {entry['path']} {tuple(value.shape)} "
                    f"{dtype}, skeleton {name} {expect_shape} {expect_dtype}. Was the state fitted with another "
                    "solver configuration, parameter layout or data shape?"
                )
            if ref_is_key:
                leaves.append(jax.random.wrap_key_data(jnp.asarray(value), impl=entry.get("key_impl")))
            else:
                leaves.append(jnp.asarray(value) if mesh is None else value)
    state = jax.tree.unflatten(treedef, leaves)
    if mesh is not None:
        state = replicate(state, mesh)
    return state
