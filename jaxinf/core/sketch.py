"""Randomized Nyström approximation of a PSD operator (shared sketch code).

Used by the Nyström sketch-and-solve solver (:func:`jaxinf.nystrom`) and by the
Nyström preconditioner of conjugate gradients. Everything here works on
*raveled* vectors: the operator is given as a function ``matvec(x) -> A x``
with ``x`` of shape ``(p,)``. :func:`curvature_matvec` turns a
:class:`jaxinf.CurvatureOperator` into such a function.

Public functions (all pure, ``jit``-compatible; ``rank`` and ``p`` static):

* ``randomized_nystrom(matvec, size, rank, key, *, dtype=None, batch_size=None)
  -> NystromApproximation``: the stable (shifted) randomized Nyström
  approximation ``A ≈ U diag(Λ) Uᵀ``.
* ``nystrom_of_operator(operator, rank, key, *, batch_size=None)
  -> NystromApproximation``: the same for the *undamped* curvature of an
  operator (block-diagonal if the operator has blocks).
* ``curvature_matvec(operator) -> (x (p,) -> C x (p,))``: undamped
  (block-diagonal) curvature on raveled vectors.
* ``nystrom_inverse(approx, damping, b) -> (U Λ Uᵀ + λI)⁻¹ b`` by
  Sherman–Morrison–Woodbury (needs ``λ > 0``); ``b`` has shape ``(p,)``.
* ``nystrom_precondition(approx, damping, b) -> P⁻¹ b`` with the
  preconditioner of Frangella et al.,
  ``P⁻¹ = (Λ_r + λ) U (Λ + λI)⁻¹ Uᵀ + (I − U Uᵀ)``, where ``Λ_r`` is the
  smallest retained eigenvalue.

:class:`NystromApproximation` (a NamedTuple) holds ``basis`` ``U`` of shape
``(p, rank)`` with orthonormal columns, ``eigvals`` ``Λ`` of shape
``(rank,)`` in descending order (shift removed, clipped at 0), the ``shift``
``ν`` that was used, and ``core_min_eigval``, the smallest eigenvalue of the
shifted core matrix ``Ωᵀ(A + νI)Ω`` relative to its largest: it is ``≥ 0``
(up to rounding) for a PSD operator; clearly negative values mean the operator
is indefinite and the approximation only captures its positive part.

Algorithm (RandNysAppx, Frangella, Tropp & Udell 2023, Alg. 3):

1. ``Ω = qr(randn(p, r))``, ``Y = AΩ`` (``r`` operator products);
2. ``ν = √p · eps · ‖Y‖_F``, ``Y_ν = Y + νΩ``;
3. ``M = Ωᵀ Y_ν = W S Wᵀ`` (``r × r``), ``B = Y_ν W S^{-1/2}``;
4. ``B = Q R``, ``R = Z Σ Vᵀ``; ``U = Q Z``, ``Λ = max(Σ² − ν, 0)``.

Step 3 uses a symmetric eigendecomposition of the small core matrix instead
of the paper's Cholesky factor (``B Bᵀ`` is the same), so that a
numerically singular or indefinite core drops the offending directions
instead of producing NaN. When ``rank ≥ rank(A)`` the approximation is
exact up to rounding: ``A (Ω) (ΩᵀAΩ)⁺ (AΩ)ᵀ = A`` for a generic ``Ω``.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from jaxinf.core.sketch import randomized_nystrom
  >>> a = jnp.diag(jnp.array([3.0, 2.0, 0.0, 0.0]))
  >>> approx = randomized_nystrom(lambda x: a @ x, 4, 2, jax.random.key(0))
  >>> [round(float(v), 4) for v in approx.eigvals]
  [3.0, 2.0]

References:
  Frangella, Tropp & Udell, "Randomized Nyström Preconditioning",
  SIAM J. Matrix Anal. Appl. 44(2), 2023.
  Tropp, Yurtsever, Udell & Cevher, "Fixed-rank approximation of a
  positive-semidefinite matrix from streaming data", NeurIPS 2017.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxinf.core.tree import ravel, unravel

__all__ = [
    "NystromApproximation",
    "curvature_matvec",
    "nystrom_inverse",
    "nystrom_of_operator",
    "nystrom_from_sketch",
    "nystrom_precondition",
    "randomized_nystrom",
    "sketch_test_matrix",
]


class NystromApproximation(NamedTuple):
    """``A ≈ basis @ diag(eigvals) @ basis.T``; see the module docstring.

    Attributes:
      basis: ``(p, rank)``, orthonormal columns ``U``.
      eigvals: ``(rank,)``, descending, ``≥ 0`` (shift removed, clipped).
      shift: the stabilising shift ``ν`` (scalar).
      core_min_eigval: smallest eigenvalue of the shifted core matrix
        ``Ωᵀ(A + νI)Ω`` divided by its largest (negative: ``A`` indefinite).
    """

    basis: jax.Array
    eigvals: jax.Array
    shift: jax.Array
    core_min_eigval: jax.Array


def _apply_columns(matvec: Callable, mat, batch_size: int | None):
    """``[matvec(mat[:, j]) for j]`` as a ``(p, r)`` matrix, vmapped or in chunks."""
    if batch_size is None or batch_size >= mat.shape[1]:
        return jax.vmap(matvec, in_axes=1, out_axes=1)(mat)
    return jax.lax.map(matvec, mat.T, batch_size=batch_size).T


def randomized_nystrom(
    matvec: Callable[[jax.Array], jax.Array],
    size: int,
    rank: int,
    key: jax.Array,
    *,
    dtype: Any = None,
    batch_size: int | None = None,
) -> NystromApproximation:
    """Stable randomized Nyström approximation ``A ≈ U diag(Λ) Uᵀ`` of a PSD ``A``.

    Args:
      matvec: ``x (p,) -> A x (p,)``, a symmetric PSD linear map.
      size: ``p``.
      rank: sketch size ``r`` (``1 ≤ r ≤ p``); costs ``r`` products.
      key: a ``jax.random`` key for the Gaussian test matrix.
      dtype: dtype of the sketch (default: JAX's default float).
      batch_size: products evaluated at once (``None``: all ``r`` with
        ``vmap``; smaller values trade time for memory via ``lax.map``).

    Returns:
      A :class:`NystromApproximation`.

    Raises:
      ValueError: ``rank`` not in ``[1, size]`` or bad ``batch_size``.
    """
    size, rank = int(size), int(rank)
    if not 1 <= rank <= size:
        raise ValueError(f"rank must be between 1 and the number of parameters ({size}), got {rank}.")
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}.")
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.zeros(()).dtype
    omega = sketch_test_matrix(key, size, rank, dtype)
    y = _apply_columns(lambda x: matvec(x).astype(dtype), omega, batch_size)
    return nystrom_from_sketch(omega, y)


def sketch_test_matrix(key: jax.Array, size: int, rank: int, dtype) -> jax.Array:
    """The orthonormalised Gaussian test matrix ``Ω`` (``size × rank``) of :func:`randomized_nystrom`."""
    omega, _ = jnp.linalg.qr(jax.random.normal(key, (size, rank), dtype))
    return omega


def nystrom_from_sketch(omega: jax.Array, y: jax.Array) -> NystromApproximation:
    """Steps 2–4 of RandNysAppx from the test matrix ``Ω`` and the sketch ``Y = AΩ`` (both ``p × r``).

    :func:`randomized_nystrom` computes ``Y`` with a ``matvec``; a sketch
    accumulated elsewhere (e.g. one pass over a stream of batches,
    :func:`jaxinf.scale.fit_from_stream`) gives the same approximation.
    """
    size, rank = omega.shape
    dtype = omega.dtype
    eps = jnp.finfo(dtype).eps
    shift = jnp.sqrt(jnp.asarray(size, dtype)) * eps * jnp.linalg.norm(y)
    # A floor for an all-zero operator, so that the core stays invertible.
    shift = jnp.maximum(shift, jnp.finfo(dtype).tiny / eps)
    y_shift = y + shift * omega
    core = omega.T @ y_shift
    core = 0.5 * (core + core.T)
    s, w = jnp.linalg.eigh(core)
    top = jnp.max(jnp.abs(s))
    keep = s > rank * eps * top
    inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, s, 1.0)), 0.0)
    b = y_shift @ (w * inv_sqrt)
    q, r = jnp.linalg.qr(b)
    z, sigma, _ = jnp.linalg.svd(r)
    basis = q @ z
    eigvals = jnp.maximum(sigma**2 - shift, 0.0)
    return NystromApproximation(basis, eigvals, shift, jnp.min(s) / top)


def curvature_matvec(operator) -> Callable[[jax.Array], jax.Array]:
    """The undamped (block-diagonal) curvature ``C`` of ``operator`` on raveled vectors.

    With one block this is ``operator.curvature_vp``; with blocks it is the
    operator's block-diagonal product with the damping set to zero.
    """
    spec = operator.spec
    dtype = spec.dtype
    if operator.num_blocks == 1:
        product = operator.curvature_vp
    else:
        product = operator.with_damping(0.0).matvec

    def matvec(x):
        return ravel(product(unravel(spec, x)), dtype)

    return matvec


@functools.partial(jax.jit, static_argnames=("rank", "batch_size"))
def nystrom_of_operator(operator, rank: int, key: jax.Array, *, batch_size: int | None = None) -> NystromApproximation:
    """:func:`randomized_nystrom` of the undamped curvature of a :class:`jaxinf.CurvatureOperator`.

    Compiled once per operator structure (``rank`` and ``batch_size`` static).
    """
    return randomized_nystrom(
        curvature_matvec(operator), operator.size, rank, key, dtype=operator.dtype, batch_size=batch_size
    )


def nystrom_inverse(approx: NystromApproximation, damping, b):
    """``(U Λ Uᵀ + λI)⁻¹ b = U (Λ + λ)⁻¹ Uᵀ b + (b − U Uᵀ b) / λ`` (Woodbury).

    ``damping`` must be ``> 0`` (with ``λ = 0`` the second term is infinite);
    ``b`` has shape ``(p,)`` (``vmap`` for several).
    """
    u, lam = approx.basis, approx.eigvals
    damping = jnp.asarray(damping, lam.dtype)
    coeff = u.T @ b
    return (b + u @ (coeff * (damping / (lam + damping) - 1.0))) / damping


def nystrom_precondition(approx: NystromApproximation, damping, b):
    """``P⁻¹ b = (Λ_r + λ) U (Λ + λI)⁻¹ Uᵀ b + (b − U Uᵀ b)`` (Frangella et al., eq. 5.3).

    ``Λ_r`` is the smallest retained eigenvalue; ``P⁻¹`` is SPD whenever
    ``Λ_r + λ > 0``. ``b`` has shape ``(p,)``.
    """
    u, lam = approx.basis, approx.eigvals
    damping = jnp.asarray(damping, lam.dtype)
    coeff = u.T @ b
    # b + U ((Λ_r + λ)/(Λ + λ) − 1) Uᵀ b: two products with U instead of three.
    return b + u @ (coeff * ((lam[-1] + damping) / (lam + damping) - 1.0))
