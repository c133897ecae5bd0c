"""What a CT schedule costs, in samples through the model: the part that grows with N (training passes
over D: f_base's epochs and each round's pretraining on its kept set) apart from the part that does not
(confusion training: a fixed number of iterations whatever N), and the forward passes over D (scoring).

Pure Python. Round r >= 1 trains on ``keep_ratio[r - 1] * N`` samples; the per-class floors
(``n_c // floor_k``) are left out, so late rounds are a lower bound when a class is far below its floor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ctray.errors import ConfigError


@dataclass(frozen=True)
class ScheduleCost:
    """``train_passes``: training passes over D per sample (f_base + pretraining; the N-proportional cost),
    ``fbase_passes`` / ``pretrain_passes`` its parts; ``confusion_samples``: inspection samples through
    confusion training (fixed, independent of N); ``forward_passes``: scoring passes over D (one per round,
    the final decision's two, the cross-class detector's two); ``sample_steps(n)``: all training samples
    through the model at N = n."""

    fbase_passes: float
    pretrain_passes: float
    confusion_samples: int
    forward_passes: int

    @property
    def train_passes(self) -> float:
        return self.fbase_passes + self.pretrain_passes

    def sample_steps(self, n: int) -> float:
        return self.train_passes * n + self.confusion_samples

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "train_passes": self.train_passes}


def scaled_pretrain_epochs(epochs: Sequence[int], n: int, ref_n: int) -> list[int]:
    """Each round's pretraining epochs at N = ``n`` for epochs given at N = ``ref_n``
    (``ct.pretrain_ref_n``): ``ceil(e * ref_n / n)``, at least 1, never more than ``e`` (a round with 0 epochs
    stays 0). ``ref_n`` 0 or ``n <= ref_n``: the epochs as given.

    Every round's set is a fixed share of N, so its steps per epoch grow with N: the rounded-up epochs keep
    each round's steps at least those at ``ref_n``, and its passes over D fall as ``ref_n / n``.
    """
    if not ref_n or n <= ref_n:
        return [int(e) for e in epochs]
    return [min(int(e), max(1, math.ceil(int(e) * ref_n / n))) for e in epochs]


def schedule_cost(base_epochs: int, pretrain_epochs: Sequence[int], keep_ratio: Sequence[float],
                  iters: Sequence[int], batch_size: int, xclass: bool = False, base_max_samples: int = 0,
                  n: int | None = None, fbase_given: bool = False, pretrain_ref_n: int = 0) -> ScheduleCost:
    """The cost of a schedule (config fields ``base.epochs``, ``ct.pretrain_epochs``, ``ct.keep_ratio``,
    ``ct.iters``, ``ct.batch_size``; ``xclass.enabled``). f_base costs ``base.epochs`` passes over D, over
    its sample at N = ``n`` when ``base.max_samples`` (``base_max_samples``) is below ``n``
    (``base_epochs * base_max_samples / n`` passes per sample of D), none when given (``base.checkpoint``).
    Pretraining epochs are scaled to N = ``n`` by :func:`scaled_pretrain_epochs` when ``pretrain_ref_n`` is set.

    Raises:
        ConfigError: list lengths that disagree (rounds = len(pretrain_epochs) = len(iters) =
            len(keep_ratio) + 1) or negative values.
    """
    rounds = len(pretrain_epochs)
    if len(iters) != rounds or len(keep_ratio) != rounds - 1:
        raise ConfigError(f"schedule lists disagree: {rounds} pretrain_epochs, {len(iters)} iters, "
                          f"{len(keep_ratio)} keep ratios (want rounds, rounds, rounds - 1)")
    if base_epochs < 0 or batch_size < 1 or min([*pretrain_epochs, *iters, 0]) < 0:
        raise ConfigError("epochs and iterations must be >= 0, batch_size >= 1")
    share = [1.0, *[float(r) for r in keep_ratio]]
    if n:
        pretrain_epochs = scaled_pretrain_epochs(pretrain_epochs, n, pretrain_ref_n)
    pre = sum(e * s for e, s in zip(pretrain_epochs, share, strict=True))
    fb = 0.0 if fbase_given else float(base_epochs)
    if base_max_samples and n and n > base_max_samples:
        fb *= base_max_samples / n
    return ScheduleCost(fbase_passes=fb, pretrain_passes=float(pre),
                        confusion_samples=int(sum(iters)) * int(batch_size),
                        forward_passes=rounds + 2 + (2 if xclass else 0))


@dataclass(frozen=True)
class ScheduleSteps:
    """Sequential optimizer steps of a schedule at N (each a global batch): ``fbase``, ``pretrain`` (all
    rounds), ``confusion`` (all rounds). Wall time follows these, whatever the worker count, while the
    global batch stays fixed."""

    fbase: int
    pretrain: int
    confusion: int

    @property
    def total(self) -> int:
        return self.fbase + self.pretrain + self.confusion


def schedule_steps(n: int, base_epochs: int, base_batch: int, pretrain_epochs: Sequence[int], pretrain_batch: int,
                   keep_ratio: Sequence[float], iters: Sequence[int], base_max_samples: int = 0,
                   fbase_given: bool = False, batch_scale: int = 1, pretrain_ref_n: int = 0) -> ScheduleSteps:
    """The steps of a schedule at N = ``n`` (config fields as :func:`schedule_cost`, plus ``base.batch_size``
    and ``ct.pretrain_batch_size``): ``epochs * ceil(set / batch)`` per phase, round r >= 1 on
    ``keep_ratio[r - 1] * n`` samples (floors and the reserve's few samples in late pretraining left out).
    ``batch_scale`` (``ct.batch_scale``) multiplies f_base's and pretraining's batches; confusion's stays.
    ``pretrain_ref_n`` (``ct.pretrain_ref_n``) scales the pretraining epochs (:func:`scaled_pretrain_epochs`).

    Raises:
        ConfigError: ``n`` < 1, batch sizes < 1, or list lengths that disagree.
    """
    if n < 1 or base_batch < 1 or pretrain_batch < 1 or batch_scale < 1:
        raise ConfigError(f"n and batch sizes must be >= 1, got n={n}, {base_batch}, {pretrain_batch}")
    if len(keep_ratio) != len(pretrain_epochs) - 1 or len(iters) != len(pretrain_epochs):
        raise ConfigError("schedule lists disagree: want rounds pretrain_epochs and iters, rounds - 1 keep ratios")
    base_batch, pretrain_batch = base_batch * batch_scale, pretrain_batch * batch_scale
    n_fb = min(n, base_max_samples) if base_max_samples else n
    fb = 0 if fbase_given else base_epochs * -(-n_fb // base_batch)
    share = [1.0, *[float(r) for r in keep_ratio]]
    pretrain_epochs = scaled_pretrain_epochs(pretrain_epochs, n, pretrain_ref_n)
    pre = sum(e * -(-max(1, round(s * n)) // pretrain_batch) for e, s in zip(pretrain_epochs, share, strict=True))
    return ScheduleSteps(fbase=int(fb), pretrain=int(pre), confusion=int(sum(iters)))


def checkpoint_bytes(trained_params: int, held_params: int = 0) -> int:
    """Bytes of one in-round checkpoint's tensors: the model being trained and its SGD momentum buffers
    (float32, 2 x ``trained_params``), plus ``held_params`` of finished phases' weights carried in it
    (0 since they are referenced in the run directory; before, f_base and the round's base). Sampler
    and generator states (a few KB per rank) left out."""
    if trained_params < 0 or held_params < 0:
        raise ConfigError("parameter counts must be >= 0")
    return 4 * (2 * trained_params + held_params)
