"""ctray.core.metrics: hand-computed values, scikit-learn cross-checks (tests only), edge cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

from ctray.core.metrics import auroc, average_precision, detection_metrics
from ctray.errors import DataError


def _json_safe(d):
    json.dumps(d, allow_nan=False)
    for v in d.values():
        assert v is None or type(v) in (int, float)
        if isinstance(v, float):
            assert math.isfinite(v)


def test_hand_computed_example():
    # N = 10, P = {0, 1, 2, 3}; flagged = {0, 1, 2, 5}: TP 3, FP 1, FN 1
    poison = np.zeros(10, bool)
    poison[:4] = True
    flagged = np.zeros(10, bool)
    flagged[[0, 1, 2, 5]] = True
    score = np.array([0.9, 0.8, 0.7, 0.1, 0.3, 0.75, 0.2, 0.0, 0.05, 0.15])
    m = detection_metrics(flagged, poison, score)
    _json_safe(m)
    assert m["tpr"] == pytest.approx(3 / 4)
    assert m["fpr"] == pytest.approx(1 / 6)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)
    assert (m["n"], m["n_poison"], m["n_flagged"]) == (10, 4, 4)
    assert m["flag_rate"] == pytest.approx(0.4)
    # AUROC: pairs (pos, neg) with pos > neg: 0.9, 0.8 beat all 6; 0.7 beats 5 (not 0.75); 0.1 beats 2
    assert m["auroc"] == pytest.approx((6 + 6 + 5 + 2) / 24)
    # AP: descending 0.9(P) 0.8(P) 0.75(N) 0.7(P) 0.3 0.2 0.15 0.1(P) ...
    ap = (1 / 4) * 1 + (1 / 4) * 1 + (1 / 4) * (3 / 4) + (1 / 4) * (4 / 8)
    assert m["auprc"] == pytest.approx(ap)


def test_ties_count_half():
    poison = np.array([True, False, True, False])
    score = np.array([1.0, 1.0, 0.0, 0.0])
    # pairs: (0 vs 1) tie 0.5, (0 vs 3) 1, (2 vs 1) 0, (2 vs 3) tie 0.5 -> 2 / 4
    assert auroc(poison, score) == pytest.approx(0.5)
    # AP: one threshold at 1.0 -> P = 1/2, R = 1/2; then 0.0 -> P = 1/2, R = 1
    assert average_precision(poison, score) == pytest.approx(0.5)


def test_no_poison_reports_flag_rate_and_nones():
    flagged = np.array([True, False, False, False])
    m = detection_metrics(flagged, np.zeros(4, bool), np.arange(4.0))
    _json_safe(m)
    assert m["tpr"] is None and m["auroc"] is None and m["auprc"] is None
    assert m["fpr"] == pytest.approx(0.25) and m["flag_rate"] == pytest.approx(0.25)
    assert m["precision"] == 0.0 and m["f1"] == 0.0
    m = detection_metrics(np.zeros(4, bool), np.zeros(4, bool))
    assert m["f1"] is None and m["precision"] is None and m["fpr"] == 0.0 and m["flag_rate"] == 0.0


def test_all_flagged_and_none_flagged():
    poison = np.array([True, False, False, True, False])
    m = detection_metrics(np.ones(5, bool), poison)
    _json_safe(m)
    assert m["tpr"] == 1.0 and m["fpr"] == 1.0 and m["precision"] == pytest.approx(0.4)
    assert m["f1"] == pytest.approx(2 * 2 / (5 + 2)) and m["flag_rate"] == 1.0
    m = detection_metrics(np.zeros(5, bool), poison)
    _json_safe(m)
    assert m["tpr"] == 0.0 and m["fpr"] == 0.0 and m["precision"] is None and m["f1"] == 0.0
    assert m["auroc"] is None  # no score given


def test_all_poison_and_empty():
    m = detection_metrics(np.array([True, False]), np.array([True, True]), np.array([0.5, 0.1]))
    _json_safe(m)
    assert m["fpr"] is None and m["auroc"] is None and m["tpr"] == 0.5
    m = detection_metrics(np.array([], bool), np.array([], bool))
    _json_safe(m)
    assert m["n"] == 0 and m["flag_rate"] is None


def test_int_masks_accepted_and_validation():
    m = detection_metrics(np.array([1, 0, 1]), np.array([1, 0, 0]))
    assert m["tpr"] == 1.0 and m["fpr"] == 0.5
    with pytest.raises(DataError, match="flagged must be a bool mask"):
        detection_metrics(np.array([2, 0]), np.array([1, 0]))
    with pytest.raises(DataError, match="flagged must be a bool mask"):
        detection_metrics(np.array([0.5, 0.0]), np.array([1, 0]))
    with pytest.raises(DataError, match="same length"):
        detection_metrics(np.zeros(3, bool), np.zeros(2, bool))
    with pytest.raises(DataError, match="score must be 1-D"):
        detection_metrics(np.zeros(3, bool), np.zeros(3, bool), np.zeros(2))
    with pytest.raises(DataError, match="NaN"):
        detection_metrics(np.zeros(2, bool), np.array([True, False]), np.array([np.nan, 1.0]))
    with pytest.raises(DataError, match="poison must be 1-D"):
        detection_metrics(np.zeros(2, bool), np.zeros((2, 1), bool))


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    n=st.integers(2, 80),
    levels=st.integers(1, 6),
)
def test_auroc_auprc_match_sklearn(data, n, levels):
    poison = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    # few distinct levels -> many ties (also within positives and across classes)
    score = np.array(data.draw(st.lists(st.integers(0, levels - 1), min_size=n, max_size=n)), dtype=float)
    score = score + np.array(data.draw(st.lists(st.sampled_from([0.0, 0.0, 0.0, 1e-3]), min_size=n, max_size=n)))
    flagged = score >= np.median(score)
    m = detection_metrics(flagged, poison, score)
    _json_safe(m)
    if poison.all() or not poison.any():
        assert m["auroc"] is None and m["auprc"] is None
        return
    assert m["auroc"] == pytest.approx(roc_auc_score(poison, score), abs=1e-12)
    assert m["auprc"] == pytest.approx(average_precision_score(poison, score), abs=1e-12)


def test_large_random_inputs_match_sklearn():
    rng = np.random.default_rng(0)
    poison = rng.random(20_000) < 0.01
    score = np.round(rng.random(20_000) + poison * 0.3, 2)  # rounded -> ties
    assert auroc(poison, score) == pytest.approx(roc_auc_score(poison, score), abs=1e-12)
    assert average_precision(poison, score) == pytest.approx(average_precision_score(poison, score), abs=1e-12)
