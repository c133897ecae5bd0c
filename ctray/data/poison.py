"""Plant a simulated backdoor attack in a shard set made by :func:`ctray.data.sources.make_dataset`.

Output directory (``out_dir``):

- ``train-*.tar``: the same shard names, keys and sample order as the input; poison and cover samples
  carry new pixels (PNG) and, for poison, the attack's label; every other sample's members are copied
  byte-for-byte. ``.json`` metadata is carried unchanged (it never reveals the truth).
- ``clean-*.tar``, ``test-*.tar``: byte-identical copies.
- ``test-triggered-*.tar``: the attack's test images with the test-time trigger and their TRUE labels in
  ``.cls``; ``.json`` = ``{"orig_label": y, "target": t}``.
- ``truth.parquet``: one row per train sample: ``shard, key, poison, cover, orig_label, label, attack``.
- ``manifest.json``: the input's, plus ``attack`` and the ``test-triggered`` shards/count.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tarfile
import tempfile
from typing import Any

import numpy as np

from ctray.data.attacks import get_attack
from ctray.data.shards import ImageSpec, Record, ShardWriter, load_arrays
from ctray.data.sources import prepare_out_dir, write_manifest
from ctray.errors import DataError

log = logging.getLogger(__name__)


def poison_dataset(in_dir: str, out_dir: str, attack: str, rate: float, target: int, seed: int,
                   options: dict[str, Any] | None = None, concentrate: float = 0.0) -> dict[str, Any]:
    """Poison the train split of ``in_dir`` with ``attack`` and write the result to ``out_dir``.

    Args:
        in_dir: a directory written by ``make_dataset`` (manifest.json + train/clean/test shards).
        out_dir: output directory (must differ from ``in_dir``; an earlier ctray output is replaced).
        attack: a name of :data:`ctray.data.attacks.ATTACKS`.
        rate: poison fraction of the train split in [0, 1]; ``round(rate * N)`` samples are poisoned.
        target: the target class.
        seed: seeds the choice of samples and every random part of the triggers.
        options: attack options (e.g. ``{"alpha": 0.2}``, ``{"cover_rate": 0.01}``).
        concentrate: fraction in [0, 1) of the poison planted in ONE train shard (chosen with the
            seed; ``round(concentrate * n_poison)`` samples), the rest spread over the other shards.
            0 spreads the poison uniformly (the default). Covers follow the same split. Simulates
            poison arriving with one scraped batch (shard-level detection, ``shards.parquet``).

    Returns:
        Summary: ``out_dir, attack, rate, target, seed, options, cover_rate, n_train, n_poison, n_cover,
        n_test_triggered`` (+ ``concentrated_shard``, ``n_poison_concentrated`` with ``concentrate``).

    Raises:
        DataError: unknown attack or option, unreadable input, bad rate/target, too few eligible samples.
    """
    atk = get_attack(attack, options)
    if os.path.abspath(in_dir) == os.path.abspath(out_dir):
        raise DataError(f"--out must differ from --in ({in_dir}): the input shards are read, not rewritten")
    man = _read_manifest(in_dir)
    if "attack" in man:
        raise DataError(f"{in_dir} is already poisoned (attack {man['attack'].get('name')!r}); "
                        f"poison a clean dataset directory made by `ctray data <source>`")
    num_classes = int(man["num_classes"])
    h, w, c = (int(v) for v in man["image_shape"])
    spec = ImageSpec(h, w, c, on_size="resize")
    paths = {s: _split_paths(in_dir, man, s) for s in ("train", "clean", "test")}
    if not paths["train"]:
        raise DataError(f"{in_dir} holds no train-*.tar shard")

    recs = _load(paths["train"], spec, num_classes, in_dir)
    images = np.stack([r.image for r in recs])  # type: ignore[misc]
    labels = np.array([r.label for r in recs], np.int64)
    rng_plan, rng_poison, rng_cover, rng_test = (np.random.default_rng(s)
                                                 for s in np.random.SeedSequence(seed).spawn(4))
    conc: dict[str, Any] | None = None
    if concentrate:
        plan, conc = _concentrated_plan(atk, recs, labels, num_classes, rate, target, concentrate, seed, rng_plan)
    else:
        plan = atk.plan(labels, num_classes, rate, target, rng_plan)
    new_images = atk.apply_train(images, plan.poison_idx, rng_poison, "poison")
    new_images = atk.apply_train(new_images, plan.cover_idx, rng_cover, "cover")
    is_poison = np.zeros(len(recs), bool)
    is_poison[plan.poison_idx] = True
    is_cover = np.zeros(len(recs), bool)
    is_cover[plan.cover_idx] = True

    prepare_out_dir(out_dir)
    row = {(r.shard, r.key): i for i, r in enumerate(recs)}
    for p in paths["train"]:
        _rewrite_shard(p, out_dir, row, is_poison | is_cover, new_images, plan.labels)
    for p in paths["clean"] + paths["test"]:
        shutil.copyfile(p, os.path.join(out_dir, os.path.basename(p)))

    # triggered test set: true labels in .cls, the attack's target per sample in .json
    trig_shards: list[str] = []
    n_trig = 0
    if paths["test"]:
        trecs = _load(paths["test"], spec, num_classes, in_dir)
        tlabels = np.array([r.label for r in trecs], np.int64)
        sel, targets = atk.test_select(tlabels, num_classes, target)
        if len(sel):
            timgs = atk.apply_test(np.stack([trecs[i].image for i in sel]), rng_test)  # type: ignore[misc]
            first = trecs[0].shard
            size = sum(r.shard == first for r in trecs)
            with ShardWriter(out_dir, "test-triggered", size) as wr:
                for j, i in enumerate(sel):
                    wr.write(trecs[i].key, timgs[j], int(tlabels[i]),
                             {"orig_label": int(tlabels[i]), "target": int(targets[j])})
            trig_shards = [os.path.basename(p) for p in wr.paths]
            n_trig = len(sel)
        else:
            log.warning("%s: no test image is eligible for the triggered test set", attack)

    _write_truth(os.path.join(out_dir, "truth.parquet"), recs, is_poison, is_cover, labels, plan.labels, attack)
    cover_rate = atk.resolved_cover_rate(rate)
    info = {"name": attack, "rate": rate, "target": target, "seed": seed, "n_poison": int(is_poison.sum()),
            "n_cover": int(is_cover.sum()), "cover_rate": cover_rate, "options": atk.options()}
    if conc is not None:
        info["concentrate"] = conc
    out_man = copy.deepcopy(man)
    out_man["attack"] = info
    out_man.setdefault("shards", {})["test-triggered"] = trig_shards
    out_man.setdefault("counts", {})["test-triggered"] = n_trig
    write_manifest(out_dir, out_man)
    log.info("%s: poisoned %d and covered %d of %d train samples (target %d); %d triggered test images -> %s",
             attack, info["n_poison"], info["n_cover"], len(recs), target, n_trig, out_dir)
    summary = {"out_dir": out_dir, "attack": attack, "rate": rate, "target": target, "seed": seed,
               "options": info["options"], "cover_rate": cover_rate, "n_train": len(recs),
               "n_poison": info["n_poison"], "n_cover": info["n_cover"], "n_test_triggered": n_trig}
    if conc is not None:
        summary["concentrated_shard"] = conc["shard"]
        summary["n_poison_concentrated"] = conc["n_poison"]
    return summary


def _concentrated_plan(atk: Any, recs: list[Record], labels: np.ndarray, num_classes: int, rate: float,
                       target: int, concentrate: float, seed: int, rng: np.random.Generator) -> tuple[Any, dict[str, Any]]:
    """An attack plan with ``round(concentrate * round(rate * N))`` poison samples in one shard (chosen
    by a generator seeded with ``seed``) and the rest in the other shards, each part planned by the
    attack's own :meth:`~ctray.data.attacks.Attack.plan` on that part."""
    from ctray.data.attacks import Plan

    if not 0 <= concentrate < 1:
        raise DataError(f"concentrate must lie in [0, 1), got {concentrate}")
    shard_of = np.array([r.shard for r in recs])
    names = np.unique(shard_of)
    if len(names) < 2:
        raise DataError(f"concentrate needs at least 2 train shards, got {len(names)}")
    n_total = int(round(rate * len(recs)))
    k = int(round(concentrate * n_total))
    chosen = str(names[np.random.default_rng([int(seed), 0xC0C0]).integers(len(names))])
    idx_in = np.flatnonzero(shard_of == chosen)
    idx_out = np.flatnonzero(shard_of != chosen)
    new_labels = labels.copy()
    poison, cover = [], []
    for idx, n_part in ((idx_in, k), (idx_out, n_total - k)):
        part = atk.plan(labels[idx], num_classes, n_part / len(idx), target, rng)
        poison.append(idx[part.poison_idx])
        cover.append(idx[part.cover_idx])
        new_labels[idx] = part.labels
    plan = Plan(np.sort(np.concatenate(poison)), np.sort(np.concatenate(cover)), new_labels)
    log.info("concentrate %.2f: %d of %d poison samples in shard %s", concentrate, k, n_total, chosen)
    return plan, {"fraction": concentrate, "shard": chosen, "n_poison": k}


