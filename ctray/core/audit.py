"""The model score of the trigger-inversion audit (CTI, seed-defenses.md §1.3) from per-class results.

Two modes (``audit.score``):

- ``"gap"``: the reference's score, the largest success gap ``max_c gap_c`` with
  ``gap_c = ASR_f(delta_c) - ASR_fref(delta_c)``.
- ``"gap-size"`` (ctray's default, measured in docs/defenses.md): each gap weighted by how small its
  trigger is against the model's other triggers, ``gap_c * median_k(size_k) / size_c``, where ``size_c``
  is the mean absolute pixel value of ``delta_c``. CTI has no size prior (its L1 weight is 0), so on a
  weak reference (few trusted images) almost every class reaches a large gap with a large
  perturbation; a planted backdoor reaches it with an unusually small one (Neural Cleanse's
  observation). The median makes the score free of the image size and the optimisation budget: a class
  whose trigger is as large as the median scores its gap.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SCORE_MODES", "class_scores", "model_score"]

SCORE_MODES = ("gap", "gap-size")


def class_scores(gap: np.ndarray, size: np.ndarray, mode: str) -> np.ndarray:
    """Per-class audit scores, **higher = more suspicious**.

    Args:
        gap: float (K,) success gaps in [-1, 1]; NaN for a class without evaluation images.
        size: float (K,) trigger sizes ``mean |delta_c|`` in pixel units, > 0.
        mode: one of :data:`SCORE_MODES`.

    Returns:
        float (K,): ``gap`` itself (``"gap"``) or ``gap * median(size) / size`` (``"gap-size"``, the
        median over the classes with a finite gap); NaN where ``gap`` is NaN.

    Raises:
        ValueError: unknown mode, shapes differ, or a size is not > 0 where the gap is finite.
    """
    gap = np.asarray(gap, dtype=np.float64)
    size = np.asarray(size, dtype=np.float64)
    if gap.shape != size.shape or gap.ndim != 1:
        raise ValueError(f"gap {gap.shape} and size {size.shape} must be the same 1-D shape")
    if mode == "gap":
        return gap.copy()
    if mode != "gap-size":
        raise ValueError(f"unknown audit score mode {mode!r}; known: {', '.join(SCORE_MODES)}")
    ok = np.isfinite(gap)
    if not ok.any():
        return np.full_like(gap, np.nan)
    if not (np.isfinite(size[ok]) & (size[ok] > 0)).all():
        raise ValueError(f"trigger sizes must be > 0, got {size[ok].tolist()}")
    out = np.full_like(gap, np.nan)
    out[ok] = gap[ok] * float(np.median(size[ok])) / size[ok]
    return out


def model_score(scores: np.ndarray) -> tuple[float, int]:
    """``(max score, index of the max)`` over the finite per-class scores.

    Raises:
        ValueError: no finite score (no class had evaluation images).
    """
    s = np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(s)
    if not ok.any():
        raise ValueError("no candidate class has a finite audit score (no evaluation image outside any class)")
    i = int(np.argmax(np.where(ok, s, -np.inf)))
    return float(s[i]), i
