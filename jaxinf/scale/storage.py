"""Save and load fitted solver states, so that fitting and scoring can run in separate jobs.

A state's *leaves* (eigenvectors, Kronecker factors, a sketch, the data of a
matrix-free solver) are written with their key paths, shapes and dtypes; its
*structure* (layouts, traced layer plans holding functions) is not portable,
so loading rebuilds it from a *skeleton* made in the new job
(:func:`state_skeleton`: ``jax.eval_shape``, no curvature product) from an
operator built as for fitting (same loss, params, curvature, blocks, damping
and data *shapes*). Every leaf's path, shape and dtype is checked.

**Recorded and checked.** With ``solver=`` and ``operator=``, the file records
what determines the state (:func:`state_fingerprint`): the solver's name and
``Solver.config``, the curvature kind, the blocks, each block's damping, a
digest of the params and of the loss's program (the split
``output_loss(model_fn(...))`` for Gauss-Newton, else ``loss_fn``). Loading
with them refuses a state fitted for anything else, naming every difference
(``on_mismatch="raise"``), or refits with a warning naming them
(``on_mismatch="refit"``). What was not recorded is not checked (a warning
says so); the training data itself is not recorded: keep it fixed.

**Format.** One ``.npz`` (uncompressed, no pickle) with the leaves and a JSON
header, written to a temporary file, flushed and renamed, so a killed job
never leaves a truncated state. Reading parses every ``.npy`` header and
checks it against the JSON header, the skeleton and the bytes present
*before* allocating: a truncated, corrupted or forged file gives a
``ValueError`` naming the file and leaf. PRNG keys and bfloat16 round-trip.
With several processes, process 0 writes and every process reads.

Examples:
  >>> import jax.numpy as jnp, jaxinf, tempfile, os
  >>> from jaxinf.scale import save_state, load_state
  >>> loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
  >>> op = jaxinf.curvature_operator(loss, jnp.zeros(2), (jnp.eye(2), jnp.ones(2)), damping=0.1)
  >>> solver = jaxinf.direct()
  >>> path = os.path.join(tempfile.mkdtemp(), "state.npz")
  >>> save_state(path, solver.init(op), solver=solver, operator=op)
  >>> state = load_state(path, solver=solver, operator=op)
  >>> round(float(solver.solve(state, jnp.ones(2))[0][0]), 4)  # (H + λ)⁻¹ = 1 / (1 + 0.1)
  0.9091
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
import zipfile
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.scale.sharding import replicate, to_host
from jaxinf.scale.state_fingerprint import state_differences, state_fingerprint

PyTree = Any
FORMAT = "jaxinf-state"
VERSION = 2  # 2: the "fit" fingerprint; version 1 files (without it) still load
MAX_HEADER_BYTES = 64 << 20  # a JSON header above this is refused as corrupted
ON_MISMATCH = ("raise", "refit")
_UNREADABLE = (zipfile.BadZipFile, zlib.error, EOFError)  # what a truncated or corrupted zip raises while reading

__all__ = ["load_state", "read_header", "save_state", "state_fingerprint", "state_skeleton"]


def state_skeleton(solver, operator, *, key: jax.Array | None = None) -> PyTree:
    """The structure of ``solver.init(operator, key=key)`` with shapes only (``jax.eval_shape``; no products run)."""
    return jax.eval_shape(lambda op, k: solver.init(op, key=k), operator, key)


def _check_path(path: Any, name: str) -> None:
    """``TypeError`` unless ``path`` is a file path: the arguments swapped, or a model given for its state."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"{name}'s first argument is the file path (str or os.PathLike), got {type(path).__name__}: call "
            f"jaxinf.scale.{name}(path, ...) as in jaxinf.scale.save_state('state.npz', model.state, "
            "solver=model.solver, operator=model.operator)."
        )


