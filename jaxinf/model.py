"""The stateful wrapper: a solver combined into influence scores.

:class:`InfluenceModel` only orchestrates: the curvature comes from :mod:`jaxinf.core.curvature`,
the inverse from a :class:`jaxinf.Solver`, the contractions from :mod:`jaxinf.scoring`. It validates
inputs outside ``jit``, compiles each numerical step once, and turns the solvers' ``SolveInfo`` into
errors or warnings with the numbers.

Sign convention (pyDVL's, so results compare one to one)::

    influences(test, train)[i, j] = + ∇θℓ(test_i)ᵀ (C + λI)⁻¹ ∇θℓ(train_j)

Rows are test points, columns training points, ``C`` the curvature of the
**mean** training loss. Positive means helpful: up-weighting training point
``j`` by ``ε`` changes the loss on test point ``i`` by about ``−ε·I[i, j]``;
removing it (``ε = −1/n``) raises that loss by about ``+I[i, j]/n``.

A *measurement* ``f`` (e.g. a negative log-probability) replaces the loss on the
test side: ``I[i, j] = ∇θf(test_i)ᵀ (C + λI)⁻¹ ∇θℓ(train_j)``, in the units of
``f`` (sign and units: :mod:`jaxinf.scoring.measurement`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.checks import check_damping, check_fit, check_key, check_like_training
from jaxinf.core.curvature import CurvatureOperator, SplitLoss, check_kind, curvature_operator, resolve_blocks
from jaxinf.core.damping import damping_by_block, is_auto, with_auto_damping
from jaxinf.core.data import batch_size, checked_list
from jaxinf.core.errors import NotFittedError
from jaxinf.core.precision import in_compute, promote
from jaxinf.core.tree import as_factors, check_finite, check_matches, owned_params, placed_like, rowwise_dot, tree_spec
from jaxinf.scoring import check_measurement, check_scoring, choose_method, layer_profile, resolve_input_leaf
from jaxinf.solvers import compiled
from jaxinf.solvers.base import Solver, check_solve
from jaxinf.solvers.planned import Planner, common_rows, host_rows, join

PyTree = Any
MODES = ("up", "perturbation")


class InfluenceModel:
    """Influence of training points on test points for a model and a solver.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the **mean** loss over the
        leading axis of every leaf of ``batch``. For Gauss-Newton it may be
        ``None`` and is then ``output_loss(model_fn(params, batch), batch)``.
      params: the trained parameters (any pytree; e.g. Linen ``variables['params']`` or
        ``nnx.split(model, nnx.Param)[1]``; running statistics are refused).
      solver: a :class:`jaxinf.Solver`, e.g. ``jaxinf.direct()``.
      damping: ``λ >= 0`` in ``(C + λI)⁻¹``; a scalar, ``{block: λ}``, or
        ``"auto"``: ``λ = 10 · tr(C)/P`` estimated at fit (and at every refit;
        :mod:`jaxinf.core.damping`), read back as ``damping_value``.
        Checked here and on assignment. Assigning ``model.damping`` or
        ``model.params`` on a fitted model refits it on the data of its fit
        (streamed again if it was streamed), so the state never lags them; a
        bad value raises and leaves the model as it was.
      curvature: ``"hessian"``, ``"gauss_newton"`` or ``"fisher"`` (empirical).
      model_fn, output_loss: the split loss for ``"gauss_newton"``.
      blocks: block-diagonal structure (``None``, ``"layer"``,
        ``"parameter"``, labels or a callable); see
        :func:`jaxinf.core.blocks.resolve_blocks`.
      input_leaf: the batch leaf that perturbation mode differentiates with
        respect to: a position in ``jax.tree.leaves(batch)`` (default ``0``,
        the ``x`` of ``(x, y)``) or a key path string such as ``"['image']"``.
      scoring: ``"auto"``, ``"gradients"``, ``"jvp"`` or ``"layerwise"``; see
        :mod:`jaxinf.scoring`. ``"auto"`` lets a solver with a scorer of its
        own (Arnoldi, Nyström, K-FAC/EK-FAC, DataInf) score; a method named
        here is used with every solver (the same numbers).
      strict: raise :class:`ConvergenceError` when a solve does not converge;
        if ``False``, warn with the numbers instead. Divergence and NaN always
        raise.
      memory_budget_bytes: bytes one scoring step may allocate (default
        ``None``: 3/4 of the free memory at the call). Each step is sized from XLA's
        memory analysis before it runs and split over chunks of examples to
        fit, or refused with the number (:mod:`jaxinf.solvers.planned`).

    bfloat16/float16 ``params`` run the model in their dtype and the linear
    algebra in float32; influences come back in float32
    (:mod:`jaxinf.core.precision`).

    Raises:
      ValueError: bad configuration, at construction (unknown curvature or
        scoring, params that are not finite floats, bad ``damping`` or
        ``blocks``), naming the argument.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxinf
      >>> def loss(w, batch):
      ...     x, y = batch
      ...     return jnp.mean((x @ w - y) ** 2)
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]); y = jnp.array([1.0, 0.0, 1.0])
      >>> model = jaxinf.InfluenceModel(loss, jnp.array([0.5, 0.2]), jaxinf.direct(), damping=0.1)
      >>> model = model.fit((x, y))
      >>> model.influences((x[:1], y[:1]), (x, y)).shape
      (1, 3)
    """

    def __init__(
        self,
        loss_fn: Callable | None,
        params: PyTree,
        solver: Solver,
        *,
        damping: Any = 0.0,
        curvature: str = "hessian",
        model_fn: Callable | None = None,
        output_loss: Callable | None = None,
        blocks: Any = None,
        input_leaf: int | str = 0,
        scoring: str = "auto",
        strict: bool = True,
        memory_budget_bytes: int | None = None,
    ):
        if not isinstance(solver, Solver):
            raise TypeError(f"solver must be a jaxinf.Solver (e.g. jaxinf.direct()), got {type(solver).__name__}.")
        check_scoring(scoring, solver)
        self._loss_given = loss_fn is not None  # with a split too, both are checked at fit
        if loss_fn is None:
            if model_fn is None or output_loss is None:
                raise ValueError("Give loss_fn(params, batch), or model_fn and output_loss.")
            loss_fn = SplitLoss(model_fn, output_loss)  # hashable by the pair: models of one split share compiles
        if not callable(loss_fn):
            raise TypeError("loss_fn must be a callable loss_fn(params, batch) -> scalar mean loss.")
        check_kind(curvature, loss_fn, model_fn, output_loss)
        params = owned_params(params)  # checked; a NumPy leaf copied, so that changing it in place changes nothing
        self._block_names = resolve_blocks(params, blocks)[1]  # bad blocks raise here, not at fit
        check_damping(damping, self._block_names)
        self.loss_fn, self._params, self.solver, self.curvature = loss_fn, params, solver, curvature
        self.model_fn, self.output_loss, self.blocks = model_fn, output_loss, blocks
        self.input_leaf, self.scoring, self.strict, self._damping = input_leaf, scoring, strict, damping
        self._spec = tree_spec(params)
        self.state, self.operator = None, None  # the fitted state and the operator it was fitted on, set by fit

        # The jitted steps are shared by all models (jaxinf.solvers.compiled): a refit on data of the same shapes,
        # and another model of the same loss function, solver configuration and shapes, reuse the compiled programs.
        # The planner runs them in chunks of examples that fit memory_budget_bytes.
        self._init = functools.partial(compiled.init, solver=solver)
        self._planner, self._master_of, self._profiles = Planner(memory_budget_bytes), None, {}
        # Set by jaxinf.scale.fit_from_stream(model, ...): refits from the same stream when damping or params change.
        self._refit_stream: Callable[[], None] | None = None

    @property
    def damping(self):
        return self._damping

    @damping.setter
    def damping(self, value):
        check_damping(value, self._block_names)
        self._assign("_damping", value)

    @property
    def params(self):
        """The parameters; assigning new ones (same structure, shapes and dtypes) to a fitted model refits it."""
        return self._params

    @params.setter
    def params(self, value):
        value = owned_params(value)
        if tree_spec(value) != self._spec:
            raise ValueError(
                f"params: the new params have another layout ({tree_spec(value)}) than the model's ({self._spec}). "
                "Build a new InfluenceModel for another model."
            )
        self._assign("_params", value)

    def _assign(self, attribute: str, value) -> None:
        """Set ``attribute`` and refit a fitted model on the data of its fit; on failure restore it and re-raise."""
        if self.state is not None and self.operator is None and self._refit_stream is None:
            raise ValueError(
                f"{attribute[1:]}: this model holds a state but not the data it was fitted on, so it cannot refit. "
                f"Fit it again (model.fit(train_data)) after setting {attribute[1:]}."
            )
        old = getattr(self, attribute)
        setattr(self, attribute, value)
        if self.state is None:
            return
        try:
            if self._refit_stream is not None:
                self._refit_stream()
            else:
                op = self.operator
                params = jax.tree.map(placed_like, self._in_compute(None)[0], op.params)
                self._fit_operator(self._damped(dataclasses.replace(op, params=params)), self._fit_key)
        except BaseException:
            setattr(self, attribute, old)  # the state is untouched: keep the attribute in step with it
            raise

    is_fitted = property(lambda self: self.state is not None)

    def fit(self, train_data: Any, key: jax.Array | None = None) -> InfluenceModel:
        """Fit the solver to the curvature of the mean loss over ``train_data``.

        Args:
          train_data: one batch, or a list/iterable of batches (sizes may
            differ; the average is weighted by batch size).
          key: PRNG key for randomised solvers (sketches, LiSSA, sampled
            Fisher labels); a fixed default is used when ``None``.

        Returns:
          ``self``, fitted.

        Raises:
          ValueError: a ``key`` that is not one PRNG key; bad data; a loss
            that is not a finite scalar mean over the leading axis of the
            batch (a sum, time-major data); a curvature that is zero or not
            finite on the data (see :mod:`jaxinf.core.checks`).
        """
        check_key(key)
        operator = self.operator_for(train_data)
        self._check_loss(operator)
        self._fit_operator(operator, key)
        self._refit_stream = None
        return self

    def _check_loss(self, operator: CurvatureOperator) -> None:
        """The fit-time checks of :func:`jaxinf.core.checks.check_fit` on the loss (and the split) and the curvature."""
        check_fit(operator, self.loss_fn if self._loss_given else None, self.model_fn, self.output_loss)

    def operator_for(self, train_data: Any) -> CurvatureOperator:
        """The damped curvature operator of this model's loss over ``train_data`` (no fitting)."""
        kw = {"kind": self.curvature, "blocks": self.blocks, "model_fn": self.model_fn, "output_loss": self.output_loss}
        return self._damped(curvature_operator(self.loss_fn, self.params, train_data, **kw))

    def _damped(self, operator: CurvatureOperator) -> CurvatureOperator:
        """``operator`` with this model's damping (``"auto"``: :func:`jaxinf.core.damping.auto_damping` of it)."""
        return with_auto_damping(operator) if is_auto(self._damping) else operator.with_damping(self._damping)

    @property
    def damping_value(self) -> float | dict | None:
        """The damping of the fitted curvature: ``damping``, or the λ that ``damping="auto"`` chose (None unfitted)."""
        return None if self.operator is None else damping_by_block(self.operator)

    def _fit_operator(self, operator: CurvatureOperator, key) -> None:
        self._fit_key = key
        state = self._init(operator, key)
        if self.solver.validate is not None:
            self.solver.validate(state)
        self.operator, self.state = operator, state
        self.n_train = operator.num_examples

    def _in_compute(self, fn: Callable | None):
        """``(params, fn)`` as the solvers see them: float32 master params, ``fn`` run in the params' dtype."""
        if self._master_of is not self._params:
            self._master_of, self._master = self._params, promote(self._params)[0]
        return self._master, in_compute(self._params, fn)

    def _require_fit(self) -> None:
        if self.state is None:
            raise NotFittedError("This InfluenceModel is not fitted yet: call model.fit(train_data) first.")

    def _batches(self, data: Any, name: str) -> list:
        out = checked_list(data, name=name)  # stacking a list only to unstack it would compile two programs
        if self.operator is not None:
            ref = self.operator.data.abstract()  # shapes only: indexing a stacked batch would compile a program
            for i, b in enumerate(out):
                check_like_training(b, ref, f"{name}[batch {i}]" if len(out) > 1 else name)
        return out

    def influence_factors(self, test_data: Any, *, measurement: Callable | None = None) -> PyTree:
        """``(C + λI)⁻¹ ∇θf(test_i)`` per test point; ``f``: ``measurement`` (as for :meth:`influences`), else the loss.

        Returns:
          A params-shaped pytree whose leaves carry a leading ``n_test`` axis.
        """
        self._require_fit()
        test_data = checked_list(test_data, name="test_data")  # read once: a generator is read by both steps below
        parts = list(self._solved(test_data, "test_data", self._test_fn(measurement, test_data)))
        return join([factors for _, factors, _ in parts], [valid for *_, valid in parts], axis=0)

    def _test_fn(self, measurement: Callable | None, test_data: Any) -> Callable:
        """The test side's function: the loss, or the checked measurement."""
        batches = [] if measurement is None else self._batches(test_data, "test_data")
        return self.loss_fn if measurement is None else check_measurement(measurement, self._params, batches)

    def _solved(self, data: Any, name: str, fn: Callable):
        """Per chunk of ``data``: ``(gradients of fn, checked factors, valid rows)``, padded (:mod:`.planned`)."""
        what, batches = "loss_fn" if fn is self.loss_fn else "measurement", self._batches(data, name)
        (params, fn), size = self._in_compute(fn), common_rows(batches)  # a ragged batch runs padded: one program
        for i, batch in enumerate(batches):
            parts = self._planner.solved(self.solver, self.state, fn, params, batch, size)
            for grads, factors, info, valid, finite in parts:
                advice = f"{what} is not finite here though the data is finite; check it for log(0) or labels."
                where = f"the {what} gradient on {name}[batch {i}]"  # the padding left out:
                check_finite(host_rows(grads, valid), where, per_example=True, advice=advice)
                check_solve(self.solver, info, finite, "right-hand sides", strict=self.strict)
                yield grads, factors, valid

    def scoring_method(self, num_factors: int, batch: PyTree) -> str:
        """The contraction used for ``num_factors`` factors against ``batch``: ``scoring``, or the cost model's pick.

        With ``scoring="auto"``, :func:`jaxinf.scoring.choose_method` weighs
        ``"jvp"``, ``"gradients"`` and (when the loss's layers can be traced)
        ``"layerwise"`` on the model's layer sizes, traced once per example
        shape.
        """
        if self.scoring != "auto":
            return self.scoring
        key = (jax.tree.structure(batch), tuple((np.shape(x)[1:], jnp.result_type(x)) for x in jax.tree.leaves(batch)))
        if key not in self._profiles:
            self._profiles[key] = layer_profile(*reversed(self._in_compute(self.loss_fn)), batch)
        return choose_method(num_factors, batch_size(batch), self._spec.size, self._profiles[key])

    def influences_from_factors(self, factors: PyTree, train_data: Any, mode: str = "up"):
        """Complete ``influences`` from precomputed factors.

        Args:
          factors: output of :meth:`influence_factors` (leading ``n_test``).
          train_data: one batch or a collection of batches.
          mode: ``"up"`` -> shape ``(n_test, n_train)``; ``"perturbation"`` ->
            ``(n_test, n_train, *x_shape)``.
        """
        check_mode(mode)
        factors = as_factors(factors, self._spec, self._in_compute(None)[0])  # finite, cast to the params' dtype
        return self._columns(factors, train_data, mode, self.loss_fn)

    def _columns(self, factors: PyTree, data: Any, mode: str, fn: Callable):
        """``factorsᵀ ∇θfn(z_j)`` (or its perturbation) for each ``z_j`` of ``data``; ``fn``: loss or measurement."""
        check_matches(factors, self._spec, "factors", leading=1)
        n_factors = jax.tree.leaves(factors)[0].shape[0]
        columns, valid, params, fn_c = [], [], *self._in_compute(fn)
        batches = self._batches(data, "train_data" if fn is self.loss_fn else "test_data")
        for batch in batches:
            step, what = compiled.contract_columns, "scoring"
            if mode == "perturbation":
                step, what = compiled.perturbation_columns, "perturbation"
                last = resolve_input_leaf(batch, self.input_leaf)
            elif fn is self.loss_fn:
                last = self.scoring_method(n_factors, batch)
            else:  # a measurement: its layers are not traced, so "auto" weighs gradients and JVPs only
                last = self.scoring if self.scoring != "auto" else choose_method(n_factors, 0, self._spec.size)
            args = (fn_c, params, factors, batch, last)
            got = self._planner.map_parts(f"{what} ({last})", step, args, row_arg=3, size=common_rows(batches))
            columns, valid = columns + got[0], valid + got[1]
        return join(columns, valid, axis=1)

    def influences(self, test_data: Any, train_data: Any = None, mode: str = "up", *, measurement=None):
        """``I[i, j] = ∇θf(test_i)ᵀ (C + λI)⁻¹ ∇θℓ(train_j)`` (mode ``"up"``), ``f = ℓ`` by default.

        Args:
          test_data: the test batch (rows).
          train_data: the training batch or batches (columns); ``None`` reuses
            ``test_data`` (the symmetric case).
          mode: ``"up"`` or ``"perturbation"``.
          measurement: ``f(params, batch) -> scalar``, the mean over the batch
            of what is attributed on the test side (default ``None``: the
            loss); see :mod:`jaxinf.scoring.measurement`. The solver's scorer
            is then not used: the factors come from ``solve`` (same numbers).

        In mode ``"up"`` the inverse is applied to whichever side has fewer
        points (the operator is symmetric).

        Raises:
          ValueError: a ``measurement`` that is not a finite float scalar mean
            over the batch (a sum, a per-example vector).
        """
        self._require_fit()
        check_mode(mode)
        if train_data is None:
            train_data = test_data
        # Read one-shot iterables (generators) once: both sides are iterated several times below.
        test_data = checked_list(test_data, name="test_data")
        train_data = checked_list(train_data, name="train_data")
        if mode == "up" and self.solver.scorer is not None and measurement is None and self.scoring == "auto":
            test, train = self._batches(test_data, "test_data"), self._batches(train_data, "train_data")
            return self._planner.scored(self.solver.scorer, self.state, self.operator, test, train)
        if mode == "up" and sum(map(batch_size, train_data)) < sum(map(batch_size, test_data)):
            fn = self._test_fn(measurement, test_data)  # checked before the training side is solved
            return self._columns(self.influence_factors(train_data), test_data, mode, fn).T
        factors = self.influence_factors(test_data, measurement=measurement)
        return self._columns(factors, train_data, mode, self.loss_fn)  # checked by the solve: not again

    def self_influence(self, data: Any):
        """``∇θℓ(z_j)ᵀ (C + λI)⁻¹ ∇θℓ(z_j)`` for each point; shape ``(n,)``.

        The loss is on both sides, so there is no ``measurement`` here: for
        ``∇θf(z)ᵀ (C + λI)⁻¹ ∇θℓ(z)`` take the diagonal of
        ``influences(data, data, measurement=f)``.
        """
        self._require_fit()
        parts = list(self._solved(data, "data", self.loss_fn))
        return join([rowwise_dot(factors, grads) for grads, factors, _ in parts], [v for *_, v in parts], axis=0)


def check_mode(mode: str) -> None:
    """``ValueError`` unless ``mode`` is one of :data:`MODES`."""
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; choose 'up' (up-weighting) or 'perturbation'.")


__all__ = ["MODES", "InfluenceModel", "check_mode"]
