"""Scoring throughput on the same shards: CPU against GPU, fp32 against reduced precision.

``python -m ctray.benchmarks.scoring [--n 20000] [--arch resnet18-narrow] [--work scoring-bench]``

Writes (or reuses) the scale benchmark's N-sample 64x64 RGB set (:func:`ctray.benchmarks.scale.make_data`),
decodes it once into the object store (so every mode scores the same blocks and decode is timed apart),
and scores it with the engine's scoring pass (:func:`ctray.engine.score.score_dataset`: the Ray Data
``map_batches`` that every CT round runs) in each mode the machine has:

  cpu fp32   ``data.score_cpus`` = the machine's cores, batch 512 (the default)
  cpu bf16   the same under CPU autocast (``data.score_precision=bf16``)
  gpu auto   ``data.score_gpus=1``, batch ``--gpu-batch`` (2048), bf16 autocast, channels-last, pinned input
  gpu fp32   the same in fp32

Each mode runs twice and the second (warm: worker processes and the model cache up) is reported, as
img/s and as a ratio to cpu fp32. A last row times read + decode + GPU scoring from the shards, end to
end. Weights are random (throughput does not depend on them). On a machine without a GPU the GPU rows
say so. Run alone.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from ctray.benchmarks.scale import SIZE, make_data
    from ctray.config import load_config
    from ctray.core.placement import local_cores
    from ctray.data.reader import read_shards, usable
    from ctray.data.shards import ImageSpec
    from ctray.engine.cluster import ensure_ray
    from ctray.engine.score import collect_scores, score_dataset
    from ctray.models import build_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--arch", default="resnet18-narrow")
    p.add_argument("--work", default="scoring-bench")
    p.add_argument("--gpu-batch", type=int, default=2048)
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ensure_ray()
    import ray

    data = make_data(a.n, os.path.join(a.work, f"data-{a.n}"))
    ckpt = os.path.join(a.work, "ckpt")
    os.makedirs(ckpt, exist_ok=True)
    torch.manual_seed(0)
    torch.save(build_model(a.arch, 3, 10, SIZE).state_dict(), os.path.join(ckpt, "confused.pt"))
    spec = ImageSpec(SIZE, SIZE, 3)
    shards = os.path.join(data, "train-*.tar")
    t = time.perf_counter()
    ds = usable(read_shards(shards, spec, 10)).materialize()
    decode_s = time.perf_counter() - t
    cores = local_cores()
    gpus = int(ray.cluster_resources().get("GPU", 0))

    def run(over: dict[str, object], source: object) -> float:
        cfg = load_config("smoke", {"data.score_cpus": cores, **over})
        best = 0.0
        for _ in range(2):
            t0 = time.perf_counter()
            got = collect_scores(score_dataset(source, ckpt, "confused.pt", a.arch, 3, 10, SIZE, cfg.data))
            best = len(got["sid"]) / (time.perf_counter() - t0)
        return best

    print(f"{a.n:,} samples of {SIZE}x{SIZE} RGB, {a.arch}; {cores} cores, {gpus} GPU(s) "
          f"({torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none visible to the driver'})")
    print(f"read + decode into the object store: {a.n / decode_s:,.0f} img/s")
    print("| mode | img/s | vs cpu fp32 |")
    print("|---|---|---|")
    base = run({}, ds)
    print(f"| cpu fp32 (batch 512) | {base:,.0f} | 1.00 |", flush=True)
    bf = run({"data.score_precision": "bf16"}, ds)
    print(f"| cpu bf16 (batch 512) | {bf:,.0f} | {bf / base:.2f} |", flush=True)
    if not gpus:
        print("| gpu | no GPU in this Ray cluster | - |")
        return 0
    for prec in ("auto", "fp32"):
        g = run({"data.score_gpus": 1, "data.score_precision": prec, "data.score_batch_size": a.gpu_batch}, ds)
        print(f"| gpu {prec} (batch {a.gpu_batch}) | {g:,.0f} | {g / base:.2f} |", flush=True)
    e2e = run({"data.score_gpus": 1, "data.score_batch_size": a.gpu_batch}, usable(read_shards(shards, spec, 10)))
    print(f"| gpu auto, read + decode + score from the shards | {e2e:,.0f} | {e2e / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
