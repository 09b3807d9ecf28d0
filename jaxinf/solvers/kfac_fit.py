"""K-FAC and EK-FAC: the fitting passes over the data, from a plan to a state.

Pass 1 sums, per tagged layer, the Kronecker factors ``A = E[Σ_t a_t a_tᵀ]``
and ``G = E[(1/T) Σ_t g_t g_tᵀ]`` of K-FAC (Martens & Grosse 2015; Grosse &
Martens 2016 for convolutions), plus the statistics of the fallback leaves;
their eigendecompositions give the Kronecker eigenbasis. Pass 2 (EK-FAC,
George et al. 2018) replaces ``λ_A λ_Gᵀ`` by the second moments of the
per-example gradients in that basis. :func:`fit` runs the passes in memory
(inside one jit), :func:`fit_stream` as host loops over a stream; both give
a :class:`~jaxinf.solvers.kfac_plan.KFACState` for
:mod:`jaxinf.solvers.kfac` to solve with.

References:
  Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature", ICML 2015. Grosse & Martens, "A Kronecker-factored
  approximate Fisher matrix for convolution layers", ICML 2016. George,
  Laurent, Bouthillier, Ballas & Vincent, "Fast Approximate Natural Gradient
  Descent in a Kronecker-factored Eigenbasis", NeurIPS 2018.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxinf.core.curvature import CurvatureOperator
from jaxinf.core.data import Batches, add_example_axis, batch_size
from jaxinf.core.linalg import eigh_in_sequence, in_sequence
from jaxinf.core.pieces import one_size_steps
from jaxinf.layers.statistics import example_statistics, layer_ids, layer_matrices, layer_output_grads, rest_matrix
from jaxinf.solvers.kfac_onehot import id_counts, rotated_squares, scatter_rows
from jaxinf.solvers.kfac_outputs import output_cotangents
from jaxinf.solvers.kfac_plan import KFACPlan, KFACState

# ----------------------------------------------------------------------------
# Per-example layer statistics
# ----------------------------------------------------------------------------


def _weighted_sum(fn: Callable, data: Batches):
    """``(1/n) Σ_i s_i`` over the ``n`` examples of ``data``, with ``fn`` traced once.

    ``fn(batch, indices, mask)`` returns ``(1/b) Σ_j mask_j s_j`` over the
    ``b`` examples of ``batch`` (``mask`` ``None``: all of them);
    ``indices`` are the examples' indices in the whole dataset, so that
    per-example draws do not depend on how the data is batched. One
    ``lax.scan`` visits every batch at one size ``b``, the stacked batches'
    (else the largest batch's): a smaller batch (a ragged last one) is padded
    with masked examples and a larger one cut into pieces. The statistics are
    sums over examples, so this is exact, and a ragged batch costs no second
    trace and compile of ``fn``.
    """
    steps = one_size_steps(data)
    weight = steps.size / data.num_examples
    first = jax.tree.map(lambda a: a[0], steps.xs)
    if steps.count == 1:
        return jax.tree.map(lambda t: weight * t, fn(*steps.at(first)))

    def body(acc, x):
        return jax.tree.map(lambda s, u: s + weight * u, acc, fn(*steps.at(x))), None

    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(lambda x: fn(*steps.at(x)), first))
    total, _ = jax.lax.scan(body, zero, steps.xs)
    return total


# ----------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------


def _batch_statistics(plan: KFACPlan, output_loss, params_leaves, batch, key, indices):
    """Per example of ``batch`` (vmapped): records, output gradients, rest gradients.

    Example ``i`` draws with ``fold_in(key, indices[i])``, ``indices`` the
    examples' indices in the whole dataset (in a multi-process stream, across
    every process): the draws follow the example, not its batch, position,
    device or process, so a fit is the same however the data is split.
    """
    tracer = plan.fit
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)

    def one(example, k):
        batch1 = add_example_axis(example)
        return example_statistics(
            tracer, params_leaves, batch1, lambda outs, b1: output_cotangents(plan, output_loss, outs, b1, k)
        )

    return jax.vmap(one)(batch, keys)


def _masked(x, mask):
    """``x`` with the examples (leading axis) where ``mask`` is ``False`` zeroed; ``x`` when ``mask`` is ``None``."""
    if mask is None:
        return x
    return x * jnp.reshape(mask, (-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def _masked_ids(ids, mask, size: int):
    """Token ids with the masked examples' ids set to ``size`` (no row: dropped by the one-hot sums)."""
    if mask is None:
        return ids
    return jnp.where(jnp.reshape(mask, (-1,) + (1,) * (ids.ndim - 1)), ids, size)


