"""The final decision of CT (ct.md §1.6): per-class likelihood-ratio test on 2-D projections.

For each class c (by given label): ``S_c`` = samples labelled c, ``I_c`` = those the final confused model
still predicts as c ("isolated": suspected poison), ``O_c = S_c \\ I_c``. Two 2-D Gaussians (one per
group) against the single ``O_c`` Gaussian give a likelihood ratio ``LR_c``; a class is cleansed when its
LR is the largest and > 1.5, or > 2 in any case, and then all of ``I_c`` is flagged. Nothing is flagged
in other classes, which keeps the no-attack false-positive rate low.

Inputs are the (N, 2) projections from :func:`ctray.core.pca.project` (the only per-sample vectors that
reach the driver), the given labels and the confused model's argmax predictions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import multivariate_normal

from ctray.core.distill import check_labels
from ctray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = ["Decision", "corroborate", "corroboration", "decide", "flag_samples", "likelihood_ratio_test",
           "likelihood_ratios", "weak_classes", "WEAK_EVIDENCE_NOTE"]

#: Added to EVERY entry of each fitted 2x2 covariance (the reference's "avoid singularity" term).
COV_JITTER = 0.001
#: |log LR_c| is capped here so ``exp`` stays finite (e^700 ~ 1e304 < float64 max ~ 1.8e308).
LOG_LR_CAP = 700.0


def _check_same_len(name: str, arr: np.ndarray, n: int) -> None:
    if arr.shape[0] != n:
        raise DataError(f"{name} must have the same length as labels ({n}), got {arr.shape[0]}")


def _gaussian_fit(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (2,) and unbiased (ddof=1) covariance (2, 2) + COV_JITTER on every entry; needs >= 2 rows."""
    mu = points.mean(axis=0)
    cov = np.cov(points, rowvar=False, ddof=1) + COV_JITTER
    return mu, cov


