"""Calibrated Trigger Inversion (Lukas & Kerschbaum 2023, seed-defenses.md §1.3) for one candidate class.

The trigger ``delta`` is a full-image additive perturbation in **un-normalised [0, 1] pixel space**; the
model input is ``normalise(clamp(x + delta, 0, 1))``. It is optimised (Adam) to flip the suspect model f
to class c while the pivotal-tuned reference f_ref keeps the true labels::

    loss = CE(f(xa), c) + ref_weight * CE(f_ref(xa), y)

on trusted images outside class c (random horizontal flip). The success gap
``ASR_f(delta) - ASR_fref(delta)`` is measured on other trusted images outside class c, relabelled c.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["apply_trigger", "invert_trigger", "pixels01", "project_l1", "reinvert_trigger", "trigger_asr", "trigger_png"]


def pixels01(images: torch.Tensor) -> torch.Tensor:
    """``uint8 (B, H, W, C)`` -> float ``(B, C, H, W)`` in [0, 1] (not normalised)."""
    return images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)


def apply_trigger(x01: torch.Tensor, delta: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Model input of triggered images: ``(clamp(x01 + delta, 0, 1) - mean) / std``.

    Args:
        x01: float (B, C, H, W) pixels in [0, 1].
        delta: float (C, H, W) or (1, C, H, W) additive trigger in pixel units.
    """
    return (torch.clamp(x01 + delta, 0.0, 1.0) - mean) / std


@torch.no_grad()
def trigger_asr(model: nn.Module, x01: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor, target: int,
                mean: float, std: float, bs: int = 512) -> float:
    """Share of images **outside class** ``target`` that the model assigns to ``target`` once triggered.

    Returns:
        ASR in [0, 1]; NaN when no image lies outside the class.
    """
    model.eval()
    keep = labels != target
    xs = x01[keep]
    if xs.shape[0] == 0:
        return float("nan")
    hits = 0
    for i in range(0, xs.shape[0], bs):
        hits += int((model(apply_trigger(xs[i:i + bs], delta, mean, std)).argmax(1) == target).sum())
    return hits / xs.shape[0]


def invert_trigger(model: nn.Module, ref: nn.Module, x01: torch.Tensor, labels: torch.Tensor, target: int, *,
                   steps: int, lr: float, betas: tuple[float, float], batch_size: int, init_max: float,
                   ref_weight: float, flip: bool, mean: float, std: float, seed: int) -> tuple[torch.Tensor, float]:
    """Optimise the trigger of candidate class ``target`` against ``model`` calibrated by ``ref``.

    Args:
        model, ref: suspect model and its pivotal-tuned copy (both kept in eval mode, weights frozen).
        x01, labels: trusted optimisation images float (N, C, H, W) in [0, 1] and their labels (N,);
            images of class ``target`` are left out here.
        steps, lr, betas, batch_size, init_max, ref_weight, flip: ``AuditConfig`` fields.
        seed: seeds the init, the batches and the flips.

    Returns:
        ``(delta (C, H, W) float in pixel units, last loss)``.

    Raises:
        ValueError: no optimisation image outside ``target``.
    """
    keep = labels != target
    xs, ys = x01[keep], labels[keep]
    n = xs.shape[0]
    if n == 0:
        raise ValueError(f"class {target}: no trusted image of another class to invert a trigger on")
    gen = torch.Generator().manual_seed(int(seed))
    delta = (torch.rand(xs.shape[1:], generator=gen) * init_max).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=lr, betas=betas)
    model.eval()
    ref.eval()
    for p in [*model.parameters(), *ref.parameters()]:
        p.requires_grad_(False)
    tgt = torch.full((min(batch_size, n),), int(target), dtype=torch.long)
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen) if n > batch_size else torch.randperm(n, generator=gen)
        xb, yb = xs[idx], ys[idx]
        if flip:
            f = torch.rand(xb.shape[0], generator=gen) < 0.5
            xb = torch.where(f[:, None, None, None], xb.flip(3), xb)
        xa = apply_trigger(xb, delta, mean, std)
        loss = F.cross_entropy(model(xa), tgt[:xb.shape[0]]) + ref_weight * F.cross_entropy(ref(xa), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return delta.detach().clone(), float(loss.detach())


def project_l1(delta: torch.Tensor, cap: float) -> torch.Tensor:
    """Euclidean projection of ``delta`` onto ``{d : mean |d| <= cap}`` (Duchi et al. 2008: soft-threshold
    every entry by the one ``theta`` that brings the mean to ``cap``). Unlike rescaling, it keeps a patch
    trigger's strong pixels and drops the weak ones it gained during re-inversion (measured:
    tests/test_defenses_units.py). ``delta`` any shape; returned unchanged when already inside."""
    a = delta.detach().abs().flatten()
    budget = cap * a.numel()
    if cap <= 0 or float(a.sum()) <= budget:
        return delta
    u, _ = torch.sort(a, descending=True)
    cs = torch.cumsum(u, 0)
    k = torch.arange(1, u.numel() + 1, dtype=u.dtype, device=u.device)
    rho = int(torch.nonzero(u - (cs - budget) / k > 0).max())
    theta = (cs[rho] - budget) / (rho + 1)
    return torch.sign(delta) * torch.clamp(delta.abs() - theta, min=0.0)


def reinvert_trigger(model: nn.Module, ref: nn.Module, delta: torch.Tensor,
                     batches: Iterable[tuple[torch.Tensor, torch.Tensor]], target: int, *, lr: float,
                     betas: tuple[float, float], ref_weight: float, mean: float, std: float,
                     cap: float = 0.0) -> torch.Tensor:
    """Warm-started re-inversion of ``target``'s trigger against ``model`` as it is now (ctray's, for
    ``repair.unlearn_every``): one Adam step per batch on ``CE(model(x + d), target) + ref_weight *
    CE(ref(x + d), y)``, images of class ``target`` skipped.

    Gradients are taken with respect to the trigger only (``torch.autograd.grad``), so no weight gets a
    ``.grad`` and a DDP wrapper's hooks never fire; both models run in eval mode, ``model`` is put back in
    its previous mode.

    Args:
        delta: float (C, H, W) starting trigger in [0, 1] pixel units (not modified).
        batches: ``(x01 float (B, C, H, W) in [0, 1], labels int64 (B,))`` pairs, one step each.
        cap: if > 0, the result is projected onto ``mean |delta| <= cap`` (:func:`project_l1`; a re-inverted
            trigger keeps growing until unlearning it erases clean features too; docs/defenses.md).

    Returns:
        float (C, H, W) trigger, detached.
    """
    d = delta.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([d], lr=lr, betas=betas)
    was_training = model.training
    model.eval()
    ref.eval()
    for x01, y in batches:
        keep = y != target
        if not bool(keep.any()):
            continue
        xa = apply_trigger(x01[keep], d, mean, std)
        tgt = torch.full((int(keep.sum()),), int(target), dtype=torch.long, device=xa.device)
        loss = F.cross_entropy(model(xa), tgt) + ref_weight * F.cross_entropy(ref(xa), y[keep])
        (d.grad,) = torch.autograd.grad(loss, [d])
        opt.step()
    model.train(was_training)
    return project_l1(d.detach(), cap)


def trigger_png(delta: torch.Tensor) -> np.ndarray:
    """A viewable ``uint8 (H, W, C)`` image of a trigger: its [0, 1] pixel values (clamped) x 255."""
    d = delta.detach().clamp(0.0, 1.0).permute(1, 2, 0).numpy()
    return np.rint(d * 255.0).astype(np.uint8)
