"""The config schema: dataclasses are the ONLY home of defaults; presets and ``key=value`` override them.

Defaults are the published CT schedule for CIFAR-10 (Qi et al., USENIX Security 2023; the official
code's ``config.py`` + ``ct_cleanser.py``; ../shared/specs/ct.md §1.4), each with its reason. Named
presets (``ctray/presets/*.yaml``) hold only differences from these defaults.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from ctray.errors import ConfigError

log = logging.getLogger(__name__)

PRESET_DIR = os.path.join(os.path.dirname(__file__), "presets")


@dataclass
class IOConfig:
    """Where data comes from and where results go (set by CLI options; also settable as ``io.*``)."""

    train: list[str] = field(default_factory=list)  # shard specs of the suspect set D
    clean: list[str] = field(default_factory=list)  # shard specs of the trusted reserve R
    out: str = ""  # run directory
    truth: str = ""  # optional truth.parquet / .csv (shard, key, poison[, cover])
    # a cache of finished phases shared by runs (ctray.training.phasecache; a sweep sets OUT/cache): a run
    # whose f_base inputs match a published f_base copies it instead of training one. "" = off
    phase_cache: str = ""
    phase_cache_bytes: int = 4_000_000_000  # bound of the cache: oldest entries go first


@dataclass
class DataConfig:
    """How shards are read. Image size/channels/classes are inferred from the data when left at 0."""

    image_size: int = 0  # 0 = infer (manifest.json, else the most common size)
    channels: int = 0  # 0 = infer; 1 grey, 3 RGB
    num_classes: int = 0  # 0 = infer (manifest, else max label + 1 of D and R)
    on_mode: str = "convert"  # DESIGN §3: any mode is converted to the run's channels ("quarantine" to refuse)
    on_size: str = "quarantine"  # an image of another size is quarantined ("resize" to resize it)
    strict: bool = False  # a whole-shard failure (not a tar, truncated, empty) raises instead of quarantining
    # decode guard (hostile input): an image whose header declares more pixels is quarantined before any
    # pixel is decoded (default 8192 x 8192); a tar member declaring more bytes ends its shard as damage
    max_pixels: int = 1 << 26
    max_member_bytes: int = 256 * 2**20
    mean: float = 0.5  # normalisation x' = (x/255 - mean) / std, same for every channel
    std: float = 0.25
    read_cpus: float = 0.25  # fractional CPUs per Ray Data task: avoids the Train/Data 2-CPU deadlock
    score_batch_size: int = 512  # rows per scoring batch (inference only)
    score_actors: int = 1  # model-holding workers per scoring pass (more on a cluster): tasks or actors
    score_cpus: float = 1.0  # CPUs per scoring worker (threads = max(1, int(score_cpus)))
    # "tasks" (ctray's default): a task pool whose worker processes keep the pass's model in a per-process
    # cache; "actors": a fresh Ray Data actor pool per pass. Measured (python -m ctray.benchmarks.ct): an actor
    # pool costs ~5-8 s of start-up per pass on a 2-core box, a cached task pass of 2,000 images < 1 s, and a
    # CT run scores D once per round
    score_compute: str = "tasks"
    # GPUs per scoring worker (0 = score on CPUs). > 0: each scoring task asks Ray for that many GPUs and
    # runs the model there (0.25 = four scoring workers share a GPU); decode stays in the CPU read tasks,
    # which Ray Data's streaming runs beside the GPU work. Raise score_batch_size with it (e.g. 2048).
    score_gpus: float = 0.0
    # scoring precision: "auto" = bf16 autocast on a GPU that has it (fp16 otherwise), fp32 on CPU;
    # "fp32"; "bf16" (CPU or GPU: ~2x on a CPU with AMX-BF16); "fp16" (GPU only). Loss and softmax are
    # computed in fp32 either way.
    score_precision: str = "auto"
    # Memory model (nothing is held in proportion to N unless it fits one of these budgets):
    # decoded D (+ the final pass's features) is cached in the object store only when it fits cache_bytes
    # ("auto" = 40% of the cluster's object store; "0" = never; or a size: 512MB, 2GiB); otherwise every
    # pass re-reads and re-decodes the shards. A training worker holds a round's set in memory only when
    # its share fits worker_cache_bytes ("auto" = 20% of the worker machine's RAM over the workers on it),
    # loaded by filtering on sample ids while streaming; otherwise every epoch streams from its Ray Data
    # shard through a local shuffle buffer of shuffle_bytes (so a set within shuffle_bytes is always held).
    # Ray Data's blocks in flight (read -> decode -> score) are capped at inflight_bytes of object store
    # ("auto" = 25% of the cluster's object store, below Ray's own default of half, so a cache within
    # cache_bytes and the stream's blocks together stay under two thirds of the store and nothing spills).
    cache_bytes: str = "auto"
    worker_cache_bytes: str = "auto"
    shuffle_bytes: int = 256 * 2**20
    inflight_bytes: str = "auto"


#: data.score_precision values (ctray.training.steps.autocast_dtype resolves "auto" per device)
SCORE_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: training augmentations (base.augment; what a checkpoint records in extra["augment"])
TRAIN_AUGMENTS = ("crop-flip", "crop", "none")
#: augmentation modes of the defenses' fits (repair.augment, cleanse.augment): "auto" resolves to the
#: checkpoint's recorded training augmentation (ctray.engine.defenses.resolve_augment)
AUGMENTS = ("auto", *TRAIN_AUGMENTS)
#: ``data.*`` keys that set how a run uses the machine, never what it computes: run fingerprints (resume,
#: bench cells) ignore them and a sweep's best.yaml leaves them out.
DATA_RESOURCE_KEYS = ("read_cpus", "score_batch_size", "score_actors", "score_cpus", "score_gpus", "score_compute",
                      "cache_bytes",
                      "inflight_bytes")


@dataclass
class BaseConfig:
    """The base model f_base, trained normally on all of D; only its predictions on R are used
    (confusion labels). Reference: ResNet-18, 100 epochs, SGD lr 0.1, mom 0.9, wd 1e-4, batch 128,
    lr x0.1 at epochs 50/75, random crop (pad 4) + horizontal flip (``train_on_poisoned_set.py``)."""

    arch: str = "resnet18"
    epochs: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    milestones: list[int] = field(default_factory=lambda: [50, 75])
    gamma: float = 0.1
    augment: str = "crop-flip"  # "crop-flip" | "crop" | "none" (flip is wrong for digits/text)
    # f_base's cost at scale (its epochs over all of D are most of a reference run's training): it only
    # labels the reserve (and feeds the cross-class detector), so it may train on a seeded uniform sample
    # of at most max_samples samples of D (0 = all of D, the paper), or be given: checkpoint = a ctray
    # model file (e.g. from `ctray train`, or a previous run's checkpoints/round_0/fbase.pt) of base.arch
    # for this data's channels, classes and image size; then no f_base is trained.
    max_samples: int = 0
    checkpoint: str = ""


@dataclass
class CTConfig:
    """Confusion Training. Per-round lists have one entry per round (``rounds``); distillation lists
    one per non-final round (``rounds - 1``). Values: the paper's CIFAR-10 schedule (specs/ct.md §1.4)."""

    arch: str = "resnet18"  # CT model; CIFAR/GTSRB use f_base's architecture (config.py: arch)
    rounds: int = 6  # len(distillation_ratio) + 1
    # pretraining ("base_r"): SGD lr 0.01, mom 0.9, batch 32, plain CE, no augmentation
    pretrain_epochs: list[int] = field(default_factory=lambda: [100, 100, 40, 40, 40, 40])
    pretrain_lr: float = 0.01
    pretrain_momentum: float = 0.9
    pretrain_batch_size: int = 32
    pretrain_weight_decay: float = 1e-4
    pretrain_from_scratch: bool = False  # CIFAR: init from the previous round's pretrained model
    reserve_in_pretrain_from: int = 5  # rounds >= this add R with labels (y+1) mod C (CIFAR: final only)
    # confusion training ("confused_r"): init = base_r; constant lr; batch 32 confusion + 32 inspection
    iters: list[int] = field(default_factory=lambda: [6000, 6000, 6000, 6000, 2000, 2000])
    lr: list[float] = field(default_factory=lambda: [0.001, 0.001, 0.001, 0.01, 0.01, 0.01])
    momentum: float = 0.7
    weight_decay: float = 1e-4
    lam: list[float] = field(default_factory=lambda: [20, 20, 20, 30, 30, 15])  # confusion factor
    batch_factor: list[int] = field(default_factory=lambda: [2, 2, 2, 2, 2, 2])  # mixed step every b-th
    batch_size: int = 32  # each of the confusion and the inspection part (global, all workers together)
    uniform_class_weights: bool = False  # ImageNet/Ember: True; final round always uniform
    # distillation after round r < rounds-1: keep int(ratio * N) lowest-loss of ALL of D, floor n_c // k
    keep_ratio: list[float] = field(default_factory=lambda: [1 / 2, 1 / 5, 1 / 25, 1 / 50, 1 / 100])
    floor_k: list[int] = field(default_factory=lambda: [50, 50, 50, 50, 100])
    # Larger batches for the N-proportional phases (f_base and pretraining): k x their global batch at
    # k x their learning rate (linear scaling), warmed up linearly from 1x over warmup_epochs, so they
    # take k times fewer sequential steps for the same passes over D (set k to the GPU count to keep
    # each GPU's batch the reference's). Confusion training keeps its batch and iterations (a fixed cost).
    # 1 = the reference.
    batch_scale: int = 1
    warmup_epochs: float = 2.0
    # Pretraining epochs given for a D of pretrain_ref_n samples: at N > pretrain_ref_n each round's epochs
    # become ceil(epochs * pretrain_ref_n / N), at least 1, so a round takes about the steps (and sees about
    # the poison samples, at a given poison rate) it takes at pretrain_ref_n, and the passes over D fall as
    # N grows (core.cost.scaled_pretrain_epochs). 0 = the epochs as given at every N (the paper).
    pretrain_ref_n: int = 0


