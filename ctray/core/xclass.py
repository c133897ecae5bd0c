"""The cross-class detector's math: poison spread over every class (all-to-all, untargeted) seen as
"mislabelled *and* sharing something".

CT decides per class, so poison spread over all classes escapes it (and at 1% an all-to-all or untargeted
backdoor is often not even learned by f_base: the poison then sits in D as mislabelled images that carry a
trigger). This detector looks for exactly that, in three steps, each mergeable or bounded:

1. **Suspects by loss.** ``tau_loss`` = the ``q_loss`` quantile of f_base's loss on the trusted reserve R
   (held out from f_base's training, so its losses are an upper reference for clean data): a sample of D
   that f_base fits worse than that is a suspect (natural hard or ambiguous samples are too).
2. **What the suspects share.** Activation features h (f_base's pooled block outputs) of all of D and of
   the suspects, as mergeable moments (:class:`~ctray.core.pca.FeatureMoments` with two groups: 0 = the
   rest, 1 = the suspects). The Fisher direction ``v = (Sigma_D + ridge) ^ -1 (mu_S - mu_D)`` separates the
   suspects from D; poison shares its trigger, so it lies far along v, while hard clean samples differ in
   every direction. The score is ``s = (h - mu_D) . v``, scaled to unit variance over D: **higher = more
   suspicious**. Cross-fitted: D is split in two halves by sample-id hash, each half's direction scores
   the other half, so a sample's score never comes from a direction fitted on it (a direction fitted on
   its own suspects scores them higher than any held-out sample: measured on 4,000 clean samples, 45
   crossings where the reserve predicted 8).
3. **A test, then the flags.** ``tau_score`` = the ``q_score`` quantile of R's scores; a sample is flagged
   when ``loss > tau_loss`` and ``s > tau_score``. R tells how often a clean sample crosses both
   (``k_ref`` of ``n_ref``); the flags stand only when D holds significantly more (a one-sided test at
   ``alpha``); otherwise nothing is flagged.

**The test must carry the reserve's uncertainty.** ``k_ref`` is a handful of crossings (1-7 of 1,000 in
every measured run), so the clean rate it estimates is uncertain by a factor of about two, and that does
not shrink as D grows. A binomial test against the point estimate ``(k_ref + 1) / (n_ref + 1)`` (the
``plug-in`` test, the first design) treats the rate as known: its power grows with ``n`` while its error
does not, so on large D it fires on clean data whose crossing rate is a little above the reserve's
estimate. Recomputed on 32 stored Fashion-MNIST runs (docs/results.md): at alpha 0.001 it fired on 9, 3 of
them with no poison among their 23-208 flags, 5 adding 12-148 clean samples to poison CT had already
caught (1 kept no truth). The default ``predictive`` test draws the clean rate from its posterior given the
reserve (Beta(k_ref + 1, n_ref - k_ref + 1), the same uniform prior whose mean the plug-in uses) and
takes ``P(K >= k)`` under the resulting beta-binomial; it agrees with Fisher's exact test on the 2x2
table to 2 digits in every measured case, and at alpha 0.01 it fired on none of the 32 runs. Its power is
bounded by the reserve, not by D: with 1,000 reserve samples and ``k_ref`` = 2, D's rate must be about 1%
before ``p`` falls under 0.01, at any N; a larger trusted reserve is what raises it.

Measured (docs/results.md, Fashion-MNIST 10k, 1%): with the plug-in test all-to-all and untargeted TPR
0.92-0.97 at FPR 0.1%; with the predictive test all-to-all 0.94 / 0.0016, untargeted missed (7 reserve
crossings; ``xclass.fdr=0.2`` finds it: 0.84 / 0.0002). No attack: 0 flagged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import betabinom, binom

from ctray.core.pca import FeatureMoments
from ctray.errors import ConfigError, DataError

#: the two groups of the moments: 0 = samples at or under ``tau_loss``, 1 = the suspects
REST, SUSPECT = 0, 1
#: seed of the cross-fitting halves (``ctray.core.actstats.hash_split`` of the sample id)
HALF_SEED = 0x5EC7


def group_of(half: np.ndarray, suspect: np.ndarray) -> np.ndarray:
    """Moment group ``2 * half + suspect`` (int64 (B,), in [0, 4)) of each row: cross-fitting keeps one
    two-group moment set per half of D (by sample-id hash)."""
    return 2 * np.asarray(half, dtype=np.int64) + np.asarray(suspect, dtype=np.int64)


def half_moments(moments: FeatureMoments, half: int) -> FeatureMoments:
    """The two-group moments of one half out of the four-group moments of :func:`group_of`."""
    if moments.num_classes != 4 or half not in (0, 1):
        raise DataError(f"half_moments needs four-group moments and half 0 or 1, got {moments.num_classes} / {half}")
    g = slice(2 * half, 2 * half + 2)
    return FeatureMoments(moments.count[g].copy(), moments.sum[g].copy(), moments.outer[g].copy())


def loss_threshold(loss_ref: np.ndarray, q: float) -> float:
    """``tau_loss``: the ``q`` quantile (in (0, 1)) of the reserve's losses ``float (M,)``, M >= 1."""
    x = np.asarray(loss_ref, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
        raise DataError(f"reserve losses must be a non-empty finite 1-D array, got shape {x.shape}")
    if not 0 < q < 1:
        raise ConfigError(f"xclass.loss_quantile must be in (0, 1), got {q}")
    return float(np.quantile(x, q))


def fisher_direction(moments: FeatureMoments, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """The direction separating the suspects from all of D.

    Args:
        moments: two-group moments of D's features (group :data:`SUSPECT` = loss above ``tau_loss``).
        ridge: added to the covariance's diagonal as ``ridge * trace / D`` (>= 0; keeps the solve stable
            for dead or constant channels).

    Returns:
        ``(mean float64 (D,), v float64 (D,))``: D's feature mean and the direction, scaled so that
        ``(h - mean) . v`` has unit variance over D. ``v`` is all zeros when there are no suspects or
        the suspects' mean equals D's.

    Raises:
        DataError: not two groups, or fewer than 2 samples in D.
    """
    if moments.num_classes != 2:
        raise DataError(f"fisher_direction needs two-group moments, got {moments.num_classes}")
    n = int(moments.count.sum())
    if n < 2:
        raise DataError(f"fisher_direction needs at least 2 samples, got {n}")
    if ridge < 0:
        raise ConfigError(f"xclass.ridge must be >= 0, got {ridge}")
    s, o = moments.sum.sum(0), moments.outer.sum(0)
    mean = s / n
    cov = o / n - np.outer(mean, mean)
    d = len(mean)
    n_s = int(moments.count[SUSPECT])
    if n_s == 0:
        return mean, np.zeros(d)
    diff = moments.sum[SUSPECT] / n_s - mean
    reg = cov + (ridge * max(float(np.trace(cov)), 1e-12) / d) * np.eye(d)
    v = np.linalg.solve(reg, diff)
    var = float(v @ cov @ v)
    if not np.isfinite(var) or var <= 0:
        return mean, np.zeros(d)
    return mean, v / math.sqrt(var)


def project(features: np.ndarray, mean: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``s = (h - mean) . v`` for ``features float (B, D)``; returns float64 (B,) (higher = more suspicious)."""
    h = np.asarray(features, dtype=np.float64)
    return (h - mean) @ v


@dataclass
class XClassDecision:
    """The detector's outcome (``decisions.json["xclass"]``).

    ``tau_loss`` / ``tau_score``: the reserve's quantiles; ``n`` / ``k``: samples of D scored / crossing
    both; ``n_ref`` / ``k_ref``: the same on the reserve; ``expected``: k under the reserve's rate;
    ``p_value``: P(K >= k) under ``test`` (:func:`decide_xclass`); ``attack``: p_value < alpha, when the k
    samples are flagged (else none); ``n_suspects``: samples of D above ``tau_loss``.
    """

    tau_loss: float
    tau_score: float
    n: int
    k: int
    n_ref: int
    k_ref: int
    n_suspects: int
    expected: float
    p_value: float
    alpha: float
    attack: bool
    tau_base: float = float("nan")  # the reserve's score quantile the threshold search starts from
    est_fdr: float = float("nan")  # expected / k at the chosen threshold
    fdr: float = 1.0
    test: str = "predictive"

    def to_json(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


#: the tests :func:`decide_xclass` knows (``xclass.test``)
TESTS = ("predictive", "plug-in")


def xclass_p_value(k: int, n: int, k_ref: int, n_ref: int, test: str = "predictive") -> float:
    """One-sided p-value of ``k`` of ``n`` crossings in D against ``k_ref`` of ``n_ref`` in the reserve.

    ``predictive``: P(K >= k) for K ~ BetaBinomial(n, k_ref + 1, n_ref - k_ref + 1), i.e. the clean rate
    drawn from its posterior given the reserve under a uniform prior (module docstring: the reserve's
    uncertainty is the dominant one once n >> n_ref). ``plug-in``: P(K >= k) for K ~ Binomial(n,
    (k_ref + 1) / (n_ref + 1)), the rate taken as known (the first design, anti-conservative on large D).
    Range (0, 1]; 1 when ``k`` = 0. Raises ConfigError on an unknown ``test``."""
    if test not in TESTS:
        raise ConfigError(f"xclass.test must be one of {', '.join(TESTS)}, got {test!r}")
    if k <= 0:
        return 1.0
    if test == "plug-in":
        return float(binom.sf(k - 1, n, (k_ref + 1) / (n_ref + 1)))
    return float(betabinom.sf(k - 1, n, k_ref + 1, n_ref - k_ref + 1))


def decide_xclass(k: int, n: int, k_ref: int, n_ref: int, alpha: float, tau_loss: float, tau_score: float,
                  n_suspects: int, test: str = "predictive") -> XClassDecision:
    """Whether ``k`` of ``n`` samples of D crossing both thresholds is more than clean data explains.

    ``k_ref`` of ``n_ref`` reserve samples cross them; ``expected`` = n (k_ref + 1) / (n_ref + 1) (one added
    crossing: a reserve that never crosses still allows some); the p-value is :func:`xclass_p_value`'s.
    Raises ConfigError when ``alpha`` is not in (0, 1) or ``test`` is unknown, and DataError on counts out of
    range."""
    if not 0 < alpha < 1:
        raise ConfigError(f"xclass.alpha must be in (0, 1), got {alpha}")
    if not (0 <= k <= n and 0 <= k_ref <= n_ref and n_ref >= 1):
        raise DataError(f"counts out of range: k={k} of n={n}, k_ref={k_ref} of n_ref={n_ref}")
    p = xclass_p_value(k, n, k_ref, n_ref, test)
    return XClassDecision(tau_loss=float(tau_loss), tau_score=float(tau_score), n=int(n), k=int(k),
                          n_ref=int(n_ref), k_ref=int(k_ref), n_suspects=int(n_suspects),
                          expected=float(n * (k_ref + 1) / (n_ref + 1)), p_value=p, alpha=float(alpha),
                          attack=bool(p < alpha), test=test)


def choose_threshold(hit_scores: np.ndarray, n: int, ref_scores: np.ndarray, n_ref: int, tau_base: float,
                     alpha: float, fdr: float, tau_loss: float, n_suspects: int,
                     test: str = "predictive") -> XClassDecision:
    """The score threshold: the lowest at which D's crossings are both significant and mostly not what
    clean data explains.

    Args:
        hit_scores: float (k,) scores of D's samples crossing ``tau_loss`` and ``tau_base``.
        n: samples of D scored.
        ref_scores: float (k_ref,) scores of the reserve's samples crossing both (its clean crossings).
        n_ref: reserve samples scored.
        tau_base: the reserve's ``score_quantile`` of the score (the lowest threshold considered).
        alpha: level of the one-sided test (see :func:`decide_xclass`).
        test: ``predictive`` or ``plug-in`` (:func:`xclass_p_value`).
        fdr: largest accepted estimated false discovery rate ``expected / k``, in (0, 1]; 1 = no search:
            ``tau_base`` alone, flagged when significant (the default: docs/results.md has both measured).

    Candidates: ``tau_base`` and each reserve crossing's score (above it one clean crossing fewer is
    expected): ``expected(t) = n (k_ref(t) + 1) / (n_ref + 1)``, the lowest candidate with
    ``p < alpha`` and ``expected / k <= fdr`` wins; none -> no attack (the decision at ``tau_base``).
    Raises ConfigError when ``fdr`` is not in (0, 1].
    """
    if not 0 < fdr <= 1:
        raise ConfigError(f"xclass.fdr must lie in (0, 1], got {fdr}")
    hs = np.sort(np.asarray(hit_scores, dtype=np.float64))
    rs = np.sort(np.asarray(ref_scores, dtype=np.float64))
    first: XClassDecision | None = None
    # fdr = 1: the reserve quantile alone (one test, no search)
    cands = [float(tau_base)] + ([float(x) for x in rs if x >= tau_base] if fdr < 1 else [])
    for t in cands:
        k = int(len(hs) - np.searchsorted(hs, t, side="right"))
        k_ref = int(len(rs) - np.searchsorted(rs, t, side="right"))
        d = decide_xclass(k, n, k_ref, n_ref, alpha, tau_loss, t, n_suspects, test)
        d.tau_base, d.fdr = float(tau_base), float(fdr)
        d.est_fdr = d.expected / k if k else float("inf")
        first = first or d
        if d.attack and d.est_fdr <= fdr:
            return d
    assert first is not None
    first.attack = False
    return first


#: ``flagged_by`` codes in scores.parquet: bit 0 = CT, bit 1 = the cross-class detector
FLAGGED_BY = ("", "ct", "xclass", "ct+xclass")


def flagged_by(ct: np.ndarray, xclass: np.ndarray) -> np.ndarray:
    """int8 (N,) codes into :data:`FLAGGED_BY` from two bool (N,) flag arrays."""
    a, b = np.asarray(ct, dtype=bool), np.asarray(xclass, dtype=bool)
    if a.shape != b.shape:
        raise DataError(f"flag arrays differ in shape: {a.shape} vs {b.shape}")
    return (a.astype(np.int8) | (b.astype(np.int8) << 1)).astype(np.int8)
