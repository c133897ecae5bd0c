"""Drivers of the model-level defenses (seed-defenses.md): ``ctray repair``, ``audit`` and ``cleanse-model``
(``act-score`` and ``purify`` are in :mod:`ctray.engine.activations`; what both share, in
:mod:`ctray.engine.modelio`).

Ray paths, one per method's shape:

- repair (Pivotal Tuning) and cleanse (BCU): a Ray Train fit of ``ctray.training.finetune`` over the
  trusted / unlabeled shards read by Ray Data (local mode with ``scale.num_workers=0``; DDP otherwise).
- audit (Calibrated Trigger Inversion): the reference model is a repair of the suspect model (cached by
  a hash of model bytes, trusted shards and ``repair.*``); the candidate classes are independent Ray
  tasks with fractional CPUs, the trusted set and both models put in the object store once.

Every method's monitoring, early stopping or selection uses a held-out split of the trusted/unlabeled
data chosen by sample-id hash; none reads a test set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ctray import io as cio
from ctray.config import Config
from ctray.engine.modelio import (
    abs_path,
    model_inputs,
    predict_labels,
    read_for_model,
    resolve_augment,
    sample_rows,
    sha256_files,
    to_driver,
)
from ctray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = [
    "AuditResult",
    "FinetuneResult",
    "audit_model",
    "cleanse_model",
    "repair_model",
    "resolve_augment",
]



# ------------------------------------------------------------------------------ repair / cleanse


@dataclass
class FinetuneResult:
    """A repaired or cleansed model. ``info``: the loop's figures (held-out accuracy or teacher agreement,
    steps/epochs, selection), also stored in the checkpoint's ``extra[method]``."""

    ckpt: str
    method: str
    n_fit: int
    n_held: int
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finetune(cfg: Config, method: str, model_path: str, shards: Sequence[str], out: str,
              unlearn: dict[str, Any] | None = None, delta: np.ndarray | None = None) -> FinetuneResult:
    import ray.train
    from ray.train.torch import TorchTrainer

    from ctray.engine.cluster import ensure_ray, scaling, train_data_config
    from ctray.training.finetune import finetune_loop_per_worker

    cfg.validate()
    if not out:
        raise ConfigError("no output checkpoint: give --out")
    model_path, out = abs_path(model_path), abs_path(out)
    ensure_ray(cfg)
    what = "trusted clean" if method == "repair" else "unlabeled"
    ds, paths = read_for_model(shards, model_path, cfg, what)
    ds = ds.select_columns(["sid", "image", "label"], num_cpus=cfg.data.read_cpus).materialize()
    if ds.count() == 0:
        raise DataError(f"no usable sample in the {what} shards {paths[:3]}")
    cfg_d = cfg.to_dict()
    scaling_cfg, threads = scaling(cfg)
    cfg_d["scale"]["torch_threads"] = threads
    aug = cfg_d[method]["augment"] = resolve_augment(getattr(cfg, method).augment, model_path)
    # "augment" passes the model's training augmentation on, so a defense of this output resolves "auto" alike
    prov = {"made_by": f"ctray {'repair' if method == 'repair' else 'cleanse-model'}", "from_model": model_path,
            "data": paths, "config": cfg_d[method], "seed": cfg.seed, "augment": aug}
    if unlearn is not None:
        prov["unlearn"] = unlearn
    job = {"cfg": cfg_d, "method": method, "model_in": model_path, "model_out": out, "extra": prov,
           "unlearn": None if delta is None else {"delta": delta.tolist(), "target": (unlearn or {}).get("class"),
                                                  "ref_ckpt": (unlearn or {}).get("ref_ckpt")}}
    base = os.path.dirname(os.path.abspath(out)) if not cio.is_remote(out) else out.rsplit("/", 1)[0]
    t = time.monotonic()
    # The two ignores: ray.train.torch rebinds TorchTrainer to the Train V2 class at import (V2 is on by
    # default), whose loop may return a value (result.return_value); mypy sees only the V1 declaration
    result = TorchTrainer(
        finetune_loop_per_worker,  # type: ignore[arg-type]
        train_loop_config=job, scaling_config=scaling_cfg, dataset_config=train_data_config(), datasets={"train": ds},
        run_config=ray.train.RunConfig(name=f"{method}-{os.path.basename(out)}-{int(time.time() * 1e3)}",
                                       storage_path=cio.join(base, ".ray-train"),
                                       failure_config=ray.train.FailureConfig(max_failures=2))).fit()
    secs = time.monotonic() - t
    if not cio.exists(out):
        raise RuntimeError(f"{method} finished but wrote no checkpoint to {out}")
    info = dict(result.return_value or {})  # type: ignore[attr-defined]
    log.info("%s: %s -> %s in %.1fs", method, model_path, out, secs)
    return FinetuneResult(ckpt=out, method=method, n_fit=int(info.get("n_fit", 0)), n_held=int(info.get("n_held", 0)),
                          seconds=secs, info=info)


