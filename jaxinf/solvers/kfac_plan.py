"""K-FAC and EK-FAC: the checked options, the static plan of a fit and the fitted state.

:func:`check_options` rejects a bad option of :func:`jaxinf.solvers.kfac.ekfac`
at once; :func:`make_plan` resolves the ``fisher`` mode for an operator and
traces its layers into a :class:`KFACPlan`; :class:`KFACState` holds what the
fitting passes (:mod:`jaxinf.solvers.kfac_fit`) produce: the Kronecker
factors and eigenbases of K-FAC (Martens & Grosse 2015) and the eigenvalues,
corrected in that eigenbasis for EK-FAC (George et al. 2018). The solve and
the scores are in :mod:`jaxinf.solvers.kfac`, which re-exports these names.

References:
  Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature", ICML 2015. George, Laurent, Bouthillier, Ballas &
  Vincent, "Fast Approximate Natural Gradient Descent in a Kronecker-factored
  Eigenbasis", NeurIPS 2018.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.curvature import CurvatureOperator
from jaxinf.core.precision import check_accumulate_dtype
from jaxinf.core.tree import TreeSpec
from jaxinf.layers import LayerTags, Tracer, trace_layers

FISHER_MODES = ("auto", "sampled", "exact", "empirical")
LIKELIHOODS = (None, "categorical", "gaussian")
MAX_EXACT_OUTPUTS = 4096


# ----------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class KFACPlan:
    """Static part of a K-FAC state: the traced layers and the configuration."""

    fit: Tracer  # the function whose output gradients build the factors
    score: Tracer  # the loss, for training-side scores
    loss_fn: Callable
    fisher: str
    likelihood: str | None
    num_samples: int
    update_diagonal: bool
    spec: TreeSpec
    factor_dtype: Any
    kind: str  # operator curvature kind, for the report

    @property
    def tags(self) -> LayerTags:
        return self.fit.tags


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class KFACState:
    """Fitted Kronecker factors, eigenbases and eigenvalues, per tagged layer.

    Per layer ``l`` (in ``plan.tags.layers`` order): ``factors_a[l]`` ``A``
    ``(d_in+1, d_in+1)``, ``factors_g[l]`` ``G`` ``(d_out, d_out)``, their
    eigenvectors ``eigvecs_a[l]``, ``eigvecs_g[l]``, the eigenvalues
    ``eigvals[l]`` ``(d_in+1, d_out)`` used by the solve (EK-FAC corrected or
    ``λ_A λ_Gᵀ``) and the effective damping ``damping[l]``. A layer stacked
    along a ``lax.scan`` over ``L`` steps (``layer.steps = L``) has one set per
    step: every one of these with a leading axis of ``L`` (damping ``(L,)``).
    A layer with one-hot inputs (an embedding, ``layer.one_hot_inputs``) keeps
    its diagonal ``A`` as the vector of id counts ``(V,)`` and
    ``eigvecs_a[l] = None`` (the identity): no ``V × V`` array. Per fallback leaf
    (``plan.tags.fallbacks`` order): eigenvectors (``None`` for a diagonal),
    eigenvalues and damping. ``plan`` (static) holds the traced layers;
    ``print(state.plan.tags)`` shows the report.
    """

    factors_a: tuple
    factors_g: tuple
    eigvecs_a: tuple
    eigvecs_g: tuple
    eigvals: tuple
    damping: tuple
    fallback_vecs: tuple
    fallback_vals: tuple
    fallback_damping: tuple
    plan: KFACPlan

    def tree_flatten(self):
        children = (
            self.factors_a,
            self.factors_g,
            self.eigvecs_a,
            self.eigvecs_g,
            self.eigvals,
            self.damping,
            self.fallback_vecs,
            self.fallback_vals,
            self.fallback_damping,
        )
        return children, (self.plan,)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def tags(self) -> LayerTags:
        return self.plan.tags


# ----------------------------------------------------------------------------
# Options and plan
# ----------------------------------------------------------------------------


def check_options(
    *,
    fisher: str,
    likelihood: str | None,
    num_samples: int,
    model_fn: Callable | None,
    output_loss: Callable | None,
    damping_heuristic: float | None,
    factor_dtype: Any,
    block_max_size: int,
) -> None:
    """Raise ``ValueError`` on a bad option of :func:`jaxinf.solvers.kfac.ekfac` (before any operator is seen)."""
    if fisher not in FISHER_MODES:
        raise ValueError(f"Unknown fisher={fisher!r}; choose one of {FISHER_MODES}.")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"Unknown likelihood={likelihood!r}; choose None, 'categorical' or 'gaussian'.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
    if damping_heuristic is not None and not (np.isfinite(damping_heuristic) and damping_heuristic >= 0):
        raise ValueError(f"damping_heuristic must be >= 0 or None, got {damping_heuristic!r}.")
    if block_max_size < 0:
        raise ValueError(f"block_max_size must be >= 0, got {block_max_size}.")
    if factor_dtype is not None and factor_dtype not in (jnp.float64, "float64"):  # float64 checked in make_plan
        check_accumulate_dtype(factor_dtype, "factor_dtype")  # float32/float64 only: no half-precision eigh
    if (model_fn is None) != (output_loss is None) and likelihood is None:
        raise ValueError("Give both model_fn and output_loss (or model_fn with a likelihood), not one of them.")


_HOW_TO_SAMPLE = (
    "build the operator with curvature='gauss_newton' (model_fn, output_loss), or pass "
    "ekfac(model_fn=..., output_loss=...) or ekfac(model_fn=..., likelihood='categorical'|'gaussian')"
)
_WARNED_EMPIRICAL = weakref.WeakSet()  # the loss functions warned about (once each)
#: Outputs per example above which the generic output-loss Hessian (m × m, an eigh per example) warns.
LARGE_OUTPUT = 2048
_WARNED_OUTPUT: set = set()


def warn_dense_output_hessian(m: int) -> None:
    """Warn once per size when the Fisher of a generic output loss forms an ``m × m`` Hessian for every example."""
    if m > LARGE_OUTPUT and m not in _WARNED_OUTPUT:
        _WARNED_OUTPUT.add(m)
        warnings.warn(
            f"ekfac()/kfac() forms the {m} x {m} Hessian of the output loss and its eigendecomposition for every "
            "example (a generic output_loss: O(m^3) per example, e.g. a sequence of T positions over V classes has "
            "m = T*V). For a softmax cross-entropy pass likelihood='categorical' (closed form, no Hessian); for a "
            "squared error likelihood='gaussian'; or fisher='empirical'.",
            UserWarning,
            stacklevel=2,
        )


def _resolve_fisher(operator: CurvatureOperator, fisher: str, likelihood, num_samples: int, m_fn, o_loss) -> str:
    """The Fisher mode ``fisher`` stands for with this operator; raise on an option that cannot take effect.

    ``"auto"`` falls back to the empirical Fisher when the model outputs are
    unknown (a loss-only operator of kind ``"hessian"``): that warns once per
    loss function, naming the fix. A ``likelihood`` without the model outputs,
    or ``num_samples`` without sampling, raises.
    """
    knows_output = m_fn is not None and (o_loss is not None or likelihood is not None)
    if likelihood is not None and m_fn is None:
        raise ValueError(
            f"ekfac(likelihood={likelihood!r}) draws labels from the model outputs, which a loss-only operator does "
            "not give: pass ekfac(model_fn=..., likelihood=...) (model_fn(params, batch) -> outputs) or build the "
            "operator with curvature='gauss_newton' (model_fn, output_loss); or drop likelihood to use the empirical "
            "Fisher."
        )
    mode = fisher
    if mode == "auto":
        mode = "empirical" if operator.kind == "fisher" or not knows_output else "sampled"
        if mode == "empirical" and operator.kind != "fisher" and operator.loss_fn not in _WARNED_EMPIRICAL:
            _WARNED_EMPIRICAL.add(operator.loss_fn)
            warnings.warn(
                "ekfac()/kfac() with only a loss_fn fits its factors to the empirical Fisher (gradients at the "
                "data's own labels), a cruder curvature than the true Fisher / Gauss-Newton. For the true one, "
                f"{_HOW_TO_SAMPLE}. Pass fisher='empirical' to choose the empirical Fisher without this warning.",
                UserWarning,
                stacklevel=4,
            )
    if mode in ("sampled", "exact") and not knows_output:
        raise ValueError(
            f"ekfac(fisher={mode!r}) needs the model outputs and the output loss: {_HOW_TO_SAMPLE}; "
            "or use fisher='empirical'."
        )
    if likelihood is not None and mode == "empirical":
        raise ValueError(
            f"ekfac(likelihood={likelihood!r}) has no effect with the empirical Fisher (fisher={fisher!r} with a "
            f"{operator.kind!r} operator): use fisher='sampled' or 'exact', or drop likelihood."
        )
    if num_samples != 1 and mode != "sampled":
        raise ValueError(
            f"ekfac(num_samples={num_samples}) sets the draws of fisher='sampled', but this fit uses fisher={mode!r} "
            "(no draws): drop num_samples, or pass fisher='sampled'."
        )
    return mode


def make_plan(
    operator: CurvatureOperator,
    *,
    update_diagonal: bool,
    fisher: str,
    likelihood: str | None,
    num_samples: int,
    model_fn: Callable | None,
    output_loss: Callable | None,
    factor_dtype: Any,
    block_max_size: int,
) -> tuple[KFACPlan, Callable | None]:
    """The plan for ``operator`` (``fisher`` resolved, layers traced) and the output loss the fit uses.

    The options are those of :func:`jaxinf.solvers.kfac.ekfac`, already
    checked by :func:`check_options`; ``model_fn`` and ``output_loss``
    default to the operator's.

    Raises:
      ValueError: when the Fisher chosen needs an output loss the operator
        does not have, when ``factor_dtype`` is float64 without 64-bit JAX,
        or when the model has too many outputs to form the output-loss
        Hessian.
    """
    m_fn = model_fn or operator.model_fn
    o_loss = output_loss or operator.output_loss
    mode = _resolve_fisher(operator, fisher, likelihood, num_samples, m_fn, o_loss)
    loss_fn = operator.loss_fn
    if loss_fn is None:
        mf, ol = operator.model_fn, operator.output_loss

        def loss_fn(p, batch):
            return ol(mf(p, batch), batch)

    dtype = jnp.dtype(factor_dtype) if factor_dtype is not None else jnp.dtype(operator.dtype)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("factor_dtype=float64 needs 64-bit JAX: call jax.config.update('jax_enable_x64', True) first.")
    example = next(operator.data.batches())
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), operator.params)
    fit_fn = loss_fn if mode == "empirical" else m_fn
    fit = trace_layers(fit_fn, shapes, example, block_max_size=block_max_size)
    if mode == "empirical":
        score = fit
    else:
        score = trace_layers(loss_fn, shapes, example, block_max_size=block_max_size, restrict_to=fit.tags)
    if mode != "empirical":
        out_size = sum(math.prod(a.shape) for a in fit.out_avals)
        if out_size > MAX_EXACT_OUTPUTS and (mode == "exact" or likelihood is None):
            raise ValueError(
                f"The model has {out_size} outputs per example; forming the output-loss Hessian is too costly. "
                "Use fisher='sampled' with likelihood='categorical' or 'gaussian', or fisher='empirical'."
            )
    plan = KFACPlan(
        fit,
        score,
        loss_fn,
        mode,
        likelihood,
        int(num_samples),
        update_diagonal,
        operator.spec,
        dtype,
        operator.kind,
    )
    return plan, o_loss


def _abstract(tree) -> tuple:
    """``(treedef, ((shape, dtype), ...))`` of a pytree: what a traced plan depends on, not the values."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves)