@dataclass
class DecideConfig:
    """The final per-class PCA + likelihood-ratio test (specs/ct.md §1.6)."""

    threshold_max: float = 1.5  # the class with the largest LR is cleansed above this
    threshold_any: float = 2.0  # any class is cleansed above this
    flag_budget: float = 0.0  # Ember variant: >0 flags the lowest-loss fraction instead of the LRT
    # a cleansed class whose LR is below this is reported as weak evidence (a warning, "weak" in
    # decisions.json, the report); on its own it never changes the decision (decide.corroborate can).
    # Measured on Fashion-MNIST 10k (docs/results.md "Detection per attack"): detected attacks' target
    # classes had LR 153 to 1e111; benign classes cleansed when the attack escaped had 1.62-2.63; the
    # largest on clean data was 1.33 (at 50k: 1.83-2.84, and a detected blend target 7.06)
    weak_lr: float = 10.0
    # Corroboration of weak evidence (not in the paper; 0 = off, the paper's decision): a class cleansed with
    # LR < weak_lr stays cleansed only if, under some earlier round's model (all rounds but the last two),
    # at least this share of its isolated samples were among the |I_c| lowest-loss samples of D
    # (core.decide.corroboration). Strong evidence is never vetoed. Measured (docs/results.md,
    # "Corroborating weak evidence"): benign weakly cleansed classes <= 0.27, weakly detected poison >= 0.53.
    corroborate: float = 0.0


@dataclass
class ScaleConfig:
    """How the Ray Train phases are laid out."""

    # data-parallel training workers (DDP, gloo on CPU / nccl on GPU); 0 = Ray Train's local mode: the
    # same loop in the driver process (no worker start-up, ~3 s instead of ~12 s per fit; one machine)
    num_workers: int = 1
    use_gpu: bool = False
    # CPUs each Train worker asks for. 0 = auto, sized from the node types that can host a worker (alive
    # nodes and the autoscaler's declared types, never the driver's machine): on each such node Ray Data
    # keeps max(0.5, 25%) of its CPUs and the workers that fit on its GPUs share the rest; the smallest
    # value over the node types, >= 0.25 (a g5.xlarge GPU node, 4 CPUs: 3; a 2-CPU laptop: 1.5 for one
    # worker, 0.75 each for two). No node type that can host the request: the run fails at once.
    cpus_per_worker: float = 0.0
    gpus_per_worker: float = 1.0
    # custom resources each Train worker asks for, e.g. {"accelerator_type:A10G": 0.001} to pin workers
    # to a node type; counted when sizing cpus_per_worker (only node types that have them host workers)
    worker_resources: dict[str, float] = field(default_factory=dict)
    torch_threads: int = 0  # 0 = auto: cpus_per_worker rounded down (>= 1), at most the worker machine's cores
    # In-round Ray Train checkpoints with worker processes (on top of one after f_base and one after
    # pretraining): a killed worker redoes at most this much. By wall time, so their volume follows the
    # run's hours, not N: a step count grows with N (2,000 steps was ~29,000 checkpoints of ~90-180 MB
    # for a 10M-image reference run; every 10 minutes is 6 an hour whatever N). Each holds the model
    # being trained + its optimizer state (~90 MB for ResNet-18); finished phases' weights are referenced
    # in the round's directory, not copied. Both 0 = phase boundaries only. Local mode (num_workers=0)
    # writes none: there the driver is the only process, and reruns resume per round.
    checkpoint_minutes: float = 10.0  # wall minutes between checkpoints (0 = not by time)
    checkpoint_every: int = 0  # steps between checkpoints (0 = not by steps), e.g. for tests
    checkpoint_async: bool = True  # upload in the background (Ray Train's ASYNC mode); training goes on
    # GPU workers: bytes of a round's set (uint8) + the reserve a worker keeps on its GPU so each step
    # gathers its batch there ("auto" = a quarter of the device's memory; "0" = never: batches are
    # copied from pinned host memory each step, asynchronously)
    device_cache_bytes: str = "auto"
    # GPU workers (> 1): BatchNorm statistics over the global batch (SyncBatchNorm) instead of each
    # rank's share. Off = the reference's behaviour (DataParallel normalises per replica); worth it when
    # per-rank batches get small (128 over 8 GPUs = 16 per rank). Not validated on the grid yet.
    sync_batchnorm: bool = False
    max_failures: int = 2  # worker-group restarts per round's fit before the run fails (Ray Train FailureConfig)


