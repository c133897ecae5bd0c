"""Model registry: plain builder functions ``(in_channels, num_classes, image_size) -> nn.Module``.

Every model takes float ``(B, C, H, W)`` input (already normalised) and exposes
``features(x) -> (B, feature_dim)`` (penultimate, after global average pooling),
``forward(x) = head(features(x))`` -> logits ``(B, num_classes)``, and ``feature_dim: int``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from ctray.errors import ConfigError
from ctray.models.cnn import SmallCNN, small_cnn, tiny_cnn
from ctray.models.resnet import CifarResNet, resnet18, resnet18_narrow

log = logging.getLogger(__name__)

Builder = Callable[[int, int, int], nn.Module]

MODELS: dict[str, Builder] = {
    "small-cnn": small_cnn,
    "tiny-cnn": tiny_cnn,
    "resnet18": resnet18,
    "resnet18-narrow": resnet18_narrow,
}

__all__ = ["MODELS", "Builder", "CifarResNet", "SmallCNN", "build_model", "count_parameters", "list_models"]


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`, sorted."""
    return sorted(MODELS)


def build_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Build a fresh, randomly initialised model by registry name.

    Args:
        name: one of :func:`list_models` (``small-cnn``, ``tiny-cnn``, ``resnet18``, ``resnet18-narrow``).
        in_channels: input channels (1 or 3).
        num_classes: number of logits (>= 2).
        image_size: input side in pixels (informational for the built-in models).

    Returns:
        An ``nn.Module`` with ``features``, ``forward`` and ``feature_dim``.

    Raises:
        ConfigError: unknown name or non-positive sizes.
    """
    if name not in MODELS:
        raise ConfigError(f"model {name!r} is not known; choose one of: {', '.join(list_models())}")
    if in_channels < 1 or num_classes < 2 or image_size < 1:
        raise ConfigError(f"model {name!r}: need in_channels >= 1, num_classes >= 2, image_size >= 1; got "
                          f"in_channels={in_channels}, num_classes={num_classes}, image_size={image_size}")
    model = MODELS[name](in_channels, num_classes, image_size)
    log.debug("built %s (%d parameters, feature_dim %d)", name, count_parameters(model), model.feature_dim)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters (elements) of ``model``; only those with ``requires_grad`` by default."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
