"""The final decision's per-class PCA with many classes: class-partitioned reducers (what ``detect`` runs)
against the dense per-batch moments merged on the driver (what it ran before, still used by the baselines).

``python -m ctray.benchmarks.classpca [--rows 100000] [--dim 512] [--classes 100,1000] [--dense-max-mb 400]``

For each class count C: ``--rows`` synthetic float32 features of dimension ``--dim`` with uniform random
labels are generated inside Ray Data (blocks of 4,096 rows; the driver never holds them), then
  reducers: ``start_reducers`` + ``feed_reducers`` + ``class_axes`` (ctray.engine.classpca);
  dense:    ``feature_moments`` (one C x D x D float64 blob per 4,096 rows, merged on the driver), only
            when that blob is at most ``--dense-max-mb`` (at C = 1,000, D = 512 it is 2.1 GB a batch).
Prints wall time, the driver's peak RSS growth (sampled), the largest reducer's held bytes and the bytes
one batch sends, and checks both give the same axes where both ran. Run alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from typing import Any

import numpy as np

BLOCK = 4096


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class _Peak:
    def __init__(self) -> None:
        self.base, self.peak, self._stop = _rss_mb(), 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb() - self.base)
            time.sleep(0.05)

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return max(self.peak, _rss_mb() - self.base)


def _features(rows: int, dim: int, classes: int) -> Any:
    import ray

    def gen(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"]
        rng = np.random.default_rng(int(ids[0]))
        label = rng.integers(0, classes, len(ids))
        scale = np.linspace(2.0, 0.1, dim, dtype=np.float32)
        feats = rng.standard_normal((len(ids), dim), dtype=np.float32) * scale + (label[:, None] % 7).astype(np.float32)
        return {"sid": ids, "label": label, "features": feats}

    return ray.data.range(rows, override_num_blocks=max(1, rows // BLOCK)).map_batches(
        gen, batch_size=BLOCK, batch_format="numpy", num_cpus=1)


def _reducers(ds: Any, classes: int) -> tuple[float, float, np.ndarray, dict[str, Any]]:
    import ray

    from ctray.engine.classpca import class_axes, feed_reducers, start_reducers

    peak, t = _Peak(), time.perf_counter()
    reducers = start_reducers(classes)
    # the driver takes what detect's final pass takes from this pass: ids (its scores), not the features
    for _ in feed_reducers(ds, reducers, classes, num_cpus=1).select_columns(["sid"]).iter_batches(batch_size=None):
        pass
    held = max(ray.get([x.held_bytes.remote() for x in reducers]))
    axes, _, _ = class_axes(reducers, classes, 2)
    return time.perf_counter() - t, peak.stop(), axes, {"reducers": len(reducers), "held_mb": held / 1e6}


def _dense(ds: Any, classes: int) -> tuple[float, float, np.ndarray]:
    from ctray.engine.score import feature_moments

    peak, t = _Peak(), time.perf_counter()
    axes = feature_moments(ds, classes, num_cpus=1).principal_axes(2)
    return time.perf_counter() - t, peak.stop(), axes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", default="100,1000")
    p.add_argument("--dense-max-mb", type=float, default=400.0)
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from ctray.engine.cluster import ensure_ray

    ensure_ray()
    _reducers(_features(BLOCK, a.dim, 2).materialize(), 2)  # warm-up: the first pass's imports are not a cost
    print(f"rows {a.rows:,}, D = {a.dim}, blocks of {BLOCK:,} rows")
    print("| C | method | wall s | driver RSS growth MB | sent per batch MB | reducers | largest reducer MB |")
    print("|---|---|---|---|---|---|---|")
    for c in [int(x) for x in a.classes.split(",")]:
        ds = _features(a.rows, a.dim, c).materialize()  # generated once, both methods read the same blocks
        wall, grow, axes, info = _reducers(ds, c)
        present = min(c, BLOCK)
        sent = 8 * (BLOCK * a.dim + present * a.dim) / 1e6
        print(f"| {c:,} | reducers | {wall:.1f} | {grow:.0f} | <= {sent:.0f} | {info['reducers']} | "
              f"{info['held_mb']:.0f} |", flush=True)
        blob = 8 * c * a.dim * (a.dim + 1) / 1e6
        if blob <= a.dense_max_mb:
            dwall, dgrow, daxes = _dense(ds, c)
            same = np.allclose(np.abs(axes), np.abs(daxes), atol=1e-6)
            print(f"| {c:,} | dense (before) | {dwall:.1f} | {dgrow:.0f} | {blob:.0f} | - | - |"
                  f"{'' if same else ' AXES DIFFER'}", flush=True)
        else:
            print(f"| {c:,} | dense (before) | not run | - | {blob:,.0f} | - | - |", flush=True)
        del ds
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
