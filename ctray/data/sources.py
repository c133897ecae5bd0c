"""Built-in data sources written as WebDataset shards: train, trusted clean reserve, test.

``make_dataset`` writes ``<out>/train-%06d.tar``, ``clean-%06d.tar``, ``test-%06d.tar`` (PNG images,
``.cls`` labels) and ``manifest.json``. Keys are the sample's index in its source split with a split
prefix (``tr0000123``: image 123 of the source train split; ``te``: the source test split, which feeds
both clean and test; ``dg`` / ``im``: the single pool of ``digits`` / ``folder``), so the same seed gives
the same keys. Samples are written in a seeded random order.

Sources: ``fashion-mnist`` (Debian ``dataset-fashion-mnist``), ``digits`` (scikit-learn), ``folder``
(an ImageFolder tree), ``cifar10`` / ``gtsrb`` (torchvision, only with ``download=True``).
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctray._version import __version__
from ctray.data.shards import IMAGE_EXTS, ImageSpec, ShardWriter, decode_image
from ctray.errors import DataError

log = logging.getLogger(__name__)

SOURCES = ("fashion-mnist", "digits", "folder", "cifar10", "gtsrb")
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                  "Bag", "Ankle boot"]
SPLITS = ("train", "clean", "test")


@dataclass
class _Pool:
    """Images of one source split: ``uint8 (N, H, W, C)`` pixels or a list of N encoded files."""

    images: np.ndarray | list[str]
    labels: np.ndarray
    prefix: str
    meta: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.labels)


def make_dataset(source: str, out_dir: str, n_train: int | None, n_clean: int | None, n_test: int | None,
                 shard_size: int, seed: int, root: str | None = None, download: bool = False,
                 image_size: int | None = None, train_slice: int = 0) -> dict[str, Any]:
    """Write a source as train / clean / test shards plus ``manifest.json`` under ``out_dir``.

    Args:
        source: one of :data:`SOURCES`.
        out_dir: local output directory (created; earlier ctray shards in it are replaced).
        n_train, n_clean, n_test: split sizes; None takes the source's default (see module doc and
            the per-source notes: clean is drawn from the test split where the source has one).
        shard_size: samples per shard (>= 1).
        seed: seeds the subset choice and the sample order.
        root: ``folder``: the ImageFolder root (required); ``fashion-mnist``: the idx.gz directory
            (default ``/usr/share/datasets/fashion-mnist``); ``cifar10`` / ``gtsrb``: torchvision's root.
        download: allow torchvision to download ``cifar10`` / ``gtsrb`` (needs network).
        image_size: ``folder`` / ``gtsrb``: decode and resize to ``image_size x image_size``.
        train_slice: which block of ``n_train`` samples of the seed's permutation of the train pool to
            take (0 = the first). Slices 0, 1, ... of one seed are disjoint train sets with the same clean
            and test splits: a confirmation set for a change measured on slice 0.

    Returns:
        The manifest written: ``source, seed, train_slice, num_classes, classes, image_shape [H, W, C], counts,
        shards, ctray_version``.

    Raises:
        DataError: unknown source, missing data, bad counts (names the field and what is available).
    """
    for name, v in (("n_train", n_train), ("n_clean", n_clean), ("n_test", n_test)):
        if v is not None and v < 0:
            raise DataError(f"{name} must be >= 0, got {v}")
    if shard_size < 1:
        raise DataError(f"shard_size must be >= 1, got {shard_size}")
    if image_size is not None and image_size < 8:
        raise DataError(f"image_size must be >= 8, got {image_size}")
    if train_slice < 0:
        raise DataError(f"train_slice must be >= 0, got {train_slice}")
    rng = np.random.default_rng(seed)
    shape: tuple[int, ...]
    if source == "fashion-mnist":
        train, test, classes = _fashion_mnist(root or FMNIST_DIR)
        splits = _split_two(train, test, n_train, n_clean, n_test, rng, source, train_slice)
    elif source == "digits":
        pool, classes = _digits()
        splits = _split_pool(pool, n_train, 300 if n_clean is None else n_clean,
                             300 if n_test is None else n_test, rng, source, train_slice)
    elif source == "folder":
        if not root:
            raise DataError("source 'folder' needs root (--root DIR holding DIR/<class>/<image>)")
        pool, classes, shape = _folder(root, image_size)
        n10 = int(round(0.1 * len(pool)))
        splits = _split_pool(pool, n_train, n10 if n_clean is None else n_clean,
                             n10 if n_test is None else n_test, rng, source, train_slice)
    elif source in ("cifar10", "gtsrb"):
        train, test, classes = _torchvision(source, root, download, image_size)
        splits = _split_two(train, test, n_train, n_clean, n_test, rng, source, train_slice)
    else:
        raise DataError(f"unknown source {source!r}; known: {', '.join(SOURCES)}")
    if source != "folder":
        shape = tuple(int(s) for s in splits["train"][0].images.shape[1:])  # type: ignore[union-attr]

    prepare_out_dir(out_dir)
    shards: dict[str, list[str]] = {}
    for split in SPLITS:
        pool, order = splits[split]
        shards[split] = _write_split(out_dir, split, pool, order, shard_size, root)
        log.info("%s: wrote %d %s samples in %d shards to %s", source, len(order), split,
                 len(shards[split]), out_dir)
    manifest = {"source": source, "seed": seed, "train_slice": train_slice, "num_classes": len(classes),
                "classes": classes, "image_shape": list(shape), "counts": {s: len(splits[s][1]) for s in SPLITS},
                "shards": shards, "ctray_version": __version__}
    if source == "folder":
        manifest["root"] = os.path.abspath(root or "")
    write_manifest(out_dir, manifest)
    return manifest


# ----------------------------------------------------------------------------------------------------
# output helpers (shared with ctray.data.poison)


def prepare_out_dir(out_dir: str) -> None:
    """Create ``out_dir``; remove the shards, manifest and truth of an earlier ctray output there.

    Raises:
        DataError: ``out_dir`` holds ``*.tar`` files but no ctray ``manifest.json`` (not ours to delete).
    """
    os.makedirs(out_dir, exist_ok=True)
    tars = glob.glob(os.path.join(out_dir, "*.tar"))
    man = os.path.join(out_dir, "manifest.json")
    if tars and not os.path.exists(man):
        raise DataError(f"output directory {out_dir} holds {len(tars)} .tar files not written by ctray "
                        f"(no manifest.json); choose an empty or new directory")
    old = tars + [p for p in (man, os.path.join(out_dir, "truth.parquet")) if os.path.exists(p)]
    if old:
        log.info("replacing %d files of an earlier output in %s", len(old), out_dir)
    for p in old:
        os.remove(p)


def write_manifest(out_dir: str, manifest: dict[str, Any]) -> None:
    """Write ``out_dir/manifest.json`` (written last: a directory without it is incomplete)."""
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")


def _write_split(out_dir: str, split: str, pool: _Pool, order: np.ndarray, shard_size: int,
                 root: str | None) -> list[str]:
    with ShardWriter(out_dir, split, shard_size) as w:
        for i in order:
            key = f"{pool.prefix}{int(i):07d}"
            meta = pool.meta[i] if pool.meta else None
            if isinstance(pool.images, np.ndarray):
                w.write(key, pool.images[i], int(pool.labels[i]), meta)
            else:  # an encoded file copied as-is
                path = pool.images[i]
                with open(path, "rb") as f:
                    data = f.read()
                ext = path.rsplit(".", 1)[1].lower()
                w.write(key, data, int(pool.labels[i]), meta, image_ext=ext)
    return [os.path.basename(p) for p in w.paths]


# ----------------------------------------------------------------------------------------------------
# splitting


Splits = dict[str, tuple[_Pool, np.ndarray]]


def _slice(perm: np.ndarray, start: int, n: int, k: int, source: str, what: str) -> np.ndarray:
    """Block ``k`` of ``n`` entries of ``perm`` after ``start`` (train slice ``k``)."""
    lo = start + k * n
    if lo + n > len(perm):
        raise DataError(f"train slice {k} of {n} samples needs {lo + n} images; {what} of {source} has "
                        f"{len(perm)} (slices 0..{max(0, (len(perm) - start) // max(n, 1) - 1)} fit)")
    return perm[lo:lo + n]


def _split_two(train: _Pool, test: _Pool, n_train: int | None, n_clean: int | None, n_test: int | None,
               rng: np.random.Generator, source: str, train_slice: int = 0) -> Splits:
    """Train: a seeded subset of the train split (block ``train_slice`` of its permutation); clean + test:
    disjoint subsets of the test split."""
    n_train = len(train) if n_train is None else n_train
    n_clean = min(2000, len(test)) if n_clean is None else n_clean
    if n_train < 1 or n_train > len(train):
        raise DataError(f"n_train must be in [1, {len(train)}] (the {source} train split), got {n_train}")
    if n_clean > len(test):
        raise DataError(f"n_clean={n_clean} exceeds the {len(test)} images of the {source} test split")
    n_test = len(test) - n_clean if n_test is None else n_test
    if n_clean + n_test > len(test):
        raise DataError(f"n_clean + n_test = {n_clean + n_test} exceeds the {len(test)} images of the "
                        f"{source} test split (clean and test are disjoint parts of it)")
    tr = _slice(rng.permutation(len(train)), 0, n_train, train_slice, source, "the train split")
    te = rng.permutation(len(test))
    return {"train": (train, tr), "clean": (test, te[:n_clean]), "test": (test, te[n_clean:n_clean + n_test])}


def _split_pool(pool: _Pool, n_train: int | None, nc: int, nt: int,
                rng: np.random.Generator, source: str, train_slice: int = 0) -> Splits:
    """One pool split three ways: clean and test first (fixed by the seed), train from the rest (block
    ``train_slice`` of it)."""
    n = len(pool)
    if nc + nt >= n:
        raise DataError(f"n_clean + n_test = {nc + nt} leaves no train sample of the {n} images of {source}")
    n_train = n - nc - nt if n_train is None else n_train
    if n_train < 1 or nc + nt + n_train > n:
        raise DataError(f"n_train must be in [1, {n - nc - nt}] ({n} images of {source} minus "
                        f"n_clean={nc} and n_test={nt}), got {n_train}")
    perm = rng.permutation(n)
    return {"clean": (pool, perm[:nc]), "test": (pool, perm[nc:nc + nt]),
            "train": (pool, _slice(perm, nc + nt, n_train, train_slice, source, "the pool"))}


# ----------------------------------------------------------------------------------------------------
# sources


def _read_idx(path: str, header: int, shape: tuple[int, ...], magic: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path} is not an idx file (magic {magic} expected)")
    n = int.from_bytes(raw[4:8], "big")
    arr = np.frombuffer(raw, np.uint8, offset=header)
    if arr.size != n * int(np.prod(shape)):
        raise DataError(f"{path}: {arr.size} bytes of data, header says {n} items of {shape}")
    return arr.reshape((n, *shape))


def _fashion_mnist(d: str) -> tuple[_Pool, _Pool, list[str]]:
    pools = []
    for split, prefix in (("train", "tr"), ("t10k", "te")):
        img_p = os.path.join(d, f"{split}-images-idx3-ubyte.gz")
        lab_p = os.path.join(d, f"{split}-labels-idx1-ubyte.gz")
        for p in (img_p, lab_p):
            if not os.path.exists(p):
                raise DataError(f"Fashion-MNIST file {p} not found; install the Debian package: "
                                f"sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist")
        images = _read_idx(img_p, 16, (28, 28, 1), 2051)
        labels = _read_idx(lab_p, 8, (), 2049).astype(np.int64)
        if len(images) != len(labels):
            raise DataError(f"{img_p} has {len(images)} images but {lab_p} {len(labels)} labels")
        pools.append(_Pool(images, labels, prefix))
    return pools[0], pools[1], list(FMNIST_CLASSES)


def _digits() -> tuple[_Pool, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * 255.0 / 16.0).clip(0, 255).astype(np.uint8)[..., None]
    return _Pool(images, d.target.astype(np.int64), "dg"), [str(i) for i in range(10)]


def _folder(root: str, image_size: int | None) -> tuple[_Pool, list[str], tuple[int, ...]]:
    """ImageFolder tree -> pool of files (or decoded, resized pixels when ``image_size``), class names,
    image shape (``image_size`` or the most common decoded shape)."""
    if not os.path.isdir(root):
        raise DataError(f"folder root {root} is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"folder root {root} holds no class directories (expected ROOT/<class>/<image>)")
    files: list[str] = []
    labels: list[int] = []
    for ci, cname in enumerate(classes):
        found = sorted(e.path for e in os.scandir(os.path.join(root, cname))
                       if e.is_file() and e.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and "." in e.name)
        if not found:
            raise DataError(f"class folder {os.path.join(root, cname)} holds no image ({'/'.join(IMAGE_EXTS)})")
        files += found
        labels += [ci] * len(found)
    shapes: Counter[tuple[int, ...]] = Counter()
    decoded = []
    for p in files:
        with open(p, "rb") as f:
            arr, reason, _ = decode_image(f.read(), None)
        if arr is None:
            raise DataError(f"unreadable image {p}: {reason}; fix or remove it")
        shapes[tuple(int(s) for s in arr.shape)] += 1
        if image_size is not None:
            decoded.append(arr)
    h, w, c = shapes.most_common(1)[0][0]
    meta = [{"path": os.path.relpath(p, root)} for p in files]
    y = np.asarray(labels, np.int64)
    if image_size is None:
        other = len(files) - shapes[(h, w, c)]
        if other:
            log.warning("folder %s: %d of %d images differ from the most common shape %dx%dx%d; runs will "
                        "convert their mode or quarantine other sizes (use image_size to resize)",
                        root, other, len(files), h, w, c)
        return _Pool(files, y, "im", meta), classes, (h, w, c)
    spec = ImageSpec(image_size, image_size, c, on_size="resize")
    images = np.stack([_conform(a, spec) for a in decoded])
    return _Pool(images, y, "im", meta), classes, spec.shape


def _conform(arr: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Resize/convert decoded native pixels to ``spec`` (through PNG bytes: one code path, shards')."""
    from ctray.data.shards import encode_image

    if arr.shape == spec.shape:
        return arr
    out, reason, _ = decode_image(encode_image(arr), spec)
    if out is None:
        raise DataError(f"cannot resize image: {reason}")
    return out


