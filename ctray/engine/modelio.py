"""What the model-level defenses and the activation passes share: a model checkpoint's inputs, the shards
it is fitted or scored on (read through Ray Data, usable rows only), a held-out split by sample-id hash, and
small per-sample results collected on the driver.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from ctray import io as cio
from ctray.config import TRAIN_AUGMENTS, Config
from ctray.errors import ConfigError, DataError

log = logging.getLogger(__name__)





def abs_path(path: str) -> str:
    """Local paths made absolute: Ray Train workers and Ray Data actors may run in another directory."""
    return path if cio.is_remote(path) else os.path.abspath(path)


def model_inputs(model_path: str) -> tuple[Any, int, dict[str, Any]]:
    """``(ImageSpec to read shards at, num_classes, checkpoint spec dict)`` of a ctray checkpoint."""
    from ctray.data.shards import ImageSpec
    from ctray.models.checkpoint import read_checkpoint

    ck = read_checkpoint(model_path)
    if ck["spec"] is None:
        raise DataError(f"{model_path} is a bare state dict; the defenses need a ctray checkpoint (ctray train)")
    ms = ck["spec"]
    size, ch = int(ms["image_size"]), int(ms["in_channels"])
    return ImageSpec(size, size, ch, on_size="resize"), int(ms["num_classes"]), ms


def ok_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(batch["ok"]).select(["shard", "key", "sid", "image", "label"])


def sample_rows(batch: pa.Table, frac: float, salt: int) -> pa.Table:
    """The rows of ``batch`` whose sample id falls in a seeded ``frac`` share (order-independent)."""
    from ctray.core.actstats import hash_split

    return batch.filter(pa.array(hash_split(batch["sid"].to_numpy(), frac, salt)))


def read_for_model(shards: Sequence[str], model_path: str, cfg: Config, what: str) -> tuple[Any, list[str]]:
    """Ray Dataset of the usable rows (``shard, key, sid, image, label``) of ``shards``, read at the
    model's input spec (other sizes resized and counted)."""
    from ctray.data.reader import read_shards
    from ctray.data.shards import expand_shards

    if not shards:
        raise ConfigError(f"no {what} shards given")
    paths = expand_shards(list(shards))
    spec, C, _ = model_inputs(model_path)
    ds = read_shards(paths, spec, C, num_cpus=cfg.data.read_cpus, strict=cfg.data.strict)
    return ds.map_batches(ok_rows, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                          num_cpus=cfg.data.read_cpus), paths


def to_driver(ds: Any, what: str) -> dict[str, np.ndarray]:
    """A small (trusted) dataset's usable rows in driver memory: ``images uint8 (N, H, W, C)``, ``labels``,
    ``sids``, ``shard``, ``key``, sorted by sid (block order varies between runs; sid order does not)."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("image", "label", "sid", "shard", "key")}
    for b in ds.iter_batches(batch_size=4096, batch_format="numpy"):
        for k in parts:
            parts[k].append(np.asarray(b[k]))
    if not parts["sid"]:
        raise DataError(f"no usable sample in the {what} shards")
    out = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(out["sid"], kind="stable")
    return {"images": np.ascontiguousarray(out["image"][order]), "labels": out["label"][order].astype(np.int64),
            "sids": out["sid"][order].astype(np.int64), "shard": out["shard"][order].astype(str),
            "key": out["key"][order].astype(str)}


def predict_labels(model_path: str, images: np.ndarray, batch: int = 1024) -> np.ndarray:
    """The model's predicted classes ``int64 (N,)`` of driver-held ``uint8 (N, H, W, C)`` images (eval mode)."""
    import torch

    from ctray.models.checkpoint import load_model
    from ctray.training.steps import to_input

    model, spec, _ = load_model(model_path)
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = to_input(torch.from_numpy(np.array(images[i:i + batch], copy=True)), spec.mean, spec.std)
            out.append(model(x).argmax(1).numpy())
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def resolve_augment(mode: str, model_path: str) -> str:
    """The augmentation a defense's fit uses on ``model_path``: ``mode`` itself unless it is ``"auto"``, which
    takes the training augmentation the checkpoint records (``extra["augment"]``: ``ctray train`` writes
    ``base.augment``, repair / cleanse pass theirs on), or ``"crop-flip"`` (the reference's transform) with a
    warning when it records none. One of ``crop-flip``, ``crop``, ``none``."""
    if mode != "auto":
        return mode
    from ctray.models.checkpoint import read_checkpoint

    rec = read_checkpoint(model_path)["extra"].get("augment")
    if rec in TRAIN_AUGMENTS:
        log.info("augment=auto: %s was trained with augment=%s; the defense uses the same", model_path, rec)
        return str(rec)
    what = ("records no training augmentation (not made by ctray train)" if rec is None else
            f"records an unknown training augmentation {rec!r}")
    log.warning("augment=auto: %s %s; using crop-flip. Set repair.augment / cleanse.augment to the model's own "
                "(none if it was trained without)", model_path, what)
    return "crop-flip"


def sha256_files(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.rsplit("/", 1)[-1].encode())
        h.update(hashlib.sha256(cio.read_bytes(p)).digest())
    return h.hexdigest()
