"""Attack simulators (pure NumPy) and ``poison_dataset`` end to end on real digits shards."""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from ctray.data.attacks import (
    ANY_WRONG,
    ATTACKS,
    adaptive_patches,
    badnet_patch,
    blend,
    blend_pattern,
    get_attack,
    grid_sample,
    sig_signal,
    trojan_patch,
    wanet_grid,
)
from ctray.data.poison import poison_dataset
from ctray.data.shards import ImageSpec, load_arrays
from ctray.data.sources import make_dataset
from ctray.errors import DataError

RATE = 0.05
TARGET = 0
COVER_FACTOR = {"wanet": 2.0, "tact": 1.0, "adaptive-blend": 1.0, "adaptive-patch": 2.0}
CASES = {"28x28x1": (200, 28, 28, 1), "32x32x3": (120, 32, 32, 3)}


def structured_set(n: int, h: int, w: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A class-dependent bright blob over a noisy background: ``uint8 (n, h, w, c)``, labels i % 10."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    yy, xx = np.mgrid[0:h, 0:w]
    cy = h / 2 + 4 * np.sin(y)[:, None, None]
    cx = w / 2 + 4 * np.cos(y)[:, None, None]
    r = (h / 6 + y % 3)[:, None, None]
    blob = 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    base = blob[..., None] * np.linspace(1.0, 0.6, c) + rng.integers(0, 50, (n, h, w, c))
    return np.clip(base, 0, 255).astype(np.uint8), y


def run_attack(name: str, x: np.ndarray, y: np.ndarray, seed: int = 0, rate: float = RATE):
    atk = get_attack(name)
    r_plan, r_p, r_c = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    plan = atk.plan(y, 10, rate, TARGET, r_plan)
    out = atk.apply_train(x, plan.poison_idx, r_p, "poison")
    out = atk.apply_train(out, plan.cover_idx, r_c, "cover")
    return atk, plan, out


@pytest.fixture(params=list(CASES), scope="module")
def data(request):
    return structured_set(*CASES[request.param])


def changed_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.flatnonzero((a != b).reshape(len(a), -1).any(axis=1))


@pytest.mark.parametrize("name", list(ATTACKS))
def test_plan_counts_labels_and_changed_pixels(name, data):
    x, y = data
    x_before = x.copy()
    atk, plan, out = run_attack(name, x, y)
    n = len(y)
    assert len(plan.poison_idx) == round(RATE * n)
    assert len(plan.cover_idx) == round(COVER_FACTOR.get(name, 0.0) * RATE * n)
    assert not set(plan.poison_idx) & set(plan.cover_idx)
    np.testing.assert_array_equal(x, x_before)  # input untouched
    # labels: poison as specified, everything else (covers included) keeps its label
    rest = np.setdiff1d(np.arange(n), plan.poison_idx)
    np.testing.assert_array_equal(plan.labels[rest], y[rest])
    p = plan.poison_idx
    if name == "sig":
        assert (y[p] == TARGET).all()
        np.testing.assert_array_equal(plan.labels[p], y[p])
    elif name == "badnet-all2all":
        np.testing.assert_array_equal(plan.labels[p], (y[p] + 1) % 10)
    elif name == "untargeted":  # a wrong class each, drawn from all of them (seeded)
        assert (plan.labels[p] != y[p]).all() and len(np.unique(plan.labels[p])) > 3
        again = get_attack(name).plan(y, 10, 0.05, TARGET, np.random.default_rng(0))
        np.testing.assert_array_equal(again.labels, get_attack(name).plan(y, 10, 0.05, TARGET,
                                                                          np.random.default_rng(0)).labels)
    else:
        assert (plan.labels[p] == TARGET).all() and (y[p] != TARGET).all()
    if name == "tact":
        assert (y[p] == 1).all() and np.isin(y[plan.cover_idx], [5, 7]).all()
    # pixels change exactly in poison and cover samples
    np.testing.assert_array_equal(changed_rows(out, x), np.union1d(plan.poison_idx, plan.cover_idx))


@pytest.mark.parametrize("name", list(ATTACKS))
def test_trigger_present(name, data):
    x, y = data
    atk, plan, out = run_attack(name, x, y)
    p, cv = plan.poison_idx, plan.cover_idx
    xt = atk.apply_test(x, np.random.default_rng(5))
    assert len(changed_rows(xt, x)) == len(x)

    def patch_equal(patch, imgs):
        h, w = patch.mask.shape
        reg = imgs[:, patch.top:patch.top + h, patch.left:patch.left + w]
        return bool((reg[:, patch.mask] == patch.pattern[patch.mask]).all())

    if name in ("badnet", "badnet-all2all", "untargeted"):
        assert patch_equal(badnet_patch(x.shape), out[p]) and patch_equal(badnet_patch(x.shape), xt)
    elif name in ("trojan", "tact"):
        pt = trojan_patch(x.shape)
        assert patch_equal(pt, out[p]) and patch_equal(pt, xt) and (len(cv) == 0 or patch_equal(pt, out[cv]))
        assert 0 < pt.mask.sum() < pt.mask.size  # mask = the non-black pixels only
    elif name == "blend":
        ref = 0.8 * x[p].astype(float) + 0.2 * blend_pattern(x.shape).astype(float)
        assert np.abs(out[p].astype(float) - ref).max() <= 1.0
    elif name == "sig":
        ref = np.clip(x[p].astype(float) + sig_signal(x.shape[2])[None, None, :, None], 0, 255)
        assert np.abs(out[p].astype(float) - ref).max() <= 1.0
        assert np.abs(xt.astype(float) - np.clip(x + sig_signal(x.shape[2])[None, None, :, None], 0, 255)).max() <= 1
    elif name == "wanet":
        warp = grid_sample(x, wanet_grid(x.shape[1], x.shape[2])[None])
        np.testing.assert_array_equal(out[p], warp[p])
        np.testing.assert_array_equal(xt, warp)
        assert len(changed_rows(out[cv], warp[cv])) == len(cv)  # covers: warp + noise, not the warp
    elif name == "adaptive-blend":
        full = blend(x, blend_pattern(x.shape), 0.15)
        for i in np.concatenate([p, cv]):
            ok = (np.abs(out[i].astype(int) - x[i]) <= 0) | (np.abs(out[i].astype(int) - full[i]) <= 1)
            assert ok.all()
            edges_r = np.linspace(0, x.shape[1], 5).round().astype(int)
            edges_c = np.linspace(0, x.shape[2], 5).round().astype(int)
            diff = (out[i] != x[i]).any(axis=-1)
            tiles = [diff[edges_r[a]:edges_r[a + 1], edges_c[b]:edges_c[b + 1]].any()
                     for a in range(4) for b in range(4)]
            assert sum(tiles) == 8  # half of the 16 tiles masked out
        assert np.abs(xt.astype(float) - blend(x, blend_pattern(x.shape), 0.2)).max() <= 1
    elif name == "adaptive-patch":
        patches = adaptive_patches(x.shape)
        alphas = (0.5, 0.2, 0.5, 0.3)
        for idx in (p, cv):
            used = []
            for i in idx:
                hits = [k for k, pt in enumerate(patches)
                        if np.array_equal(out[i:i + 1], pt.apply(x[i:i + 1], alphas[k]))]
                assert len(hits) == 1, f"sample {i}: exactly one weak trigger, got {hits}"
                used.append(hits[0])
            counts = np.bincount(used, minlength=4)
            assert counts.max() - counts.min() <= 1  # a quarter each
        assert patch_equal(patches[0], xt) and patch_equal(patches[2], xt)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_deterministic_per_seed(name):
    x, y = structured_set(*CASES["28x28x1"])
    _, p1, o1 = run_attack(name, x, y, seed=3)
    _, p2, o2 = run_attack(name, x, y, seed=3)
    _, p3, o3 = run_attack(name, x, y, seed=4)
    np.testing.assert_array_equal(p1.poison_idx, p2.poison_idx)
    np.testing.assert_array_equal(o1, o2)
    assert not np.array_equal(p1.poison_idx, p3.poison_idx) and not np.array_equal(o1, o3)


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_small_images(name, c):
    x, y = structured_set(100, 8, 8, c)
    _, plan, out = run_attack(name, x, y, rate=0.1)
    assert out.shape == x.shape and out.dtype == np.uint8
    assert len(changed_rows(out, x)) == len(plan.poison_idx) + len(plan.cover_idx) > 0


def test_errors():
    x, y = structured_set(100, 28, 28, 1)
    with pytest.raises(DataError, match="known: badnet"):
        get_attack("nope")
    with pytest.raises(DataError, match="no option gamma"):
        get_attack("blend", {"gamma": 1})
    with pytest.raises(DataError, match="alpha"):
        get_attack("blend", {"alpha": 2.0})
    with pytest.raises(DataError, match="only 10 are eligible"):
        get_attack("sig").plan(y, 10, 0.2, 0, np.random.default_rng(0))
    with pytest.raises(DataError, match="target"):
        get_attack("badnet").plan(y, 10, 0.1, 10, np.random.default_rng(0))
    with pytest.raises(DataError, match="source"):
        get_attack("tact", {"source": 0}).plan(y, 10, 0.01, 0, np.random.default_rng(0))
    with pytest.raises(DataError, match="uint8"):
        get_attack("badnet").apply_test(x.astype(np.float32), np.random.default_rng(0))
    assert get_attack("tact", {"cover_classes": [2, 3]}).cover_classes == (2, 3)


# ---------------------------------------------------------------------------------------------------
# poison_dataset end to end on digits shards


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("digits"))
    make_dataset("digits", d, 400, 100, 100, shard_size=150, seed=0)
    return d


