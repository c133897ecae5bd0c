"""What one in-round checkpoint costs the training loop, before and after the lighter format.

``python -m ctray.benchmarks.checkpoint [--arch resnet18] [--size 64] [--local-samples 1250000]``

Builds the real objects the loop checkpoints (the model after one SGD step with momentum, its optimizer
state, two finished phases' weights, a :class:`~ctray.training.loop.Sampler` over ``--local-samples``
samples: a rank's share of 10M images on 8 workers) and serializes rank 0's and one rank's files as the
loop writes them:

  before: f_base + base + model + optimizer, and each sampler's permutation (8 bytes per local sample);
  after:  model + optimizer, references (name + SHA-256) to f_base and base, and each sampler's
          generator state (its permutation is redrawn on load).

Prints bytes and the time ``torch.save`` takes to the local disk (the part that blocks training once
uploads are asynchronous; the upload itself then runs beside training), best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import torch


def _save_time(obj: Any, repeat: int) -> tuple[int, float]:
    best = float("inf")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "state.pt")
        for _ in range(repeat):
            t = time.perf_counter()
            torch.save(obj, path)
            best = min(best, time.perf_counter() - t)
        return os.path.getsize(path), best


def main(argv: list[str] | None = None) -> int:
    from ctray.models import build_model
    from ctray.training.loop import Sampler

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--local-samples", type=int, default=1_250_000)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model = build_model(a.arch, 3, a.classes, a.size)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(8, 3, a.size, a.size)
    torch.nn.functional.cross_entropy(model(x), torch.randint(0, a.classes, (8,))).backward()
    opt.step()  # the momentum buffers exist now, as in any checkpoint after step 0

    def weights() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    samplers = {name: Sampler(a.local_samples, 128, seed) for seed, name in enumerate(("conf", "insp"))}
    before_shared = {"fbase": weights(), "base": weights(), "model": weights(), "opt": opt.state_dict(), "sched": None}
    after_shared = {"fbase": {"ref": "fbase.pt", "sha256": "0" * 64}, "base": {"ref": "base.pt", "sha256": "0" * 64},
                    "model": weights(), "opt": opt.state_dict(), "sched": None}
    states = {k: s.state_dict() for k, s in samplers.items()}
    gen = torch.Generator().get_state()
    after_own = {"samplers": states, "gen": gen}
    before_own = {"samplers": {k: {**{kk: vv for kk, vv in st.items() if kk != "perm_gen"}, "perm": samplers[k].perm}
                               for k, st in states.items()}, "gen": gen}
    params = sum(p.numel() for p in model.parameters())
    print(f"{a.arch} at {a.size} px, {params / 1e6:.1f}M parameters; samplers over {a.local_samples:,} local samples")
    print("| file | before: MB | before: save s | after: MB | after: save s | ratio |")
    print("|---|---|---|---|---|---|")
    for what, b, c in (("rank 0 state (train_state.pt)", before_shared, after_shared),
                       ("each rank's samplers (rank_k.pt)", before_own, after_own)):
        (bb, bt), (ab, at) = _save_time(b, a.repeat), _save_time(c, a.repeat)
        print(f"| {what} | {bb / 1e6:.1f} | {bt:.3f} | {ab / 1e6:.3f} | {at:.3f} | {bb / max(ab, 1):.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
