"""The cross-class detector's math (ctray.core.xclass) against direct NumPy / SciPy computations, on
constructed inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import betabinom, binom, fisher_exact

from ctray.core.pca import FeatureMoments
from ctray.core.xclass import (
    FLAGGED_BY,
    REST,
    SUSPECT,
    choose_threshold,
    decide_xclass,
    fisher_direction,
    flagged_by,
    group_of,
    half_moments,
    loss_threshold,
    project,
)
from ctray.errors import ConfigError, DataError


def _moments(h: np.ndarray, suspect: np.ndarray, batches: int = 1) -> FeatureMoments:
    m = FeatureMoments.zeros(2, h.shape[1])
    for part in np.array_split(np.arange(len(h)), batches):
        m.update(h[part], np.where(suspect[part], SUSPECT, REST))
    return m


def test_fisher_direction_matches_a_direct_computation_and_merges_over_batches():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    sus = rng.random(500) < 0.2
    mean, v = fisher_direction(_moments(h, sus), ridge=0.01)
    cov = np.cov(h, rowvar=False, bias=True)
    direct = np.linalg.solve(cov + 0.01 * np.trace(cov) / 6 * np.eye(6), h[sus].mean(0) - h.mean(0))
    direct /= np.sqrt(direct @ cov @ direct)
    np.testing.assert_allclose(mean, h.mean(0), rtol=1e-10)
    np.testing.assert_allclose(v, direct, rtol=1e-8)
    s = project(h, mean, v)
    assert abs(s.mean()) < 1e-9 and abs(s.std() - 1) < 1e-9  # unit variance over D
    # the same from 7 partial moments merged in another order (what the workers send)
    parts = [_moments(h[i::7], sus[i::7]) for i in range(7)]
    total = parts[3]
    for p in parts[:3] + parts[4:]:
        total = total.merge(p)
    mean2, v2 = fisher_direction(total, ridge=0.01)
    np.testing.assert_allclose(v2, v, rtol=1e-8)


def test_shared_trigger_among_suspects_is_what_the_direction_finds():
    """1,000 clean samples, 60 hard clean ones (suspects by loss, features noisy in every direction), 20
    poison (suspects too, sharing a shift of 6 on feature 3): the poison scores highest."""
    rng = np.random.default_rng(1)
    h = rng.normal(size=(1080, 8))
    h[1000:1060] += rng.normal(scale=1.5, size=(60, 8))
    h[1060:, 3] += 6.0
    sus = np.zeros(1080, bool)
    sus[1000:] = True
    mean, v = fisher_direction(_moments(h, sus, batches=5), ridge=1e-3)
    s = project(h, mean, v)
    assert np.argmax(np.abs(v)) == 3 and v[3] > 0
    rank = np.argsort(np.argsort(-s))
    assert (rank[1060:] < 20).sum() >= 16 and (rank[1060:] < 30).all()  # the hard ones blur the mean a little


def test_no_suspect_or_no_difference_gives_a_zero_direction():
    h = np.random.default_rng(2).normal(size=(50, 3))
    _, v = fisher_direction(_moments(h, np.zeros(50, bool)), 1e-3)
    assert not v.any()
    with pytest.raises(DataError, match="two-group"):
        fisher_direction(FeatureMoments.zeros(3, 2), 1e-3)
    with pytest.raises(ConfigError, match="ridge"):
        fisher_direction(_moments(h, np.ones(50, bool)), -1)


def test_loss_threshold_is_the_reserve_quantile():
    x = np.arange(101, dtype=np.float32)
    assert loss_threshold(x, 0.95) == pytest.approx(95.0)
    with pytest.raises(ConfigError, match="loss_quantile"):
        loss_threshold(x, 1.0)
    with pytest.raises(DataError, match="non-empty finite"):
        loss_threshold(np.array([1.0, np.nan]), 0.5)


@pytest.mark.parametrize(("k", "n", "k_ref", "n_ref"), [(12, 10000, 0, 1000), (105, 10000, 0, 1000),
                                                         (3, 500, 2, 500), (0, 100, 0, 10)])
def test_plug_in_test_is_a_one_sided_binomial_test_against_the_reserve_rate(k, n, k_ref, n_ref):
    d = decide_xclass(k, n, k_ref, n_ref, 1e-3, 1.5, 2.0, 400, test="plug-in")
    p0 = (k_ref + 1) / (n_ref + 1)
    want = 1.0 if k == 0 else binom.sf(k - 1, n, p0)
    assert d.p_value == pytest.approx(want, rel=1e-9)
    assert d.expected == pytest.approx(n * p0) and d.attack == (want < 1e-3)
    assert set(d.to_json()) >= {"tau_loss", "tau_score", "k", "k_ref", "p_value", "attack", "n_suspects", "test"}


@pytest.mark.parametrize(("k", "n", "k_ref", "n_ref"), [(12, 10000, 0, 1000), (105, 10000, 0, 1000),
                                                         (3, 500, 2, 500), (0, 100, 0, 10), (247, 50000, 1, 1000)])
def test_predictive_test_is_the_beta_binomial_tail_and_close_to_fishers(k, n, k_ref, n_ref):
    """The default: the clean rate drawn from Beta(k_ref + 1, n_ref - k_ref + 1); the p-value is the
    beta-binomial tail, larger than the plug-in's far above the expected count (the rate is only estimated),
    and agrees with Fisher's exact test on the 2x2 table where counts are not tiny."""
    d = decide_xclass(k, n, k_ref, n_ref, 1e-2, 1.5, 2.0, 400)
    want = 1.0 if k == 0 else betabinom.sf(k - 1, n, k_ref + 1, n_ref - k_ref + 1)
    assert d.test == "predictive" and d.p_value == pytest.approx(want, rel=1e-9)
    if k >= 2 * d.expected:  # far in the upper tail a rate known only from the reserve is less surprising
        assert d.p_value > decide_xclass(k, n, k_ref, n_ref, 1e-2, 1.5, 2.0, 400, test="plug-in").p_value
    if k >= 100:
        fisher = fisher_exact([[k, n - k], [k_ref, n_ref - k_ref]], alternative="greater")[1]
        assert d.p_value == pytest.approx(fisher, rel=0.05)


