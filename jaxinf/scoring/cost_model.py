"""A cost model, in multiply-adds per training example, for the three ways to score.

With ``F`` influence factors, ``p`` parameters and ``W`` multiply-adds in
one example's forward pass (``W = p`` for a dense network; a convolution
with ``T`` output positions counts ``T`` times its weights), per training
example:

* ``"jvp"`` (forward-mode projection): one primal pass and ``F`` tangent
  passes of about ``2W`` each: ``(1 + 2F) W``.
* ``"gradients"`` (per-example gradients and a matrix product): forward and
  backward passes (``3W``), storing the gradient (``κ p``) and the product
  with the factors (``F p``): ``3W + (κ + F) p``.
* ``"layerwise"`` (per-layer contraction, :mod:`jaxinf.scoring.layerwise`): a forward
  pass that records the layer inputs and a backward pass to the layer
  outputs (``2W``, plus ``κ (S + T O)`` to store them, ``S`` the recorded
  input: ``T R`` in general, the input itself for a convolution), then per layer with
  ``R`` rows (inputs, plus one for a bias), ``O`` outputs and ``T``
  locations, the cheaper of the direct contraction
  ``F T (R O + κ min(R, O))`` (one product with the factors per location,
  and an ``F T min(R, O)`` intermediate to store and reduce) and the
  per-example layer gradient ``T R O + κ R O + F R O``; parameters outside
  any layer (and non-layer uses of layer weights) as in ``"gradients"``.

``κ`` is what one stored entry costs in multiply-adds — a write and a read,
worth many arithmetic operations: :data:`STORAGE_COST` for up to
:data:`STORAGE_COST_ENTRIES` entries per example, growing as the square
root of the size above that (larger rows stream through memory rather than
cache), up to :data:`STORAGE_COST_CAP`. The constants were measured on CPU
with ``python benchmarks/bench_scale.py --only pick``; on another backend
rerun it and adjust them (they are module attributes) if the pick is off.
"""

from __future__ import annotations

from typing import NamedTuple

#: Cost in multiply-adds of storing and re-reading one entry (see the module docstring).
STORAGE_COST = 16.0
STORAGE_COST_ENTRIES = 2048
STORAGE_COST_CAP = 128.0


class LayerProfile(NamedTuple):
    """Sizes the per-layer contraction depends on.

    ``layers``: ``(rows, d_out, locations[, stored])`` per tagged layer,
    ``stored`` the recorded input entries per example (default
    ``locations × rows``: the im2col rows of a convolution; a convolution
    contracted with its own kernel stores only its input);
    ``other_params``: entries whose per-example gradient is formed anyway
    (fallback leaves, non-layer uses of layer weights).
    """

    layers: tuple
    other_params: int


def storage_cost(entries: int) -> float:
    """``κ``: multiply-adds per stored entry, for rows of ``entries`` entries per example."""
    grow = max(1.0, (entries / STORAGE_COST_ENTRIES) ** 0.5)
    return STORAGE_COST * min(grow, STORAGE_COST_CAP / STORAGE_COST)


def direct_layer_cost(num_factors: int, rows: int, d_out: int, locations: int) -> float:
    """Multiply-adds per example of ``Σ_t (a_tᵀ F_i) · g_t`` for every factor ``i``."""
    return num_factors * locations * (rows * d_out + storage_cost(num_factors * min(rows, d_out)) * min(rows, d_out))


def gradient_layer_cost(num_factors: int, rows: int, d_out: int, locations: int) -> float:
    """Multiply-adds per example of forming ``Σ_t a_t g_tᵀ`` and contracting it with every factor."""
    size = rows * d_out
    return (locations + storage_cost(size) + num_factors) * size


def direct_is_cheaper(num_factors: int, rows: int, d_out: int, locations: int) -> bool:
    """Whether the direct per-layer contraction beats forming the per-example layer gradient."""
    return direct_layer_cost(num_factors, rows, d_out, locations) <= gradient_layer_cost(
        num_factors, rows, d_out, locations
    )


def forward_cost(num_params: int, profile: LayerProfile | None) -> int:
    """``W``: multiply-adds of one example's forward pass (``p`` without a profile)."""
    if profile is None:
        return num_params
    return sum(r * o * t for r, o, t, *_ in profile.layers) + profile.other_params


def method_costs(num_factors: int, num_params: int, profile: LayerProfile | None = None) -> dict:
    """Multiply-adds per training example of each scoring method (``"layerwise"`` only with a profile)."""
    f, p = num_factors, num_params
    w = forward_cost(p, profile)
    costs = {"jvp": (1 + 2 * f) * w, "gradients": 3 * w + (storage_cost(p) + f) * p}
    if profile is not None:
        layer_terms = 0.0
        for r, o, t, *stored in profile.layers:
            kept = (stored[0] if stored else t * r) + t * o  # the recorded inputs and output gradients
            layer_terms += min(direct_layer_cost(f, r, o, t), gradient_layer_cost(f, r, o, t))
            layer_terms += storage_cost(kept) * kept
        rest = profile.other_params
        costs["layerwise"] = 2 * w + layer_terms + (storage_cost(rest) + f) * rest
    return costs


def cheapest(num_factors: int, num_params: int, profile: LayerProfile | None = None) -> str:
    """The method of :func:`method_costs` with the fewest multiply-adds (ties: jvp, then layerwise)."""
    costs = method_costs(num_factors, num_params, profile)
    order = ("jvp", "layerwise", "gradients")
    return min((m for m in order if m in costs), key=lambda m: costs[m])


__all__ = [
    "STORAGE_COST",
    "STORAGE_COST_CAP",
    "STORAGE_COST_ENTRIES",
    "LayerProfile",
    "cheapest",
    "direct_is_cheaper",
    "direct_layer_cost",
    "forward_cost",
    "gradient_layer_cost",
    "method_costs",
    "storage_cost",
]
