"""THE per-worker loop for Ray Train: one function serves f_base training, per-round pretraining and
confusion training, for 1..N workers (DDP over gloo on CPU, nccl on GPU).

Data: each worker reads its Ray Data shard of the usable train set once per fit, keeps the samples of
the round's set D_r (given as sample ids) in memory as uint8, and samples batches from it; scoring of
all of D streams through Ray Data on the driver side (``ctray.engine.score``). The memory a worker
holds is |D_r| / num_workers images, uint8: rounds after the first shrink it to N/5, N/25, ...

Schedule: every step count is global. An epoch has ``ceil(|set| / global_batch)`` steps on every
worker; the confusion shift s_t and the mixed-vs-confusion-only decision are functions of the global
step t; every worker agrees by construction (no communication needed for it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ctray.models import build_model
from ctray.models.checkpoint import ModelSpec, load_state, save_model
from ctray.progress import Progress
from ctray.training.steps import (
    augment,
    confusion_shift,
    confusion_step,
    is_mixed_step,
    pretrain_step,
    score_batch,
    to_input,
)

log = logging.getLogger("ctray.train")

FBASE = "fbase.pt"
BASE = "base.pt"
CONFUSED = "confused.pt"


@dataclass
class LocalSet:
    """A worker's in-memory part of a dataset: ``images uint8 (n, H, W, C)``, ``labels int64 (n,)``,
    ``sids int64 (n,)``."""

    images: torch.Tensor
    labels: torch.Tensor
    sids: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, mask: np.ndarray) -> LocalSet:
        m = torch.from_numpy(mask)
        return LocalSet(self.images[m], self.labels[m], self.sids[mask])


class Sampler:
    """Endless per-worker batches: a fresh seeded permutation of the local set per local epoch."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch = n, batch
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.gen) if n else torch.empty(0, dtype=torch.long)
        self.pos = 0

    def next(self) -> torch.Tensor:
        out = []
        need = self.batch
        while need > 0:
            if self.pos >= self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
            take = min(need, self.n - self.pos)
            out.append(self.perm[self.pos:self.pos + take])
            self.pos += take
            need -= take
        return torch.cat(out)


def local_batch(global_batch: int, rank: int, world: int) -> int:
    """This rank's share of a global batch (the global batch stays fixed whatever the worker count,
    as the reference's DataParallel runs do; specs/ct.md §2)."""
    return global_batch // world + (1 if rank < global_batch % world else 0)


def _allreduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def _load_local(name: str, keep: np.ndarray | None) -> LocalSet:
    """Iterate this worker's shard of dataset ``name`` once; keep rows whose sid is in ``keep``."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    imgs, labels, sids = [], [], []
    for b in shard.iter_batches(batch_size=4096, batch_format="numpy"):
        s = b["sid"]
        m = np.isin(s, keep) if keep is not None else np.ones(len(s), bool)
        if m.any():
            imgs.append(np.ascontiguousarray(b["image"][m]))
            labels.append(b["label"][m].astype(np.int64))
            sids.append(s[m])
    if not imgs:
        return LocalSet(torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), np.empty(0, np.int64))
    sid = np.concatenate(sids)
    order = np.argsort(sid, kind="stable")  # block arrival order varies between runs; sid order does not
    return LocalSet(torch.from_numpy(np.concatenate(imgs)[order]), torch.from_numpy(np.concatenate(labels)[order]),
                    sid[order])


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    m = model.module if hasattr(model, "module") else model
    return {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}


def load_weights(ckpt_dir: str, filename: str) -> dict[str, torch.Tensor]:
    """The state dict saved by the loop under a round's checkpoint directory (local path or URI)."""
    from ctray import io as cio

    return load_state(cio.join(ckpt_dir, filename))


