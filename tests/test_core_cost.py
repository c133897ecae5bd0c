"""Schedule cost (ctray.core.cost) against the hand sums of specs/ct.md's reference and the shipped presets,
and the `ctray presets` table that shows it."""

from __future__ import annotations

import pytest

from ctray.cli import main
from ctray.config import load_config
from ctray.core.cost import schedule_cost
from ctray.errors import ConfigError


def _cost(name: str):
    c = load_config(name)
    return schedule_cost(c.base.epochs, c.ct.pretrain_epochs, c.ct.keep_ratio, c.ct.iters, c.ct.batch_size,
                         c.xclass.enabled)


def test_reference_and_small_match_the_hand_sums():
    ref = _cost("reference-cifar")
    # f_base 100 + pretraining 100 on N, 100 on N/2, 40 on N/5, N/25, N/50, N/100
    assert ref.train_passes == pytest.approx(100 + 100 + 50 + 8 + 1.6 + 0.8 + 0.4)
    assert ref.confusion_samples == (4 * 6000 + 2 * 2000) * 32 and ref.forward_passes == 8
    small = _cost("small")
    assert small.train_passes == pytest.approx(8 + 6 + 3 + 0.8 + 0.16 + 0.08 + 0.04)
    assert small.forward_passes == 10  # + the cross-class detector's two passes over D
    assert ref.sample_steps(10**7) / small.sample_steps(10**7) == pytest.approx(14.4, rel=0.01)


def test_schedule_cost_rejects_lists_that_disagree():
    with pytest.raises(ConfigError, match="disagree"):
        schedule_cost(1, [1, 1], [0.5, 0.2], [10, 10], 32)
    with pytest.raises(ConfigError, match=">= 0"):
        schedule_cost(-1, [1], [], [10], 32)


