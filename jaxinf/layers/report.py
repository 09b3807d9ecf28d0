"""The report of the analysis: :class:`LayerTags`, which parameter leaf went to which layer or fallback."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, eq=False)
class LayerTags:
    """Which parameter went where: the result of :func:`find_layers`.

    ``print(tags)`` shows one row per parameter leaf. Attributes: ``layers``
    (tuple of :class:`Layer`), ``fallbacks`` (tuple of :class:`Fallback`),
    ``paths`` and ``shapes`` of the parameter leaves, ``notes``.
    """

    layers: tuple
    fallbacks: tuple
    paths: tuple
    shapes: tuple
    notes: tuple = ()

    def rows(self) -> list[tuple[str, str, str, str]]:
        """``(parameter, shape, treatment, detail)`` for every parameter leaf, in flatten order."""
        out: dict[int, tuple] = {}
        for layer in self.layers:
            nsites = len(layer.sites)
            in_scan = sum(1 for s in layer.sites if s.stack)
            where = f"{nsites} use{'s' if nsites > 1 else ''}"
            if in_scan:
                where += f", {in_scan} inside lax.scan"
            heads = max(s.heads for s in layer.sites)
            if heads:
                where += f", {heads} heads as locations (per-head weights; block-diagonal input factor)"
            if layer.kind == "embedding":
                where += ", one-hot inputs (diagonal input factor)"
            detail = f"{layer.name}: d_in={layer.d_in}{'+1' if layer.bias is not None else ''}, d_out={layer.d_out}, "
            if layer.steps:
                detail += f"{layer.locations // layer.steps} location(s) per step, {where}"
            else:
                detail += f"{layer.locations} location(s), {where}"
            if layer.other_uses:
                detail += "; also used by " + ", ".join(layer.other_uses) + " (exact gradient kept, not in factors)"
            what = "table" if layer.kind == "embedding" else "weight"
            stacked = f", stacked ×{layer.steps} under lax.scan" if layer.steps else ""
            if layer.steps:
                detail += f"; one layer per scan step: {layer.steps} sets of Kronecker factors"
            out[layer.weight] = (f"{layer.kind} {what}{stacked} ({layer.source})", detail)
            if layer.bias is not None:
                out[layer.bias] = (f"{layer.kind} bias{stacked} ({layer.source})", f"{layer.name}")
        for fb in self.fallbacks:
            out[fb.leaf] = (f"fallback: {fb.method}", fb.reason)
        return [(path, str(tuple(shape)), *out[i]) for i, (path, shape) in enumerate(zip(self.paths, self.shapes))]

    def table(self) -> str:
        rows = [("parameter", "shape", "treatment", "layer / reason"), *self.rows()]
        widths = [max(len(r[c]) for r in rows) for c in range(3)]
        lines = ["  ".join(r[c].ljust(widths[c]) for c in range(3)) + "  " + r[3] for r in rows]
        lines.insert(1, "-" * min(120, max(len(x) for x in lines)))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    __str__ = table

    def __repr__(self) -> str:
        return f"LayerTags({len(self.layers)} layers, {len(self.fallbacks)} fallback leaves)\n{self.table()}"