def _torchvision(source: str, root: str | None, download: bool, image_size: int | None,
                 ) -> tuple[_Pool, _Pool, list[str]]:
    if not download:
        raise DataError(f"source {source!r} needs --download (network access): torchvision fetches it into "
                        f"--root; it is never downloaded implicitly")
    try:
        import torchvision  # noqa: F401
        from torchvision import datasets
    except ImportError as e:
        raise DataError(f"source {source!r} needs torchvision: pip install 'ctray[vision]' -c "
                        f"constraints-gpu.txt ({e})") from e
    root = root or os.path.expanduser("~/.cache/ctray/torchvision")
    if source == "cifar10":
        pools = []
        for train, prefix in ((True, "tr"), (False, "te")):
            ds = datasets.CIFAR10(root, train=train, download=True)
            pools.append(_Pool(np.asarray(ds.data, np.uint8), np.asarray(ds.targets, np.int64), prefix))
        return pools[0], pools[1], list(ds.classes)
    size = image_size or 32
    spec = ImageSpec(size, size, 3, on_size="resize")
    pools = []
    for split, prefix in (("train", "tr"), ("test", "te")):
        ds = datasets.GTSRB(root, split=split, download=True)
        imgs, labs = [], []
        for path, label in ds._samples:
            with open(path, "rb") as f:
                arr, reason, _ = decode_image(f.read(), spec)
            if arr is None:
                raise DataError(f"GTSRB image {path}: {reason}")
            imgs.append(arr)
            labs.append(label)
        pools.append(_Pool(np.stack(imgs), np.asarray(labs, np.int64), prefix))
    return pools[0], pools[1], [str(i) for i in range(43)]