def _pass1(plan: KFACPlan, output_loss, params_leaves, batch, key, indices, mask=None) -> dict:
    """Pass 1 on one batch: ``A``, ``G`` and fallback statistics, ``(1/b) Σ`` over its ``b`` examples.

    ``indices``: the examples' global indices; ``mask``: ``None``, or ``False``
    on padding examples, which then add nothing (:func:`_weighted_sum`).
    """
    tags = plan.tags
    dtype = plan.factor_dtype
    records, pert, diff = _batch_statistics(plan, output_loss, params_leaves, batch, key, indices)
    n = batch_size(batch)
    out = {"A": [], "G": [], "F": []}
    for layer in tags.layers:
        if layer.one_hot_inputs:  # A diagonal: the id counts, kept as a vector (kfac_onehot)
            ids, g = jax.vmap(lambda r, p, L=layer: (layer_ids(L, r), layer_output_grads(L, p, dtype)))(records, pert)
            out["A"].append(id_counts(_masked_ids(ids, mask, layer.d_in), layer.d_in, dtype) / n)
        else:
            a, g = jax.vmap(lambda r, p, L=layer: layer_matrices(L, r, p, dtype))(records, pert)
            out["A"].append(jnp.einsum("n...ti,n...tj->...ij", _masked(a, mask), a) / n)
        t = g.shape[-2]  # locations (of one step, for a layer stacked along a scan: factors per step)
        out["G"].append(jnp.einsum("nk...to,nk...tp->...op", _masked(g, mask), g) / (n * t))
    for fb in tags.fallbacks:
        size = math.prod(tags.shapes[fb.leaf])
        if size == 0:  # a zero-size leaf: no parameters, no curvature
            out["F"].append(jnp.zeros((0, 0) if fb.method == "block" else (0,), dtype))
            continue
        gl = jnp.reshape(diff[fb.leaf], (n, -1, size)).astype(dtype)
        if fb.method == "block":
            out["F"].append(jnp.einsum("nki,nkj->ij", _masked(gl, mask), gl) / n)
        else:
            out["F"].append(jnp.sum(_masked(gl * gl, mask), axis=(0, 1)) / n)
    return out


def _eigenbases(stats: dict) -> tuple:
    """Eigendecompositions of the summed ``A`` and ``G``: ``(λ_A, Q_A, λ_G, Q_G)``, lists per layer.

    One decomposition after another (:func:`jaxinf.core.linalg.eigh_in_sequence`), never all
    layers' at once. A diagonal ``A`` (one-hot inputs, held as a vector) is not decomposed: its
    eigenvalues are its entries and ``Q_A`` the identity (``None``).
    """
    diagonal = [a.ndim < g.ndim for a, g in zip(stats["A"], stats["G"])]
    dense_a = [a for a, diag in zip(stats["A"], diagonal) if not diag]
    decomposed = eigh_in_sequence([*dense_a, *stats["G"]], after=stats)  # after every statistic
    eig_g = [jnp.clip(w, 0.0) for w, _ in decomposed[len(dense_a) :]]
    vec_g = [q for _, q in decomposed[len(dense_a) :]]
    pending = iter(decomposed[: len(dense_a)])
    eig_a, vec_a = [], []
    for a, diag in zip(stats["A"], diagonal):
        w, q = (a, None) if diag else next(pending)
        eig_a.append(jnp.clip(w, 0.0))
        vec_a.append(q)
    return eig_a, vec_a, eig_g, vec_g


def _sum_in_chunks(fn: Callable, tree, chunk: int):
    """``Σ fn(part)`` over parts of ``tree`` (leading axis: examples) of ``chunk`` examples, in a ``lax.map``.

    Bounds the per-example temporaries to ``chunk`` examples. Part ``j`` holds
    the examples ``j, j + s, j + 2s, ...`` (``s`` parts), so a batch sharded
    along its examples stays sharded in every part. Examples past the last
    full part are summed after the map (and only after it: :func:`jaxinf.core.linalg.in_sequence`).
    """
    n = batch_size(tree)
    steps = n // chunk
    if steps < 2:
        return fn(tree)
    m = steps * chunk
    parts = jax.tree.map(lambda a: jnp.swapaxes(a[:m].reshape(chunk, steps, *a.shape[1:]), 0, 1), tree)
    total = jax.tree.map(lambda t: jnp.sum(t, axis=0), jax.lax.map(fn, parts))
    if m < n:
        total, tail = in_sequence(total, jax.tree.map(lambda a: a[m:], tree))
        total = jax.tree.map(jnp.add, total, fn(tail))
    return total


