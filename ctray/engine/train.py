"""Plain training and evaluation: ``ctray train`` and ``ctray evaluate``.

``train_model`` runs f_base's recipe (``cfg.base``: architecture, epochs, lr schedule, augmentation)
through THE per-worker loop (``ctray.training.loop``, ``mode="train"``) on Ray Train, on all usable
samples of ``cfg.io.train`` or on a kept subset (retraining on a cleansed set). ``evaluate`` streams
test shards through Ray Data and reports clean accuracy and attack success rate.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctray import io as cio
from ctray.config import Config
from ctray.data.attacks import ANY_WRONG
from ctray.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """``ckpt``: the checkpoint written; ``n_train``: samples trained on; ``n_excluded``: usable samples
    left out by ``exclude``; ``seconds``: wall time of the fit."""

    ckpt: str
    n_train: int
    n_excluded: int
    seconds: float


@dataclass
class EvalResult:
    """Clean accuracy and attack success rate of a model.

    ``acc``: fraction of usable test samples predicted as their label, in [0, 1] (None without test
    shards). ``asr``: fraction of usable triggered samples predicted as their attack target (the
    ``target`` of the sample's ``.json``, else the ``target`` argument; samples whose label already
    is the target are left out), in [0, 1] (None without triggered shards). Counts are of usable samples;
    quarantined ones are counted apart.
    """

    acc: float | None
    asr: float | None
    n_test: int
    n_triggered: int
    n_quarantined: int

    def to_dict(self) -> dict[str, Any]:
        return {"acc": self.acc, "asr": self.asr, "n_test": self.n_test, "n_triggered": self.n_triggered,
                "n_quarantined": self.n_quarantined}


def _keys_to_sids(keys: Sequence[tuple[str, str]]) -> np.ndarray:
    from ctray.data.shards import sample_ids

    if not keys:
        return np.empty(0, np.int64)
    shards, ks = zip(*keys, strict=True)
    return sample_ids(list(shards), list(ks))


def train_model(cfg: Config, out: str, exclude: Sequence[tuple[str, str]] | None = None,
                extra: dict[str, Any] | None = None) -> TrainResult:
    """Train a plain model with ``cfg.base``'s recipe on the usable samples of ``cfg.io.train``.

    Args:
        cfg: the run config (``io.train``, ``base.*``, ``data.*``, ``scale.*``, ``seed`` are used).
        out: checkpoint file to write (local path or URI), a :mod:`ctray.models.checkpoint` file.
        exclude: ``(shard, key)`` pairs to leave out (e.g. the samples a detector flagged); shard ids
            as in ``scores.parquet`` (relative to the inputs' common directory).
        extra: provenance stored in the checkpoint next to the training set size.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError / DataError: no train shards, nothing usable, or every sample excluded.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from ctray.core.budget import fits
    from ctray.data.reader import read_shards, usable
    from ctray.engine.cluster import ensure_ray, scaling, train_data_config
    from ctray.engine.ground import cache_budget, estimate_samples, resolve_inputs
    from ctray.engine.score import collect_scores
    from ctray.training.loop import train_loop_per_worker

    cfg.validate()
    if not out:
        raise ConfigError("no checkpoint path: give --out")
    ensure_ray(cfg)
    if not cfg.io.clean:  # resolve_inputs insists on a reserve (detect's need); training has none
        cfg.io.clean = list(cfg.io.train)
    train_paths, _, spec, n_cls = resolve_inputs(cfg)
    ds = read_shards(train_paths, spec, n_cls, num_cpus=cfg.data.read_cpus, strict=cfg.data.strict)
    if fits(2 * estimate_samples(train_paths), spec.shape, cache_budget(cfg)):  # data.cache_bytes, as detect
        ds = ds.materialize()
    ident = collect_scores(ds, ("sid", "label", "ok"))
    ok = ident["ok"].astype(bool)
    if not ok.any():
        raise DataError(f"no usable train sample in {len(train_paths)} shards")
    sids = ident["sid"][ok].astype(np.int64)
    labels = ident["label"][ok].astype(np.int64)
    C = int(n_cls or labels.max() + 1)
    keep: np.ndarray | None = None
    n_ex = 0
    if exclude:
        ex = _keys_to_sids(list(exclude))
        mask = ~np.isin(sids, ex)
        n_ex = int((~mask).sum())
        if n_ex < len(ex):
            log.warning("train: %d of %d excluded keys match no usable sample", len(ex) - n_ex, len(ex))
        keep = sids[mask]
        if len(keep) == 0:
            raise DataError("every usable sample is excluded: nothing to train on")
    cfg_d = cfg.to_dict()
    scaling_cfg, threads = scaling(cfg)
    cfg_d["scale"]["torch_threads"] = threads
    # "augment": the training augmentation, which the defenses' augment=auto read back
    prov = {"trained_by": "ctray train", "train": train_paths, "n_excluded": n_ex, "augment": cfg.base.augment,
            **(extra or {})}
    job = {"cfg": cfg_d, "num_classes": C, "mode": "train", "keep": keep, "model_out": out, "extra": prov,
           "n_total": len(sids), "image_shape": list(spec.shape)}
    base = os.path.dirname(out) if not cio.is_remote(out) else out.rsplit("/", 1)[0]
    storage = cio.join(os.path.abspath(base) if not cio.is_remote(base) else base, ".ray-train")
    t = time.monotonic()
    # The two ignores: ray.train.torch rebinds TorchTrainer to the Train V2 class at import (V2 is on by
    # default), whose loop may return a value (result.return_value); mypy sees only the V1 declaration
    result = TorchTrainer(
        train_loop_per_worker,  # type: ignore[arg-type]
        train_loop_config=job, scaling_config=scaling_cfg, dataset_config=train_data_config(), datasets={"train": usable(ds)},
        run_config=ray.train.RunConfig(name=f"train-{os.path.basename(out)}-{int(time.time() * 1e3)}",
                                       storage_path=storage,
                                       failure_config=ray.train.FailureConfig(max_failures=2))).fit()
    secs = time.monotonic() - t
    if not cio.exists(out):
        raise RuntimeError(f"training finished but wrote no checkpoint to {out}")
    n_train = int((result.return_value or {}).get("n_train", len(sids) - n_ex))  # type: ignore[attr-defined]
    log.info("trained %s on %d samples (%d excluded) in %.1fs -> %s", cfg.base.arch, n_train, n_ex, secs, out)
    return TrainResult(ckpt=out, n_train=n_train, n_excluded=n_ex, seconds=secs)


class _Predictor:
    """``map_batches`` callable: ``{image, label, meta, ok}`` -> ``{label, pred, target, ok}`` with the
    model loaded once per actor. ``target`` comes from each sample's ``.json`` (``-1`` when absent)."""

    def __init__(self, model_path: str, threads: int = 1):
        import torch

        from ctray.models.checkpoint import load_model

        torch.set_num_threads(max(1, threads))
        self.model, self.spec, _ = load_model(model_path)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from ctray.training.steps import to_input

        ok = batch["ok"].astype(bool)
        pred = np.full(len(ok), -1, np.int64)
        if ok.any():
            x = to_input(torch.from_numpy(np.array(batch["image"][ok], copy=True)), self.spec.mean, self.spec.std)
            with torch.no_grad():
                pred[ok] = self.model(x).argmax(1).numpy()
        targets = np.array([meta_target(m) for m in batch["meta"]], np.int64)
        return {"label": batch["label"].astype(np.int64), "pred": pred, "target": targets, "ok": ok,
                "sample": batch["level"] == "sample"}


def meta_target(meta: Any) -> int:
    """The ``target`` class a triggered test sample's ``.json`` metadata names, -1 when it names none."""
    if not meta:
        return -1
    try:
        t = json.loads(meta).get("target")
    except (ValueError, AttributeError):
        return -1
    return int(t) if isinstance(t, int) else -1


def _predict_shards(model_path: str, shards: Sequence[str], cfg_data: Any, spec: Any, num_classes: int
                    ) -> dict[str, np.ndarray]:
    from ctray.data.reader import read_shards
    from ctray.data.shards import expand_shards
    from ctray.engine.score import collect_scores, map_model

    ds = read_shards(expand_shards(list(shards)), spec, num_classes, num_cpus=cfg_data.read_cpus)
    out = map_model(ds, _Predictor, {"model_path": model_path, "threads": max(1, int(cfg_data.score_cpus))},
                    cfg_data)
    return collect_scores(out, ("label", "pred", "target", "ok", "sample"))


def evaluate(model_path: str, test: Sequence[str] | None = None, triggered: Sequence[str] | None = None,
             target: int | None = None, data_cfg: Any = None) -> EvalResult:
    """Clean accuracy on ``test`` shards and attack success rate on ``triggered`` shards.

    Args:
        model_path: a checkpoint file (:mod:`ctray.models.checkpoint`); its spec sets the image size,
            channels and classes the shards are read at (other sizes are resized, counted as converted).
        test: clean test shard specs (``test-*.tar``), or None.
        triggered: triggered test shard specs (``test-triggered-*.tar`` from ``ctray data poison``:
            true labels, per-sample attack target in ``.json``), or None.
        target: the attack target for triggered samples whose ``.json`` names none.
        data_cfg: a :class:`ctray.config.DataConfig` (reading/scoring resources); defaults when None.

    Returns:
        An :class:`EvalResult`.

    Raises:
        ConfigError: neither test nor triggered shards given, or a triggered sample has no target.
        DataError: unreadable checkpoint or shards.
    """
    from ctray.config import DataConfig
    from ctray.data.shards import ImageSpec
    from ctray.engine.cluster import ensure_ray
    from ctray.models.checkpoint import read_checkpoint

    if not test and not triggered:
        raise ConfigError("evaluate needs --test and/or --triggered shards")
    dc = data_cfg or DataConfig()
    ck = read_checkpoint(model_path)
    if ck["spec"] is None:
        raise DataError(f"{model_path} is a bare state dict; evaluate needs a ctray checkpoint (ctray train)")
    ms = ck["spec"]
    spec = ImageSpec(int(ms["image_size"]), int(ms["image_size"]), int(ms["in_channels"]), on_size="resize")
    C = int(ms["num_classes"])
    ensure_ray()
    acc = asr = None
    n_test = n_trig = n_q = 0
    if test:
        r = _predict_shards(model_path, test, dc, spec, C)
        ok = r["ok"].astype(bool)
        n_q += int((~ok & r["sample"].astype(bool)).sum())
        n_test = int(ok.sum())
        acc = float((r["pred"][ok] == r["label"][ok]).mean()) if n_test else None
    if triggered:
        r = _predict_shards(model_path, triggered, dc, spec, C)
        ok = r["ok"].astype(bool)
        n_q += int((~ok & r["sample"].astype(bool)).sum())
        anywrong = r["target"] == ANY_WRONG  # untargeted: success = any class but the true one
        tgt = np.where((r["target"] >= 0) | anywrong, r["target"], -1 if target is None else int(target))
        missing = ok & ((tgt == -1) | (tgt < ANY_WRONG))
        if missing.any():
            raise ConfigError(f"{int(missing.sum())} triggered samples name no target in .json: give --target")
        use = ok & (r["label"] != tgt)
        n_trig = int(use.sum())
        hit = np.where(anywrong, r["pred"] != r["label"], r["pred"] == tgt)
        asr = float(hit[use].mean()) if n_trig else None
    res = EvalResult(acc=acc, asr=asr, n_test=n_test, n_triggered=n_trig, n_quarantined=n_q)
    log.info("evaluate %s: %s", model_path, res.to_dict())
    return res
