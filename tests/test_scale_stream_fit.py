"""Solvers fitted from a stream (jaxinf.scale.fit_from_stream) equal ``init`` on the same batches in memory."""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf import scale
from jaxinf.core.data import add_example_axis
from tests import models

BATCH = 5  # 23 examples: batches of 5, 5, 5, 5 and a ragged 3


def batches_of(data, size=BATCH):
    n = np.shape(jax.tree.leaves(data)[0])[0]
    return [jax.tree.map(lambda a, i=i: np.asarray(a[i : i + size]), data) for i in range(0, n, size)]


def array_source(data, size=BATCH):
    return scale.ArraySource(jax.tree.map(np.asarray, data), size)


def iterable_source(data, size=BATCH):
    n = np.shape(jax.tree.leaves(data)[0])[0]
    return scale.IterableSource(lambda: (b for b in batches_of(data, size)), num_examples=n, batch_size=size)


SOURCES = {"array": array_source, "iterable": iterable_source}


def in_memory(solver, problem, *, kind, damping, key=None, size=BATCH, loss=True):
    operator = jaxinf.curvature_operator(
        problem.loss_fn if loss else None,
        problem.params,
        jaxinf.as_batches(batches_of(problem.train, size)),
        kind=kind,
        damping=damping,
        model_fn=problem.model_fn,
        output_loss=problem.output_loss,
    )
    return solver.init(operator, key=key)


def streamed(solver, problem, source, *, kind, damping, key=None, mesh=None, loss=True):
    return scale.fit_from_stream(
        solver,
        problem.loss_fn if loss else None,
        problem.params,
        source,
        kind=kind,
        damping=damping,
        model_fn=problem.model_fn,
        output_loss=problem.output_loss,
        key=key,
        mesh=mesh,
        progress=False,
    )


def gradients(problem):
    return jax.vmap(lambda ex: jax.grad(problem.loss_fn)(problem.params, add_example_axis(ex)))(problem.test)


def assert_close(got, expected, rtol, atol_scale=None):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale_ = np.abs(b).max(initial=0.0) if atol_scale is None else atol_scale
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale_)


def assert_same_solves(solver, got, expected, problem, rtol):
    rhs = gradients(problem)
    x1, info1 = jax.jit(jax.vmap(solver.solve, in_axes=(None, 0)))(got, rhs)
    x2, _ = jax.jit(jax.vmap(solver.solve, in_axes=(None, 0)))(expected, rhs)
    assert bool(np.all(info1.converged))
    assert_close(x1, x2, rtol)


# ----------------------------------------------------------------------------
# K-FAC / EK-FAC
# ----------------------------------------------------------------------------

KFAC_CASES = {
    # name: (problem builder, fisher, likelihood, curvature kind, update_diagonal, source)
    "ekfac-empirical-linen": (lambda: models.mlp_problem("linen"), "empirical", None, "hessian", True, "array"),
    "kfac-exact-plain": (lambda: models.mlp_problem("plain"), "exact", None, "gauss_newton", False, "iterable"),
    "ekfac-sampled-categorical": (models.logistic_problem, "sampled", "categorical", "gauss_newton", True, "array"),
}


def compare_kfac(got, expected, rtol=1e-10):
    assert got.tags.rows() == expected.tags.rows()
    for field in ("factors_a", "factors_g", "eigvals", "damping", "fallback_vals", "fallback_damping"):
        assert_close(getattr(got, field), getattr(expected, field), rtol)


@pytest.mark.parametrize("case", list(KFAC_CASES))
def test_kfac_from_stream_equals_init(case):
    build, fisher, likelihood, kind, update_diagonal, source = KFAC_CASES[case]
    problem = build()
    samples = 2 if fisher == "sampled" else 1  # num_samples without sampling raises (an option with no effect)
    solver = jaxinf.ekfac(update_diagonal=update_diagonal, fisher=fisher, likelihood=likelihood, num_samples=samples)
    key = jax.random.key(3)  # not the default: the streamed fit must draw with it, per example
    expected = in_memory(solver, problem, kind=kind, damping=0.0, key=key)
    got = streamed(solver, problem, SOURCES[source](problem.train), kind=kind, damping=0.0, key=key)
    assert solver.name == case.split("-")[0]
    compare_kfac(got, expected)
    assert_same_solves(solver, got, expected, problem, 1e-9)


