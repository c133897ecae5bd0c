"""Model-level defenses through the Python API: train a model on suspect data, audit it for a backdoor,
repair it with a small trusted set, and measure accuracy and attack success before and after.

    ctray data fashion-mnist --out data/fm --n-train 10000 --n-clean 1000 --n-test 2000 --shard-size 2500
    ctray data poison --in data/fm --out data/fm-badnet --attack badnet --rate 0.05 --target 0
    python examples/audit_repair.py data/fm-badnet runs/defend

The audit (Calibrated Trigger Inversion) answers "is this model backdoored, and to which class?" with a
score (higher = more suspicious) and the inverted triggers as PNGs; the repair (Pivotal Tuning) fine-tunes
the model on ``clean-*.tar`` away from its backdoor. ``test-*.tar`` and ``test-triggered-*.tar`` (written
by ``ctray data poison``) measure clean accuracy and attack success rate (ASR). Schedules: ``--preset``
(default ``small``; ``defend-resnet18-narrow`` is the measured ResNet-18 recipe, with
``base.arch=resnet18-narrow``). To use CT's findings instead, train without the flagged samples:
``ctray.train(..., exclude=ctray.open_run(RUN).flagged_keys)``.
"""

from __future__ import annotations

import argparse

import ctray
from ctray.config import parse_overrides


def _show(name: str, ev: object) -> None:
    acc, asr = ev.acc, ev.asr  # type: ignore[attr-defined]
    print(f"{name:<10} clean accuracy {acc:.3f}, attack success rate {asr:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="train-*.tar, clean-*.tar, test-*.tar, test-triggered-*.tar")
    p.add_argument("out")
    p.add_argument("--preset", default=None, help="defense schedules (default: small)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config fields (base.*, audit.*, repair.*)")
    args = p.parse_intermixed_args()
    ov = parse_overrides(args.overrides)
    d, out = args.data, args.out
    test, triggered = f"{d}/test-0*.tar", f"{d}/test-triggered-*.tar"

    model = ctray.train(f"{d}/train-*.tar", f"{out}/model.pt", preset=args.preset, overrides=ov).ckpt
    _show("suspect", ctray.evaluate(model, test, triggered))

    audit = ctray.audit(model, f"{d}/clean-*.tar", f"{out}/audit", preset=args.preset, overrides=ov)
    print(f"audit: score {audit.score:.2f} (threshold {audit.threshold}), backdoored {audit.backdoored}, "
          f"likely target class {audit.target}; triggers in {out}/audit")

    fixed = ctray.repair(model, f"{d}/clean-*.tar", f"{out}/repaired.pt", preset=args.preset, overrides=ov)
    _show("repaired", ctray.evaluate(fixed.ckpt, test, triggered))


if __name__ == "__main__":
    main()
