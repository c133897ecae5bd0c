"""CIFAR-style ResNet-18 (ct.md §1.3): full width for CIFAR-10/GTSRB, narrow for 64 px ImageNet.

Topology: 3x3 conv stride 1 stem (no max-pool), four stages of two BasicBlocks with strides
1, 2, 2, 2, global average pool, linear head. Widths 64/128/256/512 (512-d feature) or, for
``resnet18-narrow``, 16/32/48/64 (64-d feature).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class CifarResNet(nn.Module):
    """ResNet with a CIFAR stem.

    Args:
        in_channels: input channels (1 or 3).
        num_classes: number of logits.
        widths: channels of the four stages; the stem has ``widths[0]`` channels.
        blocks: BasicBlocks per stage.
        channels_last: keep weights and activations in ``torch.channels_last`` (on 2 CPU cores the
            narrow net trains about 8x faster than in NCHW; also the fast layout for GPU tensor cores).

    Attributes:
        feature_dim: ``widths[-1]``, the size of :meth:`features`' output.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int] = (64, 128, 256, 512),
                 blocks: Sequence[int] = (2, 2, 2, 2), channels_last: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(cin, w, stride=(2 if i > 0 and j == 0 else 1)))
                cin = w
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim: int = int(widths[-1])
        self.head = nn.Linear(self.feature_dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # works; not in the stubs

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: float ``(B, C, H, W)`` (normalised) -> ``(B, feature_dim)``."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return out.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of float ``(B, C, H, W)`` input."""
        return self.head(self.features(x))


def resnet18(in_channels: int, num_classes: int, image_size: int) -> CifarResNet:
    """Builder for ``resnet18``: widths 64/128/256/512, 512-d feature (about 11.2M parameters at 10
    classes). ``image_size`` is unused (global average pool)."""
    del image_size
    return CifarResNet(in_channels, num_classes, (64, 128, 256, 512))


def resnet18_narrow(in_channels: int, num_classes: int, image_size: int) -> CifarResNet:
    """Builder for ``resnet18-narrow``: widths 16/32/48/64, 64-d feature (the CT model of the
    ImageNet variant, ct.md §1.5). ``image_size`` is unused (global average pool)."""
    del image_size
    return CifarResNet(in_channels, num_classes, (16, 32, 48, 64))
