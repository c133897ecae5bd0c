"""Scoring ALL of D with a round's model: a Ray Data ``map_batches`` callable class (the model is
loaded once per worker from the round's checkpoint; on CPUs, or on GPUs with ``data.score_gpus``). Only
per-sample scalars leave the pipeline; the final pass also yields within-class 2-D PCA projections (the
per-class moments merge in :mod:`ctray.engine.classpca`), so penultimate features never reach the driver.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import OrderedDict
from typing import Any

import numpy as np

from ctray.core.index import ColumnFiller

log = logging.getLogger(__name__)

# Model-holding callables per worker process, for the task-pool compute of map_model, by pass token: the
# most recent _CACHE_PASSES passes only, so a long-lived worker keeps a bounded number of models, and passes
# that interleave in one process (concurrent sweep trials, STRIP's two passes) do not evict each other.
_PROCESS_CACHE: OrderedDict[str, Any] = OrderedDict()
_CACHE_PASSES = 4


def _cached_call(batch: dict[str, np.ndarray], cls: type, kwargs: dict[str, Any], token: str) -> Any:
    """Task-side adapter: build ``cls(**kwargs)`` once per worker process and pass (``token``), then call it.

    Ray Data runs a callable class only as an actor pool, and a new pool per pass costs its actors'
    start-up (process, imports, model load) each time; tasks reuse the worker processes Ray keeps warm,
    so a pass after the first costs one model load per process. ``token`` is unique per pass, so a
    checkpoint re-written at the same path is never served from the cache."""
    inst = _PROCESS_CACHE.get(token)
    if inst is None:
        inst = _PROCESS_CACHE[token] = cls(**kwargs)
        while len(_PROCESS_CACHE) > _CACHE_PASSES:
            _PROCESS_CACHE.popitem(last=False)
    else:
        _PROCESS_CACHE.move_to_end(token)
    return inst(batch)


def map_model(ds: Any, cls: type, kwargs: dict[str, Any], data_cfg: Any, size: int | None = None) -> Any:
    """``ds.map_batches`` with a model-holding callable class ``cls(**kwargs)`` (numpy batches of
    ``data_cfg.score_batch_size`` rows), on ``size`` (default ``data_cfg.score_actors``) concurrent
    workers of ``data_cfg.score_cpus`` CPUs each: a task pool with a per-process cache of the instance
    (``data.score_compute=tasks``, the default) or a fresh actor pool (``actors``). Same outputs either way."""
    import ray.data

    n = int(size or data_cfg.score_actors)
    common: dict[str, Any] = dict(batch_size=data_cfg.score_batch_size, batch_format="numpy",
                                  num_cpus=data_cfg.score_cpus)
    gpus = float(getattr(data_cfg, "score_gpus", 0.0) or 0.0)
    if gpus and getattr(cls, "uses_gpu", False):  # only callables that run their model on the device ask
        check_gpu_scoring(gpus)
        common["num_gpus"] = gpus
    if data_cfg.score_compute == "actors":
        return ds.map_batches(cls, fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=n), **common)
    return ds.map_batches(_cached_call, fn_kwargs={"cls": cls, "kwargs": kwargs, "token": uuid.uuid4().hex},
                          compute=ray.data.TaskPoolStrategy(size=n), **common)


def check_gpu_scoring(gpus: float) -> None:
    """Fail before a pass that could never be scheduled: ``data.score_gpus`` > 0 on a cluster where no
    alive node and no autoscaler node type has a GPU (Ray would wait for one forever).

    Raises:
        ConfigError: no node shape has ``gpus`` GPUs.
    """
    from ctray.core.placement import describe
    from ctray.engine.cluster import node_shapes
    from ctray.errors import ConfigError

    shapes = node_shapes()
    if not any(s.resources is None or float(s.resources.get("GPU", 0)) >= gpus for s in shapes):
        raise ConfigError(f"data.score_gpus={gpus} but no node of this cluster has that many GPUs "
                          f"({describe(shapes)}); set data.score_gpus=0 to score on CPUs")


class Scorer:
    """``map_batches`` callable: ``{sid, image uint8 (B,H,W,C), label}`` -> ``{sid, label, loss, pred, prob}``
    (+ ``features (B, D)`` when ``with_features``; + the ``passthrough`` columns unchanged, e.g. ``shard``).

    ``loss`` is CE w.r.t. the given label (>= 0; low = still fit); ``prob`` is the softmax probability
    of the given label in [0, 1] (high = suspicious after confusion training). All float32 whatever the
    ``precision`` the model ran in.

    ``device="cuda"`` (``data.score_gpus`` > 0): the model runs on the GPU Ray gave the task, channels-last,
    under autocast (``precision``, see :func:`~ctray.training.steps.autocast_dtype`); each batch's uint8
    pixels go to the device from pinned memory (4x fewer bytes than floats) and are normalised there.
    """

    uses_gpu = True  # map_model asks Ray for data.score_gpus GPUs per worker

    def __init__(self, ckpt: str, filename: str, arch: str, in_channels: int, num_classes: int, image_size: int,
                 mean: float, std: float, with_features: bool = False, threads: int = 1,
                 passthrough: tuple[str, ...] = (), device: str = "cpu", precision: str = "auto"):
        import torch

        from ctray.models import build_model
        from ctray.training.steps import autocast_dtype

        torch.set_num_threads(max(1, threads))
        from ctray.training.loop import load_weights

        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("data.score_gpus > 0 but this scoring worker sees no CUDA device (CUDA_VISIBLE_DEVICES="
                               f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); is torch built with CUDA on that node?")
        self.device = torch.device(device)
        state = load_weights(ckpt, filename)
        self.model = build_model(arch, in_channels, num_classes, image_size)
        self.model.load_state_dict(state)
        self.model.eval().to(self.device)
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # documented, not in the stubs
        bf16 = self.device.type != "cuda" or torch.cuda.is_bf16_supported()
        self.dtype = autocast_dtype(precision, self.device.type, bf16)
        self.mean, self.std, self.with_features = mean, std, with_features
        self.passthrough = tuple(passthrough)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from ctray.training.steps import score_batch, to_input

        img = torch.from_numpy(np.array(batch["image"], copy=True))  # batches are read-only
        y = torch.from_numpy(batch["label"].astype(np.int64))
        if self.device.type == "cuda":
            img = img.pin_memory().to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
        x = to_input(img, self.mean, self.std)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = {k: v.cpu() for k, v in score_batch(self.model, x, y, with_features=self.with_features).items()}
        res = {"sid": batch["sid"], "label": batch["label"], "loss": out["loss"].numpy().astype(np.float32),
               "pred": out["pred"].numpy().astype(np.int64), "prob": out["prob"].numpy().astype(np.float32)}
        if self.with_features:
            res["features"] = out["features"].numpy().astype(np.float32)
        for c in self.passthrough:
            res[c] = batch[c]
        return res


def score_dataset(ds: Any, ckpt: str, filename: str, arch: str, in_channels: int, num_classes: int,
                  image_size: int, data_cfg: Any, with_features: bool = False,
                  passthrough: tuple[str, ...] = ()) -> Any:
    """Lazy Ray Dataset of per-sample scores of ``ds`` (columns ``sid, image, label`` + ``passthrough``,
    which are copied to the output, e.g. ``shard, source`` for the aggregation of the final pass)."""
    threads = max(1, int(data_cfg.score_cpus))
    kw = dict(ckpt=ckpt, filename=filename, arch=arch, in_channels=in_channels, num_classes=num_classes,
              image_size=image_size, mean=data_cfg.mean, std=data_cfg.std, with_features=with_features,
              threads=threads, passthrough=tuple(passthrough),
              device="cuda" if float(getattr(data_cfg, "score_gpus", 0.0) or 0.0) > 0 else "cpu",
              precision=str(getattr(data_cfg, "score_precision", "auto")))
    return map_model(ds, Scorer, kw, data_cfg)


# CPUs of a column projection (select_columns): trivial work, but Ray Data gives an op without num_cpus a
# whole CPU, which deadlocks when training (or sweep trials) hold the rest of a small machine (ray-notes §5)
PROJECT_CPUS = 0.05


def collect_scores(scored: Any, columns: tuple[str, ...] = ("sid", "loss", "pred", "prob"),
                   into: ColumnFiller | None = None) -> dict[str, np.ndarray]:
    """Stream the per-sample scalar columns to the driver (no images, no features).

    Without ``into``: the columns concatenated in arrival order. With ``into`` (a
    :class:`~ctray.core.index.ColumnFiller` whose columns are among ``columns``, which must include
    ``sid``): each batch is written at its ids' positions in the driver's order and ``{}`` is returned
    (call ``into.finish``); nothing else in proportion to N is held."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    cols = scored.select_columns(list(columns), num_cpus=PROJECT_CPUS)
    for b in cols.iter_batches(batch_size=8192, batch_format="numpy"):
        if into is not None:
            into.add(b["sid"], b)
            continue
        for c in columns:
            parts[c].append(b[c])
    if into is not None:
        return {}
    return {c: (np.concatenate(v) if v else np.empty(0)) for c, v in parts.items()}