def _logpdf(points: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    return np.atleast_1d(multivariate_normal.logpdf(points, mean=mu, cov=cov, allow_singular=True))


def likelihood_ratios(proj: np.ndarray, labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class likelihood ratio LR_c of "two clusters (I_c, O_c)" vs "one cluster (O_c)".

    For each class c with ``2 <= |I_c| <= |S_c| - 2``: fit a Gaussian to ``O_c`` and one to ``I_c``
    (sample mean; unbiased covariance, ddof=1; then 0.001 added to EVERY entry of each 2x2 covariance,
    as the reference does), and

        LR_c = exp( (1/|S_c|) * sum_{x in I_c} [log N(x; mu_I, Sigma_I) - log N(x; mu_O, Sigma_O)] ).

    (Points of ``O_c`` are scored by the ``O_c`` Gaussian under both hypotheses, so they cancel.)
    Otherwise ``LR_c = 1``. Higher = the isolated samples form a tighter, separate cluster = more
    suspicious.

    Singular covariances: the jitter makes a covariance singular only when a group's points are
    collinear along the (1, 1) direction (identical points included). Like the reference, the density
    is then scipy's degenerate Gaussian (``allow_singular=True``: pseudo-inverse and
    pseudo-determinant on the covariance's support; points off the support get log-density -inf).
    An ``I_c`` point off the support of the ``O_c`` Gaussian therefore drives ``log LR_c`` to +inf.
    ``log LR_c`` is clipped to ``[-700, 700]`` so ``LR_c`` stays a finite float (at most ~1.01e304);
    a NaN log-ratio (not expected for finite inputs) is logged and replaced by 0 (LR_c = 1).

    Args:
        proj: float (N, 2) finite per-sample projections onto the sample's own class's top-2 axes.
        labels: int (N,) given labels, values in ``[0, num_classes)``.
        preds: int (N,) argmax predictions of the final confused model (any integer class id).
        num_classes: C >= 1.

    Returns:
        float64 (C,), every entry finite and > 0; 1.0 for classes outside the size condition
        (including empty classes).

    Raises:
        ConfigError: ``num_classes`` < 1.
        DataError: shapes disagree, non-integer labels/preds, labels out of range, non-finite ``proj``.
    """
    lab = check_labels(labels, num_classes)
    p = np.asarray(proj)
    if p.ndim != 2 or p.shape[1] != 2:
        raise DataError(f"proj must have shape (N, 2), got {p.shape}")
    if p.size and not (np.issubdtype(p.dtype, np.floating) or np.issubdtype(p.dtype, np.integer)):
        raise DataError(f"proj must be real numbers, got dtype {p.dtype}")
    _check_same_len("proj", p, lab.size)  # float32 stays float32: each class's points become float64 below
    if not np.isfinite(p).all():
        raise DataError(f"proj holds {int((~np.isfinite(p)).sum())} non-finite values (NaN or inf)")
    pr = _check_preds(preds, lab.size)

    lr = np.ones(num_classes, dtype=np.float64)
    order = np.argsort(lab, kind="stable")
    counts = np.bincount(lab, minlength=num_classes)
    bounds = np.concatenate(([0], np.cumsum(counts)))
    for c in np.flatnonzero(counts >= 4):  # |S_c| >= 4 is implied by 2 <= |I_c| <= |S_c| - 2
        idx = order[bounds[c]:bounds[c + 1]]
        iso = pr[idx] == c
        n_s, n_i = idx.size, int(iso.sum())
        if not 2 <= n_i <= n_s - 2:
            continue
        pts = p[idx].astype(np.float64)
        pts_i, pts_o = pts[iso], pts[~iso]
        mu_i, cov_i = _gaussian_fit(pts_i)
        mu_o, cov_o = _gaussian_fit(pts_o)
        with np.errstate(invalid="ignore", over="ignore"):
            total = float(np.sum(_logpdf(pts_i, mu_i, cov_i)) - np.sum(_logpdf(pts_i, mu_o, cov_o)))
            log_lr = total / n_s
        if np.isnan(log_lr):
            log.warning("likelihood_ratios: class %d gave a NaN log-ratio; using LR = 1", int(c))
            log_lr = 0.0
        lr[c] = float(np.exp(np.clip(log_lr, -LOG_LR_CAP, LOG_LR_CAP)))
    return lr


def _check_preds(preds: np.ndarray, n: int) -> np.ndarray:
    pr = np.asarray(preds)
    if pr.ndim != 1:
        raise DataError(f"preds must be 1-D (N,), got shape {pr.shape}")
    if pr.size and not np.issubdtype(pr.dtype, np.integer):
        raise DataError(f"preds must hold integers (argmax class ids), got dtype {pr.dtype}")
    _check_same_len("preds", pr, n)
    return pr


def _check_threshold(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if not np.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


#: What a weak-evidence class means, for the log warning and the report (one text for both).
WEAK_EVIDENCE_NOTE = ("on Fashion-MNIST a benign class with a distinctive sub-cluster reached 1.5-3 and detected "
                      "attacks 150 and more: inspect its flagged samples before dropping them")


def weak_classes(lr: np.ndarray, cleansed: np.ndarray, weak_lr: float) -> np.ndarray:
    """Cleansed classes whose evidence is weak: ``cleansed & (lr < weak_lr)``.

    A report-side signal, not part of the paper's decision. The test's thresholds (1.5 / 2) sit close to
    the ratios benign classes reach: on Fashion-MNIST a class with a distinctive sub-cluster that
    survives the confusion (bags) reached 1.33 on clean data and 1.6-2.6 when an attack escaped, while
    every detected attack's target class was above 150.

    Args:
        lr: float (C,) likelihood ratios (> 0).
        cleansed: bool (C,) the decision.
        weak_lr: the bar (>= 0; 0 marks nothing).

    Returns:
        bool (C,).
    """
    t = _check_threshold("weak_lr", weak_lr)
    lr_a, cl = np.asarray(lr, dtype=np.float64), np.asarray(cleansed, dtype=bool)
    if lr_a.shape != cl.shape:
        raise ValueError(f"lr {lr_a.shape} and cleansed {cl.shape} must have the same shape")
    return cl & (lr_a < t)


def decide(lr: np.ndarray, threshold_max: float = 1.5, threshold_any: float = 2.0) -> np.ndarray:
    """Which classes are cleansed: ``(LR_c == max LR and LR_c > threshold_max) or LR_c > threshold_any``.

    Args:
        lr: float (C,) likelihood ratios from :func:`likelihood_ratios` (finite, > 0), C >= 1.
        threshold_max: bar for the class with the largest LR (reference 1.5).
        threshold_any: bar for any class (reference 2.0).

    Returns:
        bool (C,); True = class cleansed (its isolated samples are flagged).

    Raises:
        ConfigError: a threshold is not a finite number.
        DataError: ``lr`` not 1-D, empty, or not finite.
    """
    t_max = _check_threshold("threshold_max", threshold_max)
    t_any = _check_threshold("threshold_any", threshold_any)
    arr = np.asarray(lr)
    if arr.ndim != 1 or arr.size == 0:
        raise DataError(f"lr must be a non-empty 1-D array (C,), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"lr must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise DataError("lr must be finite (likelihood_ratios caps log LR at 700)")
    return ((arr == arr.max()) & (arr > t_max)) | (arr > t_any)


def corroboration(round_losses: Sequence[np.ndarray], labels: np.ndarray, preds: np.ndarray,
                  classes: Iterable[int], num_classes: int) -> np.ndarray:
    """How strongly earlier CT rounds agree that class c's isolated set is what D's models fit best.

    For each class c in ``classes``, with ``I_c`` = samples labelled c that the final confused model
    predicts as c and ``m = |I_c|``: in each given round r, the share of ``I_c`` among the ``m``
    lowest-loss samples of all of D under round r's model; the value is the largest share over the
    rounds. In [0, 1]; higher = the isolated samples were the easiest thing in D for an earlier model, as
    poison is (CT's premise: the backdoor is fit before and through the confusion). A benign
    sub-cluster that only the last distilled sets come to fit scores near 0 in the early rounds.

    Memory: one copy of a round's losses at a time (``np.partition``), no per-sample index array.

    Args:
        round_losses: per round, float (N,) the round model's per-sample loss on D w.r.t. the given labels
            (lower = better fit); pass the rounds to count (ctray passes all but the last two: those models
            train on the last distilled sets, which the isolated samples fill by construction).
        labels: int (N,) given labels in ``[0, num_classes)``.
        preds: int (N,) final confused model's argmax.
        classes: the class ids to evaluate (e.g. the weakly cleansed ones).
        num_classes: C >= 1.

    Returns:
        float64 (C,): the value for each evaluated class with ``|I_c| >= 1`` and at least one round; NaN
        elsewhere (not evaluated, or nothing to compare).

    Raises:
        DataError: shapes disagree, labels out of range, a class id out of range, non-finite losses.
    """
    lab = check_labels(labels, num_classes)
    pr = _check_preds(preds, lab.size)
    out = np.full(num_classes, np.nan)
    losses = [np.asarray(rl) for rl in round_losses]
    for i, rl in enumerate(losses):
        if rl.ndim != 1 or rl.shape[0] != lab.size:
            raise DataError(f"round_losses[{i}] must have shape ({lab.size},), got {rl.shape}")
    iso = pr == lab
    for c in classes:
        c = int(c)
        if not 0 <= c < num_classes:
            raise DataError(f"class {c} out of range [0, {num_classes})")
        mask = iso & (lab == c)
        m = int(mask.sum())
        if m == 0 or not losses:
            continue
        best = 0.0
        for i, rl in enumerate(losses):
            sel = rl[mask]
            if not np.isfinite(sel).all():
                raise DataError(f"round_losses[{i}] holds non-finite losses in class {c}")
            # the m-th smallest loss over D; ties at the bar are counted but capped at m
            bar = np.partition(rl, m - 1)[m - 1]  # np.partition returns a partitioned copy
            best = max(best, min(int(np.count_nonzero(sel <= bar)), m) / m)
        out[c] = best
    return out


def corroborate(cleansed: np.ndarray, weak: np.ndarray, corr: np.ndarray, bar: float) -> np.ndarray:
    """Classes that stay cleansed: weakly cleansed ones need ``corr >= bar`` (NaN counts as corroborated).

    The paper's test cleanses on the likelihood ratio alone. ctray's presets add this check for the
    weak-evidence band only (``lr < decide.weak_lr``): measured on Fashion-MNIST runs (docs/results.md,
    "Corroborating weak evidence"), benign classes cleansed with weak evidence had corroboration
    <= 0.27 and the detected poison with weak evidence 0.53 and 0.95. A class with strong evidence is
    never vetoed.

    Args:
        cleansed: bool (C,) the likelihood-ratio decision.
        weak: bool (C,) cleansed classes with weak evidence (:func:`weak_classes`).
        corr: float (C,) from :func:`corroboration` (NaN = not evaluated: kept).
        bar: in [0, 1]; 0 keeps every class (the paper).

    Returns:
        bool (C,).

    Raises:
        ConfigError: ``bar`` outside [0, 1].
    """
    b = _check_threshold("corroborate", bar)
    if not 0.0 <= b <= 1.0:
        raise ConfigError(f"decide.corroborate must be in [0, 1], got {bar!r}")
    cl, wk, cr = np.asarray(cleansed, bool), np.asarray(weak, bool), np.asarray(corr, np.float64)
    if not cl.shape == wk.shape == cr.shape:
        raise ValueError(f"cleansed {cl.shape}, weak {wk.shape} and corr {cr.shape} must have the same shape")
    with np.errstate(invalid="ignore"):
        veto = wk & (cr < b)  # NaN < b is False: not evaluated = not vetoed
    return cl & ~veto


def flag_samples(labels: np.ndarray, preds: np.ndarray, cleansed: np.ndarray) -> np.ndarray:
    """Per-sample poison flags: the sample's class is cleansed AND the confused model predicts its label.

    Args:
        labels: int (N,) given labels, values in ``[0, C)``.
        preds: int (N,) argmax predictions of the final confused model.
        cleansed: bool (C,) from :func:`decide`.

    Returns:
        bool (N,); True = flagged as poison (to remove before retraining).

    Raises:
        DataError: shapes disagree, ``cleansed`` not boolean, labels out of range.
    """
    cl = np.asarray(cleansed)
    if cl.ndim != 1 or cl.size == 0 or cl.dtype != np.bool_:
        raise DataError(f"cleansed must be a non-empty 1-D bool array (C,), got shape {cl.shape}, dtype {cl.dtype}")
    lab = check_labels(labels, cl.size)
    pr = _check_preds(preds, lab.size)
    return cl[lab] & (pr == lab)


@dataclass(frozen=True)
class Decision:
    """Outcome of the final likelihood-ratio test: the one shape ``decisions.json`` is written from.

    Attributes:
        lr: float64 (C,) likelihood ratio per class (finite, > 0; 1 = no evidence).
        cleansed: bool (C,) classes whose isolated samples are flagged.
        weak: bool (C,) cleansed classes with ``lr < weak_lr`` (see :func:`weak_classes`).
        flagged: bool (N,) per-sample poison flags (True = suspected poison).
        n: int64 (C,) class sizes |S_c| (by given label).
        n_isolated: int64 (C,) |I_c| = samples of class c predicted as c by the confused model.
        threshold_max: the max-class threshold used.
        threshold_any: the any-class threshold used.
        weak_lr: the weak-evidence bar used (0 marks nothing).
        corroboration: float64 (C,) from :func:`corroboration` (NaN = not evaluated), or None.
        vetoed: bool (C,) classes the likelihood-ratio test cleansed with weak evidence that the
            corroboration check left uncleansed (all False without the check).
        corroborate: the corroboration bar used (0 = off, the paper).
    """

    lr: np.ndarray
    cleansed: np.ndarray
    weak: np.ndarray
    flagged: np.ndarray
    n: np.ndarray
    n_isolated: np.ndarray
    threshold_max: float
    threshold_any: float
    weak_lr: float
    corroboration: np.ndarray | None = None
    vetoed: np.ndarray | None = None
    corroborate: float = 0.0

    @classmethod
    def from_outcome(cls, lr: np.ndarray, cleansed: np.ndarray, flagged: np.ndarray, labels: np.ndarray,
                     preds: np.ndarray, threshold_max: float, threshold_any: float,
                     weak_lr: float = 10.0, corroboration: np.ndarray | None = None,
                     vetoed: np.ndarray | None = None, corroborate: float = 0.0) -> Decision:
        """Assemble a decision from its parts, counting class sizes over the given samples.

        The engine calls this with its real samples only (canaries excluded), so ``n`` and
        ``n_isolated`` describe the user's data; ``lr`` / ``cleansed`` come from the test over all
        samples (or a flag-budget variant that cleanses no class).

        Args:
            lr: float (C,) likelihood ratios (> 0).
            cleansed: bool (C,).
            flagged: bool (N,) per-sample flags for the samples in ``labels``.
            labels: int (N,) given labels in ``[0, C)``.
            preds: int (N,) confused-model argmax.
            threshold_max, threshold_any: the bars used (recorded, not re-applied).
            weak_lr: the weak-evidence bar (>= 0).
            corroboration, vetoed, corroborate: the corroboration check's values (see :func:`corroborate`).

        Raises:
            DataError: shapes disagree or labels out of range.
        """
        lr_a = np.asarray(lr, dtype=np.float64)
        cl = np.asarray(cleansed, dtype=bool)
        c = lr_a.size
        lab = check_labels(labels, c)
        pr = _check_preds(preds, lab.size)
        fl = np.asarray(flagged, dtype=bool)
        _check_same_len("flagged", fl, lab.size)
        return cls(lr=lr_a, cleansed=cl, weak=weak_classes(lr_a, cl, weak_lr), flagged=fl,
                   n=np.bincount(lab, minlength=c).astype(np.int64),
                   n_isolated=np.bincount(lab[pr == lab], minlength=c).astype(np.int64),
                   threshold_max=_check_threshold("threshold_max", threshold_max),
                   threshold_any=_check_threshold("threshold_any", threshold_any),
                   weak_lr=_check_threshold("weak_lr", weak_lr),
                   corroboration=None if corroboration is None else np.asarray(corroboration, np.float64),
                   vetoed=np.zeros(c, bool) if vetoed is None else np.asarray(vetoed, bool),
                   corroborate=_check_threshold("corroborate", corroborate))

    @property
    def n_flagged(self) -> int:
        """Number of flagged samples."""
        return int(np.count_nonzero(self.flagged))

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict for ``decisions.json`` (plain Python ints/floats/bools, no NaN)."""
        classes = [
            {"class": c, "n": int(self.n[c]), "n_isolated": int(self.n_isolated[c]),
             "lr": float(self.lr[c]), "cleansed": bool(self.cleansed[c]), "weak": bool(self.weak[c]),
             "corroboration": _finite_or_none(self.corroboration, c),
             "vetoed": bool(self.vetoed[c]) if self.vetoed is not None else False}
            for c in range(self.lr.size)
        ]
        return {"classes": classes, "threshold_max": float(self.threshold_max),
                "threshold_any": float(self.threshold_any), "weak_lr": float(self.weak_lr),
                "corroborate": float(self.corroborate), "n_flagged": self.n_flagged}


def _finite_or_none(arr: np.ndarray | None, i: int) -> float | None:
    if arr is None or not np.isfinite(arr[i]):
        return None
    return float(arr[i])


def likelihood_ratio_test(proj: np.ndarray, labels: np.ndarray, preds: np.ndarray, num_classes: int,
                          threshold_max: float = 1.5, threshold_any: float = 2.0,
                          weak_lr: float = 10.0) -> Decision:
    """The whole §1.6 decision in one call: :func:`likelihood_ratios` -> :func:`decide` -> :func:`flag_samples`.

    Args:
        proj: float (N, 2) projections (see :func:`likelihood_ratios`).
        labels: int (N,) given labels in ``[0, num_classes)``.
        preds: int (N,) confused-model argmax.
        num_classes: C >= 1.
        threshold_max: max-class bar (1.5).
        threshold_any: any-class bar (2.0).
        weak_lr: weak-evidence bar (10; report-side only, see :func:`weak_classes`).

    Returns:
        A :class:`Decision`.
    """
    lr = likelihood_ratios(proj, labels, preds, num_classes)
    cleansed = decide(lr, threshold_max, threshold_any)
    flagged = flag_samples(labels, preds, cleansed)
    return Decision.from_outcome(lr, cleansed, flagged, labels, preds, threshold_max, threshold_any, weak_lr)
