"""Property tests (hypothesis) of ctray.core.metrics: ranges, perfect and reversed scores, invariance
to strictly increasing score maps and to sample order, flag-all / flag-none, internal consistency."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ctray.core.metrics import auroc, average_precision, detection_metrics

SETTINGS = settings(max_examples=80, deadline=None)


@st.composite
def labelled(draw, min_size: int = 1, max_size: int = 60, both: bool = False):
    """(poison bool (n,), flagged bool (n,), score float (n,)) with ties likely (few score levels)."""
    n = draw(st.integers(min_size, max_size))
    poison = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool)
    if both:
        assume(poison.any() and not poison.all())
    flagged = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool)
    levels = draw(st.integers(1, 8))
    score = np.array(draw(st.lists(st.integers(0, levels - 1), min_size=n, max_size=n)), float)
    # jitter on a 1/64 grid: ties stay exact and maps like exp cannot merge distinct values
    score += np.array(draw(st.lists(st.integers(-25, 25), min_size=n, max_size=n))) / 64.0
    return poison, flagged, score


@SETTINGS
@given(labelled())
def test_rates_lie_in_unit_interval_and_counts_agree(data):
    poison, flagged, score = data
    m = detection_metrics(flagged, poison, score)
    for k in ("tpr", "fpr", "precision", "f1", "auroc", "auprc", "flag_rate"):
        assert m[k] is None or 0.0 <= m[k] <= 1.0, (k, m[k])
    assert m["n"] == poison.size and m["n_poison"] == int(poison.sum()) and m["n_flagged"] == int(flagged.sum())
    tp = int((flagged & poison).sum())
    if m["tpr"] is not None:
        assert m["tpr"] * m["n_poison"] == pytest.approx(tp)
    if m["precision"] is not None:
        assert m["precision"] * m["n_flagged"] == pytest.approx(tp)
    if m["fpr"] is not None:
        assert m["fpr"] * (m["n"] - m["n_poison"]) == pytest.approx(m["n_flagged"] - tp)
    # F1 is the harmonic mean of precision and recall wherever both are defined and positive
    if m["precision"] and m["tpr"]:
        assert m["f1"] == pytest.approx(2 * m["precision"] * m["tpr"] / (m["precision"] + m["tpr"]))


@SETTINGS
@given(labelled(both=True))
def test_flag_all_and_flag_none(data):
    poison, _, score = data
    m = detection_metrics(np.ones(poison.size, bool), poison, score)
    assert m["tpr"] == 1.0 and m["fpr"] == 1.0 and m["flag_rate"] == 1.0
    assert m["precision"] == pytest.approx(poison.mean())
    m = detection_metrics(np.zeros(poison.size, bool), poison, score)
    assert m["tpr"] == 0.0 and m["fpr"] == 0.0 and m["flag_rate"] == 0.0 and m["f1"] == 0.0


@SETTINGS
@given(labelled(both=True))
def test_perfect_and_reversed_scores(data):
    poison, _, score = data
    perfect = poison.astype(float) + 0.01 * np.abs(score)  # every poison above every clean sample
    assert auroc(poison, perfect) == 1.0
    assert average_precision(poison, perfect) == pytest.approx(1.0)
    assert auroc(poison, -perfect) == 0.0
    m = detection_metrics(poison, poison, perfect)  # flag exactly the poison
    assert (m["tpr"], m["fpr"], m["precision"], m["f1"]) == (1.0, 0.0, 1.0, 1.0)


@SETTINGS
@given(labelled(both=True), st.sampled_from(["exp", "affine", "cube", "rank"]))
def test_invariant_to_strictly_increasing_maps(data, kind):
    poison, _, score = data
    mapped = {"exp": np.exp(score), "affine": 3.0 * score - 7.0, "cube": score ** 3,
              "rank": np.argsort(np.argsort(score, kind="stable"), kind="stable").astype(float)}[kind]
    if kind == "rank":  # ranks break ties: only compare when there are none
        assume(len(np.unique(score)) == score.size)
    assert auroc(poison, mapped) == pytest.approx(auroc(poison, score), abs=1e-12)
    assert average_precision(poison, mapped) == pytest.approx(average_precision(poison, score), abs=1e-12)


@SETTINGS
@given(labelled(both=True))
def test_auroc_symmetries(data):
    poison, _, score = data
    a = auroc(poison, score)
    assert a + auroc(poison, -score) == pytest.approx(1.0)  # reversing the score
    assert auroc(~poison, -score) == pytest.approx(a)  # swapping the classes and the direction


@SETTINGS
@given(labelled(), st.randoms(use_true_random=False))
def test_invariant_to_sample_order(data, rnd):
    poison, flagged, score = data
    perm = np.array(rnd.sample(range(poison.size), poison.size))
    a = detection_metrics(flagged, poison, score)
    b = detection_metrics(flagged[perm], poison[perm], score[perm])
    for k, v in a.items():
        assert (v is None and b[k] is None) or b[k] == pytest.approx(v, abs=1e-12), k


@SETTINGS
@given(labelled(both=True))
def test_constant_score_gives_chance_level(data):
    poison, _, _ = data
    flat = np.zeros(poison.size)
    assert auroc(poison, flat) == 0.5
    assert average_precision(poison, flat) == pytest.approx(poison.mean())  # one threshold: the prevalence
