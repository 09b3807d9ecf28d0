"""The public import surface."""

import jaxinf


def test_public_names_are_exported():
    expected = {
        "InfluenceModel",
        "NotFittedError",
        "ConvergenceError",
        "Solver",
        "SolveInfo",
        "CurvatureOperator",
        "curvature_operator",
        "direct",
        "DirectState",
        "Batches",
        "as_batches",
        "CURVATURES",
    }
    assert expected <= set(jaxinf.__all__)
    for name in jaxinf.__all__:
        assert hasattr(jaxinf, name), name


def test_solvers_follow_the_protocol():
    solver = jaxinf.direct()
    assert isinstance(solver, jaxinf.Solver)
    assert callable(solver.init) and callable(solver.solve)
