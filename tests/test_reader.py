"""The Ray Data reader on a mixed set of good and bad shards (real local Ray, session fixture)."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from ctray.data import reader as R
from ctray.data import shards as S
from ctray.data.shards import ImageSpec, ShardWriter
from ctray.errors import DataError

SPEC = ImageSpec(12, 10, 1)
NUM_CLASSES = 5


def _img(i: int, shape: tuple[int, ...] = (12, 10, 1)) -> np.ndarray:
    return ((np.arange(int(np.prod(shape))).reshape(shape) * 3 + i * 11) % 256).astype(np.uint8)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Three good shards (90 samples), one shard with sample-level problems, a truncated shard,
    a non-tar and an empty tar. Returns (dir, {key: pixels}, {key: label})."""
    d = tmp_path_factory.mktemp("mixed")
    pixels: dict[str, np.ndarray] = {}
    labels: dict[str, int] = {}
    with ShardWriter(str(d), "a-good", shard_size=30) as w:
        for i in range(90):
            key = f"g{i:04d}"
            pixels[key], labels[key] = _img(i), i % NUM_CLASSES
            w.write(key, pixels[key], labels[key], meta={"i": i} if i % 10 == 0 else None)
    rgb = _img(7, (12, 10, 3))
    _tar(str(d / "b-samples.tar"), [
        ("ok1.png", _png(_img(1))), ("ok1.cls", b"1"),
        ("junk.png", b"\x89PNG\r\n\x1a\nnot really"), ("junk.cls", b"1"),
        ("nocls.png", _png(_img(2))),
        ("range.png", _png(_img(3))), ("range.cls", b"7"),
        ("rgb.png", _png(rgb)), ("rgb.cls", b"2"),
        ("size.png", _png(_img(4, (8, 8, 1)))), ("size.cls", b"3"),
    ])
    pixels["ok1"], labels["ok1"] = _img(1), 1
    labels["rgb"] = 2
    # truncated: a valid 10-sample shard cut inside the 6th sample's .cls data
    with ShardWriter(str(d / "tmp"), "c", shard_size=10) as w:
        for i in range(10):
            w.write(f"t{i}", _img(100 + i), 0)
    raw = open(w.paths[0], "rb").read()
    with tarfile.open(w.paths[0]) as tf:
        cut = tf.getmember("t5.cls").offset_data + 1
    (d / "c-trunc.tar").write_bytes(raw[:cut])
    for i in range(5):
        pixels[f"t{i}"], labels[f"t{i}"] = _img(100 + i), 0
    (d / "d-notar.tar").write_bytes(b"hello, not a tar\n" * 40)
    _tar(str(d / "e-empty.tar"), [])
    for p in os.listdir(d / "tmp"):
        os.remove(d / "tmp" / p)
    os.rmdir(d / "tmp")
    return str(d), pixels, labels


def _expected(d: str) -> list[S.Record]:
    return list(S.iter_shards(S.expand_shards(d), SPEC, NUM_CLASSES))


@pytest.fixture(scope="module")
def mixed_ds(ray_session, mixed):
    d, _, _ = mixed
    return R.read_shards(d, SPEC, NUM_CLASSES, rows_per_block=16).materialize()


def test_schema_and_row_counts(mixed, mixed_ds):
    d, _, _ = mixed
    exp = _expected(d)
    assert mixed_ds.count() == len(exp) == 90 + 6 + 6 + 1 + 1
    schema = mixed_ds.schema()
    assert list(schema.names) == list(R.COLUMNS)
    assert schema.base_schema.field("image").type == R.block_schema(SPEC).field("image").type


