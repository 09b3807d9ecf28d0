"""The on-disk influence store: a zarr v3 group, one done-mark per finished cell, the run's fingerprint, a lock.

Layout of the directory at ``path``:

* ``zarr.json``: the group; its attributes hold ``{FORMAT: fingerprint +
  version, "complete": bool}``. A run resumes only when the stored
  fingerprint equals the new one (:func:`open_store` names what differs);
* ``influences``: ``(n_test, n_train)`` (``(n_test, n_train, *x_shape)`` in
  perturbation mode), chunked as ``[test block, train batch]``; NaN where not
  computed yet (NaN is never written as a result);
* ``marks/``: one small JSON file ``i.j.p`` per finished cell (test block
  ``i``, training step ``j``, process ``p``), written atomically (temp file +
  ``os.replace``) only after the cell's chunk is written. It records the
  digests of the test block and of the training batch the cell was computed
  from, so that a resumed run can check that it reads the same data. The
  marks are the only record of what is done: a cell without a readable mark
  is computed again, and ``complete`` is set only once every cell has one;
* ``jaxinf-lock.json``: while a job writes, the lock of its first process (pid,
  host, time), created with ``O_CREAT | O_EXCL``. A second job on the same
  path is refused; a lock whose process has died on this host is taken over
  with a warning.

Only a directory that holds such a store (or nothing) is ever written to or
deleted from; anything else at ``path`` is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid

import numpy as np

from jaxinf.scale.lock import LOCK, StoreLock, read_json_dict
from jaxinf.scale.plan import format_bytes

FORMAT = "jaxinf-influences"
VERSION = 2
MARKS = "marks"
_OURS = ("zarr.json", "influences", MARKS, "done")  # what overwrite=True may delete ("done": format 1)

__all__ = [
    "FORMAT",
    "VERSION",
    "StoreLock",
    "check_fingerprint",
    "check_store",
    "done_cells",
    "mark_done",
    "open_influences",
    "open_store",
    "read_marks",
    "recorded_digests",
    "set_complete",
]


# --------------------------------------------------------------------- opening
def open_store(path: str, fingerprint: dict, shape, chunks, dtype, disk_bytes: int, *, resume, overwrite):
    """The store at ``path``, created or reopened to resume a run with the same ``fingerprint``, and its lock.

    The caller holds the returned :class:`StoreLock` until the run ends and
    then calls ``release()``. On reopening, the leftovers of a killed run
    (zarr's ``.partial`` chunk files, unfinished marks) are removed.

    Raises:
      ValueError: ``path`` is a file or a directory that is not a jaxinf
        store (whatever ``resume``/``overwrite`` say; nothing there is
        touched), another job holds the store's lock, the store holds a run
        with other arguments (naming them), a run while ``resume=False``, or
        the result would not fit on the disk.
    """
    import zarr

    if _inspect(path) == "new":
        _check_disk(path, disk_bytes)
    os.makedirs(path, exist_ok=True)
    lock = StoreLock(path)
    lock.acquire()
    try:
        kind = _inspect(path)  # again, under the lock (a lock left alone by a killed job counts as empty)
        if kind == "ours" and overwrite:
            _delete_ours(path)
            _check_disk(path, disk_bytes)
            kind = "new"
        if kind == "ours":
            root = zarr.open_group(path, mode="r+")
            _reopen(root, path, fingerprint, resume)
            _clean_leftovers(path)
        else:
            root = zarr.create_group(path, attributes={FORMAT: {**fingerprint, "version": VERSION}, "complete": False})
        if "influences" not in root:  # new, or a run killed while creating the store
            fill = np.nan if dtype.kind == "f" else 0
            root.create_array("influences", shape=shape, chunks=chunks, dtype=dtype, fill_value=fill)
        os.makedirs(os.path.join(path, MARKS), exist_ok=True)
    except BaseException:
        lock.release()
        raise
    return root, lock


def _inspect(path: str) -> str:
    """``"new"`` (absent or empty), ``"ours"`` (a jaxinf store) or ``"locked"`` (only a lock); refuses the rest."""
    if not os.path.exists(path):
        return "new"
    if not os.path.isdir(path):
        raise ValueError(f"{path} is an existing file, not a directory; give compute_influences a directory path.")
    everything = set(os.listdir(path))
    entries = {e for e in everything if not (e == LOCK or e.startswith(LOCK + "."))}
    if _format_of(path) is not None:
        return "ours"
    if not entries:
        return "locked" if LOCK in everything else "new"
    raise ValueError(
        f"{path} is a directory that is not a jaxinf influence store (it holds {_some(entries)}); nothing was "
        "written or deleted. Choose a new or empty directory."
    )


def _format_of(path: str) -> dict | None:
    """The store metadata in ``path/zarr.json``, or ``None`` when it is absent or not a jaxinf store."""
    try:
        with open(os.path.join(path, "zarr.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    value = attrs.get(FORMAT) if isinstance(attrs, dict) else None
    return value if isinstance(value, dict) else None


def _some(entries) -> str:
    names = sorted(entries)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _check_disk(path: str, disk_bytes: int) -> None:
    parent = os.path.dirname(os.path.abspath(path)) or "."
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    free = shutil.disk_usage(parent).free
    if disk_bytes > free:
        raise ValueError(
            f"The result needs {format_bytes(disk_bytes)} on disk, but {parent} has {format_bytes(free)} free. Choose "
            "another path, or fewer test points per run."
        )


def _delete_ours(path: str) -> None:
    """Delete what a jaxinf store consists of (never other files a user put in the directory)."""
    for name in _OURS:
        full = os.path.join(path, name)
        if os.path.isdir(full):
            shutil.rmtree(full)
        elif os.path.exists(full):
            os.remove(full)


def _reopen(root, path: str, fingerprint: dict, resume: bool) -> None:
    error = _refusal(dict(root.attrs).get(FORMAT), fingerprint, path, resume)
    if error:
        raise ValueError(error)


def check_store(path: str, fingerprint: dict, *, resume: bool, overwrite: bool) -> str | None:
    """Why :func:`open_store` would refuse ``path`` (read-only, no lock taken), or ``None``; checked before the
    calculator compiles anything."""
    try:
        kind = _inspect(path)
    except ValueError as err:
        return str(err)
    return _refusal(_format_of(path), fingerprint, path, resume) if kind == "ours" and not overwrite else None


def _refusal(meta: dict, fingerprint: dict, path: str, resume: bool) -> str | None:
    if not resume:
        return (
            f"{path} already holds an influence run. Pass resume=True to continue it or overwrite=True to start again."
        )
    if meta.get("version") != VERSION:
        return (
            f"{path} holds an influence store of format {meta.get('version')!r}, written by another version of "
            f"jaxinf (this one writes format {VERSION}); pass overwrite=True to start again or choose another path."
        )
    return check_fingerprint(meta, fingerprint, path)


def check_fingerprint(stored: dict, fingerprint: dict, path: str) -> str | None:
    """The message naming every entry of ``fingerprint`` that differs from the ``stored`` one (``None``: same)."""
    differ = sorted(k for k in fingerprint if stored.get(k) != fingerprint[k])
    if not differ:
        return None
    detail = "; ".join(_difference(k, stored.get(k), fingerprint[k]) for k in differ)
    return (
        f"{path} holds a run with other arguments ({detail}). A resumed run must use the same params, fitted "
        "state, damping, curvature, blocks, solver configuration, loss, mode, block sizes and data. Pass "
        "overwrite=True to start again or choose another path."
    )


def _difference(key: str, stored, now) -> str:
    if isinstance(stored, dict) and isinstance(now, dict):
        keys = sorted(k for k in {*stored, *now} if stored.get(k) != now.get(k))
        inner = ", ".join(f"{k}: {_short(stored.get(k))} vs {_short(now.get(k))}" for k in keys)
        return f"{key}: stored vs now differ in {inner}"
    return f"{key}: stored {_short(stored)} vs now {_short(now)}"


def _short(value) -> str:
    text = repr(value)
    if isinstance(value, str) and len(value) == 64:  # a SHA-256 digest
        return value[:12] + "…"
    return text if len(text) <= 80 else text[:77] + "…"


def _clean_leftovers(path: str) -> None:
    """Remove what a killed run leaves: zarr's ``*.partial`` chunk files and unfinished or unreadable marks."""
    for folder, _, files in os.walk(path):
        for name in files:
            if name.endswith(".partial"):
                os.remove(os.path.join(folder, name))
    marks = os.path.join(path, MARKS)
    if os.path.isdir(marks):
        for name in os.listdir(marks):
            if name.startswith(".") or read_json_dict(os.path.join(marks, name)) is None:
                os.remove(os.path.join(marks, name))


# ----------------------------------------------------------------------- marks
def mark_done(path: str, cell: tuple[int, int, int], record: dict) -> None:
    """Mark ``cell = (test block, step, process)`` done, atomically, with its ``record`` (data digests)."""
    folder = os.path.join(path, MARKS)
    name = ".".join(str(int(c)) for c in cell)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, os.path.join(folder, name))


