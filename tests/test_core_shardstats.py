"""Mergeable per-group statistics: merge laws (hypothesis), derived counts, the binomial marking."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctray.core.shardstats import SCORE_UNIT, GroupStats, binomial_marks, suspicion_order
from ctray.errors import ConfigError, DataError

C, BINS, K = 3, 5, 2


@st.composite
def samples(draw, max_n: int = 40):
    """A sample set: groups from a small alphabet (so groups repeat), unique ids, scores with ties."""
    n = draw(st.integers(0, max_n))
    groups = draw(st.lists(st.sampled_from(["a", "b", "shard-000001.tar", "z/2.tar"]), min_size=n, max_size=n))
    ids = draw(st.lists(st.integers(-2**62, 2**62), min_size=n, max_size=n, unique=True))
    scores = draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.999, 1.0]) | st.floats(0, 1), min_size=n, max_size=n))
    labels = draw(st.lists(st.integers(0, C - 1), min_size=n, max_size=n))
    preds = draw(st.lists(st.integers(0, C - 1), min_size=n, max_size=n))
    return (np.array(groups, dtype=str), np.array(ids, np.int64), np.array(scores, np.float64),
            np.array(labels, np.int64), np.array(preds, np.int64))


def _stats(s, idx=None) -> GroupStats:
    g, i, sc, lab, pr = s
    if idx is not None:
        g, i, sc, lab, pr = g[idx], i[idx], sc[idx], lab[idx], pr[idx]
    return GroupStats.from_samples(g, i, sc, lab, pr, C, BINS, K)


@settings(max_examples=150, deadline=None)
@given(samples(), st.data())
def test_any_partition_merged_in_any_order_equals_one_pass(s, data):
    n = len(s[0])
    one_pass = _stats(s)
    parts_of = data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))  # sample -> part (some empty)
    parts = [_stats(s, np.flatnonzero(np.array(parts_of, dtype=np.int64) == p)) for p in range(5)]
    order = data.draw(st.permutations(range(5)))
    # left fold in a random order
    acc = GroupStats.empty(C, BINS, K)
    for p in order:
        acc = acc.merge(parts[p])
    assert acc == one_pass
    # a random binary tree (right fold over another order) and the n-ary merge agree too
    order2 = data.draw(st.permutations(range(5)))
    acc2 = parts[order2[-1]]
    for p in reversed(order2[:-1]):
        acc2 = parts[p].merge(acc2)
    assert acc2 == one_pass
    assert GroupStats.merge_all([parts[p] for p in order2]) == one_pass


@settings(max_examples=60, deadline=None)
@given(samples(), samples(), samples())
def test_merge_is_associative_and_commutative(a, b, c):
    # disjoint ids across the three sets (a partition of one sample set)
    b = (b[0], b[1] // 4 * 4 + 1, *b[2:])
    c = (c[0], c[1] // 4 * 4 + 2, *c[2:])
    a = (a[0], a[1] // 4 * 4, *a[2:])
    sa, sb, sc = _stats(a), _stats(b), _stats(c)
    assert sa.merge(sb) == sb.merge(sa)
    assert sa.merge(sb).merge(sc) == sa.merge(sb.merge(sc))
    assert sa.merge(GroupStats.empty(C, BINS, K)) == sa


def test_counts_by_hand():
    g = np.array(["s1", "s1", "s2", "s1", "s2"])
    ids = np.array([5, 3, 9, 1, 2])
    score = np.array([0.9, 0.9, 0.1, 0.2, 1.0])
    labels = np.array([0, 0, 1, 2, 1])
    preds = np.array([0, 1, 1, 2, 1])
    st_ = GroupStats.from_samples(g, ids, score, labels, preds, C, bins=4, k=2)
    assert st_.group.tolist() == ["s1", "s2"]
    assert st_.usable.tolist() == [3, 2]
    assert st_.samples.tolist() == [3, 2]
    np.testing.assert_allclose(st_.mean_score(), [2.0 / 3, 0.55], atol=1e-7)
    assert st_.hist.tolist() == [[1, 0, 0, 2], [1, 0, 0, 1]]  # 1.0 falls in the last bin
    assert st_.isolated.tolist() == [[1, 0, 1], [0, 2, 0]]
    assert st_.flagged(np.array([True, False, False])).tolist() == [1, 0]
    assert st_.flagged(np.array([False, True, True])).tolist() == [1, 2]
    tops = st_.top_lists()
    assert tops[0][0].tolist() == [3, 5]  # 0.9 tie: lower id first; 0.2 dropped (k=2)
    assert tops[1][0].tolist() == [2, 9]
    assert st_.score_fx.tolist() == [round(0.9 * SCORE_UNIT) * 2 + round(0.2 * SCORE_UNIT),
                                      round(0.1 * SCORE_UNIT) + SCORE_UNIT]


def test_read_counts_merge_with_scores():
    read = GroupStats.from_read(["s1", "s1", "s2", "s3"], np.array([True, False, False, False]),
                                np.array([False, False, False, True]), C)
    scored = GroupStats.from_samples(["s1", "s2"], [1, 2], [0.5, 0.5], [0, 1], [0, 0], C)
    tot = read.merge(scored)
    assert tot.group.tolist() == ["s1", "s2", "s3"]
    assert tot.usable.tolist() == [1, 1, 0]
    assert tot.quarantined.tolist() == [1, 0, 0]
    assert tot.failures.tolist() == [0, 0, 1]
    assert tot.samples.tolist() == [2, 1, 0]
    assert np.isnan(tot.mean_score()[2])


def test_bad_inputs_are_named():
    with pytest.raises(DataError, match="scores must lie in"):
        GroupStats.from_samples(["a"], [1], [1.5], [0], [0], C)
    with pytest.raises(DataError, match="labels"):
        GroupStats.from_samples(["a"], [1], [0.5], [7], [0], C)
    with pytest.raises(DataError, match="ids must have shape"):
        GroupStats.from_samples(["a", "b"], [1], [0.5, 0.5], [0, 0], [0, 0], C)
    with pytest.raises(ConfigError, match="cannot merge"):
        GroupStats.empty(3).merge(GroupStats.empty(4))
    with pytest.raises(DataError, match="cleansed"):
        GroupStats.empty(3).flagged(np.array([True]))


def test_binomial_marks_and_ranking():
    # 10 shards of 1000, overall ~0.7% flagged; shard 3 holds 24 flagged (60% of the 40 poison)
    usable = np.full(10, 1000)
    flagged = np.array([2, 1, 2, 24, 1, 2, 3, 2, 1, 2])
    p, marked, rate, level = binomial_marks(flagged, usable, alpha=0.01)
    assert rate == pytest.approx(40 / 10000)
    assert level == pytest.approx(0.001)
    assert marked.tolist() == [False, False, False, True] + [False] * 6
    assert p[3] < 1e-8 and (p[[0, 1, 2, 4, 5, 6, 7, 8, 9]] > 0.1).all()
    order = suspicion_order(p, flagged, np.zeros(10), np.array([f"s{i}" for i in range(10)]))
    assert order[0] == 3
    # nothing flagged: p-values 1, nothing marked, ranking by mean score then name
    p0, m0, r0, _ = binomial_marks(np.zeros(3), np.array([5, 0, 5]), 0.01)
    assert p0.tolist() == [1.0, 1.0, 1.0] and not m0.any() and r0 == 0.0
    assert suspicion_order(p0, np.zeros(3), np.array([0.1, np.nan, 0.3]), np.array(["a", "b", "c"])).tolist() == [2, 0, 1]
    with pytest.raises(ConfigError):
        binomial_marks(flagged, usable, alpha=0)
    with pytest.raises(DataError):
        binomial_marks(np.array([3]), np.array([2]), 0.01)
