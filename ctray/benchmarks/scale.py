"""Scale benchmark: `ctray detect` at N and 10x N distinct 64x64 RGB samples, memory and time per phase.

``python -m ctray.benchmarks.scale [--sizes 50000,500000] [--work DIR] [--cache-bytes 256MB]
[--worker-cache-bytes 256MB] [--workers 1] [--gpu] [--object-store 2000000000]``

``python -m ctray.benchmarks.scale --side-by-side DATA [--preset small-cnn]``: the same detection on DATA
in memory (automatic budgets) and forced to stream (budgets 0), one after the other (the 10k demo data).

It starts and stops a ``ray start`` cluster (``ray stop --force`` stops every Ray on the machine): run it
alone.

Data: Fashion-MNIST train images (Debian's package) upscaled to 56 px, placed at a random offset in a
64x64 frame, tinted with a random RGB colour and a random background level, so every sample is distinct
and 12 KB decoded (28x28 grey would hide the data in Ray's fixed memory). 1% badnet (the project's patch)
relabelled to class 0, with truth.parquet; a 1,000-sample clean reserve from the test split. Data sets are
written once under ``--work`` and reused.

Run: a ``ray start --head`` cluster on this machine (``--object-store`` bytes of object store), then
``ctray detect`` as a job on it with a tiny schedule (2 rounds, one epoch of f_base and of each pretraining,
100 confusion iterations a round) and the given budgets; every 0.5 s the monitor samples the detect
process's memory (VmRSS and RssAnon, the private part: the object store's shared pages are not the
driver's), every Ray Train worker process's, the object store's bytes used and the bytes spilled. Printed:
one row per size and the ratios of the largest to the smallest size. GPU: ``--gpu`` sets
``scale.use_gpu=true`` (run it on a GPU machine; the same table).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from typing import Any

import numpy as np

from ctray.benchmarks.read import FMNIST_DIR, load_fashion_mnist
from ctray.memory import worker_env

SIZE = 64
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
SHARD = 5000
RATE = 0.01
SCHEDULE = ["base.arch=tiny-cnn", "ct.arch=tiny-cnn", "ct.rounds=2", "ct.pretrain_epochs=[1,1]", "ct.iters=[100,100]", "ct.lr=[0.015,0.04]",
            "ct.lam=[20,15]", "ct.batch_factor=[2,2]", "ct.keep_ratio=[0.5]", "ct.floor_k=[50]", "base.epochs=1",
            "base.milestones=[1]", "base.batch_size=128", "ct.pretrain_batch_size=128", "data.score_batch_size=512"]


def _transform(img28: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """28x28 grey -> 64x64 RGB: 2x upscale, random offset, random tint and background."""
    up = np.kron(img28, np.ones((2, 2), np.uint8)).astype(np.float32)  # 56x56
    oy, ox = rng.integers(0, SIZE - 56 + 1, 2)
    bg = rng.uniform(0, 60)
    frame = np.full((SIZE, SIZE), bg, np.float32)
    frame[oy:oy + 56, ox:ox + 56] = np.maximum(up, bg)
    tint = rng.uniform(0.55, 1.0, 3).astype(np.float32)
    return np.clip(frame[:, :, None] * tint[None, None, :], 0, 255).astype(np.uint8)


def _write_shard(args: tuple[str, str, int, int, int, bool]) -> list[tuple[str, str, bool, int, int]]:
    """One tar of ``count`` samples starting at global index ``start``; returns truth rows."""
    from ctray.data.attacks import badnet_patch
    from ctray.data.shards import encode_image

    out, name, start, count, seed, poison_ok = args
    split = "test" if name.startswith("clean") else "train"
    images, labels = _SOURCE[split]
    rng = np.random.default_rng([seed, start])
    patch = badnet_patch((1, SIZE, SIZE, 3))
    rows = []
    tmp = os.path.join(out, f".{name}.partial")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for j in range(count):
            i = start + j
            src = int(rng.integers(0, len(images)))
            img = _transform(images[src], rng)
            label = int(labels[src])
            poison = poison_ok and label != 0 and rng.random() < RATE / 0.9
            orig = label
            if poison:
                img = patch.apply(img[None])[0]
                label = 0
            key = f"s{i:09d}"
            for ext, data in (("png", encode_image(img, "png")), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                import io

                tf.addfile(info, io.BytesIO(data))
            rows.append((name, key, poison, orig, label))
    os.replace(tmp, os.path.join(out, name))
    return rows


_SOURCE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _init_source() -> None:
    import gzip

    _SOURCE["train"] = load_fashion_mnist(60000)
    with gzip.open(os.path.join(FMNIST_DIR, "t10k-images-idx3-ubyte.gz")) as f:
        timg = np.frombuffer(f.read()[16:], np.uint8).reshape(-1, 28, 28)
    with gzip.open(os.path.join(FMNIST_DIR, "t10k-labels-idx1-ubyte.gz")) as f:
        tlab = np.frombuffer(f.read()[8:], np.uint8).astype(np.int64)
    _SOURCE["test"] = (timg, tlab)


def make_data(n: int, out: str, seed: int = 0, procs: int = 2) -> str:
    """Write (or reuse) the N-sample set under ``out``; returns ``out``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if os.path.exists(os.path.join(out, "manifest.json")):
        return out
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    jobs = [(out, f"train-{k:06d}.tar", k * SHARD, min(SHARD, n - k * SHARD), seed, True)
            for k in range(-(-n // SHARD))]
    jobs.append((out, "clean-000000.tar", 10**8, 1000, seed + 1, False))
    t = time.monotonic()
    ctx = mp.get_context("fork")
    _init_source()
    with ctx.Pool(procs) as pool:
        rows = [r for part in pool.imap(_write_shard, jobs) for r in part]
    truth = [r for r in rows if r[0].startswith("train")]
    pq.write_table(pa.table({"shard": [r[0] for r in truth], "key": [r[1] for r in truth],
                             "poison": [r[2] for r in truth], "cover": [False] * len(truth),
                             "orig_label": [r[3] for r in truth], "label": [r[4] for r in truth]}),
                   os.path.join(out, "truth.parquet"))
    man = {"source": "fashion-mnist-64rgb", "num_classes": 10, "image_shape": [SIZE, SIZE, 3],
           "counts": {"train": n, "clean": 1000}, "shards": {"train": [j[1] for j in jobs[:-1]],
                                                              "clean": ["clean-000000.tar"]}}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(man, f)
    print(f"wrote {n} samples ({sum(r[2] for r in truth)} poison) in {len(jobs) - 1} shards to {out} "
          f"in {time.monotonic() - t:.0f} s", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ monitor


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _train_workers() -> list[int]:
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"RayTrainWorker" in cmd:
            pids.append(int(p))
    return pids


class Monitor(threading.Thread):
    """Samples memory every ``every`` s until :meth:`stop`; peaks in :attr:`peak`."""

    def __init__(self, driver_pid: int, address: str, every: float = 0.5, series: str | None = None):
        super().__init__(daemon=True)
        self.pid, self.address, self.every = driver_pid, address, every
        # a CSV time series (unix time, driver anon MB, worker anon MB, store used MB): where a peak happens
        self.series = open(series, "w") if series else None
        if self.series:
            self.series.write("time,driver_anon_mb,worker_anon_mb,store_used_mb\n")
        self.peak: dict[str, float] = {"driver_rss": 0, "driver_anon": 0, "worker_rss": 0, "worker_anon": 0,
                                       "store_used": 0, "spilled": 0}
        self._stop_evt = threading.Event()

    def _store(self) -> tuple[int, int]:
        import ray
        from ray._private.internal_api import get_memory_info_reply

        if not ray.is_initialized():
            ray.init(address=self.address, logging_level=40, log_to_driver=False)  # logging.ERROR
        r = get_memory_info_reply(ray._private.state.state)
        return int(r.store_stats.object_store_bytes_used), int(r.store_stats.spilled_bytes_total)

    def run(self) -> None:
        while not self._stop_evt.is_set():
            d = _status(self.pid)
            self.peak["driver_rss"] = max(self.peak["driver_rss"], d.get("VmRSS", 0))
            self.peak["driver_anon"] = max(self.peak["driver_anon"], d.get("RssAnon", 0))
            for w in _train_workers():
                s = _status(w)
                self.peak["worker_rss"] = max(self.peak["worker_rss"], s.get("VmRSS", 0))
                self.peak["worker_anon"] = max(self.peak["worker_anon"], s.get("RssAnon", 0))
            used = -1
            try:
                used, spilled = self._store()
                self.peak["store_used"] = max(self.peak["store_used"], used)
                self.peak["spilled"] = max(self.peak["spilled"], spilled)
            except Exception:  # noqa: BLE001 - the cluster may be starting or stopping
                pass
            if self.series:
                w_anon = max((_status(w).get("RssAnon", 0) for w in _train_workers()), default=0)
                self.series.write(f"{time.time():.1f},{d.get('RssAnon', 0) / 2**20:.1f},{w_anon / 2**20:.1f},"
                                  f"{used / 2**20:.1f}\n")
                self.series.flush()
            self._stop_evt.wait(self.every)

    def stop(self) -> None:
        self._stop_evt.set()


# ---------------------------------------------------------------------------------------------------- run


def run_size(n: int, work: str, args: argparse.Namespace) -> dict[str, Any]:
    data = make_data(n, os.path.join(work, f"data-{n}"))
    out = os.path.join(work, f"run-{n}-{int(time.time())}")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, check=False)
    start = subprocess.run([RAY, "start", "--head", "--include-dashboard=false", "--disable-usage-stats",
                            f"--object-store-memory={args.object_store}", "--port=6390"],
                           env=worker_env(env), capture_output=True, text=True, check=False)  # ctray.memory
    if start.returncode != 0:
        raise RuntimeError(f"ray start failed: {start.stderr[-2000:]}")
    address = "127.0.0.1:6390"
    env["RAY_ADDRESS"] = address
    cmd = [sys.executable, "-m", "ctray.cli", "detect", "--train", f"{data}/train-*.tar", "--clean",
           f"{data}/clean-*.tar", "--truth", f"{data}/truth.parquet", "--out", out, "--preset", "smoke", *SCHEDULE,
           f"scale.num_workers={args.workers}", f"scale.use_gpu={str(args.gpu).lower()}",
           f"data.cache_bytes={args.cache_bytes}", f"data.worker_cache_bytes={args.worker_cache_bytes}"]
    t = time.monotonic()
    log = open(os.path.join(work, f"detect-{n}.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    mon = Monitor(proc.pid, address, series=os.path.join(work, f"memory-{n}.csv"))
    mon.start()
    rc = proc.wait()
    wall = time.monotonic() - t
    mon.stop()
    mon.join(5)
    try:
        import ray

        ray.shutdown()
    except Exception:  # noqa: BLE001
        pass
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, check=False)
    if rc != 0:
        raise RuntimeError(f"detect at N={n} exited {rc}; see {log.name}")
    run = json.load(open(os.path.join(out, "run.json")))
    rounds = json.load(open(os.path.join(out, "rounds.json")))
    metrics = json.load(open(os.path.join(out, "metrics.json")))["ct"]
    phases: dict[str, float] = {"read": run["seconds"].get("read", 0.0)}
    for r in rounds:
        for k, v in (r.get("phase_seconds") or {}).items():
            phases[k] = phases.get(k, 0.0) + float(v)
        phases["score"] = phases.get("score", 0.0) + float(r["score_seconds"])
    return {"n": n, "wall": wall, **mon.peak, "phases": phases, "tpr": metrics["tpr"], "fpr": metrics["fpr"],
            "out": out}


def side_by_side(data: str, preset: str, work: str) -> int:
    """``ctray detect`` on ``data`` (shards from ``ctray data`` + ``ctray data poison``) twice in a row, local
    mode: the automatic budgets (in memory when D fits) and tiny budgets (cache 0, worker 0, shuffle 1 MB:
    nothing of D cached, every training set over 1 MB streamed). Prints the wall times, their ratio and
    both detections."""
    rows = []
    for name, budgets in (("in-memory (auto budgets)", []),
                          ("streaming (tiny budgets)", ["data.cache_bytes=0", "data.worker_cache_bytes=0",
                                                        f"data.shuffle_bytes={2**20}"])):
        out = os.path.join(work, f"side-{preset}-{'stream' if budgets else 'memory'}-{int(time.time())}")
        cmd = [sys.executable, "-m", "ctray.cli", "-q", "detect", "--train", f"{data}/train-*.tar", "--clean",
               f"{data}/clean-*.tar", "--truth", f"{data}/truth.parquet", "--out", out, "--preset", preset,
               "scale.num_workers=0", *budgets]
        env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        t = time.monotonic()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        wall = time.monotonic() - t
        m = json.load(open(os.path.join(out, "metrics.json")))["ct"]
        rows.append((name, wall, m["tpr"], m["fpr"]))
        print(f"{name}: {wall:.0f} s, TPR {m['tpr']:.3f}, FPR {m['fpr']:.4f}", flush=True)
    print(f"streaming / in-memory wall time: {rows[1][1] / rows[0][1]:.2f}")
    return 0


def _mb(x: float) -> str:
    return f"{x / 2**20:,.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="50000,500000")
    p.add_argument("--work", default="scale-bench")
    p.add_argument("--cache-bytes", default="256MB", help="data.cache_bytes of the runs")
    p.add_argument("--worker-cache-bytes", default="256MB", help="data.worker_cache_bytes of the runs")
    p.add_argument("--object-store", type=int, default=2 * 10**9, help="object store bytes of the Ray cluster")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--side-by-side", metavar="DATA", default=None,
                   help="instead: detect on DATA in memory and forced to stream, one after the other")
    p.add_argument("--preset", default="small-cnn", help="preset of --side-by-side (the demo's)")
    args = p.parse_args(argv)
    if args.side_by_side:
        os.makedirs(args.work, exist_ok=True)
        return side_by_side(args.side_by_side, args.preset, args.work)
    if not os.path.exists(os.path.join(FMNIST_DIR, "train-images-idx3-ubyte.gz")):
        print("Fashion-MNIST is missing (make install installs it)", file=sys.stderr)
        return 2
    os.makedirs(args.work, exist_ok=True)
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; budgets: data.cache_bytes="
          f"{args.cache_bytes}, data.worker_cache_bytes={args.worker_cache_bytes}; object store "
          f"{args.object_store / 1e9:.1f} GB; {args.workers} Train worker(s), gpu={args.gpu}", flush=True)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        row = run_size(n, args.work, args)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items()}, default=str), flush=True)
    head = ("N", "wall s", "us/sample", "driver RSS MB", "driver anon MB", "worker RSS MB", "worker anon MB",
            "store peak MB", "spilled MB", "TPR", "FPR")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['n']:,} | {r['wall']:.0f} | {1e6 * r['wall'] / r['n']:.0f} | {_mb(r['driver_rss'])} | "
              f"{_mb(r['driver_anon'])} | {_mb(r['worker_rss'])} | {_mb(r['worker_anon'])} | {_mb(r['store_used'])} | "
              f"{_mb(r['spilled'])} | {r['tpr']:.3f} | {r['fpr']:.4f} |")
    print("\nphase seconds (sum over rounds):")
    names = sorted({k for r in rows for k in r["phases"]})
    for r in rows:
        print(f"  N={r['n']:,}: " + ", ".join(f"{k} {r['phases'].get(k, 0):.0f}" for k in names))
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        k = b["n"] / a["n"]

        def ratio(key: str) -> str:
            return f"{b[key] / a[key]:.2f}" if a[key] else "-"

        print(f"\nratios N={b['n']:,} / N={a['n']:,} ({k:.0f}x the samples): wall per sample "
              f"{(b['wall'] / b['n']) / (a['wall'] / a['n']):.2f}; driver RSS {ratio('driver_rss')} "
              f"(+{(b['driver_rss'] - a['driver_rss']) / max(1, b['n'] - a['n']):.0f} B per added sample; anon "
              f"+{(b['driver_anon'] - a['driver_anon']) / max(1, b['n'] - a['n']):.0f} B); worker RSS "
              f"{ratio('worker_rss')} (anon {ratio('worker_anon')}); object store peak {ratio('store_used')}; "
              f"spilled {_mb(b['spilled'])} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
