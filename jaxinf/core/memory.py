"""How many bytes a computation may use: the free memory of a device (accelerator) or of the host (CPU)."""

from __future__ import annotations

import os

import jax


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


__all__ = ["available_bytes"]
