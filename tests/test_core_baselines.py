"""ctray.core.baselines on constructed features: a planted, separable cluster is found; no cluster, no flag.

Data: 10 classes x 200 samples of 16-d Gaussian features with distinct class means; the "poison" are
20 samples labelled 0 whose features sit in a tight cluster far off class 0's mean (what a trigger does
to penultimate features). Hand-computed values for the budgets and the anomaly index.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctray.core.baselines import (
    SCAN_THRESHOLD,
    activation_clustering,
    anomaly_index,
    kmeans,
    scan,
    scan_global_model,
    spectral_signature,
    ss_budget,
    strip_decide,
    strip_entropy,
    superimpose_partners,
)
from ctray.core.metrics import detection_metrics
from ctray.core.pca import FeatureMoments, project
from ctray.errors import ConfigError, DataError

C, PER_CLASS, DIM, N_POISON = 10, 200, 16, 20


def _features(seed: int, planted: bool, per_class: int = PER_CLASS, noise_seed: int = 100):
    """Class means from ``seed`` (the same classes for D and the reserve), noise from ``noise_seed``."""
    means = np.random.default_rng(seed).normal(0, 4.0, (C, DIM))
    rng = np.random.default_rng(noise_seed)
    labels = np.repeat(np.arange(C), per_class)
    x = means[labels] + rng.normal(0, 1.0, (labels.size, DIM))
    poison = np.zeros(labels.size, bool)
    if planted:
        idx = rng.choice(np.flatnonzero(labels != 0), N_POISON, replace=False)
        direction = rng.normal(0, 1.0, DIM)
        direction /= np.linalg.norm(direction)
        x[idx] = means[0] + 8.0 * direction + rng.normal(0, 0.3, (N_POISON, DIM))
        labels[idx] = 0
        poison[idx] = True
    return x, labels, poison


def _class_projections(x, labels, k):
    m = FeatureMoments.zeros(C, DIM)
    m.update(x, labels)
    return project(x, labels, m.principal_axes(k), m.means())


def test_ss_budget_hand_values():
    assert ss_budget(0.01, 2000, 200) == 30  # int(1.5 * 0.01 * 2000)
    assert ss_budget(0.01, 2000, 40) == 20  # capped at |class| // 2
    assert ss_budget(0.0, 2000, 200) == 0
    with pytest.raises(ConfigError, match="rate"):
        ss_budget(1.5, 10, 10)


def test_spectral_signature_finds_planted_cluster():
    x, labels, poison = _features(0, True)
    z = _class_projections(x, labels, 1)[:, 0]
    out = spectral_signature(z, labels, C, rate=N_POISON / labels.size)
    k = ss_budget(N_POISON / labels.size, labels.size, PER_CLASS)
    assert k == 30
    assert out.flagged[poison].all()  # every poison sample is among class 0's top 30
    assert int(out.flagged.sum()) == sum(min(k, int((labels == c).sum()) // 2) for c in range(C))
    m = detection_metrics(out.flagged, poison, out.score)
    assert m["tpr"] == 1.0 and m["auroc"] > 0.99
    # score = squared centred projection; its class mean is the class's top eigenvalue
    for c in range(C):
        assert out.score[labels == c] == pytest.approx(z[labels == c] ** 2)
        ev = np.linalg.eigvalsh(np.cov(x[labels == c], rowvar=False, ddof=0))[-1]
        assert out.info["classes"][c]["top_eigenvalue"] == pytest.approx(ev)
    assert [d["k"] for d in out.info["classes"]] == [30] * C


def test_kmeans_two_blobs_deterministic():
    rng = np.random.default_rng(1)
    a = rng.normal(0, 0.5, (50, 3))
    b = rng.normal(0, 0.5, (30, 3)) + 10
    pts = np.concatenate([a, b])
    assign, centers, inertia = kmeans(pts, 2, seed=3)
    assert len(set(assign[:50])) == 1 and len(set(assign[50:])) == 1 and assign[0] != assign[50]
    assert np.allclose(np.sort(centers[:, 0]), [a[:, 0].mean(), b[:, 0].mean()])
    assert inertia == pytest.approx(((a - a.mean(0)) ** 2).sum() + ((b - b.mean(0)) ** 2).sum())
    again = kmeans(pts, 2, seed=3)
    assert np.array_equal(again[0], assign)
    with pytest.raises(ConfigError, match="k-means"):
        kmeans(pts[:1], 2)


def test_activation_clustering_flags_exactly_the_planted_cluster():
    x, labels, poison = _features(0, True)
    z = _class_projections(x, labels, 10)
    out = activation_clustering(z, labels, C, seed=0)
    assert np.array_equal(out.flagged, poison)
    cls = out.info["classes"]
    assert cls[0]["flagged"] and cls[0]["small_fraction"] == pytest.approx(N_POISON / 220)
    assert not any(c["flagged"] for c in cls[1:])
    assert detection_metrics(out.flagged, poison, out.score)["auroc"] > 0.99


def test_activation_clustering_no_cluster_flags_nothing():
    x, labels, _ = _features(2, False)
    out = activation_clustering(_class_projections(x, labels, 10), labels, C, seed=0)
    assert not out.flagged.any()
    assert all(c["small_fraction"] >= 0.35 for c in out.info["classes"])


def test_strip_entropy_and_decision_hand_values():
    uniform = np.full((1, 4, 4), 0.25)
    onehot = np.zeros((1, 4, 4))
    onehot[..., 2] = 1.0
    ent = strip_entropy(np.concatenate([uniform, onehot]))
    assert ent == pytest.approx([math.log(4), 0.0], abs=1e-9)
    reserve = np.arange(1, 11, dtype=float)  # 10th percentile (linear) = 1.9
    out = strip_decide(np.array([0.5, 1.8, 1.95, 5.0]), reserve, frr=0.1)
    assert out.info["threshold"] == pytest.approx(1.9)
    assert out.flagged.tolist() == [True, True, False, False]
    assert out.score.tolist() == [-0.5, -1.8, -1.95, -5.0]
    with pytest.raises(DataError, match="reserve"):
        strip_decide(np.ones(2), np.array([]))


def test_superimpose_partners_deterministic_in_range_and_never_self():
    sids = np.array([5, -7, 123456789012345, 5], np.int64)
    p = superimpose_partners(sids, 50, 13, seed=0)
    assert p.shape == (4, 50) and p.min() >= 0 and p.max() < 13
    assert np.array_equal(p[0], p[3])  # same sample, same partners whatever the batch
    assert not np.array_equal(p[0], p[1])
    assert not np.array_equal(p, superimpose_partners(sids, 50, 13, seed=1))
    own = np.array([0, 12, -1, 6])
    q = superimpose_partners(sids, 200, 13, seed=0, self_index=own)
    for row, o in zip(q, own, strict=True):
        assert o < 0 or not (row == o).any()
    assert q.max() < 13 and len(np.unique(q[0])) > 8  # spread over the reserve


def test_anomaly_index_hand_values():
    # a = y / max = [0.1, 0.2, 0.3, 1.0]; median 0.25; |a - m| = [.15, .05, .05, .75]; MAD = 0.1
    idx = anomaly_index(np.array([1.0, 2.0, 3.0, 10.0]))
    assert idx == pytest.approx(np.array([0.15, 0.05, 0.05, 0.75]) / (0.1 * 1.4826))
    assert anomaly_index(np.array([2.0, np.nan, 2.0, 2.0])).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert np.isinf(anomaly_index(np.array([1.0, 1.0, 1.0, 5.0]))[3])


def test_scan_global_model_recovers_covariances():
    rng = np.random.default_rng(4)
    k, per, d = 40, 60, 3
    mu = rng.normal(0, 2.0, (k, d))  # Su ~ 4 I
    lab = np.repeat(np.arange(k), per)
    x = mu[lab] + rng.normal(0, 0.5, (lab.size, d))  # Se ~ 0.25 I
    Su, Se = scan_global_model(x, lab, k)
    assert np.allclose(np.diag(Se), 0.25, rtol=0.15)
    assert np.allclose(np.diag(Su), np.var(mu, axis=0, ddof=1), rtol=0.15)


def test_scan_cleanses_the_planted_class_only():
    x, labels, poison = _features(0, True)
    # the reserve: the same class means, its own noise, no poison
    xr, lr = _features(0, False, per_class=60, noise_seed=7)[:2]
    out = scan(x, labels, xr, lr, C, seed=0)
    cls = out.info["classes"]
    assert cls[0]["cleansed"] and cls[0]["anomaly_index"] > SCAN_THRESHOLD
    assert not any(c["cleansed"] for c in cls[1:])
    m = detection_metrics(out.flagged, poison, out.score)
    assert m["tpr"] == 1.0 and m["fpr"] == 0.0, m


def test_scan_no_cluster_cleanses_nothing():
    x, labels, _ = _features(0, False)
    xr, lr = _features(0, False, per_class=60, noise_seed=7)[:2]
    out = scan(x, labels, xr, lr, C, seed=0)
    assert not out.flagged.any()
    assert max(c["anomaly_index"] for c in out.info["classes"]) < SCAN_THRESHOLD


def test_input_validation_names_the_input():
    with pytest.raises(DataError, match="components must have 3 rows"):
        activation_clustering(np.zeros((2, 2)), np.array([0, 1, 1]), 2)
    with pytest.raises(DataError, match="share a space"):
        scan(np.zeros((4, 2)), np.zeros(4, int), np.zeros((4, 3)), np.zeros(4, int), 1)
    with pytest.raises(DataError, match="non-finite"):
        spectral_signature(np.array([np.nan, 1.0]), np.array([0, 0]), 1, 0.1)
