"""THE per-worker loop for Ray Train: one function serves f_base training, per-round pretraining and
confusion training, for 1..N workers (DDP over gloo on CPU, nccl on GPU).

Data: each worker reads its Ray Data shard of the usable train set once per fit, keeps the samples of
the round's set D_r (given as sample ids) in memory as uint8, and samples batches from it; scoring of
all of D streams through Ray Data on the driver side (``ctray.engine.score``). The memory a worker
holds is |D_r| / num_workers images, uint8: rounds after the first shrink it to N/5, N/25, ...

Schedule: every step count is global. An epoch has ``ceil(|set| / global_batch)`` steps on every
worker; the confusion shift s_t and the mixed-vs-confusion-only decision are functions of the global
step t; every worker agrees by construction (no communication needed for it).

Fault tolerance: with worker processes, the loop reports a Ray Train checkpoint at every phase boundary
(after f_base, after pretraining) and inside a phase when :class:`CheckpointClock` says so (every
``scale.checkpoint_minutes`` of wall time, or ``scale.checkpoint_every`` steps), holding the model being
trained, the optimizer (and lr scheduler) state, the step counter and every rank's sampler and
augmentation generator state. What the run directory already holds is left out: a finished phase's
weights (f_base, the round's base) are written to the round's directory when the phase ends and the
checkpoint keeps a reference with their SHA-256; a sampler keeps the generator state its permutation was
drawn from, not the permutation. Uploads run in the background (``scale.checkpoint_async``). When Ray
Train restarts a failed worker group, the loop reads ``ray.train.get_checkpoint()`` and continues from
that position; with the same data shares (always for one worker) the continuation is the same
computation as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ctray.core.placement import local_cores
from ctray.models import build_model
from ctray.models.checkpoint import ModelSpec, load_state, save_model
from ctray.progress import Progress
from ctray.training.steps import (
    augment,
    confusion_shift,
    confusion_step,
    is_mixed_step,
    pretrain_step,
    score_batch,
    to_input,
)

log = logging.getLogger("ctray.train")

FBASE = "fbase.pt"
BASE = "base.pt"
CONFUSED = "confused.pt"
#: In-round Ray Train checkpoint files: rank 0's models/optimizer, every rank's samplers, a description.
TRAIN_STATE = "train_state.pt"
RANK_STATE = "rank_{}.pt"
CKPT_META = "meta.json"
#: The phases of one fit, in order; a checkpoint position is (phase, steps done in it).
PHASES = ("f_base", "pretrain", "confusion")


@dataclass
class LocalSet:
    """A worker's in-memory part of a dataset: ``images uint8 (n, H, W, C)``, ``labels int64 (n,)``,
    ``sids int64 (n,)``."""

    images: torch.Tensor
    labels: torch.Tensor
    sids: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, mask: np.ndarray) -> LocalSet:
        m = torch.from_numpy(mask).to(self.images.device)
        return LocalSet(self.images[m], self.labels[m], self.sids[mask])

    def to(self, device: torch.device) -> LocalSet:
        """The same set with its tensors on ``device`` (sample ids stay a NumPy array)."""
        return LocalSet(self.images.to(device), self.labels.to(device), self.sids)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a CPU tensor bound for a GPU goes through pinned memory, asynchronously (the
    copy overlaps the work already queued on the device)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def warmup_factor(step: int, warm_steps: int, k: int) -> float:
    """The lr multiplier at ``step`` (0-based) of a linear warm-up from the recipe's lr (``1/k`` of the
    scaled lr) to the scaled lr over ``warm_steps`` steps: ``(1 + (k - 1) * min(1, step / warm_steps)) / k``,
    in ``[1/k, 1]``; 1 from ``warm_steps`` on (Goyal et al., 2017)."""
    if k <= 1 or warm_steps <= 0 or step >= warm_steps:
        return 1.0
    return (1.0 + (k - 1) * step / warm_steps) / k


def device_budget_bytes(setting: str, total: int) -> int:
    """Bytes of a worker's uint8 training set it may keep on its GPU (``scale.device_cache_bytes``):
    the setting in bytes, or for ``auto`` a quarter of the device's ``total`` memory (the model,
    optimizer and activations of these small-image models use far less than the rest)."""
    from ctray.core.budget import parse_bytes

    val = parse_bytes(setting)
    return val if val is not None else total // 4


class Sampler:
    """Endless per-worker batches: a fresh seeded permutation of the local set per local epoch."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch = n, batch
        self.gen = torch.Generator().manual_seed(seed)
        self._draw()

    def _draw(self) -> None:
        """A new permutation; the generator state it was drawn from is kept instead of the permutation
        in :meth:`state_dict` (a few KB, where the permutation is 8 bytes per local sample)."""
        self.perm_gen: torch.Tensor | None = self.gen.get_state()
        self.perm = torch.randperm(self.n, generator=self.gen) if self.n else torch.empty(0, dtype=torch.long)
        self.pos = 0

    def next(self) -> torch.Tensor:
        out = []
        need = self.batch
        while need > 0:
            if self.pos >= self.n:
                self._draw()
            take = min(need, self.n - self.pos)
            out.append(self.perm[self.pos:self.pos + take])
            self.pos += take
            need -= take
        return torch.cat(out)

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`next` depends on: generator state, the state the current permutation was
        drawn from (it is redrawn on load, not stored), position."""
        st = {"n": self.n, "batch": self.batch, "gen": self.gen.get_state(), "pos": self.pos}
        if self.perm_gen is None:  # restored from an earlier version's state: its permutation, as it was
            return {**st, "perm": self.perm.clone()}
        return {**st, "perm_gen": self.perm_gen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the sampler that produced ``state`` stopped.

        Raises:
            ValueError: ``state`` belongs to a sampler over another set size or batch size.
        """
        if int(state["n"]) != self.n or int(state["batch"]) != self.batch:
            raise ValueError(f"sampler state for n={state['n']}, batch={state['batch']} does not fit "
                             f"n={self.n}, batch={self.batch}")
        if "perm" in state:  # a checkpoint of an earlier version stored the permutation itself
            self.perm, self.perm_gen = state["perm"].clone(), None
        else:
            self.gen.set_state(state["perm_gen"])
            self.perm, self.perm_gen = torch.randperm(self.n, generator=self.gen), state["perm_gen"]
        self.gen.set_state(state["gen"])
        self.pos = int(state["pos"])


