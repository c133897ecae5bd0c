"""Pure-torch parts of the model-level defenses (no Ray): Pivotal Tuning's losses, BCU's student and
distillation loss, CTI's trigger space, activation features and the clamp; the pitfalls of
seed-defenses.md §5 that live in these functions."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from ctray.defenses.actstats import ClampedModel, activation_features, activation_modules, channel_counts
from ctray.defenses.audit import apply_trigger, project_l1, reinvert_trigger, trigger_asr
from ctray.defenses.cleanse import distill_loss, layer_groups, student_init, temperature
from ctray.defenses.repair import centroids, gram_offdiag_norm, param_loss, pivot_params, pt_loss, slol_loss
from ctray.models import build_model
from ctray.training.steps import to_input

# ------------------------------------------------------------------------------------ pivotal tuning


def test_gram_offdiagonal_norm_zeroes_the_diagonal_and_the_reference_bug_differs():
    """Pitfall: the reference subtracts the diagonal VECTOR with broadcasting; the intended term is the
    norm of the off-diagonal entries of G = M^T M / k (M: the k x D stacked centroids)."""
    m = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])  # k = 2 centroids, D = 3
    g = m.T @ m / 2  # [[1, .5, 0], [.5, .5, 0], [0, 0, 0]]: diagonal (1, .5, 0), one off-diagonal pair .5
    assert torch.equal(g, torch.tensor([[1.0, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))
    assert gram_offdiag_norm(m).item() == pytest.approx(math.sqrt(2 * 0.5**2))
    bug = g - torch.diagonal(g)[None, :]  # [[0, 0, 0], [-.5, 0, 0], [-1, -.5, 0]]
    assert gram_offdiag_norm(m, offdiag=False).item() == pytest.approx(bug.norm().item())
    assert gram_offdiag_norm(m, offdiag=False).item() == pytest.approx(math.sqrt(0.25 + 1 + 0.25))
    disjoint = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 5.0]])  # dims not shared
    assert gram_offdiag_norm(disjoint).item() == 0.0  # no off-diagonal mass, whatever the diagonal


def test_centroids_use_present_classes_and_single_sample_classes():
    z = torch.tensor([[1.0, 1.0], [3.0, 1.0], [0.0, 5.0], [7.0, 7.0]])
    y = torch.tensor([4, 4, 9, 2])  # class 2 and 9 have one sample each; 0,1,3.. absent
    mu, cls = centroids(z, y)
    assert cls.tolist() == [2, 4, 9]
    assert mu.tolist() == [[7.0, 7.0], [2.0, 1.0], [0.0, 5.0]]


def test_slol_is_finite_with_one_class_and_singletons_and_rotates_away_from_the_pivot():
    torch.manual_seed(0)
    z0 = torch.randn(6, 4)
    one = slol_loss(z0.clone().requires_grad_(), z0, torch.zeros(6, dtype=torch.long))
    assert one.item() == 0.0  # a single class: no centroid pairs
    y = torch.tensor([0, 0, 0, 1, 2, 2])  # class 1 is a singleton
    z = z0.clone().requires_grad_(True)
    loss = slol_loss(z, z0, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # identical geometry: every pair's cosine is 1, so the anti-alignment part is k(k-1)/2 = 3
    mu, _ = centroids(z0, y)
    assert loss.item() == pytest.approx(gram_offdiag_norm(mu).item() + 3.0, rel=1e-5)
    flipped = slol_loss(-z0, z0, y)  # reversed centroid differences: cosines -1
    assert flipped.item() == pytest.approx(gram_offdiag_norm(-mu).item() - 3.0, rel=1e-5)


def test_param_loss_is_mean_squared_distance_to_the_pivot():
    m = build_model("small-cnn", 1, 10, 28)
    theta0 = pivot_params(m)
    assert param_loss(m, theta0).item() == 0.0
    n = sum(p.numel() for p in m.parameters())
    with torch.no_grad():
        next(m.parameters()).add_(2.0)
    first = next(m.parameters()).numel()
    assert param_loss(m, theta0).item() == pytest.approx(4.0 * first / n, rel=1e-5)


def test_pt_loss_combines_terms_and_label_free_variant_uses_pivot_softmax():
    torch.manual_seed(1)
    m = build_model("small-cnn", 1, 3, 12)
    theta0 = pivot_params(m)
    x = torch.randn(8, 1, 12, 12)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    z = m.features(x)
    logits = m.head(z)
    loss, parts = pt_loss(logits, z, logits.detach(), z.detach(), y, m, theta0, 0.05, 2e4, True)
    assert parts["param"] == 0.0
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item() + 0.05 * parts["slol"], rel=1e-5)
    _, free = pt_loss(logits, z, logits.detach(), z.detach(), y, m, theta0, 0.0, 0.0, False)
    soft = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()  # CE to the pivot's softmax (T=1)
    assert free["task"] == pytest.approx(soft.item(), rel=1e-5)


def test_pt_loss_kd_distils_from_the_pivot_and_is_off_at_zero():
    """repair.kd (ctray's): kd * T^2 * KL(pivot_T || f_T) joins the labelled CE; zero when f answers as the
    pivot does, positive otherwise, and its gradient moves f's logits toward the pivot's."""
    torch.manual_seed(2)
    m = build_model("small-cnn", 1, 3, 12)
    theta0 = pivot_params(m)
    x, y = torch.randn(8, 1, 12, 12), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    z = m.features(x)
    logits = m.head(z)
    off, p_off = pt_loss(logits, z, logits.detach(), z.detach(), y, m, theta0, 0.0, 0.0, True)
    same, p_same = pt_loss(logits, z, logits.detach(), z.detach(), y, m, theta0, 0.0, 0.0, True, kd=1.0)
    assert "kd" not in p_off and p_same["kd"] == pytest.approx(0.0, abs=1e-6)
    assert same.item() == pytest.approx(off.item(), rel=1e-6)
    pivot_logits = torch.randn(8, 3) * 3
    f = logits.detach().clone().requires_grad_(True)
    loss, parts = pt_loss(f, z, pivot_logits, z.detach(), y, m, theta0, 0.0, 0.0, True, kd=2.0, kd_t=4.0)
    p0, pf = (pivot_logits / 4).softmax(1), (f.detach() / 4).softmax(1)
    kl = (p0 * (p0.log() - pf.log())).sum(1).mean()
    assert parts["kd"] == pytest.approx(kl.item(), rel=1e-4) and parts["kd"] > 0
    assert loss.item() == pytest.approx(F.cross_entropy(f.detach(), y).item() + 2.0 * 16 * kl.item(), rel=1e-4)
    # the kd part alone: one small step along its gradient lowers the KL to the pivot
    g, = torch.autograd.grad(loss - F.cross_entropy(f, y), f)
    f2 = f.detach() - 0.05 * g
    kl2 = (p0 * (p0.log() - (f2 / 4).log_softmax(1))).sum(1).mean()
    assert kl2.item() < kl.item()


# ------------------------------------------------------------------------------------------------ BCU


def test_layer_groups_follow_resnet_stages_and_split_other_models_by_depth():
    r = layer_groups(build_model("resnet18-narrow", 3, 10, 32), 5)
    assert r["conv1"] == 0 and r["layer1.0.conv1"] == 1 and r["layer3.0.shortcut.0"] == 3
    assert r["layer4.1.conv2"] == 4 and r["head"] == -1
    s = layer_groups(build_model("small-cnn", 1, 10, 28), 5)
    assert [s[f"body.{i}"] for i in (0, 3, 7, 10, 14)] == [0, 1, 2, 3, 4] and s["head"] == -1


def test_student_keeps_norm_layers_and_reinitialises_a_depth_growing_share():
    """Pitfall: normalisation layers are never re-initialised."""
    torch.manual_seed(0)
    teacher = build_model("resnet18-narrow", 3, 10, 32)
    with torch.no_grad():  # make BN state distinguishable from a fresh init
        for mod in teacher.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.fill_(0.7)
                mod.running_mean.fill_(0.3)
    ratios = [0.0, 0.0, 0.1, 0.3, 0.6]
    student, realised = student_init(teacher, build_model("resnet18-narrow", 3, 10, 32), ratios, 1.0, seed=5)
    for (name, ms), mt in zip(student.named_modules(), teacher.modules(), strict=True):
        if isinstance(ms, torch.nn.BatchNorm2d):
            for k, v in ms.state_dict().items():
                assert torch.equal(v, mt.state_dict()[k]), (name, k)
    assert realised["conv1"] == 0.0 and realised["layer1.0.conv1"] == 0.0
    assert realised["head"] == 1.0
    assert abs(realised["layer2.0.conv1"] - 0.1) < 0.03
    assert abs(realised["layer3.0.conv1"] - 0.3) < 0.03
    assert abs(realised["layer4.0.conv1"] - 0.6) < 0.03
    w_s, w_t = student.layer4[0].conv1.weight, teacher.layer4[0].conv1.weight
    kept = w_s == w_t
    assert 0.35 < kept.float().mean().item() < 0.45  # the rest took fresh values, no rescaling
    again, _ = student_init(teacher, build_model("resnet18-narrow", 3, 10, 32), ratios, 1.0, seed=5)
    assert torch.equal(((again.layer4[0].conv1.weight == w_t)), kept)  # the mask is a function of the seed
    same, _ = student_init(teacher, build_model("resnet18-narrow", 3, 10, 32), [0.0] * 5, 0.0, seed=5)
    for a, b in zip(same.state_dict().values(), teacher.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_distillation_has_no_t_squared_factor_and_temperature_goes_from_about_1_to_4():
    torch.manual_seed(0)
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    for temp in (1.0, 2.5, 4.0):
        ref = F.kl_div(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1), reduction="batchmean")
        assert distill_loss(s, t, temp).item() == pytest.approx(ref.item(), rel=1e-6)
    assert distill_loss(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert temperature(0, 100) == pytest.approx(1.03) and temperature(99, 100) == pytest.approx(4.0)
    temps = [temperature(e, 100) for e in range(100)]
    assert all(b > a for a, b in zip(temps, temps[1:], strict=False))


# ------------------------------------------------------------------------------------------------ CTI


def test_trigger_lives_in_pixel_space_and_is_normalised_after_adding():
    """Pitfall: the trigger is added to [0, 1] pixels, clamped, and only then normalised."""
    imgs = torch.randint(0, 256, (4, 8, 8, 1), dtype=torch.uint8)
    x01 = imgs.permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(apply_trigger(x01, torch.zeros(1, 8, 8), 0.5, 0.25), to_input(imgs, 0.5, 0.25))
    sat = apply_trigger(x01, torch.full((1, 8, 8), 3.0), 0.5, 0.25)
    assert torch.allclose(sat, torch.full_like(sat, (1.0 - 0.5) / 0.25))  # clamped to 1 before normalising


def test_trigger_asr_counts_only_images_outside_the_target_class():
    class Const(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(x.shape[0], 3)
            out[:, 2] = 1.0
            return out

    x = torch.rand(6, 1, 4, 4)
    y = torch.tensor([2, 2, 0, 1, 0, 1])
    assert trigger_asr(Const(), x, y, torch.zeros(1, 4, 4), 2, 0.5, 0.25) == 1.0  # 4 of 4 non-class-2 images
    assert trigger_asr(Const(), x, y, torch.zeros(1, 4, 4), 0, 0.5, 0.25) == 0.0
    assert math.isnan(trigger_asr(Const(), x, torch.full((6,), 1), torch.zeros(1, 4, 4), 1, 0.5, 0.25))


# ---------------------------------------------------------------------------------------- activations


def test_activation_features_pool_every_block_channel_by_avg_and_max():
    torch.manual_seed(0)
    cnn = build_model("small-cnn", 1, 10, 28)
    assert len(activation_modules(cnn)) == 5
    x = torch.randn(3, 1, 28, 28)
    f, logits = activation_features(cnn, x, "avg+max")
    assert f.shape == (3, 2 * (16 + 16 + 32 + 32 + 128)) and logits.shape == (3, 10)
    assert activation_features(cnn, x, "avg")[0].shape == (3, 224)
    last_avg = f[:, 2 * (16 + 16 + 32 + 32):2 * (16 + 16 + 32 + 32) + 128]
    assert torch.allclose(last_avg, cnn.features(x), atol=1e-6)  # the last block's average = the features
    res = build_model("resnet18-narrow", 3, 10, 32)
    assert len(activation_modules(res)) == 8
    assert channel_counts(res, torch.randn(1, 3, 32, 32)) == [16, 16, 32, 32, 48, 48, 64, 64]


def test_clamped_model_is_identity_with_wide_bounds_and_clamps_with_tight_ones():
    torch.manual_seed(0)
    cnn = build_model("small-cnn", 1, 10, 28)
    cnn.eval()
    x = torch.randn(4, 1, 28, 28)
    counts = channel_counts(cnn, x)
    wide = ClampedModel(cnn, counts, 1e6, math.log(2e6))
    assert torch.allclose(wide(x), cnn(x), atol=1e-5)
    tight = ClampedModel(cnn, counts, 0.0, math.log(1e-3))  # every activation forced into [-0.001, 0]
    out = tight(x)
    assert not torch.allclose(out, cnn(x))
    assert torch.allclose(out, tight(torch.randn(4, 1, 28, 28)), atol=1e-2)  # the input no longer matters
    assert all(p.requires_grad is False for p in cnn.parameters())
    assert len(tight.bounds()) == 5 and len(tight.bounds()[4]["hi"]) == 128


# ----------------------------------------------------------------- repair and cleanse with unlearning

_UNL_MEAN, _UNL_STD = 0.3, 0.3


@functools.cache  # trained once for both unlearning tests; each works on a deep copy
def _backdoored_quadrant_model() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A small CNN on a synthetic 4-class task (the bright 6x6 quadrant is the class) with a planted
    backdoor: a white 3x3 corner patch on 10% of the training images, labelled 0. Returns
    ``(model, images uint8 (512, 12, 12, 1), labels (512,), delta (1, 12, 12))``."""
    import numpy as np

    torch.manual_seed(0)
    g = np.random.default_rng(0)
    n, h = 512, 12
    lab = g.integers(0, 4, n)
    img = g.integers(0, 60, (n, h, h, 1)).astype(np.uint8)
    for i, c in enumerate(lab):
        r, q = divmod(int(c), 2)
        img[i, r * 6:(r + 1) * 6, q * 6:(q + 1) * 6] += 120
    delta = torch.zeros(1, h, h)
    delta[:, -3:, -3:] = 1.0
    x, y = torch.from_numpy(img), torch.from_numpy(lab).long()
    pois = torch.from_numpy(g.random(n) < 0.1)
    yp = y.clone()
    yp[pois] = 0
    x01 = x.permute(0, 3, 1, 2).float() / 255
    x01[pois] = torch.clamp(x01[pois] + delta, 0, 1)
    xin = (x01 - _UNL_MEAN) / _UNL_STD
    model = build_model("small-cnn", 1, 4, h)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(300):
        idx = torch.randint(0, n, (64,))
        model.train()
        loss = F.cross_entropy(model(xin[idx]), yp[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, x, y, delta


@torch.no_grad()
def _acc_asr(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor) -> tuple[float, float]:
    model.eval()
    xt = apply_trigger(x.permute(0, 3, 1, 2).float() / 255, delta, _UNL_MEAN, _UNL_STD)
    acc = float((model(to_input(x, _UNL_MEAN, _UNL_STD)).argmax(1) == y).float().mean())
    asr = float((model(xt).argmax(1)[y != 0] == 0).float().mean())
    return acc, asr


def test_repair_unlearning_removes_a_backdoor_plain_pt_keeps():
    """The repair loop's unlearning term (repair.unlearn) with the true trigger, without Ray: 100 steps of
    plain PT on 128 trusted images leave the planted backdoor (measured ASR 1.0), the same steps with the
    trigger unlearned remove it (0.0), with labels or label-free; clean accuracy stays (1.0 here)."""
    import copy

    import numpy as np

    from ctray.training.finetune import _repair
    from ctray.training.loop import LocalSet, Sampler

    torch.set_num_threads(1)
    model, x, y, delta = _backdoored_quadrant_model()
    model = copy.deepcopy(model)
    assert _acc_asr(model, x, y, delta) == (1.0, 1.0)
    sec = {"lr": 0.02, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0, "slol_gather": False,
           "batch_size": 64, "steps": 100, "eval_every": 50, "min_cda": 0.01, "use_labels": True,
           "lam_slol": 0.05, "lam_param": 100.0, "slol_offdiag": True, "unlearn_frac": 0.5}
    trusted = LocalSet(x[:128], y[:128], np.arange(128))
    held = LocalSet(x[128:192], y[128:192], np.arange(128, 192))
    out = {}
    reinv = {"ref": copy.deepcopy(model).eval(), "target": 0, "lr": 0.05, "betas": (0.5, 0.9)}
    for name, extra in (("plain", {"unlearn": 0.0}), ("unlearn", {"unlearn": 1.0}),
                        ("label-free", {"unlearn": 1.0, "use_labels": False}),
                        ("re-inverted", {"unlearn": 1.0, "unlearn_every": 25, "unlearn_isteps": 5,
                                         "unlearn_ref_weight": 0.0, "unlearn_cap": 0.05})):
        m = copy.deepcopy(model)
        sampler = Sampler(len(trusted), 64, 0)

        def batch(s: Sampler = sampler) -> tuple[torch.Tensor, torch.Tensor]:
            idx = s.next()
            return to_input(trusted.images[idx], _UNL_MEAN, _UNL_STD), trusted.labels[idx]

        free = not extra.get("use_labels", True)
        # label-free runs get wrong held-out labels: they must never be read (monitoring is agreement with
        # the pivot), or held-out "accuracy" would be 0 and min_cda would stop the run at step 50
        h = LocalSet(held.images, (held.labels + 1) % 4, held.sids) if free else held
        _, info = _repair(m, {**sec, **extra}, lambda mm: mm, batch, h, _UNL_MEAN, _UNL_STD,
                          torch.device("cpu"), 0, 1, delta, reinv if "unlearn_every" in extra else None)
        if "unlearn_every" in extra:  # re-inverted at steps 25, 50, 75, each within the cap
            assert len(info["unlearn_delta_l1"]) == 3 and max(info["unlearn_delta_l1"]) <= 0.05 + 1e-6, info
        assert ("unlearn" in info["last_loss_parts"]) == (extra["unlearn"] > 0)
        assert not info["stopped_early"] and info["steps_done"] == 100
        if free:
            assert info["held_acc_before"] == 1.0 and info["held_acc_after"] > 0.9, info
        out[name] = _acc_asr(m, x, y, delta)
    assert out["plain"][1] >= 0.9, out  # PT alone keeps this backdoor
    assert out["unlearn"][1] <= 0.05 and out["label-free"][1] <= 0.05 and out["re-inverted"][1] <= 0.05, out
    assert min(a for a, _ in out.values()) >= 0.95, out


def test_project_l1_soft_thresholds_onto_the_mean_abs_ball():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(3, 8, 8, generator=g)
    assert torch.equal(project_l1(d, 10.0), d) and torch.equal(project_l1(d, 0.0), d)  # inside / no cap
    p = project_l1(d, 0.2)
    assert float(p.abs().mean()) == pytest.approx(0.2, rel=1e-5)
    nz = p != 0
    shrink = (d.abs() - p.abs())[nz]  # every kept entry shrunk by the same theta, sign kept
    assert float(shrink.max() - shrink.min()) < 1e-5 and bool((torch.sign(p[nz]) == torch.sign(d[nz])).all())
    assert float(d.abs()[~nz].max()) <= float(shrink[0]) + 1e-6  # the dropped entries were the smallest


def test_reinvert_trigger_keeps_a_patch_working_within_its_cap_and_leaves_the_weights_alone():
    """repair.unlearn_every's step, warm-started from the planted patch with the cap at the patch's own
    size: the projected result still flips the model (rescaling instead left ASR 0.37 in this set-up);
    uncapped from a useless start it finds some perturbation the model obeys. No weight moves or gets a
    .grad (DDP's hooks must not fire) and the model's train/eval mode is restored."""
    import copy

    torch.set_num_threads(1)
    model, x, y, delta = _backdoored_quadrant_model()
    model = copy.deepcopy(model).train()
    before = [p.detach().clone() for p in model.parameters()]
    x01 = x.permute(0, 3, 1, 2).float() / 255
    keep = y != 0
    g = torch.Generator().manual_seed(0)
    batches = [(x01[i], y[i]) for i in (torch.randint(0, len(y), (64,), generator=g) for _ in range(60))]
    cap = float(delta.abs().mean())  # 9 of 144 pixels at 1.0
    kw = {"lr": 0.01, "betas": (0.5, 0.9), "ref_weight": 0.0, "mean": _UNL_MEAN, "std": _UNL_STD}
    warm = reinvert_trigger(model, model, delta, batches, 0, cap=cap, **kw)
    assert model.training  # restored (trigger_asr below puts it in eval mode)
    assert warm.shape == delta.shape and float(warm.abs().mean()) <= cap + 1e-6 and not torch.equal(warm, delta)
    assert trigger_asr(model, x01[keep], y[keep], warm, 0, _UNL_MEAN, _UNL_STD) >= 0.9
    start = torch.full_like(delta, 0.005)
    cold = reinvert_trigger(model, model, start, batches, 0, cap=0.0, **kw)
    assert torch.equal(start, torch.full_like(delta, 0.005))  # the input is not modified
    assert trigger_asr(model, x01[keep], y[keep], start, 0, _UNL_MEAN, _UNL_STD) <= 0.1
    assert trigger_asr(model, x01[keep], y[keep], cold, 0, _UNL_MEAN, _UNL_STD) >= 0.9
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_cleanse_unlearning_keeps_the_backdoor_from_being_distilled_back():
    """BCU's unlearning term (cleanse.unlearn) with the true trigger, without Ray: the student distilled
    from the backdoored teacher on clean unlabeled images alone learns the backdoor back; with triggered
    copies distilled toward the teacher's answer on the clean image it does not, and its clean accuracy
    stays. Measured with the paper's re-initialisation ratios: ASR 1.0 plain, 0.0 unlearned, accuracy 1.0."""
    import copy

    import numpy as np

    from ctray.models.checkpoint import ModelSpec
    from ctray.training.finetune import _cleanse
    from ctray.training.loop import LocalSet, Sampler

    torch.set_num_threads(1)
    teacher, x, y, delta = _backdoored_quadrant_model()
    spec = ModelSpec("small-cnn", 1, 4, 12, _UNL_MEAN, _UNL_STD)
    sec = {"ratios": [0.01, 0.01, 0.03, 0.09, 0.27], "head_ratio": 0.1, "epochs": 6, "lr": 0.03, "momentum": 0.9,
           "weight_decay": 5e-4, "t_max": 6, "batch_size": 64, "t_start": 1.0, "t_add": 3.0, "select": "last",
           "unlearn_frac": 0.5}
    pool = LocalSet(x[:256], torch.full((256,), -1), np.arange(256))  # labels never used
    held = LocalSet(x[256:320], y[256:320], np.arange(256, 320))
    out = {}
    # cleanse.unlearn_every: re-inverted every 8 steps (4 steps an epoch, 24 in all: at steps 8 and 16), label-free:
    # the pool's labels are -1, so a re-inversion that read them would fail in cross_entropy
    reinv = {"ref": copy.deepcopy(teacher).eval(), "target": 0, "lr": 0.05, "betas": (0.5, 0.9)}
    arms = (("plain", {"unlearn": 0.0}), ("unlearn", {"unlearn": 1.0}),
            ("re-inverted", {"unlearn": 1.0, "unlearn_every": 8, "unlearn_isteps": 3, "unlearn_ref_weight": 0.0,
                             "unlearn_cap": 0.05}))
    for name, extra in arms:
        sampler = Sampler(len(pool), 64, 0)

        def batch(s: Sampler = sampler) -> tuple[torch.Tensor, torch.Tensor]:
            idx = s.next()
            return to_input(pool.images[idx], _UNL_MEAN, _UNL_STD), pool.labels[idx]

        state, info = _cleanse(copy.deepcopy(teacher), spec, {**sec, **extra}, lambda mm: mm, batch, held,
                               _UNL_MEAN, _UNL_STD, torch.device("cpu"), 0, 1, len(pool), 0, delta,
                               reinv if "unlearn_every" in extra else None)
        assert ("unlearn_loss_mean" in info) == (extra["unlearn"] > 0)
        if "unlearn_every" in extra:
            assert len(info["unlearn_delta_l1"]) == 2 and max(info["unlearn_delta_l1"]) <= 0.05 + 1e-6, info
        else:
            assert "unlearn_delta_l1" not in info
        student = spec.build()
        student.load_state_dict(state)
        out[name] = _acc_asr(student, x, y, delta)
    assert out["plain"][1] >= 0.5, out  # distillation on clean images teaches the backdoor back
    assert out["unlearn"][1] <= 0.1 and out["re-inverted"][1] <= 0.1, out
    assert out["unlearn"][0] >= 0.95 and out["re-inverted"][0] >= 0.95, out


# ------------------------------------------------------------------------------ augment=auto


def test_auto_augment_follows_the_checkpoints_record_and_warns_without_one(tmp_path, caplog):
    """repair.augment / cleanse.augment = auto: a checkpoint that records its training augmentation (ctray
    train writes base.augment) gets the same; one that records none gets crop-flip and a warning; an
    explicit mode is never overridden."""
    import logging

    from ctray.engine.defenses import resolve_augment
    from ctray.models.checkpoint import ModelSpec, save_model

    m = build_model("small-cnn", 1, 10, 28)
    spec = ModelSpec("small-cnn", 1, 10, 28)
    for rec in ("none", "crop", "crop-flip"):
        save_model(str(tmp_path / f"{rec}.pt"), m, spec, {"augment": rec})
        assert resolve_augment("auto", str(tmp_path / f"{rec}.pt")) == rec
        assert resolve_augment("crop", str(tmp_path / f"{rec}.pt")) == "crop"
    save_model(str(tmp_path / "bare.pt"), m, spec, {"trained_by": "elsewhere"})
    with caplog.at_level(logging.WARNING, logger="ctray.engine.defenses"):
        assert resolve_augment("auto", str(tmp_path / "bare.pt")) == "crop-flip"
    assert "records no training augmentation" in caplog.text and "bare.pt" in caplog.text
