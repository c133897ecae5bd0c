"""Hostile shards: every case becomes a quarantine row (or a shard-level row) with its reason, nothing
crashes the read and nothing vanishes. The real parser and the real read-task body (Arrow blocks), in
process: no Ray is needed to read one shard, so these run in a second."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from ctray.data import reader as R
from ctray.data import shards as S
from ctray.data.shards import ImageSpec

SPEC = ImageSpec(8, 8, 1)
NUM_CLASSES = 10


def _png(value: int = 7, size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0]), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _info(name: str, size: int = 0, typ: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.linkname = size, typ, link
    return ti


def _tar(path: str, members: list[tuple[str, bytes] | tarfile.TarInfo]) -> str:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                tf.addfile(_info(m[0], len(m[1])), io.BytesIO(m[1]))
    return path


def _read(path: str, spec: ImageSpec = SPEC) -> tuple[list[S.Record], pa.Table]:
    """The parser's records and the read task's Arrow blocks for one shard (what Ray Data would hold)."""
    recs = list(S.iter_shard(path, os.path.basename(path), spec, NUM_CLASSES))
    blocks = list(R._read_shard_group([path], [os.path.basename(path)], spec, NUM_CLASSES, 64, False))
    table = pa.concat_tables(blocks) if blocks else pa.table({})
    assert table.num_rows == len(recs)  # every record became exactly one row
    return recs, table


def _by_key(recs: list[S.Record]) -> dict[str, S.Record]:
    return {r.key: r for r in recs if r.level == "sample"}


def test_cls_beyond_int64_is_a_quarantine_row(tmp_path):
    p = _tar(str(tmp_path / "big.tar"), [("a.png", _png()), ("a.cls", b"1"),
                                         ("b.png", _png()), ("b.cls", b"99999999999999999999"),
                                         ("c.png", _png()), ("c.cls", b"\xd9\xa3"),  # ARABIC-INDIC THREE
                                         ("d.png", _png()), ("d.cls", b"1_0")])
    recs, table = _read(p)
    k = _by_key(recs)
    assert k["a"].ok and k["a"].label == 1
    assert k["b"].reason.startswith(S.R_LABEL_RANGE) and "99999999999999999999" in k["b"].reason
    assert k["c"].reason.startswith(S.R_BAD_CLS) and k["d"].reason.startswith(S.R_BAD_CLS)
    assert table.column("label").to_pylist() == [1, -1, -1, -1]


def test_member_name_not_utf8_is_quarantined_with_a_printable_key(tmp_path):
    bad = b"bad\xff".decode("utf-8", "surrogateescape")
    p = _tar(str(tmp_path / "names.tar"), [(f"{bad}.png", _png()), (f"{bad}.cls", b"1"),
                                           ("ok.png", _png()), ("ok.cls", b"2")])
    recs, table = _read(p)
    assert [(r.key, r.reason) for r in recs] == [("bad\\xff", S.R_BAD_NAME), ("ok", "")]
    assert table.column("key").to_pylist() == ["bad\\xff", "ok"]  # writable to Parquet, readable


def _set_size(raw: bytearray, header_at: int, field: bytes) -> None:
    """Overwrite a tar header's size field (12 bytes at offset 124) and fix its checksum."""
    raw[header_at + 124:header_at + 136] = field
    raw[header_at + 148:header_at + 156] = b" " * 8
    raw[header_at + 148:header_at + 156] = b"%06o\0 " % sum(raw[header_at:header_at + 512])


@pytest.mark.parametrize("field", [b"\x80" + (2**80).to_bytes(11, "big"),  # base-256: 2**80 bytes
                                   b"\xff" + ((1 << 88) - 5).to_bytes(11, "big"),  # base-256: -5
                                   b"77777777777\0"])  # octal 8 GiB, more than the file
def test_absurd_member_size_ends_the_shard_as_damage_after_the_good_samples(tmp_path, field):
    p = _tar(str(tmp_path / "size.tar"), [("a.png", _png()), ("a.cls", b"1"), ("b.png", _png()), ("b.cls", b"2")])
    raw = bytearray(open(p, "rb").read())
    with tarfile.open(p) as tf:
        at = tf.getmember("b.png").offset
    _set_size(raw, at, field)
    open(p, "wb").write(bytes(raw))
    recs, _ = _read(p)
    assert [(r.key, r.ok) for r in recs[:1]] == [("a", True)]
    (shard_row,) = recs[1:]
    assert shard_row.level == "shard" and shard_row.reason.startswith(S.R_TRUNCATED)
    assert "'b.png' declares" in shard_row.reason


