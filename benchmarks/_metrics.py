"""Agreement of an influence matrix with the exact one: correlations and ranking metrics.

Users act on rankings (the most helpful or harmful training examples of a
test point), so next to Pearson's correlation the suite reports

* :func:`spearman`: the rank correlation of all entries (ties get their
  average rank);
* :func:`topk_overlap`: per test point (row), the fraction of the ``k``
  training examples with the largest influence that the exact influence also
  puts in its top ``k``, averaged over test points (``k`` capped at the
  number of training examples).

Imports only NumPy and SciPy, so any benchmark (or a notebook) can use it.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def pearson(a, b) -> float:
    """Pearson correlation of the entries of two arrays of the same size."""
    return float(np.corrcoef(np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64)))[0, 1])


def spearman(a, b) -> float:
    """Spearman rank correlation of the entries of two arrays of the same size (average ranks for ties)."""
    ra = stats.rankdata(np.ravel(np.asarray(a, np.float64)))
    rb = stats.rankdata(np.ravel(np.asarray(b, np.float64)))
    return float(np.corrcoef(ra, rb)[0, 1])


def topk_overlap(got, exact, k: int, *, largest: bool = True) -> float:
    """Mean over rows of ``|top_k(got_i) ∩ top_k(exact_i)| / k`` for ``(n_test, n_train)`` matrices.

    ``largest=False`` compares the ``k`` smallest (most negative) entries instead.
    ``k`` is capped at ``n_train`` (then the overlap is 1).

    Examples:
      >>> topk_overlap([[3.0, 2.0, 1.0, 0.0]], [[3.0, 1.0, 2.0, 0.0]], 2)
      0.5
    """
    got = np.atleast_2d(np.asarray(got, np.float64))
    exact = np.atleast_2d(np.asarray(exact, np.float64))
    if got.shape != exact.shape:
        raise ValueError(f"shapes differ: {got.shape} and {exact.shape}")
    k = int(min(k, got.shape[1]))
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sign = -1.0 if largest else 1.0
    top_got = np.argsort(sign * got, axis=1, kind="stable")[:, :k]
    top_exact = np.argsort(sign * exact, axis=1, kind="stable")[:, :k]
    shared = [len(np.intersect1d(a, b)) for a, b in zip(top_got, top_exact)]
    return float(np.mean(shared) / k)


def agreement(got, exact, ks: tuple[int, ...] = (10, 100)) -> dict:
    """``{"pearson", "spearman", "top{k}"...}`` of ``got`` against ``exact`` (``top{k}``: :func:`topk_overlap`)."""
    out = {"pearson": pearson(got, exact), "spearman": spearman(got, exact)}
    for k in ks:
        out[f"top{k}"] = topk_overlap(got, exact, k)
    return out


__all__ = ["agreement", "pearson", "spearman", "topk_overlap"]
