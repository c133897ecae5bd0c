"""ctray.core.distill: class weights, keep counts, lowest-loss selection with per-class floors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctray.core.distill import class_weights, distill, keep_count
from ctray.errors import ConfigError, DataError


def _reference_distill(losses, labels, keep_n, floor_k, num_classes):
    """Straight-line restatement of ct.md §1.4 step 4 (loops, no vectorisation)."""
    loss = np.where(np.isnan(losses), np.inf, losses)
    order = sorted(range(len(loss)), key=lambda i: (loss[i], i))
    kept = list(order[:keep_n])
    for c in range(num_classes):
        members = [i for i in order if labels[i] == c]
        need = len(members) // floor_k
        have = sum(1 for i in kept if labels[i] == c)
        for i in members:
            if have >= need:
                break
            if i not in kept:
                kept.append(i)
                have += 1
    return sorted(kept)


# ---------------------------------------------------------------- keep_count / class_weights

def test_keep_count_is_int_of_ratio_times_full_n():
    assert keep_count(1 / 2, 50_000) == 25_000
    assert keep_count(1 / 5, 50_000) == 10_000
    assert keep_count(1 / 25, 50_000) == 2_000
    assert keep_count(1 / 100, 50_000) == 500
    assert keep_count(1 / 3, 10) == 3  # truncation, like int()
    assert keep_count(1.0, 7) == 7


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan"), float("inf"), "0.5", True])
def test_keep_count_rejects_bad_ratio(ratio):
    with pytest.raises(ConfigError, match="ratio"):
        keep_count(ratio, 10)


def test_keep_count_rejects_bad_n():
    with pytest.raises(ConfigError, match="n must"):
        keep_count(0.5, -1)


def test_class_weights_formula_and_uniform():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    w = class_weights(labels, 4, uniform=False)
    expected = 1.0 / np.sqrt(np.array([0.6, 0.3, 0.1, 0.0]) + 0.001)
    assert w.dtype == np.float64 and w.shape == (4,)
    np.testing.assert_allclose(w, expected)
    assert np.isfinite(w[3])  # an absent class still gets a finite weight
    assert w[2] > w[1] > w[0]  # rarer = heavier
    np.testing.assert_array_equal(class_weights(labels, 4, uniform=True), np.ones(4))


def test_class_weights_errors():
    with pytest.raises(DataError, match="labels"):
        class_weights(np.array([0, 5]), 3, uniform=False)
    with pytest.raises(DataError, match="labels"):
        class_weights(np.array([0.0, 1.0]), 3, uniform=False)
    with pytest.raises(DataError, match="empty"):
        class_weights(np.array([], dtype=np.int64), 3, uniform=False)
    with pytest.raises(ConfigError, match="num_classes"):
        class_weights(np.array([0]), 0, uniform=False)


# ---------------------------------------------------------------- distill

def test_distill_hand_made_example():
    #            0    1    2    3    4    5    6    7    8    9
    losses = np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.95, 0.05, 0.6, 0.4])
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 2])
    # keep 3 lowest: 7 (0.05), 1 (0.1), 3 (0.2) -- all class 1.
    # floor_k = 2: class 0 has 5 -> floor 2 -> top up 8 (0.6), 4 (0.7); class 1 has 4 -> 2 (has 3);
    # class 2 has 1 -> floor 0.
    out = distill(losses, labels, keep_n=3, floor_k=2, num_classes=3)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [1, 3, 4, 7, 8])
    # floor_k = 1: every sample of every class is required.
    np.testing.assert_array_equal(distill(losses, labels, 3, 1, 3), np.arange(10))


def test_distill_floor_honoured_for_high_loss_class():
    rng = np.random.default_rng(0)
    n = 1000
    labels = np.repeat(np.arange(4), n // 4)
    losses = rng.uniform(0, 1, n)
    losses[labels == 3] += 10.0  # class 3 never makes the global cut
    keep_n = keep_count(1 / 10, n)
    out = distill(losses, labels, keep_n, floor_k=50, num_classes=4)
    kept_labels = labels[out]
    assert np.count_nonzero(kept_labels == 3) == 250 // 50
    # the top-ups are the class's lowest-loss samples
    c3 = np.flatnonzero(labels == 3)
    np.testing.assert_array_equal(np.sort(out[kept_labels == 3]), np.sort(c3[np.argsort(losses[c3])[:5]]))
    # the global cut itself is untouched
    assert set(np.argsort(losses, kind="stable")[:keep_n]) <= set(out)
    assert out.size == keep_n + 5


def test_distill_ratio_of_full_n_and_indices_into_full_arrays():
    # Scores of ALL N samples; indices refer to the full arrays even if the previous subset was smaller.
    n = 50_000
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, n)
    losses = rng.exponential(size=n)
    for ratio, k in [(1 / 2, 50), (1 / 5, 50), (1 / 25, 50), (1 / 50, 50), (1 / 100, 100)]:
        out = distill(losses, labels, keep_count(ratio, n), k, 10)
        assert out.size >= int(ratio * n)
        assert out.max() < n and np.all(np.diff(out) > 0)
        counts = np.bincount(labels[out], minlength=10)
        assert np.all(counts >= np.bincount(labels, minlength=10) // k)


def test_distill_ties_are_deterministic_by_index():
    losses = np.zeros(10)
    labels = np.zeros(10, dtype=np.int64)
    np.testing.assert_array_equal(distill(losses, labels, 4, 100, 1), [0, 1, 2, 3])
    losses = np.array([1.0, 0.5, 0.5, 0.5, 0.2, 0.5])
    np.testing.assert_array_equal(distill(losses, np.zeros(6, np.int64), 3, 100, 1), [1, 2, 4])


def test_distill_nan_treated_as_inf_with_warning(caplog):
    losses = np.array([np.nan, 0.3, np.nan, 0.1, np.inf, 0.2])
    labels = np.array([0, 0, 1, 0, 0, 1])
    with caplog.at_level(logging.WARNING, logger="ctray.core.distill"):
        out = distill(losses, labels, keep_n=3, floor_k=100, num_classes=2)
    np.testing.assert_array_equal(out, [1, 3, 5])
    assert "2 of 6 losses are NaN" in caplog.text
    # past the finite ones: NaN counts as +inf, tied with the real inf (index 4), ties by index
    out = distill(losses, labels, keep_n=5, floor_k=100, num_classes=2)
    np.testing.assert_array_equal(out, [0, 1, 2, 3, 5])
    # a floor can reach a NaN sample: class 1 = {2 (nan), 5 (0.2)}, floor_k=1 requires both
    out = distill(losses, labels, keep_n=0, floor_k=1, num_classes=2)
    np.testing.assert_array_equal(out, np.arange(6))


def test_distill_zero_keep_and_empty():
    labels = np.array([0, 0, 0, 1, 1, 1])
    losses = np.array([3.0, 2.0, 1.0, 6.0, 5.0, 4.0])
    np.testing.assert_array_equal(distill(losses, labels, 0, 3, 2), [2, 5])
    assert distill(np.array([]), np.array([], dtype=np.int64), 0, 50, 3).size == 0


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"keep_n": 7}, ConfigError, "keep_n"),
        ({"keep_n": -1}, ConfigError, "keep_n"),
        ({"keep_n": 1.5}, ConfigError, "keep_n"),
        ({"floor_k": 0}, ConfigError, "floor_k"),
        ({"num_classes": 0}, ConfigError, "num_classes"),
        ({"labels": np.array([0, 1, 2, 3, 0, 1])}, DataError, "labels must lie"),
        ({"labels": np.array([0, 1, 0])}, DataError, "same length"),
        ({"losses": np.zeros((6, 1))}, DataError, "losses must be 1-D"),
        ({"losses": np.array(["a"] * 6)}, DataError, "losses must be real"),
    ],
)
def test_distill_validation(kwargs, err, match):
    args = {"losses": np.arange(6.0), "labels": np.array([0, 1, 2, 0, 1, 2]), "keep_n": 2, "floor_k": 2,
            "num_classes": 3}
    args.update(kwargs)
    with pytest.raises(err, match=match):
        distill(**args)


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    n=st.integers(0, 60),
    num_classes=st.integers(1, 5),
    floor_k=st.integers(1, 8),
)
def test_distill_matches_straight_line_reference(data, n, num_classes, floor_k):
    labels = np.array(data.draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n)), dtype=np.int64)
    # few distinct values -> many ties; some NaN
    losses = np.array(data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, np.nan]), min_size=n, max_size=n)),
                      dtype=np.float64)
    keep_n = data.draw(st.integers(0, n))
    out = distill(losses, labels, keep_n, floor_k, num_classes)
    np.testing.assert_array_equal(out, _reference_distill(losses, labels, keep_n, floor_k, num_classes))
    counts = np.bincount(labels[out], minlength=num_classes)
    assert np.all(counts >= np.bincount(labels, minlength=num_classes) // floor_k)
