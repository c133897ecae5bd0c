"""Per-worker resource requests for Ray Train, sized from the nodes that can host a worker.

Pure Python (no Ray): the engine describes the cluster as a list of :class:`NodeShape` (alive nodes
plus the node types an autoscaler may still launch) and :func:`plan_workers` returns the request each
Ray Train worker makes. The request is never sized from the machine the driver runs on: on a launcher
cluster the driver sits on a CPU head whose core count says nothing about the GPU nodes.

The automatic CPU share (``cpus_per_worker=0``):

* Ray Data keeps ``reserve(c) = max(data_reserve, data_share * c)`` of a node's ``c`` CPUs (0.5 CPU on
  a 2-CPU laptop, 1 of 4, 4 of 16), so reads and scoring never starve (the 2-CPU deadlock).
* GPU workers: on each node type that has the GPUs (and the custom resources) a worker asks for,
  ``(c - reserve(c)) / workers that fit on its GPUs``; the smallest such value over the types, so a
  worker fits on any node type that can host it (g5.xlarge, 4 CPUs + 1 GPU: 3 CPUs).
* CPU workers: node types without GPUs when there are any (Ray keeps CPU work off GPU nodes), the
  smallest ``c - reserve(c)`` over them, and no more than the alive hosting nodes' CPUs (less the
  reserve of each) spread over the workers when they can run there now (or must: a fixed cluster).
  On a 2-CPU laptop: 1.5 CPUs for one worker, 0.75 each for two.
* Never below ``min_cpus`` (0.25); rounded down to 0.01 CPU.

Torch threads follow the request rounded down (>= 1); the worker also caps them at its own machine's
core count, which only it can see.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# Resources that describe a node but are not asked for by a worker (memory is managed by Ray).
_IGNORED = ("memory", "object_store_memory")


@dataclass(frozen=True)
class NodeShape:
    """One kind of node: its resources and how many exist or may be launched.

    Attributes:
        name: e.g. ``"gpu"`` (an autoscaler node type) or ``"alive 10.0.0.5"``.
        resources: total logical resources of one node, e.g. ``{"CPU": 4, "GPU": 1}``; ``None`` when the
            type's shape is not known (a launcher type whose resources the cloud fills in).
        alive: nodes of this shape that are up now (>= 0).
        can_launch: an autoscaler may start (more) nodes of this shape.
    """

    name: str
    resources: Mapping[str, float] | None
    alive: int = 0
    can_launch: bool = False


@dataclass(frozen=True)
class WorkerPlan:
    """What each of ``num_workers`` Ray Train workers asks for.

    Attributes:
        resources: the per-worker request, e.g. ``{"CPU": 3.5, "GPU": 1.0}`` (CPU always present).
        threads: torch threads per worker (>= 1), before the worker's own core-count cap.
        hosts: names of the node shapes a worker fits on.
        note: one line saying how the CPU share was chosen (for the log).
    """

    resources: dict[str, float]
    threads: int
    hosts: list[str] = field(default_factory=list)
    note: str = ""


class PlacementError(ValueError):
    """No node shape can ever host the requested worker (the engine turns it into a ConfigError)."""


def local_cores() -> int:
    """Cores of the machine this process runs on (its CPU affinity where the OS has one), >= 1.

    Only for sizing work that runs in this very process (local mode, a worker's own threads)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _fits(req: Mapping[str, float], res: Mapping[str, float]) -> bool:
    return all(float(res.get(k, 0.0)) + 1e-9 >= v for k, v in req.items() if v > 0)


def describe(shapes: Sequence[NodeShape]) -> str:
    """``"head {CPU: 8} (1 alive); gpu {CPU: 4, GPU: 1} (launchable)"`` for error messages."""
    parts = []
    for s in shapes:
        res = "unknown resources" if s.resources is None else "{" + ", ".join(
            f"{k}: {v:g}" for k, v in sorted(s.resources.items()) if k not in _IGNORED and v) + "}"
        where = [f"{s.alive} alive"] if s.alive else []
        if s.can_launch:
            where.append("launchable")
        parts.append(f"{s.name} {res} ({', '.join(where) or 'none up'})")
    return "; ".join(parts) or "no nodes"


def plan_workers(shapes: Sequence[NodeShape], num_workers: int, *, use_gpu: bool = False,
                 gpus_per_worker: float = 1.0, cpus_per_worker: float = 0.0,
                 extra: Mapping[str, float] | None = None, data_reserve: float = 0.5,
                 data_share: float = 0.25, min_cpus: float = 0.25) -> WorkerPlan:
    """Size one Ray Train worker's request from the node shapes that can host it.

    Args:
        shapes: the cluster's node shapes (alive and launchable).
        num_workers: Ray Train workers (>= 1).
        use_gpu: workers ask for ``gpus_per_worker`` GPUs each.
        gpus_per_worker: GPUs per worker (> 0) when ``use_gpu``.
        cpus_per_worker: explicit CPUs per worker; 0 = automatic (module docstring).
        extra: custom resources each worker asks for (e.g. ``{"accelerator_type:A10G": 0.001}``).
        data_reserve: the fewest CPUs left to Ray Data on a node that hosts workers.
        data_share: the share of a node's CPUs left to Ray Data when that is more than ``data_reserve``.
        min_cpus: the smallest automatic request.

    Returns:
        A :class:`WorkerPlan`.

    Raises:
        PlacementError: no known node shape has what a worker needs (GPUs, custom resources, or the
            explicit CPUs), and no node of unknown shape could still be launched. The message names the
            request and the shapes.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    need: dict[str, float] = {k: float(v) for k, v in (extra or {}).items() if float(v) > 0}
    if use_gpu:
        need["GPU"] = float(gpus_per_worker)
    known = [s for s in shapes if s.resources is not None and (s.alive or s.can_launch)]
    unknown = [s for s in shapes if s.resources is None and s.can_launch]
    hosts = [s for s in known if _fits(need, s.resources or {}) and float((s.resources or {}).get("CPU", 0)) > 0]
    if not use_gpu:  # Ray keeps CPU-only work off GPU nodes when it can (scheduler_avoid_gpu_nodes)
        plain = [s for s in hosts if not float((s.resources or {}).get("GPU", 0))]
        hosts = plain or hosts
    want = {"CPU": float(cpus_per_worker), **need} if cpus_per_worker > 0 else {"CPU": min_cpus, **need}
    hosts = [s for s in hosts if _fits(want, s.resources or {})]
    if not hosts:
        if unknown:  # a launcher type without declared resources may still fit: do not fail, say so
            cpus = float(cpus_per_worker) or 1.0
            return WorkerPlan({"CPU": cpus, **need}, max(1, int(cpus)), [s.name for s in unknown],
                              f"no known node shape fits {want}; sized {cpus:g} CPUs for node types of unknown "
                              f"shape ({', '.join(s.name for s in unknown)})")
        raise PlacementError(
            f"no node can ever host a Ray Train worker asking for {_fmt(want)} (scale.num_workers={num_workers}"
            f"{', scale.use_gpu=true' if use_gpu else ''}): the cluster's node shapes are {describe(shapes)}. "
            f"Lower scale.cpus_per_worker / scale.gpus_per_worker / scale.worker_resources, or add a node type "
            f"that has them")
    names = [s.name for s in hosts]
    if cpus_per_worker > 0:
        cpus = float(cpus_per_worker)
        note = f"{cpus:g} CPUs per worker (scale.cpus_per_worker)"
    else:
        def left(s: NodeShape) -> float:  # a node's CPUs after Ray Data's reserve
            c = float((s.resources or {})["CPU"])
            return c - max(data_reserve, data_share * c)

        def per_node(s: NodeShape) -> float:
            res = s.resources or {}
            slots = max(1, math.floor(float(res.get("GPU", 0)) / gpus_per_worker + 1e-9)) if use_gpu else 1
            return left(s) / slots

        cap = min(per_node(s) for s in hosts)
        cpus = cap
        note = f"the smallest hosting node type leaves {cap:g} CPUs per worker after Ray Data's reserve"
        if not use_gpu:
            room = sum(s.alive * left(s) for s in hosts if s.alive)
            launch = any(s.can_launch for s in hosts)
            if room / num_workers < cpus and (room / num_workers >= min_cpus or not launch):
                cpus = room / num_workers  # they fit on the alive nodes (or must: nothing can be launched)
                note = f"the alive hosting nodes' {room:g} CPUs after Ray Data's reserve, over {num_workers} workers"
        cpus = max(min_cpus, math.floor(cpus * 100 + 1e-9) / 100)
    req = {"CPU": cpus, **need}
    return WorkerPlan(req, max(1, int(cpus + 1e-9)), names, note)


def _fmt(req: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in req.items()) + "}"
