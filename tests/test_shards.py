"""Shard writing, listing and parsing (no Ray): every bad input becomes a quarantine row."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from ctray.data import shards as S
from ctray.data.shards import ImageSpec, Record, ShardWriter, expand_shards, iter_shard, shard_ids
from ctray.errors import DataError

GREY = ImageSpec(8, 8, 1)
RGB = ImageSpec(8, 8, 3)


def _img(i: int, shape: tuple[int, ...] = (8, 8, 1)) -> np.ndarray:
    return ((np.arange(int(np.prod(shape))).reshape(shape) * 7 + i * 13) % 256).astype(np.uint8)


def _png(arr: np.ndarray | Image.Image) -> bytes:
    im = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _tar(path: str, members: list[tuple[str, bytes]]) -> str:
    """A hand-made tar with members in the given order."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def _good(path: str, n: int, label: int = 1, start: int = 0) -> list[tuple[str, bytes]]:
    return [m for i in range(start, start + n)
            for m in ((f"s{i:03d}.png", _png(_img(i)[:, :, 0])), (f"s{i:03d}.cls", str(label).encode()))]


def _parse(path: str, spec: ImageSpec | None = GREY, num_classes: int | None = 10,
           shard: str = "x.tar") -> list[Record]:
    return list(iter_shard(path, shard, spec, num_classes))


def _bad(recs: list[Record]) -> list[tuple[str, str, str]]:
    return [(r.key, r.level, r.reason) for r in recs if not r.ok]


def _check_counts(recs: list[Record]) -> None:
    sample = [r for r in recs if r.level == "sample"]
    ok = [r for r in recs if r.ok]
    assert len(sample) == len(ok) + sum(1 for r in sample if not r.ok)
    assert all(r.level == "sample" for r in ok)
    for r in recs:
        if r.ok:
            assert r.image is not None and r.image.dtype == np.uint8 and r.label >= 0 and r.reason == ""
        else:
            assert r.image is None and r.label == -1 and r.reason


# ----------------------------------------------------------------------------------------------------
# good data, writer


def test_writer_roundtrip_pixels_labels_meta(tmp_path):
    with ShardWriter(str(tmp_path), "t", shard_size=3) as w:
        for i in range(7):
            w.write(f"k{i}", _img(i), i % 4, meta={"url": f"http://x/{i}"} if i % 2 else None)
    assert [os.path.basename(p) for p in w.paths] == ["t-000000.tar", "t-000001.tar", "t-000002.tar"]
    recs = list(S.iter_shards(w.paths, GREY, 4))
    assert [r.key for r in recs] == [f"k{i}" for i in range(7)]
    assert [r.shard for r in recs] == ["t-000000.tar"] * 3 + ["t-000001.tar"] * 3 + ["t-000002.tar"]
    for i, r in enumerate(recs):
        assert r.ok and r.note == "" and r.label == i % 4
        np.testing.assert_array_equal(r.image, _img(i))
        assert (json.loads(r.meta) == {"url": f"http://x/{i}"}) if i % 2 else r.meta == ""
    _check_counts(recs)


def test_writer_rejects_bad_keys(tmp_path):
    with ShardWriter(str(tmp_path), "t", shard_size=5) as w:
        for key in ("a.b", "a/b", ""):
            with pytest.raises(DataError):
                w.write(key, _img(0), 0)
        w.write("a", _img(0), 0)
        with pytest.raises(DataError, match="duplicate key"):
            w.write("a", _img(1), 0)


def test_writer_is_deterministic(tmp_path):
    outs = []
    for run in ("a", "b"):
        with ShardWriter(str(tmp_path / run), "t", shard_size=4) as w:
            for i in range(6):
                w.write(f"k{i}", _img(i, (8, 8, 3)), i, meta={"i": i})
        outs.append([open(p, "rb").read() for p in w.paths])
    assert len(outs[0]) == 2 and outs[0] == outs[1]


