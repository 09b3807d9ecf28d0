"""Low-rank inverse curvature: shared state, solve, validation and projected scoring.

The low-rank solvers (:func:`jaxinf.arnoldi`, :func:`jaxinf.nystrom`) both
end with an orthonormal basis ``V`` (``p × r``) and eigenvalue estimates
``D`` (``r``) with ``C ≈ V diag(D) Vᵀ``, and then solve

    ``x = V (D + λ)⁻¹ Vᵀ b  [+ (1/λ)(I − V Vᵀ) b]``

where the bracketed *completion* is the exact inverse of the damped low-rank
model ``V D Vᵀ + λI`` (Sherman–Morrison–Woodbury) and needs ``λ > 0``;
without it the solve only acts on the span of ``V`` (Schioppa et al. 2022).

Scoring (:func:`score`) never forms per-example gradients for the projected
part: one forward-mode product of the per-example losses along a basis vector
``v_k`` gives ``g_i · v_k`` for every example ``i`` of a batch, so ``r``
JVPs project a whole batch, ``P = G V`` (``n × r``), with memory of ``r``
(or ``projection_batch``) forward passes, independent of ``n × p``. Then

    ``I = P_test (D + λ)⁻¹ P_trainᵀ  [+ (1/λ) g_testᵀ (I − V Vᵀ) g_train]``.

The completion term needs real gradients on one side: per-example
gradients of the *smaller* batch (memory ``n_small × p``), projected off the
basis, then one JVP of the other batch's losses per residual. It costs
``n_small`` backward passes plus ``n_small`` JVPs over the other batch, so
it is optional.

Derivatives. The solve and the scores are linear in ``v`` (in the gradients)
and in ``(D + λ)⁻¹`` and ``1/λ``, so gradients with respect to ``v`` and to
the state's damping are exact derivatives of what is computed. The basis and
eigenvalues are never differentiated (the derivative of a Ritz or Nyström
eigendecomposition is unreliable where eigenvalues repeat): they raise
``TypeError`` when they depend on a differentiated variable. Gradients with
respect to the parameters ``θ`` and the data go through
:func:`jaxinf.implicit_solve`, which treats the state's map ``S`` (``x = S v``)
as the inverse of the operator ``A(θ)``: ``v̄ = S x̄`` and
``θ̄ = −∂_θ⟨S x̄, A(θ) (S v)⟩``, the implicit derivative of ``A(θ)⁻¹ v`` with
``A⁻¹`` replaced by ``S``. It is exact when ``S = A⁻¹`` (full rank, or the
completion with a basis spanning the range of ``C``); otherwise it is the
approximation consistent with the solve, not the derivative of the truncated
factorisation.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.curvature import CurvatureOperator, per_example_grads, per_example_losses
from jaxinf.core.tree import TreeSpec, check_matches, is_tracer, ravel, ravel_batched, unravel
from jaxinf.solvers.autodiff import factorisation_message, frozen
from jaxinf.solvers.base import Scorer, make_info

PyTree = Any

__all__ = [
    "LowRankState",
    "bind",
    "finish_scores",
    "lowrank_solve",
    "lowrank_validate",
    "prepare_scores",
    "project",
    "scorer",
    "scoring_loss_fn",
    "with_damping",
]


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class LowRankState:
    """``C ≈ basis @ diag(eigvals) @ basis.T`` plus damping and diagnostics.

    Attributes:
      basis: ``(p, r)`` orthonormal columns ``V`` (raveled parameter order).
      eigvals: ``(r,)`` the eigenvalues ``D`` the solve uses (after the
        solver's treatment of negative values).
      raw_eigvals: ``(r,)`` the eigenvalue estimates before that treatment.
      damping: scalar ``λ``.
      extras: dict of method-specific diagnostic arrays (e.g. Ritz residuals).
      spec: (static) layout of the parameter tree.
      completion: (static) add ``(1/λ)(I − VVᵀ)b`` in the solve and scores.
      method: (static) the solver's name, for messages.
      negative: (static) how negative eigenvalues are treated
        (``"keep"``, ``"clip"``, ``"abs"``).
      products: (static) curvature-vector products spent by ``init``.
    """

    basis: jax.Array
    eigvals: jax.Array
    raw_eigvals: jax.Array
    damping: jax.Array
    extras: dict
    spec: TreeSpec
    completion: bool
    method: str
    negative: str
    products: int

    def tree_flatten(self):
        children = (self.basis, self.eigvals, self.raw_eigvals, self.damping, self.extras)
        return children, (self.spec, self.completion, self.method, self.negative, self.products)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def rank(self) -> int:
        return self.basis.shape[-1]


def with_damping(state: LowRankState, damping: Any) -> LowRankState:
    """The same low-rank factorisation with a new scalar damping (no new products)."""
    return dataclasses.replace(state, damping=jnp.asarray(damping, state.eigvals.dtype))


def _shifted(state: LowRankState):
    """``D + λ``, a mask of the entries that may be inverted, and a singular flag."""
    shifted = state.eigvals + state.damping.astype(state.eigvals.dtype)
    top = jnp.max(jnp.abs(shifted))
    tol = shifted.size * jnp.finfo(shifted.dtype).eps * top
    invertible = jnp.abs(shifted) > tol
    # A zero matrix (top == 0) is singular too.
    return shifted, invertible, ~jnp.all(invertible) | (top == 0)


def _bad_damping(state: LowRankState):
    """Completion needs ``λ > 0``."""
    if not state.completion:
        return jnp.asarray(False)
    return ~(state.damping > 0)


def _inverse_diag(state: LowRankState):
    shifted, invertible, _ = _shifted(state)
    return jnp.where(invertible, 1.0 / jnp.where(invertible, shifted, 1.0), 0.0)


def _frozen(state: LowRankState) -> LowRankState:
    """``state`` whose basis and eigenvalues refuse differentiation (:func:`jaxinf.solvers.autodiff.frozen`)."""
    basis, eigvals = frozen((state.basis, state.eigvals), factorisation_message(f"{state.method}()"))
    return dataclasses.replace(state, basis=basis, eigvals=eigvals)


def bind(state: LowRankState, operator: CurvatureOperator) -> LowRankState:
    """``state`` with the damping of ``operator``, after checking it was fitted for that parameter layout."""
    if state.spec != operator.spec or operator.num_blocks != 1:
        raise ValueError(
            f"The {state.method}() state was fitted for another parameter layout than the operator (or the "
            "operator is block-diagonal); fit it with solver.init(operator), or pass state=None."
        )
    return with_damping(state, operator.damping[0])


def lowrank_solve(state: LowRankState, v: PyTree):
    """``x = V (D + λ)⁻¹ Vᵀ v [+ (1/λ)(I − VVᵀ) v]`` for one right-hand side.

    Directions with ``|D + λ|`` at rounding level are not inverted (they get
    0); that, a non-positive ``λ`` with the completion, or a non-finite result
    sets ``info.converged = False``. ``info.residual_norm`` is
    ``‖(I − VVᵀ) v‖``: the part of ``v`` outside the basis, which the solve
    either drops or treats as having zero curvature (completion).

    Differentiable with respect to ``v`` and the state's damping (exactly:
    the solve is linear in ``v`` and in ``(D + λ)⁻¹``, ``1/λ``); the basis
    and eigenvalues raise ``TypeError`` when differentiated (see the module
    docstring and :func:`jaxinf.implicit_solve`).
    """
    check_matches(v, state.spec, "v")
    state = _frozen(state)
    dtype = state.basis.dtype
    b = ravel(v, dtype)
    coeff = state.basis.T @ b
    x = state.basis @ (coeff * _inverse_diag(state))
    outside = b - state.basis @ coeff
    if state.completion:
        lam = state.damping.astype(dtype)
        x = x + jnp.where(lam > 0, outside / jnp.where(lam > 0, lam, 1.0), 0.0)
    finite = jnp.all(jnp.isfinite(x))
    _, _, singular = _shifted(state)
    ok = finite & ~singular & ~_bad_damping(state)
    return unravel(state.spec, x), make_info(1, jnp.linalg.norm(outside), ok, ~finite)


def lowrank_validate(state: LowRankState, *, indefinite_note: str = "") -> None:
    """Host-side checks shared by the low-rank solvers.

    Raises:
      ValueError: non-finite basis or eigenvalues; completion with ``λ <= 0``;
        ``D + λ`` singular (some ``|D_k + λ|`` at rounding level).

    Warns:
      UserWarning: negative eigenvalue estimates (with the treatment used),
        and ``D + λ < 0`` (influence signs flip along those directions).
    """
    name = state.method
    eig = np.asarray(state.eigvals, np.float64)
    raw = np.asarray(state.raw_eigvals, np.float64)
    basis = np.asarray(state.basis)
    lam = float(state.damping)
    if not (np.all(np.isfinite(eig)) and np.all(np.isfinite(basis))):
        raise ValueError(
            f"{name}: the low-rank factorisation holds NaN or inf. Check that the loss and its curvature "
            "are finite at these parameters."
        )
    if state.completion and not lam > 0:
        raise ValueError(
            f"{name}: the Woodbury completion (1/λ)(I − VVᵀ)b needs damping > 0, got damping={lam:.3g}. "
            f"Set damping > 0 (e.g. {max(1e-3 * float(np.max(np.abs(eig), initial=0.0)), 1e-8):.3g})"
            + (" or pass completion=False." if name == "arnoldi" else ".")
        )
    shifted = eig + lam
    top = float(np.max(np.abs(shifted), initial=0.0))
    eps = np.finfo(np.asarray(state.eigvals).dtype).eps
    tol = eig.size * eps * top
    if top == 0 or np.min(np.abs(shifted)) <= tol:
        count = int(np.sum(np.abs(shifted) <= tol)) if top > 0 else eig.size
        raise ValueError(
            f"{name}: D + λ is singular: {count} of {eig.size} retained eigenvalues satisfy |D_k + λ| <= "
            f"{tol:.3g} (damping={lam:.3g}, largest |D + λ| {top:.3g}). Set damping > 0 "
            f"(e.g. {max(1e-3 * top, 1e-8):.3g}) or lower the rank."
        )
    raw_top = float(np.max(np.abs(raw), initial=0.0))
    negative = raw < -np.sqrt(eps) * raw_top
    if negative.any():
        treatment = {
            "keep": "kept as they are",
            "clip": "clipped to 0 (so they get (0 + λ)⁻¹)",
            "abs": "replaced by their absolute values",
        }[state.negative]
        warnings.warn(
            f"{name}: {int(negative.sum())} of {raw.size} retained eigenvalue estimates are negative (most "
            f"negative {raw.min():.3g}, largest |D| {raw_top:.3g}); the curvature is indefinite. They were "
            f"{treatment}.{indefinite_note}",
            UserWarning,
            stacklevel=3,
        )
    if np.any(shifted < 0):
        warnings.warn(
            f"{name}: D + λ < 0 along {int(np.sum(shifted < 0))} direction(s) (most negative {shifted.min():.3g}); "
            "influence flips sign there. Use negative='clip' or 'abs', a PSD curvature "
            "(curvature='gauss_newton'), or damping > "
            f"{-float(eig.min()):.3g}.",
            UserWarning,
            stacklevel=3,
        )


# ----------------------------------------------------------------------------
# Projected scoring
# ----------------------------------------------------------------------------


def scoring_loss_fn(operator: CurvatureOperator) -> Callable:
    """The per-batch mean loss of ``operator`` (built from ``model_fn``/``output_loss`` if needed)."""
    if operator.loss_fn is not None:
        return operator.loss_fn
    model_fn, output_loss = operator.model_fn, operator.output_loss

    def loss_fn(params, batch):
        return output_loss(model_fn(params, batch), batch)

    return loss_fn


def _map(fn, xs, batch: int | None):
    if batch is None or batch >= xs.shape[0]:
        return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs, batch_size=batch)


def project(state: LowRankState, operator: CurvatureOperator, batch: PyTree, *, projection_batch: int | None = None):
    """``P[i, k] = ∇θℓ(z_i) · v_k`` for every example of ``batch``: shape ``(n, r)``.

    One JVP of the per-example losses per basis vector; ``projection_batch``
    basis vectors are pushed forward at once (``None``: all ``r``).
    """
    loss_fn = scoring_loss_fn(operator)
    params = operator.params
    spec = state.spec
    state = _frozen(state)

    def along(v):
        return jax.jvp(lambda p: per_example_losses(loss_fn, p, batch), (params,), (unravel(spec, v),))[1]

    return _map(along, state.basis.T, projection_batch).T


def prepare_scores(
    state: LowRankState, operator: CurvatureOperator, test_batch: PyTree, *, projection_batch: int | None = None
) -> dict:
    """The test side of :func:`score`, computed once and reused for every training batch.

    Returns ``{"projected": P_test (n_test, r), "residuals": (I − VVᵀ) g_test (n_test, p) or None}``;
    the residuals (per-example test gradients projected off the basis) only with ``completion``.
    """
    projected = project(state, operator, test_batch, projection_batch=projection_batch)
    residuals = None
    if state.completion:
        loss_fn = scoring_loss_fn(operator)
        grads = per_example_grads(loss_fn, operator.params, test_batch)
        residuals = ravel_batched(grads, state.basis.dtype) - projected @ state.basis.T
    return {"projected": projected, "residuals": residuals}


def finish_scores(
    state: LowRankState,
    operator: CurvatureOperator,
    prepared: dict,
    train_batch: PyTree,
    *,
    projection_batch: int | None = None,
):
    """``(n_test, n_train)`` scores of a training batch against a test side from :func:`prepare_scores`.

    ``r`` JVPs project the training batch; with ``completion``, one JVP of
    its per-example losses along each test residual adds
    ``(1/λ) g_testᵀ (I − VVᵀ) g_train``.
    """
    p_train = project(state, operator, train_batch, projection_batch=projection_batch)
    scores = (prepared["projected"] * _inverse_diag(_frozen(state))) @ p_train.T
    if state.completion:
        loss_fn = scoring_loss_fn(operator)
        params = operator.params
        lam = state.damping.astype(scores.dtype)
        inv_lam = jnp.where(lam > 0, 1.0 / jnp.where(lam > 0, lam, 1.0), jnp.nan)

        def along(r):
            return jax.jvp(lambda p: per_example_losses(loss_fn, p, train_batch), (params,), (unravel(state.spec, r),))[
                1
            ]

        extra = _map(along, prepared["residuals"], 1 if projection_batch is None else projection_batch)
        scores = scores + inv_lam * extra
    return scores


def scorer(projection_batch: int | None) -> Scorer:
    """The :class:`jaxinf.solvers.base.Scorer` of a low-rank solver: projections (and the completion) by JVPs.

    Its one-shot ``score`` is ``I = P_test (D + λ)⁻¹ P_trainᵀ`` with ``P = G V``
    formed by JVPs (:func:`project`), plus ``(1/λ) g_testᵀ (I − VVᵀ) g_train``
    when the state has ``completion=True`` (per-example gradients of the
    smaller batch). Equals ``∇θℓ(test)ᵀ x(∇θℓ(train))`` with ``x`` the state's
    solve. Cost: ``r`` JVPs over each batch, plus, with the completion,
    ``n_small`` per-example gradients and ``n_small`` JVPs over the other batch.
    """
    kw = {"projection_batch": projection_batch}
    return Scorer(prepare=functools.partial(prepare_scores, **kw), finish=functools.partial(finish_scores, **kw))


def check_concrete_positive(damping, name: str, what: str) -> None:
    """``ValueError`` at init when a concrete ``damping`` is not ``> 0``."""
    if not is_tracer(damping) and not float(damping) > 0:
        raise ValueError(f"{name} needs damping > 0 ({what}), got damping={float(damping):.3g}. Set damping > 0.")


def positive_int(value, name: str) -> int:
    """``int(value)`` if it is an integer ``>= 1``, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")
    return value


def check_operator(operator: CurvatureOperator, name: str, rank: int) -> int:
    """Structural checks shared by the low-rank factories' ``init``; returns ``p``."""
    p = operator.size
    if operator.num_blocks > 1:
        raise ValueError(
            f"{name}() does not support block-diagonal curvature yet (the operator has {operator.num_blocks} "
            "blocks). Use blocks=None, or a solver with block support (direct, cg)."
        )
    if rank > p:
        raise ValueError(f"rank ({rank}) exceeds the number of parameters ({p}); use rank <= {p}.")
    return p
