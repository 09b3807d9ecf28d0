"""Curvature operators against dense float64 references and analytic formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf.core.curvature import to_dense as dense_operator
from jaxinf.core.tree import ravel, tree_spec, unravel
from tests import models


def test_linear_regression_hessian_is_analytic():
    x = jax.random.normal(jax.random.key(0), (17, 4))
    y = jax.random.normal(jax.random.key(1), (17,))

    def loss(w, batch):
        return jnp.mean((batch[0] @ w - batch[1]) ** 2)

    op = jaxinf.curvature_operator(loss, jnp.zeros(4), (x, y))
    np.testing.assert_allclose(dense_operator(op), 2 * x.T @ x / 17, rtol=1e-12, atol=1e-12)


def test_softmax_regression_hessian_is_analytic():
    p = models.logistic_problem()
    x, _ = p.train
    probs = jax.nn.softmax(p.model_fn(p.params, p.train))
    # d²/dW² of mean cross-entropy: (1/n) Σ (diag(p) − p pᵀ) ⊗ x̃ x̃ᵀ with x̃ = [x, 1] and (w, b) ordering.
    n, d = x.shape
    k = probs.shape[1]
    blocks = jnp.einsum("ni,nj->nij", -probs, probs) + jax.vmap(jnp.diag)(probs)
    xt = jnp.concatenate([x, jnp.ones((n, 1))], axis=1)
    full = jnp.einsum("nab,ni,nj->iajb", blocks, xt, xt) / n  # (d+1, k, d+1, k)
    # jaxinf ravels leaves in flatten order: "b" (k,) then "w" (d, k).
    order = [(d, c) for c in range(k)] + [(i, c) for i in range(d) for c in range(k)]
    ref = jnp.array([[full[i, a, j, b] for (j, b) in order] for (i, a) in order])
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train)
    np.testing.assert_allclose(dense_operator(op), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("flavour", ["linen", "nnx", "plain"])
def test_hessian_matches_jax_hessian(flavour):
    p = models.mlp_problem(flavour)
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train)
    np.testing.assert_allclose(dense_operator(op), models.dense_hessian(p.loss_fn, p.params, p.train), atol=1e-12)


def test_hessian_of_cnn_matches_jax_hessian():
    p = models.cnn_problem()
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train)
    np.testing.assert_allclose(dense_operator(op), models.dense_hessian(p.loss_fn, p.params, p.train), atol=1e-11)


def test_hvp_matches_finite_differences():
    p = models.mlp_problem("plain")
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train)
    v = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape, a.dtype), p.params)
    eps = 1e-5
    grad = jax.grad(p.loss_fn)
    fd = jax.tree.map(
        lambda a, b: (a - b) / (2 * eps),
        grad(jax.tree.map(lambda q, d: q + eps * d, p.params, v), p.train),
        grad(jax.tree.map(lambda q, d: q - eps * d, p.params, v), p.train),
    )
    np.testing.assert_allclose(ravel(op.matvec(v)), ravel(fd), rtol=1e-7, atol=1e-9)


def _dense_ggn(p):
    flat, unr = jax.flatten_util.ravel_pytree(p.params)

    @jax.jit
    def ggn(flat, batch):
        outputs = p.model_fn(unr(flat), batch)
        jac = jax.jacobian(lambda f: p.model_fn(unr(f), batch).ravel())(flat)
        h_out = jax.hessian(lambda o: p.output_loss(o.reshape(outputs.shape), batch))(outputs.ravel())
        return jac.T @ h_out @ jac

    return ggn(flat, p.train)


@pytest.mark.parametrize("problem", ["mlp", "logistic", "cnn"])
def test_gauss_newton_matches_dense_jthj(problem):
    p = {"mlp": models.mlp_problem("linen"), "logistic": models.logistic_problem(), "cnn": models.cnn_problem()}[
        problem
    ]
    op = jaxinf.curvature_operator(
        None, p.params, p.train, kind="gauss_newton", model_fn=p.model_fn, output_loss=p.output_loss
    )
    np.testing.assert_allclose(dense_operator(op), _dense_ggn(p), atol=1e-12)


def test_gauss_newton_equals_hessian_for_linear_model_with_convex_loss():
    p = models.logistic_problem()
    gn = jaxinf.curvature_operator(
        None, p.params, p.train, kind="gauss_newton", model_fn=p.model_fn, output_loss=p.output_loss
    )
    h = jaxinf.curvature_operator(p.loss_fn, p.params, p.train)
    np.testing.assert_allclose(dense_operator(gn), dense_operator(h), atol=1e-12)


def test_empirical_fisher_matches_mean_outer_product():
    p = models.mlp_problem("nnx")
    g = models.dense_grads(p.loss_fn, p.params, p.train)
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, kind="fisher")
    np.testing.assert_allclose(dense_operator(op), g.T @ g / g.shape[0], atol=1e-12)


@pytest.mark.parametrize("kind", ["hessian", "gauss_newton", "fisher"])
def test_ragged_batches_give_exactly_the_full_data_average(kind):
    p = models.mlp_problem("plain", n_train=23)
    x, y = p.train
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]  # 8, 8, 7
    kwargs = dict(kind=kind, model_fn=p.model_fn, output_loss=p.output_loss, damping=0.0)
    full = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, **kwargs)
    ragged = jaxinf.curvature_operator(p.loss_fn, p.params, batches, **kwargs)
    assert ragged.data.stacked is not None and len(ragged.data.rest) == 1
    np.testing.assert_allclose(dense_operator(ragged), dense_operator(full), atol=1e-13)


def test_generator_of_batches_is_accepted():
    p = models.mlp_problem("plain", n_train=20)
    x, y = p.train
    gen = ((x[i : i + 6], y[i : i + 6]) for i in range(0, 20, 6))
    op = jaxinf.curvature_operator(p.loss_fn, p.params, gen)
    assert op.num_examples == 20
    np.testing.assert_allclose(dense_operator(op), models.dense_hessian(p.loss_fn, p.params, p.train), atol=1e-13)


def test_damping_adds_lambda_identity():
    p = models.mlp_problem("plain")
    op0 = jaxinf.curvature_operator(p.loss_fn, p.params, p.train)
    op1 = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.3)
    np.testing.assert_allclose(dense_operator(op1), dense_operator(op0) + 0.3 * np.eye(op0.size), atol=1e-13)
    # an integer damping is a valid value too
    op2 = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=1)
    np.testing.assert_allclose(dense_operator(op2), dense_operator(op0) + np.eye(op0.size), atol=1e-13)


def test_layer_blocks_with_per_block_damping():
    p = models.mlp_problem("linen")
    op = jaxinf.curvature_operator(
        p.loss_fn,
        p.params,
        p.train,
        blocks="layer",
        damping={"['params']['Dense_0']": 0.1, "['params']['Dense_1']": 0.5},
    )
    assert op.block_names == ("['params']['Dense_0']", "['params']['Dense_1']")
    h = np.asarray(models.dense_hessian(p.loss_fn, p.params, p.train))
    n0 = len(op.block_flat_indices(0))
    ref = np.zeros_like(h)
    ref[:n0, :n0] = h[:n0, :n0] + 0.1 * np.eye(n0)
    ref[n0:, n0:] = h[n0:, n0:] + 0.5 * np.eye(h.shape[0] - n0)
    np.testing.assert_allclose(dense_operator(op), ref, atol=1e-13)


def test_nnx_layer_blocks_group_kernel_and_bias():
    p = models.mlp_problem("nnx")
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, blocks="layer")
    assert op.block_names == ("['l1']", "['l2']")


def test_matvec_under_jit_and_vmap():
    p = models.mlp_problem("plain")
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=0.1)
    spec = tree_spec(p.params)
    eye = jnp.eye(spec.size)[:5]
    vs = jax.vmap(lambda e: unravel(spec, e))(eye)
    out = jax.jit(jax.vmap(lambda o, v: o.matvec(v), in_axes=(None, 0)))(op, vs)
    dense = dense_operator(op)
    np.testing.assert_allclose(jax.vmap(ravel)(out), dense[:5], atol=1e-13)


def test_float32_operator():
    p = models.mlp_problem("plain", dtype=jnp.float32)
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train)
    assert op.dtype == jnp.float32
    ref = models.dense_hessian(
        p.loss_fn,
        jax.tree.map(lambda a: a.astype(jnp.float64), p.params),
        jax.tree.map(lambda a: a.astype(jnp.float64), p.train),
    )
    np.testing.assert_allclose(dense_operator(op), ref, atol=1e-5)


# --------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    p = models.mlp_problem("plain")
    x, y = p.train
    with pytest.raises(ValueError, match="Unknown curvature"):
        jaxinf.curvature_operator(p.loss_fn, p.params, p.train, kind="newton")
    with pytest.raises(ValueError, match="different leading sizes"):
        jaxinf.curvature_operator(p.loss_fn, p.params, (x, y[:-1]))
    with pytest.raises(ValueError, match="NaN or inf"):
        jaxinf.curvature_operator(p.loss_fn, p.params, (x.at[0, 0].set(jnp.nan), y))
    with pytest.raises(ValueError, match="model_fn"):
        jaxinf.curvature_operator(p.loss_fn, p.params, p.train, kind="gauss_newton")
    with pytest.raises(ValueError, match=">= 0"):
        jaxinf.curvature_operator(p.loss_fn, p.params, p.train, damping=-1.0)
    with pytest.raises(ValueError, match="missing"):
        jaxinf.curvature_operator(p.loss_fn, p.params, p.train, blocks="parameter", damping={"['w1']": 1.0})
    with pytest.raises(ValueError, match="Unknown blocks"):
        jaxinf.curvature_operator(p.loss_fn, p.params, p.train, blocks="layers")
    with pytest.raises(ValueError, match="no batches"):
        jaxinf.curvature_operator(p.loss_fn, p.params, [])
    with pytest.raises(ValueError, match="per-example shape"):
        jaxinf.curvature_operator(p.loss_fn, p.params, [(x[:5], y[:5]), (x[5:, :2], y[5:])])
    op = jaxinf.curvature_operator(p.loss_fn, p.params, p.train)
    with pytest.raises(ValueError, match="tree structure"):
        op.matvec({"w1": p.params["w1"]})
    bad = dict(p.params, w1=jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"v\['w1'\] has shape \(3, 3\)"):
        op.matvec(bad)


# ------------------------------------------------- clear errors (issue 16): named, early, raised by jaxinf


def _linear():
    x = jnp.arange(12.0).reshape(4, 3) / 10
    y = jnp.array([1.0, 2.0, 0.5, 1.5])

    def loss(p, batch):
        return jnp.mean((batch[0] @ p["w"] + p["b"] - batch[1]) ** 2)

    return loss, {"w": jnp.zeros(3), "b": jnp.zeros(())}, (x, y)


def test_empty_batch_is_refused_by_name():
    loss, params, (x, y) = _linear()
    with pytest.raises(ValueError, match=r"data has 0 examples"):
        jaxinf.curvature_operator(loss, params, (x[:0], y[:0]))
    with pytest.raises(ValueError, match=r"data\[batch 1\] has 0 examples"):
        jaxinf.curvature_operator(loss, params, [(x, y), (x[:0], y[:0])])
    with pytest.raises(ValueError, match="0 examples"):  # was ZeroDivisionError
        jaxinf.InfluenceModel(loss, params, jaxinf.direct(), damping=0.1).fit((x[:0], y[:0]))


def test_used_up_generator_is_named_and_a_fresh_one_is_read_once():
    loss, params, (x, y) = _linear()
    gen = ((x[i : i + 2], y[i : i + 2]) for i in range(0, 4, 2))
    op = jaxinf.curvature_operator(loss, params, gen)
    assert op.num_examples == 4
    with pytest.raises(ValueError, match=r"data is an iterator \(generator\).*used up.*list\(data\)"):
        jaxinf.curvature_operator(loss, params, gen)


def test_non_finite_loss_on_finite_data_is_named_at_fit():
    loss, params, (x, y) = _linear()

    def log_loss(p, batch):  # NaN where a label is negative: finite data, non-finite loss
        return jnp.mean((batch[0] @ p["w"] + p["b"] - jnp.log(batch[1])) ** 2)

    bad_y = y.at[3].set(-1.0)
    with pytest.raises(ValueError, match=r"loss_fn\(params, batch\) is nan on data\[batch 1\], first at example 1"):
        jaxinf.curvature_operator(log_loss, params, [(x[:2], y[:2]), (x[2:], bad_y[2:])])
    model = jaxinf.InfluenceModel(log_loss, params, jaxinf.direct(), damping=0.1)
    with pytest.raises(ValueError, match="is nan on data"):  # was a silent matrix of zeros
        model.fit((x, bad_y))


def test_mixed_float32_float64_params_are_refused():
    loss, params, data = _linear()
    mixed = {"w": params["w"].astype(jnp.float32), "b": params["b"]}
    with pytest.raises(ValueError, match=r"mix dtypes \(float64: params\['b'\]; float32: params\['w'\]\)"):
        jaxinf.curvature_operator(loss, mixed, data)
    with pytest.raises(ValueError, match="mix dtypes"):  # was a while_loop carry TypeError inside CG
        jaxinf.InfluenceModel(loss, mixed, jaxinf.cg(), damping=0.1).fit(data)


def test_non_array_params_leaf_is_named():
    loss, params, data = _linear()
    with pytest.raises(ValueError, match=r"params\['name'\] is a str \('dense'\), not an array"):
        jaxinf.curvature_operator(loss, dict(params, name="dense"), data)
    with pytest.raises(ValueError, match=r"params\['name'\] is a str"):  # was "data type 'dense' not understood"
        jaxinf.InfluenceModel(loss, dict(params, name="dense"), jaxinf.direct())


def test_running_statistics_given_as_params_are_refused():
    """BatchNorm's running mean and variance are float leaves that pass every other check, and were differentiated
    as trained parameters: Linen variables with a 'batch_stats' collection, or an NNX state with BatchStat."""
    import flax.linen as nn
    from flax import nnx

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(nn.BatchNorm(use_running_average=True)(x))[:, 0]

    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 2)))
    data = (x, x[:, 0])
    variables = Net().init(jax.random.key(0), x)
    loss = lambda v, b: jnp.mean((Net().apply(v, b[0]) - b[1]) ** 2)  # noqa: E731
    with pytest.raises(ValueError, match=r"Flax Linen collections \['batch_stats'\] beside 'params'"):
        jaxinf.InfluenceModel(loss, variables, jaxinf.direct(), damping=0.1)
    closed = lambda p, b: loss(dict(p, batch_stats=variables["batch_stats"]), b)  # noqa: E731
    jaxinf.curvature_operator(closed, {"params": variables["params"]}, data)  # the params collection alone is fine
    own = {"params": jnp.ones(2), "temperature": jnp.ones(())}  # a dict of arrays, not of collections: trained
    jaxinf.curvature_operator(lambda p, b: jnp.mean((b[0] @ p["params"] * p["temperature"] - b[1]) ** 2), own, data)

    model = nnx.Sequential(nnx.BatchNorm(2, rngs=nnx.Rngs(0)), nnx.Linear(2, 1, rngs=nnx.Rngs(1)))
    model.eval()
    graphdef, state = nnx.split(model)
    with pytest.raises(ValueError, match=r"NNX variables that are not parameters: .*\['mean'\] \(BatchStat\)"):
        jaxinf.curvature_operator(lambda s, b: jnp.mean(nnx.merge(graphdef, s)(b[0]) ** 2), state, data)


def test_a_loss_that_fails_on_the_params_is_named_with_its_cause():
    """Params of another model (a missing leaf, a wrong shape): a ValueError naming the function, cause kept."""
    loss, params, data = _linear()
    model_fn = lambda p, b: b[0] @ p["w"] + p["b"]  # noqa: E731
    output_loss = lambda out, b: jnp.mean((out - b[1]) ** 2)  # noqa: E731
    with pytest.raises(
        ValueError, match=r"loss_fn\(params, batch\) fails on the first batch.*KeyError.*'b'.*structure"
    ) as info:
        jaxinf.InfluenceModel(loss, {"w": params["w"]}, jaxinf.direct()).fit(data)
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(ValueError, match=r"model_fn/output_loss\(params, batch\) fails.*TypeError.*shapes"):
        jaxinf.curvature_operator(
            None, dict(params, w=jnp.zeros(2)), data, kind="gauss_newton", model_fn=model_fn, output_loss=output_loss
        )

    def on_the_host(p, batch):  # NumPy of a traced value: the function itself cannot be traced, the hint says so
        return jnp.mean((batch[0] @ np.asarray(p["w"]) - batch[1]) ** 2)

    with pytest.raises(ValueError, match=r"TracerArrayConversionError.*must be traceable.*NumPy conversion"):
        jaxinf.curvature_operator(on_the_host, params, data)


def test_an_nnx_model_left_in_training_mode_is_named():
    """NNX dropout in training mode bumps its RNG count when called, which JAX refuses inside a trace (eagerly it
    runs): the error says to call model.eval(); in evaluation mode the same split fits."""
    from flax import nnx

    rngs = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Linear(2, 3, rngs=rngs), nnx.Dropout(0.5, rngs=rngs), nnx.Linear(3, 1, rngs=rngs))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 2)))
    data = (x, x[:, 0])

    def split_loss():
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return (lambda p, b: jnp.mean((nnx.merge(graphdef, p, rest)(b[0])[:, 0] - b[1]) ** 2)), params

    loss, params = split_loss()
    with pytest.raises(ValueError, match=r"TraceContextError.*evaluation mode.*model.eval\(\)"):
        jaxinf.curvature_operator(loss, params, data)
    model.eval()
    jaxinf.curvature_operator(*split_loss(), data)


def test_loss_returning_a_vector_is_refused():
    loss, params, data = _linear()

    def per_example(p, batch):
        return (batch[0] @ p["w"] + p["b"] - batch[1]) ** 2

    with pytest.raises(ValueError, match=r"must return a scalar.*returns \(4,\).*jnp.mean"):
        jaxinf.curvature_operator(per_example, params, data)
    with pytest.raises(ValueError, match="must return a scalar"):  # the split loss of Gauss-Newton too
        jaxinf.curvature_operator(
            None,
            params,
            data,
            kind="gauss_newton",
            model_fn=lambda p, b: b[0] @ p["w"] + p["b"],
            output_loss=lambda out, b: (out - b[1]) ** 2,
        )
    with pytest.raises(ValueError, match=r"must return a real float scalar, but returns dtype complex"):
        jaxinf.curvature_operator(lambda p, b: loss(p, b) + 0j, params, data)


@pytest.mark.parametrize("damping", ["0.1", None, 1j, True, {"all": "0.1"}])
def test_damping_must_be_a_real_number(damping):
    loss, params, data = _linear()
    with pytest.raises(ValueError, match=r"damping for block 'all' must be a real number"):
        jaxinf.curvature_operator(loss, params, data, damping=damping)