def _check_json(value: Any, where: str) -> None:
    """Raise ``ValueError`` naming the first entry of ``value`` that JSON cannot store faithfully."""
    if value is None or isinstance(value, (bool, str)) or type(value) in (int, float):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has the key {key!r} ({type(key).__name__}); JSON keys must be strings.")
            _check_json(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    raise ValueError(
        f"{where} is a {type(value).__module__}.{type(value).__name__}, which JSON cannot store: pass numbers, "
        "strings, bools, None, lists and dicts with string keys (e.g. float(x) or x.tolist() for an array)."
    )


def save_state(
    path: str | os.PathLike, state: PyTree, *, solver=None, operator=None, metadata: dict | None = None
) -> None:
    """Write the array leaves of ``state`` to ``path`` (``.npz``), atomically.

    Args:
      path: the file to write (the ``.npz`` suffix is not added).
      state: a fitted solver state (or any pytree of arrays).
      solver: optional; its name and configuration are recorded and checked
        on loading.
      operator: optional, the :class:`jaxinf.CurvatureOperator` the state was
        fitted on (``model.operator``); its curvature kind, blocks, damping,
        a params digest and a loss digest are recorded and checked on
        loading (see :func:`state_fingerprint`).
      metadata: optional JSON-serialisable dict stored with the state.

    Raises:
      ValueError: ``metadata`` that JSON cannot store (the message names the
        entry).
    """
    _check_path(path, "save_state")
    if os.path.isdir(path) or os.fspath(path).endswith(("/", os.sep)):  # before the state is copied to the host
        raise ValueError(f"{path} is a directory; save_state writes one file: give a file path such as state.npz.")
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict (JSON object) or None, got a {type(metadata).__name__}.")
    _check_json(metadata, "metadata")
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
        "fit": state_fingerprint(solver, operator),
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
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _unreadable(path, what: str, error: BaseException | str) -> ValueError:
    return ValueError(
        f"{path} is not a readable jaxinf state file ({what}: {error}); it is truncated or corrupted. "
        "Save the state again (jaxinf.scale.save_state)."
    )


class _Member:
    """One ``.npy`` member of the zip: its header parsed, its size checked, its data not yet read."""

    def __init__(self, archive: zipfile.ZipFile, name: str, path):
        self.name, self.path = name, path
        try:
            self.info = archive.getinfo(name + ".npy")
        except KeyError:
            raise ValueError(f"{path} has no array {name!r}; it is truncated or not a jaxinf state file.") from None
        self.file = archive.open(self.info)
        try:
            version = np.lib.format.read_magic(self.file)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy version {version}")
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            self.shape, self.fortran, self.dtype = read(self.file)
        except ValueError as error:  # numpy's message on a bad magic string or header
            self.file.close()
            raise _unreadable(path, f"array {name!r}", error) from None
        if self.dtype.hasobject:
            self.file.close()
            raise ValueError(f"{path}: array {name!r} holds Python objects; a state never does (no pickle is read).")
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize
        available = self.info.file_size - self.file.tell()
        if self.nbytes != available:
            self.file.close()
            raise _unreadable(
                path,
                f"array {name!r}",
                f"its header declares shape {self.shape} {self.dtype} ({self.nbytes} bytes) "
                f"but {available} bytes follow",
            )

    def read(self) -> np.ndarray:
        with self.file:
            data = self.file.read(self.nbytes)
        if len(data) != self.nbytes:
            raise _unreadable(self.path, f"array {self.name!r}", f"{len(data)} of {self.nbytes} bytes")
        return np.frombuffer(data, self.dtype).reshape(self.shape, order="F" if self.fortran else "C")


def _read_json(archive: zipfile.ZipFile, path) -> dict:
    member = _Member(archive, "__header__", path)
    if member.dtype != np.uint8 or len(member.shape) != 1 or member.nbytes > MAX_HEADER_BYTES:
        member.file.close()
        raise _unreadable(path, "header", f"shape {member.shape} {member.dtype}")
    try:
        header = json.loads(member.read().tobytes().decode())
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _unreadable(path, "header", error) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version", 0) > VERSION:
        got = (header.get("format"), header.get("version")) if isinstance(header, dict) else type(header).__name__
        raise ValueError(f"{path} has format {got!r}; expected {FORMAT} v<={VERSION}.")
    leaves = header.get("leaves")
    if not isinstance(leaves, list) or not all(map(_entry_ok, leaves)):
        raise _unreadable(path, "header", "its list of leaves is malformed")
    return header


def _entry_ok(e) -> bool:
    fields = isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("dtype"), str)
    return fields and isinstance(e.get("shape"), list) and all(isinstance(s, int) and s >= 0 for s in e["shape"])


