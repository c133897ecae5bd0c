"""Mergeable per-group suspicion statistics (groups = shards or sources) and the marking test.

A detection run scores every usable sample once with the final confused model. Each Ray Data block of
that pass folds its rows into a :class:`GroupStats` (one row per group present in the block); the
per-block objects are merged into one per run (``ctray.engine.aggregate.ShardAggregator``). Whether a
sample is *flagged* is only known after the final likelihood-ratio test, which needs every sample;
so the stats keep, per group and class, the number of samples the confused model predicts as their
given label ("isolated", CT's candidate set), and :meth:`GroupStats.flagged` derives the flagged count
afterwards with CT's rule (``label in cleansed and pred == label``, ``ctray.core.decide.flag_samples``).

The merge is exactly associative and commutative (any partition of the samples, merged in any order,
equals one pass over all of them): every field is an integer sum except the top-k list, which is the
top-k of the union under a total order (score descending, then id ascending). Score sums are kept in
fixed point (``round(score * 2**24)`` per sample, int64) so that float rounding cannot make two merge
orders differ; the capacity is 2**39 (5.5e11) samples per group, the resolution 6e-8 per sample.

:func:`binomial_marks` marks groups whose flagged count is far above what their size predicts:
a one-sided binomial tail ``P(X >= flagged | n = usable, p = overall flag rate)`` against a
Bonferroni-corrected level ``alpha / (number of groups with a usable sample)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ctray.core.distill import check_labels
from ctray.errors import ConfigError, DataError

__all__ = ["SCORE_UNIT", "GroupStats", "binomial_marks", "suspicion_order"]

#: Fixed-point units per 1.0 of score in :attr:`GroupStats.score_fx`.
SCORE_UNIT = 2**24


def _as_names(groups: Sequence[str] | np.ndarray, name: str = "groups") -> np.ndarray:
    arr = np.asarray(groups)
    if arr.ndim != 1:
        raise DataError(f"{name} must be 1-D (N,), got shape {arr.shape}")
    return arr.astype(str) if arr.size else np.zeros(0, dtype="<U1")


def _check_params(num_classes: int, bins: int, k: int) -> None:
    for nm, v in (("num_classes", num_classes), ("bins", bins)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise ConfigError(f"{nm} must be an integer >= 1, got {v!r}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise ConfigError(f"top-k size k must be an integer >= 0, got {k!r}")


def _select_top(group: np.ndarray, ids: np.ndarray, score: np.ndarray, k: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At most ``k`` entries per group: highest score first, ties by lower id. Returns the kept
    ``(group, ids, score)`` sorted by (group, -score, id)."""
    if not len(group) or k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    order = np.lexsort((ids, -score, group))
    g, i, s = group[order], ids[order], score[order]
    start = np.r_[0, np.flatnonzero(np.diff(g)) + 1]
    run_start = np.repeat(start, np.diff(np.r_[start, len(g)]))
    keep = (np.arange(len(g)) - run_start) < k
    return g[keep].astype(np.int64), i[keep].astype(np.int64), s[keep].astype(np.float64)