def repair_model(cfg: Config, model_path: str, clean: Sequence[str], out: str) -> FinetuneResult:
    """Pivotal Tuning of a suspect model with a trusted labelled set (``cfg.repair``; seed-defenses.md §1.2).

    With ``repair.unlearn`` > 0 (ctray's extension; 0 = the paper's PT) the model is first audited
    (:func:`audit_model` with the paper's PT as reference; its ``audit.json`` and trigger PNGs go to
    ``<out>.audit/``), and the trigger inverted for the audit's target class is unlearned during the
    tuning: triggered copies of ``repair.unlearn_frac`` of each batch must keep their true labels.

    Args:
        cfg: config (``repair.*``, ``audit.*`` when unlearning, ``data.*``, ``scale.*``, ``seed``).
        model_path: ctray checkpoint of the suspect model.
        clean: trusted labelled shard specs (the paper's setting: about 1% of the training size);
            ``repair.holdout_frac`` of it (by sample id) is held out for monitoring, never trained on.
        out: checkpoint to write (same architecture and spec; ``extra["repair"]`` holds the figures,
            ``extra["unlearn"]`` the audit's target, score and verdict when unlearning).

    Returns:
        A :class:`FinetuneResult` (``info``: ``held_acc_before/after``, ``steps_done``, ``stopped_early``,
        ``unlearn`` when unlearning).
    """
    if cfg.repair.kd > 0 and cfg.repair.unlearn <= 0:
        log.warning("repair.kd=%g without repair.unlearn: the distillation anchors the model to the pivot, so PT's "
                    "drift removes little of the backdoor (measured: ASR 0.97 against 0.24-0.42 on a small CNN). "
                    "Use it with repair.unlearn > 0 (the defend-resnet18-narrow preset)", cfg.repair.kd)
    return _finetune_unlearning(cfg, "repair", model_path, clean, out)


def _finetune_unlearning(cfg: Config, method: str, model_path: str, shards: Sequence[str], out: str
                         ) -> FinetuneResult:
    """``method``'s fit, preceded by the unlearning audit when ``<method>.unlearn`` > 0 (its provenance
    then lands in ``info["unlearn"]``)."""
    if getattr(cfg, method).unlearn <= 0:
        return _finetune(cfg, method, model_path, shards, out)
    unlearn, trigger = _audit_for_unlearning(cfg, method, model_path, shards, out)
    res = _finetune(cfg, method, model_path, shards, out, unlearn, trigger)
    res.info["unlearn"] = unlearn
    return res


def _audit_for_unlearning(cfg: Config, method: str, model_path: str, shards: Sequence[str], out: str
                          ) -> tuple[dict[str, Any], np.ndarray]:
    """Audit ``model_path`` before ``method`` unlearns its trigger: ``(provenance, delta (C, H, W))``.

    The audit runs with the paper's defaults for the method (``repair.unlearn`` / ``cleanse.unlearn`` = 0
    in its reference); for cleanse it is label-free (``audit.use_labels=false``). Its ``audit.json`` and
    trigger PNGs go to ``<out>.audit/``. A model the audit calls clean is still unlearned on its top class,
    with a warning (the audit's threshold is calibrated on one dataset only).
    """
    import copy

    if not out:
        raise ConfigError("no output checkpoint: give --out")  # before minutes of audit, not after
    faithful = copy.deepcopy(cfg)
    faithful.repair.unlearn, faithful.repair.unlearn_every, faithful.repair.kd = 0.0, 0, 0.0  # the audit's
    #                                                                       reference is the paper's PT
    faithful.cleanse.unlearn, faithful.cleanse.unlearn_every = 0.0, 0
    if method == "cleanse":
        faithful.audit.use_labels = False  # the unlabeled shards' labels are never used
    audit_dir = abs_path(out) + ".audit"
    a = audit_model(faithful, model_path, shards, out_dir=audit_dir)
    assert a.trigger is not None  # audit_model always sets the target's trigger
    unlearn = {"class": a.target, "audit_score": a.score, "audit_backdoored": a.backdoored,
               "audit_labels": a.labels,
               "trigger_l1": float(np.abs(a.trigger).mean()), "audit_dir": audit_dir, "ref_ckpt": a.ref_ckpt}
    log.info("%s: unlearning the trigger the audit inverted for class %d (score %.3f, backdoored=%s; %s)",
             method, a.target, a.score, a.backdoored, audit_dir)
    if not a.backdoored:
        log.warning("%s: the audit does not call %s backdoored (score %.3f <= %g); unlearning its top class %d "
                    "anyway", method, model_path, a.score, a.threshold, a.target)
    return unlearn, a.trigger