def test_presets_prints_the_cost_table(capsys):
    assert main(["presets", "--n", "1000000"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("reference-cifar "))
    assert "260.8" in line and "896,000" in line
    assert next(x for x in out.splitlines() if x.startswith("small ")).split()[-1] == "1/14"
    assert main(["presets", "--yaml"]) == 0 and "small-cnn: {" in capsys.readouterr().out


def test_fbase_on_a_sample_or_given_costs_less_at_large_n():
    from ctray.core.cost import schedule_cost

    args = (100, [100, 100], [0.5], [10, 10], 32)
    full = schedule_cost(*args)
    capped = schedule_cost(*args, base_max_samples=200_000, n=10**7)
    assert full.fbase_passes == 100 and capped.fbase_passes == pytest.approx(100 * 200_000 / 10**7)
    assert capped.pretrain_passes == full.pretrain_passes
    assert schedule_cost(*args, base_max_samples=200_000, n=100_000).fbase_passes == 100  # N below the cap
    assert schedule_cost(*args, fbase_given=True).fbase_passes == 0


def test_schedule_steps_and_checkpoint_bytes():
    from ctray.core.cost import checkpoint_bytes, schedule_steps

    # f_base 2 epochs of ceil(1000/128) = 8 steps; pretraining 3 x ceil(1000/100) + 2 x ceil(500/100)
    st = schedule_steps(1000, 2, 128, [3, 2], 100, [0.5], [40, 60])
    assert (st.fbase, st.pretrain, st.confusion, st.total) == (16, 40, 100, 156)
    assert schedule_steps(1000, 2, 128, [3, 2], 100, [0.5], [40, 60], base_max_samples=256).fbase == 4
    assert schedule_steps(1000, 2, 128, [3, 2], 100, [0.5], [40, 60], fbase_given=True).fbase == 0
    k4 = schedule_steps(1000, 2, 128, [3, 2], 100, [0.5], [40, 60], batch_scale=4)  # batches 512 and 400
    assert (k4.fbase, k4.pretrain, k4.confusion) == (4, 3 * 3 + 2 * 2, 100)
    # the figure: the reference schedule is ~58M sequential steps at 10M images
    from ctray.config import load_config

    c = load_config("reference-cifar")
    ref = schedule_steps(10**7, c.base.epochs, c.base.batch_size, c.ct.pretrain_epochs, c.ct.pretrain_batch_size,
                         c.ct.keep_ratio, c.ct.iters)
    assert ref.total == pytest.approx(58.09e6, rel=0.001)
    assert checkpoint_bytes(1000) == 8000 and checkpoint_bytes(1000, 500) == 10000
    with pytest.raises(ConfigError, match="disagree"):
        schedule_steps(1000, 2, 128, [3, 2], 100, [], [40, 60])
    with pytest.raises(ConfigError, match=">= 1"):
        schedule_steps(0, 2, 128, [3], 100, [], [40])


def test_presets_prints_steps_and_checkpoint_volume(capsys):
    assert main(["presets", "--n", "10000000"]) == 0
    out = capsys.readouterr().out.split("Steps and in-round checkpoints")[1]
    ref = next(x for x in out.splitlines() if x.startswith("reference-cifar ")).split()
    # ResNet-18 (11.2M parameters): 89 MB now (weights + momentum), 179 MB before (+ f_base + base)
    assert ref[1] == "58,090,500" and ref[5:8] == ["89.4", "/", "89.4"]
    assert float(ref[8]) == pytest.approx(2 * 89.4, rel=0.01) and ref[9] == "29,045"


def test_pretrain_epochs_scale_down_with_n_from_the_reference_n():
    from ctray.core.cost import scaled_pretrain_epochs, schedule_steps

    assert scaled_pretrain_epochs([6, 6, 4, 4, 4, 4], 10_000, 10_000) == [6, 6, 4, 4, 4, 4]
    assert scaled_pretrain_epochs([6, 6, 4, 4, 4, 4], 5_000, 10_000) == [6, 6, 4, 4, 4, 4]  # never more
    assert scaled_pretrain_epochs([6, 6, 4, 4, 4, 4], 50_000, 10_000) == [2, 2, 1, 1, 1, 1]  # ceil(1.2), ceil(0.8)
    assert scaled_pretrain_epochs([6, 0, 4], 10**7, 10_000) == [1, 0, 1]  # at least 1; a 0 stays 0
    assert scaled_pretrain_epochs([6, 6], 10**7, 0) == [6, 6]  # 0 = the paper: epochs as given
    # the steps stay at least those at the reference N (up to the rounding of steps per epoch)
    small = load_config("small")
    args = (small.base.epochs, small.base.batch_size, small.ct.pretrain_epochs, small.ct.pretrain_batch_size,
            small.ct.keep_ratio, small.ct.iters)
    at_ref = schedule_steps(10_000, *args).pretrain
    for n in (20_000, 50_000, 500_000):
        assert 0.99 * at_ref <= schedule_steps(n, *args, pretrain_ref_n=10_000).pretrain < schedule_steps(n, *args).pretrain


def test_fast_preset_is_small_at_10k_and_a_fiftieth_of_the_reference_from_50k():
    def passes(name: str, n: int) -> float:
        c = load_config(name)
        return schedule_cost(c.base.epochs, c.ct.pretrain_epochs, c.ct.keep_ratio, c.ct.iters, c.ct.batch_size,
                             c.xclass.enabled, c.base.max_samples, n, bool(c.base.checkpoint),
                             c.ct.pretrain_ref_n).train_passes

    ref = passes("reference-cifar", 10_000)
    assert passes("fast", 10_000) == pytest.approx(passes("small", 10_000))
    for n in (50_000, 500_000, 10**7):
        assert passes("fast", n) <= ref / 50, n
    assert passes("fast", 50_000) == pytest.approx(1.6 + 2 + 2 * 0.5 + 0.2 + 0.04 + 0.02 + 0.01)
    with pytest.raises(ConfigError, match="ct.pretrain_ref_n must be an integer >= 0"):
        load_config("fast", {"ct.pretrain_ref_n": -1})