class PlanCache:
    """One plan per problem signature, for one solver configuration.

    :func:`make_plan` traces the layers anew on every call, and a plan is a
    static argument of the fit's jitted programs (compared by identity): a
    new plan for the same problem compiles every program again. This cache
    returns the same plan for an operator with the same curvature kind, loss
    functions, parameter and batch shapes and dtypes (the values do not
    enter a plan), holding the last ``size`` of them.
    """

    def __init__(self, *, size: int = 8, **options):
        self.make = functools.partial(make_plan, **options)  # the options of make_plan, checked by check_options
        self.size, self.entries = size, {}

    def __call__(self, operator: CurvatureOperator) -> tuple:
        example = next(operator.data.batches())
        key = (operator.kind, operator.loss_fn, operator.model_fn, operator.output_loss, str(operator.dtype))
        key += (_abstract(operator.params), _abstract(example), bool(jax.config.jax_enable_x64))
        try:
            hit = self.entries.get(key)
        except TypeError:  # an unhashable loss function: no sharing, a plan per call
            return self.make(operator)
        if hit is None:
            hit = self.entries[key] = self.make(operator)
            if len(self.entries) > self.size:
                self.entries.pop(next(iter(self.entries)))
        check_blocks(hit[0], operator)
        return hit


def check_blocks(plan: KFACPlan, operator: CurvatureOperator) -> None:
    """``ValueError`` when the operator's blocks split a layer: K-FAC's blocks are its layers (weight and bias
    together), so a finer structure (``blocks="parameter"``) could not take effect. A coarser one (``None``, a
    grouping of whole layers) is what K-FAC approximates block by block."""
    for layer in plan.tags.layers:
        leaves = [layer.weight] + ([] if layer.bias is None else [layer.bias])
        names = sorted({operator.block_names[operator.block_ids[i]] for i in leaves})
        if len(names) > 1:
            raise ValueError(
                f"K-FAC/EK-FAC keep one Kronecker-factored block per layer, but the curvature's blocks split layer "
                f"{layer.name} (its weight and bias are in blocks {names}), which they cannot honour. Use "
                "blocks=None or blocks='layer' (or any grouping of whole layers), or direct()/cg() for finer blocks."
            )


