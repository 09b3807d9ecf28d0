"""Progress bars (tqdm) on process 0 only, and a silent stand-in that still counts."""

from __future__ import annotations

import jax


class _Silent:
    """What a bar offers, without drawing: ``n`` counts what was done."""

    def __init__(self, initial: int = 0):
        self.n = initial

    def update(self, k: int) -> None:
        self.n += k

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int, *, desc: str, unit: str, initial: int = 0, leave: bool = True):
    """A tqdm bar over ``total`` units on process 0 when ``enabled``; otherwise a silent counter."""
    if not enabled or jax.process_index() != 0:
        return _Silent(initial)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit=unit, unit_scale=True, desc=desc, leave=leave, smoothing=0.1)


__all__ = ["progress_bar"]
