"""The model registry: shapes, feature dims, parameter counts, errors (no timed tests)."""

from __future__ import annotations

import pytest
import torch

from ctray.errors import ConfigError
from ctray.models import MODELS, build_model, count_parameters, list_models


@pytest.mark.parametrize("name", ["small-cnn", "tiny-cnn", "resnet18", "resnet18-narrow"])
@pytest.mark.parametrize("channels", [1, 3])
def test_forward_and_features_shapes(name: str, channels: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, channels, 7, 32)
    for size in (8, 28, 32, 64):  # global average pool: one model serves every input size
        x = torch.randn(2, channels, size, size)
        model.train()
        assert model(x).shape == (2, 7)
        model.eval()
        with torch.no_grad():
            feats = model.features(x)
            out = model(x)
        assert feats.shape == (2, model.feature_dim)
        assert torch.isfinite(feats).all() and torch.isfinite(out).all()
        torch.testing.assert_close(out, model.head(feats))  # forward is head(features)


def test_feature_dims_and_parameter_counts() -> None:
    r18 = build_model("resnet18", 3, 10, 32)
    assert r18.feature_dim == 512
    assert 11_100_000 < count_parameters(r18) < 11_250_000  # 11,173,962 for CIFAR-10
    narrow = build_model("resnet18-narrow", 3, 1000, 64)
    assert narrow.feature_dim == 64
    tiny, small = build_model("tiny-cnn", 3, 10, 64), build_model("small-cnn", 3, 10, 64)
    assert tiny.feature_dim == 64 and count_parameters(tiny) < count_parameters(small) / 3  # 14,338 vs 55,162
    assert isinstance(tiny.body[0], torch.nn.AvgPool2d)  # the 2x2 stem at >= 48 px
    assert not isinstance(build_model("tiny-cnn", 1, 10, 28).body[0], torch.nn.AvgPool2d)
    assert count_parameters(narrow) < 500_000
    cnn = build_model("small-cnn", 1, 10, 28)
    assert cnn.feature_dim == 128
    assert count_parameters(cnn) < 200_000


def test_count_parameters_trainable_only() -> None:
    model = build_model("small-cnn", 1, 10, 28)
    total = count_parameters(model)
    for p in model.head.parameters():
        p.requires_grad_(False)
    assert count_parameters(model) == total - (128 * 10 + 10)
    assert count_parameters(model, trainable_only=False) == total


@pytest.mark.parametrize("name", ["small-cnn", "resnet18-narrow"])
def test_has_batchnorm_and_backward(name: str) -> None:
    model = build_model(name, 3, 10, 32)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(4, 3, 32, 32)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_state_dict_roundtrip_weights_only(tmp_path) -> None:
    a = build_model("small-cnn", 1, 10, 28).eval()
    path = tmp_path / "m.pt"
    torch.save(a.state_dict(), path)
    b = build_model("small-cnn", 1, 10, 28).eval()
    b.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_registry_names_and_unknown_model() -> None:
    assert list_models() == sorted(MODELS) == ["resnet18", "resnet18-narrow", "small-cnn", "tiny-cnn"]
    with pytest.raises(ConfigError) as e:
        build_model("vgg16", 3, 10, 32)
    msg = str(e.value)
    assert "vgg16" in msg
    for name in list_models():
        assert name in msg


def test_bad_sizes() -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("small-cnn", 1, 1, 28)