def test_count_rows_consistent(mixed, mixed_ds):
    d, _, _ = mixed
    exp = _expected(d)
    stats = R.count_rows(mixed_ds)
    assert stats == {
        "read": sum(r.level == "sample" for r in exp),
        "usable": sum(r.ok for r in exp),
        "quarantined": sum(r.level == "sample" and not r.ok for r in exp),
        "shard_failures": sum(r.level == "shard" for r in exp),
        "converted": sum(r.ok and bool(r.note) for r in exp),
    }
    assert stats["read"] == stats["usable"] + stats["quarantined"]
    assert stats == {"read": 101, "usable": 97, "quarantined": 4, "shard_failures": 3, "converted": 1}


def test_quarantine_table_matches_parser(mixed, mixed_ds):
    d, _, _ = mixed
    q = R.quarantine_table(mixed_ds)
    assert q.column_names == list(R.QUARANTINE_COLUMNS)
    got = sorted(zip(*(q[c].to_pylist() for c in R.QUARANTINE_COLUMNS), strict=True))
    want = sorted((r.shard, r.key, r.reason, r.level) for r in _expected(d) if not r.ok)
    assert got == want
    shards = {s for s, _, _, lvl in got if lvl == "shard"}
    assert shards == {"c-trunc.tar", "d-notar.tar", "e-empty.tar"}
    assert {k for s, k, _, _ in got if s == "b-samples.tar"} == {"junk", "nocls", "range", "size"}


def test_images_labels_sids(mixed, mixed_ds):
    d, pixels, labels = mixed
    rows: dict[tuple[str, str], dict] = {}
    for b in mixed_ds.iter_batches(batch_size=None, batch_format="numpy"):
        assert b["image"].dtype == np.uint8 and b["image"].shape[1:] == SPEC.shape
        for j in range(len(b["key"])):
            rows[(str(b["shard"][j]), str(b["key"][j]))] = {c: b[c][j] for c in b}
    assert len(rows) == len(_expected(d))
    keys = list(rows)
    want = S.sample_ids([s for s, _ in keys], [k for _, k in keys])
    np.testing.assert_array_equal(np.array([rows[k]["sid"] for k in keys]), want)
    for key in ("g0000", "g0031", "g0089", "ok1", "t4"):
        (row,) = [r for (s, k), r in rows.items() if k == key]
        assert row["ok"] and row["label"] == labels[key] and row["reason"] == ""
        np.testing.assert_array_equal(row["image"], pixels[key])
    assert rows[("a-good-000000.tar", "g0010")]["meta"] == '{"i": 10}'
    rgb = rows[("b-samples.tar", "rgb")]
    assert rgb["ok"] and rgb["note"] == "mode RGB->L" and rgb["label"] == 2
    bad = rows[("b-samples.tar", "junk")]
    assert not bad["ok"] and bad["label"] == -1 and not bad["image"].any() and bad["level"] == "sample"


def test_usable_feeds_torch(mixed_ds):
    import torch

    n = 0
    for b in R.usable(mixed_ds).iter_torch_batches(batch_size=32):
        assert set(b) == set(R.TRAIN_COLUMNS)
        assert b["image"].dtype == torch.uint8 and tuple(b["image"].shape[1:]) == SPEC.shape
        assert b["label"].dtype == torch.int64 and b["sid"].dtype == torch.int64
        assert int(b["label"].min()) >= 0 and int(b["label"].max()) < NUM_CLASSES
        n += len(b["label"])
    assert n == 97


