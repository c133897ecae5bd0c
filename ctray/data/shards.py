"""WebDataset shards: writing, listing and parsing, with bad input turned into quarantine rows.

The input contract (DESIGN.md §3): a shard is a tar of ``<key>.<png|jpg|jpeg|webp>`` + ``<key>.cls``
(+ optional ``<key>.json``). Sample identity is ``(shard, key)``: ``shard`` is the shard's path relative
to the common directory of all inputs of a run (the basename for one directory), so the identity does
not change when the data moves from a laptop to a bucket.

This module has no Ray dependency: :func:`iter_shard` is the one parser, used by the Ray Data
datasource (``ctray.data.reader``) and by the single-process tools (poisoning, benchmarks).
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

import numpy as np
from PIL import Image

from ctray.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")

# Quarantine reasons (stable strings: tests, reports and users grep for them).
R_NOT_TAR = "not a readable tar file"
R_TRUNCATED = "truncated tar"
R_EMPTY = "empty shard"
R_NO_IMAGE = "no image member"
R_MULTI_IMAGE = "more than one image member"
R_DECODE = "image does not decode"
R_NO_CLS = "missing .cls"
R_BAD_CLS = "non-integer .cls"
R_LABEL_RANGE = "label out of range"
R_SIZE = "image size differs from the run's"
R_MODE = "image mode differs from the run's"
R_DUP = "duplicate key in shard"
R_BAD_JSON = "invalid .json metadata"
R_FORMAT = "image format not PNG, JPEG or WebP"
R_TOO_LARGE = "image dimensions over data.max_pixels"
R_SPECIAL = "member is a link or device, not a regular file"
R_BAD_NAME = "member name is not valid UTF-8"

#: The image formats the input contract names, recognised by content (never by extension): PIL is never
#: asked to try its other decoders (EPS would start Ghostscript, an external interpreter, on input bytes).
DECODE_FORMATS = ("PNG", "JPEG", "WEBP")
#: Default of ``data.max_pixels``: 8192 x 8192, far above any training image; checked from the header
#: before a pixel is decoded (a few-KB PNG can declare 12,000 x 12,000 pixels).
MAX_PIXELS = 1 << 26
#: Default of ``data.max_member_bytes``: a tar member declaring more is damage (or an attack), not a sample.
MAX_MEMBER_BYTES = 256 * 2**20

# Mode -> channels after conversion. Palette and alpha images are converted (alpha dropped).
_MODE_CHANNELS = {"1": 1, "L": 1, "LA": 1, "I": 1, "I;16": 1, "F": 1, "P": 3, "RGB": 3, "RGBA": 3,
                  "CMYK": 3, "YCbCr": 3, "PA": 3}


@dataclass(frozen=True)
class ImageSpec:
    """What every decoded image of a run looks like.

    Attributes:
        height, width: pixels.
        channels: 1 (grey) or 3 (RGB).
        on_mode: ``"convert"`` converts any mode to ``channels`` (grey<->RGB, palette, alpha dropped)
            and counts it; ``"quarantine"`` quarantines images whose native channels differ.
        on_size: ``"quarantine"`` (default) quarantines images of another size; ``"resize"`` resizes them
            (bilinear) and counts it.
        max_pixels: an image declaring more pixels (width x height, from its header) is quarantined
            before any pixel is decoded.
        max_member_bytes: a tar member declaring more bytes ends the shard's parse as damage.
    """

    height: int
    width: int
    channels: int
    on_mode: Literal["convert", "quarantine"] = "convert"
    on_size: Literal["quarantine", "resize"] = "quarantine"
    max_pixels: int = MAX_PIXELS
    max_member_bytes: int = MAX_MEMBER_BYTES

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)


@dataclass
class Record:
    """One parsed sample (or one shard-level failure when ``reason`` is set and ``key`` may be "").

    ``image`` is ``uint8 (H, W, C)`` at the run's spec when ``ok``; ``label`` is -1 when not ok.
    ``note`` says what was converted/resized on an ok record ("" when nothing).
    """

    shard: str
    key: str
    image: np.ndarray | None
    label: int
    meta: str  # the raw .json text ("" when absent)
    reason: str = ""
    note: str = ""
    level: Literal["sample", "shard"] = "sample"

    @property
    def ok(self) -> bool:
        return not self.reason


# ----------------------------------------------------------------------------------------------------
# writing


def encode_image(image: np.ndarray, fmt: str = "png") -> bytes:
    """Encode ``uint8 (H, W)`` or ``(H, W, C)`` (C in 1, 3, 4) as PNG/JPEG/WebP bytes."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise DataError(f"encode_image needs uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    pil_fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
    kwargs: dict[str, Any] = {"compress_level": 1} if pil_fmt == "PNG" else {"quality": 95}
    Image.fromarray(arr).save(buf, format=pil_fmt, **kwargs)
    return buf.getvalue()