def cleanse_model(cfg: Config, model_path: str, unlabeled: Sequence[str], out: str) -> FinetuneResult:
    """BCU: distil the suspect model into a partly re-initialised copy on unlabeled images (``cfg.cleanse``;
    seed-defenses.md §3.2).

    Args:
        unlabeled: shard specs of unlabeled (possibly out-of-distribution) images; their ``.cls`` labels
            are read (the shard format needs them) but never used. ``cleanse.holdout_frac`` of it is held
            out to monitor the student's agreement with the teacher (``cleanse.select=agree`` keeps the
            best epoch by it; the default keeps the last epoch, as the reference).

    With ``cleanse.unlearn`` > 0 (ctray's extension, default 3; 0 = the paper's BCU) the teacher is first audited
    without labels (its own predictions, a label-free PT reference; ``<out>.audit/``) and triggered
    copies of ``cleanse.unlearn_frac`` of each batch are distilled toward the teacher's output on the
    clean image, so the student does not learn the trigger back from the teacher.

    Returns:
        A :class:`FinetuneResult` (``info``: per-epoch ``history``, ``selected_epoch``, ``reinit_share``;
        ``unlearn`` when unlearning).
    """
    return _finetune_unlearning(cfg, "cleanse", model_path, unlabeled, out)


# ------------------------------------------------------------------------------------------ audit


@dataclass
class AuditResult:
    """Calibrated Trigger Inversion of one model.

    ``score``: the model score of ``score_mode`` (``audit.score``, :mod:`ctray.core.audit`), the max over
    candidate classes of their ``per_class`` ``score``, **higher = more likely backdoored**: ``"gap-size"``
    (default) ``gap_c * median(trigger_l1) / trigger_l1_c``, about 1 for a class whose trigger is of median
    size; ``"gap"`` the success gap itself. ``target``: the argmax class (the suspected attack target).
    ``backdoored``: ``score > threshold``. ``gap``: the reference's score ``max_c ASR_f(delta_c) -
    ASR_fref(delta_c)`` in [-1, 1], whatever the mode (the reference code reports ``-gap``, higher =
    cleaner: ``reference_score``). ``per_class``: per candidate class ``{"class", "gap", "asr_model",
    "asr_ref", "loss", "trigger_l1", "score"}``. ``labels``: ``"true"`` (the shards' labels) or ``"model"``
    (``audit.use_labels=false``: the model's own predictions; the reference is the label-free PT).
    """

    score: float
    target: int
    backdoored: bool
    threshold: float
    per_class: list[dict[str, Any]]
    ref_ckpt: str
    n_opt: int
    n_eval: int
    seconds: float
    gap: float = float("nan")
    score_mode: str = "gap-size"
    out_dir: str | None = None
    trigger: np.ndarray | None = field(default=None, repr=False)  # float32 (C, H, W): the target's delta
    labels: str = "true"
    n_read: int = 0  # usable images read; n_opt + n_eval of them were used (fewer above audit.max_images)

    @property
    def reference_score(self) -> float:
        return -self.gap

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("trigger")
        d["reference_score"] = self.reference_score
        return d


