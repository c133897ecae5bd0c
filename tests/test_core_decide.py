"""ctray.core.pca + ctray.core.decide: mergeable moments, per-class PCA, the likelihood-ratio test."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import ctray.core.pca as pca_mod
from ctray.core.decide import (
    COV_JITTER,
    LOG_LR_CAP,
    Decision,
    corroborate,
    corroboration,
    decide,
    flag_samples,
    likelihood_ratio_test,
    likelihood_ratios,
    weak_classes,
)
from ctray.core.pca import FeatureMoments, project
from ctray.errors import ConfigError, DataError

# ---------------------------------------------------------------- FeatureMoments


def _moments_direct(x, labels, c):
    cnt = np.bincount(labels, minlength=c)
    s = np.zeros((c, x.shape[1]))
    o = np.zeros((c, x.shape[1], x.shape[1]))
    for i in range(len(labels)):
        s[labels[i]] += x[i]
        o[labels[i]] += np.outer(x[i], x[i])
    return cnt, s, o


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(0, 40),
    d=st.integers(1, 5),
    c=st.integers(1, 12),
)
def test_moments_merge_of_halves_equals_one_pass(data, n, d, c):
    x = data.draw(arrays(np.float64, (n, d), elements=st.floats(-100, 100, allow_nan=False)))
    labels = np.array(data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)), dtype=np.int64)
    cut = data.draw(st.integers(0, n))
    one = FeatureMoments.zeros(c, d)
    one.update(x, labels)
    a, b = FeatureMoments.zeros(c, d), FeatureMoments.zeros(c, d)
    a.update(x[:cut], labels[:cut])
    b.update(x[cut:], labels[cut:])
    a_count = a.count.copy()
    merged = a.merge(b)
    np.testing.assert_array_equal(a.count, a_count)  # merge leaves its inputs alone
    np.testing.assert_array_equal(merged.count, one.count)
    np.testing.assert_allclose(merged.sum, one.sum, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(merged.outer, one.outer, rtol=1e-12, atol=1e-7)
    cnt, s, o = _moments_direct(x, labels, c)
    np.testing.assert_array_equal(one.count, cnt)
    np.testing.assert_allclose(one.sum, s, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(one.outer, o, rtol=1e-12, atol=1e-7)


def test_moments_gemm_and_chunked_paths_agree(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 7))
    few = rng.integers(0, 3, 300)  # 3 groups of ~100 rows: one GEMM per class
    many = rng.integers(0, 200, 300)  # ~1.5 rows per class: chunked per-sample outer products
    for labels, c in [(few, 3), (many, 200)]:
        cnt, s, o = _moments_direct(x, labels, c)
        m = FeatureMoments.zeros(c, 7)
        monkeypatch.setattr(pca_mod, "_OUTER_CHUNK_ELEMS", 7 * 7 * 16)  # 16-row chunks straddle classes
        m.update(x, labels)
        np.testing.assert_allclose(m.outer, o, rtol=1e-12, atol=1e-10)
        np.testing.assert_allclose(m.sum, s, rtol=1e-12, atol=1e-10)
        np.testing.assert_array_equal(m.count, cnt)


def test_principal_axes_match_numpy_svd_up_to_sign():
    rng = np.random.default_rng(3)
    d, c = 8, 3
    x_all, lab_all = [], []
    for cls in range(c):
        q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        scales = np.array([6.0, 3.0, 1.0, 0.8, 0.6, 0.4, 0.3, 0.2])
        x = (rng.normal(size=(200, d)) * scales) @ q.T + rng.normal(size=d) * 5
        x_all.append(x)
        lab_all.append(np.full(200, cls))
    x, lab = np.concatenate(x_all), np.concatenate(lab_all)
    perm = rng.permutation(x.shape[0])
    m = FeatureMoments.zeros(c, d)
    for chunk in np.array_split(perm, 7):
        m.update(x[chunk], lab[chunk])
    axes = m.principal_axes(k=2)
    assert axes.shape == (c, d, 2)
    means = m.means()
    for cls in range(c):
        xc = x[lab == cls]
        np.testing.assert_allclose(means[cls], xc.mean(axis=0), atol=1e-10)
        _, _, vt = np.linalg.svd(xc - xc.mean(axis=0), full_matrices=False)
        for j in range(2):
            assert abs(abs(float(axes[cls, :, j] @ vt[j])) - 1.0) < 1e-8
            big = np.argmax(np.abs(axes[cls, :, j]))
            assert axes[cls, big, j] > 0  # sign convention
    np.testing.assert_allclose(m.covariances()[0], np.cov(x[lab == 0], rowvar=False, ddof=0), atol=1e-9)
    # centred projection onto the own class's axes
    proj = project(x, lab, axes, means)
    manual = np.stack([(x[i] - means[lab[i]]) @ axes[lab[i]] for i in range(x.shape[0])])
    np.testing.assert_allclose(proj, manual, atol=1e-10)
    for cls in range(c):
        np.testing.assert_allclose(proj[lab == cls].mean(axis=0), 0.0, atol=1e-9)


def test_principal_axes_zero_for_tiny_classes_and_k_validation():
    m = FeatureMoments.zeros(3, 4)
    m.update(np.arange(12.0).reshape(3, 4), np.array([0, 0, 1]))
    axes = m.principal_axes(2)
    assert np.all(axes[1] == 0) and np.all(axes[2] == 0)
    assert np.linalg.norm(axes[0][:, 0]) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="k must"):
        m.principal_axes(5)
    with pytest.raises(ConfigError, match="k must"):
        m.principal_axes(0)


def test_moments_validation():
    m = FeatureMoments.zeros(2, 3)
    with pytest.raises(DataError, match="features must have D = 3"):
        m.update(np.zeros((2, 4)), np.array([0, 1]))
    with pytest.raises(DataError, match="same length"):
        m.update(np.zeros((2, 3)), np.array([0]))
    with pytest.raises(DataError, match="labels must lie"):
        m.update(np.zeros((1, 3)), np.array([2]))
    with pytest.raises(DataError, match="non-finite"):
        m.update(np.full((1, 3), np.nan), np.array([0]))
    with pytest.raises(DataError, match="cannot merge"):
        m.merge(FeatureMoments.zeros(3, 3))
    with pytest.raises(ConfigError, match="dim"):
        FeatureMoments.zeros(2, 0)
    with pytest.raises(DataError, match="means must have shape"):
        project(np.zeros((1, 3)), np.array([0]), np.zeros((2, 3, 2)), np.zeros((2, 4)))


# ---------------------------------------------------------------- likelihood ratios


def _log_gauss(x, mu, cov):
    d = x - mu
    return -np.log(2 * np.pi) - 0.5 * np.log(np.linalg.det(cov)) - 0.5 * d @ np.linalg.inv(cov) @ d


def test_lr_jitter_on_every_entry_matches_hand_computation():
    pts_o = np.array([[0.00, 0.01], [0.03, -0.02], [-0.02, 0.04], [0.01, 0.00]])
    pts_i = np.array([[0.20, 0.21], [0.23, 0.18], [0.19, 0.22]])
    proj = np.concatenate([pts_o, pts_i])
    labels = np.zeros(7, dtype=np.int64)
    preds = np.array([1, 1, 1, 1, 0, 0, 0])

    def hand(jitter):
        mu_o, mu_i = pts_o.mean(0), pts_i.mean(0)
        cov_o = (pts_o - mu_o).T @ (pts_o - mu_o) / 3 + jitter
        cov_i = (pts_i - mu_i).T @ (pts_i - mu_i) / 2 + jitter
        s = sum(_log_gauss(x, mu_i, cov_i) - _log_gauss(x, mu_o, cov_o) for x in pts_i)
        return np.exp(s / 7)

    lr = likelihood_ratios(proj, labels, preds, 2)
    assert COV_JITTER == 0.001
    assert lr[0] == pytest.approx(hand(np.full((2, 2), 0.001)), rel=1e-10)
    assert lr[0] != pytest.approx(hand(0.001 * np.eye(2)), rel=1e-3)  # diagonal-only jitter differs
    assert lr[1] == 1.0  # empty class


@pytest.mark.parametrize(
    ("n_iso", "expect_one"),
    [(0, True), (1, True), (2, False), (8, False), (9, True), (10, True)],
)
def test_lr_is_one_outside_size_condition(n_iso, expect_one):
    rng = np.random.default_rng(n_iso)
    proj = rng.normal(size=(10, 2))
    labels = np.zeros(10, dtype=np.int64)
    preds = np.where(np.arange(10) < n_iso, 0, 1)
    lr = likelihood_ratios(proj, labels, preds, 1)
    assert (lr[0] == 1.0) == expect_one
    assert np.isfinite(lr).all() and (lr > 0).all()


def test_lr_singular_covariances_are_finite():
    # O collinear along (1, 1): its jittered covariance is singular; isolated points lie off its support.
    proj = np.array([(0, 0), (1, 1), (2, 2), (5, 0), (6, 0.5), (5.5, 1)], float)
    preds = np.array([1, 1, 1, 0, 0, 0])
    lr = likelihood_ratios(proj, np.zeros(6, np.int64), preds, 2)
    assert lr[0] == pytest.approx(np.exp(LOG_LR_CAP))
    assert np.isfinite(lr).all()
    # identical points in both groups: equal densities, no evidence
    lr = likelihood_ratios(np.zeros((6, 2)), np.zeros(6, np.int64), preds, 1)
    assert lr[0] == pytest.approx(1.0)


def test_lr_validation():
    labels = np.zeros(4, np.int64)
    with pytest.raises(DataError, match="proj must have shape"):
        likelihood_ratios(np.zeros((4, 3)), labels, labels, 1)
    with pytest.raises(DataError, match="non-finite"):
        likelihood_ratios(np.full((4, 2), np.inf), labels, labels, 1)
    with pytest.raises(DataError, match="preds must have the same length"):
        likelihood_ratios(np.zeros((4, 2)), labels, labels[:3], 1)
    with pytest.raises(DataError, match="preds must hold integers"):
        likelihood_ratios(np.zeros((4, 2)), labels, labels.astype(float), 1)
    with pytest.raises(DataError, match="proj must have the same length"):
        likelihood_ratios(np.zeros((3, 2)), labels, labels, 1)


def _synthetic_features(seed, d=16, per_class=400, num_classes=4, poison_class=0, n_poison=40):
    """Gaussian-blob classes; class `poison_class` also holds a well-separated cluster predicted as itself,
    while every other class has a random 10% subset 'predicted as its own class'."""
    rng = np.random.default_rng(seed)
    feats, labels, preds, poison = [], [], [], []
    for c in range(num_classes):
        center = rng.normal(size=d) * 3
        x = center + rng.normal(size=(per_class, d))
        pred = np.where(rng.random(per_class) < 0.1, c, (c + 1) % num_classes)
        is_p = np.zeros(per_class, bool)
        if c == poison_class:
            direction = rng.normal(size=d)
            direction /= np.linalg.norm(direction)
            x[:n_poison] = center + 8 * direction + 0.5 * rng.normal(size=(n_poison, d))
            pred[:n_poison] = c
            pred[n_poison:] = (c + 1) % num_classes  # clean samples of the target class are confused
            is_p[:n_poison] = True
        feats.append(x)
        labels.append(np.full(per_class, c))
        preds.append(pred)
        poison.append(is_p)
    perm = rng.permutation(per_class * num_classes)
    return tuple(np.concatenate(a)[perm] for a in (feats, labels, preds, poison))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_separated_isolated_cluster_is_cleansed_blobs_are_not(seed):
    x, labels, preds, poison = _synthetic_features(seed)
    c = 4
    # moments folded in 3 "shards", merged, axes computed once, shards projected separately
    shards = np.array_split(np.arange(x.shape[0]), 3)
    parts = []
    for s in shards:
        m = FeatureMoments.zeros(c, x.shape[1])
        m.update(x[s], labels[s])
        parts.append(m)
    moments = parts[0].merge(parts[1]).merge(parts[2])
    axes, means = moments.principal_axes(2), moments.means()
    proj = np.concatenate([project(x[s], labels[s], axes, means) for s in shards])
    dec = likelihood_ratio_test(proj, labels, preds, c)
    assert dec.lr[0] > 2.0
    assert np.all(dec.lr[1:] < 1.5), dec.lr
    np.testing.assert_array_equal(dec.cleansed, [True, False, False, False])
    np.testing.assert_array_equal(dec.flagged, poison)  # exactly the isolated cluster
    np.testing.assert_array_equal(dec.n, [400] * 4)
    assert dec.n_isolated[0] == 40


@pytest.mark.parametrize("seed", [10, 11, 12, 13, 14, 15])
def test_no_attack_blobs_stay_below_threshold(seed):
    rng = np.random.default_rng(seed)
    n, c = 3000, 10
    labels = rng.integers(0, c, n)
    scale = rng.uniform(0.1, 10, size=c)  # per-class spread, from jitter-sized to large
    proj = rng.normal(size=(n, 2)) * scale[labels][:, None]
    rate = rng.uniform(0.005, 0.3, size=c)  # from a handful to a third of each class isolated
    preds = np.where(rng.random(n) < rate[labels], labels, (labels + 1) % c)
    lr = likelihood_ratios(proj, labels, preds, c)
    assert np.all(lr < 1.5), lr
    assert not decide(lr).any()


# ---------------------------------------------------------------- decide / flag / Decision


@pytest.mark.parametrize(
    ("lr", "expected"),
    [
        ([1.6, 1.0, 1.2], [True, False, False]),  # max and > 1.5
        ([1.4, 1.0, 1.2], [False, False, False]),  # max but <= 1.5
        ([1.5, 1.0], [False, False]),  # strict >
        ([1.6, 1.7, 1.0], [False, True, False]),  # 1.6 is not the max and not > 2
        ([2.5, 3.0, 1.6], [True, True, False]),  # any class > 2
        ([2.0, 1.9], [True, False]),  # 2.0 is the max (> 1.5) though not > 2
        ([1.6, 1.6, 1.0], [True, True, False]),  # ties at the max
        ([1.0], [False]),
    ],
)
def test_decide_rules(lr, expected):
    np.testing.assert_array_equal(decide(np.array(lr)), expected)


def test_decide_custom_thresholds_and_validation():
    np.testing.assert_array_equal(decide(np.array([3.0, 2.5]), threshold_max=4, threshold_any=2.4),
                                  [True, True])
    np.testing.assert_array_equal(decide(np.array([3.0, 2.5]), threshold_max=4, threshold_any=2.6),
                                  [True, False])
    with pytest.raises(ConfigError, match="threshold_max"):
        decide(np.ones(2), threshold_max=float("nan"))
    with pytest.raises(ConfigError, match="threshold_any"):
        decide(np.ones(2), threshold_any="2")
    with pytest.raises(DataError, match="lr must be a non-empty"):
        decide(np.array([]))
    with pytest.raises(DataError, match="lr must be finite"):
        decide(np.array([np.inf, 1.0]))


def test_flag_samples():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 2, 0])
    cleansed = np.array([True, True, False])
    np.testing.assert_array_equal(flag_samples(labels, preds, cleansed), [True, False, True, True, False, False])
    with pytest.raises(DataError, match="cleansed must be"):
        flag_samples(labels, preds, np.array([1, 0, 0]))
    with pytest.raises(DataError, match="labels must lie"):
        flag_samples(labels, preds, np.array([True, False]))


def test_decision_to_json_is_plain_and_complete():
    x, labels, preds, _ = _synthetic_features(0, d=8, per_class=100, n_poison=10)
    m = FeatureMoments.zeros(4, 8)
    m.update(x, labels)
    proj = project(x, labels, m.principal_axes(), m.means())
    dec = likelihood_ratio_test(proj, labels, preds, 4, threshold_max=1.5, threshold_any=2.0)
    assert isinstance(dec, Decision)
    doc = dec.to_json()
    text = json.dumps(doc, allow_nan=False)
    back = json.loads(text)
    assert [row["class"] for row in back["classes"]] == [0, 1, 2, 3]
    assert set(back["classes"][0]) == {"class", "n", "n_isolated", "lr", "cleansed", "weak", "corroboration", "vetoed"}
    assert back["threshold_max"] == 1.5 and back["threshold_any"] == 2.0 and back["weak_lr"] == 10.0
    assert back["corroborate"] == 0.0 and not any(r["vetoed"] for r in back["classes"])
    assert all(r["corroboration"] is None for r in back["classes"])  # the paper's one-call test has no rounds
    assert back["n_flagged"] == dec.n_flagged == int(dec.flagged.sum())
    assert sum(r["n"] for r in back["classes"]) == x.shape[0]
    assert all(type(r["cleansed"]) is bool and type(r["lr"]) is float for r in doc["classes"])


def test_decision_from_outcome_counts_the_given_samples_and_marks_weak_classes():
    # the engine passes its real samples only (canaries cut off): counts must describe exactly those
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    preds = np.array([0, 0, 1, 1, 0, 2, 2, 0, 2])
    lr = np.array([2.63, 1.0, 153.0])
    cleansed = decide(lr)
    flagged = flag_samples(labels, preds, cleansed)
    dec = Decision.from_outcome(lr, cleansed, flagged, labels, preds, 1.5, 2.0, weak_lr=10.0)
    assert dec.n.tolist() == [3, 2, 4] and dec.n_isolated.tolist() == [2, 1, 3]
    assert dec.cleansed.tolist() == [True, False, True] and dec.weak.tolist() == [True, False, False]
    assert dec.n_flagged == 5
    doc = dec.to_json()
    assert [r["weak"] for r in doc["classes"]] == [True, False, False] and doc["n_flagged"] == 5
    with pytest.raises(DataError, match="flagged must have the same length"):
        Decision.from_outcome(lr, cleansed, flagged[:-1], labels, preds, 1.5, 2.0)
    with pytest.raises(ConfigError, match="weak_lr"):
        Decision.from_outcome(lr, cleansed, flagged, labels, preds, 1.5, 2.0, weak_lr=float("nan"))


def test_weak_classes_marks_cleansed_classes_under_the_bar_only():
    # the measured cases (README "Detection per attack"): a benign class cleansed at LR 2.63 when wanet
    # escaped, a detected target at 153; the decision itself is untouched
    lr = np.array([153.0, 1.05, 2.63, 1.62, 1e111])
    cleansed = np.array([True, False, True, False, True])
    np.testing.assert_array_equal(weak_classes(lr, cleansed, 10.0), [False, False, True, False, False])
    assert not weak_classes(lr, cleansed, 0.0).any()
    with pytest.raises(ConfigError, match="weak_lr must be a finite number"):
        weak_classes(lr, cleansed, float("nan"))
    with pytest.raises(ValueError, match="same shape"):
        weak_classes(lr, cleansed[:2], 10.0)


def _rounds_case():
    """20 samples, 2 classes. Final preds isolate samples 0-3 of class 0 and 10-13 of class 1.
    Round A fits 0-3 best of all of D (poison-like); round B fits 10-11 best (half of class 1's set)."""
    labels = np.array([0] * 10 + [1] * 10)
    preds = np.array([0] * 4 + [1] * 6 + [1] * 4 + [0] * 6)
    a = np.full(20, 2.0, np.float32)
    a[:4] = [0.01, 0.02, 0.03, 0.04]
    b = np.full(20, 2.0, np.float32)
    b[10:12] = [0.1, 0.2]
    b[5:7] = [0.05, 0.06]  # two samples outside both isolated sets are fit better still
    return labels, preds, [a, b]


def test_corroboration_is_the_best_round_share_of_the_lowest_losses():
    labels, preds, rounds = _rounds_case()
    corr = corroboration(rounds, labels, preds, [0, 1], 2)
    # class 0: round A's 4 lowest are exactly 0-3 -> 1.0; class 1: round B's 4 lowest are 5, 6, 10, 11 -> 0.5
    np.testing.assert_allclose(corr, [1.0, 0.5])
    only0 = corroboration(rounds, labels, preds, [0], 2)
    assert only0[0] == 1.0 and np.isnan(only0[1])  # classes not asked for stay NaN
    assert np.isnan(corroboration([], labels, preds, [0], 2)).all()  # no round to compare with
    none_iso = preds.copy()
    none_iso[:4] = 1
    assert np.isnan(corroboration(rounds, labels, none_iso, [0], 2)[0])  # |I_0| = 0
    # ties at the bar never count more than |I_c|
    flat = [np.zeros(20, np.float32)]
    assert corroboration(flat, labels, preds, [0], 2)[0] == 1.0


def test_corroboration_validation():
    labels, preds, rounds = _rounds_case()
    with pytest.raises(DataError, match=r"round_losses\[1\] must have shape \(20,\)"):
        corroboration([rounds[0], rounds[1][:5]], labels, preds, [0], 2)
    with pytest.raises(DataError, match="class 2 out of range"):
        corroboration(rounds, labels, preds, [2], 2)
    bad = rounds[0].copy()
    bad[1] = np.nan
    with pytest.raises(DataError, match=r"round_losses\[0\] holds non-finite losses in class 0"):
        corroboration([bad], labels, preds, [0], 2)


def test_corroborate_vetoes_weak_uncorroborated_classes_only():
    cleansed = np.array([True, True, True, False, True])
    weak = np.array([True, True, False, False, True])
    corr = np.array([0.12, 0.53, 0.0, 0.0, np.nan])
    # class 0: weak, 0.12 < 0.4 -> vetoed; 1: weak but corroborated; 2: strong (never vetoed);
    # 3: not cleansed; 4: weak but not evaluated (NaN) -> kept
    np.testing.assert_array_equal(corroborate(cleansed, weak, corr, 0.4), [False, True, True, False, True])
    np.testing.assert_array_equal(corroborate(cleansed, weak, corr, 0.0), cleansed)  # off = the paper
    with pytest.raises(ConfigError, match=r"decide.corroborate must be in \[0, 1\]"):
        corroborate(cleansed, weak, corr, 1.5)
    with pytest.raises(ValueError, match="same shape"):
        corroborate(cleansed, weak[:2], corr, 0.4)


def test_decision_records_corroboration_and_vetoed_classes():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    preds = np.array([0, 0, 1, 1, 0, 2, 2, 0, 2])
    lr = np.array([2.63, 1.0, 153.0])
    vetoed = np.array([True, False, False])
    cleansed = decide(lr) & ~vetoed
    dec = Decision.from_outcome(lr, cleansed, flag_samples(labels, preds, cleansed), labels, preds, 1.5, 2.0,
                                corroboration=np.array([0.1, np.nan, np.nan]), vetoed=vetoed, corroborate=0.4)
    doc = json.loads(json.dumps(dec.to_json(), allow_nan=False))
    assert doc["corroborate"] == 0.4 and doc["n_flagged"] == 3  # class 2's isolated only
    assert [r["vetoed"] for r in doc["classes"]] == [True, False, False]
    assert [r["corroboration"] for r in doc["classes"]] == [0.1, None, None]
    assert not doc["classes"][0]["cleansed"] and not doc["classes"][0]["weak"]  # vetoed: neither
