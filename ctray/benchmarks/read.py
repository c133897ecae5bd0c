"""Read throughput: ctray's Ray Data reader against a bare WebDataset loop and ``ray.data.read_webdataset``.

``python -m ctray.benchmarks.read [--shards DIR] [--samples 20000] [--shards-count 20] [--repeats 3]``

Without ``--shards`` it writes ``--samples`` 28x28 grey PNG samples into ``--shards-count`` shards in a
temporary directory: real Fashion-MNIST (train split, read straight from the idx.gz files) when
``/usr/share/datasets/fashion-mnist`` exists, synthetic images otherwise. Then, on the same shards:

a. bare: ``webdataset.WebDataset(urls, shardshuffle=False)`` + PIL decode to numpy, single process;
b. ctray ``read_shards`` iterated to completion with ``iter_batches`` on a local Ray started here with
   ``num_cpus=1`` (read tasks ask 1 CPU: one at a time, a per-core figure) and with all cores;
c. ``ray.data.read_webdataset(decoder=None)`` + a ``map_batches`` PIL decode, for reference.

Each measure is repeated ``--repeats`` times (the first Ray run also starts worker processes); the best
is reported. The ctray/bare ratio per core is the figure to watch (goal >= 0.8).
"""

from __future__ import annotations

import argparse
import gzip
import io
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def load_fashion_mnist(n: int, root: str = FMNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """First ``n`` train images ``uint8 (n, 28, 28)`` and labels ``int64 (n,)`` from the idx.gz files."""
    with gzip.open(os.path.join(root, "train-images-idx3-ubyte.gz"), "rb") as f:
        raw = f.read()
    count = int.from_bytes(raw[4:8], "big")
    h, w = int.from_bytes(raw[8:12], "big"), int.from_bytes(raw[12:16], "big")
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, h, w)[:n]
    with gzip.open(os.path.join(root, "train-labels-idx1-ubyte.gz"), "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)[:n].astype(np.int64)
    return images, labels


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28x28 grey images with a class-dependent bar plus noise (compress like real photos do not,
    but decode at a similar cost), labels in [0, 10)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 64, (n, 28, 28), dtype=np.uint8)
    for c in range(10):
        images[labels == c, 2 * c + 2: 2 * c + 6, 4:24] += 150
    return images, labels.astype(np.int64)


def make_shards(out_dir: str, n: int, n_shards: int) -> tuple[list[str], str]:
    from ctray.data.shards import ShardWriter

    if os.path.exists(os.path.join(FMNIST_DIR, "train-images-idx3-ubyte.gz")):
        images, labels = load_fashion_mnist(n)
        source = "fashion-mnist"
    else:
        images, labels = synthetic(n)
        source = "synthetic"
    n = len(images)
    per = -(-n // n_shards)
    with ShardWriter(out_dir, "bench", shard_size=per) as w:
        for i in range(n):
            w.write(f"s{i:07d}", images[i], int(labels[i]))
    return w.paths, source


def tree_cpu_seconds() -> float:
    """User+system CPU seconds of this process and all its live descendants (Linux ``/proc``).

    A local Ray started by this script (GCS, raylet, workers) descends from it, so the figure covers
    the whole pipeline and, unlike wall time, is not inflated by other load on a shared machine.
    """
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the ")": state ppid ... utime(12) stime(13) cutime(14) cstime(15)
        stats[int(d)] = (int(fields[1]), sum(float(x) for x in fields[11:15]) / tick)
    me = os.getpid()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [me]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0.0))[1]
        todo.extend(children.get(pid, []))
    return total


def bare_loop(urls: list[str]) -> int:
    import webdataset as wds
    from PIL import Image

    n = 0
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        img = np.asarray(Image.open(io.BytesIO(s["png"])))
        label = int(s["cls"])
        n += 1 if img.ndim and label >= 0 else 0
    return n


def ctray_parser_loop(urls: list[str]) -> int:
    """ctray's parser alone, no Ray (diagnostic: the cost per sample of iter_shard)."""
    from ctray.data.shards import ImageSpec, iter_shards

    spec = ImageSpec(28, 28, 1)
    return sum(1 for r in iter_shards(urls, spec, 10) if r.ok)


def ctray_ray(urls: list[str], num_cpus: float, rows_per_block: int, shards_per_task: int = 1,
              batch_size: int | None = None) -> int:
    from ctray.data.reader import read_shards
    from ctray.data.shards import ImageSpec

    ds = read_shards(urls, ImageSpec(28, 28, 1), 10, num_cpus=num_cpus, rows_per_block=rows_per_block,
                     shards_per_task=shards_per_task)
    n = 0
    for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        n += len(b["label"])
    return n


def _decode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from PIL import Image

    imgs = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in batch["png"]])
    labels = np.array([int(c) for c in batch["cls"]], dtype=np.int64)
    return {"image": imgs, "label": labels, "key": batch["__key__"]}