@dataclass
class BenchConfig:
    """The baseline detectors CT is compared with and the comparison grid (``ctray bench``, specs/ct.md §5).

    Baselines use f_base (the run's normally trained, backdoored model), as in the paper.
    """

    # Spectral Signature's poison-rate budget (k = min(1.5 * rate * N, |class| / 2) per class); 0 = the
    # reference's choice: the true rate when --truth has poison, else 1% (its no-attack budget)
    ss_rate: float = 0.0
    ac_dims: int = 10  # Activation Clustering: principal components per class (Chen et al., the reference)
    ac_max_fraction: float = 0.35  # AC flags the smaller 2-means cluster below this share of its class (reference)
    ac_n_init: int = 10  # k-means starts per class: scikit-learn's long-time default, what the reference ran
    # STRIP: reserve images superimposed on each sample; the paper's 100. Each one is a forward pass over
    # all of D, so on a CPU a smaller n (e.g. 20) keeps the bench affordable; the bench reports the n used
    strip_n: int = 100
    strip_alpha: float = 1.0  # superimposition x + alpha * r on normalised inputs (the reference's 1.0)
    strip_frr: float = 0.1  # threshold = this quantile of the clean reserve's entropies (10th percentile)
    # SCAn's EM fits run on the driver: features are projected on the top-k principal axes of all of D's
    # features first, so k floats per sample travel there (32 x 4 B = 128 B; 10M samples = 1.3 GB)
    scan_dim: int = 32
    scan_threshold: float = math.exp(2.0)  # anomaly index above which a class is cleansed (Tang et al.: e^2)
    # grid cells (attacks) run at once as Ray tasks; 0 = auto: the cluster's CPUs divided by what one cell
    # needs (cell_cpus + a scoring task + a read task), at least 1. 1 runs the cells in the driver
    parallel: int = 0
    # CPUs one cell task holds: it runs local-mode training in its own process; fractional so the
    # cell's own Ray Data ops (scoring and read tasks) still fit beside it on a 2-CPU machine
    cell_cpus: float = 0.5


@dataclass
class AggregateConfig:
    """Per-shard / per-source tables (``shards.parquet``, ``sources.parquet``) built while the final
    round's scoring streams (``ctray.engine.aggregate``)."""

    alpha: float = 0.01  # family-wise level of the binomial marking; Bonferroni over the groups
    top_k: int = 10  # most suspicious keys kept per group: enough to eyeball a shard, small per block
    bins: int = 20  # score histogram bins over [0, 1] (0.05 wide)


@dataclass
class CanaryConfig:
    """Defender canaries (``ctray.engine.canary``): copies of a seeded random subset of D's non-target
    samples with a defender trigger, relabelled to ``target``. They are trained and scored like any
    sample but never appear in user-facing outputs. Off for ``detect``; ``sweep`` turns them on."""

    rate: float = 0.0  # fraction of the usable samples added as canaries; 0 = none (plain detection)
    min_count: int = 8  # at least this many when on: recall moves in steps of 1/count (1/8 = 0.125)
    target: int = -1  # the canaries' label; -1 = the last class (C - 1)


@dataclass
class SweepConfig:
    """``ctray sweep``: Ray Tune over CT's knobs (``ctray.engine.sweep``)."""

    num_samples: int = 8  # trials drawn from the search space
    canary_rate: float = 0.002  # canaries planted per trial without --truth (0.2% of D, >= canary.min_count)
    # objective without truth = canary_recall - flag_weight * flag rate outside the canaries: flagging
    # 1% of the real data costs as much as missing 5% of the canaries (a wrongly cleansed class of ~10%
    # costs 0.5)
    flag_weight: float = 5.0
    max_concurrent: int = 0  # trials at once; 0 = auto: one per CPU of the cluster, at most num_samples
    trial_cpus: float = 0.5  # CPUs each trial's CT run holds (its local-mode training); Data gets the rest
    grace_rounds: int = 0  # ASHA: rounds every trial runs before it may be stopped; 0 = auto (rounds // 2)
    reduction_factor: float = 2.0  # ASHA: keep the top 1/reduction_factor at each rung
    baseline: bool = True  # also run the preset unchanged, so the best trial is read next to it
    # runs share finished phases through OUT/cache (io.phase_cache; today f_base: trained once, copied by
    # every run whose f_base inputs match). Off: every trial trains its own
    share_phases: bool = True


# ------------------------------------------------------------------------ model-level defenses
# Defaults are the published settings (seed-defenses.md; CIFAR-10 scale). The `small` / `smoke` presets
# hold the CPU schedules measured in docs/defenses.md.