class MemoryBatches:
    """Batches of an in-memory :class:`LocalSet` drawn by a :class:`Sampler` (the fast path)."""

    streaming = False

    def __init__(self, data: LocalSet, batch: int, seed: int):
        self.data, self.sampler = data, Sampler(len(data), batch, seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.sampler.next()
        return self.data.images[idx], self.data.labels[idx]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def restore(self, own: dict[str, Any] | None, name: str, rank: int) -> None:
        _restore_sampler(self.sampler, own, name, rank)

    def close(self) -> None:
        pass


class StreamBatches:
    """Endless batches streamed from this worker's Ray Data shard, for a set too large for the worker's
    memory budget: ``uint8`` images and ``int64`` labels of exactly ``batch`` rows per :meth:`next`.

    Memory: Ray's local shuffle buffer (``shuffle_rows`` rows) plus one chunk; never the whole set.
    Epochs are aligned to the GLOBAL step: every ``steps_per_epoch`` calls, each worker drains what is
    left of its epoch and starts the next one, so all workers start an epoch together (``streaming_split``
    starts an epoch on all splits at once; a worker that restarted on its own would wait for the others
    while they wait for it in DDP's all-reduce). A worker whose share runs out a few rows before the
    epoch's last step (Ray equalises rows, the local batch sizes differ by one) repeats rows of its last
    batch; one whose share is larger leaves a tail under one batch unseen for that epoch (and drains it).
    ``keep`` (int64 sample ids) filters rows while streaming. ``extra`` (an in-memory set, e.g. the
    reserve with shifted labels) is mixed in at its share of ``n_set + len(extra)`` rows per batch.
    """

    streaming = True

    def __init__(self, name: str, batch: int, steps_per_epoch: int, seed: int, shuffle_rows: int,
                 keep: np.ndarray | None = None, extra: LocalSet | None = None, n_set: int = 0):
        import ray.train

        self.shard = ray.train.get_dataset_shard(name)
        self.batch, self.steps_per_epoch, self.seed = batch, max(1, steps_per_epoch), seed
        self.shuffle_rows, self.keep, self.extra = max(batch, shuffle_rows), keep, extra
        self.p_extra = len(extra) / (n_set + len(extra)) if extra is not None and n_set + len(extra) else 0.0
        self.rng = np.random.default_rng(seed)
        self.epoch, self.step, self.it = 0, 0, None
        self.carry_x: list[np.ndarray] = []
        self.carry_y: list[np.ndarray] = []
        self.last: tuple[np.ndarray, np.ndarray] | None = None
        self.repeated = 0

    def _start(self) -> None:
        self.it = iter(self.shard.iter_batches(batch_size=max(64, self.batch), batch_format="numpy",
                                               local_shuffle_buffer_size=self.shuffle_rows,
                                               local_shuffle_seed=self.seed * 1009 + self.epoch))

    def _pull(self, need: int) -> tuple[np.ndarray, np.ndarray]:
        have = sum(len(y) for y in self.carry_y)
        while have < need and self.it is not None:
            b = next(self.it, None)
            if b is None:
                self.it = None
                break
            x, y = b["image"], b["label"].astype(np.int64)
            if self.keep is not None:
                m = np.isin(b["sid"], self.keep)
                x, y = x[m], y[m]
            if len(y):
                self.carry_x.append(np.ascontiguousarray(x))
                self.carry_y.append(y)
                have += len(y)
        if not self.carry_y:
            return np.empty((0,)), np.empty((0,), np.int64)
        x, y = np.concatenate(self.carry_x), np.concatenate(self.carry_y)
        self.carry_x, self.carry_y = ([x[need:]], [y[need:]]) if len(y) > need else ([], [])
        return x[:need], y[:need]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step == self.steps_per_epoch or self.it is None and self.step == 0:
            self._stop()  # the tail of this worker's epoch (under one batch) is left unread
            if self.step:
                self.epoch += 1
            self.step, self.carry_x, self.carry_y = 0, [], []
            self._start()
        self.step += 1
        n_extra = int(self.rng.binomial(self.batch, self.p_extra)) if self.p_extra else 0
        x, y = self._pull(self.batch - n_extra)
        short = self.batch - n_extra - len(y)
        if short > 0:  # this worker's share ran out before the epoch's last step: repeat rows
            if self.last is None and not len(y):
                raise RuntimeError(f"dataset shard {self.shard} yielded no row for this worker")
            px, py = (x, y) if len(y) else self.last  # type: ignore[misc]
            pick = self.rng.integers(0, len(py), short)
            x, y = np.concatenate([x, px[pick]]) if len(y) else px[pick], np.concatenate([y, py[pick]])
            self.repeated += short
        self.last = (x, y)
        xt, yt = torch.from_numpy(np.array(x, copy=True)), torch.from_numpy(y)
        if n_extra:
            assert self.extra is not None
            pick_t = torch.from_numpy(self.rng.integers(0, len(self.extra), n_extra))
            xt, yt = torch.cat([xt, self.extra.images[pick_t]]), torch.cat([yt, self.extra.labels[pick_t]])
        return xt, yt

    def state_dict(self) -> dict[str, Any]:
        return {"stream": True, "epoch": self.epoch, "step": self.step}

    def _stop(self) -> None:
        """Abandon the current epoch's iterator, releasing its shuffle buffer and prefetched blocks. Not
        drained: every worker stops at the same global step, and the shard's next epoch (Ray's
        ``streaming_split`` starts it once all workers ask, and shuts the previous execution down) starts
        on every worker together. Draining read the rest of the epoch: at 500,000 samples, 100 confusion
        iterations over D_0 = D cost a whole pass over D."""
        it, self.it = self.it, None
        self.carry_x, self.carry_y = [], []
        if it is not None and hasattr(it, "close"):
            it.close()

    def close(self) -> None:
        """End this reader (at a phase end, on every worker at the same global step): stop the epoch's
        iterator and give the freed memory back (:func:`ctray.memory.release_free_memory`)."""
        import gc

        from ctray.memory import release_free_memory

        self._stop()
        self.last = None
        gc.collect()
        release_free_memory()
        if self.repeated:
            log.info("streamed %r: %d rows repeated at epoch ends (uneven worker shares)", self.shard, self.repeated)

    def restore(self, own: dict[str, Any] | None, name: str, rank: int) -> None:
        """A resumed streaming phase keeps the global step schedule; the stream restarts at an epoch
        start with that epoch's seed (so the order differs from the interrupted run's)."""
        st = (own or {}).get("samplers", {}).get(name) or {}
        if st.get("stream"):
            self.epoch = int(st.get("epoch", 0))
            log.warning("[w%d] streaming %r resumes at epoch %d from the epoch's start (order not replayed)",
                        rank, name, self.epoch)


def worker_budget_bytes(setting: str, local_world: int) -> int:
    """The bytes of decoded images a training worker may hold in memory: ``setting`` in bytes
    (``data.worker_cache_bytes``), or for ``auto`` 20% of this machine's physical memory shared by the
    ``local_world`` workers on it."""
    from ctray.core.budget import parse_bytes

    val = parse_bytes(setting)
    if val is not None:
        return val
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30
    return int(0.2 * total / max(1, local_world))


def local_batch(global_batch: int, rank: int, world: int) -> int:
    """This rank's share of a global batch (the global batch stays fixed whatever the worker count,
    as the reference's DataParallel runs do; specs/ct.md §2)."""
    return global_batch // world + (1 if rank < global_batch % world else 0)


def _allreduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    """``t`` reduced over the ranks (sum by default; ``t`` itself without a process group). NCCL reduces
    device tensors only: a CPU tensor goes to this rank's GPU and back."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dev = t.device
        t = t.clone()
        if dist.get_backend() == "nccl" and dev.type != "cuda":
            t = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
        t = t.to(dev)
    return t


def _allreduce_sum(t: torch.Tensor) -> torch.Tensor:
    return _allreduce(t)


class CheckpointClock:
    """When the loop reports an in-round checkpoint: every ``every`` steps (0 = never by steps) and/or
    once ``seconds`` of wall time have passed since the last one (0 = never by time).

    Every rank must decide the same at the same global step, since a report is a barrier. With one
    rank the time is checked every step; with several, rank clocks differ, so the ranks agree every
    ``sync_steps`` steps with a one-element all-reduce (MAX) of "my clock says it is time": a
    checkpoint comes at most ``sync_steps`` steps late, for one tiny collective per ``sync_steps``
    steps (the gradient all-reduce of each step is millions of elements).

    Args:
        every: steps between checkpoints, >= 0.
        seconds: wall seconds between checkpoints, >= 0.
        world: ranks; each must call :meth:`due` with the same step sequence.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, every: int, seconds: float, world: int = 1, sync_steps: int = 32,
                 clock: Any = time.monotonic):
        if every < 0 or seconds < 0 or sync_steps < 1:
            raise ValueError(f"checkpoint clock needs every >= 0, seconds >= 0, sync_steps >= 1; got "
                             f"{every}, {seconds}, {sync_steps}")
        self.every, self.seconds, self.world, self.sync_steps, self._clock = every, seconds, world, sync_steps, clock
        self.last = clock()

    def reset(self) -> None:
        """A checkpoint was just reported (also at phase boundaries): the time interval restarts."""
        self.last = self._clock()

    def due(self, step: int) -> bool:
        """True when a checkpoint should follow step ``step`` (steps done in the phase, >= 1)."""
        if self.every and step % self.every == 0:
            return True
        if not self.seconds:
            return False
        late = self._clock() - self.last >= self.seconds
        if self.world == 1:
            return late
        if step % self.sync_steps:
            return False
        return bool(_allreduce(torch.tensor([int(late)]), dist.ReduceOp.MAX)[0])