@dataclass
class ShardWriter:
    """Write samples into numbered tar shards ``<out_dir>/<prefix>-%06d.tar`` of ``shard_size`` samples.

    Deterministic: same samples in the same order give byte-identical tars (fixed mtime, uid, order),
    so shard hashes are usable as integrity signals. Local directories only (write, then upload).

    Use as a context manager; :attr:`paths` lists the shards written.
    """

    out_dir: str
    prefix: str
    shard_size: int
    image_format: str = "png"
    paths: list[str] = field(default_factory=list)
    _tar: tarfile.TarFile | None = None
    _count: int = 0
    _keys: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise DataError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.image_format not in IMAGE_EXTS:
            raise DataError(f"image_format must be one of {IMAGE_EXTS}, got {self.image_format!r}")
        os.makedirs(self.out_dir, exist_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add(self, name: str, data: bytes) -> None:
        assert self._tar is not None
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o444
        info.uname = info.gname = "ctray"
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, image: np.ndarray | bytes, label: int,
              meta: dict[str, Any] | None = None, image_ext: str | None = None) -> None:
        """Append one sample. ``image`` is uint8 HxW[xC] pixels, or already-encoded bytes (then
        ``image_ext`` names their format). ``key`` must not contain '.' (WebDataset splits on it)."""
        if "." in key or "/" in key or not key:
            raise DataError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
        if self._tar is None or self._count >= self.shard_size:
            self._open_next()
        if key in self._keys:
            raise DataError(f"duplicate key {key!r} in shard {self.paths[-1]}")
        self._keys.add(key)
        if isinstance(image, bytes | bytearray):
            ext, data = (image_ext or self.image_format), bytes(image)
        else:
            ext, data = self.image_format, encode_image(image, self.image_format)
        self._add(f"{key}.{ext}", data)
        self._add(f"{key}.cls", str(int(label)).encode())
        if meta:
            self._add(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        self._count += 1

    def _open_next(self) -> None:
        self.close()
        path = os.path.join(self.out_dir, f"{self.prefix}-{len(self.paths):06d}.tar")
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        self.paths.append(path)
        self._count = 0
        self._keys = set()

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


# ----------------------------------------------------------------------------------------------------
# listing


def _is_remote(path: str) -> bool:
    return "://" in path


def open_input(path: str) -> BinaryIO:
    """Open a local path or an ``s3://`` / ``gs://`` URI for streaming reads (pyarrow filesystems)."""
    if _is_remote(path):
        from pyarrow import fs as pafs

        filesystem, p = pafs.FileSystem.from_uri(path)
        return filesystem.open_input_stream(p)  # type: ignore[return-value]
    return open(path, "rb")


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Resolve shard inputs to a sorted, de-duplicated list of tar paths/URIs.

    Accepts a directory (its ``*.tar``), a glob (``d/train-*.tar``), a brace pattern
    (``d/train-{000000..000009}.tar``), a comma-separated string, or a list of any of these; local or
    ``s3://`` / ``gs://`` (listed with pyarrow's filesystems, credentials from the environment).

    Raises:
        DataError: a pattern or directory that matches no tar, or a named file that does not exist.
    """
    import glob as globmod

    from braceexpand import braceexpand

    items = [spec] if isinstance(spec, str) else list(spec)
    parts: list[str] = []
    for item in items:
        for piece in str(item).split(","):
            if piece.strip():
                parts.extend(braceexpand(piece.strip()))
    out: list[str] = []
    for p in parts:
        if _is_remote(p):
            out.extend(_expand_remote(p))
            continue
        if os.path.isdir(p):
            found = sorted(globmod.glob(os.path.join(p, "*.tar")))
            if not found:
                raise DataError(f"directory {p} holds no *.tar shards")
            out.extend(found)
        elif any(ch in p for ch in "*?["):
            found = sorted(globmod.glob(p))
            if not found:
                raise DataError(f"pattern {p} matches no file")
            out.extend(found)
        elif os.path.exists(p):
            out.append(p)
        else:
            raise DataError(f"shard {p} does not exist")
    seen: set[str] = set()
    uniq = [p for p in out if not (p in seen or seen.add(p))]  # type: ignore[func-returns-value]
    return sorted(uniq)


def _expand_remote(uri: str) -> list[str]:
    """List an ``s3://`` / ``gs://`` directory, glob or object (pyarrow filesystems, credentials and
    endpoint from the environment). Glob characters ``* ? [`` may appear in any path component; the
    listing starts at the last directory before the first one (recursive when a later component holds
    one) and ``fnmatch`` filters the full paths."""
    import fnmatch

    import pyarrow as pa
    from pyarrow import fs as pafs

    scheme, rest = uri.split("://", 1)
    wild = next((i for i, ch in enumerate(rest) if ch in "*?["), None)
    try:
        if wild is not None:
            base = rest[:wild].rsplit("/", 1)[0]
            # from_uri would read '?' as the start of a query string: build the filesystem from the base only
            filesystem, base_path = pafs.FileSystem.from_uri(f"{scheme}://{base}")
            sel = pafs.FileSelector(base_path.rstrip("/"), recursive="/" in rest[wild:], allow_not_found=True)
            found = [f"{scheme}://{i.path}" for i in filesystem.get_file_info(sel)
                     if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, rest)]
            if not found:
                raise DataError(f"pattern {uri} matches no object")
            return sorted(found)
        filesystem, path = pafs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(path.rstrip("/"))
        if info.type == pafs.FileType.Directory:
            sel = pafs.FileSelector(path.rstrip("/"), recursive=False)
            found = [f"{scheme}://{i.path}" for i in filesystem.get_file_info(sel)
                     if i.type == pafs.FileType.File and i.path.endswith(".tar")]
            if not found:
                raise DataError(f"{uri} holds no *.tar shards")
            return sorted(found)
    except (OSError, pa.ArrowException) as e:  # no such bucket, no credentials, endpoint unreachable
        raise DataError(f"cannot list {uri}: {e}") from e
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"shard {uri} does not exist")
    return [uri]


def shard_ids(paths: Sequence[str]) -> dict[str, str]:
    """Map each shard path to its id: the path relative to the inputs' common directory.

    One directory of shards gives basenames (``train-000000.tar``). Inputs from several directories
    keep the distinguishing part (``a/000.tar``, ``b/000.tar``).
    """
    if not paths:
        return {}
    stripped = [p.split("://", 1)[1] if _is_remote(p) else os.path.abspath(p) for p in paths]
    dirs = [posixpath.dirname(s) for s in stripped]
    common = posixpath.commonpath(dirs) if len(set(dirs)) > 1 else dirs[0]
    return {p: posixpath.relpath(s, common) for p, s in zip(paths, stripped, strict=True)}


# ----------------------------------------------------------------------------------------------------
# parsing


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first '.' of the basename; ext = the rest, lowercased."""
    d, b = posixpath.split(name)
    if "." not in b:
        return name, ""
    stem, ext = b.split(".", 1)
    return (posixpath.join(d, stem) if d else stem), ext.lower()


def decode_image(data: bytes, spec: ImageSpec | None) -> tuple[np.ndarray | None, str, str]:
    """Decode image bytes to ``uint8 (H, W, C)`` at ``spec`` (native channels when ``spec`` is None).

    Returns:
        ``(image, reason, note)``: ``image`` is None and ``reason`` set when unusable; ``note`` names a
        conversion/resize that was applied.
    """
    max_px = spec.max_pixels if spec else MAX_PIXELS
    try:
        with warnings.catch_warnings():  # a huge header is refused below, by our cap, not PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im_open = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
    except Image.DecompressionBombError as e:
        return None, f"{R_TOO_LARGE}: {e}"[:300], ""
    except Image.UnidentifiedImageError:
        return None, f"{R_FORMAT}: {_format_hint(data)}", ""
    except Exception as e:  # PIL raises many types for corrupt data
        return None, f"{R_DECODE}: {type(e).__name__}: {e}"[:300], ""
    try:
        with im_open as im_raw:
            w, h = im_raw.size  # from the header: nothing decoded yet
            if w * h > max_px:
                return None, f"{R_TOO_LARGE}: {w}x{h} = {w * h} pixels > {max_px}", ""
            if spec and spec.on_size == "quarantine" and (h, w) != (spec.height, spec.width):
                return None, f"{R_SIZE}: {w}x{h}, run wants {spec.width}x{spec.height}", ""
            im_raw.load()
            im: Image.Image = im_raw  # the 16-bit branch rebinds it to a plain Image
            if im.mode.startswith("I;16") or im.mode == "I":
                # 16/32-bit grey: scale to 8 bits (PIL's convert("L") would clip 1000 to 255)
                wide = np.asarray(im, dtype=np.int64)
                shift = 8 if im.mode.startswith("I;16") or wide.max() < 65536 else 24
                im = Image.fromarray(np.clip(wide >> shift, 0, 255).astype(np.uint8), mode="L")
            mode = im.mode
            native_c = _MODE_CHANNELS.get(mode, 3)
            want_c = spec.channels if spec else native_c
            note = ""
            if spec and native_c != want_c or mode not in ("L", "RGB"):
                if spec and spec.on_mode == "quarantine" and (native_c != want_c or mode in ("P", "RGBA", "LA", "PA")):
                    return None, f"{R_MODE}: {mode}, run wants {'L' if want_c == 1 else 'RGB'}", ""
                if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
                    # composite on black so the alpha channel does not leak as garbage pixels
                    rgba = im.convert("RGBA")
                    bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                    im2 = Image.alpha_composite(bg, rgba)
                else:
                    im2 = im
                im2 = im2.convert("L" if want_c == 1 else "RGB")
                note = f"mode {mode}->{im2.mode}"
            else:
                im2 = im
            if spec and (im2.height, im2.width) != (spec.height, spec.width):
                if spec.on_size == "quarantine":
                    return None, f"{R_SIZE}: {im2.width}x{im2.height}, run wants {spec.width}x{spec.height}", ""
                im2 = im2.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
                note = (note + "; " if note else "") + "resized"
            arr = np.asarray(im2, dtype=np.uint8)
    except Exception as e:  # PIL raises many types for corrupt data
        return None, f"{R_DECODE}: {type(e).__name__}: {e}"[:300], ""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr, "", note


def _format_hint(data: bytes) -> str:
    """A short, printable description of what the bytes start with (for a quarantine reason)."""
    head = data[:8]
    known = {b"GIF8": "GIF", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"%!PS": "PostScript/EPS", b"BM": "BMP",
             b"\xc5\xd0\xd3\xc6": "EPS", b"%PDF": "PDF"}
    for magic, name in known.items():
        if head.startswith(magic):
            return f"content is {name}"
    return f"content starts with {head!r}" if head else "empty member"


def _safe_key(key: str) -> str:
    """``key`` as valid UTF-8 text: bytes that are not UTF-8 (kept as surrogates by the tar parser)
    are shown as ``\\xNN`` escapes, so the key can be written to Arrow/Parquet and read by a person."""
    try:
        key.encode("utf-8")
        return key
    except UnicodeEncodeError:
        return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_MAX_LABEL = 2**31 - 1  # labels travel as int64 columns; anything this large is not a class id


def _finish(shard: str, key: str, members: dict[str, bytes | None], spec: ImageSpec | None,
            num_classes: int | None) -> Record:
    imgs = [e for e in members if e in IMAGE_EXTS]
    safe = _safe_key(key)
    meta_raw = members.get("json", b"") or b""
    meta = meta_raw.decode("utf-8", "replace") if meta_raw else ""

    def bad(reason: str) -> Record:
        return Record(shard, safe, None, -1, meta, reason=reason)

    if safe != key:
        return bad(R_BAD_NAME)
    special = sorted(e for e, d in members.items() if d is None)
    if special:
        return bad(f"{R_SPECIAL}: {', '.join(f'{safe}.{e}' for e in special)[:200]}")
    if not imgs:
        return bad(R_NO_IMAGE)
    if len(imgs) > 1:
        return bad(f"{R_MULTI_IMAGE}: {sorted(imgs)}")
    if "cls" not in members:
        return bad(R_NO_CLS)
    txt = (members["cls"] or b"").decode("utf-8", "replace").strip()
    try:
        if not txt.isascii() or "_" in txt or len(txt) > 64:  # int() also takes other scripts' digits, "1_000"
            raise ValueError(txt)
        label = int(txt)
    except ValueError:
        return bad(f"{R_BAD_CLS}: {txt[:40]!r}")
    hi_ = min(num_classes, _MAX_LABEL + 1) if num_classes is not None else _MAX_LABEL + 1
    if label < 0 or label >= hi_:
        hi = f"{num_classes}" if num_classes is not None else f"{_MAX_LABEL + 1}"
        return bad(f"{R_LABEL_RANGE}: {str(label)[:24]} not in [0, {hi})")
    if meta:
        try:
            json.loads(meta)
        except ValueError:
            return bad(R_BAD_JSON)
    image, reason, note = decode_image(members[imgs[0]] or b"", spec)
    if image is None:
        return bad(reason)
    return Record(shard, key, image, label, meta, note=note)


def iter_shard(path: str, shard_id: str, spec: ImageSpec | None, num_classes: int | None,
               fileobj: BinaryIO | None = None, select: Callable[[str], bool] | None = None) -> Iterator[Record]:
    """Parse one shard into :class:`Record` s, streaming (one sample's members in memory at a time).

    Every sample found yields exactly one record, ok or with a quarantine ``reason``. Shard-level
    failures (not a tar, empty) yield one record with ``level="shard"`` and ``key=""``; a truncated
    tar yields the samples read before the damage, then one shard-level record naming where it broke.
    Duplicate keys within a shard: the first occurrence is kept, later ones are quarantined.

    Args:
        path: local path or URI (opened with :func:`open_input` unless ``fileobj`` is given).
        shard_id: the identity string written in every record's ``shard``.
        spec: the run's image spec; None keeps native size/channels (used to probe a dataset).
        num_classes: labels must lie in ``[0, num_classes)``; None skips the upper bound.
        select: when given, only samples whose key it accepts are decoded and yielded (a pass that wants a
            known subset, e.g. a round's kept set, skips the decode of the rest); the others are not
            records of this pass, so "every sample yields a record" holds for the selected ones. Shard-level
            records are yielded as without it.
    """
    seen: set[str] = set()
    n = 0
    cur_key: str | None = None
    members: dict[str, bytes | None] = {}
    max_member = spec.max_member_bytes if spec is not None else MAX_MEMBER_BYTES

    def flush() -> Iterator[Record]:
        nonlocal n
        if cur_key is None:
            return
        n += 1
        if select is not None and not select(cur_key):
            seen.add(cur_key)
            return
        if cur_key in seen:
            yield Record(shard_id, _safe_key(cur_key), None, -1, "", reason=R_DUP)
            return
        seen.add(cur_key)
        yield _finish(shard_id, cur_key, members, spec, num_classes)

    f = fileobj if fileobj is not None else open_input(path)
    try:
        try:
            for name, data in _tar_members(f, max_member, _size_of(f)):
                key, ext = _split_name(name)
                if key != cur_key or ext in members:
                    # a new sample starts (or the same key repeats an extension: a duplicate sample)
                    yield from flush()
                    cur_key, members = key, {}
                members[ext] = data
        except _NotATar as e:
            yield Record(shard_id, "", None, -1, "", reason=f"{R_NOT_TAR}: {e}"[:300], level="shard")
            return
        except (tarfile.TarError, EOFError, ValueError) as e:
            nxt = getattr(e, "member", None)
            if nxt is not None and _split_name(nxt)[0] != cur_key:
                # the damage is in a new sample's member: the previous sample is complete
                yield from flush()
                cur_key, members = _split_name(nxt)[0], {}
            # samples completed before the damage were yielded; the one in progress is lost with it
            where = f" at key {_safe_key(cur_key)!r}" if cur_key else ""
            yield Record(shard_id, _safe_key(cur_key or ""), None, -1, "",
                         reason=f"{R_TRUNCATED}{where}: {e}"[:300], level="shard")
            return
        yield from flush()
        if n == 0:
            yield Record(shard_id, "", None, -1, "", reason=R_EMPTY, level="shard")
    finally:
        if fileobj is None:
            f.close()


def _size_of(f: BinaryIO) -> int | None:
    """Bytes in a seekable local file (None for a stream): a member cannot declare more than the shard."""
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


class _NotATar(tarfile.ReadError):
    """The first header is not a tar header (or the file is empty)."""


class _CutMember(tarfile.ReadError):
    def __init__(self, msg: str, member: str | None):
        super().__init__(msg)
        self.member = member


_ZERO_BLOCK = bytes(512)


def _reader(f: BinaryIO) -> Callable[[int], bytes]:
    """read(n) that is short only at end of stream (network streams may return short reads)."""
    raw = f.read

    def read(n: int) -> bytes:
        data = raw(n)
        if len(data) == n or not data:
            return data
        parts, got = [data], len(data)
        while got < n:
            chunk = raw(n - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    return read


def _tar_number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256
        v = int.from_bytes(field[1:], "big")
        return v - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else v
    txt = field.split(b"\0", 1)[0].strip()
    return int(txt, 8) if txt else 0


def _tar_members(f: BinaryIO, max_member: int = MAX_MEMBER_BYTES,
                 file_size: int | None = None) -> Iterator[tuple[str, bytes | None]]:
    """``(name, data)`` of each regular file of a tar stream, in order (ustar, GNU, pax names), and
    ``(name, None)`` for a link (symbolic or hard), device or FIFO entry, which is never followed: the
    caller quarantines the sample it belongs to. Directory entries are skipped.

    A member declaring more than ``max_member`` bytes, or more than the rest of the file (``file_size``,
    when the stream is a local file), is damage: ``tarfile.ReadError`` naming the member.

    Written here instead of using ``tarfile`` stream mode for two measured reasons: ``tarfile`` ends the
    archive SILENTLY when a stream is cut at or inside a 512-byte header (11 of 60 random cuts went
    undetected, i.e. samples dropped without a quarantine row), and it costs ~25 us per member against
    ~5 us here (the read benchmark's largest cost). Raises ``tarfile.ReadError`` on any damage,
    including a stream that ends without the end-of-archive zero block.
    """
    raw_read = _reader(f)
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        data = raw_read(n)
        pos += len(data)
        return data

    first = True
    long_name: str | None = None
    while True:
        hdr = read(512)
        if len(hdr) < 512:
            if first:
                raise _NotATar("empty file" if not hdr else "file shorter than one tar header")
            raise tarfile.ReadError("unexpected end of data: no end-of-archive marker"
                                    if not hdr else "truncated header")
        if hdr == _ZERO_BLOCK:
            return
        try:
            chk = _tar_number(hdr[148:156])
            size = _tar_number(hdr[124:136])
        except ValueError as e:
            raise (_NotATar if first else tarfile.ReadError)(f"invalid header: {e}") from None
        body = hdr[:148] + b"        " + hdr[156:]
        if chk != sum(body) and chk != sum(b - 256 if b > 127 else b for b in body):
            raise (_NotATar if first else tarfile.ReadError)("invalid header: bad checksum")
        first = False
        typ = hdr[156:157]
        if long_name is not None:
            name = long_name
        else:
            name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if hdr[257:263] == b"ustar\0":  # POSIX prefix (GNU uses this field for times)
                prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if prefix:
                    name = f"{prefix}/{name}"
        if size < 0 or size > max_member or (file_size is not None and size > file_size - pos):
            left = f", {max(0, file_size - pos)} bytes left in the shard" if file_size is not None else ""
            raise _CutMember(f"member {name[:80]!r} declares {size} bytes (cap {max_member}: data.max_member_bytes"
                             f"{left})", name if typ in (b"0", b"\0", b"7") else None)
        data = read(size)
        pad = -size % 512
        if len(data) < size or (pad and len(read(pad)) < pad):
            raise _CutMember("unexpected end of data", name if typ in (b"0", b"\0", b"7") else None)
        if typ == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if typ == b"x":
            for rec in data.decode("utf-8", "surrogateescape").split("\n"):
                if " path=" in rec:
                    long_name = rec.split(" path=", 1)[1]
            continue
        long_name = None
        if typ in (b"1", b"2", b"3", b"4", b"6"):  # hard link, symlink, char/block device, FIFO
            yield name, None
            continue
        if typ not in (b"0", b"\0", b"7"):
            continue
        yield name, data


def iter_shards(paths: Iterable[str], spec: ImageSpec | None, num_classes: int | None) -> Iterator[Record]:
    """:func:`iter_shard` over several shards, with ids from :func:`shard_ids`."""
    paths = list(paths)
    ids = shard_ids(paths)
    for p in paths:
        yield from iter_shard(p, ids[p], spec, num_classes)


def load_arrays(paths: Sequence[str], spec: ImageSpec | None = None, num_classes: int | None = None,
                ) -> tuple[list[Record], list[Record]]:
    """Read shards fully into memory (single process). Returns ``(ok_records, quarantined)``.

    For small sets only (dataset preparation, poisoning, tests); runs read through Ray Data instead.
    """
    ok: list[Record] = []
    bad: list[Record] = []
    for r in iter_shards(paths, spec, num_classes):
        (ok if r.ok else bad).append(r)
    return ok, bad


def read_manifest(shards: Sequence[str]) -> dict[str, Any] | None:
    """The ``manifest.json`` beside the first shard (written by ``ctray data``), or None."""
    if not shards:
        return None
    first = shards[0]
    d = first.rsplit("/", 1)[0] if _is_remote(first) else os.path.dirname(first)
    path = f"{d}/manifest.json"
    try:
        with open_input(path) as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError, ValueError):
        return None


def probe_spec(shards: Sequence[str], max_samples: int = 64) -> tuple[ImageSpec, int | None]:
    """Infer the run's image spec (and class count, if a manifest gives it) from the data.

    Uses ``manifest.json`` when present; otherwise the most common native (H, W, C) among the first
    ``max_samples`` decodable samples of the first shards.

    Raises:
        DataError: no decodable sample in the probed shards.
    """
    man = read_manifest(shards)
    if man and "image_shape" in man:
        h, w, c = man["image_shape"]
        return ImageSpec(int(h), int(w), int(c)), man.get("num_classes")
    counts: dict[tuple[int, int, int], int] = {}
    seen = 0
    for p in shards:
        for r in iter_shard(p, p, None, None):
            if r.ok and r.image is not None:
                shp = (int(r.image.shape[0]), int(r.image.shape[1]), int(r.image.shape[2]))
                counts[shp] = counts.get(shp, 0) + 1
                seen += 1
                if seen >= max_samples:
                    break
        if seen >= max_samples:
            break
    if not counts:
        raise DataError(f"no decodable image in the first shards ({shards[:3]}...): cannot infer the image size")
    h, w, c = max(counts.items(), key=lambda kv: kv[1])[0]
    return ImageSpec(h, w, c), None


def sample_id(shard: str, key: str) -> int:
    """A stable signed 64-bit id of ``(shard, key)`` (BLAKE2b), for joins and set membership.

    Identity remains ``(shard, key)``; the id is an index into it. A collision among N samples has
    probability about N**2 / 2**64 (1e-8 at 1e6 samples), so outputs keep ``shard`` and ``key`` too.
    """
    import hashlib

    h = hashlib.blake2b(f"{shard}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little", signed=True)


def sample_ids(shards: Sequence[str], keys: Sequence[str]) -> np.ndarray:
    """Vector form of :func:`sample_id`: ``int64 (N,)``."""
    return np.fromiter((sample_id(s, k) for s, k in zip(shards, keys, strict=True)), dtype=np.int64,
                       count=len(keys))
