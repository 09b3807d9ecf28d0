"""Layers found in a loss: tracing, matching dense/conv/bias uses, the layer report, per-layer statistics.

The K-FAC/EK-FAC solvers and the layer-wise scoring contraction build on
what this package finds: :func:`find_layers` (the printable report),
:func:`trace_layers` (a :class:`Tracer` that re-evaluates the loss recording
layer inputs and perturbing layer outputs) and :func:`tag_dense` (an
explicit tag for a dense layer the automatic matcher cannot see).

Automatic layer tagging: find the dense, convolution and embedding layers of any JAX function.

K-FAC needs, for every layer ``s = W a (+ b)``, the layer inputs ``a`` and the
gradients ``g = ∂f/∂s`` with respect to its outputs. :func:`find_layers`
gets them **without changing the user's model**:

1. Trace ``fn(params, batch)`` (for one example) to a jaxpr, with the calls
   made by ``jax.jit`` and ``jax.checkpoint`` inlined, and loop bodies of
   ``lax.scan`` kept as sub-graphs.
2. Follow every parameter leaf through layout-only operations (transpose,
   reshape, dtype conversion, broadcast) to the operations that use it. A
   ``dot_general`` with one parameter operand is a dense layer, whatever the
   weight layout (``x @ W``, ``x @ W.T``, ``einsum``-style contractions over
   several axes); with batch dimensions (per-head weights, ``einsum``
   ``'...hd,hdk->...hk'``) each head is a location of one layer whose input
   ``e_h ⊗ x_h`` is zero outside its head's rows (a block-diagonal input
   factor). A ``conv_general_dilated`` with a parameter kernel is a
   convolution; a ``gather`` of whole rows of a 2-D parameter table by
   integer ids (``jnp.take(table, ids, axis=0)``, Flax's ``Embed``) is an
   embedding, a dense layer on one-hot inputs (its input factor is
   diagonal: the id counts). An ``add`` of a parameter to such an output,
   possibly after a transpose or reshape of it (Equinox's ``W @ x + b``
   under ``vmap``), is the layer's bias (also Flax's reshaped bias), checked
   by pushing index probes through the broadcast. A zero-size weight is a
   fallback (nothing to fit). Layers inside ``lax.scan`` and weights used several times
   (shared layers) are *repeated layers*: their uses add locations, as the
   spatial positions of a convolution do (Grosse & Martens 2016). A weight
   passed to ``lax.scan`` as a *scanned input* (stacked ``(L, ...)`` along a
   scan over layers, as Flax's ``nn.scan`` and MaxText-style models build
   them) is a *stacked layer*: one layer per step, whose matrices and K-FAC
   factors carry a leading axis of ``L`` (its bias stacked the same way).
3. Re-evaluate the traced graph with a zero perturbation ``δ`` added at each
   layer output and the layer inputs recorded. ``∂f/∂δ`` is the output
   gradient ``g``; the recorded inputs are ``a``. The per-example weight
   gradient is ``Σ_locations a gᵀ``.

Explicit tags (:func:`tag_dense`) take precedence over automatic matching and
cover layers the matcher cannot see (custom kernels, ``custom_vjp``
products). Every parameter leaf ends up either in a layer or in a *fallback*
(diagonal or exact small block) with the reason; :class:`LayerTags` prints
the table. A tagged leaf that is also used outside its layers (e.g. an L2
penalty) keeps that use's exact per-example gradient (it enters scores and
the eigenvalue correction, not the Kronecker factors) and is flagged in the
report.

The analysis, one module per step (each imports only the ones above it):

* :mod:`jaxinf.layers.primitive`: the explicit tag :func:`tag_dense` (a primitive);
* :mod:`jaxinf.layers.graph`: trace the function to a jaxpr and build a flat graph;
* :mod:`jaxinf.layers.structures`: :class:`Canon`, :class:`Site`, :class:`Layer`, :class:`Fallback`;
* :mod:`jaxinf.layers.report`: :class:`LayerTags`, the printable report;
* :mod:`jaxinf.layers.match`: match one dense/conv/embedding/bias use of a parameter leaf;
* :mod:`jaxinf.layers.walk`: follow the parameter leaves to their uses (into ``lax.scan`` bodies too);
* :mod:`jaxinf.layers.find`: group the matched uses into layers and fallbacks (:func:`find_layers`);
* :mod:`jaxinf.layers.tracer`: re-evaluate with perturbations at the layer outputs (:func:`trace_layers`);
* :mod:`jaxinf.layers.statistics`: per-layer statistics of one example, from a :class:`Tracer`.

References:
  Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature", ICML 2015. Grosse & Martens, "A Kronecker-factored
  approximate Fisher matrix for convolution layers", ICML 2016.
"""

from jaxinf.layers.find import find_layers
from jaxinf.layers.primitive import tag_dense
from jaxinf.layers.report import LayerTags
from jaxinf.layers.structures import Canon, Fallback, Layer, Site
from jaxinf.layers.tracer import Tracer, trace_layers

__all__ = ["Canon", "Fallback", "Layer", "LayerTags", "Site", "Tracer", "find_layers", "tag_dense", "trace_layers"]
