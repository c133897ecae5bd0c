"""Activation statistics of a model (BadActs transfer): per-channel clean intervals from mergeable
statistics, a per-sample out-of-interval score (``ctray act-score``, the ``act`` row of ``ctray bench``,
``act.in_detect``), and a clamping purifier (``ctray purify``). The math is in :mod:`ctray.core.actstats`.

Three Ray Data ``map_batches`` passes with a model-holding actor: per-batch mergeable statistics on clean
half A (reduced on the driver), per-sample scores of clean half B (threshold) and of the scored shards
(streamed; only shard, key, score reach the driver).
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ctray.config import Config
from ctray.engine.modelio import abs_path, model_inputs, read_for_model, to_driver
from ctray.engine.score import collect_scores, map_model, merge_blobs
from ctray.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "ActScores",
    "PurifyResult",
    "activation_scores",
    "evaluate_purified",
    "fit_act_intervals",
    "load_purified",
    "purify_model",
]



# ------------------------------------------------------------------------------ activation scores


class _ActMapper:
    """``map_batches`` callable holding the model: per batch, either mergeable statistics of the rows in
    clean half A (``op="moments"`` / ``"hist"``, one pickled row per batch) or per-sample scores
    (``op="score"``: ``shard, key, sid, score``)."""

    def __init__(self, model_path: str, pool: str, threads: int, op: str, payload: dict[str, Any]):
        import torch

        from ctray.models.checkpoint import load_model

        torch.set_num_threads(max(1, threads))
        self.model, self.spec, _ = load_model(model_path)
        self.pool, self.op, self.p = pool, op, payload

    def _features(self, images: np.ndarray) -> np.ndarray:
        import torch

        from ctray.defenses.actstats import activation_features
        from ctray.training.steps import to_input

        x = to_input(torch.from_numpy(np.array(images, copy=True)), self.spec.mean, self.spec.std)
        return activation_features(self.model, x, self.pool)[0].numpy().astype(np.float64)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ctray.core.actstats import ActHistogram, ActMoments, hash_split, out_of_interval_score

        if self.op == "score":
            feats = self._features(batch["image"])
            s = out_of_interval_score(feats, self.p["lo"], self.p["hi"], self.p["active"])
            return {"shard": batch["shard"], "key": batch["key"], "sid": batch["sid"], "label": batch["label"], "score": s}
        a = hash_split(batch["sid"], 0.5, self.p["split_seed"])
        f = self._features(batch["image"][a]) if a.any() else None
        if self.op == "moments":
            m = ActMoments.zeros(self.p["width"]) if f is None else ActMoments.of(f)
            return {"blob": np.array([pickle.dumps(m)], dtype=object)}
        h = ActHistogram.empty(self.p["lo"], self.p["hi"], self.p["bins"])
        if f is not None:
            h.update(f)
        return {"blob": np.array([pickle.dumps(h)], dtype=object)}


@dataclass
class ActScores:
    """Per-sample activation-statistics scores (BadActs transfer, seed-defenses.md §2.5).

    ``score`` float64 (N,) in [0, 1]: share of the model's pooled block-output channels outside their clean
    interval; **higher = more suspicious**. Flag rule: ``flagged = score > threshold``, where
    ``threshold`` is the ``1 - act.frr`` quantile of the scores of clean half B (the trusted samples whose
    sample-id hash falls in B; the intervals are fitted on half A only), so about ``act.frr`` of clean
    data is flagged. Rows: the usable samples of the scored shards, sorted by ``(shard, key)``; ``label`` is
    each sample's given label (int64), so the rows drop into ``ctray bench``'s per-method score files.
    """

    shard: np.ndarray
    key: np.ndarray
    label: np.ndarray
    score: np.ndarray
    flagged: np.ndarray
    threshold: float
    n_fit: int
    n_calib: int
    n_active: int
    n_neurons: int
    seconds: float

    def to_table(self) -> pa.Table:
        """``shard, key, label, score, flagged`` as a pyarrow Table."""
        return pa.table({"shard": self.shard, "key": self.key, "label": self.label, "score": self.score,
                         "flagged": self.flagged})


def _act_pass(ds: Any, model_path: str, cfg: Config, op: str, payload: dict[str, Any]) -> Any:

    return map_model(ds, _ActMapper, {"model_path": model_path, "pool": cfg.act.pool,
                                      "threads": max(1, int(cfg.data.score_cpus)), "op": op, "payload": payload},
                     cfg.data)


def fit_act_intervals(model_path: str, clean_shards: Sequence[str], cfg: Config) -> dict[str, Any]:
    """Fit the clean intervals on half A of the trusted shards and the flag threshold on half B.

    Returns:
        ``{"lo", "hi", "active" (F,) arrays, "threshold", "n_fit", "n_calib", "n_neurons", "n_active"}``.
    """
    from ctray.core.actstats import (
        constant_neurons,
        frr_threshold,
        hash_split,
        intervals_gauss,
        intervals_quantile,
    )

    a = cfg.act
    clean, _ = read_for_model(clean_shards, model_path, cfg, "trusted clean")
    clean = clean.materialize()
    width = _feature_width(model_path, cfg)
    mom = merge_blobs(_act_pass(clean, model_path, cfg, "moments", {"width": width, "split_seed": a.split_seed}))
    if mom is None or mom.n < 2:
        raise DataError(f"activation statistics need >= 2 trusted samples in half A, got {0 if mom is None else mom.n}")
    if a.mode == "gauss":
        lo, hi = intervals_gauss(mom, a.delta, a.sigma_floor)
    else:
        hist = merge_blobs(_act_pass(clean, model_path, cfg, "hist", {"lo": mom.lo, "hi": mom.hi, "bins": a.bins,
                                                                       "split_seed": a.split_seed}))
        lo, hi = intervals_quantile(hist, a.alpha)
    active = ~constant_neurons(mom, a.sigma_floor) if a.drop_constant else np.ones(width, bool)
    sc = collect_scores(_act_pass(clean, model_path, cfg, "score", {"lo": lo, "hi": hi, "active": active}), ("sid", "score"))
    b = ~hash_split(sc["sid"].astype(np.int64), 0.5, a.split_seed)
    if not b.any():
        raise DataError("no trusted sample falls in calibration half B: give more trusted samples")
    thr = frr_threshold(sc["score"][b], a.frr)
    return {"lo": lo, "hi": hi, "active": active, "threshold": thr, "n_fit": int(mom.n), "n_calib": int(b.sum()),
            "n_neurons": int(width), "n_active": int(active.sum())}


def _feature_width(model_path: str, cfg: Config) -> int:
    import torch

    from ctray.defenses.actstats import activation_features
    from ctray.models.checkpoint import load_model

    model, spec, _ = load_model(model_path)
    x = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size)
    return int(activation_features(model, x, cfg.act.pool)[0].shape[1])


def activation_scores(model_path: str, shards: Sequence[str], clean_shards: Sequence[str], cfg: Config) -> ActScores:
    """Score every usable sample of ``shards`` by its share of out-of-interval activations (a detector).

    Args:
        model_path: ctray checkpoint of the model trained on the suspect data (e.g. ``ctray train`` on
            it, or a detect run's ``checkpoints/round_0/fbase.pt``).
        shards: shard specs to score (the suspect training set).
        clean_shards: trusted clean shard specs: half A (by sample-id hash, ``act.split_seed``) fits the
            per-neuron intervals (``act.mode``), half B sets the threshold at ``act.frr``.
        cfg: config (``act.*``, ``data.*``).

    Returns:
        :class:`ActScores` (flag rule: ``score > threshold``; see there).
    """
    from ctray.engine.cluster import ensure_ray

    cfg.validate()
    ensure_ray(cfg)
    t0 = time.monotonic()
    model_path = abs_path(model_path)
    fit = fit_act_intervals(model_path, clean_shards, cfg)
    ds, paths = read_for_model(shards, model_path, cfg, "scored")
    sc = collect_scores(_act_pass(ds, model_path, cfg, "score", {k: fit[k] for k in ("lo", "hi", "active")}),
                  ("shard", "key", "label", "score"))
    order = np.lexsort((sc["key"].astype(str), sc["shard"].astype(str)))
    score = sc["score"][order].astype(np.float64)
    res = ActScores(shard=sc["shard"][order].astype(str), key=sc["key"][order].astype(str),
                    label=sc["label"][order].astype(np.int64), score=score,
                    flagged=score > fit["threshold"], threshold=float(fit["threshold"]), n_fit=fit["n_fit"],
                    n_calib=fit["n_calib"], n_active=fit["n_active"], n_neurons=fit["n_neurons"],
                    seconds=time.monotonic() - t0)
    log.info("activation scores: %d samples of %d shards, threshold %.4f (FRR %.3f on %d clean), flagged %d (%.1fs)",
             len(score), len(paths), res.threshold, cfg.act.frr, res.n_calib, int(res.flagged.sum()), res.seconds)
    return res


# ------------------------------------------------------------------------------------------ purify


@dataclass
class PurifyResult:
    """A purified checkpoint: the suspect model's weights plus learned per-channel clamp bounds in
    ``extra["clamp"]`` (load it with :func:`load_purified`). ``info``: ``acc_plain`` / ``acc_clamped`` on the
    trusted set, final ``c``, ``restarts``."""

    ckpt: str
    info: dict[str, Any]
    seconds: float


def purify_model(cfg: Config, model_path: str, clean: Sequence[str], out: str) -> PurifyResult:
    """Learn the BadActs activation-clamping purifier on trusted clean data (weights frozen; ``cfg.act.purify_*``).

    Runs on the driver: a few thousand bound parameters trained on the small trusted set (seed-defenses.md
    §2.6: one device is enough). The trusted set's rows come through Ray Data.
    """
    import torch

    from ctray.defenses.actstats import activation_modules, learn_intervals
    from ctray.engine.cluster import ensure_ray
    from ctray.models.checkpoint import load_model, save_model
    from ctray.training.steps import to_input

    cfg.validate()
    ensure_ray(cfg)
    t0 = time.monotonic()
    ds, _ = read_for_model(clean, model_path, cfg, "trusted clean")
    data = to_driver(ds, "trusted clean")
    model, spec, extra = load_model(model_path)
    x = to_input(torch.from_numpy(data["images"]), spec.mean, spec.std)
    y = torch.from_numpy(data["labels"])
    a = cfg.act
    cm, info = learn_intervals(model, x, y, epochs=a.purify_epochs, lr=a.purify_lr, batch_size=a.purify_batch_size,
                               c0=a.purify_c, a=a.purify_a, keep=a.purify_keep, min_share=a.purify_min,
                               init=a.purify_init, seed=cfg.seed)
    clamp = {"modules": [n for n, _ in activation_modules(model)], "bounds": cm.bounds(), "info": info}
    save_model(out, model, spec, {**extra, "clamp": clamp, "purified_from": model_path})
    return PurifyResult(ckpt=out, info=info, seconds=time.monotonic() - t0)


def load_purified(path: str) -> Any:
    """The :class:`ctray.defenses.actstats.ClampedModel` of a :func:`purify_model` checkpoint (eval mode).

    Raises:
        DataError: the checkpoint holds no clamp bounds.
    """
    import torch

    from ctray.defenses.actstats import ClampedModel, activation_modules
    from ctray.models.checkpoint import load_model

    model, _, extra = load_model(path)
    clamp = extra.get("clamp")
    if not clamp:
        raise DataError(f"{path} holds no clamp bounds (write one with ctray purify)")
    names = [n for n, _ in activation_modules(model)]
    if names != clamp["modules"]:
        raise DataError(f"{path}: clamp bounds for modules {clamp['modules']} do not match the model's {names}")
    b = clamp["bounds"]
    u0 = [torch.tensor(x["hi"]) for x in b]
    m0 = [torch.log((torch.tensor(x["hi"]) - torch.tensor(x["lo"])).clamp_min(1e-12)) for x in b]
    cm = ClampedModel(model, [len(x["hi"]) for x in b], u0, m0)
    cm.eval()
    return cm


class _ClampPredictor:
    """``map_batches`` callable: ``{image, label, meta}`` -> plain and purified predictions + attack target."""

    def __init__(self, model_path: str, threads: int = 1):
        import torch

        torch.set_num_threads(max(1, threads))
        self.cm = load_purified(model_path)
        self.spec = model_inputs(model_path)[2]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from ctray.engine.train import meta_target
        from ctray.training.steps import to_input

        x = to_input(torch.from_numpy(np.array(batch["image"], copy=True)), self.spec["mean"], self.spec["std"])
        with torch.no_grad():
            self.cm.enabled = False
            plain = self.cm(x).argmax(1).numpy()
            self.cm.enabled = True
            clamped = self.cm(x).argmax(1).numpy()
        return {"label": batch["label"].astype(np.int64), "plain": plain, "clamped": clamped,
                "target": np.array([meta_target(m) for m in batch["meta"]], np.int64)}


def _ok_meta(batch: pa.Table) -> pa.Table:
    return batch.filter(batch["ok"]).select(["image", "label", "meta"])


def evaluate_purified(model_path: str, test: Sequence[str] | None, triggered: Sequence[str] | None,
                      data_cfg: Any) -> dict[str, dict[str, float | None]]:
    """Clean accuracy and ASR of a :func:`purify_model` checkpoint without and with its clamp, as
    ``ctray evaluate`` defines them (ASR over triggered samples whose label is not their ``.json`` target).

    Returns:
        ``{"plain": {"acc", "asr"}, "purified": {"acc", "asr"}}`` (None where no shards were given).
    """
    from ctray.data.reader import read_shards
    from ctray.data.shards import expand_shards

    model_path = abs_path(model_path)
    spec, C, _ = model_inputs(model_path)
    out: dict[str, dict[str, float | None]] = {"plain": {"acc": None, "asr": None},
                                               "purified": {"acc": None, "asr": None}}
    for name, shards in (("acc", test), ("asr", triggered)):
        if not shards:
            continue
        ds = read_shards(expand_shards(list(shards)), spec, C, num_cpus=data_cfg.read_cpus)
        ds = ds.map_batches(_ok_meta, batch_format="pyarrow", batch_size=None, num_cpus=data_cfg.read_cpus)
        r = collect_scores(map_model(ds, _ClampPredictor, {"model_path": model_path}, data_cfg, size=1),
                     ("label", "plain", "clamped", "target"))
        use = np.ones(len(r["label"]), bool) if name == "acc" else (r["target"] >= 0) & (r["label"] != r["target"])
        ref = r["label"] if name == "acc" else r["target"]
        for k, col in (("plain", "plain"), ("purified", "clamped")):
            out[k][name] = float((r[col][use] == ref[use]).mean()) if use.any() else None
    return out