def _pass2(plan: KFACPlan, output_loss, params_leaves, vec_a, vec_g, batch, key, indices, chunk: int, mask=None):
    """EK-FAC pass 2 on one batch: ``(1/b) Σ_i (Q_Aᵀ ∇_W ℓ_i Q_G)²`` per layer (``mask`` as in :func:`_pass1`).

    Called with the same ``key`` and ``indices`` as :func:`_pass1`: ``Λ`` is then
    exactly the diagonal of the same estimate in the eigenbasis. The rotated
    per-example gradients (``d_in+1 × d_out`` per example and layer) are formed
    ``chunk`` examples at a time (:data:`jaxinf.solvers.kfac.EXAMPLE_CHUNK`).
    """
    dtype = plan.factor_dtype

    def sums(part_indices_mask):
        part, part_indices, part_mask = part_indices_mask
        records, pert, diff = _batch_statistics(plan, output_loss, params_leaves, part, key, part_indices)
        out = []
        for layer, qa, qg in zip(plan.tags.layers, vec_a, vec_g):
            if qa is None:  # one-hot inputs, Q_A = I: squares by token id, scattered into the table's rows

                def by_id(r, p, d, L=layer, qg=qg):
                    rest = rest_matrix(L, d, dtype)
                    return rotated_squares(L, layer_ids(L, r), layer_output_grads(L, p, dtype), rest, qg)

                vals, ids = jax.vmap(by_id)(records, pert, diff)
                out.append(scatter_rows(vals, _masked_ids(ids, part_mask, layer.d_in), layer.d_in))
                continue

            def rotated(r, p, d, L=layer, qa=qa, qg=qg):
                a, g = layer_matrices(L, r, p, dtype)  # stacked along a scan: a leading step axis (...)
                m = jnp.einsum("...ti,k...to->k...io", a @ qa, g @ qg)
                rest = rest_matrix(L, d, dtype)
                if rest is not None:
                    m = m + jnp.einsum("...ji,k...jl,...lo->k...io", qa, rest, qg)
                return jnp.sum(m * m, axis=0)

            out.append(jnp.sum(_masked(jax.vmap(rotated)(records, pert, diff), part_mask), axis=0))
        return out

    n = batch_size(batch)
    return [t / n for t in _sum_in_chunks(sums, (batch, indices, mask), chunk)]


def _finish(plan: KFACPlan, stats: dict, bases: tuple, corrected, operator_damping, heuristic) -> KFACState:
    """The state from the summed statistics, the eigenbases and (EK-FAC) the corrected eigenvalues."""
    tags = plan.tags
    dtype = plan.factor_dtype
    eig_a, vec_a, eig_g, vec_g = bases
    if plan.update_diagonal:
        eigvals = list(corrected) if tags.layers else []
    else:
        eigvals = [wa[..., :, None] * wg[..., None, :] for wa, wg in zip(eig_a, eig_g)]

    def effective(leaf, values, steps=0):
        """The damping of a leaf's block; per step ``(L,)`` for a layer stacked along a scan."""
        lam = operator_damping[leaf].astype(dtype)
        if heuristic is None or values.size == 0:  # zero-size: nothing to damp (and no mean to take)
            return jnp.broadcast_to(lam, (steps,)) if steps else lam
        return jnp.where(lam > 0, lam, heuristic * jnp.mean(values, axis=(-2, -1) if steps else None))

    damping = tuple(effective(layer.weight, ev, layer.steps) for layer, ev in zip(tags.layers, eigvals))
    fb_vecs, fb_vals, fb_damp = [], [], []
    blocks = [f for fb, f in zip(tags.fallbacks, stats["F"]) if fb.method == "block"]
    # after the layers' decompositions and the EK-FAC pass, never beside them
    decomposed = iter(eigh_in_sequence(blocks, after=(stats, vec_g, corrected)))
    for fb, f in zip(tags.fallbacks, stats["F"]):
        if fb.method == "block":
            w, q = next(decomposed)
            fb_vecs.append(q)
            fb_vals.append(jnp.clip(w, 0.0))
        else:
            fb_vecs.append(None)
            fb_vals.append(f)
        fb_damp.append(effective(fb.leaf, fb_vals[-1]))
    return KFACState(
        tuple(stats["A"]),
        tuple(stats["G"]),
        tuple(vec_a),
        tuple(vec_g),
        tuple(eigvals),
        damping,
        tuple(fb_vecs),
        tuple(fb_vals),
        tuple(fb_damp),
        plan,
    )


