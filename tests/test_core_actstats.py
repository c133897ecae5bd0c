"""ctray.core.actstats: mergeable activation statistics, intervals, the out-of-interval score, the FRR
threshold and the sample-id split (pure NumPy; BadActs pitfalls of seed-defenses.md §5)."""

from __future__ import annotations

import numpy as np
import pytest

from ctray.core.actstats import (
    ActHistogram,
    ActMoments,
    constant_neurons,
    frr_threshold,
    hash_split,
    intervals_gauss,
    intervals_quantile,
    out_of_interval_score,
)
from ctray.errors import ConfigError, DataError


def test_moments_merge_in_any_order_equals_one_pass():
    rng = np.random.default_rng(0)
    a = rng.normal(3.0, 2.0, size=(1000, 7)) * np.arange(1, 8)
    parts = np.array_split(a, [5, 130, 131, 600])
    fwd = ActMoments.zeros(7)
    for p in parts:
        fwd.update(p)
    rev = ActMoments.zeros(7)
    for p in reversed(parts):
        rev = rev.merge(ActMoments.of(p))
    for m in (fwd, rev):
        assert m.n == 1000
        np.testing.assert_allclose(m.mean, a.mean(0), rtol=1e-12)
        np.testing.assert_allclose(m.std(), a.std(0), rtol=1e-10)
        np.testing.assert_array_equal(m.lo, a.min(0))
        np.testing.assert_array_equal(m.hi, a.max(0))
    empty = ActMoments.zeros(7)
    assert empty.merge(fwd).n == 1000 and fwd.merge(empty).n == 1000
    with pytest.raises(DataError, match="merge"):
        fwd.merge(ActMoments.zeros(3))
    with pytest.raises(DataError, match="non-finite"):
        ActMoments.of(np.array([[np.nan, 1.0]]))


def test_histogram_quantiles_within_one_bin_and_merge_is_addition():
    rng = np.random.default_rng(1)
    a = np.concatenate([rng.exponential(1.0, (4000, 3)), np.zeros((4000, 1))], 1)  # skewed + a constant neuron
    m = ActMoments.of(a)
    whole = ActHistogram.empty(m.lo, m.hi, 256).update(a)
    h1 = ActHistogram.empty(m.lo, m.hi, 256).update(a[:1234])
    h2 = ActHistogram.empty(m.lo, m.hi, 256).update(a[1234:])
    merged = h1.merge(h2)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    width = (whole.hi - whole.lo) / 256
    for q in (0.001, 0.05, 0.5, 0.95, 0.999):
        est = merged.quantile(q)
        assert np.all(np.abs(est - np.quantile(a, q, axis=0)) <= width + 1e-12), q
    lo, hi = intervals_quantile(merged, 0.01)
    assert np.all(lo <= hi)
    with pytest.raises(DataError, match="different ranges"):
        h1.merge(ActHistogram.empty(m.lo - 1, m.hi, 256))


def test_dead_channel_sigma_zero_is_guarded_and_can_be_dropped():
    """Pitfall: sigma = 0 for dead ReLU channels (no division, no NaN); dropping them is an option."""
    rng = np.random.default_rng(2)
    clean = np.concatenate([rng.normal(0, 1, (200, 3)), np.zeros((200, 1))], 1)  # neuron 3 is dead
    m = ActMoments.of(clean)
    lo, hi = intervals_gauss(m, 3.0, 1e-4)
    assert np.isfinite(lo).all() and np.isfinite(hi).all()
    assert lo[3] == pytest.approx(-3e-4) and hi[3] == pytest.approx(3e-4)
    x = np.array([[0.0, 0.0, 0.0, 0.0],      # all inside
                  [0.0, 0.0, 0.0, 1e-6],     # float noise on the dead channel: inside the floor band
                  [0.0, 0.0, 0.0, 0.5],      # the dead channel fires: out
                  [9.0, 0.0, 0.0, 0.5]])     # two of four out
    s = out_of_interval_score(x, lo, hi)
    np.testing.assert_allclose(s, [0.0, 0.0, 0.25, 0.5])
    active = ~constant_neurons(m, 1e-4)
    assert active.tolist() == [True, True, True, False]
    np.testing.assert_allclose(out_of_interval_score(x, lo, hi, active), [0.0, 0.0, 0.0, 1 / 3])
    with pytest.raises(DataError, match="no active neuron"):
        out_of_interval_score(x, lo, hi, np.zeros(4, bool))


def test_bound_values_are_inside_and_scores_lie_in_unit_interval():
    lo, hi = np.array([0.0, -1.0]), np.array([1.0, 1.0])
    s = out_of_interval_score(np.array([[0.0, 1.0], [1.0, -1.0], [1.5, -2.0]]), lo, hi)
    np.testing.assert_allclose(s, [0.0, 0.0, 1.0])


def test_frr_threshold_flags_at_most_frr_of_calibration_scores():
    rng = np.random.default_rng(3)
    clean = rng.beta(1, 20, 997)
    for frr in (0.0, 0.01, 0.05, 0.2):
        t = frr_threshold(clean, frr)
        assert (clean > t).mean() <= frr + 1e-12
    ties = np.array([0.0] * 90 + [0.1] * 10)  # a discrete score: ties at the threshold stay unflagged
    assert frr_threshold(ties, 0.05) == 0.1 and not (ties > 0.1).any()
    with pytest.raises(ConfigError):
        frr_threshold(clean, 1.0)
    with pytest.raises(DataError):
        frr_threshold(np.array([]), 0.05)


def test_hash_split_is_deterministic_order_free_and_balanced():
    from ctray.data.shards import sample_ids

    sids = sample_ids(["train-000000.tar"] * 20000, [f"k{i}" for i in range(20000)])
    a = hash_split(sids, 0.5, 2024)
    assert 0.48 < a.mean() < 0.52
    perm = np.random.default_rng(0).permutation(len(sids))
    np.testing.assert_array_equal(hash_split(sids[perm], 0.5, 2024), a[perm])
    assert (hash_split(sids, 0.5, 7) != a).mean() > 0.4  # another seed, another split
    assert not hash_split(sids, 0.0, 1).any() and hash_split(sids, 1.0, 1).all()
    assert 0.09 < hash_split(sids, 0.1, 1).mean() < 0.11
    with pytest.raises(ConfigError):
        hash_split(sids, 1.5, 0)