def _read_manifest(in_dir: str) -> dict[str, Any]:
    path = os.path.join(in_dir, "manifest.json")
    try:
        with open(path) as f:
            man = json.load(f)
    except FileNotFoundError as e:
        raise DataError(f"{path} not found: poison a directory written by `ctray data <source>`") from e
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    missing = [k for k in ("num_classes", "image_shape") if k not in man]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}")
    return man


def _split_paths(in_dir: str, man: dict[str, Any], split: str) -> list[str]:
    """The split's shards: from the manifest when it lists them, else ``<split>-NNNNNN.tar``."""
    names = man.get("shards", {}).get(split)
    if names is None:
        import glob

        return sorted(p for p in glob.glob(os.path.join(in_dir, f"{split}-*.tar"))
                      if os.path.basename(p)[len(split) + 1:-4].isdigit())
    paths = [os.path.join(in_dir, n) for n in names]
    for p in paths:
        if not os.path.exists(p):
            raise DataError(f"shard {p} listed in {in_dir}/manifest.json does not exist")
    return paths


def _load(paths: list[str], spec: ImageSpec, num_classes: int, in_dir: str) -> list[Record]:
    ok, bad = load_arrays(paths, spec, num_classes)
    if bad:
        b = bad[0]
        raise DataError(f"{len(bad)} samples of {in_dir} cannot be read (first: {b.shard} key {b.key!r}: "
                        f"{b.reason}); poison a clean dataset made by `ctray data`")
    if not ok:
        raise DataError(f"no sample in {paths[0]}...")
    return ok


