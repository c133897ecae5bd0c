"""What a CT schedule costs, in samples through the model: the part that grows with N (training passes
over D: f_base's epochs and each round's pretraining on its kept set) apart from the part that does not
(confusion training: a fixed number of iterations whatever N), and the forward passes over D (scoring).

Pure Python. Round r >= 1 trains on ``keep_ratio[r - 1] * N`` samples; the per-class floors
(``n_c // floor_k``) are left out, so late rounds are a lower bound when a class is far below its floor.
"""

from __future__ import annotations

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


def schedule_cost(base_epochs: int, pretrain_epochs: Sequence[int], keep_ratio: Sequence[float],
                  iters: Sequence[int], batch_size: int, xclass: bool = False, base_max_samples: int = 0,
                  n: int | None = None, fbase_given: bool = False) -> ScheduleCost:
    """The cost of a schedule (config fields ``base.epochs``, ``ct.pretrain_epochs``, ``ct.keep_ratio``,
    ``ct.iters``, ``ct.batch_size``; ``xclass.enabled``). f_base costs ``base.epochs`` passes over D, over
    its sample at N = ``n`` when ``base.max_samples`` (``base_max_samples``) is below ``n``
    (``base_epochs * base_max_samples / n`` passes per sample of D), none when given (``base.checkpoint``).

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
    pre = sum(e * s for e, s in zip(pretrain_epochs, share, strict=True))
    fb = 0.0 if fbase_given else float(base_epochs)
    if base_max_samples and n and n > base_max_samples:
        fb *= base_max_samples / n
    return ScheduleCost(fbase_passes=fb, pretrain_passes=float(pre),
                        confusion_samples=int(sum(iters)) * int(batch_size),
                        forward_passes=rounds + 2 + (2 if xclass else 0))