def tar_samples(path):
    """[(key, {ext: bytes})] in order."""
    out = []
    with tarfile.open(path) as tf:
        for ti in tf:
            key, ext = ti.name.split(".", 1)
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = tf.extractfile(ti).read()
    return out


def read_dir(d, prefix, spec):
    paths = sorted(os.path.join(d, f) for f in os.listdir(d)
                   if f.startswith(prefix + "-") and f[len(prefix) + 1:-4].isdigit())
    ok, bad = load_arrays(paths, spec, 10)
    assert not bad
    return {r.key: r for r in ok}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_poison_dataset_end_to_end(name, digits_dir, tmp_path):
    out = str(tmp_path / "p")
    rate = 0.02
    s = poison_dataset(digits_dir, out, name, rate=rate, target=TARGET, seed=0, options={})
    man_in = json.load(open(os.path.join(digits_dir, "manifest.json")))
    n = man_in["counts"]["train"]
    truth = pq.read_table(os.path.join(out, "truth.parquet")).to_pandas()
    assert len(truth) == n == s["n_train"]
    assert truth["poison"].sum() == round(rate * n) == s["n_poison"]
    assert truth["cover"].sum() == round(COVER_FACTOR.get(name, 0) * rate * n) == s["n_cover"]
    assert set(truth["attack"]) == {name}
    # same shards, keys and order
    names = man_in["shards"]["train"]
    assert sorted(f for f in os.listdir(out) if f.startswith("train-")) == names
    for sh in names:
        a, b = tar_samples(os.path.join(digits_dir, sh)), tar_samples(os.path.join(out, sh))
        assert [k for k, _ in a] == [k for k, _ in b]
        t = truth[truth["shard"] == sh].set_index("key")
        for (key, ma), (_, mb) in zip(a, b, strict=True):
            treated = t.loc[key, "poison"] or t.loc[key, "cover"]
            assert (ma["png"] != mb["png"]) == treated
            assert int(mb["cls"]) == t.loc[key, "label"] and int(ma["cls"]) == t.loc[key, "orig_label"]
    for sh in man_in["shards"]["clean"] + man_in["shards"]["test"]:
        assert open(os.path.join(digits_dir, sh), "rb").read() == open(os.path.join(out, sh), "rb").read()
    # triggered test set
    spec = ImageSpec(8, 8, 1)
    test = read_dir(digits_dir, "test", spec)
    trig_paths = sorted(os.path.join(out, f) for f in os.listdir(out) if f.startswith("test-triggered-"))
    ok, bad = load_arrays(trig_paths, spec, 10)
    assert not bad and len(ok) == s["n_test_triggered"] > 0
    labels = np.array([r.label for r in ok])
    if name in ("badnet-all2all", "untargeted"):
        assert len(ok) == len(test)
    elif name == "tact":
        assert (labels == 1).all() and len(ok) == sum(r.label == 1 for r in test.values())
    else:
        assert (labels != TARGET).all() and len(ok) == sum(r.label != TARGET for r in test.values())
    for r in ok:
        meta = json.loads(r.meta)
        assert meta["orig_label"] == r.label == test[r.key].label
        want = {"badnet-all2all": (r.label + 1) % 10, "untargeted": ANY_WRONG}.get(name, TARGET)
        assert meta["target"] == want
    n_changed = sum(not np.array_equal(r.image, test[r.key].image) for r in ok)
    assert n_changed == len(ok)
    man = json.load(open(os.path.join(out, "manifest.json")))
    assert man["attack"]["name"] == name and man["attack"]["n_poison"] == s["n_poison"]
    assert man["counts"]["test-triggered"] == len(ok)