@dataclass
class RepairConfig:
    """Pivotal Tuning (Lukas & Kerschbaum 2023, seed-defenses.md §1.2): fine-tune the suspect model on the
    trusted labelled set while anchoring its weights to the frozen pivot and rotating the class-centroid
    geometry away from the pivot's. Defaults: the reference code's dataclass (CIFAR-10 scale)."""

    steps: int = 2000  # reference default; a fixed step budget, not epochs
    lr: float = 1e-4  # SGD lr of the reference (ImageNet follow-up: 5.1e-4)
    momentum: float = 0.9  # SGD with Nesterov momentum 0.9 (reference)
    nesterov: bool = True
    weight_decay: float = 0.0  # reference: 0 (L_param is the regulariser)
    batch_size: int = 128  # reference; global batch, split across workers
    lam_slol: float = 0.05  # weight of the soft latent orthogonality loss (reference)
    lam_param: float = 2e4  # weight of mean((theta - theta0)^2) (reference)
    use_labels: bool = True  # def_use_ground_truth=True; False = soft CE to the pivot's softmax (T=1)
    slol_offdiag: bool = True  # the intended off-diagonal Gram norm; False = the reference's diagonal-vector bug
    slol_gather: bool = False  # all-gather z, z0, y across ranks before the centroids (False = per-rank centroids)
    eval_every: int = 50  # held-out accuracy check every this many steps (reference)
    min_cda: float = 0.01  # stop when held-out accuracy falls to or below this (reference)
    holdout_frac: float = 0.1  # share of the trusted set held out (by sample id) for monitoring: the reference
    #                            monitors on the test set, which ctray never touches
    # "auto" (ctray's default): the augmentation the checkpoint was trained with (``ctray train`` records
    # base.augment in it; crop-flip when it says nothing); or crop-flip | crop | none. The spec is silent.
    # Measured (docs/defenses.md), a narrow ResNet-18 trained without augmentation, wanet: repaired with
    # crop-flip it lost 7.6 points (6.0 without), cleansed 9.3 (2.2 without): the defense showed it images
    # it never saw
    augment: str = "auto"
    # ctray's extension (0 = the paper's PT): + kd * kd_t^2 * KL(pivot || f) at temperature kd_t on the clean
    # batch (Hinton distillation from the pivot), so the tuning keeps the pivot's clean answers as well as
    # fitting the few trusted labels. Use it WITH repair.unlearn: it anchors the function to the pivot, so PT's
    # drift no longer removes the backdoor, the unlearning must. Measured (docs/defenses.md): narrow ResNet-18,
    # 500 trusted, unlearn 1 re-inverted every 100, kd 1 against 0 on the same models and audit: points lost
    # badnet 4.6 -> 0.4, blend 4.6 -> 0.2, wanet 6.0 -> 1.0 (ASR 0.050 / 0.001 / 0.023); without unlearning
    # (smoke, small CNN) kd 1 left ASR at 0.97 where plain PT reaches 0.24-0.42, hence off by default
    kd: float = 0.0
    kd_t: float = 4.0
    # ctray's extension (not in the paper; 0 = the paper's PT): before tuning, audit the model (CTI, audit.*)
    # and add unlearn * CE(f(x + delta), y) on triggered copies of unlearn_frac of each batch, delta = the
    # trigger inverted for the audit's target class (Neural Cleanse's unlearning, with CTI's trigger).
    # Measured (docs/defenses.md): narrow ResNet-18, blend, 500 trusted, 4 seeds: mean ASR 0.36 -> 0.20
    # (0.15-0.68 -> 0.15-0.31) for about 1 more point of accuracy.
    unlearn: float = 0.0
    unlearn_frac: float = 0.5  # share of each batch also fed with the trigger (true labels; the pivot's if label-free)
    # ctray's extension (0 = off; 100 in preset defend-resnet18-narrow): every unlearn_every steps, re-invert the
    # trigger against the model being repaired (unlearn_isteps warm-started Adam steps at audit.lr / audit.betas, the reference's term weighted
    # unlearn_ref_weight), then cap its mean |delta| at unlearn_cap ([0, 1] pixel units; 0 = no cap).
    # The cap is a projection (ctray.defenses.audit.project_l1). Harness (narrow ResNet-18, blend, 500 trusted,
    # every 100, cap 0.1; docs/defenses.md), 4 seeds: ASR 0.02-0.12 (mean 0.06) for 1.9-5.9 points, against
    # 0.15-0.31 for 2.1-2.8 with the audit's trigger throughout; uncapped it cost up to 17.8 points. Product
    # path, one run: 0.810 / 0.000 (static: 0.810 / 0.040). The cap is in pixel units, measured on
    # Fashion-MNIST only.
    unlearn_every: int = 0
    unlearn_isteps: int = 20
    unlearn_ref_weight: float = 2.0
    unlearn_cap: float = 0.1


@dataclass
class AuditConfig:
    """Calibrated Trigger Inversion (seed-defenses.md §1.3): per candidate target c, invert a full-image
    additive trigger that flips the suspect model to c but keeps its pivotal-tuned copy (``repair.*``)
    on the true labels; the model score is the largest success gap."""

    steps_per_class: int = 50  # nc_steps_per_class (reference)
    lr: float = 0.01  # Adam (reference)
    beta1: float = 0.5  # Adam betas (0.5, 0.9) (reference)
    beta2: float = 0.9
    batch_size: int = 128  # reference
    init_max: float = 0.01  # delta ~ U(0, init_max) in [0, 1] pixel space (reference)
    ref_weight: float = 0.5  # weight of CE(f_ref(x + delta), y) (reference)
    flip: bool = True  # random horizontal flip of the optimisation batch (reference)
    eval_frac: float = 0.5  # trusted share held out (by sample id) to measure the gap; the reference uses the
    #                         test set, which ctray never touches
    classes: list[int] = field(default_factory=list)  # candidate targets; empty = every class
    score: str = "gap-size"  # model score (ctray.core.audit): "gap" = the reference's max_c gap_c; "gap-size"
    #                          weighs each gap by median trigger size / its trigger size. Measured on
    #                          Fashion-MNIST small CNNs (docs/defenses.md): AUROC 0.56 with "gap" (every
    #                          model, clean or not, reached a gap near 1 on some class); "gap-size" 1.0 on
    #                          the 3+3 models it was found on, 0.78 on 3+3 fresh ones
    threshold: float = 1.5  # "backdoored" when score > this. gap-size: 6 clean models scored 1.15-1.32,
    #                         6 backdoored 1.22 (sig) and 1.52-1.96 (docs/defenses.md); "gap": the reference
    #                         has none (it reports AUROC), 0.5 is ours. Calibrate on clean models of your setting
    use_labels: bool = True  # False (ctray's, for cleanse.unlearn): the suspect model's own predictions stand
    #                          in for the labels and the reference is the label-free PT (repair.use_labels=false)
    max_images: int = 10000  # ctray's: the audit holds its images in driver memory; above this many usable
    #                          images it keeps a seeded sample of about this many (by sample id) and says so.
    #                          cleanse.unlearn audits the unlabeled pool, which may be large. 0 = all
    task_cpus: float = 0.5  # CPUs per Ray task (fractional: several classes in parallel on a small box)
    classes_per_task: int = 1  # candidate classes per Ray task (chunk on big K to amortise model loading)


@dataclass
class CleanseConfig:
    """BCU, Backdoor Cleansing with Unlabeled data (Pang et al. CVPR 2023, seed-defenses.md §3.2): a
    student = the teacher with a depth-growing share of conv/linear weights re-initialised (norm layers
    kept), distilled from the teacher on unlabeled images with a rising temperature."""

    ratios: list[float] = field(default_factory=lambda: [0.01, 0.01, 0.03, 0.09, 0.27])  # stem, stage 1..4
    #                   (run_defense.sh --layerwise_ratio, ResNet-18); other models: depth quantiles of their layers
    head_ratio: float = 0.10  # re-initialised share of the final linear layer (reference)
    epochs: int = 100  # reference
    lr: float = 0.01  # SGD (reference)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    t_max: int = 100  # CosineAnnealingLR(T_max=100), stepped per epoch (reference)
    batch_size: int = 256  # reference
    t_start: float = 1.0  # temperature T_e = t_start + t_add * (e + 1) / epochs: ~1.03 .. 4 (reference)
    t_add: float = 3.0
    augment: str = "auto"  # "auto": the checkpoint's training augmentation (crop-flip if unrecorded, the
    #                       reference get_transform); or crop-flip | crop | none
    select: str = "last"  # "last": the reference saves the last epoch; "agree": the epoch agreeing most with
    #                      the teacher on the held-out unlabeled split (never the test set)
    holdout_frac: float = 0.1  # unlabeled share held out (by sample id) for monitoring/selection
    # ctray's extension, on by default (0 = the paper's BCU, preset reference-cifar): before distilling, audit
    # the teacher without labels (audit.use_labels=false: its own predictions, label-free PT reference) and
    # add unlearn * KL(teacher(x) || student(x + delta)) at the epoch's temperature on triggered copies of
    # unlearn_frac of each batch: the student must answer a triggered image as the teacher answers the clean
    # one, so the backdoor is not distilled back. Measured (docs/defenses.md), weight 3 against 0: through
    # cleanse_model on the small CNN, blend 0.783/0.49 -> 0.793/0.16, wanet 0.775/0.26 -> 0.789/0.19, badnet
    # 0.786/0.049 -> 0.800/0.037 (acc/ASR); blend over 3 harness seeds ASR 0.63 -> 0.20. Costs one audit.
    unlearn: float = 3.0
    unlearn_frac: float = 0.5  # share of each batch also fed with the trigger
    # EXPERIMENTAL (config.EXPERIMENTAL; 0 = off), as repair.unlearn_every: every unlearn_every steps, re-invert the trigger
    # against the student (label-free: the teacher's answers on the clean images are the labels, the audit's
    # label-free PT is the reference), then project its mean |delta| onto unlearn_cap ([0, 1] pixel units).
    unlearn_every: int = 0
    unlearn_isteps: int = 20
    unlearn_ref_weight: float = 2.0
    unlearn_cap: float = 0.1


