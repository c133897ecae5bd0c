"""Config schema, presets and key=value overrides."""

from __future__ import annotations

import pytest

from ctray.config import Config, auto_preset, list_presets, load_config, parse_overrides
from ctray.errors import ConfigError


def test_defaults_are_the_paper_cifar_schedule():
    c = Config()
    assert c.ct.rounds == 6
    assert c.ct.iters == [6000, 6000, 6000, 6000, 2000, 2000]
    assert c.ct.lr == [0.001, 0.001, 0.001, 0.01, 0.01, 0.01]
    assert c.ct.lam == [20, 20, 20, 30, 30, 15]
    assert c.ct.keep_ratio == [1 / 2, 1 / 5, 1 / 25, 1 / 50, 1 / 100]
    assert c.ct.floor_k == [50, 50, 50, 50, 100]
    assert c.ct.momentum == 0.7 and c.ct.pretrain_lr == 0.01 and c.ct.batch_size == 32
    assert c.decide.threshold_max == 1.5 and c.decide.threshold_any == 2.0
    assert c.ct.reserve_in_pretrain_from == 5


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_validates(name):
    cfg = load_config(name)
    assert cfg.preset == name
    assert len(cfg.ct.iters) == cfg.ct.rounds


def test_small_preset_keeps_the_algorithm_shape():
    ref, small = load_config("reference-cifar"), load_config("small")
    for f in ("rounds", "keep_ratio", "floor_k", "lam", "batch_factor", "reserve_in_pretrain_from", "momentum"):
        assert getattr(small.ct, f) == getattr(ref.ct, f), f
    assert sum(small.ct.iters) < sum(ref.ct.iters)


def test_reference_preset_keeps_the_published_audit_score():
    """ctray's default audit score (gap-size) is a measured deviation; the faithful one stays a preset."""
    assert load_config("small").audit.score == "gap-size"
    ref = load_config("reference-cifar").audit
    assert (ref.score, ref.threshold) == ("gap", 0.5)
    with pytest.raises(ConfigError, match="audit.score must be one of gap, gap-size"):
        load_config("small", {"audit.score": "l1"}).validate()


def test_reference_preset_keeps_the_published_bcu():
    """cleanse.unlearn (audit + unlearning during BCU) is ctray's measured default; the preset is the paper's."""
    assert load_config("small").cleanse.unlearn == 3.0 and load_config("smoke").cleanse.unlearn == 3.0
    assert load_config("reference-cifar").cleanse.unlearn == 0.0 and load_config().cleanse.unlearn == 0.0
    with pytest.raises(ConfigError, match="cleanse.unlearn must be >= 0"):
        load_config("small", {"cleanse.unlearn": -1}).validate()


def test_defenses_follow_the_models_augmentation_except_in_the_reference_preset():
    """augment=auto (ctray's) resolves per checkpoint; the faithful preset keeps the reference's crop-flip.
    repair.kd is off everywhere: it only helps together with repair.unlearn (the defend-resnet18-narrow preset)."""
    for name in ("small", "smoke"):
        c = load_config(name)
        assert (c.repair.augment, c.cleanse.augment, c.repair.kd) == ("auto", "auto", 0.0)
    ref = load_config("reference-cifar")
    assert (ref.repair.augment, ref.cleanse.augment, ref.repair.kd) == ("crop-flip", "crop-flip", 0.0)


def test_documented_defense_recipe_layers_on_small_and_validates():
    """The preset defend-resnet18-narrow is the measured repair/cleanse recipe the docs quote: it must
    extend `small` and keep the figures' settings."""
    c = load_config("defend-resnet18-narrow")
    c.validate()
    assert c.ct == load_config("small").ct and c.base == load_config("small").base
    r = c.repair
    assert (r.lr, r.steps, r.lam_param, r.unlearn, r.unlearn_every, r.kd, r.augment) == (0.02, 600, 470, 1, 100, 1,
                                                                                          "auto")
    small = load_config("small").cleanse
    assert (c.cleanse.ratios, c.cleanse.head_ratio) == ([0.01, 0.01, 0.03, 0.09, 0.27], 0.1)  # the paper's ResNet-18
    assert (c.cleanse.epochs, c.cleanse.lr, c.cleanse.unlearn) == (small.epochs, small.lr, small.unlearn)


def test_repair_reinversion_needs_the_unlearning_audit():
    assert load_config("small").repair.unlearn_every == 0  # experimental, off
    load_config("small", {"repair.unlearn": 1, "repair.unlearn_every": 100}).validate()
    with pytest.raises(ConfigError, match="repair.unlearn_every needs repair.unlearn > 0"):
        load_config("small", {"repair.unlearn_every": 100}).validate()
    with pytest.raises(ConfigError, match="audit.max_images must be >= 0"):
        load_config("small", {"audit.max_images": -1}).validate()
    with pytest.raises(ConfigError, match="unlearn_isteps >= 1"):
        load_config("small", {"repair.unlearn": 1, "repair.unlearn_isteps": 0}).validate()