def _load_local(name: str, keep: np.ndarray | None) -> LocalSet:
    """Iterate this worker's shard of dataset ``name`` once; keep rows whose sid is in ``keep``."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    imgs, labels, sids = [], [], []
    for b in shard.iter_batches(batch_size=4096, batch_format="numpy"):
        s = b["sid"]
        m = np.isin(s, keep) if keep is not None else np.ones(len(s), bool)
        if m.any():
            imgs.append(np.ascontiguousarray(b["image"][m]))
            labels.append(b["label"][m].astype(np.int64))
            sids.append(s[m])
    if not imgs:
        return LocalSet(torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), np.empty(0, np.int64))
    sid = np.concatenate(sids)
    order = np.argsort(sid, kind="stable")  # block arrival order varies between runs; sid order does not
    return LocalSet(torch.from_numpy(np.concatenate(imgs)[order]), torch.from_numpy(np.concatenate(labels)[order]),
                    sid[order])


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    m: torch.nn.Module = getattr(model, "module", model)  # unwrap DDP
    return {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}


def load_weights(ckpt_dir: str, filename: str) -> dict[str, torch.Tensor]:
    """The state dict saved by the loop under a round's checkpoint directory (local path or URI)."""
    from ctray import io as cio

    return load_state(cio.join(ckpt_dir, filename))


