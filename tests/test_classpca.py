"""Per-class moments for many classes: ctray.core.pca.ClassMoments (merged per block in any order equals
the direct computation; a block's partial is bounded by the classes present) and the class-partitioned
reducers of ctray.engine.classpca on a real local Ray."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctray.core.pca import ClassMoments, FeatureMoments, fold_by_class, merge_by_class, project
from ctray.errors import ConfigError, DataError


def _direct(x: np.ndarray, labels: np.ndarray, c: int) -> FeatureMoments:
    m = FeatureMoments.zeros(c, x.shape[1])
    m.update(x, labels)
    return m


def _blocks(x: np.ndarray, labels: np.ndarray, cuts: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    edges = [0, *sorted(cuts), len(labels)]
    return [(x[a:b], labels[a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True)]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(0, 60), d=st.integers(1, 6), c=st.integers(1, 9))
def test_blocks_merged_in_any_tree_equal_the_direct_moments(data, n, d, c):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    x = rng.normal(size=(n, d)) * 3 + rng.normal(size=d)
    labels = rng.integers(0, c, n)
    cuts = data.draw(st.lists(st.integers(0, n), max_size=6))
    parts = [fold_by_class(bx, bl, c) for bx, bl in _blocks(x, labels, cuts)]
    # a random merge tree: pairs chosen at random until one table is left
    while len(parts) > 1:
        i, j = sorted(data.draw(st.lists(st.integers(0, len(parts) - 1), min_size=2, max_size=2, unique=True)))
        merged = dict(parts[i])
        merge_by_class(merged, parts[j])
        parts = [p for k, p in enumerate(parts) if k not in (i, j)] + [merged]
    table = parts[0] if parts else {}
    want = _direct(x, labels, c)
    assert sorted(table) == sorted(np.flatnonzero(want.count).tolist())  # exactly the classes present
    for cls, m in table.items():
        assert m.count == want.count[cls]
        np.testing.assert_allclose(m.sum, want.sum[cls], rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(m.outer_sum(), want.outer[cls], rtol=1e-10, atol=1e-8)
        np.testing.assert_allclose(m.mean(), want.means()[cls], rtol=1e-12, atol=1e-12)
        # rows only while count <= D, a D x D sum after; never more than D rows pending
        assert (m.outer is None) == (m.count <= d) and m.rows.shape[0] <= d


def test_axes_equal_the_dense_principal_axes():
    rng = np.random.default_rng(0)
    c, d, n = 4, 6, 900
    scales = np.linspace(3.0, 0.2, d)  # distinct eigenvalues: the axes are defined up to the sign rule
    labels = rng.integers(0, c, n)
    x = rng.normal(size=(n, d)) * scales + labels[:, None]
    table: dict[int, ClassMoments] = {}
    for a in range(0, n, 64):
        merge_by_class(table, fold_by_class(x[a:a + 64], labels[a:a + 64], c))
    dense = _direct(x, labels, c)
    want_axes, want_means = dense.principal_axes(2), dense.means()
    for cls in range(c):
        np.testing.assert_allclose(table[cls].axes(2), want_axes[cls], atol=1e-9)
    axes = np.stack([table[k].axes(2) for k in range(c)])
    means = np.stack([table[k].mean() for k in range(c)])
    np.testing.assert_allclose(project(x, labels, axes, means), project(x, labels, want_axes, want_means), atol=1e-8)
    # fewer than 2 rows: no axes, as the dense moments say
    one = ClassMoments.of_rows(x[:1])
    np.testing.assert_array_equal(one.axes(2), np.zeros((d, 2)))
    with pytest.raises(ConfigError, match="k must be"):
        one.axes(d + 1)


def test_partial_of_a_block_is_bounded_by_the_classes_present_not_by_c():
    """21,000 classes at D = 512: one dense FeatureMoments would be 44 GB. A block of 4,096 rows over
    the classes it holds costs at most its own features in float64, and fewer rows per class than D
    keep each class as rows."""
    rng = np.random.default_rng(1)
    c, d, b = 21_000, 512, 4096
    labels = rng.integers(0, c, b)
    x = rng.normal(size=(b, d)).astype(np.float32)
    parts = fold_by_class(x, labels, c)
    present = np.unique(labels)
    assert sorted(parts) == present.tolist()
    held = sum(m.nbytes for m in parts.values())
    assert held <= 8 * b * d + 8 * d * len(present)  # rows (float64) + one sum per class present
    assert all(m.outer is None for m in parts.values())
    # a class seen more than D times turns into one D x D sum and stays that size
    many = fold_by_class(np.ones((d + 5, d)), np.zeros(d + 5, np.int64), c)[0]
    assert many.outer is not None and many.nbytes == 8 * d * (d + 1)
    assert many.merge(many).nbytes == many.nbytes


def test_small_partials_touch_the_outer_sum_once_per_d_rows():
    """A reducer folding one-row partials into a large class: the D x D sum is rebuilt only when D
    rows are pending (a new array each time), not once per partial, and stays exact."""
    rng = np.random.default_rng(3)
    d, n = 8, 100
    x = rng.normal(size=(n, d))
    acc = ClassMoments.of_rows(x[:0])
    rebuilt, prev = 0, None
    for i in range(n):
        acc = acc.merge(ClassMoments.of_rows(x[i:i + 1]))
        assert acc.rows.shape[0] <= d and acc.nbytes <= 8 * d * (1 + 2 * d)
        rebuilt += acc.outer is not prev
        prev = acc.outer
    assert rebuilt == n // (d + 1)  # one fold per D + 1 pending rows
    np.testing.assert_allclose(acc.outer_sum(), x.T @ x, rtol=1e-12, atol=1e-12)
    assert acc.count == n


def test_bad_input_is_named():
    with pytest.raises(DataError, match="labels"):
        fold_by_class(np.zeros((3, 2)), np.array([0, 1, 5]), 3)
    with pytest.raises(DataError, match="same length"):
        fold_by_class(np.zeros((3, 2)), np.array([0, 1]), 3)
    with pytest.raises(DataError, match="D = 2 and D = 3"):
        ClassMoments.of_rows(np.ones((1, 2))).merge(ClassMoments.of_rows(np.ones((1, 3))))
    with pytest.raises(DataError, match="must hold all its rows"):
        ClassMoments(3, np.zeros(2), rows=np.zeros((1, 2)))
    with pytest.raises(DataError, match="m <= D"):
        ClassMoments(3, np.zeros(2), rows=np.zeros((3, 2)), outer=np.zeros((2, 2)))
    assert fold_by_class(np.zeros((0, 2)), np.zeros(0, np.int64), 3) == {}


# ------------------------------------------------------------------------------- reducers on real Ray


def _features_ds(x: np.ndarray, labels: np.ndarray, blocks: int):
    import ray

    return ray.data.from_items([{"sid": i, "label": int(labels[i]), "features": x[i].astype(np.float32)}
                                for i in range(len(labels))], override_num_blocks=blocks)


def test_reducers_partition_classes_and_match_the_dense_pca(ray_session):
    """Seven classes over three reducers (classes_per_reducer=3): every reducer holds only its own
    classes, the driver gets each class's mean and axes equal to the dense computation's, and executing
    the fed dataset twice (every block re-sent, as retries of every task would) changes nothing."""
    import ray

    from ctray.engine.classpca import class_axes, feed_reducers, start_reducers

    rng = np.random.default_rng(2)
    c, d, n = 7, 5, 700
    labels = rng.integers(0, c - 1, n)  # class 6 never occurs
    x = (rng.normal(size=(n, d)) * np.linspace(2.0, 0.3, d) + labels[:, None]).astype(np.float32)
    reducers = start_reducers(c, classes_per_reducer=3)
    assert len(reducers) == 3
    fed = feed_reducers(_features_ds(x, labels, 6), reducers, c, num_cpus=0.25)
    assert fed.count() == n
    assert fed.materialize().count() == n  # a second execution re-sends every block
    owned = ray.get([r.result.remote(2) for r in reducers])
    for j, res in enumerate(owned):
        assert all(int(k) % 3 == j for k in res["classes"])
        assert res["duplicates"] == res["blocks"] > 0
    axes, means, counts = class_axes(reducers, c, 2)
    dense = _direct(x.astype(np.float64), labels, c)
    np.testing.assert_array_equal(counts, dense.count)
    np.testing.assert_allclose(means, dense.means(), atol=1e-6)
    np.testing.assert_allclose(axes, dense.principal_axes(2), atol=1e-6)
    assert not axes[6].any() and not means[6].any()


def test_reducers_on_an_empty_dataset_say_so(ray_session):
    from ctray.engine.classpca import class_axes, feed_reducers, start_reducers

    reducers = start_reducers(3)
    fed = feed_reducers(_features_ds(np.zeros((4, 2)), np.zeros(4, np.int64), 1).limit(0),
                        reducers, 3, num_cpus=0.25)
    assert fed.count() == 0
    with pytest.raises(RuntimeError, match="empty scored dataset"):
        class_axes(reducers, 3)