def test_shards_per_task_and_blocks_lazy(mixed):
    d, _, _ = mixed
    ds = R.read_shards(d, SPEC, NUM_CLASSES, shards_per_task=3, rows_per_block=7, num_cpus=0.5)
    stats = R.count_rows(ds)  # not materialized: one streaming pass
    assert stats["read"] == 101 and stats["shard_failures"] == 3
    # one task per 3 shards (never a tar split over tasks); the tables of <= 7 rows a task yields are
    # merged by Ray's output buffer into blocks of up to DataContext.target_max_block_size
    sizes = sorted(b.num_rows for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    assert sizes == [1, 13, 90]


def test_strict_raises_with_shard_name(ray_session, mixed):
    d, _, _ = mixed
    ds = R.read_shards(os.path.join(d, "d-notar.tar"), SPEC, NUM_CLASSES, strict=True)
    with pytest.raises(DataError) as ei:
        ds.materialize()
    # Ray re-raises the task's exception as RayTaskError(DataError): both a RayTaskError and a
    # DataError; `.cause` is the original DataError with a clean one-line message.
    assert "d-notar.tar" in str(ei.value) and S.R_NOT_TAR in str(ei.value)
    cause = getattr(ei.value, "cause", ei.value)
    assert isinstance(cause, DataError) and str(cause).startswith("shard d-notar.tar")


def test_strict_passes_sample_level_problems(ray_session, mixed):
    d, _, _ = mixed
    ds = R.read_shards([os.path.join(d, "b-samples.tar")], SPEC, NUM_CLASSES, strict=True)
    assert R.count_rows(ds) == {"read": 6, "usable": 2, "quarantined": 4, "shard_failures": 0,
                                "converted": 1}


def test_missing_input_raises_at_call(ray_session, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        R.read_shards(str(tmp_path / "nope.tar"), SPEC, NUM_CLASSES)


def test_images_to_numpy_on_arrow_table(mixed_ds):
    parts = list(mixed_ds.limit(20).iter_batches(batch_size=None, batch_format="pyarrow"))
    table = pa.concat_tables(parts)
    arr = R.images_to_numpy(table["image"])
    assert arr.shape == (20, *SPEC.shape) and arr.dtype == np.uint8


def test_keep_decodes_only_the_kept_samples(ray_session, mixed, mixed_ds):
    """A pass over a known subset (a round's kept set on the streaming path) yields exactly those samples,
    with the pixels a full read gives, plus the shard-level rows; the others are skipped, not decoded."""
    d, _, _ = mixed
    full = {int(s): (str(k), bool(o)) for b in mixed_ds.iter_batches(batch_size=None, batch_format="numpy")
            for s, k, o in zip(b["sid"], b["key"], b["ok"], strict=True)}
    ok_sids = np.array(sorted(s for s, (_, o) in full.items() if o), dtype=np.int64)
    kept = ok_sids[::3]
    sub = R.read_shards(d, SPEC, NUM_CLASSES, rows_per_block=16, keep=kept)
    rows = {int(s): (str(lv), bool(o)) for b in sub.iter_batches(batch_size=None, batch_format="numpy")
            for s, lv, o in zip(b["sid"], b["level"], b["ok"], strict=True)}
    samples = {s for s, (lv, _) in rows.items() if lv == "sample"}
    assert samples == set(kept.tolist())
    assert all(o for s, (_, o) in rows.items() if s in samples)
    assert sum(1 for lv, _ in rows.values() if lv == "shard") == 3  # truncated, not a tar, empty: as without keep
    u = R.usable(sub).iter_batches(batch_size=None, batch_format="numpy")
    got = {int(s): img for b in u for s, img in zip(b["sid"], b["image"], strict=True)}
    ref = {int(s): img for b in R.usable(mixed_ds).iter_batches(batch_size=None, batch_format="numpy")
           for s, img in zip(b["sid"], b["image"], strict=True) if int(s) in got}
    assert len(got) == len(kept) and all(np.array_equal(got[s], ref[s]) for s in got)


def test_select_skips_before_decoding(mixed):
    """iter_shard's select: rejected keys never reach the decoder (a broken image is not even seen)."""
    d, _, _ = mixed
    path = os.path.join(d, "b-samples.tar")
    recs = list(S.iter_shard(path, "b-samples.tar", SPEC, NUM_CLASSES, select=lambda k: k in ("ok1", "rgb")))
    assert [(r.key, r.reason) for r in recs] == [("ok1", ""), ("rgb", "")]
    assert list(S.iter_shard(path, "b", SPEC, NUM_CLASSES, select=lambda k: False)) == []
