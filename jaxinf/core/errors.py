"""Exceptions jaxinf raises for numerical trouble and misuse (besides ``ValueError`` for bad input)."""


class NotFittedError(RuntimeError):
    """An influence was asked of an :class:`jaxinf.InfluenceModel` before ``fit``."""


class ConvergenceError(RuntimeError):
    """An iterative solve did not converge or diverged (strict mode), or returned NaN/inf."""


__all__ = ["ConvergenceError", "NotFittedError"]