def test_ekfac_gauss_newton_operator_without_loss_fn():
    problem = models.logistic_problem(n_train=23, l2=0.1)
    solver = jaxinf.ekfac(fisher="exact")
    expected = in_memory(solver, problem, kind="gauss_newton", damping=0.05, loss=False)
    got = streamed(solver, problem, iterable_source(problem.train), kind="gauss_newton", damping=0.05, loss=False)
    compare_kfac(got, expected)
    assert_same_solves(solver, got, expected, problem, 1e-10)


@pytest.mark.parametrize("devices", [1, 8])
def test_ekfac_example_chunks(monkeypatch, devices):
    """Pass 2 forms its per-example temporaries a few examples at a time: same state as one chunk."""
    problem = models.mlp_problem("linen", n_train=19)
    solver = jaxinf.ekfac(fisher="sampled", likelihood="categorical")
    key = jax.random.key(4)
    mesh = scale.data_mesh() if devices > 1 else None
    expected = in_memory(solver, problem, kind="gauss_newton", damping=0.0, key=key, size=8)  # 8, 8, 3: one chunk
    monkeypatch.setattr(sys.modules["jaxinf.solvers.kfac"], "EXAMPLE_CHUNK", 3)  # 8 = 2 parts of 3 + a tail of 2
    got = streamed(
        solver, problem, array_source(problem.train, 8), kind="gauss_newton", damping=0.0, key=key, mesh=mesh
    )
    compare_kfac(got, expected)


# ----------------------------------------------------------------------------
# Low rank and direct
# ----------------------------------------------------------------------------


def lowrank_problem():
    return models.mlp_problem("plain")  # p = 44


@pytest.mark.parametrize("source", ["iterable"])
def test_nystrom_rank_below_p(source):
    problem = lowrank_problem()
    solver = jaxinf.nystrom(10)
    key = jax.random.key(5)
    expected = in_memory(solver, problem, kind="gauss_newton", damping=0.1, key=key)
    got = streamed(solver, problem, SOURCES[source](problem.train), kind="gauss_newton", damping=0.1, key=key)
    assert got.products == expected.products == 10
    assert_close(got.eigvals, expected.eigvals, 1e-9)
    assert_same_solves(solver, got, expected, problem, 1e-8)


def test_nystrom_full_rank_is_exact():
    problem = models.logistic_problem(n_train=23)  # p = 12, rank(C) <= 12
    solver = jaxinf.nystrom(12)
    got = streamed(solver, problem, array_source(problem.train), kind="gauss_newton", damping=0.1)
    expected = in_memory(solver, problem, kind="gauss_newton", damping=0.1)
    assert_close(got.eigvals, expected.eigvals, 1e-9)
    assert_same_solves(solver, got, expected, problem, 1e-8)
    exact = in_memory(jaxinf.direct(), problem, kind="gauss_newton", damping=0.1)
    rhs = gradients(problem)
    x1, _ = jax.vmap(solver.solve, in_axes=(None, 0))(got, rhs)
    x2, _ = jax.vmap(jaxinf.direct().solve, in_axes=(None, 0))(exact, rhs)
    assert_close(x1, x2, 1e-8)


@pytest.mark.parametrize("source", list(SOURCES))
def test_arnoldi(source):
    problem = lowrank_problem()
    solver = jaxinf.arnoldi(8, krylov_dim=16)
    key = jax.random.key(7)
    expected = in_memory(solver, problem, kind="gauss_newton", damping=0.1, key=key)
    got = streamed(solver, problem, SOURCES[source](problem.train), kind="gauss_newton", damping=0.1, key=key)
    assert_close(got.raw_eigvals, expected.raw_eigvals, 1e-8)
    assert_close(got.extras["ritz_residuals"], expected.extras["ritz_residuals"], 1e-6, atol_scale=1.0)
    assert_same_solves(solver, got, expected, problem, 1e-7)


def test_direct():
    problem = lowrank_problem()
    solver = jaxinf.direct()
    got = streamed(solver, problem, iterable_source(problem.train), kind="gauss_newton", damping=0.05)
    expected = in_memory(solver, problem, kind="gauss_newton", damping=0.05)
    assert_close(got.eigvals, expected.eigvals, 1e-10)
    assert_same_solves(solver, got, expected, problem, 1e-9)
    # the solver's own memory budget applies to its streamed fit, before any pass over the data
    with pytest.raises(ValueError, match="GiB for the dense curvature"):
        streamed(
            jaxinf.direct(max_memory=1000), problem, iterable_source(problem.train), kind="gauss_newton", damping=0.05
        )


# ----------------------------------------------------------------------------
# Mesh, wrapper, float32
# ----------------------------------------------------------------------------


