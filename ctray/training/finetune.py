"""The per-worker fine-tuning loop for Ray Train: Pivotal Tuning repair and BCU cleansing of an existing
checkpoint, for 0 (local mode), 1 or N workers (DDP).

Why a second loop beside ``ctray.training.loop``: that loop trains a fresh model (f_base, CT rounds) on
an epoch schedule and writes round checkpoints. Both defenses start from a loaded checkpoint, keep a
frozen copy of it (the pivot / the teacher) beside the model being trained, need the penultimate features
(SLOL) or soft targets (distillation), monitor a held-out split during training (early stop / model
selection) and, for BCU, build a partly re-initialised student. Adding that as modes of the CT loop would
turn it into the flag-driven trainer DESIGN.md §5 warns against. Both loops share the data handling
(``_load_local``, ``Sampler``, ``local_batch``) and the pure steps (``to_input``, ``augment``).

Job keys: ``cfg`` (Config as dict), ``method`` (``"repair"`` | ``"cleanse"``), ``model_in`` (checkpoint of
the suspect model), ``model_out`` (checkpoint to write; rank 0 writes it), ``extra`` (provenance). The
worker's Ray Data shard ``"train"`` holds the trusted labelled set (repair) or the unlabeled pool
(cleanse; its labels are never used in a loss). A held-out share of it, chosen by sample-id hash
(``<method>.holdout_frac``), is never trained on: it monitors repair (accuracy, early stop at
``min_cda``) and cleansing (agreement with the teacher; ``select=agree`` keeps the best epoch).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ctray.core.actstats import hash_split
from ctray.core.placement import local_cores
from ctray.defenses.audit import apply_trigger, reinvert_trigger
from ctray.defenses.cleanse import distill_loss, student_init, temperature
from ctray.defenses.repair import pivot_params, pt_loss
from ctray.models.checkpoint import ModelSpec, load_model, save_model
from ctray.progress import Progress
from ctray.training.loop import LocalSet, Sampler, _allreduce_sum, _load_local, _state, local_batch
from ctray.training.steps import augment, to_input

log = logging.getLogger("ctray.train")

#: seed offsets so the holdout split and the sampler of one method never coincide with another's
_HOLDOUT_SALT = {"repair": 101, "cleanse": 202}


class WithFeatures(nn.Module):
    """``forward(x) -> (logits, features)`` of a registry model, so DDP sees one forward for both."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.model.features(x)  # type: ignore[operator]
        return self.model.head(z), z  # type: ignore[operator]


@torch.no_grad()
def _held_counts(model: nn.Module, held: LocalSet, mean: float, std: float, device: torch.device,
                 other: nn.Module | None = None, bs: int = 512) -> tuple[int, int]:
    """``(hits, n)`` on this rank's held-out share: vs the labels, or vs ``other``'s predictions."""
    model.eval()
    hits = 0
    for i in range(0, len(held), bs):
        x = to_input(held.images[i:i + bs].to(device), mean, std)
        pred = model(x).argmax(1)
        ref = other(x).argmax(1) if other is not None else held.labels[i:i + bs].to(device)
        hits += int((pred == ref).sum())
    return hits, len(held)


def _global_share(hits: int, n: int) -> float | None:
    t = _allreduce_sum(torch.tensor([hits, n], dtype=torch.float64))
    return float(t[0] / t[1]) if t[1] > 0 else None