def _cell(name: str) -> tuple[int, int, int] | None:
    parts = name.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1]), int(parts[2])


def read_marks(path: str) -> dict:
    """``{(i, j, p): record}`` for every readable done-mark of the store (an unreadable one is not done)."""
    folder = os.path.join(path, MARKS)
    out = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        cell = _cell(name)
        record = None if cell is None else read_json_dict(os.path.join(folder, name))
        if record is not None:
            out[cell] = record
    return out


def done_cells(path: str, grid, marks: dict | None = None) -> np.ndarray:
    """The done-mask, a ``bool`` array of shape ``grid = (test blocks, steps, processes)``: the cells of ``marks``
    (from :func:`read_marks`), or of the marks' file names when ``marks`` is ``None``."""
    folder = os.path.join(path, MARKS)
    if marks is None:
        marks = [_cell(name) for name in (os.listdir(folder) if os.path.isdir(folder) else ())]
    mask = np.zeros(tuple(grid), bool)
    for cell in marks:
        if cell is not None and all(c < g for c, g in zip(cell, grid)):
            mask[cell] = True
    return mask


def recorded_digests(marks: dict, process: int) -> tuple[dict, dict]:
    """``({test block: digest}, {training step: digest of this process's batch})`` from the done-marks."""
    tests = {i: r.get("test") for (i, _, _), r in marks.items()}
    train = {j: r.get("train") for (_, j, p), r in marks.items() if p == process}
    return tests, train