def ray_webdataset(urls: list[str], num_cpus: float, batch_size: int | None = None) -> int:
    import ray.data

    ds = ray.data.read_webdataset(urls, decoder=None, num_cpus=num_cpus).map_batches(
        _decode_batch, batch_size=1024, num_cpus=num_cpus)
    n = 0
    for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        n += len(b["label"])
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctray.benchmarks.read", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", help="directory of existing shards (28x28 grey) instead of making them")
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--shards-count", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows-per-block", type=int, default=1024)
    ap.add_argument("--shards-per-task", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="iter_batches batch size for the Ray measures (default: native blocks)")
    ap.add_argument("--skip-ray-webdataset", action="store_true")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = None
    if args.shards:
        from ctray.data.shards import expand_shards

        urls, source = expand_shards(args.shards), f"given ({args.shards})"
    else:
        tmp = tempfile.mkdtemp(prefix="ctray-bench-")
        t = time.perf_counter()
        urls, source = make_shards(tmp, args.samples, args.shards_count)
        print(f"wrote {args.samples} samples ({source}) into {len(urls)} shards in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
    cores = os.cpu_count() or 1
    # (name, cores) -> rates; measures are interleaved round-robin inside each Ray session so that
    # load from other processes on a shared machine hits all of them alike
    rates: dict[tuple[str, int], list[tuple[float, float]]] = {}

    def measure(name: str, ncpu: int, fn: Callable[[], int], tree: bool = True) -> None:
        cpu_now = tree_cpu_seconds if tree else time.process_time
        c, t = cpu_now(), time.perf_counter()
        rows = fn()
        wall, cpu = time.perf_counter() - t, cpu_now() - c
        rates.setdefault((name, ncpu), []).append((rows / wall, rows / max(cpu, 1e-9)))
        print(f"  {name:<40} cores={ncpu:<2} rows={rows:<7} {rows / wall:>9,.0f} img/s wall  "
              f"{rows / max(cpu, 1e-9):>9,.0f} img/CPU-s", flush=True)

    ctray_parser_loop(urls[:1])  # imports, page cache
    bare_name, parser_name = "a. bare webdataset + PIL", "   ctray iter_shard, no Ray"
    ctray_name, rwds_name = "b. ctray read_shards + iter_batches", "c. ray read_webdataset + decode"
    try:
        import ray

        for ncpu in sorted({1, cores}):
            ray.init(address="local", num_cpus=ncpu, include_dashboard=False, log_to_driver=False,
                     object_store_memory=512 * 2**20)
            ray.data.DataContext.get_current().enable_progress_bars = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            try:
                # warm-up (starts the worker processes), not measured
                ctray_ray(urls[:ncpu], 1.0, args.rows_per_block)
                if not args.skip_ray_webdataset:
                    ray_webdataset(urls[:ncpu], 1.0)
                for _ in range(args.repeats):
                    if ncpu == 1:
                        # single-process loops: CPU of this process only (not Ray's idle daemons)
                        measure(bare_name, 1, lambda: bare_loop(urls), tree=False)
                        measure(parser_name, 1, lambda: ctray_parser_loop(urls), tree=False)
                    # read tasks ask 1 whole CPU: ncpu logical CPUs run ncpu read tasks at a time,
                    # in ncpu long-lived workers (fractional CPUs on a small box make Ray start, and
                    # kill when idle, more workers than CPUs: start-up cost in every run)
                    measure(ctray_name, ncpu, lambda: ctray_ray(
                        urls, 1.0, args.rows_per_block, args.shards_per_task, args.batch_size))
                    if not args.skip_ray_webdataset:
                        measure(rwds_name, ncpu, lambda: ray_webdataset(urls, 1.0, args.batch_size))
            finally:
                ray.shutdown()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    bare = max(w for w, _ in rates[(bare_name, 1)])
    bare_cpu = max(c for _, c in rates[(bare_name, 1)])
    print()
    print(f"shards: {len(urls)}, source: {source}, machine: {cores} cores, best of {args.repeats}, "
          f"load average now {os.getloadavg()[0]:.1f}")
    print("wall = images/s elapsed; CPU = images per CPU-second (Ray rows: summed over this process "
          "and its descendants, i.e. all of Ray's processes)")
    print(f"ctray: shards_per_task={args.shards_per_task}, rows_per_block={args.rows_per_block}, "
          f"iter_batches(batch_size={args.batch_size}); read tasks num_cpus=1.0")
    print(f"| {'measure':<38} | cores | wall img/s | wall/core vs bare | img/CPU-s | CPU vs bare |")
    print(f"|{'-' * 40}|-------|------------|-------------------|-----------|-------------|")
    for (name, ncpu), r in rates.items():
        wall, cpu = max(w for w, _ in r), max(c for _, c in r)
        print(f"| {name.strip():<38} | {ncpu:>5} | {wall:>10,.0f} | {wall / ncpu / bare:>16.2f}x "
              f"| {cpu:>9,.0f} | {cpu / bare_cpu:>10.2f}x |")
    c1 = rates[(ctray_name, 1)]
    print(f"\nctray/bare per core: {max(w for w, _ in c1) / bare:.2f}x wall (1 logical CPU), "
          f"{max(c for _, c in c1) / bare_cpu:.2f}x per CPU-second (goal >= 0.8x)")
    return 0

if __name__ == "__main__":
    sys.exit(main())
