"""Activation features of image models and the activation-clamping purifier (BadActs transferred to
images, seed-defenses.md §2.5: ctray's design, measured in docs/defenses.md).

Neurons: every channel of every **block output** (ResNet: each BasicBlock's output, 8 blocks in
ResNet-18; other models, e.g. the small CNN: each ``nn.ReLU`` module's output), reduced over H x W by
global average and/or global max pooling (``pool``: a patch trigger is a spatial spike that averaging
dilutes). ``activation_features(model, x)`` -> float (B, F), F = channels x (1 or 2).

Purifier: learnable per-channel bounds ``[u - exp(m), u]`` at the same block outputs, applied over the
whole spatial map; trained with ``MSE(clamped logits, original logits) + c ||exp(m)||_2`` on trusted
clean images (weights frozen), with the reference's adaptive ``c``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["ClampedModel", "activation_features", "activation_modules", "learn_intervals"]


def activation_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs are the neurons: ResNet BasicBlocks when present, else ``nn.ReLU``s.

    Raises:
        ValueError: the model has neither (give it ReLU modules or blocks named ``BasicBlock``).
    """
    mods = list(model.named_modules())
    blocks = [(n, m) for n, m in mods if type(m).__name__ == "BasicBlock"]
    if blocks:
        return blocks
    relus: list[tuple[str, nn.Module]] = [(n, m) for n, m in mods if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError(f"{type(model).__name__}: no BasicBlock or nn.ReLU module to read activations from")
    return relus


def _pool(out: torch.Tensor, pool: str) -> torch.Tensor:
    if out.dim() == 4:
        parts = []
        if pool in ("avg", "avg+max"):
            parts.append(out.mean(dim=(2, 3)))
        if pool in ("max", "avg+max"):
            parts.append(out.amax(dim=(2, 3)))
        return torch.cat(parts, 1)
    if out.dim() == 2:
        return out if pool != "avg+max" else torch.cat([out, out], 1)
    raise ValueError(f"activation of shape {tuple(out.shape)} is neither (B, C, H, W) nor (B, C)")


@contextmanager
def _hooks(model: nn.Module, fn: object) -> Iterator[None]:
    handles = [m.register_forward_hook(fn(i)) for i, (_, m) in enumerate(activation_modules(model))]  # type: ignore[operator]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def activation_features(model: nn.Module, x: torch.Tensor, pool: str = "avg+max") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled block-output activations and logits of a normalised batch.

    Args:
        model: eval-mode model; x: float (B, C, H, W) normalised input.
        pool: ``avg``, ``max`` or ``avg+max`` (per module: its channels' averages, then their maxima).

    Returns:
        ``(features float32 (B, F), logits (B, K))``; F = sum of channels x (2 for ``avg+max``).
    """
    model.eval()
    feats: list[torch.Tensor | None] = [None] * len(activation_modules(model))

    def grab(i: int):  # noqa: ANN202 - hook factory
        def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
            feats[i] = _pool(out.detach(), pool).float()
        return hook

    with _hooks(model, grab):
        logits = model(x)
    return torch.cat([f for f in feats if f is not None], 1), logits


def channel_counts(model: nn.Module, x: torch.Tensor) -> list[int]:
    """Channels of each activation module's output for an example input ``x``."""
    counts: list[int] = [0] * len(activation_modules(model))

    def grab(i: int):  # noqa: ANN202
        def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
            counts[i] = int(out.shape[1])
        return hook

    with torch.no_grad(), _hooks(model, grab):
        model.eval()
        model(x[:1])
    return counts


class ClampedModel(nn.Module):
    """``model`` with every activation module's output clamped per channel into ``[u - exp(m), u]``.

    Only ``u`` and ``m`` (one pair per channel per module) are trainable; the wrapped model is frozen.

    Args:
        model: the (suspect) model; channels: output channels per activation module
            (:func:`channel_counts`); u0, m0: initial values (floats or float tensors per module).
    """

    def __init__(self, model: nn.Module, channels: list[int], u0: list[torch.Tensor] | float = 1.0,
                 m0: list[torch.Tensor] | float = 1.0) -> None:
        super().__init__()
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.u = nn.ParameterList()
        self.m = nn.ParameterList()
        for i, c in enumerate(channels):
            ui = u0[i] if isinstance(u0, list) else torch.full((c,), float(u0))
            mi = m0[i] if isinstance(m0, list) else torch.full((c,), float(m0))
            self.u.append(nn.Parameter(ui.clone().float()))
            self.m.append(nn.Parameter(mi.clone().float()))
        self.enabled = True

    def _clamp(self, i: int):  # noqa: ANN202
        def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor | None:
            if not self.enabled:
                return None
            shape = (1, -1, 1, 1) if out.dim() == 4 else (1, -1)
            hi = self.u[i].view(shape)
            lo = hi - torch.exp(self.m[i]).view(shape)
            return torch.maximum(torch.minimum(out, hi), lo)
        return hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Clamped logits (B, K) (plain logits while ``enabled`` is False)."""
        self.model.eval()
        with _hooks(self.model, self._clamp):
            return self.model(x)

    def width_norm(self) -> torch.Tensor:
        """``||exp(m)||_2`` over every channel of every module."""
        return torch.cat([torch.exp(m) for m in self.m]).norm()

    def bounds(self) -> list[dict[str, list[float]]]:
        """Per module ``{"lo": [...], "hi": [...]}`` (JSON-safe)."""
        return [{"lo": (u - torch.exp(m)).detach().tolist(), "hi": u.detach().tolist()}
                for u, m in zip(self.u, self.m, strict=True)]


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 512) -> float:
    hits = sum(int((model(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum()) for i in range(0, len(y), bs))
    return hits / max(1, len(y))


def learn_intervals(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
                    c0: float, a: float, keep: float, min_share: float, init: str, seed: int,
                    max_restarts: int = 3) -> tuple[ClampedModel, dict[str, float]]:
    """Learn the purifier's per-channel intervals on trusted clean images (BadActs_purification.py).

    Trains on the images the model classifies correctly; ``loss = MSE(clamped logits, logits) +
    c * ||exp(m)||_2``, Adam. At epochs > 10 that are multiples of 5, ``c *= a`` when the clamped model's
    accuracy on ``(x, y)`` is >= ``keep`` x the unclamped one's, else ``c /= a``. When the final share is
    below ``min_share``, restart from the initial bounds with half the starting c (at most ``max_restarts``).

    Args:
        model: the suspect model (frozen); x: float (N, C, H, W) normalised trusted images; y: (N,) labels.
        init: ``"ones"`` (u = m = 1, the reference) or ``"stats"`` (u = clean per-channel max,
            exp(m) = max - min, i.e. start at the observed range).

    Returns:
        ``(clamped model, info)`` with ``acc_plain``, ``acc_clamped``, ``c``, ``restarts``.
    """
    model.eval()
    gen = torch.Generator().manual_seed(int(seed))
    counts = channel_counts(model, x)
    with torch.no_grad():
        logits_all = torch.cat([model(x[i:i + 512]) for i in range(0, len(x), 512)])
    acc_plain = float((logits_all.argmax(1) == y).float().mean())
    right = logits_all.argmax(1) == y
    xr, lr_target = x[right], logits_all[right]
    if init == "stats":
        lo_hi = _channel_range(model, xr, counts)
        u0 = [hi for _, hi in lo_hi]
        m0 = [torch.log((hi - lo).clamp_min(1e-3)) for lo, hi in lo_hi]
    else:
        u0, m0 = 1.0, 1.0  # type: ignore[assignment]
    c_start = c0
    info: dict[str, float] = {}
    for restart in range(max_restarts + 1):
        cm = ClampedModel(model, counts, u0, m0)
        opt = torch.optim.Adam(list(cm.u) + list(cm.m), lr=lr)
        c = c_start
        n = xr.shape[0]
        for ep in range(1, epochs + 1):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, batch_size):
                idx = perm[i:i + batch_size]
                loss = F.mse_loss(cm(xr[idx]), lr_target[idx]) + c * cm.width_norm()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if ep > 10 and ep % 5 == 0:
                share = _accuracy(cm, x, y) / max(acc_plain, 1e-12)
                c = c * a if share >= keep else c / a
        acc_c = _accuracy(cm, x, y)
        info = {"acc_plain": acc_plain, "acc_clamped": acc_c, "c": c, "restarts": float(restart)}
        if acc_c >= min_share * acc_plain:
            break
        log.info("purifier: clamped accuracy %.3f < %.2f x %.3f; restart with c0 = %.4g", acc_c, min_share,
                 acc_plain, c_start / 2)
        c_start /= 2
    return cm, info


@torch.no_grad()
def _channel_range(model: nn.Module, x: torch.Tensor, counts: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    lo = [torch.full((c,), np.inf) for c in counts]
    hi = [torch.full((c,), -np.inf) for c in counts]

    def grab(i: int):  # noqa: ANN202
        def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
            dims = (0, 2, 3) if out.dim() == 4 else (0,)
            lo[i] = torch.minimum(lo[i], out.amin(dim=dims).float())
            hi[i] = torch.maximum(hi[i], out.amax(dim=dims).float())
        return hook

    with _hooks(model, grab):
        for i in range(0, len(x), 512):
            model(x[i:i + 512])
    return list(zip(lo, hi, strict=True))
