"""ctray.core.audit: the trigger-inversion audit's model score from per-class gaps and trigger sizes."""

from __future__ import annotations

import numpy as np
import pytest

from ctray.core.audit import class_scores, model_score

# per-class results (classes 0-9) of two audited Fashion-MNIST small CNNs (docs/defenses.md): the
# backdoored model (badnet to class 0) reaches its gap with a small trigger; the clean one reaches a gap
# as large on class 8 with a trigger of ordinary size
BD_GAP = [0.980, 0.217, 0.681, 0.396, 0.756, 0.304, 0.812, 0.583, 0.932, 0.766]
BD_SIZE = [0.062, 0.149, 0.098, 0.147, 0.107, 0.115, 0.098, 0.123, 0.089, 0.111]
CL_GAP = [0.612, 0.457, 0.660, 0.333, 0.667, 0.326, 0.833, 0.250, 0.977, 0.277]
CL_SIZE = [0.123, 0.153, 0.079, 0.144, 0.108, 0.154, 0.091, 0.182, 0.112, 0.149]


def test_gap_mode_is_the_reference_score():
    g = np.array([0.2, -0.1, 0.9, np.nan])
    s = class_scores(g, np.array([0.1, 0.1, 0.5, 0.1]), "gap")
    np.testing.assert_array_equal(s, g)
    assert model_score(s) == (pytest.approx(0.9), 2)


def test_gap_size_weights_each_gap_by_median_size_over_its_size():
    s = class_scores(np.array([0.5, 0.5, 0.8]), np.array([0.05, 0.1, 0.2]), "gap-size")
    np.testing.assert_allclose(s, [0.5 * 0.1 / 0.05, 0.5, 0.8 * 0.1 / 0.2])
    assert model_score(s) == (pytest.approx(1.0), 0)  # the small trigger wins over the larger gap


def test_gap_size_separates_the_measured_models_where_the_gap_does_not():
    bd_gap, _ = model_score(class_scores(np.array(BD_GAP), np.array(BD_SIZE), "gap"))
    cl_gap, cl_gap_target = model_score(class_scores(np.array(CL_GAP), np.array(CL_SIZE), "gap"))
    assert abs(bd_gap - cl_gap) < 0.01 and cl_gap_target == 8  # the reference score: a tie, clean "targets" 8
    bd, bd_target = model_score(class_scores(np.array(BD_GAP), np.array(BD_SIZE), "gap-size"))
    cl, _ = model_score(class_scores(np.array(CL_GAP), np.array(CL_SIZE), "gap-size"))
    assert bd_target == 0 and bd > 1.5 > cl


def test_gap_size_is_scale_free():
    g, z = np.array([0.3, 0.9, 0.6]), np.array([0.2, 0.05, 0.1])
    np.testing.assert_allclose(class_scores(g, z, "gap-size"), class_scores(g, 7.0 * z, "gap-size"))


def test_a_class_without_evaluation_images_is_left_out():
    g = np.array([np.nan, 0.4, 0.4, 0.4])
    s = class_scores(g, np.array([1e-9, 0.1, 0.2, 0.4]), "gap-size")  # the NaN class's size is ignored
    assert np.isnan(s[0])
    np.testing.assert_allclose(s[1:], [0.8, 0.4, 0.2])
    assert model_score(s) == (pytest.approx(0.8), 1)


def test_errors():
    with pytest.raises(ValueError, match="unknown audit score mode 'l1'"):
        class_scores(np.zeros(2), np.ones(2), "l1")
    with pytest.raises(ValueError, match="same 1-D shape"):
        class_scores(np.zeros(2), np.ones(3), "gap")
    with pytest.raises(ValueError, match="sizes must be > 0"):
        class_scores(np.zeros(2), np.array([0.1, 0.0]), "gap-size")
    with pytest.raises(ValueError, match="no candidate class"):
        model_score(np.array([np.nan, np.nan]))
    assert np.isnan(class_scores(np.array([np.nan]), np.array([0.0]), "gap-size")).all()
