"""The cross-class detector's passes (the math: :mod:`ctray.core.xclass`): f_base's loss and pooled block
activations, streamed through Ray Data in four forward passes, none of which brings a per-sample feature
vector to the driver.

1. R: per-sample loss -> ``tau_loss`` (R is the small trusted reserve: its losses reach the driver).
2. D: feature moments in four groups (loss <= / > ``tau_loss``, in each half of D by sample-id hash): the
   scoring tasks pass float32 features on to a merge step that makes one pickled blob per 8,192 rows
   (4 x ``max_dims`` squared floats), merged on the driver -> one Fisher direction per half; each half
   is scored with the other half's (cross-fitting).
3. R: per-sample score -> ``tau_score``, and how many reserve samples cross both thresholds.
4. D: per sample the score and whether it crosses both (4 + 1 bytes a sample to the driver, written into
   the caller's arrays by sample id).
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctray.config import Config
from ctray.core.actstats import hash_split
from ctray.core.index import ColumnFiller
from ctray.core.pca import FeatureMoments
from ctray.core.xclass import (
    HALF_SEED,
    SUSPECT,
    XClassDecision,
    choose_threshold,
    fisher_direction,
    group_of,
    half_moments,
    loss_threshold,
    project,
)
from ctray.engine.modelio import read_for_model
from ctray.engine.score import collect_scores, map_model, merge_blobs
from ctray.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["XClassResult", "xclass_scores"]


class _XMapper:
    """``map_batches`` callable holding f_base. ``op``: ``"loss"`` -> ``sid, loss``; ``"features"`` -> ``h``
    float32 (B, D) and its moment ``group`` (:func:`~ctray.core.xclass.group_of`); ``"score"`` -> ``sid, loss, score, hit``
    (``hit`` = loss > tau_loss and score > tau_score)."""

    def __init__(self, model_path: str, threads: int, max_dims: int, op: str, payload: dict[str, Any]):
        import torch

        from ctray.models.checkpoint import load_model

        torch.set_num_threads(max(1, threads))
        self.model, self.spec, _ = load_model(model_path)
        self.model.eval()
        self.max_dims, self.op, self.p = max_dims, op, payload

    def _forward(self, batch: dict[str, np.ndarray], features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        import torch
        import torch.nn.functional as F

        from ctray.defenses.actstats import activation_features
        from ctray.training.steps import to_input

        x = to_input(torch.from_numpy(np.array(batch["image"], copy=True)), self.spec.mean, self.spec.std)
        y = torch.from_numpy(np.array(batch["label"], dtype=np.int64))  # a copy: Ray Data batches are read-only
        h: np.ndarray | None = None
        with torch.no_grad():
            if features:
                feats, logits = activation_features(self.model, x, "avg+max")
                h = feats[:, :self.max_dims].numpy().astype(np.float64)
            else:
                logits = self.model(x)
            loss = F.cross_entropy(logits, y, reduction="none").numpy().astype(np.float32)
        return loss, h

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.op == "loss":
            loss, _ = self._forward(batch, False)
            return {"sid": batch["sid"], "loss": loss}
        loss, h = self._forward(batch, True)
        assert h is not None
        half = hash_split(np.asarray(batch["sid"], np.int64), 0.5, HALF_SEED)
        if self.op == "features":  # merged into moments by _moments_blob over larger batches
            return {"h": h.astype(np.float32), "group": group_of(half, loss > self.p["tau_loss"]).astype(np.int8)}
        s = np.empty(len(h), np.float32)
        for side in (0, 1):  # each half is scored with the direction fitted on the other half
            rows = half == bool(side)
            mean, v = self.p["fits"][1 - side]
            s[rows] = project(h[rows], mean, v)
        hit = (loss > self.p["tau_loss"]) & (s > self.p["tau_score"])
        return {"sid": batch["sid"], "loss": loss, "score": s, "hit": hit}


def _moments_blob(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Four-group moments of a batch of ``h`` rows, as one pickled blob (one per up to
    :data:`MOMENT_ROWS` rows: a blob is 4 x D x D float64, so few large batches, not one per scoring batch)."""
    h = np.asarray(batch["h"], dtype=np.float64)
    m = FeatureMoments.zeros(4, h.shape[1])
    m.update(h, np.asarray(batch["group"], dtype=np.int64))
    return {"blob": np.array([pickle.dumps(m)], dtype=object)}


#: rows per moment blob: 8,192 rows of 448 features (small CNN) -> one 6.4 MB blob (0.8 KB a row)
MOMENT_ROWS = 8192


