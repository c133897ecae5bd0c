"""One round's training input: only D_r (filtered by id in the read) vs all of D into the trainer.

``python -m ctray.benchmarks.fitinput [--n 50000] [--work DIR] [--keep 0.5,0.1] [--workers 1]``

A round r >= 1 trains on its kept set D_r (N/2, N/5, ..., N/100 in the reference schedule). Two ways to
feed it to Ray Train, both through the same ``streaming_split(workers, equal=True)`` the trainers read
(Ray Train's default DataConfig):

* **D_r only** (what ``detect`` does when D is streamed): ``read_shards(keep=D_r)``: each read task scans
  its tar, decodes only the kept samples, and only they leave the task.
* **all of D** (what the loop did before): ``read_shards()`` of every sample into the split; each
  trainer receives its whole share of D and subsets it to D_r locally.

Printed per keep fraction: rows and decoded image bytes delivered to the trainers, wall time, and the
ratios. The 64x64 RGB data of :mod:`ctray.benchmarks.scale` (written once under ``--work``) is used. It
starts a local Ray (run it alone); a trainer here is a task that iterates its split and keeps the rows
whose id is in D_r, no model, so the figures are the input path alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np


def _consume(split: Any, kept: np.ndarray) -> tuple[int, int, int]:
    """Iterate one trainer's split; returns (rows delivered, image bytes delivered, rows in D_r)."""
    rows = nbytes = hit = 0
    for b in split.iter_batches(batch_size=1024, batch_format="numpy"):
        rows += len(b["sid"])
        nbytes += int(b["image"].nbytes)
        hit += int(np.isin(b["sid"], kept).sum())
    return rows, nbytes, hit


def _feed(paths: list[str], spec: Any, kept: np.ndarray, only_kept: bool, workers: int) -> dict[str, Any]:
    import ray

    from ctray.data.reader import read_shards, usable

    t = time.monotonic()
    ds = usable(read_shards(paths, spec, 10, keep=kept if only_kept else None))
    splits = ds.streaming_split(workers, equal=True)
    consume = ray.remote(num_cpus=0)(_consume)
    parts = ray.get([consume.remote(s, kept) for s in splits])
    rows, nbytes, hit = (sum(p[i] for p in parts) for i in range(3))
    return {"rows": rows, "bytes": nbytes, "in_d_r": hit, "wall": time.monotonic() - t}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50000)
    p.add_argument("--work", default="scale-bench")
    p.add_argument("--keep", default="0.5,0.1", help="kept fractions of D (a round's |D_r| / N)")
    p.add_argument("--workers", type=int, default=1, help="trainers the split feeds")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import pyarrow.parquet as pq
    import ray

    from ctray.benchmarks.scale import make_data
    from ctray.data.shards import expand_shards, probe_spec, sample_ids, shard_ids

    data = make_data(a.n, os.path.join(a.work, f"data-{a.n}"))
    paths = expand_shards(os.path.join(data, "train-*.tar"))
    spec, _ = probe_spec(paths)
    ids = shard_ids(paths)
    truth = pq.read_table(os.path.join(data, "truth.parquet"), columns=["shard", "key"])
    sid_of = {os.path.basename(s): s_id for s, s_id in ids.items()}
    all_sids = sample_ids([sid_of[s] for s in truth["shard"].to_pylist()], truth["key"].to_pylist())
    rng = np.random.default_rng(a.seed)
    ray.init(include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        _feed(paths, spec, all_sids[:1], True, a.workers)  # warm the worker processes
        print(f"N = {len(all_sids)}, {spec.height}x{spec.width}x{spec.channels}, {len(paths)} shards, "
              f"{a.workers} trainer(s)", flush=True)
        print("| kept | input | rows to trainers | image MB to trainers | in D_r | wall s |")
        print("|---|---|---|---|---|---|")
        for frac in (float(x) for x in a.keep.split(",")):
            kept = np.sort(rng.choice(all_sids, int(round(frac * len(all_sids))), replace=False))
            res = {}
            for only_kept in (True, False):
                r = res[only_kept] = _feed(paths, spec, kept, only_kept, a.workers)
                if r["in_d_r"] != len(kept):
                    print(f"error: {r['in_d_r']} of {len(kept)} kept samples reached the trainers", file=sys.stderr)
                    return 1
                print(f"| {frac:g} N = {len(kept)} | {'D_r only' if only_kept else 'all of D'} | {r['rows']} | "
                      f"{r['bytes'] / 1e6:.0f} | {r['in_d_r']} | {r['wall']:.1f} |", flush=True)
            print(f"| {frac:g} | ratio D_r only / all of D | {res[True]['rows'] / res[False]['rows']:.2f} | "
                  f"{res[True]['bytes'] / res[False]['bytes']:.2f} | | {res[True]['wall'] / res[False]['wall']:.2f} |",
                  flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
