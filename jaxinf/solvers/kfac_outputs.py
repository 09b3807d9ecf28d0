"""The output side of the K-FAC Fisher: cotangents ``r`` at the model outputs, with ``E[r rᵀ] = H_out``.
Each example's layer output gradients are the backward pass of ``r``, so
``G = E[g gᵀ]`` is the Fisher of the model's outputs under ``H_out``: the
output loss's Hessian (``fisher="exact"``: ``r`` its square root; ``"sampled"``:
Gaussian draws with that covariance), a likelihood's closed form
(``"categorical"``: ``diag(p) - p pᵀ`` per position, or labels drawn from
``softmax``; ``"gaussian"``: ``I``), or the loss gradient itself
(``"empirical"``). A likelihood's ``H_out`` is scaled to the output loss's
own curvature when the loss is known (:func:`likelihood_scale`), so a loss
that averages over positions gets the Fisher of that average.
References:
  Martens & Grosse, ICML 2015 (sampled Fisher); Martens, "New insights and
  perspectives on the natural gradient method", JMLR 2020 (the Fisher and
  the generalised Gauss-Newton matrix of an exponential-family output).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxinf.core.linalg import eigh
from jaxinf.solvers.kfac_plan import KFACPlan, warn_dense_output_hessian

__all__ = ["categorical_root", "likelihood_scale", "output_cotangents"]


def output_cotangents(plan: KFACPlan, output_loss, outs, batch1, key):
    """Cotangents ``r`` (leading axis K) at the traced function's outputs, pre-scaled by √weight."""
    tracer = plan.fit
    if plan.fisher == "empirical":
        return [jnp.ones((1, *o.shape), o.dtype) for o in outs], 1
    flat = jnp.concatenate([jnp.ravel(o) for o in outs])
    shapes = [o.shape for o in outs]
    sizes = [math.prod(s) for s in shapes]

    def split(vec):
        parts, start = [], 0
        for s, n in zip(shapes, sizes):
            parts.append(jnp.reshape(vec[..., start : start + n], (*vec.shape[:-1], *s)))
            start += n
        return parts

    m = flat.shape[0]
    s_count = plan.num_samples
    # the likelihood's H_out, rescaled to the output loss's own when there is one (e.g. a mean over positions)
    root_s = likelihood_scale(plan.likelihood, output_loss, tracer.out_tree, outs, batch1) / math.sqrt(s_count)
    if plan.fisher == "sampled" and plan.likelihood == "categorical":
        logits = outs[0]
        probs = jax.nn.softmax(logits, axis=-1)
        labels = jax.random.categorical(key, logits, axis=-1, shape=(s_count, *logits.shape[:-1]))
        r = (probs[None] - jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)) * root_s
        return [r], s_count
    if plan.fisher == "sampled" and plan.likelihood == "gaussian":
        eps = jax.random.normal(key, (s_count, m), flat.dtype) * root_s
        return split(eps), s_count
    if plan.likelihood == "gaussian":  # exact, H_out = I (times the output loss's scale)
        return split(jnp.eye(m, dtype=flat.dtype) * root_s), m

    if plan.likelihood == "categorical" and len(outs) == 1:  # exact: H = diag(p) - p pᵀ per position
        return split(categorical_root(outs[0]).T * root_s), m
    if plan.likelihood == "categorical":

        def nll(vec):
            logits = split(vec)[0]
            return -jnp.sum(jax.nn.log_softmax(logits, axis=-1)[..., 0])

    else:

        def nll(vec):
            return output_loss(jax.tree.unflatten(tracer.out_tree, split(vec)), batch1)

    warn_dense_output_hessian(m)
    hess = jax.hessian(nll)(flat)
    # the Hessian may not depend on the data (a squared error): tie it to this example's outputs, so that its
    # eigh runs in this batch's turn and never beside another one's (see jaxinf.core.linalg.in_sequence)
    hess, _ = jax.lax.optimization_barrier((0.5 * (hess + hess.T), flat))
    w, u = eigh(hess)  # one example at a time under vmap on the CPU (jaxinf.core.linalg)
    root = u * jnp.sqrt(jnp.clip(w, 0.0))[None, :]  # H = root rootᵀ
    if plan.fisher == "exact":
        return split(root.T), m
    eps = jax.random.normal(key, (s_count, m), flat.dtype) / math.sqrt(s_count)
    return split(eps @ root.T), s_count


def likelihood_scale(likelihood, output_loss, out_tree, outs, batch1):
    """``√s``: the output loss's curvature in the outputs as a multiple ``s`` of the likelihood's ``H_out``.

    ``likelihood="categorical"`` reads an example's loss as ``-Σ_t log softmax(z_t)_{y_t}`` summed over
    its positions, ``"gaussian"`` as ``½‖z - y‖²``; a loss that averages over ``T`` positions (or
    ``m`` outputs) has ``1/T`` (``2/m`` for a mean squared error) of that curvature, and K-FAC's
    would be that many times too large. With an ``output_loss`` at hand, ``s`` is measured on this
    example along one fixed probe ``r``: ``s = ⟨H_loss r, H r⟩ / ⟨H r, H r⟩`` (exact when
    ``H_loss = s H``, as for those means; otherwise the least-squares multiple), and the likelihood's
    draws are scaled by ``√s``. ``1`` without an output loss (the sum convention is assumed), without
    a likelihood, or with several outputs.
    """
    if likelihood is None or output_loss is None or len(outs) != 1:
        return 1.0
    z = outs[0]
    probe = jax.random.normal(jax.random.key(0), z.shape, z.dtype)

    def loss_of(zz):
        return output_loss(jax.tree.unflatten(out_tree, [zz]), batch1)

    h_loss = jax.jvp(jax.grad(loss_of), (z,), (probe,))[1]
    if likelihood == "categorical":
        p = jax.nn.softmax(z, axis=-1)
        h_lik = p * probe - p * jnp.sum(p * probe, axis=-1, keepdims=True)
    else:
        h_lik = probe
    den = jnp.sum(h_lik * h_lik)
    tiny = jnp.finfo(z.dtype).tiny
    s = jnp.where(den > tiny, jnp.sum(h_loss * h_lik) / jnp.maximum(den, tiny), 1.0)
    return jnp.sqrt(jnp.clip(s, 0.0))


def categorical_root(logits):
    """``R`` with ``R Rᵀ = H``, the Hessian of ``-log softmax(z)_y`` in the logits (any ``y``), without ``eigh``.

    Per position ``H = diag(p) - p pᵀ`` with ``p = softmax(z)``, and
    ``R = diag(√p) - p √pᵀ`` gives ``R Rᵀ = diag(p) - 2 p pᵀ + p pᵀ (Σ p) = H``;
    positions (leading axes of ``logits``) are independent: ``R`` is block diagonal.
    """
    classes = logits.shape[-1]
    p = jax.nn.softmax(logits.reshape(-1, classes), axis=-1)
    root_p = jnp.sqrt(p)
    blocks = jax.vmap(jnp.diag)(root_p) - p[:, :, None] * root_p[:, None, :]
    positions = p.shape[0]
    full = jnp.einsum("ts,tij->tisj", jnp.eye(positions, dtype=p.dtype), blocks)
    return full.reshape(positions * classes, positions * classes)
