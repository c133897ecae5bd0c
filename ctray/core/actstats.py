"""Mergeable per-neuron activation statistics and the out-of-interval score (BadActs, seed-defenses.md §2).

Pure NumPy. A "neuron" is one column of an activation feature matrix ``(B, F)`` (for image models: one
channel of one block, pooled over H x W by average or max; see ``ctray.defenses.actstats``).

* :class:`ActMoments`: per-neuron ``(n, mean, M2, min, max)`` in float64, folded batch by batch and merged
  with Chan et al.'s parallel-variance formula, so shards and workers reduce in any order.
* :class:`ActHistogram`: per-neuron fixed-range histograms (range from a first :class:`ActMoments` pass),
  merged by addition; quantiles by linear interpolation inside a bin (error <= one bin width). The robust
  mode's stand-in for a quantile sketch (t-digest/KLL): exact merge, bounded error, no dependency.
* :func:`intervals_gauss` / :func:`intervals_quantile`: the clean operating interval ``[lo, hi]`` of every
  neuron (faithful Gaussian band ``mu +- delta * sigma`` or empirical quantiles ``[q_a, q_{1-a}]``).
* :func:`out_of_interval_score`: per sample, the share of (active) neurons outside their interval,
  in [0, 1], **higher = more suspicious** (= 1 - the paper's NAS score).
* :func:`frr_threshold`, :func:`hash_split`: calibration at a target false-rejection rate on a clean half
  that was not used to fit the intervals; the deterministic A/B (or any fraction) split by sample id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctray.core.checks import check_matrix
from ctray.errors import ConfigError, DataError

__all__ = [
    "ActHistogram",
    "ActMoments",
    "constant_neurons",
    "frr_threshold",
    "hash_split",
    "intervals_gauss",
    "intervals_quantile",
    "out_of_interval_score",
]


@dataclass
class ActMoments:
    """Per-neuron count, mean, sum of squared deviations (M2), min and max; float64, mergeable.

    Attributes:
        n: samples folded in (int).
        mean: float64 (F,).
        m2: float64 (F,) sum of squared deviations from the mean (variance = m2 / n).
        lo, hi: float64 (F,) smallest / largest value seen (+inf / -inf when empty).
    """

    n: int
    mean: np.ndarray
    m2: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    @classmethod
    def zeros(cls, width: int) -> ActMoments:
        """Empty statistics of ``width`` neurons."""
        if width < 1:
            raise ConfigError(f"width must be >= 1, got {width}")
        return cls(0, np.zeros(width), np.zeros(width), np.full(width, np.inf), np.full(width, -np.inf))

    @classmethod
    def of(cls, acts: np.ndarray) -> ActMoments:
        """Statistics of one batch ``(B, F)``."""
        a = check_matrix(acts, "activations")
        m = cls.zeros(a.shape[1])
        return m.update(a)

    @property
    def width(self) -> int:
        return int(self.mean.shape[0])

    def update(self, acts: np.ndarray) -> ActMoments:
        """Fold a batch ``(B, F)`` in place (Chan merge of the batch's own moments); returns self."""
        a = check_matrix(acts, "activations", cols=self.width)
        if a.shape[0] == 0:
            return self
        b = ActMoments(a.shape[0], a.mean(0), ((a - a.mean(0)) ** 2).sum(0), a.min(0), a.max(0))
        merged = self.merge(b)
        self.n, self.mean, self.m2, self.lo, self.hi = merged.n, merged.mean, merged.m2, merged.lo, merged.hi
        return self

    def merge(self, other: ActMoments) -> ActMoments:
        """A new object holding both inputs' statistics (Chan, Golub & LeVeque's pairwise update)."""
        if other.width != self.width:
            raise DataError(f"cannot merge statistics of {self.width} and {other.width} neurons")
        if other.n == 0:
            return ActMoments(self.n, self.mean.copy(), self.m2.copy(), self.lo.copy(), self.hi.copy())
        if self.n == 0:
            return ActMoments(other.n, other.mean.copy(), other.m2.copy(), other.lo.copy(), other.hi.copy())
        n = self.n + other.n
        d = other.mean - self.mean
        mean = self.mean + d * (other.n / n)
        m2 = self.m2 + other.m2 + d * d * (self.n * other.n / n)
        return ActMoments(n, mean, m2, np.minimum(self.lo, other.lo), np.maximum(self.hi, other.hi))

    def std(self) -> np.ndarray:
        """Population standard deviation per neuron, float64 (F,); zeros when ``n == 0``."""
        return np.sqrt(self.m2 / self.n) if self.n else np.zeros(self.width)


@dataclass
class ActHistogram:
    """Per-neuron histograms over fixed ranges ``[lo_j, hi_j]`` with ``bins`` equal bins; merge = add.

    Values outside a neuron's range go to the first/last bin (the range comes from the same data's
    min/max, so this only happens when the histogram is reused on other data).

    Attributes:
        lo, hi: float64 (F,) range per neuron (``hi > lo`` enforced by widening constant neurons).
        counts: int64 (F, bins).
    """

    lo: np.ndarray
    hi: np.ndarray
    counts: np.ndarray

    @classmethod
    def empty(cls, lo: np.ndarray, hi: np.ndarray, bins: int) -> ActHistogram:
        """Empty histograms over ``[lo, hi]`` (constant neurons get a tiny positive width)."""
        if bins < 2:
            raise ConfigError(f"bins must be >= 2, got {bins}")
        lo = np.asarray(lo, np.float64)
        hi = np.asarray(hi, np.float64)
        if lo.shape != hi.shape or lo.ndim != 1:
            raise DataError(f"lo and hi must be 1-D of one length, got {lo.shape} and {hi.shape}")
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise DataError("histogram ranges must be finite (fit ActMoments on at least one sample first)")
        hi = np.where(hi > lo, hi, lo + np.maximum(1e-12, 1e-9 * np.abs(lo)))
        return cls(lo, hi, np.zeros((lo.shape[0], bins), np.int64))

    @property
    def bins(self) -> int:
        return int(self.counts.shape[1])

    def update(self, acts: np.ndarray) -> ActHistogram:
        """Count a batch ``(B, F)`` in place; returns self."""
        a = check_matrix(acts, "activations", cols=self.lo.shape[0])
        if a.shape[0] == 0:
            return self
        f = a.shape[1]
        idx = np.floor((a - self.lo) / (self.hi - self.lo) * self.bins).astype(np.int64)
        idx = np.clip(idx, 0, self.bins - 1)
        flat = (np.arange(f)[None, :] * self.bins + idx).ravel()
        self.counts += np.bincount(flat, minlength=f * self.bins).reshape(f, self.bins)
        return self

    def merge(self, other: ActHistogram) -> ActHistogram:
        """A new histogram with both inputs' counts (ranges must be equal)."""
        if not (np.array_equal(self.lo, other.lo) and np.array_equal(self.hi, other.hi)):
            raise DataError("cannot merge histograms over different ranges")
        return ActHistogram(self.lo.copy(), self.hi.copy(), self.counts + other.counts)

    def quantile(self, q: float) -> np.ndarray:
        """Per-neuron ``q``-quantile (float64 (F,)), linear inside the bin that holds it."""
        if not 0.0 <= q <= 1.0:
            raise ConfigError(f"quantile must lie in [0, 1], got {q}")
        n = self.counts.sum(1)
        if (n == 0).any():
            raise DataError("quantile of an empty histogram")
        cum = np.cumsum(self.counts, 1)
        target = q * n
        k = np.minimum((cum < target[:, None]).sum(1), self.bins - 1)  # first bin with cum >= target
        rows = np.arange(self.counts.shape[0])
        before = np.where(k > 0, cum[rows, np.maximum(k - 1, 0)], 0)
        inbin = self.counts[rows, k]
        frac = np.where(inbin > 0, (target - before) / np.maximum(inbin, 1), 0.0)
        width = (self.hi - self.lo) / self.bins
        return self.lo + (k + np.clip(frac, 0.0, 1.0)) * width


def intervals_gauss(m: ActMoments, delta: float, sigma_floor: float) -> tuple[np.ndarray, np.ndarray]:
    """The faithful BadActs band ``mu +- delta * max(sigma, sigma_floor)`` per neuron.

    ``sigma_floor`` guards dead (constant) neurons, whose sigma is 0: their interval is a tiny band
    around the constant instead of a point, so float noise does not count, but any real firing does.

    Returns:
        ``(lo, hi)`` float64 (F,) each.
    """
    if m.n < 2:
        raise DataError(f"need at least 2 clean samples to fit intervals, got {m.n}")
    if delta <= 0 or sigma_floor < 0:
        raise ConfigError(f"act.delta must be > 0 and act.sigma_floor >= 0, got {delta}, {sigma_floor}")
    s = np.maximum(m.std(), sigma_floor)
    return m.mean - delta * s, m.mean + delta * s


def intervals_quantile(h: ActHistogram, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The robust interval ``[q_alpha, q_{1-alpha}]`` per neuron from merged histograms."""
    if not 0.0 <= alpha < 0.5:
        raise ConfigError(f"act.alpha must lie in [0, 0.5), got {alpha}")
    return h.quantile(alpha), h.quantile(1.0 - alpha)


def constant_neurons(m: ActMoments, sigma_floor: float) -> np.ndarray:
    """bool (F,): neurons whose clean standard deviation is <= ``sigma_floor`` (e.g. dead ReLU channels)."""
    return m.std() <= sigma_floor


def out_of_interval_score(acts: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                          active: np.ndarray | None = None) -> np.ndarray:
    """Share of neurons outside ``[lo, hi]`` per sample.

    Args:
        acts: float (B, F) activation features.
        lo, hi: float (F,) interval bounds (a value equal to a bound is inside).
        active: optional bool (F,) neurons that count (e.g. constant ones dropped); all when None.

    Returns:
        float64 (B,) in [0, 1]; higher = more suspicious (1 - NAS of the paper).

    Raises:
        DataError: shapes disagree or no neuron is active.
    """
    a = check_matrix(acts, "activations", cols=np.asarray(lo).shape[0])
    mask = np.ones(a.shape[1], bool) if active is None else np.asarray(active, bool)
    if mask.shape != (a.shape[1],):
        raise DataError(f"active must be bool ({a.shape[1]},), got shape {mask.shape}")
    k = int(mask.sum())
    if k == 0:
        raise DataError("no active neuron to score (all were dropped as constant)")
    out = (a[:, mask] < np.asarray(lo)[mask]) | (a[:, mask] > np.asarray(hi)[mask])
    return out.sum(1) / float(k)


def frr_threshold(clean_scores: np.ndarray, frr: float) -> float:
    """Threshold at a target false-rejection rate on clean calibration scores (higher = suspicious).

    The flag rule is ``score > threshold``: at most a fraction ``frr`` of the calibration scores lies
    above it (the ``1 - frr`` quantile, "higher" interpolation, so ties at the threshold stay unflagged).
    This is BadActs' rule ``NAS < FRR-quantile of clean NAS`` with ``score = 1 - NAS``.
    """
    s = np.asarray(clean_scores, np.float64)
    if s.ndim != 1 or s.size == 0:
        raise DataError(f"need a non-empty 1-D array of clean calibration scores, got shape {s.shape}")
    if not 0.0 <= frr < 1.0:
        raise ConfigError(f"act.frr must lie in [0, 1), got {frr}")
    return float(np.quantile(s, 1.0 - frr, method="higher"))


def hash_split(sids: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Deterministic split by sample id: bool (N,), True for about ``frac`` of the ids.

    The same ``(sid, seed)`` always falls on the same side, whatever the order, the shard layout or the
    worker that holds the sample (splitmix64 of ``sid ^ seed``, compared with ``frac * 2**64``).
    """
    if not 0.0 <= frac <= 1.0:
        raise ConfigError(f"split fraction must lie in [0, 1], got {frac}")
    x = np.asarray(sids, np.int64).astype(np.uint64) ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    u = (x >> np.uint64(11)).astype(np.float64) / float(2**53)
    return u < frac
