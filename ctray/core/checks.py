"""Input checks shared by the NumPy core (no torch, no Ray).

One validator for every (rows, columns) float matrix the core accepts (penultimate features, activation
vectors, per-sample score columns), so every entry point rejects bad input with the same clear message
instead of propagating NaN into a decision.
"""

from __future__ import annotations

import numpy as np

from ctray.errors import DataError


def check_matrix(x: np.ndarray, name: str, rows: int | None = None, cols: int | None = None) -> np.ndarray:
    """Validate a real 2-D matrix and return it as float64 (no copy when it already is).

    Args:
        x: array-like of shape (N, D), integer or floating dtype.
        name: what the caller calls it, used in the error message.
        rows: required N (e.g. one row per label), or None for any.
        cols: required D (e.g. the width of fitted statistics), or None for any.

    Returns:
        float64 array (N, D).

    Raises:
        DataError: not 2-D, not real numbers, NaN or inf present, or the wrong number of rows/columns.
    """
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise DataError(f"{name} must be 2-D (N, D), got shape {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{name} must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise DataError(f"{name} holds {int((~np.isfinite(arr)).sum())} non-finite values (NaN or inf)")
    if rows is not None and arr.shape[0] != rows:
        raise DataError(f"{name} must have {rows} rows (one per label), got {arr.shape[0]}")
    if cols is not None and arr.shape[1] != cols:
        raise DataError(f"{name} has {arr.shape[1]} columns, expected {cols}")
    return arr
