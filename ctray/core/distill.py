"""Distillation between CT rounds: class weights, the kept fraction and per-class floors (ct.md §1.4).

Pure NumPy. Every index returned here is a position in the FULL scored arrays (all N samples of D,
re-scored every round), never in the previous round's subset.
"""

from __future__ import annotations

import logging

import numpy as np

from ctray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = ["class_weights", "distill", "keep_count"]

# The reference's smoothing term in w_c = 1 / sqrt(n_c / N + 0.001).
_WEIGHT_EPS = 0.001


def check_labels(labels: np.ndarray, num_classes: int, name: str = "labels") -> np.ndarray:
    """Validate a 1-D integer label array with values in ``[0, num_classes)``; return it (its own integer
    dtype, not copied: the driver's labels are int16 for most class counts).

    Shared by the core modules (private to ``ctray.core``; callers use the public functions).

    Raises:
        ConfigError: ``num_classes`` < 1.
        DataError: ``labels`` is not 1-D, not integer, or holds a value outside ``[0, num_classes)``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 1:
        raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataError(f"{name} must be 1-D (N,), got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        bad = arr[(arr < 0) | (arr >= num_classes)][0]
        raise DataError(f"{name} must lie in [0, {num_classes}), found {int(bad)}")
    return arr


def keep_count(ratio: float, n: int) -> int:
    """Number of samples a distillation round keeps: ``int(ratio * n)`` (the reference's rounding).

    Args:
        ratio: fraction of the FULL data set to keep, in (0, 1] (e.g. 1/2, 1/5, 1/25, 1/50, 1/100).
        n: size N of the full data set, >= 0.

    Returns:
        ``int(ratio * n)`` in ``[0, n]``.

    Raises:
        ConfigError: ``ratio`` outside (0, 1] or not finite, or ``n`` negative / not an integer.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, int | float | np.floating | np.integer):
        raise ConfigError(f"ratio must be a number in (0, 1], got {ratio!r}")
    if not (np.isfinite(ratio) and 0.0 < float(ratio) <= 1.0):
        raise ConfigError(f"ratio must be in (0, 1], got {ratio!r}")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ConfigError(f"n must be an integer >= 0, got {n!r}")
    return int(float(ratio) * int(n))


def class_weights(labels: np.ndarray, num_classes: int, uniform: bool) -> np.ndarray:
    """Per-class weights of the inspection loss: ``w_c = 1 / sqrt(n_c / N + 0.001)``.

    ``n_c`` counts label ``c`` in ``labels`` (the current distilled set D_r, not all of D) and
    ``N = len(labels)``. Rare classes weigh more; a class absent from D_r gets the finite maximum
    ``1 / sqrt(0.001) ~ 31.6``. The final round and the ImageNet/Ember variants use uniform weights.

    Args:
        labels: int (N,) given labels of the current training subset, values in ``[0, num_classes)``.
        num_classes: C >= 1.
        uniform: return all ones (C,) instead.

    Returns:
        float64 (C,), every entry in ``(0, 31.63]``; all ones when ``uniform``.

    Raises:
        DataError: bad ``labels``, or ``labels`` empty while ``uniform`` is False.
    """
    lab = check_labels(labels, num_classes)
    if uniform:
        return np.ones(num_classes, dtype=np.float64)
    if lab.size == 0:
        raise DataError("labels is empty: class weights need at least one sample (or uniform=True)")
    freq = np.bincount(lab, minlength=num_classes).astype(np.float64) / lab.size
    return 1.0 / np.sqrt(freq + _WEIGHT_EPS)