def test_member_cap_is_a_setting(tmp_path):
    p = _tar(str(tmp_path / "cap.tar"), [("a.png", _png()), ("a.cls", b"1")])
    recs, _ = _read(p, ImageSpec(8, 8, 1, max_member_bytes=10))
    assert recs[0].level == "shard" and "cap 10: data.max_member_bytes" in recs[0].reason


@pytest.mark.parametrize("typ", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_link_and_device_members_are_never_followed_and_never_vanish(tmp_path, typ):
    p = _tar(str(tmp_path / "links.tar"), [
        _info("x.png", typ=typ, link="/etc/passwd"),  # only a link: no .cls, no regular member at all
        ("y.png", _png()), _info("y.cls", typ=typ, link="../../secret"),
        ("z.png", _png()), ("z.cls", b"3"),
        _info("somedir", typ=tarfile.DIRTYPE)])
    recs, _ = _read(p)
    k = _by_key(recs)
    assert set(k) == {"x", "y", "z"} and len(recs) == 3  # a directory entry is no sample
    assert k["x"].reason == f"{S.R_SPECIAL}: x.png" and k["y"].reason == f"{S.R_SPECIAL}: y.cls"
    assert k["z"].ok


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), 3).save(buf, format="GIF")
    return buf.getvalue()


def _float_tiff() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 0.5, np.float32), mode="F").save(buf, format="TIFF")
    return buf.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n"


def test_only_png_jpeg_webp_are_decoded_by_content(tmp_path, monkeypatch):
    """A GIF, a float TIFF or an EPS named .png is quarantined by content; the EPS decoder (Ghostscript,
    an external interpreter) is never reached."""
    from PIL import EpsImagePlugin

    def no_eps(*a, **k):
        raise AssertionError("the EPS plugin was asked to open attacker bytes")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", no_eps)
    buf = io.BytesIO()
    Image.new("L", (8, 8), 9).save(buf, format="JPEG")
    webp = io.BytesIO()
    Image.new("L", (8, 8), 9).save(webp, format="WEBP")
    p = _tar(str(tmp_path / "formats.tar"), [
        ("gif.png", _gif()), ("gif.cls", b"1"), ("tif.png", _float_tiff()), ("tif.cls", b"1"),
        ("eps.png", EPS), ("eps.cls", b"1"), ("jpg.png", buf.getvalue()), ("jpg.cls", b"1"),
        ("webp.png", webp.getvalue()), ("webp.cls", b"1")])
    recs, _ = _read(p)
    k = _by_key(recs)
    assert k["gif"].reason == f"{S.R_FORMAT}: content is GIF"
    assert k["tif"].reason == f"{S.R_FORMAT}: content is TIFF"
    assert k["eps"].reason == f"{S.R_FORMAT}: content is PostScript/EPS"
    assert k["jpg"].ok and k["webp"].ok  # by content: a JPEG named .png is still a JPEG