def test_the_measured_cases_decide_as_reported():
    # Fashion-MNIST 10k (docs/results.md): no attack 12 crossings, all-to-all 105, reserve 0 of 1,000
    assert not decide_xclass(12, 10000, 0, 1000, 1e-2, 1, 1, 387).attack
    assert decide_xclass(105, 10000, 0, 1000, 1e-2, 1, 1, 496).attack
    # trojan at 50k (docs/results.md): 247 crossings, 99 of them poison CT had already caught, reserve 1
    # of 1,000. The plug-in test called it an attack (p 2e-35) and flagged 148 clean samples; 247 / 50,000
    # is 0.5%, a rate the reserve's 1 in 1,000 does not rule out (p 0.04)
    plug = decide_xclass(247, 50000, 1, 1000, 1e-3, 1, 1, 2590, test="plug-in")
    pred = decide_xclass(247, 50000, 1, 1000, 1e-2, 1, 1, 2590)
    assert plug.attack and plug.p_value < 1e-30
    assert not pred.attack and 0.03 < pred.p_value < 0.06
    # the predictive test's power is bounded by the reserve, not by D: 1% spread poison against 2 reserve
    # crossings gives the same p at 10k and at 10M
    p10k = decide_xclass(100, 10_000, 2, 1000, 1e-2, 1, 1, 0).p_value
    p10m = decide_xclass(100_000, 10_000_000, 2, 1000, 1e-2, 1, 1, 0).p_value
    assert p10m == pytest.approx(p10k, rel=0.3) and p10m < 1e-2
    with pytest.raises(DataError, match="out of range"):
        decide_xclass(5, 4, 0, 10, 1e-3, 1, 1, 0)
    with pytest.raises(ConfigError, match="alpha"):
        decide_xclass(1, 4, 0, 10, 0.0, 1, 1, 0)
    with pytest.raises(ConfigError, match="xclass.test"):
        decide_xclass(1, 4, 0, 10, 1e-3, 1, 1, 0, test="fisher")


def test_flagged_by_codes():
    ct = np.array([0, 1, 0, 1], bool)
    x = np.array([0, 0, 1, 1], bool)
    assert [FLAGGED_BY[c] for c in flagged_by(ct, x)] == ["", "ct", "xclass", "ct+xclass"]
    with pytest.raises(DataError):
        flagged_by(ct, x[:3])


def test_half_moments_split_the_four_groups():
    rng = np.random.default_rng(3)
    h = rng.normal(size=(200, 4))
    half, sus = rng.random(200) < 0.5, rng.random(200) < 0.3
    m = FeatureMoments.zeros(4, 4)
    m.update(h, group_of(half, sus))
    for side in (0, 1):
        direct = _moments(h[half == bool(side)], sus[half == bool(side)])
        got = half_moments(m, side)
        np.testing.assert_array_equal(got.count, direct.count)
        np.testing.assert_allclose(got.outer, direct.outer)
    with pytest.raises(DataError, match="four-group"):
        half_moments(direct, 0)


def test_threshold_search_by_estimated_false_discovery_rate():
    """80 poison crossings scored 5-6 and 30 clean ones scored 2-2.85; the reserve (1,000) has 3 clean
    crossings at 2.2, 2.5, 2.9. fdr = 1: the base threshold alone (the measured default); fdr = 0.2: the
    threshold rises past the reserve's crossings until expected / k <= 0.2."""
    rng = np.random.default_rng(4)
    hits = np.r_[rng.uniform(5, 6, 80), rng.uniform(2.0, 2.85, 30)]
    ref = np.array([2.2, 2.5, 2.9])
    base = choose_threshold(hits, 10000, ref, 1000, 2.0, 1e-3, 1.0, 1.5, 500, "plug-in")
    want = decide_xclass(110, 10000, 3, 1000, 1e-3, 1.5, 2.0, 500, "plug-in")
    assert base.attack and base.k == 110 and base.tau_score == 2.0 and base.p_value == pytest.approx(want.p_value)
    strict = choose_threshold(hits, 10000, ref, 1000, 2.0, 1e-3, 0.2, 1.5, 500, "plug-in")
    assert strict.attack and strict.tau_score == 2.9 and strict.k == 80 and strict.k_ref == 0
    assert strict.est_fdr == pytest.approx(10000 / 1001 / 80)
    # clean data: crossings no more than the reserve predicts at any threshold -> nothing flagged
    calm = choose_threshold(rng.uniform(2.0, 3.0, 25), 10000, ref, 1000, 2.0, 1e-3, 0.2, 1.5, 500, "plug-in")
    assert not calm.attack and calm.tau_score == 2.0
    with pytest.raises(ConfigError, match="fdr"):
        choose_threshold(hits, 10000, ref, 1000, 2.0, 1e-3, 0.0, 1.5, 500)
    assert calm.to_json()["tau_base"] == 2.0
    # the default test searches the same candidates: at 0.2 it stops at 2.9 as well
    pred = choose_threshold(hits, 10000, ref, 1000, 2.0, 1e-2, 0.2, 1.5, 500)
    assert pred.attack and pred.test == "predictive" and pred.tau_score == 2.9 and pred.k == 80