def test_poison_dataset_errors(digits_dir, tmp_path):
    with pytest.raises(DataError, match="known: badnet, blend"):
        poison_dataset(digits_dir, str(tmp_path / "x"), "nope", 0.01, 0, 0, {})
    with pytest.raises(DataError, match="must differ"):
        poison_dataset(digits_dir, digits_dir, "badnet", 0.01, 0, 0, {})
    with pytest.raises(DataError, match="manifest.json"):
        poison_dataset(str(tmp_path), str(tmp_path / "y"), "badnet", 0.01, 0, 0, {})
    out = str(tmp_path / "z")
    poison_dataset(digits_dir, out, "blend", 0.01, 0, 0, {"alpha": 0.3})
    with pytest.raises(DataError, match="already poisoned"):
        poison_dataset(out, str(tmp_path / "w"), "badnet", 0.01, 0, 0, {})
    # the same seed gives byte-identical output (rerun into the same directory replaces it)
    first = open(os.path.join(out, "train-000000.tar"), "rb").read()
    poison_dataset(digits_dir, out, "blend", 0.01, 0, 0, {"alpha": 0.3})
    assert open(os.path.join(out, "train-000000.tar"), "rb").read() == first


def test_paper_rates_one_switch(digits_dir, tmp_path, capsys):
    """`--rate paper`: each attack at the paper's poison and cover rates (specs/ct.md §3), through the CLI."""
    from ctray.cli import main
    from ctray.data.attacks import PAPER_RATES, resolve_rate

    assert resolve_rate("wanet", "paper") == (0.05, {"cover_rate": 0.10})
    assert resolve_rate("badnet", "paper") == (0.003, {})
    assert resolve_rate("badnet", "0.02") == (0.02, {})
    assert resolve_rate("untargeted", "paper", fallback=0.01) == (0.01, {})
    with pytest.raises(DataError, match="not in the paper's grid"):
        resolve_rate("untargeted", "paper")
    with pytest.raises(DataError, match="or 'paper'"):
        resolve_rate("badnet", "lots")
    assert set(PAPER_RATES) <= set(ATTACKS)
    out = str(tmp_path / "w")
    assert main(["-q", "data", "poison", "--in", digits_dir, "--out", out, "--attack", "wanet", "--rate", "paper"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_poison"] == round(0.05 * 400) and info["n_cover"] == round(0.10 * 400), info