def _bomb_png(w: int, h: int) -> bytes:
    """A valid single-colour PNG of w x h grey pixels, compressed to a few hundred KB at most."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\0" * (w + 1)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_from_its_header(tmp_path, monkeypatch):
    from PIL import ImageFile

    bomb = _bomb_png(12000, 12000)
    assert len(bomb) < 300_000  # 144 million pixels in a few hundred KB
    loads = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self):
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    p = _tar(str(tmp_path / "bomb.tar"), [("bomb.png", bomb), ("bomb.cls", b"1"), ("ok.png", _png()), ("ok.cls", b"1")])
    recs = list(S.iter_shard(p, "bomb.tar", ImageSpec(8, 8, 1, on_size="resize"), NUM_CLASSES))
    k = _by_key(recs)
    assert k["bomb"].reason == f"{S.R_TOO_LARGE}: 12000x12000 = 144000000 pixels > {S.MAX_PIXELS}"
    assert (12000, 12000) not in loads and k["ok"].ok  # never decoded
    small = list(S.iter_shard(p, "bomb.tar", ImageSpec(8, 8, 1, max_pixels=63), NUM_CLASSES))
    assert _by_key(small)["ok"].reason.startswith(S.R_TOO_LARGE)  # the cap is a setting


def test_traversal_keys_stay_identity(tmp_path):
    """Keys like ../../x or /tmp/x are identity strings only: read as they are, never used as paths here
    (the export renames them: tests/test_export.py)."""
    p = _tar(str(tmp_path / "trav.tar"), [("../../x.png", _png()), ("../../x.cls", b"1"),
                                          ("/tmp/y.png", _png()), ("/tmp/y.cls", b"2")])
    recs, table = _read(p)
    assert [(r.key, r.ok) for r in recs] == [("../../x", True), ("/tmp/y", True)]
    assert table.column("key").to_pylist() == ["../../x", "/tmp/y"]


# -------------------------------------------------------------------------------------------- fuzz

FUZZ_SEED, FUZZ_CASES = 20261206, 300


def _valid_tar(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(int(rng.integers(1, 5))):
            for ext, data in (("png", _png(int(rng.integers(0, 255)))), ("cls", str(i % NUM_CLASSES).encode())):
                ti = tarfile.TarInfo(f"s{i}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _mutate(raw: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(raw)
    kind = int(rng.integers(0, 6))
    if kind == 0:  # truncate anywhere
        return bytes(b[:int(rng.integers(0, len(b)))])
    hdrs = [i for i in range(0, len(b) - 512, 512) if b[i + 257:i + 262] == b"ustar"]
    at = int(rng.choice(hdrs)) if hdrs else 0
    if kind == 1:  # random bytes in a header field (size, type, name, mode ...), checksum fixed or not
        lo = int(rng.choice([0, 100, 124, 136, 156, 157, 257, 345]))
        n = int(rng.integers(1, 13))
        b[at + lo:at + lo + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        if rng.random() < 0.7:
            b[at + 148:at + 156] = b" " * 8
            b[at + 148:at + 156] = b"%06o\0 " % sum(b[at:at + 512])
    elif kind == 2:  # random member name bytes (non-UTF-8, slashes, NULs), checksum fixed
        n = int(rng.integers(1, 40))
        name = bytes(rng.choice(list(b"ab./\\\xff\xfe\x00\x80-_ "), n).astype(np.uint8))
        b[at:at + 100] = name.ljust(100, b"\0")[:100]
        b[at + 148:at + 156] = b" " * 8
        b[at + 148:at + 156] = b"%06o\0 " % sum(b[at:at + 512])
    elif kind == 3:  # random bytes in a member's data (image or .cls contents)
        lo = at + 512
        n = int(rng.integers(1, 64))
        b[lo:lo + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    elif kind == 4:  # random .cls contents of random length
        with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
            cls = [m for m in tf.getmembers() if m.name.endswith(".cls")]
        m = cls[int(rng.integers(0, len(cls)))]
        txt = rng.choice([b"-1", b"99999999999999999999", b"7" * 5000, b"\xff\xfe", b"3.5", b" 4 ", b"", b"1e3"])
        b[m.offset_data:m.offset_data + m.size] = txt[:m.size].ljust(m.size, b" ")
    else:  # random garbage spliced in
        lo = int(rng.integers(0, len(b)))
        n = int(rng.integers(1, 2048))
        b[lo:lo] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return bytes(b)


def test_fuzzed_tars_never_crash_the_read_and_account_for_every_record(tmp_path, capsys):
    rng = np.random.default_rng(FUZZ_SEED)
    with capsys.disabled():
        print(f"\nfuzz: {FUZZ_CASES} malformed tars, seed {FUZZ_SEED}")
    kinds = {"ok": 0, "sample": 0, "shard": 0}
    for case in range(FUZZ_CASES):
        path = str(tmp_path / f"f{case}.tar")
        with open(path, "wb") as f:
            f.write(_mutate(_valid_tar(rng), rng))
        try:
            recs, table = _read(path)
        except Exception as e:  # noqa: BLE001 - the property under test
            raise AssertionError(f"case {case} (seed {FUZZ_SEED}) raised {type(e).__name__}: {e}") from e
        for r in recs:
            assert r.shard == f"f{case}.tar"
            r.key.encode("utf-8")  # every key is writable text
            if r.ok:
                assert r.image is not None and r.image.shape == SPEC.shape and 0 <= r.label < NUM_CLASSES
                kinds["ok"] += 1
            else:
                assert r.reason and r.label == -1
                kinds[r.level] += 1
        ok = table.column("ok").to_pylist() if table.num_rows else []
        assert sum(ok) == sum(r.ok for r in recs) and len(ok) == len(recs)
        with pytest.raises(Exception) if any(r.level == "shard" for r in recs) else _nullcontext():
            list(R._read_shard_group([path], [f"f{case}.tar"], SPEC, NUM_CLASSES, 64, True))
    assert kinds["ok"] and kinds["sample"] and kinds["shard"]  # the generator reaches all three outcomes


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
