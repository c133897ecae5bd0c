"""Detection per attack: CT over every shipped attack + no attack on one base data set (a script).

    python -m ctray.bench.attacks --base DIR --out DIR [--preset small] [--rate 0.01] [--attacks a,b]
        [key=value ...]

``--base`` is a clean set made by ``ctray data`` (train/clean/test shards + manifest). For each attack the
script poisons it (``ctray data poison``), runs ``ctray detect`` with the preset (one run after the
other, each in its own run directory, resumable) and prints a Markdown table of TPR / FPR / precision /
AUROC / time per attack; the no-attack row reports the flag rate. The table is also written to
``OUT/attacks.md`` and ``OUT/attacks.json``. The ``bench`` issue turns this into ``ctray bench``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from ctray.config import parse_overrides
from ctray.data.attacks import ATTACKS

log = logging.getLogger("ctray.bench.attacks")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="small")
    p.add_argument("--rate", type=float, default=0.01)
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--attacks", default="none," + ",".join(ATTACKS))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("ray").setLevel(logging.WARNING)

    from ctray.config import load_config
    from ctray.data.poison import poison_dataset
    from ctray.engine.detect import detect, ensure_ray

    ensure_ray()
    rows = []
    for attack in args.attacks.split(","):
        data = args.base if attack == "none" else os.path.join(args.out, "data", attack)
        if attack != "none" and not os.path.exists(os.path.join(data, "truth.parquet")):
            poison_dataset(args.base, data, attack, rate=args.rate, target=args.target, seed=0, options={})
        ov = {"io.train": [f"{data}/train-*.tar"], "io.clean": [f"{data}/clean-*.tar"],
              "io.out": os.path.join(args.out, "runs", attack)}
        if attack != "none":
            ov["io.truth"] = os.path.join(data, "truth.parquet")
        ov.update(parse_overrides(args.overrides))
        t = time.time()
        res = detect(load_config(args.preset, ov))
        m = (res.metrics or {}).get("ct", {})
        row = {"attack": attack, "n": res.n_usable, "poison": m.get("n_poison", 0), "flagged": res.n_flagged,
               "tpr": m.get("tpr"), "fpr": m.get("fpr"), "precision": m.get("precision"), "auroc": m.get("auroc"),
               "flag_rate": res.n_flagged / max(1, res.n_usable), "cleansed": res.cleansed_classes,
               "seconds": round(time.time() - t, 1)}
        rows.append(row)
        log.info("%s: %s", attack, row)
        with open(os.path.join(args.out, "attacks.json"), "w") as f:
            json.dump(rows, f, indent=2)

    def fmt(v: object) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| attack | poison | flagged | TPR | FPR | precision | AUROC | flag rate | cleansed | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r[k]) for k in ("attack", "poison", "flagged", "tpr", "fpr", "precision",
                                                              "auroc", "flag_rate", "cleansed", "seconds")) + " |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "attacks.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
