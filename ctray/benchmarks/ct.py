"""CT engine benchmark (a script that prints figures, not a test).

    python -m ctray.benchmarks.ct [--n 5000] [--preset smoke] [--workers 0] [--mem]

1. Per-phase wall time of one ``detect`` run on real Fashion-MNIST (N train, 1% badnet), from the run's
   ``rounds.json``: data read, per-round Train fit (and the loop's own phase times inside it), scoring;
   the Ray overhead share = fit wall time not spent in the loop's phases, plus scoring time beyond a
   bare torch loop's.
2. Scoring throughput: Ray Data ``map_batches(Scorer)`` over all N samples vs a bare torch loop over the
   same decoded tensors with the same checkpoint, one run, as a ratio: the median of the per-round passes
   (each includes its actor's start-up) and the fastest one.
   Ray starts its worker processes at nice 15 (``RAY_worker_niceness``): beside any other busy process
   (another run, a test suite) the scoring and other Data tasks get the leftovers of the CPU, and a pass
   can take 10-40x its quiet time (measured: one 10k pass 4.7 s quiet, 112 s beside a training process at
   nice 0, with the same 2.8 s of CPU). So the script prints the load average; quote figures from a quiet run.
3. Scoring compute (``data.score_compute``): the last round's checkpoint over all N samples, 3 passes
   each on a task pool with the per-process model cache (the default) and on a fresh actor pool per pass
   (Ray Data's pattern for a model-holding class), median wall time of each and their ratio.
4. ``--mem``: driver peak RSS of a detect run at N and 10 N samples (real worker processes, so training
   memory is in the workers; the driver should hold per-sample scalars only).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _make_data(root: str, n: int) -> str:
    from ctray.data.poison import poison_dataset
    from ctray.data.sources import make_dataset

    base, data = os.path.join(root, f"fm{n}"), os.path.join(root, f"fm{n}-badnet")
    if not os.path.exists(os.path.join(data, "truth.parquet")):
        make_dataset("fashion-mnist", base, n_train=n, n_clean=max(500, n // 10), n_test=200,
                     shard_size=max(500, n // 8), seed=0)
        poison_dataset(base, data, "badnet", rate=0.01, target=0, seed=0, options={})
    return data


def _detect(data: str, out: str, preset: str, workers: int, extra: dict | None = None):
    from ctray.config import load_config
    from ctray.engine.detect import detect

    ov = {"io.train": [f"{data}/train-*.tar"], "io.clean": [f"{data}/clean-*.tar"], "io.out": out,
          "io.truth": f"{data}/truth.parquet", "scale.num_workers": workers, **(extra or {})}
    return detect(load_config(preset, ov))


def _bare_scoring(data: str, ckpt_dir: str, arch: str, n_cls: int, mean: float, std: float) -> tuple[float, int]:
    """Images/s of a bare torch loop over pre-decoded tensors, same model + batch size as the Scorer."""
    import numpy as np
    import torch

    from ctray.data.shards import ImageSpec, expand_shards, load_arrays
    from ctray.models import build_model
    from ctray.training.loop import load_weights
    from ctray.training.steps import score_batch, to_input

    ok, _ = load_arrays(expand_shards(f"{data}/train-*.tar"), ImageSpec(28, 28, 1), n_cls)
    # ok records hold uint8 (H, W, C) images; asarray (no copy) types the Optional field for np.stack
    imgs = torch.from_numpy(np.stack([np.asarray(r.image, dtype=np.uint8) for r in ok]))
    labels = torch.tensor([r.label for r in ok])
    m = build_model(arch, 1, n_cls, 28)
    m.load_state_dict(load_weights(ckpt_dir, "confused.pt"))
    torch.set_num_threads(1)
    t = time.perf_counter()
    for i in range(0, len(labels), 256):
        score_batch(m, to_input(imgs[i:i + 256], mean, std), labels[i:i + 256])
    return len(labels) / (time.perf_counter() - t), len(labels)


def _score_compute(data: str, ckpt_dir: str, arch: str, n_cls: int, passes: int = 3) -> dict[str, float]:
    """Median wall seconds of a full scoring pass per ``data.score_compute`` (ray must be initialised)."""
    from ctray.config import load_config
    from ctray.data.reader import read_shards, usable
    from ctray.data.shards import ImageSpec, expand_shards
    from ctray.engine.score import collect_scores, score_dataset

    ds = usable(read_shards(expand_shards(f"{data}/train-*.tar"), ImageSpec(28, 28, 1), n_cls)).materialize()
    med = {}
    for compute in ("tasks", "actors"):
        dcfg = load_config("smoke", {"data.score_compute": compute}).data
        times = []
        for _ in range(passes):
            t = time.perf_counter()
            collect_scores(score_dataset(ds, ckpt_dir, "confused.pt", arch, 1, n_cls, 28, dcfg))
            times.append(time.perf_counter() - t)
        med[compute] = sorted(times)[len(times) // 2]
    return med


def _mem_child(n: int, root: str) -> None:
    import ray

    data = _make_data(root, n)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    # a minimal schedule: the point is the driver's memory, not detection
    extra = {"ct.iters": [20] * 6, "ct.pretrain_epochs": [1] * 6, "base.epochs": 1, "base.milestones": [1]}
    _detect(data, os.path.join(root, f"mem{n}"), "smoke", 1, extra)
    print(json.dumps({"n": n, "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--preset", default="smoke")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--mem", action="store_true")
    p.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "ctray-bench-ct"))
    p.add_argument("--mem-child", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if a.mem_child:
        _mem_child(a.mem_child, a.root)
        return 0
    import logging

    import ray

    logging.basicConfig(level=logging.WARNING)
    data = _make_data(a.root, a.n)
    load = os.getloadavg()[0]
    print(f"load average at start: {load:.1f} on {os.cpu_count()} CPUs"
          + ("  (busy machine: Ray workers run at nice 15 and lose to other processes; figures are not "
             "representative)" if load > 0.5 * (os.cpu_count() or 1) else ""))
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = os.path.join(a.root, f"run{a.n}-{a.preset}-w{a.workers}")
    t0 = time.time()
    res = _detect(data, out, a.preset, a.workers)
    total = time.time() - t0
    rounds = json.load(open(os.path.join(out, "rounds.json")))
    read_s = res.seconds.get("read", 0.0)
    print(f"detect N={res.n_usable} preset={a.preset} workers={a.workers}: {total:.1f}s, "
          f"TPR {res.metrics['ct']['tpr']:.3f} FPR {res.metrics['ct']['fpr']:.4f}")
    print(f"{'phase':<28}{'wall s':>10}{'share':>8}")
    fit_over = score_s = 0.0
    rows = [("read + decode (Ray Data)", read_s)]
    for r in rounds:
        inner = sum(r["phase_seconds"].values())
        fit_over += r["train_seconds"] - inner
        score_s += r["score_seconds"]
        rows.append((f"round {r['round']} fit", r["train_seconds"]))
        for k, v in r["phase_seconds"].items():
            rows.append((f"  {k}", v))
        rows.append((f"round {r['round']} scoring", r["score_seconds"]))
    for name, v in rows:
        print(f"{name:<28}{v:>10.1f}{100 * v / total:>7.1f}%")
    last = os.path.join(out, "checkpoints", f"round_{len(rounds) - 1}")
    with open(os.path.join(last, "meta.json")) as f:
        arch = json.load(f)["arch"]  # CT's model of the preset (small-cnn for smoke, resnet18-narrow for small)
    bare_ips, n = _bare_scoring(data, last, arch, 10, 0.5, 0.25)
    ray_ips = n * len(rounds) / score_s
    bare_score_s = n * len(rounds) / bare_ips
    # the rounds before the last: a plain loss pass each (the final one adds features, PCA, aggregation)
    passes = sorted(r["score_seconds"] for r in rounds[:-1]) or [score_s]
    med = passes[len(passes) // 2]
    over = fit_over + max(0.0, score_s - bare_score_s)
    print(f"Train fit overhead (fit wall - loop phases): {fit_over:.1f}s = {100 * fit_over / total:.1f}% of the run")
    print(f"scoring: Ray Data {ray_ips:.0f} img/s over all passes incl. the final one's features, PCA and "
          f"aggregation; bare torch loop {bare_ips:.0f} img/s (1 thread, pre-decoded): ratio {ray_ips / bare_ips:.2f}")
    print(f"scoring, per-round loss pass (incl. its start-up): median {med:.1f}s = {n / med:.0f} img/s "
          f"(ratio {n / med / bare_ips:.2f}), fastest {passes[0]:.1f}s = {n / passes[0]:.0f} img/s "
          f"(ratio {n / passes[0] / bare_ips:.2f})")
    print(f"Ray overhead share (fit overhead + scoring beyond bare): {over:.1f}s = {100 * over / total:.1f}%")
    sc = _score_compute(data, last, arch, 10)
    print(f"scoring compute, median of 3 passes over {n}: tasks (cached model) {sc['tasks']:.1f}s, actors (new pool "
          f"per pass) {sc['actors']:.1f}s: actors/tasks {sc['actors'] / sc['tasks']:.1f}x")
    if a.mem:
        for n_mem in (a.n, 10 * a.n):
            r = subprocess.run([sys.executable, "-m", "ctray.benchmarks.ct", "--mem-child", str(n_mem), "--root", a.root],
                               capture_output=True, text=True, check=True)
            # the child's JSON line; Ray may print warnings (raylet) after it
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            print("driver memory:", lines[-1] if lines else f"no figure (child output: {r.stdout[-500:]!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
