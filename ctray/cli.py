"""The only argv parser. ``ctray <command> [options] [key=value ...]``.

Exit codes: 0 ok, 2 usage/config/input error (:class:`~ctray.errors.CtrayError`), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ctray._version import __version__
from ctray.errors import CtrayError

log = logging.getLogger("ctray")

SOURCES = ("fashion-mnist", "digits", "folder", "cifar10", "gtsrb")


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("ray", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.INFO)
    # Ray Data configures its own loggers when imported (after this): ensure_ray reads this to keep its
    # per-dataset execution lines off unless -v
    os.environ["CTRAY_RAY_LOGS"] = "1" if verbose > 1 else "0"


def _not_implemented(name: str) -> int:
    print(f"ctray {name}: not implemented yet (see the open issues)", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------- data


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="make shards from a real data source, or poison a shard set")
    dsub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for name in SOURCES:
        sp = dsub.add_parser(name, help=f"write {name} as WebDataset shards")
        sp.add_argument("--out", required=True, help="output directory")
        sp.add_argument("--n-train", type=int, default=None, help="train samples (default: all)")
        sp.add_argument("--n-clean", type=int, default=None, help="trusted clean reserve, from the test split")
        sp.add_argument("--n-test", type=int, default=None, help="test samples (default: the rest)")
        sp.add_argument("--shard-size", type=int, default=1000)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--train-slice", type=int, default=0, metavar="K",
                        help="take block K of n-train samples of the seed's order of the train pool: slices "
                             "0, 1, ... of one seed are disjoint train sets (a confirmation slice)")
        if name == "folder":
            sp.add_argument("--root", required=True, help="ImageFolder tree: ROOT/<class>/<image>")
            sp.add_argument("--image-size", type=int, default=None, help="resize to SIZE x SIZE")
        if name in ("cifar10", "gtsrb"):
            sp.add_argument("--download", action="store_true",
                            help="allow torchvision to download the data set (needs network)")
            sp.add_argument("--root", default=None, help="torchvision data root")
    pp = dsub.add_parser("poison", help="plant a simulated backdoor attack in a shard set")
    pp.add_argument("--in", dest="in_dir", required=True)
    pp.add_argument("--out", required=True)
    pp.add_argument("--attack", required=True)
    pp.add_argument("--rate", default="0.01", help="poison rate, fraction of the train set; 'paper' = the paper's "
                    "poison and cover rates for the attack (specs/ct.md §3, e.g. badnet 0.003, wanet 0.05 + 0.10 covers)")
    pp.add_argument("--target", type=int, default=0)
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--cover-rate", type=float, default=None, help="cover samples (attacks with covers)")
    pp.add_argument("--concentrate", type=float, default=0.0,
                    help="fraction of the poison planted in one shard (chosen with the seed), e.g. 0.6")
    pp.add_argument("options", nargs="*", help="attack options as key=value (e.g. alpha=0.2)")


def _run_data(args: argparse.Namespace) -> int:
    if args.source == "poison":
        from ctray.data.attacks import resolve_rate
        from ctray.data.poison import poison_dataset

        rate, paper_opts = resolve_rate(args.attack, args.rate)  # "paper": the paper's poison and cover rates
        opts: dict[str, object] = {**paper_opts, **_parse_kv(args.options)}
        if args.cover_rate is not None:
            opts["cover_rate"] = args.cover_rate
        summary = poison_dataset(args.in_dir, args.out, args.attack, rate=rate, target=args.target,
                                 seed=args.seed, options=opts, concentrate=args.concentrate)
    else:
        from ctray.data.sources import make_dataset

        summary = make_dataset(args.source, args.out, n_train=args.n_train, n_clean=args.n_clean,
                               n_test=args.n_test, shard_size=args.shard_size, seed=args.seed,
                               root=getattr(args, "root", None), download=getattr(args, "download", False),
                               image_size=getattr(args, "image_size", None), train_slice=args.train_slice)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def _parse_kv(items: Sequence[str]) -> dict[str, object]:
    import yaml

    from ctray.errors import ConfigError

    out: dict[str, object] = {}
    for it in items:
        if "=" not in it:
            raise ConfigError(f"expected key=value, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


# -------------------------------------------------------------------------------------- detect & co


def _add_run_options(p: argparse.ArgumentParser, need_io: bool) -> None:
    if need_io:
        p.add_argument("--train", action="append", required=True, metavar="SHARDS",
                       help="suspect shards: dir, glob, brace pattern, s3:// or gs:// (repeatable)")
        p.add_argument("--clean", action="append", required=True, metavar="SHARDS",
                       help="trusted clean reserve shards (repeatable)")
        p.add_argument("--out", required=True, help="run directory (re-running with it resumes)")
        p.add_argument("--truth", default=None, help="ground truth parquet/csv (shard, key, poison[, cover])")
        p.add_argument("--fbase", default=None, metavar="CKPT",
                       help="use this f_base (a ctray model file of base.arch, e.g. from `ctray train` or a run's "
                            "checkpoints/round_0/fbase.pt) instead of training one: base.checkpoint")
    p.add_argument("--preset", default=None, help="named preset (ctray presets); default: chosen from the data")
    p.add_argument("--config", default=None, help="YAML config (e.g. a sweep's best.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override any config field, e.g. ct.lam=[20,20,20,30,30,15]")


def _overrides_from(args: argparse.Namespace) -> dict[str, object]:
    from ctray.config import parse_overrides

    ov: dict[str, object] = {}
    if getattr(args, "train", None):
        ov["io.train"] = list(args.train)
        ov["io.clean"] = list(args.clean)
        ov["io.out"] = args.out
        if args.truth:
            ov["io.truth"] = args.truth
        if getattr(args, "fbase", None):
            ov["base.checkpoint"] = args.fbase
    ov.update(parse_overrides(args.overrides))
    return ov


def _print_result(res: object, as_json: bool = False) -> None:
    from ctray.engine.results import DetectResult

    assert isinstance(res, DetectResult)
    if as_json:  # one JSON object on stdout (CI): the counts, the decision and the metrics
        print(json.dumps({"run_dir": res.run_dir, "read": res.n_read, "usable": res.n_usable,
                          "quarantined": res.n_quarantined, "flagged": res.n_flagged,
                          "cleansed_classes": res.cleansed_classes, "weak_classes": res.weak_classes,
                          "metrics": res.decision_metrics, "metrics_by_detector": {
                              k: v for k, v in (res.metrics or {}).items() if k in ("ct", "xclass")} or None,
                          "xclass": res.xclass, "seconds": round(res.seconds.get("total", 0), 1)}))
        return
    line = (f"read {res.n_read} samples: {res.n_usable} usable, {res.n_quarantined} quarantined; "
            f"flagged {res.n_flagged} (CT: classes {res.cleansed_classes}")
    x = res.xclass
    if x is not None:
        line += (f"; cross-class detector: {x['k']} samples" if x["attack"] else
                 f"; cross-class detector: none, {x['k']} crossings where the reserve predicts {x['expected']:.1f}")
    line += ")"
    if res.weak_classes:
        line += f"; weak evidence for classes {res.weak_classes} (likelihood ratio < decide.weak_lr: inspect)"
    if res.vetoed_classes:
        line += (f"; not cleansed: classes {res.vetoed_classes} (weak evidence that earlier rounds do not "
                 "corroborate: decide.corroborate)")
    print(line)
    if res.metrics:
        for name, m in (("decision", res.decision_metrics), ("CT alone", res.metrics["ct"] if x else None)):
            if m:
                fmt = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in m.items()}
                print(f"metrics ({name}): " + ", ".join(f"{k}={fmt[k]}" for k in ("tpr", "fpr", "precision", "f1",
                                                                                  "auroc", "auprc")))
    print(f"wall time {res.seconds.get('total', 0):.0f}s; run directory: {res.run_dir} (report.html)")


def _run_detect(args: argparse.Namespace) -> int:
    from ctray.engine.detect import run_detect

    res = run_detect(args.preset, _overrides_from(args), args.config)
    _print_result(res, args.json)
    return 0


def _run_validate(args: argparse.Namespace) -> int:
    from ctray.config import load_config

    cfg = load_config(args.preset or None, _overrides_from(args), args.config)
    print(cfg.to_yaml(), end="")
    return 0


def _run_presets(args: argparse.Namespace) -> int:
    from ctray.config import Config, list_presets, load_config, load_preset, parse_overrides
    from ctray.core.cost import ScheduleCost, schedule_cost

    if args.verbose_presets:
        for name in list_presets():
            print(f"{name}: {load_preset(name)}")
        return 0
    n = int(args.n)
    rows = []
    ov = parse_overrides(args.overrides)

    def cost_of(c: Config) -> ScheduleCost:
        return schedule_cost(c.base.epochs, c.ct.pretrain_epochs, c.ct.keep_ratio, c.ct.iters, c.ct.batch_size,
                             c.xclass.enabled, c.base.max_samples, n, bool(c.base.checkpoint), c.ct.pretrain_ref_n)

    ref = cost_of(load_config("reference-cifar"))  # the paper's schedule as published, without the overrides
    for name in list_presets():
        c = load_config(name, ov)
        cost = cost_of(c)
        rows.append((name, c, cost))
    print(f"Cost per preset at N = {n:,} (training passes over D grow with N; confusion samples do not):")
    print(f"{'preset':<24} {'models (f_base / CT)':<28} {'train passes':>12} {'f_base':>7} {'pretrain':>8} "
          f"{'confusion samples':>17} {'forward passes':>14} {'vs reference':>12}")
    for name, c, cost in rows:
        rel = f"1/{ref.sample_steps(n) / cost.sample_steps(n):.0f}" if cost != ref else "1"
        print(f"{name:<24} {c.base.arch + ' / ' + c.ct.arch:<28} {cost.train_passes:>12.1f} {cost.fbase_passes:>7.1f} "
              f"{cost.pretrain_passes:>8.1f} {cost.confusion_samples:>17,} {cost.forward_passes:>14} {rel:>12}")
    print("(vs reference: all training samples through the model at this N; floors n_c // floor_k left out; "
          "`ctray presets --yaml` prints the presets themselves)")
    _print_steps_and_checkpoints(n, rows)
    return 0


def _print_steps_and_checkpoints(n: int, rows: list[tuple[str, Any, Any]]) -> None:
    """The second table of ``ctray presets``: sequential steps and in-round checkpoint volume at N."""
    from ctray.core.cost import checkpoint_bytes, schedule_steps
    from ctray.models import build_model

    params: dict[str, int] = {}

    def n_params(arch: str) -> int:  # 3 channels, 10 classes, 32 px: within 1% of other sizes for these models
        if arch not in params:
            params[arch] = sum(p.numel() for p in build_model(arch, 3, 10, 32).parameters())
        return params[arch]

    print(f"\nSteps and in-round checkpoints at N = {n:,} (steps: sequential global batches; MB per checkpoint "
          "in the f_base phase / in CT's phases: the model in training + its optimizer; before, CT's also "
          "carried f_base and the round's base):")
    print(f"{'preset':<24} {'steps':>12} {'f_base':>11} {'pretrain':>11} {'confusion':>9} {'MB f_base / CT':>15} "
          f"{'CT before':>9} {'every 2,000 steps (before)':>27}")
    for name, c, _ in rows:
        st = schedule_steps(n, c.base.epochs, c.base.batch_size, c.ct.pretrain_epochs, c.ct.pretrain_batch_size,
                            c.ct.keep_ratio, c.ct.iters, c.base.max_samples, bool(c.base.checkpoint),
                            c.ct.batch_scale, c.ct.pretrain_ref_n)
        fb_mb, ct_mb = checkpoint_bytes(n_params(c.base.arch)) / 1e6, checkpoint_bytes(n_params(c.ct.arch)) / 1e6
        before = checkpoint_bytes(n_params(c.ct.arch), n_params(c.base.arch) + n_params(c.ct.arch)) / 1e6
        count = st.fbase // 2000 + (st.pretrain + st.confusion) // 2000
        gb = (st.fbase // 2000 * fb_mb + (st.pretrain + st.confusion) // 2000 * before) / 1e3
        print(f"{name:<24} {st.total:>12,} {st.fbase:>11,} {st.pretrain:>11,} {st.confusion:>9,} "
              f"{f'{fb_mb:.1f} / {ct_mb:.1f}':>15} {before:>9.1f} {f'{count:,} x, {gb:,.1f} GB':>27}")
    print("(now: scale.checkpoint_minutes (10) of wall time apart, 6 an hour whatever N, plus one per phase end; "
          "MB for float32 weights + SGD momentum)")


def _run_report(args: argparse.Namespace) -> int:
    from ctray.report import write_report

    print(write_report(args.run_dir))
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    import os

    from ctray.config import parse_overrides
    from ctray.data.poison import poison_dataset
    from ctray.data.sources import make_dataset
    from ctray.engine.detect import run_detect
    from ctray.errors import RunDirMismatchError

    out = os.path.abspath(args.out)
    clean_dir, data_dir, run_dir = (os.path.join(out, d) for d in ("fashion-mnist", f"fashion-mnist-{args.attack}", "run"))
    if not os.path.exists(os.path.join(data_dir, "truth.parquet")):
        log.info("demo: writing %d real Fashion-MNIST samples as shards to %s", args.n_train, clean_dir)
        make_dataset("fashion-mnist", clean_dir, n_train=args.n_train, n_clean=args.n_clean, n_test=args.n_test,
                     shard_size=args.shard_size, seed=args.seed)
        log.info("demo: planting %s at rate %.3g (target %d) -> %s", args.attack, args.rate, args.target, data_dir)
        poison_dataset(clean_dir, data_dir, args.attack, rate=args.rate, target=args.target, seed=args.seed, options={})
    # local mode by default: one machine, and no ~12 s worker start-up per round (README "Measured figures")
    ov: dict[str, object] = {"io.train": [data_dir + "/train-*.tar"], "io.clean": [data_dir + "/clean-*.tar"],
                             "io.out": run_dir, "io.truth": os.path.join(data_dir, "truth.parquet"),
                             "scale.num_workers": 0}
    ov.update(parse_overrides(args.overrides))
    try:
        res = run_detect(args.preset, ov, None)
    except RunDirMismatchError:
        # an earlier demo made with another config (other overrides, or a preset changed by an upgrade):
        # keep it under a new name rather than fail `make demo` or delete someone's results
        n = 1
        while os.path.exists(f"{run_dir}.previous-{n}"):
            n += 1
        log.warning("demo: %s holds a run with another config; moved it to %s.previous-%d and starting over",
                    run_dir, run_dir, n)
        os.rename(run_dir, f"{run_dir}.previous-{n}")
        res = run_detect(args.preset, ov, None)
    _print_result(res)
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from ctray.config import load_config, parse_overrides
    from ctray.engine.train import train_model

    ov: dict[str, object] = {"io.train": list(args.train)}
    ov.update(parse_overrides(args.overrides))
    cfg = load_config(args.preset or "small", ov, args.config)
    exclude = None
    if args.exclude:
        from ctray import io as cio

        t = cio.read_parquet(args.exclude).to_pandas()
        for col in ("flagged", "poison"):  # a run's scores.parquet / a truth.parquet: leave out those rows
            if col in t.columns:
                t = t[t[col].astype(bool)]
                break
        exclude = list(zip(t["shard"].astype(str), t["key"].astype(str), strict=True))
    res = train_model(cfg, args.out, exclude=exclude)
    print(json.dumps({"ckpt": res.ckpt, "n_train": res.n_train, "n_excluded": res.n_excluded,
                      "seconds": round(res.seconds, 1)}))
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from ctray.engine.train import evaluate

    res = evaluate(args.model, args.test, args.triggered, args.target)
    d = res.to_dict()
    if args.json:
        print(json.dumps({"acc": d["acc"], "asr": d["asr"]}))
    else:
        acc = "-" if d["acc"] is None else f"{d['acc']:.4f}"
        asr = "-" if d["asr"] is None else f"{d['asr']:.4f}"
        print(f"acc {acc} on {d['n_test']} test samples; asr {asr} on {d['n_triggered']} triggered samples"
              f" ({d['n_quarantined']} quarantined)")
    return 0


def _add_train_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a plain model (f_base's recipe, cfg.base) on shards")
    p.add_argument("--train", action="append", required=True, metavar="SHARDS", help="train shards (repeatable)")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint file to write (.pt)")
    p.add_argument("--exclude", default=None, metavar="PARQUET",
                   help="leave out samples: a run's scores.parquet (its flagged rows), a truth.parquet (its poison rows) "
                   "or any shard,key table")
    p.add_argument("--preset", default=None, help="preset whose base.* recipe to use (default: small)")
    p.add_argument("--config", default=None, help="YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. base.epochs=20 base.arch=resnet18")
    p.set_defaults(func=_run_train)
    p = sub.add_parser("evaluate", help="clean accuracy and attack success rate of a checkpoint")
    p.add_argument("--model", required=True, metavar="CKPT")
    p.add_argument("--test", action="append", default=None, metavar="SHARDS", help="clean test shards")
    p.add_argument("--triggered", action="append", default=None, metavar="SHARDS",
                   help="triggered test shards (ctray data poison writes test-triggered-*.tar)")
    p.add_argument("--target", type=int, default=None, help="attack target when the shards' .json name none")
    p.add_argument("--json", action="store_true", help='print {"acc": ..., "asr": ...}')
    p.set_defaults(func=_run_evaluate)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="compare CT with baseline detectors (SS, AC, STRIP, SCAn) on one data set "
                       "or a grid of attacks; writes bench.parquet, bench.md, bench.png")
    g = p.add_argument_group("one data set")
    g.add_argument("--train", action="append", metavar="SHARDS", help="suspect shards (repeatable)")
    g.add_argument("--clean", action="append", metavar="SHARDS", help="trusted clean reserve shards (repeatable)")
    g.add_argument("--truth", default=None, help="ground truth parquet/csv (shard, key, poison[, cover])")
    g.add_argument("--test", action="append", default=None, metavar="SHARDS",
                   help="clean test shards for --retrain (default: test-0*.tar beside the train shards)")
    g.add_argument("--triggered", action="append", default=None, metavar="SHARDS",
                   help="triggered test shards for --retrain (default: test-triggered-*.tar beside them)")
    g.add_argument("--name", default=None, help="row label (default: the truth's attack, else 'data')")
    g = p.add_argument_group("grid over attacks")
    g.add_argument("--base", default=None, metavar="DATA_DIR", help="a clean set made by `ctray data`")
    g.add_argument("--attacks", default=None, help="comma list of attacks, or 'all'; a 'none' cell is added")
    g.add_argument("--rate", default="0.01", help="poison rate of every attack, or 'paper': each attack at the "
                   "paper's poison and cover rates (attacks outside the paper's grid at 0.01)")
    g.add_argument("--target", type=int, default=0, help="attack target class")
    g.add_argument("--seed", type=int, default=0, help="poisoning seed")
    p.add_argument("--out", required=True, help="bench directory (re-running with it skips finished work)")
    p.add_argument("--methods", default="ct,ss,ac,strip,scan,act,xclass,ct+xclass",
                   help="comma list of ct, ss, ac, strip, scan, act (activation statistics), xclass (the cross-class "
                        "detector) and ct+xclass (the decision of ctray detect: both); xclass rows need ct")
    p.add_argument("--preset", default=None, help="preset for every cell (default: chosen from the data)")
    p.add_argument("--retrain", action="store_true",
                   help="retrain on each method's kept samples and report acc / asr (one training per method)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. bench.strip_n=20")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from ctray.config import parse_overrides
    from ctray.engine.bench import bench

    if args.attacks and not args.base:
        from ctray.errors import ConfigError

        raise ConfigError("--attacks needs --base DATA_DIR")
    res = bench(args.out, train=args.train, clean=args.clean, truth=args.truth, test=args.test,
                triggered=args.triggered, name=args.name, base=args.base, attacks=args.attacks or "all",
                rate=args.rate, target=args.target, poison_seed=args.seed,
                methods=[m.strip() for m in args.methods.split(",") if m.strip()], preset=args.preset,
                overrides=parse_overrides(args.overrides), retrain=args.retrain)
    with open(res.markdown) as f:
        print(f.read(), end="")
    print(f"wall time {res.seconds:.0f}s; {res.parquet}, {res.markdown}, {res.plot}")
    return 0


# ------------------------------------------------------------------------------ model-level defenses


def _add_defense_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="preset whose defense schedule to use (default: small)")
    p.add_argument("--config", default=None, help="YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. repair.steps=300 cleanse.epochs=20")


def _defense_cfg(args: argparse.Namespace) -> object:
    from ctray.config import load_config, parse_overrides

    return load_config(args.preset or "small", parse_overrides(args.overrides), args.config)


def _add_repair(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("repair", help="Pivotal Tuning: repair a backdoored model with a small trusted labelled set")
    p.add_argument("--model", required=True, metavar="CKPT", help="suspect model (ctray checkpoint)")
    p.add_argument("--clean", action="append", required=True, metavar="SHARDS",
                   help="trusted labelled shards (about 1%% of the training size; repeatable)")
    p.add_argument("--out", required=True, metavar="CKPT2", help="repaired checkpoint to write")
    _add_defense_config(p)
    p.set_defaults(func=_run_repair)


def _run_repair(args: argparse.Namespace) -> int:
    from ctray.engine.defenses import repair_model

    res = repair_model(_defense_cfg(args), args.model, args.clean, args.out)  # type: ignore[arg-type]
    i = res.info
    print(json.dumps({"ckpt": res.ckpt, "n_fit": res.n_fit, "n_held": res.n_held, "steps_done": i.get("steps_done"),
                      "stopped_early": i.get("stopped_early"), "held_acc_before": i.get("held_acc_before"),
                      "held_acc_after": i.get("held_acc_after"), "seconds": round(res.seconds, 1),
                      **({"unlearn": i["unlearn"]} if "unlearn" in i else {})}))
    return 0


def _add_cleanse(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cleanse-model", help="BCU: cleanse a backdoored model by distillation on unlabeled images")
    p.add_argument("--model", required=True, metavar="CKPT", help="suspect model (ctray checkpoint)")
    p.add_argument("--unlabeled", action="append", required=True, metavar="SHARDS",
                   help="unlabeled (possibly out-of-distribution) image shards; labels are ignored (repeatable)")
    p.add_argument("--out", required=True, metavar="CKPT2", help="cleansed checkpoint to write")
    _add_defense_config(p)
    p.set_defaults(func=_run_cleanse)


def _run_cleanse(args: argparse.Namespace) -> int:
    from ctray.engine.defenses import cleanse_model

    res = cleanse_model(_defense_cfg(args), args.model, args.unlabeled, args.out)  # type: ignore[arg-type]
    hist = res.info.get("history") or [{}]
    print(json.dumps({"ckpt": res.ckpt, "n_fit": res.n_fit, "n_held": res.n_held,
                      "epochs": len(res.info.get("history") or []), "selected_epoch": res.info.get("selected_epoch"),
                      "held_agree_last": hist[-1].get("held_agree"), "reinit_mean": res.info.get("reinit_mean"),
                      "seconds": round(res.seconds, 1),
                      **({"unlearn": res.info["unlearn"]} if "unlearn" in res.info else {})}))
    return 0


def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="Calibrated Trigger Inversion: is a model backdoored, and to which class?")
    p.add_argument("--model", required=True, metavar="CKPT", help="suspect model (ctray checkpoint)")
    p.add_argument("--clean", action="append", required=True, metavar="SHARDS", help="trusted labelled shards")
    p.add_argument("--out", default=None, metavar="DIR", help="write audit.json and the inverted triggers (PNG) here")
    p.add_argument("--ref", default=None, metavar="CKPT", help="an existing pivotal-tuned reference (skips the repair)")
    p.add_argument("--cache", default=None, metavar="DIR", help="reference-model cache (default OUT/ref-cache)")
    p.add_argument("--json", action="store_true", help='print {"score", "target", "per_class": [...], ...}')
    _add_defense_config(p)
    p.set_defaults(func=_run_audit)


def _run_audit(args: argparse.Namespace) -> int:
    from ctray.engine.defenses import audit_model

    res = audit_model(_defense_cfg(args), args.model, args.clean, args.out, args.ref, args.cache)  # type: ignore[arg-type]
    if args.json:
        d = res.to_dict()
        print(json.dumps({k: d[k] for k in ("score", "score_mode", "gap", "target", "per_class", "backdoored",
                                             "threshold", "reference_score", "ref_ckpt", "n_opt", "n_eval", "n_read",
                                             "labels")}))
    else:
        what = "max success gap" if res.score_mode == "gap" else "max gap x median trigger size / trigger size"
        print(f"score {res.score:.4f} ({what}; higher = more suspicious), target class {res.target}, "
              f"backdoored: {res.backdoored} (threshold {res.threshold}); max success gap {res.gap:.4f}")
        for r in res.per_class:
            print(f"  class {r['class']}: score {r['score']:+.3f}, gap {r['gap']:+.3f} (asr model {r['asr_model']:.3f}, "
                  f"reference {r['asr_ref']:.3f}), trigger size {r['trigger_l1']:.4f}")
        if args.out:
            print(f"triggers and audit.json in {args.out}")
    return 0


def _add_act(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("act-score", help="activation statistics (BadActs): score samples by out-of-interval activations")
    p.add_argument("--model", required=True, metavar="CKPT", help="model trained on the suspect data")
    p.add_argument("--train", action="append", required=True, metavar="SHARDS", help="shards to score (repeatable)")
    p.add_argument("--clean", action="append", required=True, metavar="SHARDS",
                   help="trusted clean shards: half fits the intervals, half sets the threshold")
    p.add_argument("--out", required=True, metavar="PARQUET", help="scores: shard, key, score, flagged (+ truth)")
    p.add_argument("--truth", default=None, help="ground truth parquet/csv: adds TPR/FPR/AUROC")
    _add_defense_config(p)
    p.set_defaults(func=_run_act)
    p = sub.add_parser("purify", help="learn BadActs activation-clamping bounds on trusted data; evaluate")
    p.add_argument("--model", required=True, metavar="CKPT")
    p.add_argument("--clean", action="append", required=True, metavar="SHARDS", help="trusted labelled shards")
    p.add_argument("--out", required=True, metavar="CKPT2", help="checkpoint with the clamp bounds")
    p.add_argument("--test", action="append", default=None, metavar="SHARDS", help="clean test shards to evaluate on")
    p.add_argument("--triggered", action="append", default=None, metavar="SHARDS", help="triggered test shards")
    _add_defense_config(p)
    p.set_defaults(func=_run_purify)


def _run_act(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from ctray import io as cio
    from ctray.engine.activations import activation_scores

    res = activation_scores(args.model, args.train, args.clean, _defense_cfg(args))  # type: ignore[arg-type]
    table = res.to_table()
    out = {"n": len(res.score), "flagged": int(res.flagged.sum()), "threshold": res.threshold, "n_fit": res.n_fit,
           "n_calib": res.n_calib, "seconds": round(res.seconds, 1)}
    if args.truth:
        from ctray.core.metrics import detection_metrics
        from ctray.engine.ground import load_truth

        poison, _ = load_truth(args.truth, res.shard, res.key)
        table = table.append_column("truth_poison", pa.array(poison))
        m = detection_metrics(res.flagged, poison, res.score)
        out.update({k: m[k] for k in ("tpr", "fpr", "precision", "auroc", "auprc", "n_poison")})
    cio.write_parquet(args.out, table)
    print(json.dumps(out))
    return 0


def _run_purify(args: argparse.Namespace) -> int:
    from ctray.engine.activations import evaluate_purified, purify_model

    cfg = _defense_cfg(args)
    res = purify_model(cfg, args.model, args.clean, args.out)  # type: ignore[arg-type]
    out: dict[str, object] = {"ckpt": res.ckpt, **res.info, "seconds": round(res.seconds, 1)}
    if args.test or args.triggered:
        out["eval"] = evaluate_purified(args.out, args.test, args.triggered, cfg.data)  # type: ignore[attr-defined]
    print(json.dumps(out))
    return 0


def _add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("detect", help="run Confusion Training over shards and write a run directory")
    _add_run_options(p, True)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout (for CI)")
    p.set_defaults(func=_run_detect)
    p = sub.add_parser("validate", help="resolve and check a config; print it as YAML")
    _add_run_options(p, False)
    p.set_defaults(func=_run_validate)
    p = sub.add_parser("demo", help="the main job on embedded real data: shard, poison, detect, report")
    p.add_argument("--out", default="demo-run", help="demo directory (data + run); re-running resumes; a run made with another config is moved to run.previous-N")
    p.add_argument("--n-train", type=int, default=10000)
    p.add_argument("--n-clean", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--shard-size", type=int, default=2500)
    p.add_argument("--attack", default="badnet")
    p.add_argument("--rate", type=float, default=0.01)
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    # small-cnn, not the data's default (small): the demo plants a patch trigger, which small-cnn finds in
    # ~5 min here; `small` (narrow ResNet-18, needed for blend-like triggers) took 12 min, too close to the
    # demo's 15-minute budget on a shared 2-core machine (README "Demo")
    p.add_argument("--preset", default="small-cnn",
                   help="default small-cnn (fast, patch triggers); --preset small for blend-like --attack")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_run_demo)
    _add_train_eval(sub)
    _add_repair(sub)
    _add_audit(sub)
    _add_cleanse(sub)
    _add_act(sub)
    p = sub.add_parser("report", help="(re)write report.html of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=_run_report)
    p = sub.add_parser("presets", help="list the named presets and what each costs at a given N")
    p.add_argument("--n", default="1000000", help="training set size for the cost table (default 1,000,000)")
    p.add_argument("--yaml", dest="verbose_presets", action="store_true", help="print each preset's settings")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="applied to every preset, e.g. base.max_samples=200000 (f_base on a sample)")
    p.set_defaults(func=_run_presets)
    _add_bench(sub)
    _add_sweep(sub)
    _add_export(sub)


# -------------------------------------------------------------------------------------------- export


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the kept (or flagged) samples of a finished run as WebDataset shards")
    p.add_argument("run_dir", metavar="RUN", help="a finished run directory (local, s3:// or gs://)")
    p.add_argument("--out", required=True, metavar="DIR", help="new or empty output directory (local, s3:// or gs://)")
    p.add_argument("--flagged", action="store_true", help="write the flagged samples instead of the kept ones")
    p.add_argument("--ray", action="store_true",
                   help="one Ray task per shard (attaches to RAY_ADDRESS or starts a local Ray); default: in-process")
    p.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                   help="seconds between progress lines (default 10)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from ctray.engine.export import export_run

    if args.ray:
        from ctray.engine.cluster import ensure_ray

        ensure_ray()
    res = export_run(args.run_dir, args.out, which="flagged" if args.flagged else "kept", use_ray=args.ray,
                     progress_every_s=args.progress_every)
    print(f"read {res.read} samples: {res.kept} kept, {res.removed} removed (flagged), {res.quarantined} quarantined"
          f"{f', {res.shard_failures} shard failures' if res.shard_failures else ''}; wrote {res.written} {res.which} "
          f"samples to {res.out}{f' ({res.renamed} unsafe keys renamed)' if res.renamed else ''}; manifest {res.manifest}")
    return 0


# --------------------------------------------------------------------------------------------- sweep


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="Ray Tune search over CT's knobs (canary objective, or F1 with --truth)")
    p.add_argument("--train", action="append", required=True, metavar="SHARDS", help="suspect shards (repeatable)")
    p.add_argument("--clean", action="append", required=True, metavar="SHARDS", help="trusted clean reserve shards")
    p.add_argument("--out", required=True, help="sweep directory: trials.parquet, best.yaml, objective.png, trials/")
    p.add_argument("--truth", default=None, help="ground truth (shard, key, poison): objective = F1 of the flagged set")
    p.add_argument("--num-samples", type=int, default=None, help="trials (default: sweep.num_samples)")
    p.add_argument("--preset", default=None, help="preset the trials start from; default: chosen from the data")
    p.add_argument("--space", default=None, help="YAML search space (default: the built-in space, see docs/sweep.md)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="applied to every trial (e.g. ct.iters=[200,200,200,200,100,100]); sweep.* tune the sweep")
    p.set_defaults(func=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> int:
    import math

    from ctray.config import parse_overrides
    from ctray.engine.sweep import sweep

    res = sweep(args.train, args.clean, args.out, truth=args.truth, num_samples=args.num_samples, preset=args.preset,
                space=args.space, overrides=parse_overrides(args.overrides))

    def f(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else "-"

    print(f"{'trial':<14} {'status':<8} {res.objective:>9} {'canary_rec':>10} {'flag_rate':>9} {'tpr':>7} "
          f"{'fpr':>7} {'f1':>7} {'seconds':>8} {'f_base':>8} {'base_0':>8} {'can_fit':>7}")
    for r in res.trials:
        print(f"{r['trial']:<14} {r['status']:<8} {f(r['objective']):>9} {f(r['canary_recall']):>10} "
              f"{f(r['flag_rate']):>9} {f(r['tpr']):>7} {f(r['fpr']):>7} {f(r['f1']):>7} {f(r['seconds']):>8} "
              f"{r.get('fbase_from') or '-':>8} {r.get('base0_from') or '-':>8} {f(r.get('canary_fit_base0')):>7}")
    if res.reuse:
        u = res.reuse
        print(f"shared phases: f_base trained by {u['fbase_trained']} run(s), reused by {u['fbase_cache']}; "
              f"round 0's pretraining trained by {u['base0_trained']}, reused by {u['base0_cache']}")
    if res.warning:
        print(f"NO RECOMMENDATION: {res.warning}")
    else:
        print(f"best: trial {res.best['trial']} {res.objective}={f(res.best['objective'])} "
              f"(tpr {f(res.best['tpr'])}, fpr {f(res.best['fpr'])}); settings {res.best['overrides']}")
    if res.baseline is not None:
        b = res.baseline
        print(f"preset unchanged (baseline): {res.objective}={f(b['objective'])} (tpr {f(b['tpr'])}, fpr {f(b['fpr'])})")
    print(f"wall time {res.seconds:.0f}s; wrote {res.out_dir}/trials.parquet, {res.best_config}, {res.plot}")
    return 0


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctray", description="Find backdoor-poisoned samples with Confusion Training on Ray.")
    p.add_argument("--version", action="version", version=f"ctray {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=1)
    p.add_argument("-q", "--quiet", action="store_const", const=0, dest="verbose")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data(sub)
    sub.choices["data"].set_defaults(func=_run_data)
    _add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except CtrayError as e:
        # Ray re-raises a worker's DataError as RayTaskError(DataError): print the clean cause
        print(f"ctray {args.command}: error: {getattr(e, 'cause', None) or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:
        log.exception("ctray %s failed", args.command)
        return 1


if __name__ == "__main__":
    sys.exit(main())
