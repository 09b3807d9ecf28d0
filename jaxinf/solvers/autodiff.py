"""Derivatives of solves: the implicit rule, and a guard against differentiating a factorisation.

Two small pieces the solvers share (the public entry point is
:func:`jaxinf.implicit_solve`, in :mod:`jaxinf.solvers.implicit`):

* :func:`symmetric_solve` runs ``solve`` for ``x = A⁻¹ b`` under
  ``jax.lax.custom_linear_solve(..., symmetric=True)``. Its derivative is
  implicit: from ``A x = b``, ``dx = A⁻¹ (db − (dA) x)``, so the backward pass
  is one more solve, ``b̄ = A⁻ᵀ x̄ = A⁻¹ x̄`` (``A`` symmetric), and the
  values ``A`` depends on (the parameters ``θ`` at which the curvature is
  taken, the damping, the training data: whatever ``matvec`` closes over)
  receive ``−b̄ᵀ (∂A) x`` through the VJP of ``matvec`` alone. The
  iterations of ``solve`` are never differentiated, and what ``solve``
  closes over beyond ``matvec`` (a pre-conditioner, a factorisation) gets no
  gradient: it changes how ``x`` is found, not what ``x`` is.
* :func:`frozen` passes a factorisation through unchanged but raises a clear
  ``TypeError`` when it is differentiated. The derivative of an
  eigendecomposition is unreliable (it divides by eigenvalue gaps, so it is
  wrong or infinite where eigenvalues repeat, e.g. the zero eigenvalues of a
  Gauss-Newton curvature of rank below ``p``), and a silently wrong gradient
  is worse than an error that names the fix.

References:
  Griewank & Walther, "Evaluating Derivatives", 2nd ed., SIAM 2008, §15
  (implicit differentiation of ``A x = b``).
  Blondel et al., "Efficient and Modular Implicit Differentiation", NeurIPS 2022.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

PyTree = Any

__all__ = ["frozen", "symmetric_solve", "factorisation_message"]


def symmetric_solve(matvec: Callable[[PyTree], PyTree], solve: Callable[[PyTree], tuple[PyTree, Any]], b: PyTree):
    """``(x, aux) = solve(b)`` with ``x ≈ A⁻¹ b``, differentiated implicitly for a symmetric ``A = matvec``.

    Args:
      matvec: ``v ↦ A v`` on pytrees shaped like ``b``; ``A`` symmetric. The
        values it closes over (traced parameters, damping, data) are the
        ones that receive gradients.
      solve: ``b ↦ (x, aux)``, any method that returns ``A⁻¹ b`` (to its
        tolerance); ``aux`` (e.g. a :class:`jaxinf.SolveInfo`) is returned
        as is and never differentiated.
      b: the right-hand side.

    Returns:
      ``(x, aux)``. Derivatives: ``b̄ = solve(x̄)``; for every value ``w``
      that ``matvec`` closes over, ``w̄ = −∂_w ⟨b̄, A(w) x⟩`` (the VJP of
      ``matvec`` at fixed ``x``); forward mode ``ẋ = solve(ḃ − Ȧ x)``.
    """
    return jax.lax.custom_linear_solve(matvec, b, lambda _, rhs: solve(rhs), symmetric=True, has_aux=True)


def factorisation_message(name: str) -> str:
    """The error for differentiating the factorisation held by a ``name`` solver's state."""
    return (
        f"{name}: jax is differentiating the factorisation held in the solver state (it depends on a variable "
        "being differentiated, e.g. the params or data given to init). The derivative of an eigendecomposition "
        "is unreliable (wrong or infinite where eigenvalues repeat), so jaxinf refuses it. Use "
        "jaxinf.implicit_solve(solver, operator, v) (or implicit_solve_many): the gradient then flows through "
        "the curvature operator's products (params, damping, data) by implicit differentiation. Gradients "
        "with respect to v and to the state's damping need no change."
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _frozen(message: str, x):
    return x


@_frozen.defjvp
def _frozen_jvp(message, primals, tangents):
    del primals, tangents
    raise TypeError(message)


def frozen(x: PyTree, message: str) -> PyTree:
    """``x`` unchanged; differentiating through it raises ``TypeError(message)``.

    Only values that actually carry a derivative trigger the error (JAX calls
    the rule only for non-zero tangents), so a state computed outside the
    differentiated function, or from values that are not differentiated,
    passes freely.
    """
    return jax.tree.map(functools.partial(_frozen, message), x)
