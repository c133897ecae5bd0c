"""The training loop's GPU input path, checked on CPU (this project's machines have no GPU): device
budgets, set placement, transfers and the augmentation's device independence; config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctray.config import load_config
from ctray.errors import ConfigError
from ctray.training.loop import LocalSet, MemoryBatches, device_budget_bytes, to_device
from ctray.training.steps import augment


def test_device_budget_and_config_checks():
    assert device_budget_bytes("auto", 80 * 10**9) == 20 * 10**9
    assert device_budget_bytes("2GB", 80 * 10**9) == 2 * 10**9 and device_budget_bytes("0", 10**9) == 0
    with pytest.raises(ConfigError, match="scale.device_cache_bytes"):
        load_config("smoke", {"scale.device_cache_bytes": "lots"})
    with pytest.raises(ConfigError, match="sync_batchnorm needs scale.use_gpu"):
        load_config("smoke", {"scale.sync_batchnorm": True})
    assert load_config("smoke", {"scale.sync_batchnorm": True, "scale.use_gpu": True}).scale.sync_batchnorm


def test_a_placed_set_draws_the_same_batches_and_augmentations():
    """What a GPU worker does with a set it holds on the device (here: moved to the CPU device, the only
    one there is): the same sampler draws and the same augmentation draws, since indices and random
    numbers come from CPU generators whatever device the pixels are on."""
    rng = np.random.default_rng(0)
    data = LocalSet(torch.from_numpy(rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)),
                    torch.from_numpy(rng.integers(0, 10, 50)), np.arange(50))
    placed = data.to(torch.device("cpu"))
    assert placed.sids is data.sids and torch.equal(placed.images, data.images)
    a, b = MemoryBatches(data, 16, seed=3), MemoryBatches(placed, 16, seed=3)
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(8):  # past an epoch
        (xa, ya), (xb, yb) = a.next(), b.next()
        assert torch.equal(augment(xa, "crop-flip", ga), augment(xb, "crop-flip", gb)) and torch.equal(ya, yb)
    sub = placed.subset(np.arange(50) % 2 == 0)
    assert len(sub) == 25 and (sub.sids == np.arange(0, 50, 2)).all()
    t = torch.arange(6)
    assert torch.equal(to_device(t, torch.device("cpu")), t)


def test_sync_batchnorm_conversion_keeps_the_weights():
    """scale.sync_batchnorm converts every BatchNorm before DDP wrapping (its forward needs CUDA + NCCL:
    not run here); the conversion itself keeps the parameters and buffers."""
    from ctray.models import build_model

    m = build_model("resnet18-narrow", 3, 10, 32)
    conv = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_model("resnet18-narrow", 3, 10, 32))
    conv.load_state_dict(m.state_dict())
    assert any(isinstance(x, torch.nn.SyncBatchNorm) for x in conv.modules())
    assert not any(isinstance(x, torch.nn.BatchNorm2d) and not isinstance(x, torch.nn.SyncBatchNorm)
                   for x in conv.modules())


def test_batch_scaling_warms_the_lr_up_and_is_checked():
    from ctray.training.loop import warmup_factor

    assert [warmup_factor(s, 4, 4) for s in range(6)] == [0.25, 0.4375, 0.625, 0.8125, 1.0, 1.0]
    assert warmup_factor(0, 4, 1) == 1.0 and warmup_factor(0, 0, 4) == 1.0
    with pytest.raises(ConfigError, match="ct.batch_scale must be >= 1"):
        load_config("smoke", {"ct.batch_scale": 0})
    with pytest.raises(ConfigError, match="must end before f_base's first lr milestone"):
        load_config("smoke", {"ct.batch_scale": 4, "ct.warmup_epochs": 100})
    from ctray.engine.detect import _fingerprint

    base = load_config("smoke")
    assert _fingerprint(base, ["a"], ["b"]) == _fingerprint(load_config("smoke", {"data.score_precision": "auto"}),
                                                            ["a"], ["b"])
    assert _fingerprint(base, ["a"], ["b"]) != _fingerprint(load_config("smoke", {"ct.batch_scale": 2}), ["a"], ["b"])