@contextlib.contextmanager
def _archive(path, name: str = "load_state"):
    """``with _archive(path) as (archive, header)``: the open zip and its checked JSON header."""
    _check_path(path, name)
    try:
        archive = zipfile.ZipFile(os.fspath(path))
    except _UNREADABLE as error:
        raise _unreadable(path, "zip", error) from None
    with archive:
        try:
            header = _read_json(archive, path)
        except _UNREADABLE as error:
            raise _unreadable(path, "header", error) from None
        yield archive, header


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a saved state (solver, fingerprint ``"fit"``, leaf paths, shapes, dtypes, metadata)."""
    with _archive(path, "read_header") as (_, header):
        return header


def _read_leaves(archive: zipfile.ZipFile, header: dict, like: PyTree, path) -> list:
    flat = jax.tree_util.tree_flatten_with_path(like)[0]
    saved = header["leaves"]
    if len(saved) != len(flat):
        raise ValueError(
            f"{path} holds {len(saved)} arrays, but the skeleton state has {len(flat)} leaves. Build the skeleton "
            "with the same solver configuration, curvature, blocks and data shapes as when fitting."
        )
    leaves = []
    for i, ((key_path, ref), entry) in enumerate(zip(flat, saved)):
        member = _Member(archive, f"leaf_{i:05d}", path)
        try:
            leaves.append(_read_leaf(member, i, jax.tree_util.keystr(key_path), ref, entry, path))
        finally:
            member.file.close()
    return leaves


def _read_leaf(member: _Member, i: int, name: str, ref, entry: dict, path):
    """Check leaf ``i`` against its JSON entry and the skeleton's ``ref`` (no data read yet), then read it."""
    try:
        dtype = jnp.dtype(entry["dtype"])
    except TypeError as error:
        raise _unreadable(path, f"leaf {i}", error) from None
    stored = dtype if dtype.kind in "biufc" else np.dtype(f"u{dtype.itemsize}")
    if tuple(member.shape) != tuple(entry["shape"]) or member.dtype != stored:
        raise _unreadable(
            path,
            f"leaf {i}",
            f"the header says {tuple(entry['shape'])} {dtype}, the array {member.shape} {member.dtype}",
        )
    ref_is_key = jax.dtypes.issubdtype(ref.dtype, jax.dtypes.prng_key)
    if ref_is_key:
        ref_shape = tuple(jax.random.key_data(ref).shape) if isinstance(ref, jax.Array) else None
        expect_shape, expect_dtype = (ref_shape if ref_shape is not None else tuple(member.shape)), dtype
    else:
        expect_shape, expect_dtype = tuple(np.shape(ref)), jnp.dtype(ref.dtype)
    if entry["path"] != name or tuple(member.shape) != expect_shape or dtype != expect_dtype:
        raise ValueError(
            f"Leaf {i} of {path} does not match the skeleton: saved {entry['path']} {tuple(member.shape)} "
            f"{dtype}, skeleton {name} {expect_shape} {expect_dtype}. Was the state fitted with another "
            "solver configuration, parameter layout or data shape?"
        )
    try:
        value = member.read()
    except _UNREADABLE as error:
        raise _unreadable(path, f"leaf {i}", error) from None
    if value.dtype != dtype:
        value = value.view(dtype)
    if ref_is_key:
        return jax.random.wrap_key_data(jnp.asarray(value), impl=entry.get("key_impl"))
    return value