def finetune_loop_per_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Run one repair or cleansing fit on this worker (see the module docstring for ``job``).

    Returns:
        ``{"method", "world", "n_fit", "n_held", "seconds", ...}`` plus the method's monitoring figures
        (repair: ``held_acc_before/after``, ``steps_done``, ``stopped_early``; cleanse: per-epoch
        ``history`` of held-out agreement, ``selected_epoch``, ``reinit_share``).
    """
    import ray.train
    import ray.train.torch

    cfg, method = job["cfg"], job["method"]
    if method not in ("repair", "cleanse"):
        raise ValueError(f"unknown fine-tuning method {method!r}")
    sec, scale = cfg[method], cfg["scale"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(min(scale["torch_threads"] or 1, local_cores()))  # capped by this worker's machine
    device = ray.train.torch.get_device() if scale["use_gpu"] else torch.device("cpu")
    seed = int(cfg["seed"]) * 1000 + _HOLDOUT_SALT[method]
    t0 = time.monotonic()

    data = _load_local("train", None)
    hold = hash_split(data.sids, float(sec["holdout_frac"]), seed)
    fit, held = data.subset(~hold), data.subset(hold)
    n_fit = int(_allreduce_sum(torch.tensor([len(fit)]))[0])
    n_held = int(_allreduce_sum(torch.tensor([len(held)]))[0])
    if len(fit) == 0:
        raise RuntimeError(f"worker {rank}: no {method} samples in its share ({len(data)} rows, {len(held)} held out);"
                           " give more data or fewer workers")
    model, spec, _ = load_model(job["model_in"])
    model = model.to(device)
    mean, std = spec.mean, spec.std

    def prep(m: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(m) if world > 1 or scale["use_gpu"] else m

    sampler = Sampler(len(fit), local_batch(int(sec["batch_size"]), rank, world), seed * 7919 + rank)
    gen = torch.Generator().manual_seed(seed + rank)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = sampler.next()
        imgs = fit.images[idx]
        if sec["augment"] != "none":
            imgs = augment(imgs, sec["augment"], gen)
        return to_input(imgs.to(device), mean, std), fit.labels[idx].to(device)

    unl = job.get("unlearn")
    delta = torch.tensor(np.asarray(unl["delta"], dtype=np.float32), device=device) if unl else None
    reinv = None
    if unl and int(sec.get("unlearn_every", 0)) > 0:
        ref, _, _ = load_model(unl["ref_ckpt"])  # the audit's reference (a path every worker can read)
        for p in ref.parameters():
            p.requires_grad_(False)
        reinv = {"ref": ref.to(device).eval(), "target": int(unl["target"]), "lr": float(cfg["audit"]["lr"]),
                 "betas": (float(cfg["audit"]["beta1"]), float(cfg["audit"]["beta2"]))}
    if method == "repair":
        out_model, info = _repair(model, sec, prep, batch, held, mean, std, device, rank, world, delta, reinv)
    else:
        out_model, info = _cleanse(model, spec, sec, prep, batch, held, mean, std, device, rank, world, n_fit, seed,
                                   delta, reinv)
    info.update({"method": method, "world": world, "n_fit": n_fit, "n_held": n_held,
                 "seconds": round(time.monotonic() - t0, 2)})
    if rank == 0:
        save_model(job["model_out"], out_model, spec, {**(job.get("extra") or {}), method: info})
    ray.train.report({k: v for k, v in info.items() if isinstance(v, int | float)})
    return info


def _repair(model: nn.Module, sec: dict[str, Any], prep: Any, batch: Any, held: LocalSet, mean: float, std: float,
            device: torch.device, rank: int, world: int, delta: torch.Tensor | None = None,
            reinv: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Pivotal Tuning (seed-defenses.md §1.2) of ``model`` in place; returns its state and the figures.

    ``delta``: float (C, H, W) additive trigger in [0, 1] pixel units to unlearn (``repair.unlearn`` > 0):
    the first ``unlearn_frac`` of each batch is also fed with it, with the true labels (the pivot's when
    ``use_labels`` is false), in the same forward pass (one DDP forward per step), and ``unlearn * CE``
    on those copies joins the PT loss.

    ``reinv`` (``repair.unlearn_every`` > 0): ``{"ref", "target", "lr", "betas"}``; every ``unlearn_every``
    steps the trigger is re-inverted against ``model`` on ``unlearn_isteps`` fresh batches
    (:func:`ctray.defenses.audit.reinvert_trigger`, capped at ``unlearn_cap``) and averaged over the workers;
    ``info["unlearn_delta_l1"]`` lists its mean |delta| after each re-inversion.

    ``held_acc_before`` / ``held_acc_after`` in [0, 1]: held-out accuracy against the labels, or, when
    ``use_labels`` is false, agreement with the pivot's predictions (1.0 before), so no label is read.
    """
    pivot = copy.deepcopy(model).eval()
    for p in pivot.parameters():
        p.requires_grad_(False)
    theta0 = pivot_params(pivot)
    net = prep(WithFeatures(model))
    opt = torch.optim.SGD(model.parameters(), lr=float(sec["lr"]), momentum=float(sec["momentum"]),
                          nesterov=bool(sec["nesterov"]), weight_decay=float(sec["weight_decay"]))
    gather = bool(sec["slol_gather"]) and world > 1
    if gather and int(sec["batch_size"]) % world:
        raise RuntimeError(f"repair.slol_gather needs repair.batch_size ({sec['batch_size']}) divisible by the "
                           f"worker count ({world})")
    # label-free (use_labels false): the held-out share is measured against the pivot's answers, so the
    # shards' labels are never read (an unlabeled pool's .cls may be placeholders)
    judge = None if sec["use_labels"] else pivot
    acc_before = _global_share(*_held_counts(pivot, held, mean, std, device, judge))
    steps, every, min_cda = int(sec["steps"]), int(sec["eval_every"]), float(sec["min_cda"])
    unlearn, unlearn_frac = float(sec.get("unlearn", 0.0)), float(sec.get("unlearn_frac", 0.5))
    if delta is not None and unlearn <= 0:
        delta = None  # a trigger without a weight: the paper's PT
    stopped, done, acc = False, 0, acc_before
    prog = Progress(log, f"[w{rank}] pivotal tuning", steps, "steps")
    parts: dict[str, float] = {}
    inv_every = int(sec.get("unlearn_every", 0)) if (reinv is not None and delta is not None) else 0
    delta_l1: list[float] = []
    for step in range(steps):
        if inv_every and step > 0 and step % inv_every == 0:
            assert delta is not None and reinv is not None
            delta = _reinvert(model, pivot, delta, reinv, sec, batch, mean, std, world)
            delta_l1.append(round(float(delta.abs().mean()), 5))
        if step % every == 0 and step > 0:
            acc = _global_share(*_held_counts(model, held, mean, std, device, judge))
            if acc is not None and acc <= min_cda:
                log.warning("pivotal tuning: held-out accuracy %.4f <= min_cda %.4f at step %d: stopping", acc,
                            min_cda, step)
                stopped = True
                break
        x, y = batch()
        with torch.no_grad():
            z0 = pivot.features(x)  # type: ignore[operator]
            logits0 = pivot.head(z0)  # type: ignore[operator]
        model.train()
        if delta is None:
            logits, z = net(x)
        else:
            k = max(1, round(len(x) * unlearn_frac))
            xt = apply_trigger(x[:k] * std + mean, delta, mean, std)  # back to [0, 1], trigger, normalise
            logits_all, z_all = net(torch.cat([x, xt]))
            logits, z, logits_t = logits_all[:len(x)], z_all[:len(x)], logits_all[len(x):]
        yc = y if sec["use_labels"] else logits0.argmax(1)  # label-free: centroids of the pivot's classes
        zs, z0s, ys = z, z0, yc
        if gather:
            import torch.distributed.nn.functional as dnn

            zs = torch.cat(dnn.all_gather(z))
            z0s = torch.cat(dnn.all_gather(z0))
            ys_list = [torch.empty_like(yc) for _ in range(world)]
            dist.all_gather(ys_list, yc)
            ys = torch.cat(ys_list)
        loss, parts = pt_loss(logits, zs, logits0, z0s, y, model, theta0, float(sec["lam_slol"]),
                              float(sec["lam_param"]), bool(sec["use_labels"]), bool(sec["slol_offdiag"]), y_feat=ys,
                              kd=float(sec.get("kd", 0.0)), kd_t=float(sec.get("kd_t", 4.0)))
        if delta is not None:
            unl = F.cross_entropy(logits_t, yc[:k])  # label-free repair: the pivot's labels of the clean copies
            loss = loss + unlearn * unl
            parts["unlearn"] = float(unl.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += 1
        prog.update()
    prog.close()
    acc_after = _global_share(*_held_counts(model, held, mean, std, device, judge))
    info: dict[str, Any] = {"steps_done": done, "stopped_early": stopped, "held_acc_before": acc_before,
                            "held_acc_after": acc_after, "last_loss_parts": parts}
    if inv_every:
        info["unlearn_delta_l1"] = delta_l1
    log.info("pivotal tuning: %d steps, held-out accuracy %s -> %s", done, acc_before, acc_after)
    return _state(model), info


def _reinvert(model: nn.Module, pivot: nn.Module, delta: torch.Tensor, reinv: dict[str, Any], sec: dict[str, Any],
              batch: Any, mean: float, std: float, world: int) -> torch.Tensor:
    """``repair.unlearn_every`` / ``cleanse.unlearn_every``'s step: re-invert ``delta`` against ``model`` on
    ``unlearn_isteps`` fresh batches (labels: the true ones, or ``pivot``'s answers when label-free; for
    cleanse ``pivot`` is the teacher and never the labels), then average it over the workers so that every
    rank unlearns the same trigger."""
    def pairs() -> Any:
        for _ in range(int(sec["unlearn_isteps"])):
            x, y = batch()
            if not sec.get("use_labels", False):  # cleanse has no labels: always the teacher's answers
                with torch.no_grad():
                    y = pivot(x).argmax(1)
            yield x * std + mean, y

    d = reinvert_trigger(model, reinv["ref"], delta, pairs(), reinv["target"], lr=reinv["lr"], betas=reinv["betas"],
                         ref_weight=float(sec["unlearn_ref_weight"]), mean=mean, std=std,
                         cap=float(sec["unlearn_cap"]))
    # the workers' mean of capped triggers stays within the cap (mean |.| is convex)
    return _allreduce_sum(d) / world if world > 1 else d


def _cleanse(teacher: nn.Module, spec: ModelSpec, sec: dict[str, Any], prep: Any, batch: Any, held: LocalSet,
             mean: float, std: float, device: torch.device, rank: int, world: int, n_fit: int, seed: int,
             delta: torch.Tensor | None = None, reinv: dict[str, Any] | None = None
             ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """BCU (seed-defenses.md §3.2): build the student from ``teacher`` and distil; returns the selected
    student's state and the figures.

    ``delta``: float (C, H, W) additive trigger in [0, 1] pixel units to unlearn (``cleanse.unlearn`` > 0):
    the first ``unlearn_frac`` of each batch is also fed with it, in the same forward pass, and
    ``unlearn * KL(teacher(x) || student(x + delta))`` at the epoch's temperature is added: a triggered image
    must get the teacher's answer for the clean one.

    ``reinv`` (``cleanse.unlearn_every`` > 0): as in :func:`_repair`, every ``unlearn_every`` steps (counted
    over epochs) the trigger is re-inverted against the student, with the teacher's answers as labels and
    the audit's label-free reference; ``info["unlearn_delta_l1"]`` lists its mean |delta| after each."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)  # the fresh init, identical on every rank
    student, realised = student_init(teacher, spec.build(), list(sec["ratios"]), float(sec["head_ratio"]), seed)
    student = student.to(device)
    net = prep(student)
    opt = torch.optim.SGD(student.parameters(), lr=float(sec["lr"]), momentum=float(sec["momentum"]),
                          weight_decay=float(sec["weight_decay"]))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(sec["t_max"]))
    epochs = int(sec["epochs"])
    steps_per_epoch = math.ceil(n_fit / int(sec["batch_size"]))
    history: list[dict[str, float | None]] = []
    best_state, best_agree, best_epoch = None, -1.0, epochs - 1
    unlearn, unlearn_frac = float(sec.get("unlearn", 0.0)), float(sec.get("unlearn_frac", 0.5))
    if delta is not None and unlearn <= 0:
        delta = None  # a trigger without a weight: the paper's BCU
    prog = Progress(log, f"[w{rank}] BCU distillation", epochs * steps_per_epoch, "steps")
    unl_sum = 0.0
    inv_every = int(sec.get("unlearn_every", 0)) if (reinv is not None and delta is not None) else 0
    delta_l1: list[float] = []
    step = 0
    for e in range(epochs):
        t = temperature(e, epochs, float(sec["t_start"]), float(sec["t_add"]))
        loss_sum = 0.0
        for _ in range(steps_per_epoch):
            if inv_every and step > 0 and step % inv_every == 0:
                assert delta is not None and reinv is not None
                delta = _reinvert(student, teacher, delta, reinv, sec, batch, mean, std, world)
                delta_l1.append(round(float(delta.abs().mean()), 5))
            step += 1
            x, _y = batch()  # labels are never used
            with torch.no_grad():
                t_logits = teacher(x)
            student.train()
            if delta is None:
                loss = distill_loss(net(x), t_logits, t)
            else:
                k = max(1, round(len(x) * unlearn_frac))
                xt = apply_trigger(x[:k] * std + mean, delta, mean, std)  # back to [0, 1], trigger, normalise
                out = net(torch.cat([x, xt]))  # one forward (one DDP all-reduce) for both
                unl = distill_loss(out[len(x):], t_logits[:k], t)
                loss = distill_loss(out[:len(x)], t_logits, t) + unlearn * unl
                unl_sum += float(unl.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach())
            prog.update()
        sched.step()
        agree = _global_share(*_held_counts(student, held, mean, std, device, other=teacher))  # None: nothing held
        history.append({"epoch": e, "temperature": t, "loss": loss_sum / steps_per_epoch, "held_agree": agree})
        if sec["select"] == "agree" and agree is not None and agree > best_agree:
            best_agree, best_epoch, best_state = agree, e, _state(student)
    prog.close()
    state = best_state if best_state is not None else _state(student)
    if sec["select"] == "last":
        best_epoch = epochs - 1
    shares = np.array(list(realised.values()))
    info = {"history": history, "selected_epoch": best_epoch, "select": sec["select"],
            "reinit_share": {k: round(v, 4) for k, v in realised.items()},
            "reinit_mean": float(shares.mean()) if shares.size else 0.0}
    if delta is not None:
        info["unlearn_loss_mean"] = unl_sum / max(1, epochs * steps_per_epoch)
    if inv_every:
        info["unlearn_delta_l1"] = delta_l1
    log.info("BCU: %d epochs, selected epoch %d (%s), held-out teacher agreement %s", epochs, best_epoch,
             sec["select"], history[-1]["held_agree"] if history else None)
    return state, info
