"""InfluenceModel never out of step with its numbers; fit-time checks of the loss and curvature; clear errors.

Each test here failed on the code before issue 16: a bad damping assigned anyway, new params scored with the old
curvature, a summed loss or time-major data or a zero Gauss-Newton computed through, float32 CG at its defaults
refused, raw errors for mismatched test data or a non-key ``key``, K-FAC's per-layer split of a list of batches
holding the first batch only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf import scale
from jaxinf.core.checks import check_loss
from jaxinf.solvers import kfac as kfac_module
from tests import models


def _model(p, damping=0.1, solver=None, **kw):
    return jaxinf.InfluenceModel(
        p.loss_fn,
        p.params,
        solver or jaxinf.direct(),
        damping=damping,
        curvature="gauss_newton",
        model_fn=p.model_fn,
        output_loss=p.output_loss,
        **kw,
    )


@pytest.fixture(scope="module")
def problem():
    return models.mlp_problem("plain", n_train=12, n_test=3)


# --------------------------------------------------------------------------- damping and blocks


@pytest.mark.parametrize(
    "bad, match",
    [
        (-1.0, "finite and >= 0"),
        (float("nan"), "finite and >= 0"),
        ("0.1", "damping for block 'all' must be a real number"),
        (None, "damping for block 'all' must be a real number"),
        ({"all": 0.1, "typo": 0.2}, "unknown: \\['typo'\\]"),
        ({"all": "x"}, "damping for block 'all' must be a real number"),
        (jnp.ones(2), "must be a scalar"),
    ],
)
def test_bad_damping_is_refused_at_construction_and_on_assignment(problem, bad, match):
    with pytest.raises(ValueError, match=match):
        _model(problem, damping=bad)
    model = _model(problem).fit(problem.train)
    before = np.asarray(model.influences(problem.test, problem.train))
    with pytest.raises(ValueError, match=match):
        model.damping = bad
    assert model.damping == 0.1  # the attribute still says what the results use
    np.testing.assert_array_equal(model.influences(problem.test, problem.train), before)


def test_bad_blocks_are_refused_at_construction(problem):
    with pytest.raises(ValueError, match="Unknown blocks='layers'"):
        _model(problem, blocks="layers")
    with pytest.raises(ValueError, match="blocks must be a pytree of labels with the structure of the params"):
        _model(problem, blocks={"w1": "a"})
    with pytest.raises(ValueError, match="missing"):  # per-block damping must name the blocks of `blocks`
        _model(problem, blocks="parameter", damping={"['w1']": 0.1})


# --------------------------------------------------------------------------- params


def test_assigning_params_refits_on_the_data_of_the_fit(problem):
    new = jax.tree.map(lambda a: a * 1.3 + 0.05, problem.params)
    model = _model(problem).fit(problem.train)
    model.params = new
    fresh = _model(problem._replace(params=new)).fit(problem.train)
    np.testing.assert_allclose(
        model.influences(problem.test, problem.train), fresh.influences(problem.test, problem.train), rtol=1e-12
    )
    with pytest.raises(ValueError, match="params: the new params have another layout"):
        model.params = {k: v for k, v in new.items() if k != "b2"}
    with pytest.raises(ValueError, match=r"params\['w1'\] contains 1 NaN"):
        model.params = dict(new, w1=new["w1"].at[0, 0].set(jnp.nan))
    assert model.params is new  # refused assignments leave params and state as they were


def test_assigning_params_refits_a_streamed_model_from_its_stream(problem):
    new = jax.tree.map(lambda a: a * 0.7, problem.params)
    source = scale.ArraySource(jax.tree.map(np.asarray, problem.train), 5)
    model = scale.fit_from_stream(_model(problem), source, progress=False)
    model.params = new
    fresh = _model(problem._replace(params=new)).fit(problem.train)
    np.testing.assert_allclose(
        model.influences(problem.test, problem.train), fresh.influences(problem.test, problem.train), rtol=1e-10
    )


# --------------------------------------------------------------------------- the loss


def test_a_loss_that_sums_is_refused_at_fit(problem):
    def summed(p, batch):
        return 0.5 * jnp.sum((problem.model_fn(p, batch) - batch[1]) ** 2)

    def summed_plus_l2(p, batch):
        return summed(p, batch) + 0.01 * sum(jnp.sum(a**2) for a in jax.tree.leaves(p))

    def mean_plus_l2(p, batch):
        return problem.loss_fn(p, batch) + 0.01 * sum(jnp.sum(a**2) for a in jax.tree.leaves(p))

    for loss in (summed, summed_plus_l2):
        model = jaxinf.InfluenceModel(loss, problem.params, jaxinf.direct(), damping=0.1)
        with pytest.raises(ValueError, match="loss_fn sums over the examples.*jnp.mean instead of jnp.sum"):
            model.fit(problem.train)
        assert not model.is_fitted
    check_loss(mean_plus_l2, problem.params, [problem.train])  # a regulariser on a mean loss passes

    def summed_output(outputs, batch):
        return 0.5 * jnp.sum((outputs - batch[1]) ** 2)

    model = _model(problem._replace(output_loss=summed_output))  # the split sums, the given loss_fn averages
    with pytest.raises(ValueError, match=r"output_loss\(model_fn\(params, batch\), batch\) sums"):
        model.fit(problem.train)


def test_time_major_data_is_refused_at_fit():
    t, b, d = 5, 8, 3
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (t, b, d))  # time-major: axis 0 is time, not examples
    y = jax.random.normal(ky, (t, b))
    params = {"w": jax.random.normal(kp, (d, 4)) / 2, "u": jnp.eye(4) / 2, "v": jnp.ones(4)}

    def loss(p, batch):
        xs, ys = batch

        def step(h, xt):
            h = jnp.tanh(xt @ p["w"] + h @ p["u"])
            return h, h @ p["v"]

        _, out = jax.lax.scan(step, jnp.zeros((xs.shape[1], 4)), xs)
        return jnp.mean((out - ys) ** 2)

    model = jaxinf.InfluenceModel(loss, params, jaxinf.direct(), damping=0.1)
    with pytest.raises(ValueError, match=r"not the mean of per-example losses over the leading axis.*time-major"):
        model.fit((x, y))
    batch_major = (jnp.swapaxes(x, 0, 1), y.T)

    def loss_batch_major(p, batch):
        return loss(p, (jnp.swapaxes(batch[0], 0, 1), batch[1].T))

    check_loss(loss_batch_major, params, [batch_major])


def test_check_loss_refuses_a_vector_or_nan_and_skips_batches_of_one(problem):
    def per_example(p, batch):
        return jnp.sum((problem.model_fn(p, batch) - batch[1]) ** 2, axis=-1)

    with pytest.raises(ValueError, match=r"must return the mean loss over the batch, a float scalar.*shape \(12,\)"):
        check_loss(per_example, problem.params, [problem.train])

    def log_of_zero(p, batch):
        return problem.loss_fn(p, batch) + jnp.log(0.0 * p["b1"][0])

    with pytest.raises(ValueError, match="log_of_zero is NaN or inf on the first 12 examples of training batch 1"):
        check_loss(
            log_of_zero,
            problem.params,
            [jax.tree.map(lambda a: a[:1], problem.train), problem.train],
            name="log_of_zero",
        )
    check_loss(
        lambda p, b: 3 * problem.loss_fn(p, b) * b[0].shape[0],
        problem.params,
        [jax.tree.map(lambda a: a[:1], problem.test)],
    )


# --------------------------------------------------------------------------- the curvature


def test_a_gauss_newton_split_linear_in_the_outputs_is_refused_at_fit():
    p = models.logistic_problem()

    def log_probs(q, batch):
        return jax.nn.log_softmax(p.model_fn(q, batch))

    def nll(outputs, batch):  # linear in the outputs: H_out = 0
        return -jnp.mean(jnp.take_along_axis(outputs, batch[1][:, None], axis=1))

    for solver in (jaxinf.direct(), jaxinf.cg(), jaxinf.ekfac(fisher="exact")):
        model = jaxinf.InfluenceModel(
            None, p.params, solver, damping=0.1, curvature="gauss_newton", model_fn=log_probs, output_loss=nll
        )
        with pytest.raises(ValueError, match=r"gauss_newton curvature of the split model_fn=.*log_probs.*nll.*zero"):
            model.fit(p.train)
        with pytest.raises(ValueError, match="softmax cross-entropy"):
            model.fit(p.train)
    # the same model on logits with softmax cross-entropy fits
    _model(p, solver=jaxinf.direct()).fit(p.train)


def test_a_curvature_with_nan_is_refused_at_fit(problem):
    def sqrt_at_zero(p, batch):  # finite loss, NaN second derivative at 0
        return problem.loss_fn(p, batch) + jnp.sqrt(jnp.sum(p["b1"] ** 2))

    model = jaxinf.InfluenceModel(sqrt_at_zero, problem.params, jaxinf.direct(), damping=0.1)
    with pytest.raises(ValueError, match="hessian curvature of loss_fn=.*sqrt_at_zero gives NaN or inf products"):
        model.fit(problem.train)


# --------------------------------------------------------------------------- CG in float32 at its defaults


def test_float32_cg_at_its_defaults_converges_and_matches_direct():
    p = models.mlp_problem("plain", dtype=jnp.float32, n_train=23, hidden=16)
    got = _model(p, damping=1e-2, solver=jaxinf.cg()).fit(p.train).influences(p.test, p.train)
    ref = _model(p, damping=1e-2).fit(p.train).influences(p.test, p.train)
    assert got.dtype == jnp.float32
    assert float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)) < 1e-3
    got_block = _model(p, damping=1e-2, solver=jaxinf.cg(block=True)).fit(p.train).influences(p.test, p.train)
    assert float(jnp.linalg.norm(got_block - ref) / jnp.linalg.norm(ref)) < 1e-3


# --------------------------------------------------------------------------- clear errors


def test_test_data_of_another_per_example_shape_is_named(problem):
    model = _model(problem).fit(problem.train)
    x, y = problem.test
    with pytest.raises(ValueError, match=r"test_data\[0\] has per-example shape \(3,\).*training batches have \(4,\)"):
        model.influences((x[:, :3], y), problem.train)
    with pytest.raises(ValueError, match=r"train_data\[batch 0\]\[1\] has per-example shape \(2, 1\)"):
        model.influences(problem.test, [(x, y[..., None])] * 2)
    with pytest.raises(ValueError, match=r"data\[0\] has per-example shape"):
        model.self_influence((x[:, :3], y))


@pytest.mark.parametrize("key", [0, 1.5, jnp.zeros(2), jax.random.split(jax.random.key(0), 2), "key"])
def test_a_key_that_is_not_one_prng_key_is_named(problem, key):
    with pytest.raises(ValueError, match="key must be"):
        _model(problem).fit(problem.train, key=key)


def test_legacy_and_typed_keys_are_accepted(problem):
    _model(problem).fit(problem.train, key=jax.random.PRNGKey(1))
    _model(problem).fit(problem.train, key=jax.random.key(1))


# --------------------------------------------------------------------------- K-FAC per-layer split of many batches


def test_kfac_influences_by_layer_iterates_over_batches():
    p = models.mlp_problem("plain", n_train=14, n_test=5)
    model = _model(p, damping=0.01, solver=jaxinf.ekfac(fisher="exact")).fit(p.train)
    split = lambda data, at: [jax.tree.map(lambda a: a[:at], data), jax.tree.map(lambda a: a[at:], data)]  # noqa: E731
    parts = kfac_module.influences_by_layer(model.state, model.operator, split(p.test, 2), split(p.train, 9))
    whole = model.influences(p.test, p.train)
    assert all(v.shape == (5, 14) for v in parts.values())
    np.testing.assert_allclose(sum(parts.values()), whole, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        kfac_module.score(model.state, model.operator, split(p.test, 3), split(p.train, 4)), whole, rtol=1e-10
    )
    with pytest.raises(ValueError, match="test_batch must be one batch"):
        kfac_module.prepare_scores(model.state, model.operator, split(p.test, 2))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_factors_raise_even_when_the_solver_says_converged(bad):
    """``check_solve`` reads the factors of every leaf (one compiled check): a NaN/inf in any leaf raises."""
    from jaxinf.solvers.base import check_solve, make_info

    solver = jaxinf.cg()
    info = make_info(jnp.ones(2), jnp.zeros(2), jnp.ones(2, bool))
    fine = {"w": jnp.ones((2, 3)), "b": jnp.zeros((2,))}
    check_solve(solver, info, fine, "test points")  # finite: nothing raised
    broken = {"w": jnp.ones((2, 3)).at[1, 2].set(bad), "b": jnp.zeros((2,))}  # in the last leaf ("b" < "w")
    with pytest.raises(jaxinf.ConvergenceError, match="cg returned NaN or inf influence factors"):
        check_solve(solver, info, broken, "test points")


def test_non_finite_factors_raise_through_the_flag_computed_with_the_solve():
    """The model's solve program also returns whether every factor is finite (no program of its own): a solver
    that claims convergence but returns NaN factors still raises, and so does a False flag given to check_solve."""
    from jaxinf.solvers.base import Solver, check_solve, make_info

    def init(operator, *, key=None):
        return operator

    def solve(state, v):  # "converged" in one iteration, with NaN in one entry of one leaf
        leaves, treedef = jax.tree.flatten(v)
        leaves[-1] = leaves[-1].at[(0,) * leaves[-1].ndim].set(jnp.nan)
        return jax.tree.unflatten(treedef, leaves), make_info(1, 0.0, True)

    p = models.mlp_problem("plain", n_train=12, n_test=3)
    model = jaxinf.InfluenceModel(p.loss_fn, p.params, Solver(init=init, solve=solve, name="nan_solver"), damping=0.1)
    model.fit(p.train)
    with pytest.raises(jaxinf.ConvergenceError, match="nan_solver returned NaN or inf influence factors"):
        model.influence_factors(p.test)
    info = make_info(jnp.ones(2), jnp.zeros(2), jnp.ones(2, bool))
    check_solve(jaxinf.cg(), info, jnp.bool_(True), "test points")
    with pytest.raises(jaxinf.ConvergenceError, match="cg returned NaN or inf influence factors"):
        check_solve(jaxinf.cg(), info, jnp.bool_(False), "test points")


def test_factors_given_by_the_user_are_checked_and_cast(problem):
    """``influences_from_factors`` takes factors from outside (a file, another run): NaN/inf raise naming the leaf
    and row; float32 factors of a float64 model are cast (they failed inside jax.jvp); complex factors raise."""
    model = _model(problem).fit(problem.train)
    factors = model.influence_factors(problem.test)
    want = np.asarray(model.influences_from_factors(factors, problem.train))
    narrow = jax.tree.map(lambda f: f.astype(jnp.float32), factors)
    got = model.influences_from_factors(narrow, problem.train)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    leaves, treedef = jax.tree.flatten(factors)
    leaves[-1] = leaves[-1].at[1].set(jnp.nan)
    with pytest.raises(ValueError, match=r"factors\[.*contains .* NaN or inf value\(s\) \(example 1 first"):
        model.influences_from_factors(jax.tree.unflatten(treedef, leaves), problem.train)
    with pytest.raises(ValueError, match="complex128; real float factors are needed"):
        model.influences_from_factors(jax.tree.map(lambda f: f + 0j, factors), problem.train)


def test_a_loader_refilling_one_buffer_and_params_changed_in_place_change_nothing(problem):
    """A loader that refills one NumPy buffer for every batch (yielding views of it) used to leave every batch
    read into a list holding the last one: a silently wrong fit and wrong columns. Params given as NumPy arrays
    and changed in place after the fit changed CG's later solves. Both are copied as they are read."""
    x, y = (np.asarray(a) for a in problem.train)
    sizes = [5, 5, 2]
    starts = np.cumsum([0, *sizes])
    given = [(x[s:e], y[s:e]) for s, e in zip(starts[:-1], starts[1:])]

    def refilling():
        bx, by = np.empty((5, *x.shape[1:]), x.dtype), np.empty((5, *y.shape[1:]), y.dtype)
        for s, e in zip(starts[:-1], starts[1:]):
            bx[: e - s], by[: e - s] = x[s:e], y[s:e]
            yield bx[: e - s], by[: e - s]

    want = _model(problem).fit(given).influences(problem.test, given)
    got = _model(problem).fit(refilling()).influences(problem.test, refilling())
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    for a, b in zip(scale.as_source(refilling()).batches(), given):
        np.testing.assert_array_equal(a[0], b[0])

    params = jax.tree.map(np.array, problem.params)  # writeable NumPy copies of the user's
    model = _model(problem, solver=jaxinf.cg(rtol=1e-12))
    model.params = params  # unfitted: only checked and copied
    model.fit(given)
    before = np.asarray(model.influences(problem.test, given))
    for leaf in jax.tree.leaves(params):
        leaf *= 0.0
    np.testing.assert_array_equal(model.influences(problem.test, given), before)
    with pytest.raises(ValueError, match="read-only"):
        jax.tree.leaves(model.params)[0][...] = 0.0