def fit(plan: KFACPlan, output_loss, operator: CurvatureOperator, key, heuristic, chunk: int) -> KFACState:
    """The in-memory fit: both passes as :func:`_weighted_sum` sweeps of ``operator.data``.

    Runs inside one jit (or eagerly); its eigendecompositions run one after
    another (:func:`jaxinf.core.linalg.in_sequence`). Example ``i`` of the concatenated batches
    draws with ``fold_in(key, i)``.
    """
    params_leaves = jax.tree.leaves(operator.params)
    stats = _weighted_sum(
        lambda batch, indices, mask: _pass1(plan, output_loss, params_leaves, batch, key, indices, mask),
        operator.data,
    )
    bases = _eigenbases(stats)
    corrected = None
    if plan.update_diagonal and plan.tags.layers:
        bases, data = in_sequence(bases, operator.data)  # pass 2 (its eigh too) after the decompositions
        _, vec_a, _, vec_g = bases
        corrected = _weighted_sum(
            lambda batch, indices, mask: _pass2(
                plan, output_loss, params_leaves, vec_a, vec_g, batch, key, indices, chunk, mask
            ),
            data,
        )
    return _finish(plan, stats, bases, corrected, operator.damping, heuristic)


def _stream_term(plan, output_loss, chunk, leaves, batch, key, indices, mask, bases):
    """One batch's pass statistics: pass 1 when ``bases`` is ``None``, else EK-FAC's pass 2 in ``(Q_A, Q_G)``."""
    if bases is None:
        return _pass1(plan, output_loss, leaves, batch, key, indices, mask)
    return _pass2(plan, output_loss, leaves, bases[0], bases[1], batch, key, indices, chunk, mask)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=3)
def _stream_step(plan, output_loss, chunk, total, leaves, batch, key, indices, mask, weight, bases):
    """``total + weight * (the piece's pass statistics)``, one program per plan, pass and piece size."""
    term = _stream_term(plan, output_loss, chunk, leaves, batch, key, indices, mask, bases)
    return jax.tree.map(lambda s, t: s + weight * t, total, term)


_stream_eigenbases = jax.jit(_eigenbases)


@functools.partial(jax.jit, static_argnames=("plan", "heuristic"))
def _stream_finish(stats, bases, corrected, damping, *, plan, heuristic):
    """The state; ``bases`` ``None`` (K-FAC, one pass): the eigendecompositions too, in the same program."""
    bases = _eigenbases(stats) if bases is None else bases
    return _finish(plan, stats, bases, corrected, damping, heuristic)


def fit_stream(plan: KFACPlan, output_loss, stream, key, heuristic, chunk: int) -> KFACState:
    """The streamed fit: the passes of :func:`fit` as host loops, one jitted call per batch.

    Each batch's statistics are added to a device-resident sum with weight
    ``n_b / n`` (as :func:`_weighted_sum` does); every example draws with
    ``fold_in(key, i)``, ``i`` its index in the whole dataset (the stream
    gives it, across processes too), so the state equals the in-memory fit on
    the same examples, however they are batched, sharded or split over
    processes. Every batch comes as pieces of the first batch's size (a
    ragged last batch padded with masked examples, a larger one cut: one
    compiled program per pass). The per-batch programs are module-level,
    keyed on the plan (one per problem signature,
    :class:`~jaxinf.solvers.kfac_plan.PlanCache`), so a later fit of the same
    problem compiles nothing. Each call waits for the
    previous one's sum, so no two batches' eigendecompositions run at once.
    """
    operator = stream.operator
    params_leaves = stream.replicate(jax.tree.leaves(operator.params))
    static = (plan, output_loss, chunk)
    size = batch_size(stream.first)

    def run(desc, bases):
        first_indices, first_mask = (jax.ShapeDtypeStruct((size,), t) for t in (jnp.uint32, jnp.bool_))  # no eager op
        term = functools.partial(_stream_term, *static)
        total = stream.zeros(jax.eval_shape(term, params_leaves, stream.first, key, first_indices, first_mask, bases))
        for _, batch, weight, indices, mask in stream.batches(desc, with_indices=True, pad_to=size):
            total = _stream_step(*static, total, params_leaves, batch, key, indices, mask, weight, bases)
        return total

    passes = 2 if plan.update_diagonal and plan.tags.layers else 1
    stats = run(f"K-FAC factors, pass 1/{passes}", None)
    bases = corrected = None  # K-FAC: decomposed inside _stream_finish, one program fewer
    if passes == 2:
        bases = _stream_eigenbases(stats)
        _, vec_a, _, vec_g = bases
        corrected = run("EK-FAC eigenvalues, pass 2/2", (vec_a, vec_g))
    return _stream_finish(stats, bases, corrected, operator.damping, plan=plan, heuristic=heuristic)


__all__ = ["fit", "fit_stream"]
