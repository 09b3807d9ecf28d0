"""The wrapper scores a test batch against many training batches with the solver's two-stage score.

``scorer.prepare`` (the test side: projections, completion residuals, K-FAC
factors) runs once per test batch, ``scorer.finish`` once per training batch;
the result equals the one-shot ``score`` on all the data and the generic
factors-then-contraction path.
"""

import jax
import numpy as np
import pytest

import jaxinf
from jaxinf.solvers import compiled
from tests import models

SOLVERS = {
    "arnoldi": lambda: jaxinf.arnoldi(6, krylov_dim=12, completion=True),
    "nystrom": lambda: jaxinf.nystrom(6, completion=True),
    "ekfac": lambda: jaxinf.ekfac(fisher="exact"),
}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_two_stage_equals_one_shot_and_factors(name, monkeypatch):
    p = models.mlp_problem("linen", n_train=23, n_test=7)
    x, y = p.train
    batches = [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]  # ragged last batch
    solver = SOLVERS[name]()
    assert solver.scorer is not None
    model = jaxinf.InfluenceModel(
        None,
        p.params,
        solver,
        damping=1e-2,
        curvature="gauss_newton",
        model_fn=p.model_fn,
        output_loss=p.output_loss,
    ).fit(batches)
    calls, call = [], compiled.call

    def counting(fn, *args):  # the model runs every step through jaxinf.solvers.compiled
        calls.extend([1] if fn is solver.scorer.prepare else [])
        return call(fn, *args)

    counting.lower = call.lower  # the memory plan reads the compiled program's analysis
    monkeypatch.setattr(compiled, "call", counting)
    got = np.asarray(model.influences(p.test, batches))
    assert len(calls) == 1  # one test batch, prepared once for three training batches
    one_shot = np.asarray(jax.jit(solver.score)(model.state, model.operator, p.test, p.train))
    factors = np.asarray(model.influences_from_factors(model.influence_factors(p.test), batches))
    scale = np.abs(one_shot).max()
    np.testing.assert_allclose(got, one_shot, rtol=1e-9, atol=1e-10 * scale)
    np.testing.assert_allclose(got, factors, rtol=1e-8, atol=1e-9 * scale)
