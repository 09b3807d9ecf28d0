"""The on-disk influence store: a zarr v3 group with the scores, a done-mask and the run's fingerprint.

Layout of the group at ``path``:

* ``influences``: ``(n_test, n_train)`` (``(n_test, n_train, *x_shape)`` in
  perturbation mode), chunked as ``[test block, train batch]``; NaN where not
  computed yet;
* ``done``: ``uint8`` of shape ``(test blocks, train steps, processes)``; a
  cell is set only after its chunk is written, so a resumed run skips exactly
  what was finished;
* attributes: ``{FORMAT: fingerprint + version, "complete": bool}``. A run
  resumes only when the stored fingerprint equals the new one.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from jaxinf.core.fingerprint import hash_tree
from jaxinf.scale.plan import format_bytes

FORMAT = "jaxinf-influences"
VERSION = 1

__all__ = ["FORMAT", "VERSION", "hash_tree", "open_influences", "open_store"]


def open_store(path: str, fingerprint: dict, shape, chunks, dtype, done_shape, disk_bytes: int, *, resume, overwrite):
    """The store at ``path``: created, or reopened to resume a run with the same ``fingerprint``.

    Raises:
      ValueError: ``path`` holds something else, a run with other arguments
        (naming them), a run while ``resume=False``, or the result would not
        fit on the disk.
    """
    import zarr

    exists = os.path.exists(os.path.join(path, "zarr.json"))
    if exists and overwrite:
        shutil.rmtree(path)
        exists = False
    if exists:
        return _reopen(zarr.open_group(path, mode="r+"), path, fingerprint, resume)
    parent = os.path.dirname(os.path.abspath(path)) or "."
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    free = shutil.disk_usage(parent).free
    if disk_bytes > free:
        raise ValueError(
            f"The result needs {format_bytes(disk_bytes)} on disk, but {parent} has {format_bytes(free)} free. Choose "
            "another path, or fewer test points per run."
        )
    root = zarr.open_group(path, mode="w")
    fill = np.nan if dtype.kind == "f" else 0
    root.create_array("influences", shape=shape, chunks=chunks, dtype=dtype, fill_value=fill)
    root.create_array("done", shape=done_shape, chunks=(1, 1, 1), dtype="uint8", fill_value=0)
    root.attrs.update({FORMAT: {**fingerprint, "version": VERSION}, "complete": False})
    return root


def _reopen(root, path: str, fingerprint: dict, resume: bool):
    meta = dict(root.attrs).get(FORMAT)
    if meta is None:
        raise ValueError(f"{path} holds a zarr group that is not a jaxinf influence store; choose another path.")
    if not resume:
        raise ValueError(
            f"{path} already holds an influence run. Pass resume=True to continue it or overwrite=True to start again."
        )
    differ = sorted(k for k in fingerprint if meta.get(k) != fingerprint[k])
    if differ:
        detail = ", ".join(f"{k}: stored {meta.get(k)!r} vs now {fingerprint[k]!r}" for k in differ)
        raise ValueError(
            f"{path} holds a run with other arguments ({detail}); a resumed run must use the same model, "
            "state, data sizes and block sizes. Pass overwrite=True or choose another path."
        )
    return root


def open_influences(path: str | os.PathLike):
    """Open the influence array of a store lazily (read-only zarr array)."""
    import zarr

    root = zarr.open_group(os.fspath(path), mode="r")
    if FORMAT not in dict(root.attrs):
        raise ValueError(f"{path} is not a jaxinf influence store.")
    return root["influences"]