def distill(losses: np.ndarray, labels: np.ndarray, keep_n: int, floor_k: int, num_classes: int) -> np.ndarray:
    """Select the next round's training subset D_{r+1}: lowest losses plus per-class floors.

    1. Keep the ``keep_n`` samples of lowest loss (ties broken by index: a stable sort).
    2. Per class ``c`` with ``n_c`` samples in the FULL arrays, the kept set must hold at least
       ``n_c // floor_k`` samples of class ``c``; missing ones are topped up with that class's
       next-lowest-loss samples that are not kept yet. A class never loses samples in step 2, so the
       result has ``max(kept_c, n_c // floor_k)`` samples of each class.

    NaN losses are treated as ``+inf``: they sort after every finite loss (ties among them by index)
    and are only kept when ``keep_n`` or a floor reaches them; a warning logs their count.

    Args:
        losses: float (N,) per-sample loss of ALL N samples of D under the round's confused model;
            lower = the model still fits the given label = more suspicious.
        labels: int (N,) given labels, values in ``[0, num_classes)``.
        keep_n: how many lowest-loss samples to keep, in ``[0, N]``; computed by the caller as
            ``keep_count(ratio, N)`` of the FULL N.
        floor_k: floor divisor >= 1 (50 in the early rounds, 100 in the second-to-last).
        num_classes: C >= 1.

    Returns:
        int64 (M,) indices into the full arrays, sorted ascending, unique;
        ``M >= keep_n`` (equal when no class needs a top-up).

    Raises:
        ConfigError: ``keep_n`` outside ``[0, N]``, ``floor_k`` < 1, ``num_classes`` < 1.
        DataError: ``losses`` not 1-D float/int, or shapes of ``losses`` and ``labels`` differ.
    """
    lab = check_labels(labels, num_classes)
    loss = np.asarray(losses)
    if loss.ndim != 1:
        raise DataError(f"losses must be 1-D (N,), got shape {loss.shape}")
    if loss.size and not (np.issubdtype(loss.dtype, np.floating) or np.issubdtype(loss.dtype, np.integer)):
        raise DataError(f"losses must be real numbers, got dtype {loss.dtype}")
    if loss.shape != lab.shape:
        raise DataError(f"losses and labels must have the same length, got {loss.shape[0]} and {lab.shape[0]}")
    n = lab.size
    if isinstance(keep_n, bool) or not isinstance(keep_n, int | np.integer) or not 0 <= keep_n <= n:
        raise ConfigError(f"keep_n must be an integer in [0, {n}] (N = len(losses)), got {keep_n!r}")
    if isinstance(floor_k, bool) or not isinstance(floor_k, int | np.integer) or floor_k < 1:
        raise ConfigError(f"floor_k must be an integer >= 1, got {floor_k!r}")

    # Memory: the driver runs this over all of D, so only N-sized temporaries that are needed: the loss
    # order (8 B/sample), the mask (1 B) and, when some class is below its floor, the label order (8 B).
    nan = np.isnan(loss) if np.issubdtype(loss.dtype, np.floating) else None
    if nan is not None and nan.any():
        log.warning("distill: %d of %d losses are NaN; they are treated as +inf (kept last)", int(nan.sum()), n)
        loss = loss.astype(np.float64, copy=True)
        loss[nan] = np.inf
    del nan

    order = np.argsort(loss, kind="stable")  # global loss order, ties by index
    keep = np.zeros(n, dtype=bool)
    keep[order[:keep_n]] = True
    del order
    # The kept prefix holds the lowest-loss members of each class (ties by index), so a class below its
    # floor gets its next-lowest members in the same order: sort within the class by (loss, index).
    counts = np.bincount(lab, minlength=num_classes)
    floor = counts // int(floor_k)
    short = np.flatnonzero(floor > np.bincount(lab[keep], minlength=num_classes))
    if short.size:
        by_class = np.argsort(lab, kind="stable")  # ascending index within each class
        bounds = np.concatenate(([0], np.cumsum(counts)))
        for c in short:
            idx = by_class[bounds[c]:bounds[c + 1]]
            keep[idx[np.argsort(loss[idx], kind="stable")[:floor[c]]]] = True
    return np.flatnonzero(keep).astype(np.int64, copy=False)