def test_meta_json_carried(tmp_path):
    meta = {"url": "https://e.com/a.jpg", "caption": "x"}
    p = _tar(str(tmp_path / "m.tar"), [("a.png", _png(_img(0)[:, :, 0])), ("a.cls", b"2"),
                                       ("a.json", json.dumps(meta).encode())])
    (r,) = _parse(p)
    assert r.ok and json.loads(r.meta) == meta and r.label == 2


def test_keys_with_directory_prefix(tmp_path):
    p = _tar(str(tmp_path / "d.tar"), [("dir/sub/a1.png", _png(_img(0)[:, :, 0])), ("dir/sub/a1.cls", b"1"),
                                       ("dir/b2.png", _png(_img(1)[:, :, 0])), ("dir/b2.cls", b"3")])
    recs = _parse(p)
    assert [(r.key, r.label, r.ok) for r in recs] == [("dir/sub/a1", 1, True), ("dir/b2", 3, True)]


# ----------------------------------------------------------------------------------------------------
# bad input, one case per test


def _truncation_setup(tmp_path, cut_at):
    with ShardWriter(str(tmp_path), "t", shard_size=10) as w:
        for i in range(6):
            w.write(f"s{i}", _img(i), 1)
    raw = open(w.paths[0], "rb").read()
    with tarfile.open(w.paths[0]) as tf:
        members = {m.name: m for m in tf.getmembers()}
    cut = cut_at(members)
    p = tmp_path / "cut.tar"
    p.write_bytes(raw[:cut])
    return str(p)


def test_truncated_tar_mid_member(tmp_path):
    # cut in the middle of s4.cls's data: s0..s3 are complete and ok, then one shard-level row
    p = _truncation_setup(tmp_path, lambda m: m["s4.cls"].offset_data + 1)
    recs = _parse(p, shard="cut.tar")
    assert [r.key for r in recs if r.ok] == ["s0", "s1", "s2", "s3"]
    ((key, level, reason),) = _bad(recs)
    assert level == "shard" and key == "s4" and reason.startswith(S.R_TRUNCATED)
    assert all(r.shard == "cut.tar" for r in recs)
    _check_counts(recs)


def test_truncated_tar_in_next_samples_first_member(tmp_path):
    # cut inside s4.png: the samples before are ok (s3 may be reported as the sample in progress,
    # see the note in the reply: iter_shard flushes a sample only after the next member's data)
    p = _truncation_setup(tmp_path, lambda m: m["s4.png"].offset_data + 10)
    recs = _parse(p)
    ok = [r.key for r in recs if r.ok]
    assert ok in (["s0", "s1", "s2"], ["s0", "s1", "s2", "s3"])
    ((key, level, reason),) = _bad(recs)
    assert level == "shard" and reason.startswith(S.R_TRUNCATED) and key in ("s3", "s4")


def test_not_a_tar(tmp_path):
    p = tmp_path / "junk.tar"
    p.write_bytes(b"this is not a tar archive\n" * 50)
    ((key, level, reason),) = _bad(_parse(str(p), shard="junk.tar"))
    assert key == "" and level == "shard" and reason.startswith(S.R_NOT_TAR)


def test_zero_byte_file(tmp_path):
    p = tmp_path / "zero.tar"
    p.write_bytes(b"")
    ((key, level, reason),) = _bad(_parse(str(p)))
    assert key == "" and level == "shard" and reason.startswith(S.R_NOT_TAR)


def test_empty_shard(tmp_path):
    p = _tar(str(tmp_path / "e.tar"), [])
    recs = _parse(p)
    assert len(recs) == 1
    assert (recs[0].key, recs[0].level, recs[0].reason) == ("", "shard", S.R_EMPTY)


