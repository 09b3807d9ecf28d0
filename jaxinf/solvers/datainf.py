"""DataInf: the inverse harmonic mean of the rank-one damped Fisher terms, in closed form.

The damped empirical Fisher of block ``b``, ``F_b + λ_b I`` with
``F_b = (1/n) Σ_i g_ib g_ibᵀ`` (``g_ib`` the gradient of example ``i``'s loss
restricted to block ``b``), is the mean of the rank-one terms
``g_ib g_ibᵀ + λ_b I``. DataInf (Kwon et al. 2023) swaps the inverse of the
mean for the mean of the inverses, each of which Sherman–Morrison gives in
closed form:

    ``(F_b + λ_b I)⁻¹ v_b ≈ (1/n) Σ_i (g_ib g_ibᵀ + λ_b I)⁻¹ v_b
    = (1/λ_b) [v_b − (1/n) Σ_i g_ib (g_ibᵀ v_b) / (λ_b + g_ibᵀ g_ib)]``.

No matrix is formed: the state is the ``n × p`` per-example training
gradients (memory ``O(np)``: meant for small blocks, LoRA-sized parameter
sets), each solve costs ``O(np)``.

Where it is accurate: with ``ρ = max_i ‖g_ib‖² / λ_b`` (over examples and
blocks), the approximation error is bounded by
``‖x_DataInf − x‖ ≤ ρ² (1 + ρ) ‖x‖`` (``x`` the exact solve; the inverse is
operator convex, so DataInf over-estimates: ``x_DataInfᵀ v ≥ xᵀ v``). Large
damping relative to the squared gradient norms (``ρ ≲ 0.1``: ~1 % or better)
makes it accurate; at small damping (``λ ≪ ‖g‖²``) it is not an approximation
of ``(F + λI)⁻¹`` at all: along the span of the gradients it returns about
``v/λ`` where the exact solve returns about ``n v / ‖g‖²``.

References:
  Kwon, Wu, Wu & Zou, "DataInf: Efficiently Estimating Data Influence in
  LoRA-tuned LLMs and Diffusion Models", ICLR 2024 (arXiv:2310.00902);
  pyDVL's ``InverseHarmonicMeanInfluence``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.curvature import CurvatureOperator, per_example_grads
from jaxinf.core.memory import available_bytes
from jaxinf.core.tree import TreeSpec, check_matches, is_tracer
from jaxinf.solvers.base import Solver, make_info, records_config
from jaxinf.solvers.lowrank import scoring_loss_fn

PyTree = Any

__all__ = ["DataInfState", "datainf", "required_bytes", "with_damping"]

ADVICE = (
    "DataInf needs damping > 0 in every block and is accurate only for damping large against the squared "
    "per-example gradient norms."
)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class DataInfState:
    """Per block ``b``: the per-example training gradients ``G_b`` (``n × p_b``), their squared norms and ``λ_b``.

    Attributes:
      grads: per block, ``(n, p_b)``: row ``i`` is ``g_ib``, the block's
        entries of ``∇θℓ(z_i)`` in raveled leaf order.
      sqnorms: per block, ``(n,)``: ``‖g_ib‖²``.
      damping: per block, the scalar ``λ_b``.
      spec: (static) layout of the parameter tree.
      block_leaves: (static) per block, the indices of its parameter leaves.
      block_names: (static) the block names, for messages.
    """

    grads: tuple
    sqnorms: tuple
    damping: tuple
    spec: TreeSpec
    block_leaves: tuple
    block_names: tuple

    def tree_flatten(self):
        return (self.grads, self.sqnorms, self.damping), (self.spec, self.block_leaves, self.block_names)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def num_examples(self) -> int:
        return int(self.grads[0].shape[0])


def with_damping(state: DataInfState, damping: Any) -> DataInfState:
    """The same gradients with a new scalar damping in every block (no new pass over the data)."""
    value = jnp.asarray(damping)
    return dataclasses.replace(state, damping=tuple(value for _ in state.damping))


def required_bytes(num_examples: int, num_params: int, dtype) -> int:
    """Bytes ``datainf`` needs to fit: the ``n × p`` gradients, twice (the per-batch pieces and their concatenation)."""
    return 2 * num_examples * num_params * jnp.dtype(dtype).itemsize


def _check_memory(num_examples: int, num_params: int, dtype, max_memory: int | None) -> None:
    need = required_bytes(num_examples, num_params, dtype)
    budget = available_bytes() if max_memory is None else int(max_memory)
    if need > budget:
        raise ValueError(
            f"datainf() stores the per-example gradients of all {num_examples} training examples over "
            f"{num_params} parameters: about {need / 2**30:.2f} GiB to fit, but {budget / 2**30:.2f} GiB is "
            "available. It is meant for small blocks and LoRA-sized parameter sets: restrict params to the adapted "
            "weights, fit on fewer examples, use a solver whose memory does not grow with n (ekfac, arnoldi, cg), "
            "or raise max_memory if you know it fits."
        )


def _check_operator(operator: CurvatureOperator) -> None:
    """Tracing-time checks: the empirical Fisher, and (when concrete) damping > 0 in every block."""
    if operator.kind != "fisher":
        raise ValueError(
            f"datainf() approximates the inverse of the damped empirical Fisher (1/n) Σ g_i g_iᵀ + λI, not the "
            f"{operator.kind!r} curvature: build the operator / InfluenceModel with curvature='fisher' "
            f"(kind='fisher'), or use a solver for {operator.kind!r} (direct, cg, arnoldi)."
        )
    for b, name in enumerate(operator.block_names):
        lam = operator.damping[operator.block_leaf_indices(b)[0]]
        if not is_tracer(lam) and not float(lam) > 0:
            raise ValueError(_damping_message(name, float(lam), None))


def _damping_message(block: str, lam: float, sqnorms) -> str:
    hint = ""
    if sqnorms is not None and sqnorms.size:
        hint = f" (e.g. damping={max(10 * float(np.max(sqnorms)), 1e-8):.3g}, 10 × the largest ‖g_i‖² of the block)"
    return (
        f"datainf() needs damping > 0 in every block: the Sherman–Morrison terms are divided by it. Block {block!r} "
        f"has damping={lam:.3g}. Set damping > 0{hint}; DataInf is accurate when the damping is large against "
        "the squared per-example gradient norms."
    )


def _block_rows(grads: PyTree, block_leaves: tuple, dtype) -> list:
    """Per block, the ``(n, p_b)`` matrix of a batch's per-example gradients (leaf order)."""
    leaves = jax.tree.leaves(grads)
    n = leaves[0].shape[0]
    flat = [jnp.reshape(leaf, (n, -1)).astype(dtype) for leaf in leaves]
    return [jnp.concatenate([flat[i] for i in ids], axis=1) for ids in block_leaves]


