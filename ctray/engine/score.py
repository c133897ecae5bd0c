"""Scoring ALL of D with a round's model: a Ray Data ``map_batches`` callable class (the model is
loaded once per actor from the round's checkpoint). Only per-sample scalars leave the pipeline; the
final pass also yields within-class 2-D PCA projections computed per class in ``map_groups`` tasks,
so penultimate features never reach the driver.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class Scorer:
    """``map_batches`` callable: ``{sid, image uint8 (B,H,W,C), label}`` -> ``{sid, label, loss, pred, prob}``
    (+ ``features (B, D)`` when ``with_features``).

    ``loss`` is CE w.r.t. the given label (>= 0; low = still fit); ``prob`` is the softmax probability
    of the given label in [0, 1] (high = suspicious after confusion training).
    """

    def __init__(self, ckpt: str, filename: str, arch: str, in_channels: int, num_classes: int, image_size: int,
                 mean: float, std: float, with_features: bool = False, threads: int = 1):
        import torch

        from ctray.models import build_model

        torch.set_num_threads(max(1, threads))
        from ctray.training.loop import load_weights

        state = load_weights(ckpt, filename)
        self.model = build_model(arch, in_channels, num_classes, image_size)
        self.model.load_state_dict(state)
        self.model.eval()
        self.mean, self.std, self.with_features = mean, std, with_features

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from ctray.training.steps import score_batch, to_input

        x = to_input(torch.from_numpy(np.array(batch["image"], copy=True)), self.mean, self.std)  # batches are read-only
        y = torch.from_numpy(batch["label"].astype(np.int64))
        out = score_batch(self.model, x, y, with_features=self.with_features)
        res = {"sid": batch["sid"], "label": batch["label"], "loss": out["loss"].numpy().astype(np.float32),
               "pred": out["pred"].numpy().astype(np.int64), "prob": out["prob"].numpy().astype(np.float32)}
        if self.with_features:
            res["features"] = out["features"].numpy().astype(np.float32)
        return res


def score_dataset(ds: Any, ckpt: str, filename: str, arch: str, in_channels: int, num_classes: int,
                  image_size: int, data_cfg: Any, with_features: bool = False) -> Any:
    """Lazy Ray Dataset of per-sample scores of ``ds`` (columns ``sid, image, label``)."""
    import ray.data

    threads = max(1, int(data_cfg.score_cpus))
    return ds.map_batches(
        Scorer,
        fn_constructor_kwargs=dict(ckpt=ckpt, filename=filename, arch=arch, in_channels=in_channels,
                                   num_classes=num_classes, image_size=image_size, mean=data_cfg.mean,
                                   std=data_cfg.std, with_features=with_features, threads=threads),
        batch_size=data_cfg.score_batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=data_cfg.score_actors),
        num_cpus=data_cfg.score_cpus)


def collect_scores(scored: Any, columns: tuple[str, ...] = ("sid", "loss", "pred", "prob")) -> dict[str, np.ndarray]:
    """Stream the per-sample scalar columns to the driver (no images, no features)."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for b in scored.select_columns(list(columns)).iter_batches(batch_size=8192, batch_format="numpy"):
        for c in columns:
            parts[c].append(b[c])
    return {c: (np.concatenate(v) if v else np.empty(0)) for c, v in parts.items()}


def _project_group(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-class task: centre the class's features and project them on its top-2 principal axes."""
    from ctray.core.projection import class_projection

    proj = class_projection(group["features"].astype(np.float64), k=2)
    return {"sid": group["sid"], "proj_x": proj[:, 0].astype(np.float32), "proj_y": proj[:, 1].astype(np.float32)}


def class_projections(scored_with_features: Any, num_cpus: float) -> dict[str, np.ndarray]:
    """Within-class 2-D PCA projections of every sample, one ``map_groups`` task per class (the
    decision's PCA is per class, so classes are independent; specs/ct.md §2 (d)). Returns
    ``{"sid", "proj_x", "proj_y"}`` arrays on the driver."""
    grouped = scored_with_features.select_columns(["sid", "label", "features"]).groupby("label")
    projected = grouped.map_groups(_project_group, batch_format="numpy", num_cpus=num_cpus)
    return collect_scores(projected, ("sid", "proj_x", "proj_y"))
