"""Scoring compute (``data.score_compute``): the task pool with a per-process model cache and the actor
pool give the same per-sample scores, and the cache never serves a stale model. Real local Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctray.config import load_config
from ctray.engine.score import collect_scores, score_dataset
from ctray.models import build_model

pytestmark = pytest.mark.usefixtures("ray_session")

N, C, H = 300, 4, 28


def _data():
    import ray.data

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(N, H, H, 1), dtype=np.uint8)
    labels = rng.integers(0, C, size=N)
    # 3 blocks, so a pass runs several tasks (or batches through one actor)
    return ray.data.from_items([{"sid": i, "image": images[i], "label": int(labels[i])} for i in range(N)],
                               override_num_blocks=3).materialize()


def _save(d, seed: int) -> None:
    torch.manual_seed(seed)
    torch.save(build_model("small-cnn", 1, C, H).state_dict(), str(d / "confused.pt"))


def _scores(ds, d, compute: str) -> dict[str, np.ndarray]:
    cfg = load_config("smoke", {"data.score_compute": compute, "data.score_batch_size": 64})
    out = collect_scores(score_dataset(ds, str(d), "confused.pt", "small-cnn", 1, C, H, cfg.data))
    order = np.argsort(out["sid"])
    return {k: v[order] for k, v in out.items()}


def test_tasks_and_actors_score_alike_and_the_cache_never_serves_a_stale_model(tmp_path):
    ds = _data()
    _save(tmp_path, 0)
    tasks, actors = _scores(ds, tmp_path, "tasks"), _scores(ds, tmp_path, "actors")
    assert (tasks["sid"] == np.arange(N)).all() and (actors["sid"] == np.arange(N)).all()
    assert np.allclose(tasks["loss"], actors["loss"], atol=1e-6) and (tasks["pred"] == actors["pred"]).all()
    # other weights at the same path: the next task pass must load them (the cache is per pass)
    _save(tmp_path, 1)
    again = _scores(ds, tmp_path, "tasks")
    assert not np.allclose(again["loss"], tasks["loss"], atol=1e-3)
    assert np.allclose(again["loss"], _scores(ds, tmp_path, "actors")["loss"], atol=1e-6)


def test_the_process_cache_builds_once_per_pass_and_keeps_a_bounded_number_of_passes():
    """The task-side cache without Ray: one instance per pass token, interleaved passes keep theirs,
    and the oldest pass is evicted beyond the bound."""
    from ctray.engine import score

    built: list[int] = []

    class Model:
        def __init__(self, tag: int):
            built.append(tag)
            self.tag = tag

        def __call__(self, batch):
            return {"tag": np.full(len(batch["x"]), self.tag)}

    score._PROCESS_CACHE.clear()
    b = {"x": np.zeros(3)}
    for _ in range(2):  # two interleaved passes, two batches each: two builds
        for t in (1, 2):
            assert (score._cached_call(b, Model, {"tag": t}, f"pass-{t}")["tag"] == t).all()
    assert built == [1, 2]
    for t in range(3, 3 + score._CACHE_PASSES):
        score._cached_call(b, Model, {"tag": t}, f"pass-{t}")
    assert len(score._PROCESS_CACHE) == score._CACHE_PASSES and "pass-1" not in score._PROCESS_CACHE
    score._PROCESS_CACHE.clear()


def test_scoring_precision_resolves_per_device_and_refuses_what_cannot_run():
    from ctray.errors import ConfigError
    from ctray.training.steps import autocast_dtype

    assert autocast_dtype("auto", "cpu") == torch.float32
    assert autocast_dtype("auto", "cuda", bf16_supported=True) == torch.bfloat16
    assert autocast_dtype("auto", "cuda", bf16_supported=False) == torch.float16
    assert autocast_dtype("bf16", "cpu") == torch.bfloat16 and autocast_dtype("fp32", "cuda") == torch.float32
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        autocast_dtype("fp16", "cpu")
    with pytest.raises(ConfigError, match="score_precision"):
        load_config("smoke", {"data.score_precision": "fp64"})
    with pytest.raises(ConfigError, match="score_gpus"):
        load_config("smoke", {"data.score_gpus": -1})
    from ctray.config import DATA_RESOURCE_KEYS

    assert "score_gpus" in DATA_RESOURCE_KEYS  # where scoring runs never changes a run's fingerprint


def test_bf16_scoring_gives_float32_outputs_close_to_fp32(tmp_path):
    """The reduced-precision path, run on CPU here (bf16 autocast; on a GPU the same code runs under
    CUDA autocast): outputs stay float32, and scores move by bf16's rounding only."""
    from ctray.engine.score import Scorer

    _save(tmp_path, 0)
    rng = np.random.default_rng(1)
    batch = {"sid": np.arange(256), "image": rng.integers(0, 256, (256, H, H, 1), dtype=np.uint8),
             "label": rng.integers(0, C, 256)}
    kw = dict(ckpt=str(tmp_path), filename="confused.pt", arch="small-cnn", in_channels=1, num_classes=C,
              image_size=H, mean=0.5, std=0.25, with_features=True)
    full, half = Scorer(**kw, precision="fp32")(batch), Scorer(**kw, precision="bf16")(batch)
    assert Scorer(**kw).dtype == torch.float32  # auto on CPU
    for k in ("loss", "prob", "features"):
        assert half[k].dtype == np.float32, k
    assert np.abs(half["prob"] - full["prob"]).max() < 0.03
    assert (half["pred"] == full["pred"]).mean() >= 0.95
    assert np.corrcoef(half["loss"], full["loss"])[0, 1] > 0.99


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a GPU request on a machine without one")
def test_gpu_scoring_without_a_gpu_fails_early_and_names_the_setting(tmp_path):
    from ctray.engine.score import Scorer
    from ctray.errors import ConfigError

    _save(tmp_path, 0)
    with pytest.raises(RuntimeError, match="data.score_gpus > 0 but this scoring worker sees no CUDA"):
        Scorer(str(tmp_path), "confused.pt", "small-cnn", 1, C, H, 0.5, 0.25, device="cuda")
    # on this GPU-less local cluster the pass is refused before it starts, instead of waiting forever
    cfg = load_config("smoke", {"data.score_gpus": 1})
    with pytest.raises(ConfigError, match=r"data.score_gpus=1.0 but no node of this cluster has that many GPUs"):
        score_dataset(_data(), str(tmp_path), "confused.pt", "small-cnn", 1, C, H, cfg.data)
