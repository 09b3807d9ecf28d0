"""Nyström sketch-and-solve: a randomized low-rank PSD model of the curvature, inverted exactly.

The curvature is replaced by its randomized Nyström approximation

    ``C_nys = (CΩ)(ΩᵀCΩ)⁺(CΩ)ᵀ = U diag(Λ) Uᵀ``,

computed stably with a small shift (Frangella, Tropp & Udell 2023,
RandNysAppx; :func:`jaxinf.core.sketch.randomized_nystrom`) from ``rank``
curvature-vector products with a Gaussian test matrix ``Ω``, and the damped
model is inverted with the Sherman–Morrison–Woodbury formula:

    ``x = (C_nys + λI)⁻¹ v = U (Λ + λ)⁻¹ Uᵀ v + (1/λ)(I − U Uᵀ) v``.

``λ > 0`` is required (the second term is ``1/λ``): with a concrete damping
``init`` raises for ``λ = 0``; with a traced one the solve reports
``converged = False``. The curvature must be PSD (Gauss-Newton, empirical
Fisher, or a Hessian at a minimum): ``validate`` warns when the sketch sees
negative curvature (the approximation then only holds its positive part).

Exact when ``rank ≥ rank(C)``: e.g. an empirical Fisher of ``n`` examples
(rank ``≤ n``) or a Gauss-Newton of ``n`` examples with ``k`` outputs
(rank ``≤ n·k``). For a decaying spectrum the error falls fast with ``rank``.

Cost: ``rank`` curvature-vector products (vmapped, or ``sketch_batch`` at a
time) and ``O(p r²)`` dense work to fit; memory ``O(p r)``; per solve
``O(p r)``. Scores come by projection (:func:`jaxinf.solvers.lowrank.scorer`).

Derivatives: ``solve`` differentiates exactly with respect to ``v`` and the
state's damping; with respect to the parameters and data use
:func:`jaxinf.implicit_solve` (exact when ``rank ≥ rank(C)``; the sketch itself
is never differentiated, see :mod:`jaxinf.solvers.lowrank`).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from jaxinf.core.curvature import CurvatureOperator
from jaxinf.core.sketch import NystromApproximation, nystrom_from_sketch, nystrom_of_operator, sketch_test_matrix
from jaxinf.solvers.base import Solver, records_config
from jaxinf.solvers.lowrank import (
    LowRankState,
    check_concrete_positive,
    check_operator,
    lowrank_solve,
    lowrank_validate,
    positive_int,
    scorer,
)

ADVICE = (
    "Nyström sketch-and-solve needs damping > 0 and a PSD curvature (curvature='gauss_newton' or 'fisher'); "
    "raise rank for a closer approximation."
)


@records_config
def nystrom(
    rank: int,
    *,
    completion: bool = True,
    sketch_batch: int | None = None,
    projection_batch: int | None = None,
) -> Solver:
    """Nyström sketch-and-solve: ``x = U (Λ + λ)⁻¹ Uᵀ v + (1/λ)(I − UUᵀ) v``.

    Args:
      rank: sketch size ``r`` (curvature-vector products); ``r <= p``.
      completion: keep the ``(1/λ)(I − UUᵀ) v`` term (the Woodbury inverse
        of ``C_nys + λI``; default). ``False`` keeps only the projection
        ``U (Λ + λ)⁻¹ Uᵀ v``, whose scores need no per-example gradients.
      sketch_batch: curvature-vector products evaluated at once while
        sketching (``None``: all ``rank``).
      projection_batch: basis vectors pushed forward at once when scoring
        (``None``: all).

    Returns:
      A :class:`jaxinf.Solver` with ``init``, ``solve``, ``validate`` and
      ``score``.

    Raises:
      ValueError: bad ``rank``; from ``init``, ``rank > p``, a block-diagonal
        operator, or a concrete ``damping <= 0``; from ``validate``, a
        non-positive damping or non-finite sketch.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxinf
      >>> loss = lambda w, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> x = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]) * jnp.sqrt(2.0)
      >>> op = jaxinf.curvature_operator(loss, jnp.zeros(3), (x, jnp.zeros(2)), damping=0.5)
      >>> solver = jaxinf.nystrom(2)  # H = diag(4, 1, 0) has rank 2: exact
      >>> sol, info = solver.solve(solver.init(op, key=jax.random.key(0)), jnp.ones(3))
      >>> [round(float(s), 4) for s in sol]  # 1/4.5, 1/1.5, 1/0.5
      [0.2222, 0.6667, 2.0]

    References:
      Frangella, Tropp & Udell, "Randomized Nyström Preconditioning",
      SIAM J. Matrix Anal. Appl. 44(2), 2023.
      Hataya & Yamada, "Nyström Method for Accurate and Scalable Implicit
      Differentiation", AISTATS 2023.
    """
    rank = positive_int(rank, "rank")
    if sketch_batch is not None:
        sketch_batch = positive_int(sketch_batch, "sketch_batch")
    if projection_batch is not None:
        projection_batch = positive_int(projection_batch, "projection_batch")

    def init(operator: CurvatureOperator, *, key=None) -> LowRankState:
        check_operator(operator, "nystrom", rank)
        damping = operator.damping[0]
        check_concrete_positive(damping, "nystrom()", "the Woodbury inverse divides by λ")
        key = jax.random.key(0) if key is None else key
        approx = nystrom_of_operator(operator, rank, key, batch_size=sketch_batch)
        return nystrom_state(approx, damping, operator.spec, completion=completion)

    def stream_init(stream, *, key=None) -> LowRankState:
        """The same state from a stream: one pass, ``Y = C Ω`` accumulated batch by batch."""
        operator = stream.operator  # one batch: layout, damping, dtype (no products run)
        check_operator(operator, "nystrom", rank)
        damping = operator.damping[0]
        check_concrete_positive(damping, "nystrom()", "the Woodbury inverse divides by λ")
        key = jax.random.key(0) if key is None else key
        omega = sketch_test_matrix(key, operator.size, rank, operator.dtype)
        sketch = stream.matmat(omega, desc="nystrom sketch")
        approx = jax.jit(nystrom_from_sketch)(omega, sketch)
        return nystrom_state(approx, damping, operator.spec, completion=completion)

    def solve(state: LowRankState, v):
        x, info = lowrank_solve(state, v)
        # λ > 0 is required even without the completion.
        return x, info._replace(converged=info.converged & (state.damping > 0))

    def validate(state: LowRankState) -> None:
        lam = float(state.damping)
        if not lam > 0:
            raise ValueError(f"nystrom() needs damping > 0 (the Woodbury inverse divides by λ), got {lam:.3g}.")
        lowrank_validate(state)
        core = float(state.extras["core_min_eigval"])
        eps = float(jnp.finfo(state.basis.dtype).eps)
        if core < -(eps**0.5):
            warnings.warn(
                "nystrom(): the sketched curvature is indefinite (smallest eigenvalue of ΩᵀCΩ is "
                f"{core:.3g} times the largest); the Nyström model keeps only its positive part. Use a PSD "
                "curvature (curvature='gauss_newton' or 'fisher') or arnoldi(negative=...).",
                UserWarning,
                stacklevel=2,
            )

    return Solver(
        init=init,
        solve=solve,
        validate=validate,
        name="nystrom",
        advice=ADVICE,
        scorer=scorer(projection_batch),
        stream_init=stream_init,
    )


def nystrom_state(approx: NystromApproximation, damping, spec, *, completion: bool) -> LowRankState:
    """The Nyström solver's state from a fitted :class:`jaxinf.core.sketch.NystromApproximation`."""
    return LowRankState(
        basis=approx.basis,
        eigvals=approx.eigvals,
        raw_eigvals=approx.eigvals,
        damping=jnp.asarray(damping, approx.basis.dtype),
        extras={"shift": approx.shift, "core_min_eigval": approx.core_min_eigval},
        spec=spec,
        completion=completion,
        method="nystrom",
        negative="clip",
        products=approx.basis.shape[-1],
    )


__all__ = ["nystrom", "nystrom_state"]
