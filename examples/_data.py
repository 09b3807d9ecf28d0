"""The small data set every example uses: scikit-learn's digits (shipped with the package, no download)."""

import numpy as np
from sklearn.datasets import load_digits


def digits(n_train: int = 300, n_test: int = 20, seed: int = 0):
    """``(x_train, y_train), (x_test, y_test)`` as float32 pixels in [0, 1] (8x8 images, flattened) and int labels."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))[: n_train + n_test]
    x, y = (x[order] / 16.0).astype(np.float32), y[order].astype(np.int32)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])