@dataclass
class ActConfig:
    """Activation statistics (BadActs, Yi et al. 2024, seed-defenses.md §2; the image transfer §2.5 is
    ctray's design): per-channel clean intervals of block outputs, the out-of-interval share as a
    per-sample score, and a learned activation-clamping purifier."""

    mode: str = "gauss"  # "gauss": mu +- delta sigma (paper); "quantile": [q_alpha, q_(1-alpha)] (robust)
    delta: float = 3.0  # band half-width in sigmas (runner scripts; class default 2)
    alpha: float = 0.001  # quantile mode tail share per side
    bins: int = 1024  # quantile mode: histogram bins per neuron (quantile error <= range / bins)
    pool: str = "avg+max"  # per-channel reduction over H x W: "avg", "max" or both (patch triggers are spikes)
    sigma_floor: float = 1e-4  # guards sigma = 0 of dead channels (absolute, in activation units)
    drop_constant: bool = False  # True: leave neurons with sigma <= sigma_floor out of the score instead
    frr: float = 0.05  # false-rejection rate on clean half B that sets the flag threshold (detection runner)
    split_seed: int = 2024  # A/B split of the clean set by sample-id hash (the reference shuffles with 2024)
    in_detect: bool = False  # ctray detect adds score_act / flagged_act (f_base's activations) to scores.parquet
    # purifier: learned per-channel bounds [u - exp(m), u], weights frozen (BadActs_purification.py)
    purify_epochs: int = 50  # reference
    purify_lr: float = 0.01  # Adam (reference)
    purify_batch_size: int = 32  # reference
    purify_c: float = 0.1  # initial width penalty c (reference), adapted x/÷ purify_a
    purify_a: float = 1.2
    purify_keep: float = 0.98  # tighten (c *= a) while held accuracy >= this share of the unclamped model's
    purify_min: float = 0.97  # restart with c / 2 while the final accuracy share is below this
    purify_init: str = "ones"  # "ones": u = m = 1 (reference, tuned for BERT); "stats": the clean min/max


@dataclass
class XClassConfig:
    """The cross-class detector run beside CT (``ctray.core.xclass``; docs/results.md): poison spread over
    every class (all-to-all, untargeted), which CT's per-class decision cannot see. From f_base: samples
    whose loss exceeds the trusted reserve's ``loss_quantile`` are suspects; the Fisher direction of their
    activation features against all of D's scores every sample; a sample above both the loss and the
    reserve's ``score_quantile`` of that score is flagged when D holds significantly more such samples than
    the reserve predicts (a one-sided test at ``alpha``). Four forward passes of f_base (two over R, two over D)."""

    enabled: bool = True  # off in the faithful presets (reference-cifar, imagenet64) and in smoke
    loss_quantile: float = 0.95
    score_quantile: float = 0.99
    # "predictive": the clean crossing rate is drawn from its posterior given the reserve (beta-binomial);
    # "plug-in": the reserve's estimate taken as known (binomial), the first design, which fires on clean
    # data as D grows (ctray.core.xclass's docstring, docs/results.md)
    test: str = "predictive"
    # 0.01 with the predictive test: its p-value is bounded below by the reserve (1,000 samples, 2 clean
    # crossings: about 0.003 at any N for 1% spread poison), so 0.001 would find that poison only when the
    # reserve has at most 1 crossing
    alpha: float = 1e-2
    # < 1: the score threshold rises from score_quantile past the reserve's own crossings until the
    # crossings expected from clean data are at most this share of D's (an estimated false discovery
    # rate); 1 = off. Measured at 0.2 on the grid's models (docs/results.md): trojan's and badnet's added
    # false positives 30 -> 0 and 26 -> 20, but all-to-all recall 0.93 -> 0.88; hence off by default
    fdr: float = 1.0
    ridge: float = 1e-3  # covariance regulariser, x trace / D
    # features: f_base's pooled block outputs (avg + max per channel, as act.*), earliest blocks first,
    # cut at this many columns (4 x max_dims^2 float64 moments per 8,192 rows: 512 -> 8 MB)
    max_dims: int = 512