def _predict(model: torch.nn.Module, data: LocalSet, mean: float, std: float, device: torch.device,
             bs: int = 512) -> torch.Tensor:
    m = model.module if hasattr(model, "module") else model
    preds = []
    for i in range(0, len(data), bs):
        x = to_input(data.images[i:i + bs].to(device), mean, std)
        preds.append(score_batch(m, x, data.labels[i:i + bs].to(device))["pred"].cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def train_loop_per_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Run one fit's phases on this worker. ``job`` keys:

    ``cfg`` (Config as dict), ``num_classes``, ``mode`` (``"ct"``, the default: one CT round;
    ``"train"``: f_base's recipe only, for ``ctray train`` and retraining on a cleansed set), ``round``
    (int), ``train_fbase`` (bool), ``fbase_ckpt``, ``prev_base_ckpt`` (checkpoint directories, local path
    or URI, or None), ``keep`` (int64 sids of D_r, None = all of D), ``ckpt_dir`` (where this round's
    weights go); in ``"train"`` mode ``model_out`` (the checkpoint file to write) and ``extra`` (its
    provenance dict).

    In ``"ct"`` mode rank 0 writes ``base.pt`` (pretrained model of the round), ``confused.pt`` and, when
    trained here, ``fbase.pt`` + ``meta.json`` to ``ckpt_dir`` (the run directory: shared storage on a
    cluster; Ray Train's local mode does not persist its own checkpoints) and reports the same files to
    Ray Train. All checkpoints are :mod:`ctray.models.checkpoint` files. Returns per-phase timings.
    """
    import ray.train
    import ray.train.torch

    cfg, C, r = job["cfg"], int(job["num_classes"]), int(job.get("round", 0))
    mode = job.get("mode", "ct")
    ct, base_cfg, data_cfg, scale = cfg["ct"], cfg["base"], cfg["data"], cfg["scale"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = scale["torch_threads"] or 1
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device() if scale["use_gpu"] else torch.device("cpu")
    mean, std = data_cfg["mean"], data_cfg["std"]
    seed = int(cfg["seed"]) * 1000 + r
    times: dict[str, float] = {}
    t0 = time.monotonic()

    full = _load_local("train", None)
    reserve = _load_local("reserve", None) if mode == "ct" else None
    keep = job.get("keep")
    dr = full.subset(np.isin(full.sids, keep)) if keep is not None else full
    n_dr = int(_allreduce_sum(torch.tensor([len(dr)]))[0])
    times["load"] = time.monotonic() - t0
    if len(dr) == 0 or (reserve is not None and len(reserve) == 0):
        raise RuntimeError(f"worker {rank}: empty local share (D_r {len(dr)}, reserve "
                           f"{len(reserve) if reserve is not None else '-'}); use fewer workers for this data size")
    in_ch = int(full.images.shape[3])
    size = int(full.images.shape[1])

    def spec_of(arch: str) -> ModelSpec:
        return ModelSpec(arch, in_ch, C, size, float(mean), float(std))

    def new_model(arch: str, seed_: int) -> torch.nn.Module:
        torch.manual_seed(seed_)  # same init on every rank (DDP also broadcasts rank 0's)
        return build_model(arch, in_ch, C, size)

    def prep(m: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(m) if world > 1 or scale["use_gpu"] else m

    def run_steps(name: str, model: torch.nn.Module, opt: torch.optim.Optimizer, data: LocalSet, n_global: int,
                  global_bs: int, epochs: int, aug: str, sched: Any = None) -> None:
        steps_per_epoch = math.ceil(n_global / global_bs)
        total = steps_per_epoch * epochs
        sampler = Sampler(len(data), local_batch(global_bs, rank, world), seed * 7919 + rank + zlib.crc32(name.encode()) % 997)
        gen = torch.Generator().manual_seed(seed + rank)
        prog = Progress(log, f"[w{rank}] {name}", total, "steps")
        for _ in range(epochs):
            for _ in range(steps_per_epoch):
                idx = sampler.next()
                imgs = data.images[idx]
                if aug != "none":
                    imgs = augment(imgs, aug, gen)
                pretrain_step(model, opt, to_input(imgs.to(device), mean, std), data.labels[idx].to(device))
                prog.update()
            if sched is not None:
                sched.step()
        times[name] = prog.close()

    # ---- f_base: plain training on all of D, with augmentation (its predictions label the confusion batch).
    # "train" mode runs this recipe alone, on D or on the kept subset (retraining on a cleansed set).
    if job.get("train_fbase") or mode == "train":
        fb = prep(new_model(base_cfg["arch"], seed + 17).to(device))
        opt = torch.optim.SGD(fb.parameters(), lr=base_cfg["lr"], momentum=base_cfg["momentum"],
                              weight_decay=base_cfg["weight_decay"])
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, base_cfg["milestones"], base_cfg["gamma"])
        fit_set = dr if mode == "train" else full
        n_fit = int(_allreduce_sum(torch.tensor([len(fit_set)]))[0])
        run_steps("f_base" if mode == "ct" else "train", fb, opt, fit_set, n_fit, base_cfg["batch_size"],
                  base_cfg["epochs"], base_cfg["augment"], sched)
        fbase_state = _state(fb)
        if mode == "train":
            if rank == 0:
                save_model(job["model_out"], fbase_state, spec_of(base_cfg["arch"]),
                           {**(job.get("extra") or {}), "n_train": n_fit, "times": times})
            ray.train.report({"n_train": n_fit})
            return {"n_train": n_fit, "times": times, "world": world}
    else:
        fbase_state = load_weights(job["fbase_ckpt"], FBASE)
        fb = new_model(base_cfg["arch"], 0).to(device)
        fb.load_state_dict(fbase_state)
    assert reserve is not None
    base_pred = _predict(fb, reserve, mean, std, device)  # confusion labels come from f_base (§1.4)
    del fb

    # ---- pretraining base_r on D_r (+ R with labels (y+1) mod C from reserve_in_pretrain_from on)
    model = new_model(ct["arch"], seed + 29).to(device)
    if r > 0 and not ct["pretrain_from_scratch"] and job.get("prev_base_ckpt") is not None:
        model.load_state_dict(load_weights(job["prev_base_ckpt"], BASE))
    model = prep(model)
    pre_set = dr
    n_pre = n_dr
    if r >= ct["reserve_in_pretrain_from"]:
        shifted = LocalSet(reserve.images, (reserve.labels + 1) % C, reserve.sids)
        pre_set = LocalSet(torch.cat([dr.images, shifted.images]), torch.cat([dr.labels, shifted.labels]),
                           np.concatenate([dr.sids, shifted.sids]))
        n_pre = int(_allreduce_sum(torch.tensor([len(pre_set)]))[0])
    opt = torch.optim.SGD(model.parameters(), lr=ct["pretrain_lr"], momentum=ct["pretrain_momentum"],
                          weight_decay=ct["pretrain_weight_decay"])
    run_steps(f"pretrain r{r}", model, opt, pre_set, n_pre, ct["pretrain_batch_size"], ct["pretrain_epochs"][r], "none")
    base_state = _state(model)

    # ---- confusion training confused_r from base_r
    final = r == ct["rounds"] - 1
    counts = _allreduce_sum(torch.bincount(dr.labels, minlength=C).to(torch.float64))
    if final or ct["uniform_class_weights"]:
        w = torch.ones(C, dtype=torch.float32)
    else:
        w = (1.0 / torch.sqrt(counts / counts.sum() + 0.001)).to(torch.float32)
    w = w.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=ct["lr"][r], momentum=ct["momentum"], weight_decay=ct["weight_decay"])
    lb = local_batch(ct["batch_size"], rank, world)
    conf_s = Sampler(len(reserve), lb, seed * 31 + rank)
    insp_s = Sampler(len(dr), lb, seed * 37 + rank)
    lam, bf, iters = float(ct["lam"][r]), int(ct["batch_factor"][r]), int(ct["iters"][r])
    prog = Progress(log, f"[w{rank}] confusion r{r}", iters, "steps")
    for t in range(iters):
        ci = conf_s.next()
        xc = to_input(reserve.images[ci].to(device), mean, std)
        yc = ((base_pred[ci] + confusion_shift(t, C)) % C).to(device)
        if is_mixed_step(t, bf):
            ii = insp_s.next()
            xi, yi = to_input(dr.images[ii].to(device), mean, std), dr.labels[ii].to(device)
            confusion_step(model, opt, xc, yc, xi, yi, w, lam)
        else:
            confusion_step(model, opt, xc, yc, None, None, None, lam)
        prog.update()
    times[f"confusion r{r}"] = prog.close()

    # ---- report one checkpoint (rank 0 writes it; every rank calls report)
    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if rank == 0:
            from ctray import io as cio

            files = {BASE: (base_state, ct["arch"]), CONFUSED: (_state(model), ct["arch"])}
            if job.get("train_fbase"):
                files[FBASE] = (fbase_state, base_cfg["arch"])
            for name, (st, arch) in files.items():
                extra = {"round": r, "phase": name[:-3], "n_dr": n_dr}
                save_model(os.path.join(d, name), st, spec_of(arch), extra)
                save_model(cio.join(job["ckpt_dir"], name), st, spec_of(arch), extra)
            meta = {"round": r, "n_dr": n_dr, "arch": ct["arch"], "base_arch": base_cfg["arch"],
                    "in_channels": in_ch, "image_size": size, "num_classes": C, "times": times}
            with open(os.path.join(d, "meta.json"), "w") as f:
                json.dump(meta, f)
            cio.write_json(cio.join(job["ckpt_dir"], "meta.json"), meta)
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report({"round": r, "n_dr": n_dr}, checkpoint=ckpt)
    return {"round": r, "n_dr": n_dr, "times": times, "world": world}