@dataclass(frozen=True, eq=False)
class GroupStats:
    """Per-group statistics of one set of samples; merge with :meth:`merge` / :meth:`merge_all`.

    Attributes:
        num_classes: C (the run's classes).
        bins: histogram bins over the score range [0, 1] (equal width; a score of 1.0 is in the last).
        k: top-k list length per group.
        group: str (G,) sorted unique group names.
        usable: int64 (G,) scored samples.
        quarantined: int64 (G,) samples that could not be used (from the read).
        failures: int64 (G,) shard-level read failures (not a tar, truncated, empty).
        score_fx: int64 (G,) sum over samples of ``round(score * SCORE_UNIT)``.
        hist: int64 (G, bins) score histogram.
        isolated: int64 (G, C) samples whose confused-model prediction equals their given label, by label.
        top_group: int64 (T,) index into ``group`` of each top-k entry.
        top_id: int64 (T,) sample ids (``ctray.data.shards.sample_id``) of the top-k entries.
        top_score: float64 (T,) their scores; entries sorted by (group, score desc, id asc).

    Scores are in [0, 1], higher = more suspicious (the final confused model's probability of the
    given label).
    """

    num_classes: int
    bins: int
    k: int
    group: np.ndarray
    usable: np.ndarray
    quarantined: np.ndarray
    failures: np.ndarray
    score_fx: np.ndarray
    hist: np.ndarray
    isolated: np.ndarray
    top_group: np.ndarray
    top_id: np.ndarray
    top_score: np.ndarray

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def empty(cls, num_classes: int, bins: int = 20, k: int = 10) -> GroupStats:
        """No group at all (the identity of :meth:`merge`)."""
        _check_params(num_classes, bins, k)
        z = np.zeros(0, np.int64)
        return cls(int(num_classes), int(bins), int(k), np.zeros(0, dtype="<U1"), z, z, z, z,
                   np.zeros((0, bins), np.int64), np.zeros((0, num_classes), np.int64), z, z,
                   np.zeros(0, np.float64))

    @classmethod
    def from_samples(cls, groups: Sequence[str] | np.ndarray, ids: np.ndarray, scores: np.ndarray,
                     labels: np.ndarray, preds: np.ndarray, num_classes: int, bins: int = 20,
                     k: int = 10) -> GroupStats:
        """Stats of scored samples.

        Args:
            groups: str (N,) group of each sample (shard id or source name).
            ids: int64 (N,) sample ids (used for the top-k lists and their tie-break).
            scores: float (N,) in [0, 1], higher = more suspicious.
            labels: int (N,) given labels in ``[0, num_classes)``.
            preds: int (N,) final confused-model argmax predictions.
            num_classes: C >= 1.
            bins: histogram bins over [0, 1].
            k: top-k list length per group.

        Raises:
            DataError: lengths differ, a score is outside [0, 1] or NaN, a label is out of range.
        """
        _check_params(num_classes, bins, k)
        g = _as_names(groups)
        n = len(g)
        lab = check_labels(labels, num_classes)
        ids_ = np.asarray(ids).astype(np.int64, copy=False)
        sc = np.asarray(scores, dtype=np.float64)
        pr = np.asarray(preds).astype(np.int64, copy=False)
        for nm, a in (("ids", ids_), ("scores", sc), ("labels", lab), ("preds", pr)):
            if a.shape != (n,):
                raise DataError(f"{nm} must have shape ({n},) like groups, got {a.shape}")
        if n and not ((sc >= 0) & (sc <= 1)).all():
            raise DataError(f"scores must lie in [0, 1]; got min {np.nanmin(sc)}, max {np.nanmax(sc)}"
                            f"{' and NaN' if np.isnan(sc).any() else ''}")
        names, inv = np.unique(g, return_inverse=True)
        inv = inv.reshape(-1)
        G = len(names)
        usable = np.bincount(inv, minlength=G).astype(np.int64)
        score_fx = np.zeros(G, np.int64)
        np.add.at(score_fx, inv, np.rint(sc * SCORE_UNIT).astype(np.int64))
        b = np.minimum((sc * bins).astype(np.int64), bins - 1)
        hist = np.bincount(inv * bins + b, minlength=G * bins).reshape(G, bins).astype(np.int64)
        iso = pr == lab
        isolated = np.bincount(inv[iso] * num_classes + lab[iso], minlength=G * num_classes)
        isolated = isolated.reshape(G, num_classes).astype(np.int64)
        tg, ti, ts = _select_top(inv.astype(np.int64), ids_, sc, k)
        z = np.zeros(G, np.int64)
        return cls(int(num_classes), int(bins), int(k), names, usable, z, z.copy(), score_fx, hist, isolated,
                   tg, ti, ts)

    @classmethod
    def from_read(cls, groups: Sequence[str] | np.ndarray, quarantined: np.ndarray, failures: np.ndarray,
                  num_classes: int, bins: int = 20, k: int = 10) -> GroupStats:
        """Read-side counts: per group, quarantined samples and shard-level failures.

        Args:
            groups: str (N,) group of each read row.
            quarantined: bool (N,) the row is a sample that could not be used.
            failures: bool (N,) the row is a shard-level failure (no sample).

        Every group in ``groups`` appears (with zero counts when none of its rows is bad), so a shard
        whose samples are all fine still gets a row.
        """
        _check_params(num_classes, bins, k)
        g = _as_names(groups)
        q = np.asarray(quarantined, dtype=bool)
        f = np.asarray(failures, dtype=bool)
        if q.shape != g.shape or f.shape != g.shape:
            raise DataError(f"quarantined/failures must have shape {g.shape} like groups, got {q.shape}, {f.shape}")
        names, inv = np.unique(g, return_inverse=True)
        inv = inv.reshape(-1)
        G = len(names)
        base = cls.empty(num_classes, bins, k)
        z = np.zeros(G, np.int64)
        return cls(base.num_classes, base.bins, base.k, names, z, np.bincount(inv[q], minlength=G).astype(np.int64),
                   np.bincount(inv[f], minlength=G).astype(np.int64), z.copy(), np.zeros((G, bins), np.int64),
                   np.zeros((G, num_classes), np.int64), base.top_group, base.top_id, base.top_score)

    # -- merging ----------------------------------------------------------------------------------

    def merge(self, other: GroupStats) -> GroupStats:
        """The stats of the union of both sample sets (both inputs untouched)."""
        return GroupStats.merge_all([self, other])

    @staticmethod
    def merge_all(parts: Sequence[GroupStats]) -> GroupStats:
        """Merge any number of stats in one vectorised pass (cost linear in their total size).

        Raises:
            ConfigError: ``parts`` is empty or the parts disagree on ``num_classes``, ``bins`` or ``k``.
        """
        if not parts:
            raise ConfigError("merge_all needs at least one GroupStats")
        first = parts[0]
        for p in parts[1:]:
            if (p.num_classes, p.bins, p.k) != (first.num_classes, first.bins, first.k):
                raise ConfigError(f"cannot merge GroupStats with (num_classes, bins, k) = "
                                  f"{(p.num_classes, p.bins, p.k)} into {(first.num_classes, first.bins, first.k)}")
        if len(parts) == 1:
            return first
        names, inv = np.unique(np.concatenate([p.group for p in parts]), return_inverse=True)
        inv = inv.reshape(-1)
        G = len(names)

        def sum_rows(attr: str, width: int | None) -> np.ndarray:
            out = np.zeros((G,) if width is None else (G, width), np.int64)
            np.add.at(out, inv, np.concatenate([getattr(p, attr) for p in parts]))
            return out

        offsets = np.cumsum([0] + [len(p.group) for p in parts])
        tg = np.concatenate([inv[offsets[i] + p.top_group] for i, p in enumerate(parts)]).astype(np.int64)
        ti = np.concatenate([p.top_id for p in parts])
        ts = np.concatenate([p.top_score for p in parts])
        tg, ti, ts = _select_top(tg, ti, ts, first.k)
        return GroupStats(first.num_classes, first.bins, first.k, names, sum_rows("usable", None),
                          sum_rows("quarantined", None), sum_rows("failures", None), sum_rows("score_fx", None),
                          sum_rows("hist", first.bins), sum_rows("isolated", first.num_classes), tg, ti, ts)

    # -- derived values ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.group)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GroupStats):
            return NotImplemented
        if (self.num_classes, self.bins, self.k) != (other.num_classes, other.bins, other.k):
            return False
        return all(np.array_equal(getattr(self, f), getattr(other, f))
                   for f in ("group", "usable", "quarantined", "failures", "score_fx", "hist", "isolated",
                             "top_group", "top_id", "top_score"))

    __hash__ = None  # type: ignore[assignment]

    @property
    def samples(self) -> np.ndarray:
        """int64 (G,) samples read: usable + quarantined."""
        return self.usable + self.quarantined

    def mean_score(self) -> np.ndarray:
        """float64 (G,) mean score of the usable samples; NaN where a group has none."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.usable > 0, self.score_fx / SCORE_UNIT / np.maximum(self.usable, 1), np.nan)

    def flagged(self, cleansed: np.ndarray) -> np.ndarray:
        """int64 (G,) flagged samples per group under CT's rule: isolated samples of cleansed classes.

        Args:
            cleansed: bool (C,) classes the likelihood-ratio test cleansed.
        """
        cl = np.asarray(cleansed)
        if cl.dtype != np.bool_ or cl.shape != (self.num_classes,):
            raise DataError(f"cleansed must be bool ({self.num_classes},), got {cl.dtype} {cl.shape}")
        return self.isolated[:, cl].sum(axis=1).astype(np.int64)

    def top_lists(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per group (in ``group`` order): ``(ids int64 (<=k,), scores float64 (<=k,))``, best first."""
        cuts = np.searchsorted(self.top_group, np.arange(len(self.group) + 1))
        return [(self.top_id[a:b], self.top_score[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def binomial_marks(flagged: np.ndarray, usable: np.ndarray, alpha: float
                   ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Mark groups with far more flagged samples than their size predicts.

    Under "flags fall on samples independently of their group", a group's flagged count is
    Binomial(n = usable, p = overall flag rate). Its p-value is the upper tail
    ``P(X >= flagged) = scipy.stats.binom.sf(flagged - 1, usable, p)``; a group is marked when the
    p-value is below ``alpha / m`` (Bonferroni over the m groups with a usable sample) and it has a
    flagged sample. The overall rate includes the group itself, which makes the test conservative.

    Args:
        flagged: int (G,) flagged samples per group.
        usable: int (G,) usable samples per group (>= flagged).
        alpha: family-wise error level in (0, 1).

    Returns:
        ``(p_value float64 (G,) in [0, 1] (1 for empty groups), marked bool (G,), rate, level)``
        where ``rate`` is the overall flag rate and ``level = alpha / m``.

    Raises:
        ConfigError: ``alpha`` outside (0, 1).
        DataError: shapes differ, negative counts, or flagged > usable.
    """
    from scipy.stats import binom

    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must lie in (0, 1), got {alpha}")
    f = np.asarray(flagged).astype(np.int64)
    n = np.asarray(usable).astype(np.int64)
    if f.shape != n.shape or f.ndim != 1:
        raise DataError(f"flagged and usable must be 1-D of one shape, got {f.shape} and {n.shape}")
    if (f < 0).any() or (f > n).any():
        raise DataError("flagged counts must lie in [0, usable] for every group")
    total = int(n.sum())
    rate = float(f.sum()) / total if total else 0.0
    m = int((n > 0).sum())
    level = alpha / max(1, m)
    p = np.ones(len(f), np.float64)
    live = (n > 0) & (f > 0)
    if live.any():
        p[live] = np.clip(binom.sf(f[live] - 1, n[live], rate), 0.0, 1.0)
    marked = live & (p < level)
    return p, marked, rate, level


def suspicion_order(p_value: np.ndarray, flagged: np.ndarray, mean_score: np.ndarray,
                    names: np.ndarray) -> np.ndarray:
    """Indices ranking groups most suspicious first: p-value ascending, then flagged count
    descending, then mean score descending (NaN last), then name ascending."""
    ms = np.nan_to_num(np.asarray(mean_score, dtype=np.float64), nan=-1.0)
    return np.lexsort((np.asarray(names).astype(str), -ms, -np.asarray(flagged, dtype=np.int64),
                       np.asarray(p_value, dtype=np.float64)))