def test_eight_devices_equal_one():
    mesh = scale.data_mesh()
    assert mesh.size == 8
    problem = models.mlp_problem("linen", n_train=19, n_test=3)  # batches of 8, 8 (sharded) and 3 (replicated)
    solver = jaxinf.ekfac(fisher="sampled", likelihood="categorical")  # the two outputs read as logits
    key = jax.random.key(11)
    source = array_source(problem.train, 8)
    one = streamed(solver, problem, source, kind="gauss_newton", damping=0.0, key=key)
    many = streamed(solver, problem, source, kind="gauss_newton", damping=0.0, key=key, mesh=mesh)
    compare_kfac(many, one, 1e-10)
    assert_same_solves(solver, many, one, problem, 1e-9)
    nys = jaxinf.nystrom(6)
    one = streamed(nys, problem, source, kind="gauss_newton", damping=0.1, key=key)
    many = streamed(nys, problem, source, kind="gauss_newton", damping=0.1, key=key, mesh=mesh)
    assert_close(many.eigvals, one.eigvals, 1e-10)
    assert_same_solves(nys, many, one, problem, 1e-9)


def gauss_newton_model(problem, solver, damping=0.05):
    return jaxinf.InfluenceModel(
        problem.loss_fn,
        problem.params,
        solver,
        damping=damping,
        curvature="gauss_newton",
        model_fn=problem.model_fn,
        output_loss=problem.output_loss,
    )


def test_state_scores_through_the_calculator(tmp_path):
    problem = models.logistic_problem(n_train=23, n_test=4)
    solver = jaxinf.ekfac(fisher="sampled", likelihood="categorical")
    model = gauss_newton_model(problem, solver).fit(batches_of(problem.train))
    reference = np.asarray(model.influences(problem.test, problem.train))
    state = streamed(solver, problem, array_source(problem.train), kind="gauss_newton", damping=0.05)
    fresh = jaxinf.InfluenceModel(problem.loss_fn, problem.params, solver, damping=0.05)  # never fitted
    out = scale.compute_influences(fresh, problem.test, array_source(problem.train), tmp_path / "s", state=state)
    np.testing.assert_allclose(out[:], reference, rtol=1e-9, atol=1e-10 * np.abs(reference).max())


@pytest.mark.parametrize("name", ["nystrom", "ekfac"])
def test_influence_model_fit_from_stream(name):
    """scale.fit_from_stream(model, ...) equals model.fit on the same batches; a new damping streams again."""
    problem = models.logistic_problem(n_train=23, n_test=4)
    solver = {"nystrom": lambda: jaxinf.nystrom(5), "ekfac": lambda: jaxinf.ekfac(fisher="exact")}[name]()
    key = jax.random.key(3)
    in_memory_model = gauss_newton_model(problem, solver).fit(batches_of(problem.train), key=key)
    stream_model = scale.fit_from_stream(
        gauss_newton_model(problem, solver), array_source(problem.train), key=key, progress=False
    )
    assert stream_model.n_train == 23
    reference = np.asarray(in_memory_model.influences(problem.test, problem.train))
    got = np.asarray(stream_model.influences(problem.test, batches_of(problem.train)))
    np.testing.assert_allclose(got, reference, rtol=1e-9, atol=1e-10 * np.abs(reference).max())
    in_memory_model.damping = 0.2
    stream_model.damping = 0.2  # refits from the whole stream, not from the one batch the operator holds
    reference = np.asarray(in_memory_model.influences(problem.test, problem.train))
    got = np.asarray(stream_model.influences(problem.test, problem.train))
    np.testing.assert_allclose(got, reference, rtol=1e-9, atol=1e-10 * np.abs(reference).max())


def test_float32():
    p32 = models.mlp_problem("plain", dtype=jnp.float32)
    p64 = models.mlp_problem("plain")
    solver = jaxinf.ekfac(fisher="exact")
    got = streamed(solver, p32, array_source(p32.train), kind="gauss_newton", damping=0.0)
    assert got.eigvals[0].dtype == jnp.float32
    compare_kfac(got, in_memory(solver, p32, kind="gauss_newton", damping=0.0), 1e-5)
    compare_kfac(got, in_memory(solver, p64, kind="gauss_newton", damping=0.0), 1e-4)


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    return models.mlp_problem("plain", n_train=12)


@pytest.mark.parametrize(
    "solver, match",
    [(jaxinf.cg(), "cg\\(\\) runs its iterations"), (jaxinf.lissa(), "lissa\\(\\) samples minibatches")],
)
def test_iterative_solvers_refused(small, solver, match):
    with pytest.raises(ValueError, match=match + ".*in-memory subset.*shard_operator.*kfac or ekfac"):
        streamed(solver, small, array_source(small.train), kind="hessian", damping=0.1)