@dataclass
class XClassResult:
    """What :func:`xclass_scores` found. ``decision``: the test (``decisions.json["xclass"]``, the reserve's
    size in ``n_ref``); ``dims``: feature columns used; ``seconds``: wall time of the four passes. The
    per-sample ``score`` (higher = more suspicious) and ``flagged`` went into the caller's filler, or are
    here (``sid``-sorted arrays) when no filler was given."""

    decision: XClassDecision
    dims: int
    seconds: float
    sid: np.ndarray | None = None
    score: np.ndarray | None = None
    flagged: np.ndarray | None = None


def _pass(ds: Any, model_path: str, cfg: Config, op: str, payload: dict[str, Any]) -> Any:
    return map_model(ds, _XMapper, {"model_path": model_path, "threads": max(1, int(cfg.data.score_cpus)),
                                    "max_dims": cfg.xclass.max_dims, "op": op, "payload": payload}, cfg.data)


def xclass_scores(model_path: str, shards: Sequence[str], clean_shards: Sequence[str], cfg: Config,
                  into: ColumnFiller | None = None) -> XClassResult:
    """Run the cross-class detector with ``model_path`` (f_base: a ctray checkpoint of the model trained
    on ``shards``) over the usable samples of ``shards``, the trusted ``clean_shards`` as reference.

    Args:
        into: a :class:`~ctray.core.index.ColumnFiller` with columns ``score_xclass`` (float32) and
            ``flagged_xclass`` (bool): each sample's score and its crossing of ``decision.tau_base`` are
            written there by sample id (the caller's order; exactly once, checked by the filler). Flag
            ``flagged_xclass & (score_xclass > decision.tau_score)``, and only when ``decision.attack``.

    Raises:
        ConfigError / DataError: bad config, no usable sample, no reserve.
    """
    t0 = time.monotonic()
    xc = cfg.xclass
    ref_ds, _ = read_for_model(clean_shards, model_path, cfg, "clean")
    ref = collect_scores(_pass(ref_ds, model_path, cfg, "loss", {}), ("sid", "loss"))
    tau_loss = loss_threshold(ref["loss"], xc.loss_quantile)
    ds, _ = read_for_model(shards, model_path, cfg, "train")
    feats = _pass(ds, model_path, cfg, "features", {"tau_loss": tau_loss})
    blobs = feats.map_batches(_moments_blob, batch_size=MOMENT_ROWS, batch_format="numpy", num_cpus=cfg.data.read_cpus)
    total: FeatureMoments | None = merge_blobs(blobs)
    if total is None:
        raise DataError("the cross-class detector found no usable sample to score")
    fits = [fisher_direction(half_moments(total, side), xc.ridge) for side in (0, 1)]
    pay = {"tau_loss": tau_loss, "fits": fits, "tau_score": np.inf}
    ref2 = collect_scores(_pass(ref_ds, model_path, cfg, "score", pay), ("sid", "loss", "score"))
    tau_score = float(np.quantile(ref2["score"], xc.score_quantile))
    pay["tau_score"] = tau_score
    scored = _pass(ds, model_path, cfg, "score", pay)
    out = XClassResult(decision=None, dims=int(total.dim), seconds=0.0)  # type: ignore[arg-type]
    hits: list[np.ndarray] = []  # the crossings' scores: a subset of the suspects (a few % of N, 4 bytes each)
    if into is not None:
        n = 0
        for b in scored.iter_batches(batch_size=8192, batch_format="numpy"):
            into.add(b["sid"], {"score_xclass": b["score"], "flagged_xclass": b["hit"]})
            hits.append(b["score"][b["hit"]])
            n += len(b["sid"])
    else:
        r = collect_scores(scored, ("sid", "score", "hit"))
        order = np.argsort(r["sid"], kind="stable")
        out.sid, out.score, out.flagged = r["sid"][order], r["score"][order], r["hit"][order].astype(bool)
        hits.append(out.score[out.flagged])
        n = len(order)
    ref_hit = (ref2["loss"] > tau_loss) & (ref2["score"] > tau_score)
    out.decision = choose_threshold(np.concatenate(hits) if hits else np.zeros(0), n, ref2["score"][ref_hit],
                                    len(ref2["sid"]), tau_score, xc.alpha, xc.fdr, tau_loss,
                                    int(total.count[SUSPECT::2].sum()), xc.test)
    if out.flagged is not None and out.score is not None:  # the final threshold
        out.flagged &= out.score > out.decision.tau_score
    out.seconds = time.monotonic() - t0
    d = out.decision
    log.info("cross-class detector: %d of %d samples cross both thresholds (reserve: %d of %d, expected %.1f), "
             "p = %.3g -> %s (%d suspects by loss, %d feature columns, %.1fs)", d.k, d.n, d.k_ref, d.n_ref,
             d.expected, d.p_value, "flagged" if d.attack else "no attack spread over classes", d.n_suspects,
             out.dims, out.seconds)
    return out