def _state(pieces: list, operator: CurvatureOperator) -> DataInfState:
    """The state from per-batch pieces (each a list of per-block rows), in the batches' order."""
    num_blocks = operator.num_blocks
    grads = tuple(
        pieces[0][b] if len(pieces) == 1 else jnp.concatenate([p[b] for p in pieces], axis=0) for b in range(num_blocks)
    )
    damping = tuple(operator.damping[operator.block_leaf_indices(b)[0]] for b in range(num_blocks))
    block_leaves = tuple(tuple(operator.block_leaf_indices(b)) for b in range(num_blocks))
    return DataInfState(
        grads=grads,
        sqnorms=tuple(jnp.sum(g * g, axis=1) for g in grads),
        damping=damping,
        spec=operator.spec,
        block_leaves=block_leaves,
        block_names=operator.block_names,
    )


def _solve_block(g, sqnorm, lam, v):
    """``(1/λ) [v − (1/n) Σ_i g_i (g_iᵀ v) / (λ + ‖g_i‖²)]`` and the residual ``(F + λ) x − v`` of the exact system."""
    n = g.shape[0]
    lam = lam.astype(g.dtype)
    safe = jnp.where(lam > 0, lam, 1.0)
    weights = (g @ v) / (safe + sqnorm)
    x = (v - g.T @ weights / n) / safe
    residual = g.T @ (g @ x) / n + lam * x - v
    return x, residual