def _audit_task(classes: list[int], spec: dict[str, Any], state: dict[str, Any], ref_state: dict[str, Any],
                data: dict[str, np.ndarray], acfg: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """One Ray task: invert the triggers of ``classes`` (sequentially) and measure their gaps."""
    import torch

    from ctray.defenses.audit import invert_trigger, pixels01, trigger_asr
    from ctray.models.checkpoint import ModelSpec

    torch.set_num_threads(1)
    ms = ModelSpec(**spec)
    model, ref = ms.build(), ms.build()
    model.load_state_dict(state)
    ref.load_state_dict(ref_state)
    model.eval()
    ref.eval()
    data = {k: np.array(v) for k, v in data.items()}  # object-store arrays are read-only
    x_opt, y_opt = pixels01(torch.from_numpy(data["x_opt"])), torch.from_numpy(data["y_opt"])
    x_ev, y_ev = pixels01(torch.from_numpy(data["x_eval"])), torch.from_numpy(data["y_eval"])
    out = []
    for c in classes:
        delta, loss = invert_trigger(
            model, ref, x_opt, y_opt, c, steps=int(acfg["steps_per_class"]), lr=float(acfg["lr"]),
            betas=(float(acfg["beta1"]), float(acfg["beta2"])), batch_size=int(acfg["batch_size"]),
            init_max=float(acfg["init_max"]), ref_weight=float(acfg["ref_weight"]), flip=bool(acfg["flip"]),
            mean=ms.mean, std=ms.std, seed=seed * 1009 + c)
        a_m = trigger_asr(model, x_ev, y_ev, delta, c, ms.mean, ms.std)
        a_r = trigger_asr(ref, x_ev, y_ev, delta, c, ms.mean, ms.std)
        out.append({"class": int(c), "gap": a_m - a_r, "asr_model": a_m, "asr_ref": a_r, "loss": loss,
                    "trigger_l1": float(delta.abs().mean()), "delta": delta.numpy()})
    return out


def audit_model(cfg: Config, model_path: str, clean: Sequence[str], out_dir: str | None = None,
                ref: str | None = None, cache_dir: str | None = None) -> AuditResult:
    """Calibrated Trigger Inversion (seed-defenses.md §1.3): is ``model_path`` backdoored, and to which class?

    Args:
        cfg: config (``audit.*``; ``repair.*`` for the reference model; ``data.*``, ``scale.*``, ``seed``).
        model_path: ctray checkpoint of the suspect model.
        clean: trusted labelled shard specs. ``audit.eval_frac`` of them (by sample id) measure the gaps;
            the rest drive the inversion. The reference model is a repair with the whole set. With
            ``audit.use_labels=false`` they may be unlabeled: the model's predictions replace their labels
            and the reference is the label-free PT.
        out_dir: where ``audit.json`` and the inverted triggers (``trigger-c<k>.png``, ``trigger.png`` =
            the target's, ``triggered.png`` = an example image with it) go; None writes nothing.
        ref: an existing pivotal-tuned reference checkpoint (skips the repair).
        cache_dir: where reference models are cached by hash (default ``<out_dir>/ref-cache``, else
            ``~/.cache/ctray/ref``).

    Returns:
        An :class:`AuditResult`.
    """
    import copy

    import ray

    from ctray.core.actstats import hash_split
    from ctray.core.audit import class_scores, model_score
    from ctray.engine.cluster import ensure_ray
    from ctray.models.checkpoint import load_state

    cfg.validate()
    ensure_ray(cfg)
    t0 = time.monotonic()
    model_path = abs_path(model_path)
    what = "trusted clean" if cfg.audit.use_labels else "unlabeled"
    ds, paths = read_for_model(clean, model_path, cfg, what)
    cfg = copy.deepcopy(cfg)
    # the reference is the paper's PT (an unlearning repair would audit again; kd is ctray's extension)
    cfg.repair.unlearn, cfg.repair.unlearn_every, cfg.repair.kd = 0.0, 0, 0.0
    if not cfg.audit.use_labels:
        cfg.repair.use_labels = False  # label-free reference: self-distillation to the pivot
    cfg.repair.augment = resolve_augment(cfg.repair.augment, model_path)  # the cache key holds the resolved mode
    _, C, spec = model_inputs(model_path)
    if ref is None:
        rep = cfg.to_dict()["repair"]
        for off in ("kd", "kd_t"):  # off (always, here): left out of the key, so caches made before kd stay valid
            rep.pop(off, None)
        key = hashlib.sha256(json.dumps({
            "model": hashlib.sha256(cio.read_bytes(model_path)).hexdigest(), "clean": sha256_files(paths),
            "repair": rep, "seed": cfg.seed}, sort_keys=True).encode()).hexdigest()[:16]
        cache = cache_dir or (cio.join(out_dir, "ref-cache") if out_dir else
                              os.path.join(os.path.expanduser("~"), ".cache", "ctray", "ref"))
        ref = cio.join(cache, f"pt-{key}.pt")
        if cio.exists(ref):
            log.info("audit: reference model from the cache %s", ref)
        else:
            log.info("audit: pivotal tuning the reference model -> %s", ref)
            repair_model(cfg, model_path, clean, ref)
    n_read = None
    if cfg.audit.max_images > 0:
        ds = ds.materialize()
        n_read = ds.count()
        if n_read > cfg.audit.max_images:
            log.info("audit: %d usable %s images; inverting on a seeded sample of about %d (audit.max_images)",
                     n_read, what, cfg.audit.max_images)
            ds = ds.map_batches(sample_rows, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                                fn_kwargs={"frac": cfg.audit.max_images / n_read, "salt": cfg.seed * 1000 + 309},
                                num_cpus=cfg.data.read_cpus)
    data = to_driver(ds, what)
    if n_read is None:
        n_read = len(data["sids"])
    if not cfg.audit.use_labels:  # the shards' labels are never used: the model's own answers stand in
        data["labels"] = predict_labels(model_path, data["images"])
    ev = hash_split(data["sids"], cfg.audit.eval_frac, cfg.seed * 1000 + 303)
    if ev.all() or not ev.any():
        raise DataError(f"audit needs trusted samples on both sides of the eval split; got {len(ev)} samples")
    arrays = {"x_opt": data["images"][~ev], "y_opt": data["labels"][~ev], "x_eval": data["images"][ev],
              "y_eval": data["labels"][ev]}
    classes = list(cfg.audit.classes) or list(range(C))
    bad = [c for c in classes if not 0 <= c < C]
    if bad:
        raise ConfigError(f"audit.classes {bad} outside [0, {C})")
    state_ref = ray.put(load_state(model_path))
    ref_state_ref = ray.put(load_state(ref))
    data_ref = ray.put(arrays)
    task = ray.remote(num_cpus=cfg.audit.task_cpus)(_audit_task)
    k = cfg.audit.classes_per_task
    chunks = [classes[i:i + k] for i in range(0, len(classes), k)]
    acfg = cfg.to_dict()["audit"]
    log.info("audit: %d candidate classes in %d Ray tasks (%.2f CPU each), %d optimisation / %d evaluation images",
             len(classes), len(chunks), cfg.audit.task_cpus, int((~ev).sum()), int(ev.sum()))
    results = [r for part in ray.get([task.remote(ch, spec, state_ref, ref_state_ref, data_ref, acfg, cfg.seed)
                                      for ch in chunks]) for r in part]
    results.sort(key=lambda r: r["class"])
    gaps = np.array([r["gap"] for r in results], dtype=np.float64)
    per = class_scores(gaps, np.array([r["trigger_l1"] for r in results]), cfg.audit.score)
    try:
        score, best = model_score(per)
        gap = model_score(gaps)[0]
    except ValueError as e:
        raise DataError(f"audit of {model_path}: {e}; give trusted images of more than one class") from None
    target = int(results[best]["class"])
    per_class = [{**{k2: v for k2, v in r.items() if k2 != "delta"}, "score": float(sc)} for r, sc in zip(results, per, strict=True)]
    res = AuditResult(score=score, target=target, backdoored=score > cfg.audit.threshold, threshold=cfg.audit.threshold,
                      per_class=per_class, ref_ckpt=ref, n_opt=int((~ev).sum()), n_eval=int(ev.sum()),
                      seconds=time.monotonic() - t0, gap=gap, score_mode=cfg.audit.score, out_dir=out_dir,
                      trigger=np.asarray(results[best]["delta"], dtype=np.float32),
                      labels="true" if cfg.audit.use_labels else "model", n_read=int(n_read))
    if out_dir:
        _write_audit(out_dir, res, results, arrays, spec)
    log.info("audit %s: %s score %.4f (max gap %.4f, target %d, backdoored=%s) in %.1fs", model_path,
             cfg.audit.score, score, gap, target, res.backdoored, res.seconds)
    return res


def _write_audit(out_dir: str, res: AuditResult, results: list[dict[str, Any]], arrays: dict[str, np.ndarray],
                 spec: dict[str, Any]) -> None:
    import torch

    from ctray.data.shards import encode_image
    from ctray.defenses.audit import pixels01, trigger_png

    cio.makedirs(out_dir)
    for r in results:
        cio.write_bytes(cio.join(out_dir, f"trigger-c{r['class']}.png"), encode_image(trigger_png(torch.from_numpy(np.array(r["delta"])))))
    delta = torch.from_numpy(np.array(results[[r["class"] for r in results].index(res.target)]["delta"]))
    cio.write_bytes(cio.join(out_dir, "trigger.png"), encode_image(trigger_png(delta)))
    others = arrays["y_eval"] != res.target
    if others.any():
        x = pixels01(torch.from_numpy(arrays["x_eval"][others][:1]))
        ex = (torch.clamp(x + delta, 0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        cio.write_bytes(cio.join(out_dir, "triggered.png"), encode_image(ex))
    cio.write_json(cio.join(out_dir, "audit.json"), res.to_dict())
    if not cio.is_remote(out_dir):
        from ctray.report import write_audit_report

        write_audit_report(out_dir)