def set_complete(root, path: str, grid) -> str | None:
    """Set ``complete`` when every cell has its mark; else the message saying how many are missing."""
    done = done_cells(path, grid)
    if not done.all():
        root.attrs.update({"complete": False})
        return f"{path}: {int((~done).sum())} of {done.size} cells have no done-mark after the run; run it again."
    root.attrs.update({"complete": True})
    return None


def open_influences(path: str | os.PathLike, *, partial: bool = False):
    """Open the influence array of a store lazily (read-only zarr array).

    Args:
      path: the store's directory.
      partial: also open a store whose run is not finished (cells not
        computed yet read as NaN); by default that is refused.

    Raises:
      ValueError: ``path`` is not a jaxinf influence store, or its run is not
        complete (every cell done-marked) and ``partial`` is ``False``.
    """
    import zarr

    path = os.fspath(path)
    meta = _format_of(path) if os.path.isdir(path) else None
    if meta is None:
        raise ValueError(f"{path} is not a jaxinf influence store.")
    root = zarr.open_group(path, mode="r")
    if not partial:
        grid = meta.get("grid")  # None in a store of format 1: its attribute only
        done = done_cells(path, grid) if grid is not None else np.array([root.attrs.get("complete") is True])
        if not (root.attrs.get("complete") is True and done.all()):
            raise ValueError(
                f"{path} holds an unfinished influence run ({int(done.sum())} of {done.size} cells done); resume it "
                "with compute_influences, or pass partial=True to read it with NaN where not computed."
            )
    return root["influences"]
