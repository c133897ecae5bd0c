"""The ground every driver stands on: its inputs (shard specs resolved, the image spec settled, sample
counts estimated, a preset chosen from the data), the object-store cache budget, ground truth joined by
sample id, and the run directory's array files.

Drivers (``detect``, ``train``, ``bench``, ``sweep``, the baselines and defenses) import from here and
from :mod:`ctray.engine.cluster`, never from one another's private helpers, so ``ctray.engine`` has no
import circle (tests/test_layers.py).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ctray import io as cio
from ctray.config import Config
from ctray.errors import ConfigError

log = logging.getLogger(__name__)




def resolve_inputs(cfg: Config) -> tuple[list[str], list[str], Any, int | None]:
    """Expand the shard specs and settle the image spec (config > manifest > data)."""
    from ctray.data.shards import ImageSpec, expand_shards, probe_spec

    if not cfg.io.train:
        raise ConfigError("no train shards: give --train (io.train)")
    if not cfg.io.clean:
        raise ConfigError("no clean reserve: give --clean (io.clean); CT needs a small trusted set (specs/ct.md §1.2)")
    train = expand_shards(cfg.io.train)
    clean = expand_shards(cfg.io.clean)
    probed, n_cls = probe_spec(train)
    h = cfg.data.image_size or probed.height
    w = cfg.data.image_size or probed.width
    c = cfg.data.channels or probed.channels
    spec = ImageSpec(h, w, c, on_mode=cfg.data.on_mode, on_size=cfg.data.on_size,  # type: ignore[arg-type]
                     max_pixels=cfg.data.max_pixels, max_member_bytes=cfg.data.max_member_bytes)
    return train, clean, spec, (cfg.data.num_classes or n_cls)


def estimate_samples(paths: list[str]) -> int:
    """The number of samples in ``paths``: the manifest's train count when ``ctray data`` wrote one beside
    them, else the first shard's samples times the shard count (one shard read on the driver)."""
    from ctray.data.shards import iter_shard, read_manifest

    man = read_manifest(paths) or {}
    n = int(man.get("counts", {}).get("train", 0))
    listed = (man.get("shards") or {}).get("train") if isinstance(man.get("shards"), dict) else None
    if n and listed:  # a subset of the manifest's shards: its share of the count
        return max(1, round(n * len(paths) / len(listed)))
    if n:
        return n
    return sum(1 for _ in iter_shard(paths[0], paths[0], None, None)) * len(paths)


def cache_budget(cfg: Config) -> int:
    """Bytes of decoded samples the run may cache in the object store (``data.cache_bytes``; ``auto`` =
    40% of the connected cluster's object store)."""
    import ray

    from ctray.core.budget import parse_bytes

    val = parse_bytes(cfg.data.cache_bytes)
    if val is not None:
        return val
    return int(0.4 * float(ray.cluster_resources().get("object_store_memory", 0.0)))


def choose_preset(train_spec: list[str], use_gpu: bool = False) -> tuple[str, str]:
    """Pick a preset from the data (image size, classes, sample count; the manifest when present,
    else an estimate from the first shard)."""
    from ctray.config import auto_preset
    from ctray.data.shards import expand_shards, probe_spec, read_manifest

    paths = expand_shards(train_spec)
    spec, n_cls = probe_spec(paths)
    man = read_manifest(paths) or {}
    n = estimate_samples(paths)
    return auto_preset(max(spec.height, spec.width), int(n_cls or man.get("num_classes") or 10), n, use_gpu)


def load_truth(path: str, shards: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth aligned to ``(shards, keys)``: ``(poison bool (N,), cover bool (N,))``.

    Accepts parquet or csv with columns ``shard, key, poison`` (+ optional ``cover``). Samples the truth
    does not list count as clean; truth rows matching no sample are reported. The join is by sample id
    (:func:`ctray.engine.identity.truth_by_sid`, which the detection driver uses directly).
    """
    from ctray.data.shards import sample_ids
    from ctray.engine.identity import truth_by_sid

    sids = sample_ids([str(x) for x in np.asarray(shards).tolist()], [str(x) for x in np.asarray(keys).tolist()])
    order = np.argsort(sids, kind="stable")
    p_sorted, c_sorted = truth_by_sid(path, sids[order])
    poison, cover = np.zeros(len(sids), bool), np.zeros(len(sids), bool)
    poison[order], cover[order] = p_sorted, c_sorted
    return poison, cover



def load_npz(path: str) -> dict[str, np.ndarray]:
    """All arrays of an .npz at a local path or URI (read into memory: no temporary file)."""
    import io

    with np.load(io.BytesIO(cio.read_bytes(path))) as z:
        return {k: z[k] for k in z.files}


def load_npy(path: str) -> np.ndarray:
    """One array from an .npy at a local path or URI."""
    import io

    return np.load(io.BytesIO(cio.read_bytes(path)))


def save_npz(path: str, **arrays: np.ndarray) -> None:
    """Arrays to an .npz at a local path or URI (written in one piece)."""
    import io

    buf = io.BytesIO()
    np.savez(buf, allow_pickle=True, **arrays)  # its default, named so mypy does not bind **arrays to it
    cio.write_bytes(path, buf.getvalue())


def save_npy(path: str, arr: np.ndarray) -> None:
    """One array to an .npy at a local path or URI (written in one piece)."""
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    cio.write_bytes(path, buf.getvalue())


