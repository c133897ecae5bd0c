"""Baseline detectors on the same f_base as CT, through the same Ray Data scoring path (specs/ct.md §5).

``run_baselines(cfg, fbase, methods)`` reads the suspect set D (``cfg.io.train``) and the clean reserve
R (``cfg.io.clean``) with the shard reader, runs f_base (a :mod:`ctray.models.checkpoint` file, e.g. a
CT run's ``checkpoints/round_0/fbase.pt``) over them in ``map_batches`` actors and hands small
per-sample arrays to the NumPy core (:mod:`ctray.core.baselines`):

- Features (SS, AC, SCAn): one scoring pass over D emits penultimate features, which stay in the object
  store (``materialize``) when D fits ``data.cache_bytes`` (else each of the two passes re-reads and
  re-scores D); a streaming pass folds them into per-class :class:`~ctray.core.pca.FeatureMoments`
  (C x D x D float64 per batch reaches the driver); a second pass projects each sample on its own
  class's top ``bench.ac_dims`` axes (SS uses the first, AC all of them) and on the top
  ``bench.scan_dim`` axes of all of D's features (SCAn). What reaches the driver per sample:
  sid + label (16 B), ``ac_dims`` float32 (40 B at 10) and ``scan_dim`` float32 (128 B at 32): about
  184 B, i.e. 1.8 GB at N = 10M. R's full features (|R| x D float32: 2,000 x 512 = 4 MB) come to the
  driver: R is small and trusted by construction.
- STRIP: a ``map_batches`` actor superimposes ``bench.strip_n`` reserve images on each sample and
  returns its mean softmax entropy: 1 float per sample reaches the driver (plus sid). R's images are
  broadcast once to each actor through the object store (|R| x H x W x C uint8). Cost: ``strip_n``
  forward passes over D and over R.

Memory on the driver stays O(N x (ac_dims + scan_dim)) floats; features and images never reach it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctray.config import Config
from ctray.engine.score import Scorer, map_model
from ctray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: Baseline methods ``run_baselines`` knows, in the bench's column order.
METHODS = ("ss", "ac", "strip", "scan")
_FEATURE_METHODS = ("ss", "ac", "scan")


@dataclass
class MethodResult:
    """One baseline's verdict, in :class:`BaselineRun`'s sample order.

    Attributes:
        method: ``ss``, ``ac``, ``strip`` or ``scan``.
        score: float64 (N,), higher = more suspicious (ranks compare across methods, values do not).
        flagged: bool (N,), the method's published decision rule.
        params: what was used (budget, n, thresholds, dimensions), JSON-safe.
        info: per-class details, JSON-safe.
        seconds: wall time, including the feature pass it shares with the other feature methods.
    """

    method: str
    score: np.ndarray
    flagged: np.ndarray
    params: dict[str, Any]
    info: dict[str, Any]
    seconds: float


@dataclass
class BaselineRun:
    """Baselines over the usable samples of D, sorted by ``(shard, key)`` (the order of a CT run's
    ``scores.parquet``). ``shards``/``keys`` str (N,), ``labels`` int64 (N,)."""

    shards: np.ndarray
    keys: np.ndarray
    labels: np.ndarray
    results: dict[str, MethodResult]
    seconds: dict[str, float] = field(default_factory=dict)


class _StripScorer(Scorer):
    """``map_batches`` callable: ``{sid, image, label}`` -> ``{sid, entropy}``.

    Each sample is superimposed (``x + alpha * r`` on normalised inputs) with ``n`` reserve images
    drawn by :func:`ctray.core.baselines.superimpose_partners` (a reserve image never with itself);
    ``entropy`` float32 (B,) is the mean softmax entropy in nats (low = suspicious).
    """

    def __init__(self, reserve: list[Any], n: int, alpha: float, seed: int, **scorer_kwargs: Any):
        import ray
        import torch

        super().__init__(**scorer_kwargs)
        data = ray.get(reserve[0])
        order = np.argsort(data["sids"])
        self.r_sids = data["sids"][order]
        self.r_images = torch.from_numpy(np.ascontiguousarray(data["images"][order]))
        self.n, self.alpha, self.seed = n, alpha, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from ctray.core.baselines import strip_entropy, superimpose_partners
        from ctray.training.steps import to_input

        sids = batch["sid"].astype(np.int64)
        pos = np.searchsorted(self.r_sids, sids).clip(0, max(len(self.r_sids) - 1, 0))
        own = np.where(self.r_sids[pos] == sids, pos, -1)
        partners = superimpose_partners(sids, self.n, len(self.r_sids), self.seed, own)
        x = to_input(torch.from_numpy(np.array(batch["image"], copy=True)), self.mean, self.std)
        with torch.no_grad():
            outs = []
            for j in range(self.n):
                xr = to_input(self.r_images[torch.from_numpy(partners[:, j])], self.mean, self.std)
                outs.append(self.model(x + self.alpha * xr).softmax(1).numpy())
            probs = np.stack(outs, axis=1)
        return {"sid": sids, "entropy": strip_entropy(probs).astype(np.float32)}


def _project_batch(batch: dict[str, np.ndarray], axes: np.ndarray | None, means: np.ndarray | None,
                   g_axes: np.ndarray | None, g_mean: np.ndarray | None) -> dict[str, np.ndarray]:
    from ctray.core.pca import project

    f = np.asarray(batch["features"], dtype=np.float64)
    out: dict[str, np.ndarray] = {"sid": batch["sid"], "label": batch["label"]}
    if axes is not None:
        assert means is not None  # the caller passes axes and means together
        out["cproj"] = project(f, np.asarray(batch["label"], np.int64), axes, means).astype(np.float32)
    if g_axes is not None:
        assert g_mean is not None  # the caller passes g_axes and g_mean together
        out["gproj"] = ((f - g_mean) @ g_axes).astype(np.float32)
    return out


def run_baselines(cfg: Config, fbase: str, methods: Sequence[str], *, poison_rate: float | None = None
                  ) -> BaselineRun:
    """Run baseline detectors with f_base over the suspect set ``cfg.io.train``.

    Args:
        cfg: the run config: ``io.train`` (D), ``io.clean`` (R; STRIP's overlays and threshold, SCAn's
            global model), ``data.*`` (reading, scoring resources), ``bench.*`` (the methods' knobs),
            ``seed``.
        fbase: the backdoored base model, a ctray checkpoint file (local path or URI).
        methods: a subset of :data:`METHODS`.
        poison_rate: the true poison fraction when known (truth given): Spectral Signature's budget when
            ``bench.ss_rate`` is 0 (a rate of 0, i.e. no attack, falls back to 1%).

    Returns:
        A :class:`BaselineRun` over D's usable samples, sorted by ``(shard, key)``.

    Raises:
        ConfigError: an unknown method, missing inputs.
        DataError: f_base is not a ctray checkpoint or does not fit the data; no usable sample.
    """
    import ray

    from ctray.core.budget import fits
    from ctray.data.reader import read_shards, usable
    from ctray.engine.cluster import ensure_ray
    from ctray.engine.ground import cache_budget, estimate_samples, resolve_inputs
    from ctray.engine.score import collect_scores, feature_moments, score_dataset
    from ctray.models.checkpoint import read_checkpoint

    methods = list(dict.fromkeys(methods))
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"unknown baseline method(s) {unknown}; known: {list(METHODS)}")
    cfg.validate()
    ensure_ray()
    t0 = time.monotonic()
    train_paths, clean_paths, spec, n_cls = resolve_inputs(cfg)
    ck = read_checkpoint(fbase)
    if ck["spec"] is None:
        raise DataError(f"{fbase} is a bare state dict; the baselines need a ctray checkpoint (e.g. a run's fbase.pt)")
    ms = ck["spec"]
    if (int(ms["image_size"]), int(ms["in_channels"])) != (spec.height, spec.channels):
        raise DataError(f"{fbase} expects {ms['image_size']} px x {ms['in_channels']} channels; the data is "
                        f"{spec.height} px x {spec.channels} channels")
    C = int(ms["num_classes"])
    dcfg = dataclasses.replace(cfg.data, mean=float(ms["mean"]), std=float(ms["std"]))
    ckdir, ckname = os.path.dirname(fbase) or ".", os.path.basename(fbase)
    model_args = (ckdir, ckname, ms["arch"], int(ms["in_channels"]), C, int(ms["image_size"]))

    # the memory model of detect (data.cache_bytes): D and its features are held in the object store only
    # when they fit; otherwise each pass re-reads the shards (and re-scores them for the features)
    cached = fits(2 * estimate_samples(train_paths), spec.shape, cache_budget(cfg))
    ds = read_shards(train_paths, spec, n_cls or C, num_cpus=cfg.data.read_cpus, strict=cfg.data.strict)
    if cached:
        ds = ds.materialize()
    ident = collect_scores(ds, ("shard", "key", "sid", "label", "ok"))
    ok = ident["ok"].astype(bool)
    if not ok.any():
        raise DataError(f"no usable train sample in {len(train_paths)} shards")
    shards, keys = ident["shard"][ok].astype(str), ident["key"][ok].astype(str)
    by_name = np.lexsort((keys, shards))
    shards, keys = shards[by_name], keys[by_name]
    sids = ident["sid"][ok].astype(np.int64)[by_name]
    labels = ident["label"][ok].astype(np.int64)[by_name]
    N = len(sids)
    pos_of = np.argsort(sids)
    sorted_sids = sids[pos_of]

    def align(s: np.ndarray, v: np.ndarray) -> np.ndarray:
        out = np.empty((N,) + v.shape[1:], dtype=v.dtype)
        p = np.searchsorted(sorted_sids, s)
        if len(s) != N or not np.array_equal(sorted_sids[p.clip(0, N - 1)], s):
            raise RuntimeError(f"scoring returned {len(s)} rows for {N} samples (lost or unknown ids)")
        out[pos_of[p]] = v
        return out

    d_use = usable(ds)
    r_use = usable(read_shards(clean_paths, spec, n_cls or C, num_cpus=cfg.data.read_cpus,
                               strict=cfg.data.strict)).materialize()
    secs: dict[str, float] = {"read": time.monotonic() - t0}
    results: dict[str, MethodResult] = {}
    b = cfg.bench

    # ---- SS / AC / SCAn: f_base features -> moments -> small projections
    feat_methods = [m for m in methods if m in _FEATURE_METHODS]
    if feat_methods:
        from ctray.core.baselines import activation_clustering, scan, spectral_signature
        from ctray.core.pca import FeatureMoments

        t = time.monotonic()
        feats = score_dataset(d_use, *model_args, dcfg, with_features=True)
        if cached:
            feats = feats.materialize()
        moments = feature_moments(feats, C, cfg.data.read_cpus)
        dim = moments.dim
        k_cls = min(b.ac_dims, dim) if "ac" in methods else 1
        want_cls = "ss" in methods or "ac" in methods
        axes = moments.principal_axes(k_cls) if want_cls else None
        means = moments.means() if want_cls else None
        g_axes = g_mean = None
        if "scan" in methods:
            pooled = FeatureMoments(moments.count.sum()[None], moments.sum.sum(0)[None], moments.outer.sum(0)[None])
            g_axes = pooled.principal_axes(min(b.scan_dim, dim))[0]
            g_mean = pooled.means()[0]
        proj = feats.select_columns(["sid", "label", "features"], num_cpus=cfg.data.read_cpus).map_batches(
            _project_batch, fn_kwargs={"axes": axes, "means": means, "g_axes": g_axes, "g_mean": g_mean},
            batch_size=4096, batch_format="numpy", num_cpus=cfg.data.read_cpus)
        cols = ("sid",) + (("cproj",) if want_cls else ()) + (("gproj",) if g_axes is not None else ())
        got = collect_scores(proj, cols)
        del feats
        t_feat = time.monotonic() - t
        secs["features"] = t_feat
        log.info("baselines: f_base features of %d samples (%d-d) -> %s per sample in %.1fs", N, dim,
                 " + ".join(f"{got[c].shape[1]} {c}" for c in cols[1:]), t_feat)
        if want_cls:
            cproj = align(got["sid"], got["cproj"]).astype(np.float64)
        if "ss" in methods:
            t = time.monotonic()
            if b.ss_rate > 0:
                rate, source = b.ss_rate, "bench.ss_rate"
            elif poison_rate:
                rate, source = float(poison_rate), "oracle (truth)"
            else:
                rate, source = 0.01, "1% (no poison known)"
            out = spectral_signature(cproj[:, 0], labels, C, rate)
            params = {"rate": rate, "rate_source": source, "k_per_class": max(c["k"] for c in out.info["classes"])}
            results["ss"] = MethodResult("ss", out.score, out.flagged, params, out.info,
                                         t_feat + time.monotonic() - t)
        if "ac" in methods:
            t = time.monotonic()
            out = activation_clustering(cproj[:, :k_cls], labels, C, max_fraction=b.ac_max_fraction,
                                        n_init=b.ac_n_init, seed=cfg.seed)
            params = {"dims": k_cls, "max_fraction": b.ac_max_fraction, "n_init": b.ac_n_init}
            results["ac"] = MethodResult("ac", out.score, out.flagged, params, out.info,
                                         t_feat + time.monotonic() - t)
        if "scan" in methods:
            t = time.monotonic()
            gproj = align(got["sid"], got["gproj"]).astype(np.float64)
            r = collect_scores(score_dataset(r_use, *model_args, dcfg, with_features=True), ("label", "features"))
            assert g_mean is not None  # set with g_axes above when "scan" is asked
            r_g = (np.asarray(r["features"], np.float64) - g_mean) @ g_axes
            out = scan(gproj, labels, r_g, r["label"].astype(np.int64), C, threshold=b.scan_threshold,
                       seed=cfg.seed)
            params = {"dim": int(gproj.shape[1]), "threshold": b.scan_threshold, "reserve": int(len(r_g)),
                      "cleansed": [c["class"] for c in out.info["classes"] if c["cleansed"]]}
            results["scan"] = MethodResult("scan", out.score, out.flagged, params, out.info,
                                           t_feat + time.monotonic() - t)

    # ---- STRIP: superimposed copies -> mean entropy per sample
    if "strip" in methods:
        from ctray.core.baselines import strip_decide

        t = time.monotonic()
        r_img = collect_scores(r_use, ("sid", "image"))
        m = len(r_img["sid"])
        if m < 2:
            raise DataError(f"STRIP needs >= 2 usable reserve images, got {m} from {clean_paths[:3]}")
        ref = ray.put({"sids": r_img["sid"].astype(np.int64), "images": np.asarray(r_img["image"])})
        del r_img
        kw = dict(ckpt=ckdir, filename=ckname, arch=ms["arch"], in_channels=int(ms["in_channels"]), num_classes=C,
                  image_size=int(ms["image_size"]), mean=dcfg.mean, std=dcfg.std,
                  threads=max(1, int(dcfg.score_cpus)), reserve=[ref], n=b.strip_n, alpha=b.strip_alpha,
                  seed=cfg.seed)

        def entropies(data: Any) -> dict[str, np.ndarray]:
            out = map_model(data, _StripScorer, kw, dcfg)
            return collect_scores(out, ("sid", "entropy"))

        ed = entropies(d_use)
        er = entropies(r_use)
        out = strip_decide(align(ed["sid"], ed["entropy"]).astype(np.float64), er["entropy"], b.strip_frr)
        secs["strip"] = time.monotonic() - t
        params = {"n": b.strip_n, "alpha": b.strip_alpha, "frr": b.strip_frr, "threshold": out.info["threshold"],
                  "reserve": m}
        results["strip"] = MethodResult("strip", out.score, out.flagged, params, out.info, secs["strip"])
        log.info("baselines: STRIP with n=%d over %d + %d samples in %.1fs", b.strip_n, N, m, secs["strip"])

    for name, res in results.items():
        log.info("baselines: %s flagged %d of %d (%s)", name, int(res.flagged.sum()), N, res.params)
    secs["total"] = time.monotonic() - t0
    return BaselineRun(shards=shards, keys=keys, labels=labels,
                       results={m: results[m] for m in methods if m in results}, seconds=secs)