def merge_blobs(ds: Any, column: str = "blob") -> Any:
    """Stream a dataset whose ``column`` holds pickled mergeable statistics (anything with ``merge``,
    e.g. :class:`~ctray.core.pca.FeatureMoments`) and merge them on the driver, in arrival order (the
    merges are associative). Returns None for an empty dataset; empty blobs are skipped."""
    import pickle

    total = None
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for blob in b[column]:
            if len(blob):
                part = pickle.loads(blob)
                total = part if total is None else total.merge(part)
    return total


class _Moments:
    """``map_batches`` combiner: per-batch per-class feature moments, one row per batch (pickled)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import pickle

        from ctray.core.pca import FeatureMoments

        feats = np.asarray(batch["features"], dtype=np.float64)
        m = FeatureMoments.zeros(self.num_classes, feats.shape[1])
        m.update(feats, np.asarray(batch["label"], dtype=np.int64))
        return {"moments": np.array([pickle.dumps(m)], dtype=object)}


def _project_batch(batch: dict[str, np.ndarray], axes: np.ndarray, means: np.ndarray) -> dict[str, np.ndarray]:
    from ctray.core.pca import project

    proj = project(np.asarray(batch["features"], dtype=np.float64), np.asarray(batch["label"], dtype=np.int64),
                   axes, means)
    return {"sid": batch["sid"], "proj_x": proj[:, 0].astype(np.float32), "proj_y": proj[:, 1].astype(np.float32)}


def feature_moments(scored_with_features: Any, num_classes: int, num_cpus: float) -> Any:
    """Per-class feature moments of a dataset with ``label, features (B, D)`` columns, in one streaming
    pass: each batch folds into a :class:`ctray.core.pca.FeatureMoments` in a Ray Data task and the
    driver merges them (C x D x D float64 per batch reaches it, never the features).

    Raises:
        RuntimeError: the dataset is empty.
    """

    from ctray.core.pca import FeatureMoments

    feats = scored_with_features.select_columns(["label", "features"], num_cpus=PROJECT_CPUS)
    moments = feats.map_batches(_Moments, fn_constructor_kwargs={"num_classes": num_classes}, batch_size=4096,
                                batch_format="numpy", num_cpus=num_cpus)
    total: FeatureMoments | None = merge_blobs(moments, "moments")
    if total is None:
        raise RuntimeError("no features to project (empty scored dataset)")
    return total


def project_features(scored_with_features: Any, axes: np.ndarray, means: np.ndarray,
                     num_cpus: float, into: ColumnFiller | None = None) -> dict[str, np.ndarray]:
    """Each sample's features projected on its class's axes (``axes (C, D, 2)``, ``means (C, D)``), in one
    streaming pass; returns ``{"sid", "proj_x", "proj_y"}`` (2 floats per sample reach the driver), or
    writes them ``into`` a filler (:func:`collect_scores`)."""
    feats = scored_with_features.select_columns(["sid", "label", "features"], num_cpus=PROJECT_CPUS)
    projected = feats.map_batches(_project_batch, fn_kwargs={"axes": axes, "means": means}, batch_size=4096,
                                  batch_format="numpy", num_cpus=num_cpus)
    return collect_scores(projected, ("sid", "proj_x", "proj_y"), into=into)
