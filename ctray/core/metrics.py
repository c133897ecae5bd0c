"""Detection metrics against a ground-truth poison mask (ct.md §3: elimination / sacrifice rates).

Pure NumPy/SciPy. AUROC and average precision are implemented here rather than imported from
scikit-learn so that ``ctray.core`` stays light (importing ``sklearn.metrics`` costs ~1 s and pulls in
a large dependency tree for two short formulas); the tests cross-check both against scikit-learn.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata

from ctray.errors import DataError

__all__ = ["auroc", "average_precision", "detection_metrics"]


def _bool_mask(name: str, arr: np.ndarray) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim != 1:
        raise DataError(f"{name} must be 1-D (N,), got shape {a.shape}")
    if a.dtype != np.bool_:
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{name} must be a bool mask, got dtype {a.dtype}")
        if a.size and not np.isin(a, (0, 1)).all():
            raise DataError(f"{name} must be a bool mask (0/1 values), got other integers")
        a = a.astype(bool)
    return a


def _scores(score: np.ndarray, n: int) -> np.ndarray:
    s = np.asarray(score)
    if s.ndim != 1 or s.shape[0] != n:
        raise DataError(f"score must be 1-D with the same length as poison ({n}), got shape {s.shape}")
    if s.size and not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)
                       or s.dtype == np.bool_):
        raise DataError(f"score must be real numbers, got dtype {s.dtype}")
    if not np.issubdtype(s.dtype, np.floating):  # float32 scores stay float32 (no N-sized copy)
        s = s.astype(np.float64)
    if np.isnan(s).any():
        raise DataError(f"score holds {int(np.isnan(s).sum())} NaN values")
    return s


def auroc(poison: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve of ``score`` for the positive class ``poison`` (Mann-Whitney U).

    ``AUROC = (sum of ranks of positives - n_pos (n_pos + 1) / 2) / (n_pos * n_neg)`` with ranks of
    tied scores averaged (a tie between a positive and a negative counts 1/2).

    Args:
        poison: bool (N,) ground truth, True = poison (positive).
        score: float (N,) higher = more suspicious; no NaN (+-inf allowed).

    Returns:
        AUROC in [0, 1], or None when only one class is present (no poison, or all poison).
    """
    y = _bool_mask("poison", poison)
    s = _scores(score, y.size)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(s, method="average")
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def average_precision(poison: np.ndarray, score: np.ndarray) -> float | None:
    """Average precision (area under the step-wise precision-recall curve), as scikit-learn computes it.

    ``AP = sum_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds in descending order, where
    ``P_k, R_k`` are the precision and recall when flagging every sample with score >= threshold k.

    Args:
        poison: bool (N,) ground truth, True = poison.
        score: float (N,) higher = more suspicious; no NaN.

    Returns:
        AP in [0, 1], or None when only one class is present.
    """
    y = _bool_mask("poison", poison)
    s = _scores(score, y.size)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return None
    # descending score order; the order within a tie does not matter (only each tie's last index is used),
    # so a reversed ascending sort serves and no negated copy of the scores is made
    order = np.argsort(s, kind="stable")[::-1]
    s_sorted = s[order]
    y_cum = np.cumsum(y[order], dtype=np.int64)
    del order
    thresholds = np.append(np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), y.size - 1)  # last index of each tie
    del s_sorted
    tps = y_cum[thresholds].astype(np.float64)
    del y_cum
    # AP = sum over thresholds of (recall step) x precision; recall steps are non-zero only where tps grows
    step = np.flatnonzero(np.diff(tps, prepend=0.0))
    return float(np.sum((np.diff(tps, prepend=0.0)[step] / n_pos) * (tps[step] / (thresholds[step] + 1.0))))


def detection_metrics(flagged: np.ndarray, poison: np.ndarray, score: np.ndarray | None = None) -> dict[str, Any]:
    """Detection quality of a flag mask (and optionally a continuous score) against the poison mask.

    Cover samples (TaCT / adaptive / WaNet noise samples that carry a trigger but keep their label) count
    as clean: pass the poison mask only.

    Args:
        flagged: bool (N,) True = flagged as poison by the detector.
        poison: bool (N,) ground truth, True = poison sample.
        score: optional float (N,) suspiciousness, higher = more suspicious; no NaN.

    Returns:
        dict of JSON-safe values (Python int/float/None, never NaN):
        ``tpr`` elimination rate |flagged & P| / |P| (None if no poison);
        ``fpr`` sacrifice rate |flagged \\ P| / (N - |P|) (None if every sample is poison);
        ``precision`` |flagged & P| / |flagged| (None if nothing flagged);
        ``f1`` 2 TP / (|flagged| + |P|) (None if both are 0);
        ``auroc``, ``auprc`` (average precision) of ``score`` (None without score or with one class);
        ``n``, ``n_poison``, ``n_flagged``; ``flag_rate`` |flagged| / N (the no-attack number; None if N = 0).

    Raises:
        DataError: masks not 1-D bool/0-1, lengths differ, NaN in ``score``.
    """
    f = _bool_mask("flagged", flagged)
    p = _bool_mask("poison", poison)
    if f.size != p.size:
        raise DataError(f"flagged and poison must have the same length, got {f.size} and {p.size}")
    n = int(p.size)
    n_poison = int(p.sum())
    n_flagged = int(f.sum())
    tp = int(np.count_nonzero(f & p))
    fp = n_flagged - tp
    out: dict[str, Any] = {
        "tpr": tp / n_poison if n_poison else None,
        "fpr": fp / (n - n_poison) if n > n_poison else None,
        "precision": tp / n_flagged if n_flagged else None,
        "f1": 2.0 * tp / (n_flagged + n_poison) if (n_flagged + n_poison) else None,
        "auroc": None,
        "auprc": None,
        "n": n,
        "n_poison": n_poison,
        "n_flagged": n_flagged,
        "flag_rate": n_flagged / n if n else None,
    }
    if score is not None:
        s = _scores(score, n)
        out["auroc"] = auroc(p, s)
        out["auprc"] = average_precision(p, s)
    return {k: (float(v) if isinstance(v, float) else v) for k, v in out.items()}
