"""Within-class PCA projection (pure NumPy): the first step of CT's final decision (specs/ct.md §1.6)."""

from __future__ import annotations

import numpy as np

from ctray.errors import DataError


def class_projection(features: np.ndarray, k: int = 2) -> np.ndarray:
    """Centre ``features (n, D)`` of ONE class and project them on their top-``k`` principal axes.

    The reference uses randomized low-rank PCA with centring; the exact SVD used here spans the same
    top-k subspace (up to the randomized method's error). Axis signs are arbitrary, which the Gaussian
    likelihood ratio downstream does not see.

    Returns:
        ``float64 (n, k)``; zeros for columns beyond the rank (n < 2 gives all zeros).
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise DataError(f"features must be 2-D (n, D), got shape {x.shape}")
    n = x.shape[0]
    out = np.zeros((n, k), dtype=np.float64)
    if n < 2:
        return out
    xc = x - x.mean(axis=0, keepdims=True)
    # economy SVD of the smaller side: (n, D) with n or D possibly large
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    kk = min(k, vt.shape[0])
    out[:, :kk] = xc @ vt[:kk].T
    return out
