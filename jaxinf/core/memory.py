"""How many bytes a computation may use, and how to split a call's examples to stay within them.

:func:`available_bytes` is the free memory of a device (accelerator) or of
the host (CPU). :func:`plan_rows` sizes the chunks of examples of one jitted
call from XLA's compiled memory analysis (:func:`extra_bytes`), as
:class:`jaxinf.InfluenceModel` does for scoring; :func:`take_rows` cuts them.
"""

from __future__ import annotations

import os

import jax
import numpy as np


def available_bytes(device: jax.Device | None = None) -> int:
    """Free bytes on ``device`` (default: this process's first local device).

    An accelerator reports ``bytes_limit - bytes_in_use``; a CPU device reports
    nothing, so the host's available physical memory is used (``psutil`` when
    installed, else ``sysconf``).

    Raises:
      RuntimeError: neither the device nor the host can say; pass an explicit
        ``max_memory`` to the caller instead.
    """
    device = jax.local_devices()[0] if device is None else device
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError) as err:
        raise RuntimeError(
            f"Cannot tell the free memory of {device} on this platform; pass max_memory=<bytes> explicitly."
        ) from err


# ----------------------------------------------------------------------------
# Planning a call's memory: split its examples into chunks that fit a budget
# ----------------------------------------------------------------------------


def extra_bytes(jitted, *args, **kwargs) -> int | None:
    """Bytes a call of ``jitted(*args, **kwargs)`` allocates beyond its arguments: XLA's temporaries + outputs.

    Read from the compiled program's memory analysis, before anything runs
    (the compiled program is the one the call itself then reuses). ``args``
    may be arrays or ``jax.ShapeDtypeStruct``. ``None`` on a backend without
    memory analysis.
    """
    try:
        stats = jitted.lower(*args, **kwargs).compile().memory_analysis()
    except NotImplementedError:  # pragma: no cover - backend without analysis
        return None
    if stats is None:  # pragma: no cover
        return None
    return int(stats.temp_size_in_bytes + stats.output_size_in_bytes)


def on_one_device(x) -> bool:
    """``x`` is a concrete ``jax.Array`` of numbers held whole on one device (of any platform).

    Such an array can go through NumPy (a copy out and back) where an eager
    ``jnp`` operation on it would compile a program of its own.
    """
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer) or not x.is_fully_addressable:
        return False
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return False
    return len(x.sharding.device_set) == 1


def on_one_cpu_device(x) -> bool:
    """``x`` is a concrete ``jax.Array`` held whole on one CPU device.

    Such an array goes through NumPy as a memory copy that compiles nothing,
    where an eager ``jnp`` operation on it compiles a program of its own
    (used to stack and join arrays on the CPU without compiling).
    """
    return on_one_device(x) and next(iter(x.sharding.device_set)).platform == "cpu"


def put_like(value: np.ndarray, like: jax.Array) -> jax.Array:
    """``value`` on ``like``'s device: committed there when ``like`` is (a transfer, no compile)."""
    return jax.device_put(value, like.sharding if like.committed else None)


def rows_at(x, index: np.ndarray):
    """``x[index]`` along the leading axis, for a host ``index``, compiling nothing where it can.

    A NumPy array is indexed with NumPy; an array held whole on one device
    through the host (a copy out and back, placed as ``x`` was: used once per
    call, to pad a batch); anything else (spread over several devices, a key
    array) by JAX on its devices, which compiles a gather.
    """
    if isinstance(x, np.ndarray):
        return x[index]
    if on_one_device(x):
        return put_like(np.asarray(x)[index], x)
    return x[index]


def take_rows(tree, start: int, rows: int):
    """Examples ``start .. start + rows`` of ``tree`` (leading axis); past the end the last example repeats.

    Padding keeps every chunk of one call the same shape (one compiled
    program); the caller drops the outputs of the repeated examples.
    """
    n = jax.tree.leaves(tree)[0].shape[0]
    if start == 0 and rows == n:
        return tree
    index = np.minimum(np.arange(start, start + rows), n - 1)
    return jax.tree.map(lambda x: x[index], tree)


def plan_rows(measure, n: int, budget: int, what: str, advice: str) -> int:
    """The most examples (``<= n``) per call for which ``measure(rows)`` (bytes) stays within ``budget``.

    ``measure(n)`` first: if it fits, ``n`` (one call, no extra compile). Else
    the bytes are taken as affine in the rows, ``a + b·rows``, from
    ``measure(1)`` and ``measure(n)``; the chunk is checked with ``measure``
    and shrunk until it fits.

    Raises:
      ValueError: even one example needs more than ``budget``; the message
        gives both numbers and ``advice``.
    """
    full = measure(n)
    if full is None or full <= budget:
        return n
    one = measure(1)
    if one > budget:
        raise ValueError(
            f"{what} needs {format_bytes(one)} even for one example at a time (all {n} at once: "
            f"{format_bytes(full)}), over the memory budget of {format_bytes(budget)}. {advice}"
        )
    slope = max((full - one) / max(n - 1, 1), 1.0)
    rows = max(1, min(n - 1, int((budget - one) / slope) + 1))
    while rows > 1:
        need = measure(rows)
        if need <= budget:
            break
        rows = max(1, min(rows - 1, int(rows * budget / need)))
    return rows


def format_bytes(n: float) -> str:
    """``n`` bytes in B, KiB, MiB, GiB or TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


__all__ = ["available_bytes", "extra_bytes", "format_bytes", "plan_rows", "rows_at", "take_rows"]