def _raw_samples(path: str) -> list[tuple[str, dict[str, bytes]]]:
    """A shard's samples in order as ``(key, {ext: bytes})`` (WebDataset key/extension split)."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tf:
        for ti in tf:
            if not ti.isfile():
                continue
            d, b = os.path.split(ti.name)
            stem, _, ext = b.partition(".")
            key = os.path.join(d, stem) if d else stem
            if not out or out[-1][0] != key:
                out.append((key, {}))
            f = tf.extractfile(ti)
            out[-1][1][ext.lower()] = f.read() if f else b""
    return out


def _rewrite_shard(path: str, out_dir: str, row: dict[tuple[str, str], int], treated: np.ndarray,
                   images: np.ndarray, labels: np.ndarray) -> None:
    """Write ``out_dir/<basename of path>``: the same samples in order; treated rows get new pixels and
    labels, the others their original image bytes and label."""
    name = os.path.basename(path)
    tmp = tempfile.mkdtemp(prefix=".poison-", dir=out_dir)
    try:
        with ShardWriter(tmp, "part", shard_size=2**62) as w:
            for key, members in _raw_samples(path):
                i = row[(name, key)]
                meta = json.loads(members["json"]) if "json" in members else None
                if treated[i]:
                    w.write(key, images[i], int(labels[i]), meta)
                else:
                    ext = next(e for e in members if e not in ("cls", "json"))
                    w.write(key, members[ext], int(labels[i]), meta, image_ext=ext)
        os.replace(w.paths[0], os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_truth(path: str, recs: list[Record], poison: np.ndarray, cover: np.ndarray, orig: np.ndarray,
                 new: np.ndarray, attack: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"shard": [r.shard for r in recs], "key": [r.key for r in recs],
                      "poison": poison, "cover": cover, "orig_label": orig, "label": new,
                      "attack": [attack] * len(recs)})
    pq.write_table(table, path)
