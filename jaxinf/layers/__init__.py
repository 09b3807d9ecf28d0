"""Layers found in a loss: tracing, matching dense/conv/bias uses, the layer report, per-layer statistics.

The K-FAC/EK-FAC solvers and the layer-wise scoring contraction build on
what this package finds: :func:`find_layers` (the printable report),
:func:`trace_layers` (a :class:`Tracer` that re-evaluates the loss recording
layer inputs and perturbing layer outputs) and :func:`tag_dense` (an
explicit tag for a dense layer the automatic matcher cannot see).
"""

from jaxinf.layers.tagging import Canon, Fallback, Layer, LayerTags, Site, Tracer, find_layers, tag_dense, trace_layers

__all__ = ["Canon", "Fallback", "Layer", "LayerTags", "Site", "Tracer", "find_layers", "tag_dense", "trace_layers"]
