"""Model-level defenses per attack (a script): train backdoored and clean models, then repair, cleanse,
audit and activation-score them, all in ONE Ray session (docs/defenses.md has the figures).

    python -m ctray.benchmarks.defenses --base DIR --unlabeled SHARDS --out DIR [--preset small]
        [--rate 0.05] [--attacks badnet,blend,wanet] [--clean-seeds 0,1,2] [--trusted N]
        [--steps train,repair,cleanse,audit,act] [key=value ...]

``--base`` is a clean set made by ``ctray data`` (train/clean/test shards). Per attack: poison it
(``OUT/data/<attack>``), train a model on it (``OUT/models/<attack>.pt``, ``ctray train`` with the preset's
``base.*``), evaluate; repair it with the first ``--trusted`` samples' shards of the trusted set
(``OUT/data/trusted``: ``--trusted`` images drawn from the clean reserve, 1% of the training size by
default) and evaluate; cleanse it on ``--unlabeled`` and evaluate; audit it (its repaired model is the audit's reference: the same ``repair.*``). Clean models (one per
seed in ``--clean-seeds``) are trained on the unpoisoned base and audited too (their references are
pivotal-tuned inside the audit), which gives the audit's AUROC. The activation score of each attacked
model on its own training set, with the base's whole clean reserve as the trusted set (half fits the
intervals, half sets the threshold), gives a detector row.

Every result is appended to ``OUT/defenses.json`` as it finishes, and a re-run skips what is there (and
checkpoints that exist), so the script resumes. Markdown tables go to stdout and ``OUT/defenses.md``.
Equivalent CLI commands are in docs/defenses.md; one process avoids a Ray start per command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any

from ctray.config import parse_overrides

log = logging.getLogger("ctray.benchmarks.defenses")


def _trusted_subset(base: str, out: str, n: int, seed: int) -> str:
    """Write ``n`` images of the base's clean reserve as ``OUT/data/trusted/clean-*.tar`` (seeded choice)."""
    import numpy as np

    from ctray.data.shards import ShardWriter, expand_shards, load_arrays

    d = os.path.join(out, "data", "trusted")
    if os.path.exists(os.path.join(d, "done")):
        return d
    recs, _ = load_arrays(expand_shards(f"{base}/clean-*.tar"))
    pick = np.random.default_rng(seed).permutation(len(recs))[:n]
    with ShardWriter(d, "clean", max(1, n)) as w:
        for i in sorted(pick.tolist()):
            w.write(recs[i].key, recs[i].image, recs[i].label)  # type: ignore[arg-type]
    with open(os.path.join(d, "done"), "w") as f:
        f.write(str(n))
    return d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--unlabeled", required=True, help="shard spec of the unlabeled pool for BCU")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="small")
    p.add_argument("--rate", type=float, default=0.05)
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--attacks", default="badnet,blend,wanet")
    p.add_argument("--clean-seeds", default="0,1,2")
    p.add_argument("--trusted", type=int, default=0, help="trusted images (default: 1%% of the training size)")
    p.add_argument("--steps", default="train,repair,cleanse,audit,act")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("ray").setLevel(logging.WARNING)

    from ctray.config import load_config
    from ctray.core.metrics import auroc, detection_metrics
    from ctray.data.poison import poison_dataset
    from ctray.data.shards import expand_shards, read_manifest
    from ctray.engine.activations import activation_scores
    from ctray.engine.cluster import ensure_ray
    from ctray.engine.defenses import audit_model, cleanse_model, repair_model
    from ctray.engine.ground import load_truth
    from ctray.engine.train import evaluate, train_model

    ensure_ray()
    steps = set(args.steps.split(","))
    os.makedirs(os.path.join(args.out, "models"), exist_ok=True)
    res_path = os.path.join(args.out, "defenses.json")
    results: dict[str, Any] = json.load(open(res_path)) if os.path.exists(res_path) else {}

    def save() -> None:
        with open(res_path, "w") as f:
            json.dump(results, f, indent=2)

    def cfg_for(extra: dict[str, Any] | None = None) -> Any:
        ov = parse_overrides(args.overrides)
        ov.update(extra or {})
        return load_config(args.preset, ov)

    man = read_manifest(expand_shards(f"{args.base}/train-*.tar")) or {}
    n_train = int(man.get("counts", {}).get("train", 10000))
    trusted = _trusted_subset(args.base, args.out, args.trusted or max(10, n_train // 100), 0)
    clean_spec = [f"{trusted}/clean-*.tar"]

    def ev(model: str, data: str) -> dict[str, Any]:
        e = evaluate(model, [f"{data}/test-0*.tar"], [f"{data}/test-triggered-*.tar"])
        return {"acc": e.acc, "asr": e.asr}

    def step(key: str, fn: Any) -> Any:
        if key not in results:
            t = time.time()
            out = fn()
            out["seconds"] = round(time.time() - t, 1)
            results[key] = out
            save()
            log.info("%s: %s", key, out)
        return results[key]

    models: dict[str, tuple[str, str, bool]] = {}  # name -> (ckpt, data dir, backdoored)
    for attack in args.attacks.split(","):
        data = os.path.join(args.out, "data", attack)
        if not os.path.exists(os.path.join(data, "truth.parquet")):
            poison_dataset(args.base, data, attack, rate=args.rate, target=args.target, seed=0, options={})
        ckpt = os.path.join(args.out, "models", f"{attack}.pt")
        models[attack] = (ckpt, data, True)
        if "train" in steps:
            def _train(ckpt: str = ckpt, data: str = data) -> dict[str, Any]:
                cfg = cfg_for({"io.train": [f"{data}/train-*.tar"]})
                r = train_model(cfg, ckpt) if not os.path.exists(ckpt) else None
                return {"train_seconds": r.seconds if r else None, **ev(ckpt, data)}
            step(f"{attack}/model", _train)
        if "repair" in steps:
            rep = os.path.join(args.out, "models", f"{attack}-repaired.pt")
            step(f"{attack}/repair", lambda ckpt=ckpt, data=data, rep=rep: {
                "info": {k: v for k, v in repair_model(cfg_for(), ckpt, clean_spec, rep).info.items()
                         if k in ("held_acc_before", "held_acc_after", "steps_done", "n_fit", "n_held", "unlearn")},
                **ev(rep, data)})
        if "cleanse" in steps:
            bcu = os.path.join(args.out, "models", f"{attack}-cleansed.pt")
            step(f"{attack}/cleanse", lambda ckpt=ckpt, data=data, bcu=bcu: {
                "info": {k: v for k, v in cleanse_model(cfg_for(), ckpt, [args.unlabeled], bcu).info.items()
                         if k in ("selected_epoch", "n_fit", "n_held", "reinit_mean", "unlearn")},
                **ev(bcu, data)})
        if "act" in steps:
            def _act(ckpt: str = ckpt, data: str = data) -> dict[str, Any]:
                a = activation_scores(ckpt, [f"{data}/train-*.tar"], [f"{args.base}/clean-*.tar"], cfg_for())
                poison, _ = load_truth(os.path.join(data, "truth.parquet"), a.shard, a.key)
                m = detection_metrics(a.flagged, poison, a.score)
                return {k: m[k] for k in ("tpr", "fpr", "precision", "auroc", "auprc", "n_poison", "n_flagged")}
            step(f"{attack}/act", _act)
    for s in [int(x) for x in args.clean_seeds.split(",") if x != ""]:
        ckpt = os.path.join(args.out, "models", f"clean{s}.pt")
        models[f"clean{s}"] = (ckpt, os.path.join(args.out, "data", args.attacks.split(",")[0]), False)
        if "train" in steps:
            def _trainc(ckpt: str = ckpt, s: int = s) -> dict[str, Any]:
                r = train_model(cfg_for({"io.train": [f"{args.base}/train-*.tar"], "seed": s}), ckpt) \
                    if not os.path.exists(ckpt) else None
                return {"train_seconds": r.seconds if r else None,
                        **ev(ckpt, models[f"clean{s}"][1])}
            step(f"clean{s}/model", _trainc)
    if "audit" in steps:
        for name, (ckpt, _, _) in models.items():
            if os.path.exists(ckpt):
                rep = os.path.join(args.out, "models", f"{name}-repaired.pt")
                ref = rep if f"{name}/repair" in results and os.path.exists(rep) else None
                step(f"{name}/audit", lambda ckpt=ckpt, name=name, ref=ref: {
                    k: v for k, v in audit_model(cfg_for(), ckpt, clean_spec, os.path.join(args.out, "audit", name),
                                                 ref=ref).to_dict().items()
                    if k in ("score", "score_mode", "gap", "target", "backdoored", "per_class")})
        import numpy as np

        names = [n for n in models if f"{n}/audit" in results]
        y = np.array([models[n][2] for n in names])
        sc = np.array([results[f"{n}/audit"]["score"] for n in names])
        # the reference's score (max gap); results stored before audit.score existed hold it as "score"
        gp = np.array([results[f"{n}/audit"].get("gap", results[f"{n}/audit"]["score"]) for n in names])
        results["audit_auroc"] = {"models": names, "auroc": auroc(y, sc), "auroc_gap": auroc(y, gp)}
        save()
    print(_tables(results, args.attacks.split(","), models))
    with open(os.path.join(args.out, "defenses.md"), "w") as f:
        f.write(_tables(results, args.attacks.split(","), models) + "\n")
    return 0


def _tables(results: dict[str, Any], attacks: list[str], models: dict[str, Any]) -> str:
    def f(v: object) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| attack | acc before | ASR before | acc repaired | ASR repaired | acc cleansed | ASR cleansed |",
             "|---|---|---|---|---|---|---|"]
    for a in attacks:
        m, r, c = (results.get(f"{a}/{k}", {}) for k in ("model", "repair", "cleanse"))
        lines.append("| " + " | ".join([a, f(m.get("acc")), f(m.get("asr")), f(r.get("acc")), f(r.get("asr")),
                                        f(c.get("acc")), f(c.get("asr"))]) + " |")
    lines += ["", "| model | backdoored | audit score | score mode | max gap | target |", "|---|---|---|---|---|---|"]
    for n, (_, _, bd) in models.items():
        au = results.get(f"{n}/audit", {})
        lines.append(f"| {n} | {bd} | {f(au.get('score'))} | {au.get('score_mode', 'gap')} | "
                     f"{f(au.get('gap', au.get('score')))} | {f(au.get('target'))} |")
    aa = results.get("audit_auroc") or {}
    lines.append(f"\naudit AUROC: {f(aa.get('auroc'))} (score), {f(aa.get('auroc_gap', aa.get('auroc')))} (max gap)")
    lines += ["", "| attack | act AUROC | TPR | FPR | flagged |", "|---|---|---|---|---|"]
    for a in attacks:
        x = results.get(f"{a}/act", {})
        lines.append(f"| {a} | {f(x.get('auroc'))} | {f(x.get('tpr'))} | {f(x.get('fpr'))} | {f(x.get('n_flagged'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