@dataclass
class Config:
    """One detection run. ``preset`` names the YAML the values came from."""

    preset: str = "reference-cifar"
    seed: int = 0
    io: IOConfig = field(default_factory=IOConfig)
    data: DataConfig = field(default_factory=DataConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    ct: CTConfig = field(default_factory=CTConfig)
    decide: DecideConfig = field(default_factory=DecideConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    aggregate: AggregateConfig = field(default_factory=AggregateConfig)
    canary: CanaryConfig = field(default_factory=CanaryConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    repair: RepairConfig = field(default_factory=RepairConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    cleanse: CleanseConfig = field(default_factory=CleanseConfig)
    act: ActConfig = field(default_factory=ActConfig)
    xclass: XClassConfig = field(default_factory=XClassConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> Config:
        """Check cross-field rules; return self. Raises :class:`ConfigError` naming the field."""
        ct = self.ct
        if ct.rounds < 1:
            raise ConfigError(f"ct.rounds must be >= 1, got {ct.rounds}")
        for name in ("pretrain_epochs", "iters", "lr", "lam", "batch_factor"):
            v = getattr(ct, name)
            if len(v) != ct.rounds:
                raise ConfigError(f"ct.{name} needs {ct.rounds} entries (one per round), got {len(v)}: {v}")
        for name in ("keep_ratio", "floor_k"):
            v = getattr(ct, name)
            if len(v) != ct.rounds - 1:
                raise ConfigError(f"ct.{name} needs {ct.rounds - 1} entries (rounds - 1), got {len(v)}: {v}")
        if any(not 0 < r <= 1 for r in ct.keep_ratio):
            raise ConfigError(f"ct.keep_ratio entries must lie in (0, 1], got {ct.keep_ratio}")
        if any(k < 1 for k in ct.floor_k):
            raise ConfigError(f"ct.floor_k entries must be >= 1, got {ct.floor_k}")
        if any(lam <= 1 for lam in ct.lam):
            raise ConfigError(f"ct.lam entries must be > 1 (loss = ((lam-1) L_conf + L_insp) / lam), got {ct.lam}")
        if any(b < 1 for b in ct.batch_factor):
            raise ConfigError(f"ct.batch_factor entries must be >= 1, got {ct.batch_factor}")
        if any(i < 1 for i in ct.iters) or any(e < 0 for e in ct.pretrain_epochs):
            raise ConfigError("ct.iters must be >= 1 and ct.pretrain_epochs >= 0")
        if not 0.0 <= self.decide.corroborate <= 1.0:
            raise ConfigError(f"decide.corroborate must be in [0, 1] (0 = off), got {self.decide.corroborate}")
        if self.data.on_mode not in ("convert", "quarantine"):
            raise ConfigError(f"data.on_mode must be 'convert' or 'quarantine', got {self.data.on_mode!r}")
        if self.data.on_size not in ("quarantine", "resize"):
            raise ConfigError(f"data.on_size must be 'quarantine' or 'resize', got {self.data.on_size!r}")
        if self.scale.sync_batchnorm and not self.scale.use_gpu:
            raise ConfigError("scale.sync_batchnorm needs scale.use_gpu=true (SyncBatchNorm runs on CUDA/NCCL only)")
        from ctray.core.budget import parse_bytes

        try:
            parse_bytes(self.scale.device_cache_bytes)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"scale.device_cache_bytes: {e}") from None
        if self.data.score_gpus < 0:
            raise ConfigError(f"data.score_gpus must be >= 0, got {self.data.score_gpus}")
        if self.data.score_precision not in SCORE_PRECISIONS:
            raise ConfigError(f"data.score_precision must be one of {', '.join(SCORE_PRECISIONS)}, got "
                              f"{self.data.score_precision!r}")
        if self.data.score_compute not in ("tasks", "actors"):
            raise ConfigError(f"data.score_compute must be 'tasks' or 'actors', got {self.data.score_compute!r}")
        if self.data.score_actors < 1 or self.data.score_cpus <= 0:
            raise ConfigError(f"data.score_actors must be >= 1 and data.score_cpus > 0, got "
                              f"{self.data.score_actors}, {self.data.score_cpus}")
        if isinstance(self.base.max_samples, bool) or self.base.max_samples < 0:
            raise ConfigError(f"base.max_samples must be an integer >= 0 (0 = all of D), got {self.base.max_samples!r}")
        if self.base.augment not in TRAIN_AUGMENTS:
            raise ConfigError(f"base.augment must be crop-flip, crop or none, got {self.base.augment!r}")
        if self.scale.checkpoint_every < 0 or self.scale.max_failures < 0 or self.scale.checkpoint_minutes < 0:
            raise ConfigError(f"scale.checkpoint_every, scale.checkpoint_minutes and scale.max_failures must be "
                              f">= 0, got {self.scale.checkpoint_every}, {self.scale.checkpoint_minutes} and "
                              f"{self.scale.max_failures}")
        if self.scale.num_workers < 0:
            raise ConfigError(f"scale.num_workers must be >= 0 (0 = local mode), got {self.scale.num_workers}")
        from ctray.core.budget import parse_bytes

        for name in ("cache_bytes", "worker_cache_bytes", "inflight_bytes"):
            try:
                parse_bytes(getattr(self.data, name))
            except ValueError as e:
                raise ConfigError(f"data.{name}: {e}") from None
        if parse_bytes(self.data.inflight_bytes) == 0:
            raise ConfigError("data.inflight_bytes must be 'auto' or a size > 0 (Ray Data needs room for at least "
                              "a few blocks in flight), got 0")
        if self.data.max_pixels < 1 or self.data.max_member_bytes < 1:
            raise ConfigError(f"data.max_pixels and data.max_member_bytes must be >= 1, got {self.data.max_pixels} "
                              f"and {self.data.max_member_bytes}")
        if self.data.shuffle_bytes < 0:
            raise ConfigError(f"data.shuffle_bytes must be >= 0, got {self.data.shuffle_bytes}")
        if self.scale.cpus_per_worker < 0 or self.scale.gpus_per_worker <= 0:
            raise ConfigError(f"scale.cpus_per_worker must be >= 0 (0 = auto) and scale.gpus_per_worker > 0, got "
                              f"{self.scale.cpus_per_worker} / {self.scale.gpus_per_worker}")
        for name, v in self.scale.worker_resources.items():
            if name in ("CPU", "GPU", "memory") or v < 0:
                raise ConfigError(f"scale.worker_resources.{name}={v}: give custom resources >= 0 only (CPUs and "
                                  f"GPUs have scale.cpus_per_worker / scale.gpus_per_worker)")
        if isinstance(self.ct.pretrain_ref_n, bool) or not isinstance(self.ct.pretrain_ref_n, int) \
                or self.ct.pretrain_ref_n < 0:
            raise ConfigError(f"ct.pretrain_ref_n must be an integer >= 0 (0 = epochs as given), "
                              f"got {self.ct.pretrain_ref_n!r}")
        if self.ct.batch_scale < 1 or self.ct.warmup_epochs < 0:
            raise ConfigError(f"ct.batch_scale must be >= 1 and ct.warmup_epochs >= 0, got {self.ct.batch_scale}, "
                              f"{self.ct.warmup_epochs}")
        if self.ct.batch_scale > 1 and self.base.milestones and self.ct.warmup_epochs >= min(self.base.milestones):
            raise ConfigError(f"ct.warmup_epochs ({self.ct.warmup_epochs}) must end before f_base's first lr "
                              f"milestone (base.milestones {self.base.milestones})")
        for bs in (self.ct.batch_size, self.ct.pretrain_batch_size, self.base.batch_size):
            if bs < max(1, self.scale.num_workers):
                raise ConfigError(f"batch sizes ({bs}) must be >= scale.num_workers ({self.scale.num_workers}):"
                                  " the global batch is split across workers")
        b = self.bench
        if not 0.0 <= b.ss_rate <= 1.0:
            raise ConfigError(f"bench.ss_rate must lie in [0, 1] (0 = oracle rate), got {b.ss_rate}")
        if b.ac_dims < 1 or b.scan_dim < 1 or b.strip_n < 1 or b.ac_n_init < 1:
            raise ConfigError("bench.ac_dims, bench.scan_dim, bench.strip_n and bench.ac_n_init must be >= 1")
        if not 0.0 < b.ac_max_fraction <= 0.5:
            raise ConfigError(f"bench.ac_max_fraction must lie in (0, 0.5], got {b.ac_max_fraction}")
        if not 0.0 < b.strip_frr < 1.0:
            raise ConfigError(f"bench.strip_frr must lie in (0, 1), got {b.strip_frr}")
        if b.parallel < 0 or b.cell_cpus <= 0:
            raise ConfigError(f"bench.parallel must be >= 0 and bench.cell_cpus > 0, got {b.parallel}, {b.cell_cpus}")
        if not 0 < self.aggregate.alpha < 1:
            raise ConfigError(f"aggregate.alpha must lie in (0, 1), got {self.aggregate.alpha}")
        if self.aggregate.top_k < 0 or self.aggregate.bins < 1:
            raise ConfigError(f"aggregate.top_k must be >= 0 and aggregate.bins >= 1, got "
                              f"{self.aggregate.top_k}, {self.aggregate.bins}")
        cn = self.canary
        if not 0 <= cn.rate <= 0.1:
            raise ConfigError(f"canary.rate must lie in [0, 0.1] (canaries eat the distillation budget), got {cn.rate}")
        if cn.min_count < 1 or cn.target < -1:
            raise ConfigError(f"canary.min_count must be >= 1 and canary.target >= -1 (-1 = last class), got "
                              f"{cn.min_count}, {cn.target}")
        sw = self.sweep
        if sw.num_samples < 1 or sw.max_concurrent < 0 or sw.grace_rounds < 0:
            raise ConfigError("sweep.num_samples must be >= 1, sweep.max_concurrent and sweep.grace_rounds >= 0")
        if not 0 <= sw.canary_rate <= 0.1 or sw.flag_weight < 0 or sw.trial_cpus <= 0 or sw.reduction_factor <= 1:
            raise ConfigError("sweep: canary_rate must lie in [0, 0.1], flag_weight >= 0, trial_cpus > 0, "
                              f"reduction_factor > 1; got {sw}")
        _validate_defenses(self)
        from ctray.models import MODELS

        for f, arch in (("base.arch", self.base.arch), ("ct.arch", self.ct.arch)):
            if arch not in MODELS:
                raise ConfigError(f"{f}={arch!r} is not a model; known: {sorted(MODELS)}")
        return self


def _unlearn_checks(name: str, sec: RepairConfig | CleanseConfig) -> list[tuple[bool, str]]:
    """The ``<name>.unlearn*`` checks, shared by repair and cleanse (the same keys and meaning)."""
    return [
        (sec.unlearn >= 0 and 0 < sec.unlearn_frac <= 1,
         f"{name}.unlearn must be >= 0 and {name}.unlearn_frac in (0, 1], got {sec.unlearn} / {sec.unlearn_frac}"),
        (sec.unlearn_every >= 0 and sec.unlearn_isteps >= 1 and sec.unlearn_ref_weight >= 0 and sec.unlearn_cap >= 0,
         f"{name}.unlearn_every must be >= 0, unlearn_isteps >= 1, unlearn_ref_weight and unlearn_cap >= 0; got "
         f"{sec.unlearn_every} / {sec.unlearn_isteps} / {sec.unlearn_ref_weight} / {sec.unlearn_cap}"),
        (sec.unlearn_every == 0 or sec.unlearn > 0, f"{name}.unlearn_every needs {name}.unlearn > 0 (the trigger it "
         f"re-inverts comes from the audit that {name}.unlearn runs)"),
    ]


def _validate_defenses(cfg: Config) -> None:
    """Cross-field rules of the defense sections (repair, audit, cleanse, act)."""
    from ctray.core.audit import SCORE_MODES  # here: ctray.core's package import pulls in SciPy (~1 s)
    from ctray.core.xclass import TESTS as XCLASS_TESTS

    r, a, c, act = cfg.repair, cfg.audit, cfg.cleanse, cfg.act
    checks = [
        (r.steps >= 1 and r.batch_size >= 1 and r.eval_every >= 1, "repair.steps, batch_size, eval_every must be >= 1"),
        (r.lr > 0 and r.lam_param >= 0 and r.lam_slol >= 0, "repair.lr must be > 0, lam_* >= 0"),
        (0 <= r.holdout_frac < 1, f"repair.holdout_frac must lie in [0, 1), got {r.holdout_frac}"),
        *_unlearn_checks("repair", r),
        (a.steps_per_class >= 1 and a.batch_size >= 1 and a.classes_per_task >= 1,
         "audit.steps_per_class, batch_size, classes_per_task must be >= 1"),
        (0 < a.eval_frac < 1, f"audit.eval_frac must lie in (0, 1), got {a.eval_frac}"),
        (a.score in SCORE_MODES, f"audit.score must be one of {', '.join(SCORE_MODES)}, got {a.score!r}"),
        (a.task_cpus > 0, f"audit.task_cpus must be > 0 (fractional is fine), got {a.task_cpus}"),
        (len(c.ratios) >= 1 and all(0 <= x <= 1 for x in [*c.ratios, c.head_ratio]),
         f"cleanse.ratios / head_ratio must lie in [0, 1], got {c.ratios} / {c.head_ratio}"),
        (c.epochs >= 1 and c.batch_size >= 1 and c.t_max >= 1, "cleanse.epochs, batch_size, t_max must be >= 1"),
        (c.select in ("last", "agree"), f"cleanse.select must be 'last' or 'agree', got {c.select!r}"),
        (0 <= c.holdout_frac < 1, f"cleanse.holdout_frac must lie in [0, 1), got {c.holdout_frac}"),
        (c.select == "last" or c.holdout_frac > 0, "cleanse.select=agree needs cleanse.holdout_frac > 0"),
        *_unlearn_checks("cleanse", c),
        (a.max_images >= 0, f"audit.max_images must be >= 0 (0 = all), got {a.max_images}"),
        (act.mode in ("gauss", "quantile"), f"act.mode must be 'gauss' or 'quantile', got {act.mode!r}"),
        (act.pool in ("avg", "max", "avg+max"), f"act.pool must be avg, max or avg+max, got {act.pool!r}"),
        (0 <= act.frr < 1, f"act.frr must lie in [0, 1), got {act.frr}"),
        (act.purify_init in ("ones", "stats"), f"act.purify_init must be 'ones' or 'stats', got {act.purify_init!r}"),
        (0 < cfg.xclass.loss_quantile < 1 and 0 < cfg.xclass.score_quantile < 1 and 0 < cfg.xclass.alpha < 1,
         "xclass.loss_quantile, score_quantile and alpha must lie in (0, 1)"),
        (0 < cfg.xclass.fdr <= 1, f"xclass.fdr must lie in (0, 1], got {cfg.xclass.fdr}"),
        (cfg.xclass.test in XCLASS_TESTS,
         f"xclass.test must be {' or '.join(XCLASS_TESTS)}, got {cfg.xclass.test!r}"),
        (cfg.xclass.ridge >= 0 and cfg.xclass.max_dims >= 1, "xclass.ridge must be >= 0 and xclass.max_dims >= 1"),
    ]
    for aug, name in ((r.augment, "repair.augment"), (c.augment, "cleanse.augment")):
        checks.append((aug in AUGMENTS, f"{name} must be auto, crop-flip, crop or none, got {aug!r}"))
    checks.append((r.kd >= 0 and r.kd_t > 0, f"repair.kd must be >= 0 and repair.kd_t > 0, got {r.kd} / {r.kd_t}"))
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


# ---------------------------------------------------------------------------------------------------


def list_presets() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


def _coerce(value: Any, typ: Any, path: str) -> Any:
    origin = get_origin(typ)
    if origin is dict:
        kt, vt = get_args(typ)
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, e.g. {{name: 1}}, got {value!r}")
        return {_coerce(k, kt, path): _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        (inner,) = get_args(typ)
        if not isinstance(value, list | tuple):
            value = [value]
        return [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path} must be true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if typ is str:
        return str(value)
    return value


def _set(obj: Any, dotted: str, value: Any, full: str) -> None:
    head, _, rest = dotted.partition(".")
    hints = get_type_hints(type(obj))
    if head not in hints:
        known = ", ".join(sorted(hints))
        raise ConfigError(f"unknown config field {full!r}: {head!r} is not one of [{known}]")
    typ = hints[head]
    if rest:
        cur = getattr(obj, head)
        if dataclasses.is_dataclass(cur):
            _set(cur, rest, value, full)
            return
        if isinstance(cur, dict):  # scale.worker_resources.<name>=1
            cur[rest] = _coerce(value, get_args(typ)[1], full)
            return
        if isinstance(cur, list) and rest.isdigit():  # ct.lam.3=30
            i = int(rest)
            if i >= len(cur):
                raise ConfigError(f"{full}: index {i} out of range for {head} of length {len(cur)}")
            cur[i] = _coerce(value, get_args(typ)[0], full)
            return
        raise ConfigError(f"unknown config field {full!r}")
    if dataclasses.is_dataclass(getattr(obj, head)):
        if not isinstance(value, dict):
            raise ConfigError(f"{full} is a section; give a mapping or set {full}.<field>")
        for k, v in value.items():
            _set(getattr(obj, head), k, v, f"{full}.{k}")
        return
    setattr(obj, head, _coerce(value, typ, full))


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Apply ``{"ct.lam": [20, ...], "seed": 1, "ct.lam.3": 30, "data": {...}}`` in order, with type checks."""
    for k, v in overrides.items():
        _set(cfg, k, v, k)
    return cfg


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1,2]"]`` -> dict with YAML-parsed values. Raises ConfigError on a bad item."""
    out: dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise ConfigError(f"expected key=value, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse the value of {k}: {e}") from e
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_preset(name: str) -> dict[str, Any]:
    path = os.path.join(PRESET_DIR, f"{name}.yaml")
    if not os.path.exists(path):
        raise ConfigError(f"unknown preset {name!r}; known: {list_presets()}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path} must be a mapping")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    # `extends: NAME`: the named preset, with this file's keys replacing its keys section by section (so a
    # variant states only what differs, e.g. small-cnn = small with another ct.arch)
    if parent == name:
        raise ConfigError(f"preset {path} extends itself")
    merged = load_preset(str(parent))
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


#: The experimental switches: off by default, in no preset, measured but short of a default (the page that
#: has the figures). Every other off-by-default field is a published variant a preset uses (e.g.
#: ``ct.uniform_class_weights``, ``decide.flag_budget``), a faithful-mode switch (``repair.slol_offdiag``), an
#: optional output (``act.in_detect``) or a measured ctray extension a preset turns on (``repair.unlearn_every``,
#: ``repair.kd`` in ``defend-resnet18-narrow``). Setting one of these logs a warning naming it.
EXPERIMENTAL: dict[str, str] = {
    "cleanse.unlearn_every": "re-inverting the trigger during BCU: blend ASR 0.16 -> 0.065 but 0.7-1.7 more points "
                             "lost, and no rule yet to turn it on only where the static trigger leaves a backdoor "
                             "(docs/defenses.md)",
}


def experimental_in_use(cfg: Config) -> list[str]:
    """The :data:`EXPERIMENTAL` keys whose value in ``cfg`` differs from the default, as ``key=value``."""
    default = Config()
    out = []
    for key in EXPERIMENTAL:
        sec, name = key.split(".")
        v = getattr(getattr(cfg, sec), name)
        if v != getattr(getattr(default, sec), name):
            out.append(f"{key}={v}")
    return out


def load_config(preset: str | None = None, overrides: dict[str, Any] | None = None,
                config_file: str | None = None) -> Config:
    """Defaults <- preset YAML <- config file (a full or partial dump, e.g. sweep's best.yaml) <- overrides.

    Raises:
        ConfigError: unknown preset/field, wrong type, or a cross-field rule broken.
    """
    cfg = Config()
    file_data: dict[str, Any] = {}
    if config_file:
        with open(config_file) as f:
            file_data = yaml.safe_load(f) or {}
        if not isinstance(file_data, dict):
            raise ConfigError(f"config file {config_file} must hold a mapping")
    name = preset or file_data.get("preset") or "reference-cifar"
    apply_overrides(cfg, _flatten(load_preset(name)))
    cfg.preset = name
    file_data.pop("preset", None)
    apply_overrides(cfg, _flatten(file_data))
    if overrides:
        apply_overrides(cfg, overrides)
    for kv in experimental_in_use(cfg):
        log.warning("experimental setting %s: %s", kv, EXPERIMENTAL[kv.split("=")[0]])
    return cfg.validate()


#: above this many samples a CPU run of small images gets ``fast`` (= ``small`` up to its ct.pretrain_ref_n)
FAST_FROM = 10_000


def auto_preset(image_size: int, num_classes: int, n_samples: int, use_gpu: bool) -> tuple[str, str]:
    """Pick a preset from the data; returns ``(name, reason)``.

    - <= 32 px without a GPU: ``small`` (the CT shape with CPU-sized epochs/iterations) up to 10,000
      samples, ``fast`` above (``small`` whose pretraining keeps a 10k run's steps: its passes over D fall
      as N grows; measured at 50k in docs/results.md);
    - <= 32 px with a GPU: ``reference-cifar`` (the paper's schedule);
    - larger images or > 200 classes: ``imagenet64`` (narrow ResNet on 64 px, 5 rounds).
    Tiny sets (< 2,000 samples) get ``smoke`` since floors of n_c/50 round to 0 there.
    """
    if n_samples < 2000:
        return "smoke", f"{n_samples} samples < 2000"
    if image_size > 32 or num_classes > 200:
        return "imagenet64", f"image size {image_size} px / {num_classes} classes"
    if use_gpu:
        return "reference-cifar", f"{image_size} px, GPU available"
    if n_samples > FAST_FROM:
        return "fast", f"{image_size} px on CPU, {n_samples} samples > {FAST_FROM}"
    return "small", f"{image_size} px on CPU"