def test_bad_input(small):
    solver = jaxinf.ekfac()
    with pytest.raises(TypeError, match="needs a jaxinf Solver"):
        scale.fit_from_stream("ekfac", small.loss_fn, small.params, array_source(small.train))
    wrong = {k: v for k, v in small.params.items() if k != "b2"}
    with pytest.raises(ValueError, match="loss_fn\\(params, batch\\) fails on the first batch.*structure"):
        scale.fit_from_stream(solver, small.loss_fn, wrong, array_source(small.train), progress=False)
    empty = scale.ArraySource(jax.tree.map(np.asarray, small.train), 4, stop=0)
    for s in (jaxinf.direct(), solver):
        with pytest.raises(ValueError, match="holds no examples"):
            scale.fit_from_stream(s, small.loss_fn, small.params, empty, progress=False)
    x, y = (np.array(a) for a in small.train)
    x[9, 1] = np.nan  # batch 2 of batches of 4
    for s in (jaxinf.direct(), solver, jaxinf.nystrom(4), jaxinf.arnoldi(2, krylov_dim=4)):
        with pytest.raises(ValueError, match="data\\[batch 2\\].*NaN"):
            scale.fit_from_stream(s, small.loss_fn, small.params, scale.ArraySource((x, y), 4), damping=0.1)
    x[0, 0] = np.inf
    with pytest.raises(ValueError, match="data\\[batch 0\\].*NaN or inf"):
        scale.fit_from_stream(solver, small.loss_fn, small.params, scale.ArraySource((x, y), 4), progress=False)


def test_benchmark_smoke(tmp_path, monkeypatch):
    bench_dir = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
    monkeypatch.syspath_prepend(bench_dir)
    spec = importlib.util.spec_from_file_location("bench_stream_fit", os.path.join(bench_dir, "bench_stream_fit.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import common

    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    rows = bench.main("--inline --sizes 300 --batch 128 --widths 4 --fit-n 64 --train-steps 1".split())
    assert [r["mode"] for r in rows] == ["stream", "memory"]
    assert all(r["N"] == 300 and r["fit_s"] > 0 and r["max_rel_diff"] < 1e-5 for r in rows)
    assert (tmp_path / "stream_fit.json").exists()


def test_fit_time_checks_run_on_the_first_batch(small):
    """A summing loss and a zero Gauss-Newton (log_softmax + NLL) raise what model.fit raises, before any pass."""

    def summed(p, batch):
        return 0.5 * jnp.sum((small.model_fn(p, batch) - batch[1]) ** 2)

    solver = jaxinf.ekfac(fisher="exact")
    expected = "loss_fn sums over the examples.*jnp.mean instead of jnp.sum"
    with pytest.raises(ValueError, match=expected):
        jaxinf.InfluenceModel(summed, small.params, solver, damping=0.1).fit(small.train)
    with pytest.raises(ValueError, match=expected):  # functional form
        scale.fit_from_stream(solver, summed, small.params, array_source(small.train), damping=0.1, progress=False)
    with pytest.raises(ValueError, match=expected):  # model form
        scale.fit_from_stream(jaxinf.InfluenceModel(summed, small.params, solver, damping=0.1), small.train)

    p = models.logistic_problem(n_train=12)

    def log_probs(q, batch):
        return jax.nn.log_softmax(p.model_fn(q, batch))

    def nll(outputs, batch):  # linear in the outputs: a Gauss-Newton of exactly zero
        return -jnp.mean(jnp.take_along_axis(outputs, batch[1][:, None], axis=1))

    def zero_gn_model():
        return jaxinf.InfluenceModel(
            None, p.params, solver, damping=0.1, curvature="gauss_newton", model_fn=log_probs, output_loss=nll
        )

    zero = r"gauss_newton curvature of the split model_fn=.*log_probs.*nll.*exactly zero.*softmax cross-entropy"
    with pytest.raises(ValueError, match=zero):
        zero_gn_model().fit(p.train)
    iterable = iterable_source(p.train, 4)
    with pytest.raises(ValueError, match=zero):
        scale.fit_from_stream(zero_gn_model(), iterable, progress=False)
    with pytest.raises(ValueError, match=zero):
        scale.fit_from_stream(
            solver,
            None,
            p.params,
            iterable,
            kind="gauss_newton",
            damping=0.1,
            model_fn=log_probs,
            output_loss=nll,
            progress=False,
        )
