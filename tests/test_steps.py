"""Pure-torch CT steps and the per-worker schedule helpers, without Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctray.models import build_model
from ctray.training.loop import Sampler, local_batch
from ctray.training.steps import (
    augment,
    confusion_loss,
    confusion_shift,
    confusion_step,
    is_mixed_step,
    pretrain_step,
    score_batch,
    to_input,
)


def test_confusion_shift_cycles_and_never_zero():
    assert [confusion_shift(t, 4) for t in range(7)] == [1, 2, 3, 1, 2, 3, 1]
    assert all(confusion_shift(t, 2) == 1 for t in range(5))
    with pytest.raises(ValueError):
        confusion_shift(0, 1)


def test_mixed_step_every_b():
    assert [is_mixed_step(t, 2) for t in range(5)] == [True, False, True, False, True]
    assert all(is_mixed_step(t, 1) for t in range(5))


def test_confusion_loss_formula():
    torch.manual_seed(0)
    lc, li = torch.randn(4, 3), torch.randn(5, 3)
    yc, yi = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 0, 1, 2, 2])
    w = torch.tensor([1.0, 2.0, 3.0])
    lam = 20.0
    ce_i = F.cross_entropy(li, yi, reduction="none")
    l_insp = (w[yi] * ce_i).sum() / w[yi].sum()
    want = ((lam - 1) * F.cross_entropy(lc, yc) + l_insp) / lam
    assert torch.allclose(confusion_loss(lc, yc, li, yi, w, lam), want)
    assert torch.allclose(confusion_loss(lc, yc, None, None, None, lam), F.cross_entropy(lc, yc))


def test_local_batches_sum_to_global():
    for g in (32, 33, 7):
        for w in (1, 2, 3):
            assert sum(local_batch(g, r, w) for r in range(w)) == g


def test_sampler_covers_each_sample_once_per_epoch():
    s = Sampler(10, 4, seed=1)
    seen = torch.cat([s.next() for _ in range(5)])  # 20 = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(Sampler(10, 4, seed=1).next(), Sampler(10, 4, seed=1).next())


def test_to_input_and_augment_shapes():
    imgs = torch.randint(0, 256, (6, 28, 28, 1), dtype=torch.uint8)
    x = to_input(imgs, 0.5, 0.25)
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32
    assert math.isclose(float(x.max()), (1 - 0.5) / 0.25, abs_tol=1e-5) or float(x.max()) <= 2.0
    g = torch.Generator().manual_seed(0)
    a = augment(imgs, "crop-flip", g)
    assert a.shape == imgs.shape and a.dtype == torch.uint8
    assert torch.equal(augment(imgs, "none", g), imgs)
    # a crop is a shifted window of the zero-padded image: every output row sum is a row of the input or 0
    same = augment(imgs, "crop", torch.Generator().manual_seed(3))
    assert (same.float().sum() <= imgs.float().sum() + 1e-3)


def test_steps_learn_a_separable_problem():
    """pretrain_step fits a trivially separable set; confusion_step with labels shifted off the truth
    drives accuracy on the confusion set away from the truth (the point of confusion)."""
    torch.manual_seed(0)
    n = 64
    y = torch.arange(n) % 2
    imgs = torch.zeros(n, 8, 8, 1, dtype=torch.uint8)
    imgs[y == 1, :4] = 255
    x = to_input(imgs, 0.5, 0.25)
    m = build_model("small-cnn", 1, 2, 8)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    for _ in range(30):
        pretrain_step(m, opt, x, y)
    assert (score_batch(m, x, y)["pred"] == y).float().mean() == 1.0
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.7)
    for t in range(60):
        confusion_step(m, opt, x, (y + confusion_shift(t, 2)) % 2, None, None, None, 20.0)
    out = score_batch(m, x, y, with_features=True)
    assert (out["pred"] == y).float().mean() < 0.5
    assert out["features"].shape == (n, m.feature_dim)
    assert ((out["prob"] >= 0) & (out["prob"] <= 1)).all()
    assert np.allclose(out["loss"].numpy(), -np.log(out["prob"].numpy()), atol=1e-4)