@records_config
def datainf(*, max_memory: int | None = None) -> Solver:
    """DataInf: ``(F_b + λ_b I)⁻¹ v_b ≈ (1/λ_b)[v_b − (1/n) Σ_i g_ib (g_ibᵀ v_b)/(λ_b + ‖g_ib‖²)]`` per block.

    The mean of the Sherman–Morrison inverses of the rank-one terms
    ``g_i g_iᵀ + λI`` of the damped empirical Fisher (Kwon et al. 2023;
    pyDVL's ``InverseHarmonicMeanInfluence``), per block of the operator
    (one block by default; ``blocks="layer"`` is where it is meant to be
    used). ``g_i`` are the per-example gradients of the mean loss's examples
    over all the training data (a ragged last batch counts each example once).

    Accurate when the damping is large against the squared gradient norms:
    with ``ρ = max_i ‖g_ib‖²/λ_b``, ``‖x_DataInf − x‖ ≤ ρ²(1 + ρ)‖x‖``; at
    small damping it is far from the exact solve (see
    :mod:`jaxinf.solvers.datainf`).

    Needs ``curvature="fisher"`` (the operator's kind) and ``damping > 0``
    in every block. Cost: one per-example gradient per training example to
    fit; ``O(np)`` per solve (plus ``O(np)`` for the residual of the exact
    system, reported in ``info.residual_norm``: a measure of the
    approximation, not a stopping criterion). Memory ``O(np)``.
    ``stream_init`` collects the gradients batch by batch
    (:func:`jaxinf.scale.fit_from_stream`).

    Args:
      max_memory: bytes the ``n × p`` gradients may use (counted twice while
        fitting); default: the memory free on the default device now.

    Returns:
      A :class:`jaxinf.Solver`.

    Raises:
      ValueError: from ``init``, for a curvature other than ``"fisher"``,
        a concrete damping ``<= 0`` in a block, or gradients that would not
        fit in ``max_memory`` (with the GiB needed); from ``validate``, for a
        damping ``<= 0`` or non-finite gradients.

    Examples:
      >>> import jax.numpy as jnp, jaxinf
      >>> from jaxinf.solvers.datainf import datainf
      >>> loss = lambda w, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> x, y = jnp.eye(2), jnp.zeros(2)
      >>> op = jaxinf.curvature_operator(loss, jnp.ones(2), (x, y), kind="fisher", damping=1.0)
      >>> solver = datainf()
      >>> sol, info = solver.solve(solver.init(op), jnp.array([1.0, 0.0]))
      >>> [round(float(s), 4) for s in sol]  # g = e_1, e_2: (1/2)[(e_1e_1ᵀ + I)⁻¹ + (e_2e_2ᵀ + I)⁻¹] e_1
      [0.75, 0.0]

    References:
      Kwon, Wu, Wu & Zou, "DataInf: Efficiently Estimating Data Influence in
      LoRA-tuned LLMs and Diffusion Models", ICLR 2024.
    """
    if max_memory is not None and (isinstance(max_memory, bool) or not hasattr(max_memory, "__index__")):
        raise ValueError(f"max_memory must be a number of bytes (int) or None, got {max_memory!r}.")

    def init(operator: CurvatureOperator, *, key=None) -> DataInfState:
        del key
        _check_operator(operator)
        _check_memory(operator.num_examples, operator.size, operator.dtype, max_memory)
        loss_fn = scoring_loss_fn(operator)
        params, data, dtype = operator.params, operator.data, operator.dtype
        block_leaves = tuple(tuple(operator.block_leaf_indices(b)) for b in range(operator.num_blocks))

        def rows(batch):
            return _block_rows(per_example_grads(loss_fn, params, batch), block_leaves, dtype)

        stored = []  # per batch in stored order: the stacked batches, then the others
        if data.stacked is not None:
            stacked = jax.lax.map(rows, data.stacked)  # per block (k, batch, p_b)
            stored += [[s[i] for s in stacked] for i in range(data.num_stacked)]
        stored += [rows(b) for b in data.rest]
        pieces = [stored[i] for i in data.order] if data.order else stored
        return _state(pieces, operator)

    def stream_init(stream, *, key=None) -> DataInfState:
        """One pass over a stream (:func:`jaxinf.scale.fit_from_stream`): the per-example gradients of each batch."""
        del key
        operator = stream.operator
        _check_operator(operator)
        _check_memory(stream.num_examples, operator.size, operator.dtype, max_memory)
        loss_fn = scoring_loss_fn(operator)
        block_leaves = tuple(tuple(operator.block_leaf_indices(b)) for b in range(operator.num_blocks))
        rows = jax.jit(lambda p, batch: _block_rows(per_example_grads(loss_fn, p, batch), block_leaves, operator.dtype))
        params = stream.replicate(operator.params)
        pieces = [rows(params, batch) for _, batch, _ in stream.batches("datainf: per-example gradients")]
        return _state(pieces, operator)

    def solve(state: DataInfState, v):
        check_matches(v, state.spec, "v")
        dtype = state.spec.dtype
        leaves = jax.tree.leaves(v)
        out = [None] * len(leaves)
        squares = []
        positive = []
        for g, sq, lam, ids in zip(state.grads, state.sqnorms, state.damping, state.block_leaves):
            vb = jnp.concatenate([jnp.ravel(leaves[i]).astype(dtype) for i in ids])
            x, residual = _solve_block(g, sq, lam, vb)
            squares.append(jnp.sum(residual * residual))
            positive.append(lam > 0)
            start = 0
            for i in ids:
                shape = state.spec.shapes[i]
                size = math.prod(shape)
                out[i] = jnp.reshape(x[start : start + size], shape).astype(state.spec.dtypes[i])
                start += size
        x = jax.tree.unflatten(state.spec.treedef, out)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in out]))
        ok = finite & jnp.all(jnp.stack(positive))
        return x, make_info(1, jnp.sqrt(sum(squares)), ok, ~finite)

    def validate(state: DataInfState) -> None:
        for name, g, sq, lam in zip(state.block_names, state.grads, state.sqnorms, state.damping):
            if not np.all(np.isfinite(np.asarray(g))):
                raise ValueError(
                    f"datainf(): the per-example gradients of block {name!r} hold NaN or inf; check that the loss "
                    "and its gradient are finite at these params on every training example."
                )
            if not float(lam) > 0:
                raise ValueError(_damping_message(name, float(lam), np.asarray(sq)))

    return Solver(
        init=init,
        solve=solve,
        validate=validate,
        name="datainf",
        advice=ADVICE,
        stream_init=stream_init,
    )
