"""Pure-torch CT steps, no Ray: normalisation, augmentation, the pretrain step, the confusion step and
per-sample scoring. The loop in ``ctray.training.loop`` composes them; tests call them directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def to_input(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``uint8 (B, H, W, C)`` -> normalised ``float32 (B, C, H, W)``: ``(x/255 - mean) / std``."""
    x = images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    return x.sub_(mean).div_(std)


def augment(images: torch.Tensor, mode: str, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding ``pad`` (+ horizontal flip for ``crop-flip``) of ``uint8 (B,H,W,C)``.

    f_base only: CT itself trains without augmentation (specs/ct.md §1.2). ``images`` may live on any
    device: the random draws come from the CPU generator ``gen`` (the same draws wherever the pixels
    are) and only the indices move to the pixels' device.
    """
    if mode == "none":
        return images
    b, h, w, _ = images.shape
    dev = images.device
    padded = F.pad(images.permute(0, 3, 1, 2), (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(dev)  # (B, H)
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(dev)  # (B, W)
    bi = torch.arange(b, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    if mode == "crop-flip":
        flip = (torch.rand(b, generator=gen) < 0.5).to(dev)
        out[flip] = out[flip].flip(2)
    return out


def confusion_shift(step: int, num_classes: int) -> int:
    """The confusion-label shift of global step ``step``: cycles 1, 2, ..., C-1, 1, ... (never 0)."""
    if num_classes < 2:
        raise ValueError("confusion training needs at least 2 classes")
    return 1 + (step % (num_classes - 1))


def is_mixed_step(step: int, batch_factor: int) -> bool:
    """Every ``batch_factor``-th global step mixes an inspection batch of D into the forward pass."""
    return step % batch_factor == 0


def pretrain_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One plain mean-CE SGD step. Returns the loss."""
    model.train()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def confusion_loss(logits_conf: torch.Tensor, y_conf: torch.Tensor, logits_insp: torch.Tensor | None,
                   y_insp: torch.Tensor | None, class_w: torch.Tensor | None, lam: float) -> torch.Tensor:
    """CT's objective for one step (specs/ct.md §1.4 step 3).

    Confusion-only step: mean CE of the confusion part. Mixed step:
    ``((lam - 1) * L_conf + L_insp) / lam`` with ``L_insp = sum_i w_{y_i} CE_i / sum_i w_{y_i}``.
    """
    l_conf = F.cross_entropy(logits_conf, y_conf)
    if logits_insp is None:
        return l_conf
    assert y_insp is not None, "an inspection part needs its labels"
    ce = F.cross_entropy(logits_insp, y_insp, reduction="none")
    w = class_w[y_insp] if class_w is not None else torch.ones_like(ce)
    l_insp = (w * ce).sum() / w.sum()
    return ((lam - 1.0) * l_conf + l_insp) / lam


def confusion_step(model: nn.Module, opt: torch.optim.Optimizer, x_conf: torch.Tensor, y_conf: torch.Tensor,
                   x_insp: torch.Tensor | None, y_insp: torch.Tensor | None, class_w: torch.Tensor | None,
                   lam: float) -> float:
    """One CT SGD step. A mixed step forwards ``[confusion; inspection]`` in ONE pass so BatchNorm
    shares batch statistics between the two parts, as the reference does."""
    model.train()
    if x_insp is None:
        logits = model(x_conf)
        loss = confusion_loss(logits, y_conf, None, None, None, lam)
    else:
        logits = model(torch.cat([x_conf, x_insp]))
        n = x_conf.shape[0]
        loss = confusion_loss(logits[:n], y_conf, logits[n:], y_insp, class_w, lam)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def autocast_dtype(precision: str, device_type: str, bf16_supported: bool = True) -> torch.dtype:
    """The autocast dtype of a scoring pass (``data.score_precision``): ``float32`` means no autocast.

    ``auto``: bf16 on a CUDA device that supports it, else fp16 there; fp32 on CPU, where ctray's
    figures were measured (bf16 is an opt-in there: 1.97x the fp32 throughput on a Xeon with AMX-BF16,
    ``python -m ctray.benchmarks.scoring``; older CPUs without bf16 units gain nothing). ``bf16`` works
    on both; ``fp16`` only on CUDA.

    Raises:
        ConfigError: an unknown value, or fp16 on CPU.
    """
    from ctray.errors import ConfigError

    if precision == "auto":
        if device_type != "cuda":
            return torch.float32
        return torch.bfloat16 if bf16_supported else torch.float16
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ConfigError(f"data.score_precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp16" and device_type != "cuda":
        raise ConfigError("data.score_precision=fp16 needs a GPU (data.score_gpus > 0); use bf16 or fp32 on CPU")
    return table[precision]


@torch.no_grad()
def score_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, with_features: bool = False,
                ) -> dict[str, torch.Tensor]:
    """Eval-mode per-sample scores of a batch.

    Returns:
        ``loss (B,)`` CE w.r.t. the given label (low = the model still fits it), ``pred (B,)`` argmax,
        ``prob (B,)`` softmax probability of the given label in [0, 1] (high = suspicious after
        confusion), and ``features (B, D)`` when asked.
    """
    model.eval()
    feats = model.features(x)  # type: ignore[operator]
    logits = model.head(feats) if hasattr(model, "head") else model(x)  # type: ignore[operator]
    logits, feats = logits.float(), feats.float()  # under autocast: loss, softmax and features in fp32
    out = {
        "loss": F.cross_entropy(logits, y, reduction="none"),
        "pred": logits.argmax(1),
        "prob": logits.softmax(1).gather(1, y[:, None])[:, 0],
    }
    if with_features:
        out["features"] = feats
    return out
