"""Fit a solver from a stream of batches: every solver whose fit is a fixed number of passes.

:func:`fit_from_stream` fits ``solver`` on a collection read batch by batch
(a :mod:`jaxinf.scale.sources` source: numpy arrays, memmaps, zarr, a grain
pipeline) and returns the same state as ``solver.init(operator)`` on the same
batches held in memory (float tolerance; the same random draws for the
stochastic parts). Memory is one batch plus the solver's state and
workspace, whatever the number of examples.

Each pass is a host loop over the batches with one jitted call per batch
(compiled once per batch shape; a ragged last batch compiles once more),
accumulated as the size-weighted mean over examples, so a ragged last batch
is exact. With ``mesh=`` every batch whose size divides the devices is
sharded along its examples and the per-batch work runs data-parallel.

===============  ===========================================================
direct           one pass, ``p`` products per batch (:func:`direct_from_stream`).
nystrom          one pass: the sketch ``Y = C Ω`` (``rank`` products per batch).
arnoldi          ``krylov_dim`` passes, one product per batch each (the
                 iteration is sequential).
kfac             one pass: ``A``, ``G`` and fallback factor sums.
ekfac            two passes: the factors, then the eigenvalue correction.
cg, lissa, ...   not streamable (they iterate over the data inside ``lax``
                 loops): fit on an in-memory subset or a sharded dataset.
===============  ===========================================================

A solver opts in through ``Solver.stream_init(stream, *, key=None)``, which
receives a :class:`BatchStream`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxinf.core.checks import check_fit
from jaxinf.core.curvature import CurvatureOperator, curvature_operator
from jaxinf.core.precision import refuse_half
from jaxinf.core.tree import check_finite, ravel_batched, unravel
from jaxinf.model import InfluenceModel
from jaxinf.scale.distributed import agreed
from jaxinf.scale.sharding import host_view, replicate
from jaxinf.scale.sources import as_source
from jaxinf.scale.streaming import StreamingCurvature
from jaxinf.solvers.base import Solver

PyTree = Any

__all__ = ["BatchStream", "fit_from_stream"]

_NOT_STREAMABLE = {
    "cg": "cg() runs its iterations over the data inside a lax loop",
    "lissa": "lissa() samples minibatches of the data inside a lax loop",
}


class BatchStream:
    """What a solver's ``stream_init`` gets: passes over a source, and the layout of the problem.

    Attributes:
      operator: a :class:`jaxinf.CurvatureOperator` on the **first batch
        only**, for the parameter layout, the resolved damping, the kind and
        the loss functions (use it for shapes and options; never for
        products, which would see one batch).
      first: the first batch (host arrays), e.g. for ``jax.eval_shape``.
      curvature: the :class:`StreamingCurvature` of the whole stream.
      mesh: the data mesh or ``None``.
      num_examples: examples in the stream.
    """

    def __init__(
        self,
        loss_fn: Callable | None,
        params: PyTree,
        data: Any,
        *,
        kind: str = "hessian",
        damping: Any = 0.0,
        blocks: Any = None,
        model_fn: Callable | None = None,
        output_loss: Callable | None = None,
        mesh=None,
        progress: bool = False,
        check: Callable[[CurvatureOperator], None] | None = None,
    ):
        check = check or functools.partial(check_fit, loss_fn=loss_fn, model_fn=model_fn, output_loss=output_loss)
        kw = dict(kind=kind, damping=damping, blocks=blocks, model_fn=model_fn, output_loss=output_loss)
        # every process checks its own data, then the loss and its curvature on its first batch (the checks of
        # InfluenceModel.fit); all stop together if one finds a problem (none waits in a collective)
        source, self.first, self.operator = agreed(
            "fit_from_stream: the first batch, the loss and its curvature",
            _checked_start,
            data,
            loss_fn,
            params,
            kw,
            check,
        )
        self.curvature = StreamingCurvature(
            loss_fn, params, source, kind=kind, model_fn=model_fn, output_loss=output_loss, mesh=mesh, progress=progress
        )
        self.mesh = mesh

    @property
    def num_examples(self) -> int:
        return self.curvature.num_examples

    def batches(self, desc: str = "pass", *, with_indices: bool = False, pad_to: int | None = None):
        """One pass: ``(index, batch, weight)``, batches placed on the mesh, ``weight = n_b / n``.

        With ``with_indices``, ``(index, batch, weight, example_indices)``, the
        examples' indices in the whole dataset (across processes): per-example
        random draws keyed by them do not depend on the batching or the
        number of processes; with ``pad_to``, pieces of that size and a mask
        (:meth:`StreamingCurvature.batches`).
        """
        return self.curvature.batches(desc, with_indices=with_indices, pad_to=pad_to)

    def replicate(self, tree: PyTree) -> PyTree:
        """``tree`` on every device of the mesh (unchanged without one)."""
        return tree if self.mesh is None else replicate(tree, self.mesh)

    def zeros(self, shapes: PyTree) -> PyTree:
        """Zeros with the shapes and dtypes of ``shapes`` (``jax.ShapeDtypeStruct`` leaves), replicated.

        Made in NumPy and put on the device: ``jnp.zeros`` would compile a program per shape.
        """
        zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        return jax.device_put(zeros) if self.mesh is None else self.replicate(zeros)

    def matmat(self, vectors: jax.Array, *, desc: str = "curvature products") -> jax.Array:
        """``C V`` for raveled vectors ``V`` of shape ``(p, k)`` (columns): one pass."""
        spec = self.operator.spec
        tree = jax.vmap(lambda column: unravel(spec, column))(vectors.T)
        return ravel_batched(self.curvature.matmat(tree, desc=desc), spec.dtype).T

    def matvec(self, vector: jax.Array, *, desc: str = "curvature product") -> jax.Array:
        """``C v`` for a raveled vector ``v`` of shape ``(p,)``: one pass."""
        return self.matmat(vector[:, None], desc=desc)[:, 0]


def fit_from_stream(
    solver: Solver | InfluenceModel,
    loss_fn: Callable | None = None,
    params: PyTree = None,
    data: Any = None,
    *,
    kind: str = "hessian",
    damping: Any = 0.0,
    blocks: Any = None,
    model_fn: Callable | None = None,
    output_loss: Callable | None = None,
    mesh=None,
    key: jax.Array | None = None,
    progress: bool = True,
    validate: bool = True,
) -> PyTree:
    """``solver``'s state fitted on a stream of batches, equal to ``solver.init`` on the same data in memory.

    Two forms:

    * ``fit_from_stream(solver, loss_fn, params, data, **options) -> state``
      (the functional core);
    * ``fit_from_stream(model, data, *, key=None, mesh=None, progress=True) ->
      model``: fits an :class:`jaxinf.InfluenceModel` with its own loss,
      params, curvature, damping and blocks; assigning ``model.damping``
      afterwards streams the data again.

    The curvature is that of the mean loss over every example of ``data``
    (``C`` in ``(C + λI)⁻¹``; the same operator :func:`jaxinf.curvature_operator`
    builds). Supported: ``direct`` (one pass; its ``max_memory`` and
    ``column_batch`` apply),
    ``nystrom`` (one pass for the sketch ``Y = C Ω``), ``arnoldi``
    (``krylov_dim`` passes: the Arnoldi iteration needs each product before
    the next, so the host loops over Krylov steps and, within each, over the
    data), ``kfac`` (one pass) and ``ekfac`` (two passes). The solver's own
    configuration (rank, ``krylov_dim``, Fisher mode, damping heuristic, ...)
    is used; ``key`` gives the same draws as ``solver.init(operator, key=key)``.

    Use the state with the same solver: ``InfluenceCalculator(model,
    state=state)`` for an :class:`jaxinf.InfluenceModel` built with this
    solver, loss and damping (it need not be fitted), or ``solver.solve``.

    Args:
      solver: a solver from a factory (``jaxinf.ekfac(...)``, ``jaxinf.nystrom(r)``, ...).
      loss_fn, params, kind, model_fn, output_loss, damping, blocks: as for
        :func:`jaxinf.curvature_operator`.
      data: a source (:class:`ArraySource`, :class:`IterableSource`, ...), one
        batch or a list of batches. Every batch but the last has the same size.
      mesh: optional data mesh (:func:`jaxinf.scale.data_mesh`): batches are
        sharded along their examples (replicated when their size does not
        divide the devices).
      key: PRNG key for randomised fits (sketches, sampled Fisher labels);
        ``None``: the solver's default.
      progress: a tqdm progress bar per pass (process 0 only).
      validate: run ``solver.validate(state)`` afterwards, as
        :meth:`jaxinf.InfluenceModel.fit` does.

    Returns:
      The solver's state (the model, fitted, in the second form).

    Raises:
      ValueError: a solver that cannot be fitted from a stream (cg, lissa:
        with what to do instead), an empty stream, NaN or inf in a batch
        (naming it), params the loss cannot be evaluated with; or what
        :meth:`jaxinf.InfluenceModel.fit` refuses, checked on the first batch
        before the first pass (a loss that is not a finite mean over the
        examples: a sum, time-major data; a zero or non-finite curvature: see
        :mod:`jaxinf.core.checks`), on every process at once.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np, jaxinf
      >>> from jaxinf.scale import ArraySource, fit_from_stream
      >>> x = np.random.default_rng(0).normal(size=(10, 3)); y = x @ np.ones((3, 1))
      >>> params = {"w": jnp.zeros((3, 1)), "b": jnp.zeros(1)}
      >>> loss = lambda p, b: 0.5 * jnp.mean(jnp.sum((b[0] @ p["w"] + p["b"] - b[1]) ** 2, -1))
      >>> solver = jaxinf.ekfac(fisher="empirical")
      >>> state = fit_from_stream(solver, loss, params, ArraySource((x, y), batch_size=4),
      ...                         damping=0.1, progress=False)
      >>> op = jaxinf.curvature_operator(loss, params, [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])],
      ...                                damping=0.1)
      >>> bool(jnp.allclose(state.eigvals[0], solver.init(op).eigvals[0], rtol=1e-5))
      True
    """
    if isinstance(solver, InfluenceModel):
        if data is not None or params is not None:
            raise TypeError(
                "fit_from_stream(model, data, *, key=None, mesh=None, progress=True): the model brings its own loss, "
                "params, curvature, damping and blocks; pass only the data (and key/mesh/progress)."
            )
        return _fit_model(solver, loss_fn, key=key, mesh=mesh, progress=progress)
    options = dict(
        kind=kind,
        damping=damping,
        blocks=blocks,
        model_fn=model_fn,
        output_loss=output_loss,
        mesh=mesh,
        progress=progress,
    )
    return _fit_state(solver, loss_fn, params, data, options, key=key, validate=validate)


def _fit_state(solver, loss_fn, params, data, options: dict, *, key, validate: bool, check=None) -> PyTree:
    """The functional form of :func:`fit_from_stream`; ``check(operator)``: the fit-time checks (default: loss's)."""
    if not isinstance(solver, Solver):
        raise TypeError(f"fit_from_stream needs a jaxinf Solver (e.g. jaxinf.ekfac()), got {type(solver).__name__}.")
    refuse_half(params, "jaxinf.scale.fit_from_stream")
    if solver.stream_init is None:
        base = solver.name.split("+")[0].removeprefix("block_")  # cg+ekfac, block_cg: cg
        why = _NOT_STREAMABLE.get(base, f"{solver.name} has no streamed fit (Solver.stream_init)")
        if base == "cg":  # its iterations can stream instead: one pass each
            why += " (solve over the stream instead: jaxinf.scale.cg_from_stream(model, test_data, source))"
        raise ValueError(
            f"{why}, so it cannot be fitted from a stream. Fit it on an in-memory subset "
            "(jaxinf.InfluenceModel(...).fit(subset)) or on data sharded over devices (jaxinf.scale.fit / "
            "shard_operator); or fit a solver that streams: direct, nystrom, arnoldi, kfac or ekfac."
        )
    state = solver.stream_init(BatchStream(loss_fn, params, data, check=check, **options), key=key)
    if validate and solver.validate is not None:
        solver.validate(host_view(state))  # multi-process states are global arrays: check this process's copy
    return state


def _fit_model(model: InfluenceModel, data: Any, *, key, mesh, progress) -> InfluenceModel:
    """Fit ``model`` from a stream; a later ``model.damping = λ`` streams the data again."""
    source = as_source(data)
    options = dict(
        kind=model.curvature,
        damping=model.damping,
        blocks=model.blocks,
        model_fn=model.model_fn,
        output_loss=model.output_loss,
        mesh=mesh,
        progress=progress,
    )
    # the model's own fit-time checks (its names for the loss and the split), on the stream's first batch
    state = _fit_state(
        model.solver, model.loss_fn, model.params, source, options, key=key, validate=True, check=model._check_loss
    )
    # The operator is only read for the parameters, the loss and the layout when scoring: one batch of it.
    model.operator, model.state = model.operator_for(source.first()), state
    model.n_train = source.num_examples
    model._fit_key = key
    model._refit_stream = lambda: _fit_model(model, source, key=key, mesh=mesh, progress=progress)
    return model


def _checked_start(data, loss_fn, params, options: dict, check: Callable[[CurvatureOperator], None]):
    """The source, checked (examples, a finite first batch, params the loss takes), and the first batch's operator.

    ``check(operator)`` then runs the fit-time checks of the loss and its
    curvature on the first batch (:mod:`jaxinf.core.checks`), as
    :meth:`jaxinf.InfluenceModel.fit` runs them on its data. ``first()``
    starts a fresh pass, so a one-shot iterator is not consumed.
    """
    source = as_source(data)
    if source.num_examples < 1:
        raise ValueError("The data stream holds no examples; nothing to fit.")
    first = source.first()
    check_finite(first, "data[batch 0]")
    operator = curvature_operator(loss_fn, params, first, **options)
    check(operator)
    return source, first, operator
