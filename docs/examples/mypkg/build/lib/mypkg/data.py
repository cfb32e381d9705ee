"""A dataset plug-in: a callable of no arguments returning the four arrays (or a sim.data.Dataset)."""

import numpy as np


def blobs():
    """Synthetic 28x28 grayscale images of one bright blob; the class is which of 10 places it sits in."""
    rng = np.random.default_rng(0)
    n = 1200
    y = rng.integers(0, 10, n)
    yy, xx = np.mgrid[:28, :28]
    centres = [(7 + 7 * (k // 4), 5 + 6 * (k % 4)) for k in range(10)]
    x = np.zeros((n, 1, 28, 28), np.float32)
    for i, k in enumerate(y):
        cy, cx = centres[k] + rng.normal(0, 1.0, 2)
        x[i, 0] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)
    x = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1)
    return {"x_train": x[:1000], "y_train": y[:1000], "x_test": x[1000:], "y_test": y[1000:]}