def validate_state(state: KFACState) -> None:
    """``ValueError`` if a layer's or fallback block's fitted eigenvalues hold NaN/inf, or are singular at damping 0."""
    tags = state.tags
    items = []
    for layer, ev, lam in zip(tags.layers, state.eigvals, state.damping):
        if layer.steps:  # stacked along a scan: one layer (and one damping) per step
            ev, lam = np.asarray(ev), np.asarray(lam)
            items += [(f"{layer.name} (scan step {step})", ev[step], lam[step]) for step in range(layer.steps)]
        else:
            items.append((layer.name, ev, lam))
    items += [
        (tags.paths[fb.leaf], vals, lam)
        for fb, vals, lam in zip(tags.fallbacks, state.fallback_vals, state.fallback_damping)
    ]
    for name, ev, lam in items:
        ev = np.asarray(ev, np.float64)
        lam = float(lam)
        if not np.all(np.isfinite(ev)) or not np.isfinite(lam):
            raise ValueError(
                f"The K-FAC factors of {name} contain NaN or inf: check the data, the parameters and the loss."
            )
        top = float(np.max(ev)) if ev.size else 0.0
        if top == 0.0 and lam == 0.0:
            continue  # unused parameter: zero gradient, solved as zero
        if lam == 0.0 and float(np.min(ev)) <= ev.size * np.finfo(np.float64).eps * top:
            raise ValueError(
                f"The (E)K-FAC curvature of {name} is singular (smallest eigenvalue {float(np.min(ev)):.3g}, largest "
                f"{top:.3g}) and its damping is 0. Set damping > 0 (e.g. {max(1e-3 * top, 1e-8):.3g}) or leave "
                "damping_heuristic on."
            )


__all__ = [
    "FISHER_MODES",
    "LIKELIHOODS",
    "MAX_EXACT_OUTPUTS",
    "KFACPlan",
    "KFACState",
    "PlanCache",
    "check_options",
    "make_plan",
    "validate_state",
]
