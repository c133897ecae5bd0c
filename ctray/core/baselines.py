"""The baseline poison detectors CT is compared with (specs/ct.md §5), as pure NumPy/SciPy math.

Each detector works on what the engine extracts from the backdoored base model f_base (penultimate
features, or softmax outputs of superimposed images) and returns a :class:`BaselineOutput`: a per-sample
score (higher = more suspicious; only its order within the data set matters) and a flag decided by the
method's own published rule.

- Spectral Signature (Tran et al. 2018), :func:`spectral_signature`: per given class, the squared
  projection on the top principal direction of the class's centred features; the ``k`` highest of EVERY
  class are flagged, ``k = min(int(1.5 * rate * N), |class| // 2)`` (:func:`ss_budget`).
- Activation Clustering (Chen et al. 2018), :func:`activation_clustering`: per class, 2-means on the
  top-10 principal components; the smaller cluster is flagged when it holds < 35% of the class.
  k-means is :func:`kmeans`, a seeded NumPy Lloyd iteration with k-means++ starts (best of ``n_init``),
  not scikit-learn (the core imports neither sklearn nor torch).
- STRIP as a training-set cleanser (Gao et al. 2019), :func:`strip_entropy` + :func:`strip_decide`: the
  mean softmax entropy of a sample superimposed with ``n`` random clean reserve images; samples below
  the 10th percentile of the same statistic on the reserve are flagged.
- SCAn (Tang et al. 2021), :func:`scan`: an EM-fitted global model (between-class covariance ``Su``,
  within-class covariance ``Se``) on the clean reserve's features, then per class a two-subgroup split
  and its test statistic; classes whose MAD anomaly index of the statistic exceeds ``e^2`` are cleansed
  (their subgroup that holds fewer reserve samples is flagged).

All inputs are plain arrays; shapes are stated per function. Deterministic for a given ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctray.core.checks import check_matrix
from ctray.core.distill import check_labels
from ctray.errors import ConfigError, DataError

__all__ = [
    "BaselineOutput",
    "activation_clustering",
    "anomaly_index",
    "kmeans",
    "scan",
    "scan_global_model",
    "scan_split",
    "scan_statistic",
    "spectral_signature",
    "ss_budget",
    "strip_decide",
    "strip_entropy",
    "superimpose_partners",
]

#: SCAn's published cleansing threshold on the anomaly index (Tang et al. 2021: J* > e^2).
SCAN_THRESHOLD = math.exp(2.0)
#: MAD -> standard deviation of a normal distribution.
_MAD_SCALE = 1.4826
#: Convergence tolerance of SCAn's EM loops (the reference's EPS).
_SCAN_EPS = 1e-5


@dataclass
class BaselineOutput:
    """A detector's verdict on N samples.

    Attributes:
        score: float64 (N,), higher = more suspicious. Scales differ between methods: compare ranks,
            not values, across methods.
        flagged: bool (N,), the method's own decision rule.
        info: JSON-safe details (parameters used, per-class statistics).
    """

    score: np.ndarray
    flagged: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


# ------------------------------------------------------------------------------------------ SS


def ss_budget(rate: float, n_total: int, class_size: int) -> int:
    """Samples Spectral Signature removes from one class: ``min(int(1.5 * rate * N), |class| // 2)``.

    Args:
        rate: expected poison fraction of the whole set, in [0, 1] (the oracle rate in the reference;
            1% when there is no attack).
        n_total: N, samples in the whole set.
        class_size: samples with this given label.

    Raises:
        ConfigError: ``rate`` outside [0, 1].
    """
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"the spectral-signature poison rate must lie in [0, 1], got {rate}")
    return int(min(int(1.5 * rate * n_total), class_size // 2))


def spectral_signature(top_projection: np.ndarray, labels: np.ndarray, num_classes: int,
                       rate: float) -> BaselineOutput:
    """Spectral Signature on projections that are already centred per class.

    Args:
        top_projection: float (N,), each sample's projection on its class's top principal direction
            after subtracting the class mean (``ctray.core.pca.project`` with ``principal_axes(1)``).
        labels: int (N,) given labels in ``[0, C)``.
        num_classes: C.
        rate: poison-rate budget (see :func:`ss_budget`).

    Returns:
        score = the squared projection (>= 0, higher = more suspicious; the reference's score). It
        is ranked within each class for the flags; across classes (AUROC) its scale follows each
        class's spread. Flags: the ``k`` highest scores of every class (ties by position).
    """
    lab = check_labels(labels, num_classes)
    z = check_matrix(np.asarray(top_projection).reshape(-1, 1), "top_projection", rows=lab.size)[:, 0]
    n = lab.size
    score = np.zeros(n)
    flagged = np.zeros(n, bool)
    per_class: list[dict[str, Any]] = []
    for c in range(num_classes):
        idx = np.flatnonzero(lab == c)
        if idx.size == 0:
            per_class.append({"class": c, "n": 0, "k": 0})
            continue
        score[idx] = z[idx] ** 2
        k = ss_budget(rate, n, idx.size)
        if k:
            top = idx[np.argsort(-score[idx], kind="stable")[:k]]
            flagged[top] = True
        per_class.append({"class": c, "n": int(idx.size), "k": int(k), "top_eigenvalue": float(score[idx].mean())})
    return BaselineOutput(score, flagged, {"rate": float(rate), "classes": per_class})


# ------------------------------------------------------------------------------------------ AC


def kmeans(x: np.ndarray, k: int = 2, *, n_init: int = 10, max_iter: int = 300, seed: int = 0
           ) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's k-means with k-means++ starts; the best of ``n_init`` runs by inertia.

    Args:
        x: float (n, d) points, n >= 1.
        k: clusters, 1 <= k <= n.
        n_init: independent starts (the reference's scikit-learn default was 10).
        max_iter: Lloyd iterations per start (stops earlier when the assignment no longer changes).
        seed: seeds the starts.

    Returns:
        ``(assign int64 (n,) in [0, k), centers float64 (k, d), inertia)`` where inertia is the sum of
        squared distances to the assigned centres. An empty cluster keeps its previous centre.

    Raises:
        ConfigError: bad ``k`` / ``n_init`` / ``max_iter``.
    """
    pts = check_matrix(x, "x")
    n = pts.shape[0]
    if not 1 <= k <= max(n, 1) or n == 0:
        raise ConfigError(f"k-means needs 1 <= k <= n points, got k={k}, n={n}")
    if n_init < 1 or max_iter < 1:
        raise ConfigError(f"k-means needs n_init >= 1 and max_iter >= 1, got {n_init}, {max_iter}")
    rng = np.random.default_rng(seed)
    sq = (pts ** 2).sum(1)

    def dist2(centers: np.ndarray) -> np.ndarray:
        return np.maximum(sq[:, None] - 2.0 * pts @ centers.T + (centers ** 2).sum(1)[None, :], 0.0)

    best: tuple[np.ndarray, np.ndarray, float] | None = None
    for _ in range(n_init):
        centers = np.empty((k, pts.shape[1]))
        centers[0] = pts[rng.integers(n)]
        closest = dist2(centers[:1])[:, 0]
        for j in range(1, k):  # k-means++: next centre with probability proportional to D(x)^2
            tot = closest.sum()
            pick = rng.choice(n, p=closest / tot) if tot > 0 else rng.integers(n)
            centers[j] = pts[pick]
            closest = np.minimum(closest, dist2(centers[j:j + 1])[:, 0])
        assign = np.full(n, -1)
        for _it in range(max_iter):
            new = dist2(centers).argmin(1)
            if np.array_equal(new, assign):
                break
            assign = new
            for j in range(k):
                m = assign == j
                if m.any():
                    centers[j] = pts[m].mean(0)
        d = dist2(centers)
        assign = d.argmin(1)
        inertia = float(d[np.arange(n), assign].sum())
        if best is None or inertia < best[2]:
            best = (assign.astype(np.int64), centers.copy(), inertia)
    assert best is not None
    return best


def activation_clustering(components: np.ndarray, labels: np.ndarray, num_classes: int, *,
                          max_fraction: float = 0.35, n_init: int = 10, seed: int = 0) -> BaselineOutput:
    """Activation Clustering: per class 2-means on the class's top principal components.

    Args:
        components: float (N, d), each sample's centred projection on its OWN class's top-d principal
            directions (d = 10 in the reference; ``ctray.core.pca.project``).
        labels: int (N,) given labels in ``[0, C)``.
        num_classes: C.
        max_fraction: the smaller cluster is flagged when its share of the class is below this (0.35).
        n_init, seed: :func:`kmeans` starts.

    Returns:
        score = the share of the sample's class OUTSIDE its own cluster, in [0, 1) (a sample of a
        cluster holding 9% of its class scores 0.91; both halves of an even split score ~0.5); equal
        within a cluster. Flags: the smaller cluster of every class whose share is < ``max_fraction``
        (strictly), i.e. ``score > 1 - max_fraction`` on the smaller side.
    """
    lab = check_labels(labels, num_classes)
    z = check_matrix(components, "components", rows=lab.size)
    if not 0.0 < max_fraction <= 0.5:
        raise ConfigError(f"the activation-clustering size threshold must lie in (0, 0.5], got {max_fraction}")
    n = lab.size
    score = np.zeros(n)
    flagged = np.zeros(n, bool)
    per_class: list[dict[str, Any]] = []
    for c in range(num_classes):
        idx = np.flatnonzero(lab == c)
        if idx.size < 2:
            per_class.append({"class": c, "n": int(idx.size), "small_fraction": None, "flagged": False})
            continue
        assign, centers, _ = kmeans(z[idx], 2, n_init=n_init, seed=seed + c)
        sizes = np.bincount(assign, minlength=2)
        small = int(np.argmin(sizes))  # ties: cluster 0
        score[idx] = 1.0 - sizes[assign] / idx.size
        frac = float(sizes[small] / idx.size)
        hit = frac < max_fraction
        if hit:
            flagged[idx[assign == small]] = True
        per_class.append({"class": c, "n": int(idx.size), "small_fraction": frac, "flagged": bool(hit)})
    return BaselineOutput(score, flagged, {"max_fraction": float(max_fraction), "classes": per_class})


# --------------------------------------------------------------------------------------- STRIP


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def superimpose_partners(sample_ids: np.ndarray, n: int, reserve_size: int, seed: int,
                         self_index: np.ndarray | None = None) -> np.ndarray:
    """The ``n`` reserve images STRIP superimposes on each sample, drawn by hashing (seed, sample id).

    Independent of batch composition and order, so every worker and every rerun draws the same
    partners for a sample. Drawn with replacement.

    Args:
        sample_ids: int (B,) stable sample ids.
        n: partners per sample, >= 1.
        reserve_size: m, images in the reserve.
        seed: the run's seed.
        self_index: optional int (B,): the sample's own position in the reserve (-1 for samples that
            are not reserve images); a reserve image is never superimposed on itself (needs m >= 2).

    Returns:
        int64 (B, n) positions in ``[0, m)``.
    """
    if n < 1 or reserve_size < 1:
        raise ConfigError(f"STRIP needs n >= 1 partners and a non-empty reserve, got n={n}, m={reserve_size}")
    sid = np.asarray(sample_ids).astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        key = _splitmix64(sid ^ _splitmix64(np.array([seed], np.int64).view(np.uint64)))
        j = np.arange(n, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
        h = _splitmix64(key[:, None] + j[None, :])
    if self_index is None:
        return (h % np.uint64(reserve_size)).astype(np.int64)
    own = np.asarray(self_index, np.int64)
    is_self = own >= 0
    if is_self.any() and reserve_size < 2:
        raise ConfigError("STRIP on the reserve itself needs at least 2 reserve images")
    out = (h % np.uint64(reserve_size)).astype(np.int64)
    if is_self.any():
        alt = (h[is_self] % np.uint64(reserve_size - 1)).astype(np.int64)
        alt += alt >= own[is_self][:, None]  # skip the sample's own position
        out[is_self] = alt
    return out


def strip_entropy(probs: np.ndarray) -> np.ndarray:
    """Mean Shannon entropy (nats) over the superimposed copies of each sample.

    Args:
        probs: float (B, n, C) softmax outputs of ``n`` superimposed copies of each of B samples.

    Returns:
        float64 (B,) in [0, log C]; low entropy = the prediction ignores the superimposed image (what a
        trigger does).
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 3:
        raise DataError(f"probs must be 3-D (B, n, C), got shape {p.shape}")
    logp = np.log(np.clip(p, 1e-12, 1.0))
    return -(p * logp).sum(-1).mean(-1)


def strip_decide(entropy: np.ndarray, reserve_entropy: np.ndarray, frr: float = 0.1) -> BaselineOutput:
    """STRIP's decision: flag samples whose mean entropy is below the ``frr`` quantile of the reserve's.

    Args:
        entropy: float (N,) :func:`strip_entropy` of the suspect samples.
        reserve_entropy: float (m,) the same statistic of the clean reserve (each reserve image
            superimposed with other reserve images).
        frr: false-rejection rate on clean data that sets the threshold (0.1: the 10th percentile).

    Returns:
        score = -entropy (higher = more suspicious); flags ``entropy < threshold``.
    """
    e = check_matrix(np.asarray(entropy).reshape(-1, 1), "entropy")[:, 0]
    r = check_matrix(np.asarray(reserve_entropy).reshape(-1, 1), "reserve_entropy")[:, 0]
    if r.size == 0:
        raise DataError("STRIP needs the reserve's entropies to set its threshold; the reserve is empty")
    if not 0.0 < frr < 1.0:
        raise ConfigError(f"the STRIP false-rejection rate must lie in (0, 1), got {frr}")
    thr = float(np.quantile(r, frr))
    return BaselineOutput(-e, e < thr, {"threshold": thr, "frr": float(frr), "reserve_size": int(r.size)})


# ---------------------------------------------------------------------------------------- SCAn


def _cov(x: np.ndarray) -> np.ndarray:
    """Unbiased covariance (d, d) of the rows of ``x`` (zeros for < 2 rows)."""
    if x.shape[0] < 2:
        return np.zeros((x.shape[1], x.shape[1]))
    return np.atleast_2d(np.cov(x, rowvar=False))


def scan_global_model(features: np.ndarray, labels: np.ndarray, num_classes: int, *, max_iter: int = 100,
                      tol: float = _SCAN_EPS) -> tuple[np.ndarray, np.ndarray]:
    """SCAn's global model: EM for ``x = mu_class + e`` with ``mu ~ N(0, Su)``, ``e ~ N(0, Se)``.

    Args:
        features: float (n, d) features of the trusted clean reserve (centred here by their mean).
        labels: int (n,) their labels in ``[0, C)``; absent classes are allowed.
        num_classes: C.
        max_iter: EM iterations (100 in the reference); stops when ``|dSu| + |dSe| <= tol``.

    Returns:
        ``(Su, Se)``, float64 (d, d) each: between-class and within-class covariance.
    """
    lab = check_labels(labels, num_classes)
    x = check_matrix(features, "features", rows=lab.size)
    if x.shape[0] < 2:
        raise DataError(f"SCAn's global model needs >= 2 reserve samples, got {x.shape[0]}")
    X = x - x.mean(0)
    counts = np.bincount(lab, minlength=num_classes).astype(np.float64)
    sums = np.zeros((num_classes, X.shape[1]))
    np.add.at(sums, lab, X)
    present = np.flatnonzero(counts > 0)
    means = np.zeros_like(sums)
    means[present] = sums[present] / counts[present, None]
    Su, Se = _cov(means[lab]), _cov(X - means[lab])
    for _ in range(max_iter):
        F = np.linalg.pinv(Se)
        SuF = Su @ F
        um = np.zeros_like(sums)
        for k in present:
            G = -np.linalg.pinv(counts[k] * Su + Se) @ SuF
            um[k] = -(Se @ G @ sums[k])
        u = um[lab]
        Su_new, Se_new = _cov(u), _cov(X - u)
        dist = float(np.linalg.norm(Su_new - Su) + np.linalg.norm(Se_new - Se))
        Su, Se = Su_new, Se_new
        if dist <= tol:
            break
    return Su, Se


def scan_split(x: np.ndarray, F: np.ndarray, rng: np.random.Generator, *, max_iter: int = 100,
               tol: float = _SCAN_EPS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SCAn's two-subgroup split of one class (EM with hard assignments, metric ``F = Se^-1``).

    Args:
        x: float (n, d) the class's centred features, n >= 1.
        F: float (d, d) inverse within-class covariance.
        rng: starts from a random assignment.

    Returns:
        ``(subgroup bool (n,), mu1 (d,), mu2 (d,))``: True = subgroup 1, and the two subgroup means.
    """
    n = int(x.shape[0])  # int, not the stub's Any: picks rng.random's array overload
    z = rng.random(n)
    if n == 1:
        return np.zeros(1, bool), x[0].copy(), x[0].copy()
    if not (z >= 0.5).any():
        z[0] = 1.0
    if not (z < 0.5).any():
        z[0] = 0.0
    last = -np.ones(n)
    u1 = u2 = x.mean(0)
    steps = 0
    while (np.linalg.norm(z - last) > tol and np.linalg.norm((1 - z) - last) > tol and steps < max_iter):
        steps += 1
        last = z.copy()
        g1 = z >= 0.5
        if g1.all() or not g1.any():
            break
        u1, u2 = x[g1].mean(0), x[~g1].mean(0)
        bias = u1 @ F @ u1 - u2 @ F @ u2
        delta = x @ (F @ (u1 - u2))
        z = (bias - 2.0 * delta < 0).astype(np.float64)
    return z >= 0.5, u1, u2


def scan_statistic(x: np.ndarray, Su: np.ndarray, Se: np.ndarray, F: np.ndarray, subgroup: np.ndarray,
                   u1: np.ndarray, u2: np.ndarray) -> float:
    """SCAn's per-class test statistic: log-likelihood gain of two subgroups over one class identity.

    Args:
        x: float (n, d) the class's centred features; ``subgroup`` bool (n,), ``u1``, ``u2`` from
            :func:`scan_split`; ``Su``, ``Se``, ``F = pinv(Se)`` from :func:`scan_global_model`.

    The one-identity model's class mean is the posterior mean ``Su (n Su + Se)^-1 sum(x)`` (the same
    estimate as the E-step of :func:`scan_global_model`). The reference code's ``calc_test`` computes
    ``Se (n Su + Se)^-1 sum(x)`` instead; on constructed features with a planted cluster that version's
    statistic is dominated by the mis-estimated class mean (clean classes 2,500-10,000, the planted
    class's anomaly index 1.9 < e^2) and nothing is cleansed, while the posterior mean gives ~1 for
    clean classes and 4.9 (index 31) for the planted one (``tests/test_core_baselines.py``).

    Returns:
        The statistic divided by n (larger = stronger evidence of two subgroups).
    """
    n = x.shape[0]
    mu = Su @ np.linalg.pinv(n * Su + Se) @ x.sum(0)
    muFmu = mu @ F @ mu
    b1 = muFmu - u1 @ F @ u1
    b2 = muFmu - u2 @ F @ u2
    n1 = int(subgroup.sum())
    sc = n1 * b1 + (n - n1) * b2
    e = np.where(subgroup[:, None], mu - u1, mu - u2)
    sc -= 2.0 * float(((x @ F) * e).sum())
    return float(sc / n)


def anomaly_index(stats: np.ndarray) -> np.ndarray:
    """MAD anomaly index of per-class statistics: ``|a - median(a)| / (1.4826 * MAD(a))``.

    Args:
        stats: float (C,); NaN entries (empty classes) are ignored and get index 0.

    Returns:
        float64 (C,) >= 0 (two-sided, as the reference); ``inf`` where the MAD is 0 and the value
        differs from the median.
    """
    y = np.asarray(stats, dtype=np.float64)
    out = np.zeros(y.shape)
    ok = np.isfinite(y)
    if ok.sum() < 2:
        return out
    a = y[ok]
    scale = np.abs(a).max()
    a = a / scale if scale > 0 else a  # the reference divides by max(y); the index is scale-free
    b = np.abs(a - np.median(a))
    mad = float(np.median(b)) * _MAD_SCALE
    with np.errstate(divide="ignore", invalid="ignore"):
        out[ok] = np.where(b > 0, b / mad, 0.0) if mad > 0 else np.where(b > 0, np.inf, 0.0)
    return out


def scan(features: np.ndarray, labels: np.ndarray, reserve_features: np.ndarray, reserve_labels: np.ndarray,
         num_classes: int, *, threshold: float = SCAN_THRESHOLD, seed: int = 0, max_iter: int = 100
         ) -> BaselineOutput:
    """SCAn as a training-set cleanser (the reference's ``other_cleansers/scan.py`` rule).

    The global model is fitted on the reserve; the per-class split and statistic run on the suspect
    set and the reserve together (``D u R``, centred by their joint mean). A class is cleansed when
    its anomaly index exceeds ``threshold``; of its two subgroups, the one holding fewer reserve
    samples is taken as poison (on a tie: the one with fewer suspect samples; the reference then
    takes subgroup 1) and its suspect samples are flagged.

    Args:
        features: float (N, d) suspect-set features (e.g. PCA-reduced penultimate features).
        labels: int (N,) given labels in ``[0, C)``.
        reserve_features: float (m, d) clean reserve features in the same space; ``reserve_labels``
            int (m,).
        num_classes: C.
        threshold: anomaly-index threshold (``e^2`` as published; the reference code uses ``e``).
        seed: seeds the random starts of the splits.
        max_iter: EM iterations of each fit.

    Returns:
        score = the class's anomaly index for samples in its candidate (poison-side) subgroup, 0 for
        the others (>= 0; ties within a class); flags: candidate subgroups of cleansed classes.
    """
    lab = check_labels(labels, num_classes)
    rlab = check_labels(reserve_labels, num_classes, "reserve_labels")
    xd = check_matrix(features, "features", rows=lab.size)
    xr = check_matrix(reserve_features, "reserve_features", rows=rlab.size)
    if xd.shape[1] != xr.shape[1]:
        raise DataError(f"features ({xd.shape[1]}-d) and reserve_features ({xr.shape[1]}-d) must share a space")
    Su, Se = scan_global_model(xr, rlab, num_classes, max_iter=max_iter)
    F = np.linalg.pinv(Se)
    n = lab.size
    X = np.concatenate([xd, xr])
    X -= X.mean(0)
    all_lab = np.concatenate([lab, rlab])
    is_r = np.concatenate([np.zeros(n, bool), np.ones(rlab.size, bool)])
    rng = np.random.default_rng(seed)
    stats = np.full(num_classes, np.nan)
    candidate = np.zeros(n, bool)
    cand_size = np.zeros(num_classes, np.int64)
    for c in range(num_classes):
        idx = np.flatnonzero(all_lab == c)
        if idx.size < 2:
            continue
        sub, u1, u2 = scan_split(X[idx], F, rng, max_iter=max_iter)
        stats[c] = scan_statistic(X[idx], Su, Se, F, sub, u1, u2)
        r_in = is_r[idx]
        r1, r0 = int((sub & r_in).sum()), int((~sub & r_in).sum())
        side = r1 < r0 if r1 != r0 else int((sub & ~r_in).sum()) <= int((~sub & ~r_in).sum())
        members = idx[(sub == side) & ~r_in]
        candidate[members] = True
        cand_size[c] = members.size
    index = anomaly_index(stats)
    cleansed = index > threshold
    flagged = candidate & cleansed[lab]
    score = np.where(candidate, index[lab], 0.0)
    classes = [{"class": c, "statistic": _finite_or_none(stats[c]), "anomaly_index": _finite_or_none(index[c]),
                "candidate": int(cand_size[c]), "cleansed": bool(cleansed[c])} for c in range(num_classes)]
    return BaselineOutput(score, flagged, {"threshold": float(threshold), "dim": int(xd.shape[1]),
                                           "reserve_size": int(rlab.size), "classes": classes})
