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


def test_solvers_are_hashable_static_arguments_with_their_config():
    """Solvers are static arguments of jit (the calculator's kernels): hashable, and carry their factory's arguments."""
    import jax

    solvers = [
        jaxinf.direct(),
        jaxinf.cg(preconditioner=jaxinf.jacobi_preconditioner(4)),
        jaxinf.arnoldi(3),
        jaxinf.nystrom(3),
        jaxinf.lissa(),
        jaxinf.kfac(),
        jaxinf.ekfac(),
    ]
    for solver in solvers:
        assert hash(solver) == hash(solver) and isinstance(solver.config, dict)
        assert jax.jit(lambda x, s: x + 1, static_argnums=1)(1.0, solver) == 2.0
    assert jaxinf.cg(preconditioner=jaxinf.jacobi_preconditioner(4)).config["preconditioner"]["num_samples"] == 4
    assert jaxinf.kfac().config["factory"] == "kfac" and jaxinf.kfac().config["update_diagonal"] is False


def test_every_public_name_has_a_docstring():
    import inspect

    import jaxinf.scale

    missing = []
    for module in (jaxinf, jaxinf.scale):
        for name in module.__all__:
            obj = getattr(module, name)
            if (callable(obj) or inspect.isclass(obj)) and len(inspect.getdoc(obj) or "") < 30:
                missing.append(f"{module.__name__}.{name}")
    assert not missing, missing
