"""K-FAC and EK-FAC: Kronecker-factored inverse curvature, layer by layer.

For a layer ``s = W a`` (bias as an appended 1 in ``a``) the curvature block
of the weights is approximated by a Kronecker product (Martens & Grosse 2015;
convolutions: Grosse & Martens 2016; repeated layers summed over locations)::

    C_W ≈ A ⊗ G,   A = E[Σ_t a_t a_tᵀ],   G = E[(1/T) Σ_t g_t g_tᵀ],

with ``t`` over the ``T`` locations of the layer (positions of a
convolution, steps of a ``lax.scan``, uses of a shared weight) and ``g`` the
gradient with respect to the layer output. A weight stacked along a
``lax.scan`` over layers (sliced per step) is one layer per step, each with
its own ``A``, ``G``, eigenbases and damping (a leading axis of ``L``).
An embedding (one-hot inputs) has a diagonal ``A`` (the id counts): it is
kept as a vector with the identity as its eigenbasis. With ``A = Q_A diag(λ_A) Q_Aᵀ``
and ``G = Q_G diag(λ_G) Q_Gᵀ``, the solve is::

    (C_W + λI)⁻¹ v = Q_A [ (Q_Aᵀ V Q_G) / (Λ + λ) ] Q_Gᵀ,

where ``V`` is ``v`` as a ``(d_in+1, d_out)`` matrix and ``Λ = λ_A λ_Gᵀ``
(K-FAC). EK-FAC (George et al. 2018) keeps the Kronecker eigenbasis but
replaces ``Λ`` by the second moments of the per-example gradients in that
basis, ``Λ = E[(Q_Aᵀ ∇_W ℓ_i Q_G)²]`` (elementwise square), which is the
best diagonal in that basis in Frobenius norm. Parameters outside any tagged
layer get a diagonal or an exact small block of the same curvature
(:mod:`jaxinf.layers` decides and reports which).

Which curvature (the ``fisher`` option):

* ``"sampled"`` — the true Fisher / Monte-Carlo Gauss-Newton: output
  gradients of ``r ~ N(0, H_out)``, ``H_out`` the Hessian of the per-example
  output loss (or labels drawn from the model with ``likelihood=``), so
  ``E[g gᵀ]`` is the Gauss-Newton factor in expectation.
* ``"exact"`` — the Gauss-Newton in the factors without sampling noise: one
  backward pass per column of ``H_out^{1/2}`` (one per model output).
* ``"empirical"`` — gradients of the loss at the true labels (empirical
  Fisher).
* ``"auto"`` (default) — ``"empirical"`` for an operator of kind
  ``"fisher"``, else ``"sampled"`` when the output loss is known (the
  operator's or the factory's ``model_fn`` and ``output_loss``, or a
  ``likelihood``), else ``"empirical"``.

Damping: ``λ`` is the operator's damping of the layer's weight leaf. Where
that is zero, the layer gets ``damping_heuristic × mean(Λ)`` (default 0.1, as
in kronfluence); a positive operator damping always wins, and
``damping_heuristic=None`` keeps zero damping (``validate`` then reports a
singular layer).

This module holds the factories, the solve and the scores; the fitting passes
are in :mod:`jaxinf.solvers.kfac_fit`, the options, plan and state in
:mod:`jaxinf.solvers.kfac_plan` (:class:`KFACPlan`, :class:`KFACState` are
re-exported here).

References:
  Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature", ICML 2015. Grosse & Martens, "A Kronecker-factored
  approximate Fisher matrix for convolution layers", ICML 2016. George,
  Laurent, Bouthillier, Ballas & Vincent, "Fast Approximate Natural Gradient
  Descent in a Kronecker-factored Eigenbasis", NeurIPS 2018. Grosse et al.,
  "Studying Large Language Model Generalization with Influence Functions",
  2023 (EK-FAC for influence).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxinf.core.curvature import CurvatureOperator, per_example_grads
from jaxinf.core.data import checked_list, is_single_batch
from jaxinf.core.tree import check_matches
from jaxinf.layers.statistics import example_statistics
from jaxinf.scoring.layerwise import contract_by_layer
from jaxinf.solvers.autodiff import frozen
from jaxinf.solvers.base import Scorer, Solver, make_info, records_config
from jaxinf.solvers.kfac_fit import fit, fit_stream
from jaxinf.solvers.kfac_plan import FISHER_MODES, KFACPlan, KFACState, PlanCache, check_options, validate_state

PyTree = Any
EXAMPLE_CHUNK = 128  # examples whose EK-FAC pass-2 temporaries are formed at once (read by each fit)


# ----------------------------------------------------------------------------
# The factory
# ----------------------------------------------------------------------------


# (plan, output_loss, operator, key, heuristic, chunk): one program per plan (one per problem signature) and shapes
_jitted_fit = jax.jit(fit, static_argnums=(0, 1, 4, 5))


@records_config
def ekfac(
    *,
    update_diagonal: bool = True,
    fisher: str = "auto",
    likelihood: str | None = None,
    num_samples: int = 1,
    model_fn: Callable | None = None,
    output_loss: Callable | None = None,
    damping_heuristic: float | None = 0.1,
    factor_dtype: Any = None,
    block_max_size: int = 256,
) -> Solver:
    """EK-FAC (or, with ``update_diagonal=False``, K-FAC) on automatically tagged layers.

    Solves ``(C + λI) x = v`` with ``C`` replaced, layer by layer, by
    ``(Q_A ⊗ Q_G) diag(Λ) (Q_A ⊗ Q_G)ᵀ`` (see the module docstring), and
    fallback leaves by a diagonal or exact block. ``init`` fits the factors
    over ``operator.data`` (size-weighted over batches); ``solve`` costs two
    small matrix products per layer.

    Args:
      update_diagonal: EK-FAC's eigenvalue correction
        ``Λ = E[(Q_Aᵀ ∇_W ℓ_i Q_G)²]`` (one more pass over the data); ``False``
        gives K-FAC's ``Λ = λ_A λ_Gᵀ``.
      fisher: ``"auto"``, ``"sampled"``, ``"exact"`` or ``"empirical"``; see the
        module docstring.
      likelihood: how ``"sampled"`` draws output gradients: ``None`` (Gaussian
        with the covariance ``H_out`` of the output loss), ``"categorical"``
        (labels drawn from ``softmax(outputs)``, the outputs being logits) or
        ``"gaussian"`` (``y ~ N(outputs, I)``). With a likelihood, the output
        loss is not needed; where there is one (the operator's or
        ``output_loss``), the likelihood's output Hessian is scaled to the
        loss's own curvature per example, so a loss that averages over
        positions or outputs gets the Fisher of that average. Without one the
        loss is read as the negative log-likelihood summed over positions and
        outputs (``-Σ_t log p(y_t)``, ``½‖outputs - y‖²``): a loss that averages
        over ``T`` positions would get a curvature ``T`` times too large.
      num_samples: draws per example for ``"sampled"``.
      model_fn, output_loss: ``model_fn(params, batch) -> outputs`` and
        ``output_loss(outputs, batch) -> mean loss``, overriding the
        operator's (needed for ``"sampled"``/``"exact"`` with an operator of
        kind ``"hessian"`` or ``"fisher"``).
      damping_heuristic: where the operator's damping is zero, use this times
        the mean eigenvalue of the layer (or fallback block); ``None``: never.
      factor_dtype: dtype for accumulating and eigendecomposing the factors
        (e.g. ``jnp.float64`` with float32 parameters; needs
        ``jax_enable_x64``); default: the parameters' dtype.
      block_max_size: fallback leaves up to this many entries get an exact
        block, larger ones a diagonal.

    Returns:
      A :class:`jaxinf.Solver` with ``score`` (layer-wise influence scores).

    Raises:
      ValueError: on a bad option (at once) or, from ``init``, when the
        chosen Fisher needs an output loss the operator does not have.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxinf
      >>> x = jax.random.normal(jax.random.key(0), (8, 3)); y = x @ jnp.ones((3, 1))
      >>> params = {"w": jnp.zeros((3, 1)), "b": jnp.zeros(1)}
      >>> model = lambda p, b: b[0] @ p["w"] + p["b"]
      >>> mse = lambda out, b: 0.5 * jnp.mean(jnp.sum((out - b[1]) ** 2, -1))
      >>> op = jaxinf.curvature_operator(None, params, (x, y), kind="gauss_newton",
      ...                                model_fn=model, output_loss=mse, damping=0.1)
      >>> solver = jaxinf.ekfac(fisher="exact")
      >>> state = solver.init(op)
      >>> [(path, treatment) for path, _, treatment, _ in state.tags.rows()]
      [("['b']", 'dense bias (auto)'), ("['w']", 'dense weight (auto)')]
      >>> sol, info = solver.solve(state, params)
      >>> bool(info.converged)
      True

    References:
      George et al., NeurIPS 2018 (EK-FAC); Martens & Grosse, ICML 2015
      (K-FAC); Grosse & Martens, ICML 2016 (convolutions).
    """
    options = {
        "fisher": fisher,
        "likelihood": likelihood,
        "num_samples": num_samples,
        "model_fn": model_fn,
        "output_loss": output_loss,
        "factor_dtype": factor_dtype,
        "block_max_size": block_max_size,
    }
    check_options(damping_heuristic=damping_heuristic, **options)
    make = PlanCache(update_diagonal=update_diagonal, **options)  # operator -> (plan, loss), one per problem signature

    def init(operator: CurvatureOperator, *, key=None) -> KFACState:
        plan, o_loss = make(operator)
        key = jax.random.key(0) if key is None else key
        chunk = EXAMPLE_CHUNK
        operator = dataclasses.replace(operator, params=frozen(operator.params, _not_differentiable(name)))
        return _jitted_fit(plan, o_loss, operator, key, damping_heuristic, chunk)

    def stream_init(stream, *, key=None) -> KFACState:
        """The same state from a stream: pass 1 (and, for EK-FAC, pass 2) as host loops over its batches."""
        plan, o_loss = make(stream.operator)
        key = jax.random.key(0) if key is None else key
        return fit_stream(plan, o_loss, stream, key, damping_heuristic, EXAMPLE_CHUNK)

    def solve(state: KFACState, v):
        check_matches(v, state.plan.spec, "v")
        return _solve(_frozen_factors(state, name), v)

    def validate(state: KFACState) -> None:
        validate_state(state)

    name = "ekfac" if update_diagonal else "kfac"
    advice = "Increase damping (or damping_heuristic); check the tagging report (print(state.tags))."
    return Solver(
        init=init,
        solve=solve,
        validate=validate,
        name=name,
        advice=advice,
        scorer=Scorer(prepare=prepare_scores, finish=finish_scores),
        stream_init=stream_init,
    )


@records_config
def kfac(**kwargs) -> Solver:
    """K-FAC: :func:`ekfac` without the eigenvalue correction (``Λ = λ_A λ_Gᵀ``).

    Takes the same keyword options as :func:`ekfac` (except
    ``update_diagonal``).

    Examples:
      >>> import jaxinf
      >>> jaxinf.kfac(fisher="exact").name
      'kfac'
    """
    if "update_diagonal" in kwargs:
        raise ValueError("kfac() has no update_diagonal option; use ekfac(update_diagonal=...) instead.")
    return ekfac(update_diagonal=False, **kwargs)


# ----------------------------------------------------------------------------
# Solving
# ----------------------------------------------------------------------------


def _inverse(values, damping):
    denom = values + damping
    safe = jnp.where(denom > 0, denom, 1.0)
    return jnp.where(denom > 0, 1.0 / safe, 0.0)


def _apply(state: KFACState, v: PyTree, power: int, damped: bool = True) -> PyTree:
    """``(K + λ)^power v`` with ``K`` the fitted approximation, for ``power`` in ``{1, -1}``."""
    tags = state.tags
    leaves, treedef = jax.tree.flatten(v)
    out = list(leaves)
    dtype = state.plan.factor_dtype
    for i, layer in enumerate(tags.layers):
        lam = state.damping[i] if damped else jnp.zeros_like(state.damping[i])
        lam = lam[..., None, None]  # stacked along a scan: one damping per step
        vm = layer.to_matrix([x.astype(dtype) if x is not None else None for x in leaves])
        qa, qg = state.eigvecs_a[i], state.eigvecs_g[i]  # stacked: (L, ·, ·), the products batched over steps
        rot = vm @ qg if qa is None else jnp.swapaxes(qa, -1, -2) @ vm @ qg  # None: one-hot inputs, Q_A = I
        scale = _inverse(state.eigvals[i], lam) if power < 0 else state.eigvals[i] + lam
        xm = (rot * scale) @ jnp.swapaxes(qg, -1, -2)
        xm = xm if qa is None else qa @ xm
        w, b = layer.from_matrix(xm, tags.shapes[layer.bias] if layer.bias is not None else None)
        out[layer.weight] = w.astype(leaves[layer.weight].dtype)
        if layer.bias is not None:
            out[layer.bias] = b.astype(leaves[layer.bias].dtype)
    for fb, q, vals, lam in zip(tags.fallbacks, state.fallback_vecs, state.fallback_vals, state.fallback_damping):
        lam = lam if damped else jnp.zeros_like(lam)
        x = jnp.ravel(leaves[fb.leaf]).astype(dtype)
        scale = _inverse(vals, lam) if power < 0 else vals + lam
        y = q @ ((q.T @ x) * scale) if q is not None else x * scale
        out[fb.leaf] = jnp.reshape(y, tags.shapes[fb.leaf]).astype(leaves[fb.leaf].dtype)
    return jax.tree.unflatten(treedef, out)


def _not_differentiable(name: str) -> str:
    return (
        f"{name}(): jax is differentiating the K-FAC fit or the Kronecker eigenbases held in its state (they "
        "depend on a variable being differentiated, e.g. the params given to init). K-FAC/EK-FAC solves are not "
        "differentiable in the operator; use jaxinf.implicit_solve with direct() or cg() (gradients through the "
        "curvature products). Gradients with respect to v need no change."
    )


def _frozen_factors(state: KFACState, name: str) -> KFACState:
    """``state``, but differentiating through its eigenbases raises a clear ``TypeError`` (no implicit rule here)."""
    held = (state.eigvecs_a, state.eigvecs_g, state.eigvals, state.fallback_vecs, state.fallback_vals)
    a, g, w, fv, fw = frozen(held, _not_differentiable(name))
    return dataclasses.replace(state, eigvecs_a=a, eigvecs_g=g, eigvals=w, fallback_vecs=fv, fallback_vals=fw)


def _solve(state: KFACState, v):
    x = _apply(state, v, -1)
    back = _apply(state, x, 1)
    residual = jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(v))))
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(x)]))
    return x, make_info(1, residual, finite, ~finite)


def approx_curvature_vp(state: KFACState, v: PyTree, *, damped: bool = False) -> PyTree:
    """``K v`` (or ``(K + λ) v``) with ``K`` the fitted K-FAC / EK-FAC curvature, for checks and diagnostics."""
    check_matches(v, state.plan.spec, "v")
    return _apply(state, v, 1, damped)


# ----------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------


def _one_batch(batch, name: str) -> None:
    if not is_single_batch(batch):
        raise ValueError(
            f"{name} must be one batch, got a {type(batch).__name__} of batches: use influences_by_layer or score "
            "(module functions, which iterate over batches) or InfluenceModel.influences."
        )


def _batch_list(data, name: str) -> list:
    """One batch or a collection of batches as a list of batches (checked: shapes, structure, finite values)."""
    return checked_list(data, name=name)


@jax.jit
def prepare_scores(state: KFACState, operator: CurvatureOperator, test_batch):
    """The test side of :func:`score`: factors ``(K + λ)⁻¹ ∇ℓ(test_i)`` (leading ``n_test``), once per test batch."""
    _one_batch(test_batch, "test_batch")
    test_grads = per_example_grads(state.plan.loss_fn, operator.params, test_batch)
    return jax.vmap(_solve, in_axes=(None, 0))(state, test_grads)[0]


def _by_layer(state: KFACState, operator: CurvatureOperator, factors, train_batch) -> dict:
    plan = state.plan
    return contract_by_layer(plan.score, operator.params, factors, train_batch, dtype=plan.factor_dtype)


@jax.jit
def finish_scores(state: KFACState, operator: CurvatureOperator, factors, train_batch):
    """``(n_test, n_train)`` scores of a training batch against factors from :func:`prepare_scores`."""
    _one_batch(train_batch, "train_batch")
    return sum(_by_layer(state, operator, factors, train_batch).values()).astype(state.plan.spec.dtype)


_by_layer_jit = jax.jit(_by_layer)


def influences_by_layer(state: KFACState, operator: CurvatureOperator, test_data, train_data) -> dict:
    """Influence scores split by layer: ``{name: (n_test, n_train)}``, summing to :func:`score`.

    Keys are the layer names of ``state.tags`` and the paths of fallback
    leaves. Each term is ``Σ_l ⟨(K + λ)⁻¹ ∇ℓ(test_i), ∇ℓ(train_j)⟩`` restricted
    to that layer's parameters, contracted by :func:`jaxinf.scoring.layerwise.contract_by_layer`
    (per-example training gradients are formed only for layers where that is
    cheaper than contracting layer inputs and output gradients directly).

    Args:
      state, operator: the fitted state and the operator it was fitted on.
      test_data, train_data: one batch or a list (iterable) of batches each;
        every batch is scored (one jitted call per test and training batch
        pair), rows in test order, columns in training order.

    Raises:
      ValueError: empty data, batches of different structure or per-example
        shapes, NaN or inf (the message names the batch).
    """
    trains = _batch_list(train_data, "train_data")
    rows = []
    for test_batch in _batch_list(test_data, "test_data"):
        factors = prepare_scores(state, operator, test_batch)
        columns = [_by_layer_jit(state, operator, factors, batch) for batch in trains]
        rows.append({name: jnp.concatenate([c[name] for c in columns], axis=1) for name in columns[0]})
    return {name: jnp.concatenate([r[name] for r in rows], axis=0) for name in rows[0]}


def score(state: KFACState, operator: CurvatureOperator, test_data, train_data):
    """``I[i, j] = ∇ℓ(test_i)ᵀ (K + λ)⁻¹ ∇ℓ(train_j)``, shape ``(n_test, n_train)``, contracted layer by layer.

    ``test_data`` and ``train_data`` are one batch or a list (iterable) of
    batches each; every pair is scored as in :func:`influences_by_layer`.
    """
    trains = _batch_list(train_data, "train_data")
    rows = []
    for test_batch in _batch_list(test_data, "test_data"):
        factors = prepare_scores(state, operator, test_batch)
        rows.append(jnp.concatenate([finish_scores(state, operator, factors, b) for b in trains], axis=1))
    return jnp.concatenate(rows, axis=0)


__all__ = [
    "FISHER_MODES",
    "KFACPlan",
    "KFACState",
    "approx_curvature_vp",
    "ekfac",
    "example_statistics",
    "finish_scores",
    "influences_by_layer",
    "kfac",
    "prepare_scores",
    "score",
]