def test_cleanse_reinversion_needs_the_unlearning_audit():
    c = load_config("small")
    assert c.cleanse.unlearn == 3.0 and c.cleanse.unlearn_every == 0  # experimental, off
    load_config("small", {"cleanse.unlearn_every": 50}).validate()
    with pytest.raises(ConfigError, match="cleanse.unlearn_every needs cleanse.unlearn > 0"):
        load_config("small", {"cleanse.unlearn": 0, "cleanse.unlearn_every": 50}).validate()
    with pytest.raises(ConfigError, match="cleanse.unlearn_every must be >= 0"):
        load_config("small", {"cleanse.unlearn_cap": -0.1}).validate()


def test_small_cnn_is_small_with_the_small_cnn():
    """`small-cnn` is documented as `small`'s schedule with the 5-conv CNN as CT's model: nothing else may
    drift between the two files."""
    small, fast = load_config("small").to_dict(), load_config("small-cnn").to_dict()
    assert small["ct"].pop("arch") == "resnet18-narrow" and fast["ct"].pop("arch") == "small-cnn"
    small.pop("preset"), fast.pop("preset")
    assert small == fast


def test_overrides_types_and_indices():
    cfg = load_config("smoke", parse_overrides(["ct.lam.3=31", "seed=7", "scale.num_workers=2",
                                                 "ct.lr=[0.1, 0.1, 0.1, 0.1, 0.1, 0.1]", "data.strict=true"]))
    assert cfg.ct.lam[3] == 31.0 and cfg.seed == 7 and cfg.scale.num_workers == 2 and cfg.data.strict is True
    assert cfg.ct.lr == [0.1] * 6


@pytest.mark.parametrize("item, match", [
    ("ct.nope=1", "unknown config field"),
    ("seed=abc", "must be an integer"),
    ("ct.lam=[20]", "needs 6 entries"),
    ("ct.keep_ratio=[2, 1, 1, 1, 1]", r"\(0, 1\]"),
    ("data.on_size=stretch", "on_size"),
    ("data.score_compute=threads", "score_compute"),
    ("data.score_actors=0", "score_actors"),
    ("repair.augment=flip", "repair.augment must be auto, crop-flip, crop or none"),
    ("repair.kd=-1", "repair.kd must be >= 0"),
    ("repair.kd_t=0", "repair.kd_t > 0"),
    ("ct.arch=vgg", "not a model"),
    ("ct.lam.9=1", "out of range"),
    ("xclass.test=fisher", "xclass.test must be predictive or plug-in"),
])
def test_bad_overrides_name_the_field(item, match):
    with pytest.raises(ConfigError, match=match):
        load_config("smoke", parse_overrides([item]))


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="known"):
        load_config("nope")


def test_config_file_roundtrip(tmp_path):
    cfg = load_config("small", {"ct.lam.0": 25})
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    again = load_config(config_file=str(p))
    assert again.to_dict() == cfg.to_dict()


def test_auto_preset():
    assert auto_preset(28, 10, 10000, False)[0] == "small"
    assert auto_preset(28, 10, 10001, False) == ("fast", "28 px on CPU, 10001 samples > 10000")
    assert auto_preset(32, 10, 10001, True)[0] == "reference-cifar"  # a GPU runs the paper's schedule
    # fast is small up to the N its pretraining epochs are given for: the switch costs nothing below it
    assert load_config("fast").ct.pretrain_ref_n == 10000
    assert auto_preset(32, 10, 50000, True)[0] == "reference-cifar"
    assert auto_preset(64, 1000, 1_000_000, True)[0] == "imagenet64"
    assert auto_preset(28, 10, 500, False)[0] == "smoke"


def test_experimental_switches_are_named_and_warned(caplog):
    """config.EXPERIMENTAL lists every experimental switch; each is off by default and in no preset, and
    turning one on logs a warning that names it."""
    import logging

    from ctray.config import EXPERIMENTAL, experimental_in_use, list_presets

    for name in list_presets():
        assert experimental_in_use(load_config(name)) == [], name
    with caplog.at_level(logging.WARNING, logger="ctray.config"):
        cfg = load_config("small", {"cleanse.unlearn_every": 50})
    assert experimental_in_use(cfg) == ["cleanse.unlearn_every=50"]
    assert any("experimental setting cleanse.unlearn_every=50" in r.getMessage() for r in caplog.records)
    assert set(EXPERIMENTAL) == {"cleanse.unlearn_every"}
