"""Quickstart through the Python API: detect the poison in a shard set, look at the evidence, write the
cleansed shards back.

    ctray data fashion-mnist --out data/fm --n-train 10000 --n-clean 1000 --n-test 2000 --shard-size 2500
    ctray data poison --in data/fm --out data/fm-badnet --attack badnet --rate 0.01 --target 0
    python examples/quickstart.py data/fm-badnet runs/quickstart

DATA holds ``train-*.tar`` (the suspect set) and ``clean-*.tar`` (a small trusted reserve); with
``truth.parquet`` beside them (``ctray data poison`` writes it) the run also reports TPR/FPR.
"""

from __future__ import annotations

import argparse
import os

import ctray
from ctray.config import parse_overrides


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--preset", default=None, help="default: chosen from the data (ctray presets)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config fields, as on the CLI")
    args = p.parse_intermixed_args()

    truth = os.path.join(args.data, "truth.parquet")
    res = ctray.detect(f"{args.data}/train-*.tar", f"{args.data}/clean-*.tar", f"{args.out}/run",
                       preset=args.preset, truth=truth if os.path.exists(truth) else None,
                       overrides=parse_overrides(args.overrides))
    print(f"{res.n_flagged} of {res.n_usable} samples flagged; poisoned classes {res.cleansed_classes}")
    if res.decision_metrics:
        m = res.decision_metrics  # CT and the cross-class detector together (res.metrics["ct"]: CT alone)
        print(f"against the truth: TPR {m['tpr']:.3f}, FPR {m['fpr']:.4f}")
    print("most suspicious:", res.ranked(3))
    print("worst shard:", res.shards().iloc[0][["shard", "samples", "flagged"]].to_dict())

    cleansed = ctray.export(res.run_dir, f"{args.out}/cleansed")  # the kept samples, members byte-identical
    print(f"wrote {cleansed.written} samples to {args.out}/cleansed ({cleansed.removed} removed)")


if __name__ == "__main__":
    main()
