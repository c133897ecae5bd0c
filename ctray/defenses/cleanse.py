"""BCU, Backdoor Cleansing with Unlabeled data (Pang et al. CVPR 2023, seed-defenses.md §3.2): the student
initialisation and the distillation loss.

Student: a freshly initialised model of the teacher's architecture; every conv/linear weight and bias
element takes the fresh value with probability ``p`` of its depth group and keeps the teacher's value
otherwise (elementwise Bernoulli, no rescaling). Normalisation layers (BatchNorm, LayerNorm, GroupNorm:
parameters and buffers) are copied from the teacher and never re-initialised. Loss: ``KL(softmax(t/T) ||
softmax(s/T))`` with batchmean reduction and no ``T^2`` factor; ``T_e = t_start + t_add (e+1)/E``.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["distill_loss", "layer_groups", "student_init", "temperature"]

_NORM = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_STAGE = re.compile(r"^layer(\d+)\.")


def layer_groups(model: nn.Module, n_groups: int) -> dict[str, int]:
    """Depth group of every conv/linear module (``-1`` = the classification head ``head``).

    ResNets (modules named ``layer<k>.*``): the stem is group 0 and stage k is group k (clipped to
    ``n_groups - 1``), as the reference's per-stage ratios. Other models: the body's conv/linear modules in
    definition order, split into ``n_groups`` contiguous groups of (nearly) equal count, shallow first.

    Returns:
        ``{module name: group}`` for every ``nn.Conv*d`` / ``nn.Linear`` module.
    """
    if n_groups < 1:
        raise ValueError(f"need at least one depth group, got {n_groups}")
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)]
    head = {name for name, _ in layers if name == "head" or name.startswith("head.")}
    body = [name for name, _ in layers if name not in head]
    out: dict[str, int] = dict.fromkeys(head, -1)
    if any(_STAGE.match(n) for n in body):
        for n in body:
            mt = _STAGE.match(n)
            out[n] = min(int(mt.group(1)), n_groups - 1) if mt else 0
    else:
        for i, n in enumerate(body):
            out[n] = min(n_groups - 1, i * n_groups // max(1, len(body)))
    return out


def student_init(teacher: nn.Module, fresh: nn.Module, ratios: list[float], head_ratio: float, seed: int
                 ) -> tuple[nn.Module, dict[str, float]]:
    """Build the BCU student in place of ``fresh`` (a freshly initialised model of the teacher's arch).

    Args:
        teacher: the suspect model (read only).
        fresh: a new model of the same architecture with its default random init; modified and returned.
        ratios: re-initialised share per depth group (shallow to deep), each in [0, 1].
        head_ratio: re-initialised share of the head.
        seed: seeds the Bernoulli masks (same seed -> same student on every worker).

    Returns:
        ``(student, realised)``: the student and, per module, the share of its elements that took the
        fresh value.
    """
    groups = layer_groups(teacher, len(ratios))
    t_mods = dict(teacher.named_modules())
    gen = torch.Generator().manual_seed(int(seed))
    realised: dict[str, float] = {}
    with torch.no_grad():
        for name, m in fresh.named_modules():
            tm = t_mods[name]
            if isinstance(m, _NORM):  # never re-initialised: copy the teacher's affine params and running stats
                m.load_state_dict(tm.state_dict())
                continue
            own = {k: v for k, v in m.named_parameters(recurse=False)}
            if not own:
                continue
            if name in groups:
                g = groups[name]
                p = head_ratio if g < 0 else ratios[g]
            else:
                p = 0.0  # parameters of other module types keep the teacher's values
            n_new = n_all = 0
            for k, v in own.items():
                tv = getattr(tm, k)
                new = torch.rand(v.shape, generator=gen) < p
                v.copy_(torch.where(new.to(v.device), v, tv))
                n_new += int(new.sum())
                n_all += new.numel()
            realised[name] = n_new / max(1, n_all)
        for name, buf in fresh.named_buffers():  # buffers outside norm layers (none in ctray's models)
            tb = dict(teacher.named_buffers())[name]
            buf.copy_(tb)
    return fresh, realised


def temperature(epoch: int, epochs: int, t_start: float = 1.0, t_add: float = 3.0) -> float:
    """``T_e = t_start + t_add * (epoch + 1) / epochs`` (epoch counts from 0): ~1.03 .. 4 by default."""
    return t_start + t_add * (epoch + 1) / epochs


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """``KL(softmax(teacher/T) || softmax(student/T))``, batchmean, **no** ``T^2`` factor (as the reference)."""
    return F.kl_div(F.log_softmax(student_logits / t, 1), F.softmax(teacher_logits.detach() / t, 1),
                    reduction="batchmean")
