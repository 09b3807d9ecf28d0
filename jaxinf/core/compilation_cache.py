"""Keep compiled programs on disk across Python processes: JAX's persistent compilation cache, switched on.

Within one process, models of the same loss, solver configuration and shapes
already share their compiled programs (:mod:`jaxinf.solvers.compiled`). A
new process (the next script run, a notebook restart, another job of a sweep)
compiles them again: for a small MLP the first EK-FAC fit is tens of seconds
of compilation against a fraction of a second of work. With the persistent
cache on, XLA writes every compiled program to ``path`` and a later process
with the same program, jax/jaxlib version and device reads it back instead
of compiling.

``enable_compilation_cache()`` is one call, before the first computation, and
applies to all of JAX in the process (it sets ``jax_compilation_cache_dir``
and lowers the size and compile-time thresholds to cache every program, as
jaxinf compiles many small ones). Entries are keyed by the program and the
jax version, so a stale entry is never used for another program; delete the
folder to reclaim the space.
"""

from __future__ import annotations

import os

import jax

DEFAULT_PATH = os.path.join(os.path.expanduser("~"), ".cache", "jaxinf", "xla")

__all__ = ["DEFAULT_PATH", "enable_compilation_cache"]


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str:
    """Switch JAX's persistent compilation cache on, writing to ``path`` (default :data:`DEFAULT_PATH`).

    Args:
      path: a folder (created if missing); ``None``: ``$JAXINF_COMPILATION_CACHE`` if set, else
        ``~/.cache/jaxinf/xla``.

    Returns:
      The folder used.

    Raises:
      ValueError: ``path`` exists and is not a folder, or cannot be created.
    """
    folder = os.fspath(path) if path is not None else os.environ.get("JAXINF_COMPILATION_CACHE", DEFAULT_PATH)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"enable_compilation_cache: {folder!r} exists and is not a folder; pass a folder path.")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ValueError(f"enable_compilation_cache: cannot create the folder {folder!r} ({error}).") from error
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return folder