def test_image_does_not_decode(tmp_path):
    p = _tar(str(tmp_path / "g.tar"), _good("", 1) + [("bad.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20),
                                                     ("bad.cls", b"1")] + _good("", 1, start=5))
    recs = _parse(p)
    assert [r.key for r in recs] == ["s000", "bad", "s005"]
    ((key, level, reason),) = _bad(recs)
    assert (key, level) == ("bad", "sample") and reason.startswith(S.R_DECODE)
    _check_counts(recs)


def test_missing_cls(tmp_path):
    p = _tar(str(tmp_path / "m.tar"), [("a.png", _png(_img(0)[:, :, 0]))] + _good("", 1))
    assert _bad(_parse(p)) == [("a", "sample", S.R_NO_CLS)]


def test_non_integer_cls(tmp_path):
    p = _tar(str(tmp_path / "m.tar"), [("a.png", _png(_img(0)[:, :, 0])), ("a.cls", b"cat")])
    ((key, _, reason),) = _bad(_parse(p))
    assert key == "a" and reason.startswith(S.R_BAD_CLS) and "cat" in reason


@pytest.mark.parametrize("label", [-1, 10, 99])
def test_label_out_of_range(tmp_path, label):
    p = _tar(str(tmp_path / "m.tar"), [("a.png", _png(_img(0)[:, :, 0])), ("a.cls", str(label).encode())]
             + _good("", 1, label=9))
    recs = _parse(p, num_classes=10)
    ((key, _, reason),) = _bad(recs)
    assert key == "a" and reason.startswith(S.R_LABEL_RANGE)
    assert [r.label for r in recs if r.ok] == [9]


def test_label_upper_bound_skipped_without_num_classes(tmp_path):
    p = _tar(str(tmp_path / "m.tar"), [("a.png", _png(_img(0)[:, :, 0])), ("a.cls", b"99")])
    (r,) = _parse(p, num_classes=None)
    assert r.ok and r.label == 99


def _mixed_size_tar(tmp_path) -> str:
    return _tar(str(tmp_path / "sz.tar"), _good("", 2) + [("big.png", _png(_img(0, (12, 10))[:, :])),
                                                         ("big.cls", b"1")])


def test_mixed_sizes_quarantined(tmp_path):
    recs = _parse(_mixed_size_tar(tmp_path), ImageSpec(8, 8, 1, on_size="quarantine"))
    ((key, _, reason),) = _bad(recs)
    assert key == "big" and reason.startswith(S.R_SIZE) and "10x12" in reason
    _check_counts(recs)


def test_mixed_sizes_resized(tmp_path):
    recs = _parse(_mixed_size_tar(tmp_path), ImageSpec(8, 8, 1, on_size="resize"))
    assert all(r.ok for r in recs)
    big = next(r for r in recs if r.key == "big")
    assert big.image.shape == (8, 8, 1) and big.note == "resized"
    assert all(r.note == "" for r in recs if r.key != "big")


def _modes_tar(tmp_path) -> str:
    rgb = _img(1, (8, 8, 3))
    rgba = np.concatenate([rgb, np.full((8, 8, 1), 255, np.uint8)], axis=2)
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    members = [("grey.png", _png(_img(0)[:, :, 0])), ("grey.cls", b"0"),
               ("rgb.png", _png(rgb)), ("rgb.cls", b"1"),
               ("rgba.png", _png(rgba)), ("rgba.cls", b"2"),
               ("pal.png", _png(pal)), ("pal.cls", b"3")]
    return _tar(str(tmp_path / "modes.tar"), members)


def test_mixed_modes_convert_to_rgb(tmp_path):
    recs = {r.key: r for r in _parse(_modes_tar(tmp_path), ImageSpec(8, 8, 3, on_mode="convert"))}
    assert all(r.ok and r.image.shape == (8, 8, 3) for r in recs.values())
    assert recs["rgb"].note == ""
    assert recs["grey"].note == "mode L->RGB"
    assert recs["rgba"].note == "mode RGBA->RGB"
    assert recs["pal"].note == "mode P->RGB"
    np.testing.assert_array_equal(recs["rgba"].image, _img(1, (8, 8, 3)))  # opaque alpha: same pixels
    g = _img(0)[:, :, 0]
    np.testing.assert_array_equal(recs["grey"].image, np.stack([g, g, g], axis=2))


def test_mixed_modes_convert_to_grey(tmp_path):
    recs = {r.key: r for r in _parse(_modes_tar(tmp_path), ImageSpec(8, 8, 1, on_mode="convert"))}
    assert all(r.ok and r.image.shape == (8, 8, 1) for r in recs.values())
    assert recs["grey"].note == "" and recs["rgb"].note == "mode RGB->L"
    assert recs["pal"].note == "mode P->L" and recs["rgba"].note == "mode RGBA->L"


def test_mixed_modes_quarantined(tmp_path):
    recs = _parse(_modes_tar(tmp_path), ImageSpec(8, 8, 3, on_mode="quarantine"))
    bad = {k: reason for k, _, reason in _bad(recs)}
    assert set(bad) == {"grey", "rgba", "pal"}
    assert all(r.startswith(S.R_MODE) for r in bad.values())
    assert [r.key for r in recs if r.ok] == ["rgb"]
    _check_counts(recs)


def test_duplicate_keys_second_quarantined(tmp_path):
    a0, a1 = _png(_img(0)[:, :, 0]), _png(_img(1)[:, :, 0])
    p = _tar(str(tmp_path / "dup.tar"), [("a.png", a0), ("a.cls", b"1"), ("a.png", a1), ("a.cls", b"2"),
                                         ("b.png", a0), ("b.cls", b"1"), ("a.png", a1), ("a.cls", b"3")])
    recs = _parse(p)
    assert [(r.key, r.ok) for r in recs] == [("a", True), ("a", False), ("b", True), ("a", False)]
    assert [reason for _, _, reason in _bad(recs)] == [S.R_DUP, S.R_DUP]
    first = recs[0]
    assert first.label == 1
    np.testing.assert_array_equal(first.image[:, :, 0], _img(0)[:, :, 0])


def test_bad_json_quarantined(tmp_path):
    p = _tar(str(tmp_path / "j.tar"), [("a.png", _png(_img(0)[:, :, 0])), ("a.cls", b"1"),
                                       ("a.json", b"{not json")] + _good("", 1))
    recs = _parse(p)
    assert _bad(recs) == [("a", "sample", S.R_BAD_JSON)]
    assert recs[0].meta == "{not json"


def test_no_image_and_two_images(tmp_path):
    p = _tar(str(tmp_path / "n.tar"), [("a.cls", b"1"), ("b.png", _png(_img(0)[:, :, 0])),
                                       ("b.jpg", b"x"), ("b.cls", b"1")])
    bad = _bad(_parse(p))
    assert [(k, r.split(":")[0]) for k, _, r in bad] == [("a", S.R_NO_IMAGE), ("b", S.R_MULTI_IMAGE)]


# ----------------------------------------------------------------------------------------------------
# listing, ids, probing


@pytest.fixture()
def shard_dir(tmp_path):
    d = tmp_path / "d"
    with ShardWriter(str(d), "train", shard_size=1) as w:
        for i in range(4):
            w.write(f"k{i}", _img(i), 0)
    (d / "notes.txt").write_text("not a shard")
    return d


def test_expand_directory(shard_dir):
    got = expand_shards(str(shard_dir))
    assert [os.path.basename(p) for p in got] == [f"train-{i:06d}.tar" for i in range(4)]


def test_expand_glob_brace_comma_list(shard_dir):
    d = str(shard_dir)
    p = [f"{d}/train-{i:06d}.tar" for i in range(4)]
    assert expand_shards(f"{d}/train-00000[13].tar") == [p[1], p[3]]
    assert expand_shards(f"{d}/train-*.tar") == p
    assert expand_shards(f"{d}/train-{{000000..000002}}.tar") == p[:3]
    assert expand_shards(f"{p[2]},{p[0]}") == [p[0], p[2]]
    assert expand_shards([p[3], p[1], p[3]]) == [p[1], p[3]]
    assert expand_shards([d, p[0]]) == p


def test_expand_errors(tmp_path, shard_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        expand_shards(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="matches no"):
        expand_shards(f"{shard_dir}/nope-*.tar")
    with pytest.raises(DataError, match="does not exist"):
        expand_shards(str(tmp_path / "missing.tar"))
    with pytest.raises(DataError, match="does not exist"):
        expand_shards(f"{shard_dir}/train-{{000003..000005}}.tar")


def test_shard_ids_one_and_two_dirs(tmp_path):
    one = [str(tmp_path / "a" / "x-0.tar"), str(tmp_path / "a" / "x-1.tar")]
    assert shard_ids(one) == {one[0]: "x-0.tar", one[1]: "x-1.tar"}
    two = [str(tmp_path / "a" / "x.tar"), str(tmp_path / "b" / "x.tar")]
    assert shard_ids(two) == {two[0]: "a/x.tar", two[1]: "b/x.tar"}
    assert shard_ids([]) == {}


def test_probe_spec_from_data(tmp_path):
    with ShardWriter(str(tmp_path), "t", shard_size=5) as w:
        for i in range(6):
            w.write(f"k{i}", _img(i, (12, 10, 3)), 1)
    assert S.probe_spec(w.paths) == (ImageSpec(12, 10, 3), None)


def test_probe_spec_from_manifest(tmp_path):
    with ShardWriter(str(tmp_path), "t", shard_size=5) as w:
        w.write("k0", _img(0), 1)
    (tmp_path / "manifest.json").write_text(json.dumps({"image_shape": [28, 28, 1], "num_classes": 10}))
    assert S.read_manifest(w.paths)["num_classes"] == 10
    assert S.probe_spec(w.paths) == (ImageSpec(28, 28, 1), 10)


def test_probe_spec_no_decodable_image(tmp_path):
    p = _tar(str(tmp_path / "bad.tar"), [("a.png", b"nope"), ("a.cls", b"1")])
    with pytest.raises(DataError, match="no decodable image"):
        S.probe_spec([p])


def test_sample_id_stable_and_distinct():
    a = S.sample_id("x.tar", "k1")
    assert a == S.sample_id("x.tar", "k1") and a != S.sample_id("x.tar", "k2") != S.sample_id("y.tar", "k1")
    ids = S.sample_ids(["x.tar", "x.tar"], ["k1", "k2"])
    assert ids.dtype == np.int64 and ids[0] == a


def test_cut_at_every_header_boundary_is_never_silent(tmp_path):
    """A tar cut exactly at a 512-byte boundary (where tarfile's stream mode just stops) still yields a
    shard-level row, and every complete sample before the cut is kept."""
    import numpy as np

    from ctray.data.shards import ImageSpec, ShardWriter, iter_shard

    with ShardWriter(str(tmp_path), "t", 100) as w:
        for i in range(6):
            w.write(f"s{i}", np.full((8, 8), i * 20, np.uint8), i % 3)
    import tarfile

    raw = open(w.paths[0], "rb").read()
    with tarfile.open(w.paths[0]) as tf:  # where the members end (zero blocks and record padding follow)
        end = max(m.offset_data + -(-m.size // 512) * 512 for m in tf.getmembers())
    for cut in range(512, end + 1, 512):
        p = tmp_path / f"cut{cut}.tar"
        p.write_bytes(raw[:cut])
        recs = list(iter_shard(str(p), p.name, ImageSpec(8, 8, 1), 3))
        assert recs[-1].level == "shard" and recs[-1].reason.startswith("truncated tar"), cut
        ok_keys = [r.key for r in recs if r.ok]
        assert ok_keys == [f"s{i}" for i in range(len(ok_keys))], cut


def test_sixteen_bit_grey_is_scaled_not_clipped():
    import io

    import numpy as np
    from PIL import Image

    from ctray.data.shards import ImageSpec, decode_image

    a = np.array([[0, 1000], [40000, 65535]], np.uint16)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    img, reason, _ = decode_image(buf.getvalue(), ImageSpec(2, 2, 1))
    assert reason == ""
    assert img[..., 0].tolist() == [[0, 3], [156, 255]]