def load_state(
    path: str | os.PathLike,
    like: PyTree = None,
    *,
    solver=None,
    operator=None,
    mesh=None,
    on_mismatch: str = "raise",
    key: jax.Array | None = None,
) -> PyTree:
    """Read a state written by :func:`save_state` into the structure of ``like``.

    Args:
      path: the ``.npz`` file.
      like: a skeleton with the state's structure: :func:`state_skeleton`
        (shapes only) or any state of the same solver and problem; ``None``:
        ``state_skeleton(solver, operator, key=key)``.
      solver: optional; its name and configuration must match the saved ones.
      operator: optional, the operator of this job, built as for fitting; its
        curvature kind, blocks, damping, params and loss must match what the
        file records (see :func:`state_fingerprint`).
      mesh: optional :class:`jax.sharding.Mesh`; the leaves are then
        replicated on it (multi-device and multi-process scoring).
      on_mismatch: ``"raise"`` (default): a state fitted for another solver
        configuration or problem raises, naming every difference;
        ``"refit"``: warn naming them and return ``solver.init(operator,
        key=key)`` instead (needs ``solver`` and an ``operator`` holding the
        real training data).
      key: the PRNG key of a refit (and of the skeleton when ``like`` is
        ``None``).

    Returns:
      The state, with the static metadata of ``like`` and the saved arrays.

    Raises:
      ValueError: not a state file or a truncated, corrupted one (nothing is
        allocated before the headers check out); another solver, configuration
        or problem (``on_mismatch="raise"``); a leaf unlike the skeleton's.
        Each message names the file and what differs.
    """
    if on_mismatch not in ON_MISMATCH:
        raise ValueError(f"on_mismatch must be one of {ON_MISMATCH}, got {on_mismatch!r}.")
    if on_mismatch == "refit" and (solver is None or operator is None):
        raise ValueError("on_mismatch='refit' needs solver= and operator= (holding the training data) to refit with.")
    with _archive(path) as (archive, header):
        if on_mismatch == "raise" and solver is not None and header.get("solver") not in (None, solver.name):
            raise ValueError(f"{path} holds a state of solver {header['solver']!r}, not {solver.name!r}.")
        if like is None and (solver is None or operator is None):
            raise ValueError(
                "like: pass a skeleton (scale.state_skeleton(solver, operator)), or solver= and operator=."
            )
        like = state_skeleton(solver, operator, key=key) if like is None else like
        diffs, unchecked = state_differences(header.get("fit") or {}, state_fingerprint(solver, operator))
        if diffs and on_mismatch == "raise":
            raise ValueError(
                f"{path} was fitted for another problem or solver: {'; '.join(diffs)}. Fit again and save, or load "
                "with on_mismatch='refit' (and an operator holding the training data) to refit here."
            )
        if unchecked and not diffs:
            warnings.warn(
                f"{path} does not record the {', '.join(unchecked)} it was fitted with, so they are not checked: "
                "save it with save_state(..., solver=..., operator=...) to have them checked.",
                UserWarning,
                stacklevel=2,
            )
        leaves = None if diffs else _read_leaves(archive, header, like, path)
    if diffs:
        warnings.warn(f"{path} was fitted for another problem ({'; '.join(diffs)}): refitting.", stacklevel=2)
        state = solver.init(operator, key=key)
        if solver.validate is not None:
            solver.validate(state)
    else:
        state = jax.tree.unflatten(jax.tree.structure(like), [jnp.asarray(x) if mesh is None else x for x in leaves])
    if mesh is not None:
        state = replicate(state, mesh)
    return state
