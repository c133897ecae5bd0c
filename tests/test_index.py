"""The driver's sample index and column filler (pure NumPy): positions by id, exactly-once checks, dtypes."""

from __future__ import annotations

import numpy as np
import pytest

from ctray.core.index import ColumnFiller, SampleIndex, label_dtype


def test_sorted_ids_need_no_permutation_and_unsorted_ones_map_back():
    asc = SampleIndex(np.array([-7, 2, 3, 40], dtype=np.int64))
    assert asc.order is None and asc.sorted is asc.sids  # no copy for the common case (no canaries)
    pos, hit = asc.positions(np.array([40, -7, 5]))
    assert hit.tolist() == [True, True, False] and pos[hit].tolist() == [3, 0]
    mixed = SampleIndex(np.array([10, 2, 30, -1], dtype=np.int64))  # canaries appended after sorted ids
    assert mixed.positions_of_known(np.array([-1, 30, 10, 2])).tolist() == [3, 2, 0, 1]
    with pytest.raises(KeyError, match="1 of 2 sample ids are not in the index"):
        mixed.positions_of_known(np.array([2, 99]))
    empty = SampleIndex(np.empty(0, np.int64))
    assert not empty.positions(np.array([1]))[1].any()


def test_filler_writes_batches_in_driver_order_with_the_requested_dtypes():
    rng = np.random.default_rng(0)
    sids = np.unique(rng.integers(-2**62, 2**62, 1000))
    rng.shuffle(sids)
    index = SampleIndex(sids)
    f = ColumnFiller(index, {"loss": np.float32, "pred": label_dtype(10)})
    perm = rng.permutation(len(sids))
    for part in np.array_split(perm, 7):  # batches in any order
        f.add(sids[part], {"loss": part.astype(np.float64), "pred": (part % 10).astype(np.int64), "other": part})
    out = f.finish("pass")
    assert out["loss"].dtype == np.float32 and out["pred"].dtype == np.int16
    assert out["loss"].tolist() == list(range(len(sids)))
    assert (out["pred"] == np.arange(len(sids)) % 10).all()


def test_label_dtype_holds_every_class_id():
    assert label_dtype(10) == np.int16 and label_dtype(21841) == np.int16
    assert label_dtype(40000) == np.int32
    assert np.iinfo(label_dtype(32767)).max >= 32766
