"""A sweep of CT's knobs with Ray Tune through the Python API, then a detection with the recommended config.

    ctray data fashion-mnist --out data/fm --n-train 10000 --n-clean 1000 --n-test 2000 --shard-size 2500
    ctray data poison --in data/fm --out data/fm-blend --attack blend --rate 0.01 --target 0
    python examples/sweep.py data/fm-blend runs/sweep --trials 8

Without ``--truth`` the trials are ranked by the defender canaries ctray plants (no ground truth needed:
what a real user has); with it (``--truth data/fm-blend/truth.parquet``) by F1 of the flagged set. The
sweep writes trials.parquet, best.yaml (the recommended config, machine keys left out) and objective.png;
``--detect`` then runs ``ctray.detect`` with best.yaml, as ``ctray detect --config OUT/best.yaml`` would.
On a cluster, trials run in parallel on its nodes (sweep.max_concurrent; docs/sweep.md).
"""

from __future__ import annotations

import argparse
import math

import ctray
from ctray.config import parse_overrides


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="a directory with train-*.tar and clean-*.tar")
    p.add_argument("out")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--truth", default=None, help="truth.parquet: rank trials by F1 instead of the canaries")
    p.add_argument("--detect", action="store_true", help="then detect with the recommended config")
    p.add_argument("--preset", default=None, help="the preset the trials start from (default: chosen from the data)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every trial, as on the CLI")
    args = p.parse_intermixed_args()

    ov = parse_overrides(args.overrides)
    res = ctray.sweep(f"{args.data}/train-*.tar", f"{args.data}/clean-*.tar", f"{args.out}/sweep", truth=args.truth,
                      num_samples=args.trials, preset=args.preset, overrides=ov)

    def f(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) and math.isfinite(v) else "-"

    for r in res.trials:  # the trials, then the preset unchanged (sweep.baseline)
        print(f"{r['trial']:<14} {r['status']:<10} {res.objective} {f(r['objective'])}  flag rate {f(r['flag_rate'])}")
    if res.warning:  # the canaries could not rank the trials: best.yaml keeps the preset as it is
        print(f"no recommendation: {res.warning}")
    else:
        print(f"best trial {res.best['trial']}: {res.objective} {f(res.best['objective'])}, "
              f"settings {res.best['overrides']}")
    print(f"recommended config: {res.best_config}")

    if args.detect:
        run = ctray.detect(f"{args.data}/train-*.tar", f"{args.data}/clean-*.tar", f"{args.out}/run",
                           config=res.best_config, overrides=ov)
        print(f"detect with it: {run.n_flagged} of {run.n_usable} samples flagged; classes {run.cleansed_classes}")


if __name__ == "__main__":
    main()