def _predict(model: torch.nn.Module, data: LocalSet, mean: float, std: float, device: torch.device,
             bs: int = 512) -> torch.Tensor:
    m: torch.nn.Module = getattr(model, "module", model)  # unwrap DDP
    preds = []
    for i in range(0, len(data), bs):
        x = to_input(data.images[i:i + bs].to(device), mean, std)
        preds.append(score_batch(m, x, data.labels[i:i + bs].to(device))["pred"].cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


@dataclass
class Resume:
    """A position restored from an in-round Ray Train checkpoint.

    ``phase`` (one of :data:`PHASES`) had done ``step`` steps, or ``phase == "done"`` when the whole
    fit had finished. ``shared`` holds rank 0's tensors (``fbase``, ``base``, ``model``, ``opt``,
    ``sched``; for ``done`` the bytes of the round's weight files by name), ``own`` this rank's sampler and
    generator states (None when the checkpoint has none for this rank), ``meta`` the description.
    """

    phase: str
    step: int
    shared: dict[str, Any]
    own: dict[str, Any] | None
    meta: dict[str, Any]

    def steps_done(self, phase: str) -> int | None:
        """Steps already done in ``phase``: 0 when it starts afresh, None when it is complete."""
        if self.phase == "done":
            return None
        have, want = PHASES.index(self.phase), PHASES.index(phase)
        return None if want < have else (self.step if want == have else 0)

    def describe(self) -> str:
        return "the finished fit" if self.phase == "done" else f"{self.phase} step {self.step}"


def read_resume(rank: int) -> Resume | None:
    """The latest checkpoint Ray Train hands this worker (``ray.train.get_checkpoint()``), or None on a
    first attempt. Tensors are loaded with ``weights_only=True``."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        with open(os.path.join(d, CKPT_META)) as f:
            meta = json.load(f)

        def load(name: str) -> Any:
            return torch.load(os.path.join(d, name), map_location="cpu", weights_only=True)

        if meta.get("phase") == "done":
            files = {}  # the round's weight files (ctray checkpoints), copied byte for byte
            for n in (BASE, CONFUSED, FBASE):
                if os.path.exists(os.path.join(d, n)):
                    with open(os.path.join(d, n), "rb") as fh:
                        files[n] = fh.read()
            return Resume("done", 0, files, None, meta)
        own_path = os.path.join(d, RANK_STATE.format(rank))
        own = load(RANK_STATE.format(rank)) if os.path.exists(own_path) else None
        return Resume(str(meta["phase"]), int(meta["step"]), load(TRAIN_STATE), own, meta)


def _report_position(r: int, rank: int, phase: str, step: int, shared: Any, own: dict[str, Any],
                     upload_async: bool = False) -> None:
    """Report an in-round checkpoint; every rank calls this at the same global step (a barrier).

    Rank 0 writes ``shared()`` (models, optimizer, scheduler; finished phases' weights as references to
    the run directory's files) and ``meta.json``; each rank writes its own sampler/generator states; Ray
    Train merges the ranks' files into one checkpoint directory, uploaded in the background when
    ``upload_async``.
    """
    import ray
    import ray.train

    d = tempfile.mkdtemp(prefix="ctray-ckpt-")
    try:
        if rank == 0:
            torch.save(shared(), os.path.join(d, TRAIN_STATE))
            meta = {"round": r, "phase": phase, "step": step, "pid": os.getpid(),
                    "node": ray.get_runtime_context().get_node_id(), "time": time.time()}
            with open(os.path.join(d, CKPT_META), "w") as f:
                json.dump(meta, f)
        torch.save(own, os.path.join(d, RANK_STATE.format(rank)))
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    ckpt = ray.train.Checkpoint.from_directory(d)
    metrics = {"round": r, "phase": phase, "step": step}
    if upload_async:
        # The state is on local disk already (a consistent snapshot of this step); Ray Train uploads it
        # from a background thread and deletes the directory, and training goes on. A failure before the
        # upload is registered resumes from the previous checkpoint, as any earlier failure would.
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
        return
    try:
        ray.train.report(metrics, checkpoint=ckpt)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _restore_sampler(sampler: Sampler, own: dict[str, Any] | None, name: str, rank: int) -> None:
    st = (own or {}).get("samplers", {}).get(name)
    if st is None:
        log.warning("[w%d] no saved state for sampler %r: it starts afresh", rank, name)
        return
    try:
        sampler.load_state_dict(st)
    except ValueError as e:  # another data share after the restart (N workers): same schedule, new order
        log.warning("[w%d] sampler %r starts afresh: %s", rank, name, e)


def _publish_phase(cache: dict[str, Any], state: dict[str, torch.Tensor], spec: ModelSpec, extra: dict[str, Any]) -> None:
    """Publish a finished phase's weights to the phase cache (``cache``: ``kind``, ``root``, ``key``,
    ``fields``, ``max_bytes``) when the phase ends, so a sweep's waiting runs need not wait for the whole
    fit. A failure is logged, not raised: the run goes on and the driver publishes after the fit."""
    from ctray.models.checkpoint import model_bytes
    from ctray.training.phasecache import publish

    try:
        publish(cache["root"], cache["kind"], cache["key"], model_bytes(state, spec, extra), cache["fields"],
                int(cache.get("max_bytes", 0)))
    except Exception as e:
        log.warning("phase cache: %s could not be published from the training loop: %s", cache["kind"], e)


def train_loop_per_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Run one fit's phases on this worker. ``job`` keys:

    ``cfg`` (Config as dict), ``num_classes``, ``mode`` (``"ct"``, the default: one CT round;
    ``"train"``: f_base's recipe only, for ``ctray train`` and retraining on a cleansed set), ``round``
    (int), ``train_fbase`` (bool), ``fbase_ckpt``, ``prev_base_ckpt`` (checkpoint directories, local path
    or URI, or None), ``keep`` (int64 sids of D_r, None = all of D), ``ckpt_dir`` (where this round's
    weights go), ``checkpoint_every`` (steps between in-round Ray Train checkpoints; 0 = not by steps;
    None = no in-round checkpoints at all, for local mode), ``checkpoint_seconds`` (wall seconds between
    them; 0 = not by time), ``checkpoint_async`` (upload them in the background); in ``"train"`` mode
    ``model_out`` (the checkpoint file to write)
    and ``extra`` (its provenance dict); ``phase_cache`` (optional: ``{"fbase": ..., "base0": ...}``,
    where f_base / round 0's pretrained model are published when their phase ends,
    :mod:`ctray.training.phasecache`), ``base0_ckpt`` (optional, round 0: a directory whose ``base.pt`` is
    round 0's pretrained model, from the phase cache; pretraining is skipped).

    In ``"ct"`` mode rank 0 writes ``base.pt`` (pretrained model of the round), ``confused.pt`` and, when
    trained here, ``fbase.pt`` + ``meta.json`` to ``ckpt_dir`` (the run directory: shared storage on a
    cluster; Ray Train's local mode does not persist its own checkpoints) and reports the same files to
    Ray Train. All weight files are :mod:`ctray.models.checkpoint` files. A restarted worker continues
    from ``ray.train.get_checkpoint()`` (module docstring).
    Returns per-phase timings, and ``resumed_from`` (a position, or None on an uninterrupted fit).
    """
    import ray.train
    import ray.train.torch

    from ctray import io as cio

    cfg, C, r = job["cfg"], int(job["num_classes"]), int(job.get("round", 0))
    mode = job.get("mode", "ct")
    ct, base_cfg, data_cfg, scale = cfg["ct"], cfg["base"], cfg["data"], cfg["scale"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = min(scale["torch_threads"] or 1, local_cores())  # sized by the driver; capped by this machine
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device() if scale["use_gpu"] else torch.device("cpu")
    mean, std = data_cfg["mean"], data_cfg["std"]
    seed = int(cfg["seed"]) * 1000 + r
    every = job.get("checkpoint_every")
    bscale = int(ct.get("batch_scale", 1) or 1)  # f_base and pretraining: k x batch and lr (run_steps)
    clock = (CheckpointClock(int(every), float(job.get("checkpoint_seconds") or 0), world)
             if every is not None else None)
    times: dict[str, float] = {}
    steps: dict[str, int] = {}  # optimizer steps of each phase run in this fit (rounds.json phase_steps)
    t0 = time.monotonic()

    resume = read_resume(rank)
    if resume is not None:
        log.warning("[w%d] round %d: restarted by Ray Train; resuming from the checkpoint at %s (written by pid %s)",
                    rank, r, resume.describe(), resume.meta.get("pid"))
        if resume.phase == "done":  # the fit had finished; make sure the round's files are in place
            if rank == 0:
                for name, blob in resume.shared.items():
                    cio.write_bytes(cio.join(job["ckpt_dir"], name), blob)
                cio.write_json(cio.join(job["ckpt_dir"], CKPT_META), resume.meta)
            return {"round": r, "n_dr": resume.meta.get("n_dr", 0), "times": resume.meta.get("times", {}),
                    "world": world, "resumed_from": resume.describe()}

    def done_in(phase: str) -> int | None:
        return 0 if resume is None else resume.steps_done(phase)

    keep = job.get("keep")
    reserve = _load_local("reserve", None) if mode == "ct" else None
    # What this worker holds: the sets that fit its budget, loaded by filtering on sample ids while
    # streaming its shard once; the others stream every epoch (StreamBatches). Without the driver's
    # counts (n_total, image_shape) everything is loaded, as before the streaming path existed.
    shape = job.get("image_shape")
    n_total = job.get("n_total")
    n_keep = len(keep) if keep is not None else n_total
    need_full = mode == "ct" and bool(job.get("train_fbase")) and done_in("f_base") is not None
    # a set no larger than the shuffle buffer is held whole: streaming it would hold as much in the buffer
    shuffle_bytes = int(data_cfg.get("shuffle_bytes", 256 * 2**20))
    budget = max(worker_budget_bytes(str(data_cfg.get("worker_cache_bytes", "auto")), ctx.get_local_world_size()),
                 shuffle_bytes)
    per = 1 if shape is None else int(np.prod(shape))

    def fits(n: int | None) -> bool:
        return shape is None or n is None or math.ceil(n / world) * per <= budget

    full: LocalSet | None = None
    dr: LocalSet | None
    if need_full and fits(n_total):
        full = _load_local("train", None)
        dr = full.subset(np.isin(full.sids, keep)) if keep is not None else full
    else:
        dr = _load_local("train", keep) if fits(n_keep) else None
    stream_full = need_full and full is None
    if dr is None or stream_full:
        log.info("[w%d] round %d: streaming %s from the worker's Ray Data shard (budget %.0f MB per worker; "
                 "D %s, D_r %s samples)", rank, r, "D and D_r" if dr is None else "D", budget / 1e6, n_total, n_keep)
    n_dr = int(_allreduce_sum(torch.tensor([len(dr)]))[0]) if dr is not None else int(n_keep or 0)
    times["load"] = time.monotonic() - t0
    if (dr is not None and len(dr) == 0) or (reserve is not None and len(reserve) == 0):
        raise RuntimeError(f"worker {rank}: empty local share (D_r {len(dr) if dr is not None else '-'}, reserve "
                           f"{len(reserve) if reserve is not None else '-'}); use fewer workers for this data size")
    if shape is not None:
        size, in_ch = int(shape[0]), int(shape[2])
    else:
        assert dr is not None
        size, in_ch = int(dr.images.shape[1]), int(dr.images.shape[3])
    shuffle_rows = max(1024, shuffle_bytes // max(1, per))

    def batches(data: LocalSet | None, batch: int, seed_: int, n_global: int, global_bs: int,
                subset: np.ndarray | None, extra: LocalSet | None = None) -> MemoryBatches | StreamBatches:
        """In-memory batches of ``data`` (+ ``extra``), or a stream of the shard filtered to ``subset``."""
        if data is not None:
            if extra is not None:
                data = LocalSet(torch.cat([data.images, extra.images]), torch.cat([data.labels, extra.labels]),
                                np.concatenate([data.sids, extra.sids]))
            return MemoryBatches(data, batch, seed_)
        return StreamBatches("train", batch, math.ceil(n_global / global_bs), seed_, shuffle_rows, subset, extra,
                             n_set=math.ceil(int((n_keep if subset is not None else n_total) or 0) / world))
    # finished phases' weights for later checkpoints: on rank 0 references to the run directory's files
    # (written when the phase ends, so no checkpoint carries them again); None on other ranks
    held: dict[str, Any] = {"fbase": None, "base": None}

    def spec_of(arch: str) -> ModelSpec:
        return ModelSpec(arch, in_ch, C, size, float(mean), float(std))

    def file_extra(name: str) -> dict[str, Any]:
        # f_base trains with base.augment, CT's models without augmentation (specs/ct.md §1.2)
        return {"round": r, "phase": name[:-3], "n_dr": n_dr, "augment": base_cfg["augment"] if name == FBASE else "none"}

    published: dict[str, str] = {}  # run-directory files rank 0 wrote at their phase's end -> SHA-256

    def new_model(arch: str, seed_: int) -> torch.nn.Module:
        torch.manual_seed(seed_)  # same init on every rank (DDP also broadcasts rank 0's)
        return build_model(arch, in_ch, C, size)

    def prep(m: torch.nn.Module) -> torch.nn.Module:
        if scale.get("sync_batchnorm") and world > 1:  # validated: GPU workers only
            m = torch.nn.SyncBatchNorm.convert_sync_batchnorm(m)
        return ray.train.torch.prepare_model(m) if world > 1 or scale["use_gpu"] else m

    def publish(name: str, state: dict[str, torch.Tensor], arch: str) -> Any:
        """A finished phase's weights, for later in-round checkpoints: rank 0 writes the round's file now
        and keeps ``{"ref", "sha256"}`` (only rank 0 writes checkpoints; None elsewhere)."""
        if clock is None or rank != 0:
            return None  # not checkpointed here (local mode), or not this rank's to write
        digest = save_model(cio.join(job["ckpt_dir"], name), state, spec_of(arch), file_extra(name))
        published[name] = digest
        return {"ref": name, "sha256": digest}

    def unref(value: Any) -> Any:
        """A held weight from a checkpoint: the tensors, read back from the run directory for a reference
        (checked against the digest it was written with)."""
        if isinstance(value, dict) and "ref" in value:
            return load_state(cio.join(job["ckpt_dir"], value["ref"]), value["sha256"])
        return value

    def save(phase: str, step: int, model: torch.nn.Module | None = None, opt: Any = None, sched: Any = None,
             samplers: dict[str, Any] | None = None, gen: torch.Generator | None = None) -> None:
        if clock is None:
            return

        def shared() -> dict[str, Any]:
            return {"fbase": held["fbase"] if job.get("train_fbase") else None, "base": held["base"],
                    "model": _state(model) if model is not None else None,
                    "opt": opt.state_dict() if opt is not None else None,
                    "sched": sched.state_dict() if sched is not None else None}

        own = {"samplers": {k: v.state_dict() for k, v in (samplers or {}).items()},
               "gen": gen.get_state() if gen is not None else None}
        _report_position(r, rank, phase, step, shared, own, bool(job.get("checkpoint_async")))
        clock.reset()

    def restore(model: torch.nn.Module, start: int) -> torch.nn.Module:
        """Load the checkpoint's mid-phase model weights (before DDP wrapping) when resuming a phase."""
        if start and resume is not None:
            model.load_state_dict(resume.shared["model"])
        return model

    def restore_opt(opt: Any, sched: Any, start: int) -> None:
        if start and resume is not None:
            opt.load_state_dict(resume.shared["opt"])
            if sched is not None:
                sched.load_state_dict(resume.shared["sched"])

    def run_steps(name: str, phase: str, model: torch.nn.Module, opt: torch.optim.Optimizer, data: LocalSet | None,
                  n_global: int, global_bs: int, epochs: int, aug: str, sched: Any = None, start: int = 0,
                  subset: np.ndarray | None = None, extra: LocalSet | None = None) -> None:
        """``epochs`` epochs of plain steps on ``data`` (+ ``extra``); ``data=None`` streams the shard
        (filtered to ``subset``). ``n_global`` samples in all workers' sets together. With
        ``ct.batch_scale`` k > 1, ``global_bs`` and the optimizer's lr are already k times the recipe's;
        the lr ramps linearly from 1x to kx over ``ct.warmup_epochs`` (:func:`warmup_factor`)."""
        steps_per_epoch = math.ceil(n_global / global_bs)
        total = steps_per_epoch * epochs
        warm = int(round(float(ct.get("warmup_epochs", 0) or 0) * steps_per_epoch)) if bscale > 1 else 0
        src = batches(data, local_batch(global_bs, rank, world), seed * 7919 + rank + zlib.crc32(name.encode()) % 997,
                      n_global, global_bs, subset, extra)
        gen = torch.Generator().manual_seed(seed + rank)
        if start and resume is not None:
            src.restore(resume.own, "main", rank)
            own = resume.own or {}
            if own.get("gen") is not None:
                gen.set_state(own["gen"])
        # the ramp's target: the recipe's lr x k (f_base's warm-up ends before its first milestone, validated,
        # so no decay is due yet; MultiStepLR scales the group's current lr at its milestones)
        target = (base_cfg["lr"] if phase == "f_base" else ct["pretrain_lr"]) * bscale

        prog = Progress(log, f"[w{rank}] {name}", total - start, "steps")
        for s in range(start, total):
            if s <= warm and warm:  # the scaled lr times the ramp; exactly the scaled lr at s == warm
                f = warmup_factor(s, warm, bscale)
                for g in opt.param_groups:
                    g["lr"] = target * f
            imgs, labels = src.next()
            if aug != "none":
                imgs = augment(imgs, aug, gen)
            pretrain_step(model, opt, to_input(to_device(imgs, device), mean, std), to_device(labels, device))
            prog.update()
            if sched is not None and (s + 1) % steps_per_epoch == 0:
                sched.step()
            if clock is not None and s + 1 < total and clock.due(s + 1):
                save(phase, s + 1, model, opt, sched, {"main": src}, gen)
        src.close()
        times[name] = prog.close()
        steps[name] = total

    # ---- f_base: plain training on all of D, with augmentation (its predictions label the confusion batch).
    # "train" mode runs this recipe alone, on D or on the kept subset (retraining on a cleansed set).
    start = done_in("f_base")
    if (job.get("train_fbase") or mode == "train") and start is not None:
        fb = prep(restore(new_model(base_cfg["arch"], seed + 17), start).to(device))
        opt = torch.optim.SGD(fb.parameters(), lr=base_cfg["lr"] * bscale, momentum=base_cfg["momentum"],
                              weight_decay=base_cfg["weight_decay"])
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, base_cfg["milestones"], base_cfg["gamma"])
        restore_opt(opt, sched, start)
        fit_set = dr if mode == "train" else full
        # base.max_samples: f_base fits a uniform sample of D (the driver's ids), not all of it
        fb_keep = job.get("fbase_keep") if mode == "ct" else None
        fit_subset = keep if mode == "train" else fb_keep
        if fit_set is not None and fb_keep is not None:
            fit_set = fit_set.subset(np.isin(fit_set.sids, fb_keep))
        if fit_set is not None:
            n_fit = int(_allreduce_sum(torch.tensor([len(fit_set)]))[0])
        else:
            n_fit = int((n_keep if mode == "train" else (len(fb_keep) if fb_keep is not None else n_total)) or 0)
        run_steps("f_base" if mode == "ct" else "train", "f_base", fb, opt, fit_set, n_fit, base_cfg["batch_size"] * bscale,
                  base_cfg["epochs"], base_cfg["augment"], sched, start, subset=fit_subset)
        fbase_state = _state(fb)
        if mode == "train":
            if rank == 0:
                save_model(job["model_out"], fbase_state, spec_of(base_cfg["arch"]),
                           {**(job.get("extra") or {}), "n_train": n_fit, "times": times})
            ray.train.report({"n_train": n_fit})
            return {"n_train": n_fit, "times": times, "world": world, "resumed_from": None}
        held["fbase"] = publish(FBASE, fbase_state, base_cfg["arch"])
        if rank == 0 and (job.get("phase_cache") or {}).get("fbase"):  # a sweep's other runs wait for it
            _publish_phase(job["phase_cache"]["fbase"], fbase_state, spec_of(base_cfg["arch"]), file_extra(FBASE))
        save("pretrain", 0)
    else:
        if job.get("train_fbase"):
            assert resume is not None  # start is None only past f_base
            held["fbase"] = resume.shared["fbase"]
            fbase_state = unref(held["fbase"])
        else:
            fbase_state = load_weights(job["fbase_ckpt"], FBASE)
        fb = new_model(base_cfg["arch"], 0).to(device)
        fb.load_state_dict(fbase_state)
    assert reserve is not None
    base_pred = _predict(fb, reserve, mean, std, device)  # confusion labels come from f_base (§1.4)
    del fb

    # ---- on a GPU, D_r and the reserve stay on the device when they fit (small after round 0): each
    # step then gathers its batch there instead of copying it from host memory
    if device.type == "cuda" and dr is not None:
        need = int(dr.images.nbytes + reserve.images.nbytes)
        budget = device_budget_bytes(str(scale.get("device_cache_bytes", "auto")),
                                     torch.cuda.get_device_properties(device).total_memory)
        if need <= budget:
            dr, reserve = dr.to(device), reserve.to(device)
            base_pred = base_pred.to(device)
            log.info("[w%d] round %d: D_r and the reserve held on %s (%.0f MB of a %.0f MB budget)", rank, r,
                     device, need / 1e6, budget / 1e6)

    # ---- pretraining base_r on D_r (+ R with labels (y+1) mod C from reserve_in_pretrain_from on)
    start = done_in("pretrain")
    model = new_model(ct["arch"], seed + 29)
    if start is None:  # pretraining was finished before the restart: its result is in the checkpoint
        assert resume is not None
        held["base"] = resume.shared["base"]
        base_state = unref(held["base"])
        model.load_state_dict(resume.shared["model"] if resume.steps_done("confusion") else base_state)
        model = prep(model.to(device))
    else:
        if r > 0 and not ct["pretrain_from_scratch"] and job.get("prev_base_ckpt") is not None:
            model.load_state_dict(load_weights(job["prev_base_ckpt"], BASE))
        reused = bool(job.get("base0_ckpt")) and r == 0  # round 0's pretraining from the phase cache
        if reused:
            model.load_state_dict(load_weights(job["base0_ckpt"], BASE))
        model = prep(restore(model, start).to(device))
        shifted = None
        n_pre = n_dr
        if r >= ct["reserve_in_pretrain_from"]:
            shifted = LocalSet(reserve.images, (reserve.labels + 1) % C, reserve.sids)
            n_pre = n_dr + int(_allreduce_sum(torch.tensor([len(shifted)]))[0])
        if reused:
            log.info("[w%d] round 0: pretraining reused (%s)", rank, job["base0_ckpt"])
        else:
            opt = torch.optim.SGD(model.parameters(), lr=ct["pretrain_lr"] * bscale, momentum=ct["pretrain_momentum"],
                                  weight_decay=ct["pretrain_weight_decay"])
            restore_opt(opt, None, start)
            run_steps(f"pretrain r{r}", "pretrain", model, opt, dr, n_pre, ct["pretrain_batch_size"] * bscale,
                      ct["pretrain_epochs"][r], "none", None, start, subset=keep, extra=shifted)
        base_state = _state(model)
        held["base"] = publish(BASE, base_state, ct["arch"])
        if rank == 0 and r == 0 and (job.get("phase_cache") or {}).get("base0"):
            _publish_phase(job["phase_cache"]["base0"], base_state, spec_of(ct["arch"]), file_extra(BASE))
        save("confusion", 0)

    # ---- confusion training confused_r from base_r
    start = done_in("confusion") or 0
    final = r == ct["rounds"] - 1
    if dr is not None:
        counts = _allreduce_sum(torch.bincount(dr.labels, minlength=C).to(torch.float64))
    else:  # streaming D_r: the driver's per-class counts of the set
        counts = torch.tensor(job["class_counts"], dtype=torch.float64)
    if final or ct["uniform_class_weights"]:
        w = torch.ones(C, dtype=torch.float32)
    else:
        w = (1.0 / torch.sqrt(counts / counts.sum() + 0.001)).to(torch.float32)
    w = w.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=ct["lr"][r], momentum=ct["momentum"], weight_decay=ct["weight_decay"])
    restore_opt(opt, None, start)
    lb = local_batch(ct["batch_size"], rank, world)
    conf_s = Sampler(len(reserve), lb, seed * 31 + rank)
    # the inspected batches come from D_r: global epochs of ceil(|D_r| / batch) mixed steps
    insp_s = batches(dr, lb, seed * 37 + rank, n_dr, ct["batch_size"], keep)
    if start and resume is not None:
        _restore_sampler(conf_s, resume.own, "conf", rank)
        insp_s.restore(resume.own, "insp", rank)
    lam, bf, iters = float(ct["lam"][r]), int(ct["batch_factor"][r]), int(ct["iters"][r])
    prog = Progress(log, f"[w{rank}] confusion r{r}", iters - start, "steps")
    for t in range(start, iters):
        ci = conf_s.next()
        xc = to_input(to_device(reserve.images[ci], device), mean, std)
        yc = to_device((base_pred[ci] + confusion_shift(t, C)) % C, device)
        if is_mixed_step(t, bf):
            xb, yb = insp_s.next()
            xi, yi = to_input(to_device(xb, device), mean, std), to_device(yb, device)
            confusion_step(model, opt, xc, yc, xi, yi, w, lam)
        else:
            confusion_step(model, opt, xc, yc, None, None, None, lam)
        prog.update()
        if clock is not None and t + 1 < iters and clock.due(t + 1):
            save("confusion", t + 1, model, opt, None, {"conf": conf_s, "insp": insp_s})
    insp_s.close()
    times[f"confusion r{r}"] = prog.close()

    # ---- report one checkpoint (rank 0 writes it; every rank calls report)
    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if rank == 0:
            files = {BASE: (base_state, ct["arch"]), CONFUSED: (_state(model), ct["arch"])}
            if job.get("train_fbase"):
                files[FBASE] = (fbase_state, base_cfg["arch"])
            for name, (st, arch) in files.items():
                save_model(os.path.join(d, name), st, spec_of(arch), file_extra(name))
                if name not in published:  # written when its phase ended
                    save_model(cio.join(job["ckpt_dir"], name), st, spec_of(arch), file_extra(name))
            meta = {"round": r, "phase": "done", "n_dr": n_dr, "arch": ct["arch"], "base_arch": base_cfg["arch"],
                    "in_channels": in_ch, "image_size": size, "num_classes": C, "times": times,
                    "pid": os.getpid()}
            with open(os.path.join(d, CKPT_META), "w") as f:
                json.dump(meta, f)
            cio.write_json(cio.join(job["ckpt_dir"], CKPT_META), meta)
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report({"round": r, "n_dr": n_dr}, checkpoint=ckpt)
    return {"round": r, "n_dr": n_dr, "times": times, "steps": steps, "world": world,
            "resumed_from": resume.describe() if resume is not None else None}
