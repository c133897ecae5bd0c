"""One self-contained HTML page (plus PNG plots) describing a run directory.

:func:`write_report` reads the run directory's outputs (DESIGN.md §3) and writes ``report.html``
with every plot embedded as a base64 PNG (no JavaScript, no external URL), and the same PNGs under
``plots/``. Only ``run.json`` and ``scores.parquet`` are required; each other section says
"not available" when its file is missing or unreadable, so a partial or crashed run still gets a page.

Sections: summary (counts, timings, metrics), score histogram, per-class likelihood ratios,
within-class projections, distillation rounds, ROC curve, most suspicious samples (thumbnails read
back from the train shards), per-shard and per-source flagged counts (marked outliers), quarantine.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ctray.errors import DataError

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
PLOTS_DIR = "plots"
TOP_K = 24
#: Above this many rows, scores.parquet is streamed: the summary's counts are exact, the plots use a seeded
#: uniform sample of about this many rows plus the top-scored rows, so the report's memory does not grow
#: with N (a histogram or a scatter of 50,000 points shows what one of millions does).
MAX_ROWS = 50_000
MAX_SHARD_BARS = 30
MAX_QUARANTINE_ROWS = 50
MAX_CLASS_ROWS = 40
THUMB_PX = 96

NA = "not available"

_COLORS = {"clean": "#4c72b0", "cover": "#dd8452", "poison": "#c44e52", "flagged": "#c44e52",
           "unflagged": "#4c72b0", "grey": "#9a9a9a"}


def write_report(run_dir: str, top_k: int = TOP_K) -> str:
    """Write ``run_dir/report.html`` (and ``run_dir/plots/*.png``) for a finished or partial run.

    Args:
        run_dir: run directory holding at least ``run.json`` and ``scores.parquet``: a local path, or an
            ``s3://`` / ``gs://`` URI (its result files are staged in a temporary directory, the page is
            written there and uploaded with its plots; credentials from the environment).
        top_k: number of most suspicious samples (highest ``score``) shown as thumbnails.

    Returns:
        The path (or URI) of the written ``report.html``.

    Raises:
        DataError: ``run.json`` / ``scores.parquet`` is missing or unreadable.
    """
    from ctray.memory import release_free_memory, use_system_arrow_pool

    use_system_arrow_pool()  # a large scores.parquet streams through Arrow: see ctray.memory
    release_free_memory()
    if "://" in run_dir:
        return _write_remote_report(run_dir, top_k)
    run = _read_required_json(os.path.join(run_dir, "run.json"))
    scores_path = os.path.join(run_dir, "scores.parquet")
    try:
        scores, totals = _load_scores(scores_path, top_k)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {scores_path}: {e}") from e
    for col in ("shard", "key", "label", "score", "flagged"):
        if col not in scores.columns:
            raise DataError(f"{scores_path} lacks column {col!r} (has {list(scores.columns)})")

    plots_dir = os.path.join(run_dir, PLOTS_DIR)
    os.makedirs(plots_dir, exist_ok=True)
    page = _Page(plots_dir)
    data = _RunData(
        run_dir=run_dir, run=run, scores=scores, totals=totals,
        decisions=_read_optional_json(os.path.join(run_dir, "decisions.json")),
        rounds=_read_optional_json(os.path.join(run_dir, "rounds.json")),
        metrics=_read_optional_json(os.path.join(run_dir, "metrics.json")),
        shards=_read_optional_parquet(os.path.join(run_dir, "shards.parquet")),
        sources=_read_optional_parquet(os.path.join(run_dir, "sources.parquet")),
        quarantine=_read_optional_parquet(os.path.join(run_dir, "quarantine.parquet")),
    )
    _section_summary(page, data)
    _section_histogram(page, data)
    _section_classes(page, data)
    _section_projection(page, data)
    _section_rounds(page, data)
    _section_roc(page, data)
    _section_top(page, data, top_k)
    _section_shards(page, data)
    _section_sources(page, data)
    _section_quarantine(page, data)

    out = os.path.join(run_dir, REPORT_NAME)
    text = page.render(title=f"ctray report: {os.path.basename(os.path.abspath(run_dir))}",
                       subtitle=_run_subtitle(run))
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    log.info("wrote %s (%.1f kB, %d plots)", out, len(text) / 1e3, len(page.plot_names))
    return out


# ----------------------------------------------------------------------------------------------------
# inputs


@dataclass
class _Optional:
    """An optional input: ``value`` is None when missing/unreadable; ``why`` says which."""

    value: Any
    why: str = ""


@dataclass
class _RunData:
    run_dir: str
    run: dict[str, Any]
    scores: pd.DataFrame
    decisions: _Optional
    rounds: _Optional
    metrics: _Optional
    shards: _Optional
    quarantine: _Optional
    sources: _Optional = field(default_factory=lambda: _Optional(None, "sources.parquet is missing"))
    # exact counts when ``scores`` is a sample of a large table (see _load_scores); None when it is whole
    totals: dict[str, Any] | None = None

    @property
    def has_truth(self) -> bool:
        return "truth_poison" in self.scores.columns

    def truth_groups(self) -> dict[str, np.ndarray] | None:
        """Boolean masks ``poison``, ``cover`` (cover but not poison), ``clean``; None without truth."""
        if not self.has_truth:
            return None
        poison = self.scores["truth_poison"].fillna(False).to_numpy(dtype=bool)
        cover = (self.scores["truth_cover"].fillna(False).to_numpy(dtype=bool)
                 if "truth_cover" in self.scores.columns else np.zeros_like(poison))
        cover = cover & ~poison
        return {"poison": poison, "cover": cover, "clean": ~(poison | cover)}


def _load_scores(path: str, top_k: int, max_rows: int | None = None) -> tuple[pd.DataFrame, dict[str, Any] | None]:
    """``scores.parquet`` whole when it has at most ``max_rows`` (:data:`MAX_ROWS`) rows; otherwise one
    streaming pass keeps exact totals (rows, flagged, flagged per class), a seeded uniform sample of about
    ``max_rows`` rows and the ``top_k`` highest-scored rows, and returns ``(sample, totals)``."""
    import pyarrow.parquet as pq

    max_rows = MAX_ROWS if max_rows is None else max_rows
    pf = pq.ParquetFile(path)
    n = pf.metadata.num_rows
    if n <= max_rows:
        return pf.read().to_pandas(), None
    # Counted and sampled on Arrow columns: a pandas frame per batch would make a Python string per row
    # (shard, key), and the sampled rows' strings, scattered over the allocator's arenas, keep most of
    # those arenas resident (driver memory growing with N). Only the sample becomes pandas, at the end.
    import pyarrow as pa

    rng = np.random.default_rng(0)
    frac = max_rows / n
    k = max(top_k, 1)
    parts: list[pa.Table] = []
    top: pa.Table | None = None
    flagged = 0
    by_class: dict[int, int] = {}
    truth = {"poison": 0, "cover": 0, "tp": 0}

    def _bool(t: pa.Table, name: str) -> np.ndarray:
        return t.column(name).fill_null(False).to_numpy(zero_copy_only=False).astype(bool)

    def _top(t: pa.Table) -> pa.Table:  # the k highest scores; NaN never outranks a number
        sc = t.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
        return t.take(np.argsort(-np.where(np.isnan(sc), -np.inf, sc), kind="stable")[:k])

    for b in pf.iter_batches(batch_size=65536):
        t = pa.Table.from_batches([b])
        fl = _bool(t, "flagged")
        flagged += int(fl.sum())
        if "truth_poison" in t.column_names:
            po = _bool(t, "truth_poison")
            co = _bool(t, "truth_cover") if "truth_cover" in t.column_names else po & False
            truth["poison"] += int(po.sum())
            truth["cover"] += int((co & ~po).sum())
            truth["tp"] += int((fl & po).sum())
        labels = t.column("label").to_numpy(zero_copy_only=False)
        for c, m in zip(*np.unique(labels[fl], return_counts=True), strict=True):
            by_class[int(c)] = by_class.get(int(c), 0) + int(m)
        parts.append(t.take(np.flatnonzero(rng.random(t.num_rows) < frac)))
        cand = _top(t)
        top = cand if top is None else pa.concat_tables([top, cand])
        if top.num_rows > 4 * k:
            top = _top(top)
    if top is not None:
        top = _top(top)
    tables = [*parts, *([top] if top is not None else [])]
    sample = pa.concat_tables(tables).combine_chunks().to_pandas().drop_duplicates(["shard", "key"])
    log.info("report: %d rows in scores.parquet; plots from a uniform sample of %d (report.MAX_ROWS)", n, len(sample))
    return sample.reset_index(drop=True), {"rows": n, "flagged": flagged, "flagged_by_class": by_class,
                                           "sample": len(sample), **truth}


def _read_required_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def _read_optional_json(path: str) -> _Optional:
    if not os.path.exists(path):
        return _Optional(None, f"{os.path.basename(path)} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            return _Optional(json.load(f))
    except (OSError, ValueError) as e:
        log.warning("report: cannot read %s: %s", path, e)
        return _Optional(None, f"{os.path.basename(path)} is unreadable: {e}")


def _read_optional_parquet(path: str) -> _Optional:
    if not os.path.exists(path):
        return _Optional(None, f"{os.path.basename(path)} is missing")
    try:
        return _Optional(pd.read_parquet(path))
    except (OSError, ValueError) as e:
        log.warning("report: cannot read %s: %s", path, e)
        return _Optional(None, f"{os.path.basename(path)} is unreadable: {e}")


# ----------------------------------------------------------------------------------------------------
# page assembly


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any, digits: int = 4) -> str:
    """Human formatting of a table cell (already escaped)."""
    if v is None:
        return "&ndash;"
    if isinstance(v, bool | np.bool_):
        return "yes" if v else "no"
    if isinstance(v, int | np.integer):
        return f"{int(v):,}"
    if isinstance(v, float | np.floating):
        f = float(v)
        if math.isnan(f):
            return "&ndash;"
        if math.isinf(f):
            return "&infin;" if f > 0 else "-&infin;"
        if f != 0 and (abs(f) >= 1e5 or abs(f) < 1e-3):
            return f"{f:.3g}"
        return f"{f:.{digits}g}"
    return _e(v)


def _fmt_seconds(s: Any) -> str:
    try:
        s = float(s)
    except (TypeError, ValueError):
        return _e(s)
    if not math.isfinite(s):
        return "&ndash;"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "",
           highlight: Sequence[bool] | None = None) -> str:
    """An HTML table; ``header`` is escaped here, ``rows`` cells must already be HTML-safe."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    hl = list(highlight) if highlight is not None else [False] * len(rows)
    body = "".join(('<tr class="hl">' if h else "<tr>") + "".join(f"<td>{c}</td>" for c in r) + "</tr>"
                   for r, h in zip(rows, hl, strict=True))
    c = f' class="{cls}"' if cls else ""
    return f"<table{c}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv_table(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _na(why: str = "") -> str:
    extra = f" ({_e(why)})" if why else ""
    return f'<p class="na">{NA}{extra}</p>'


@dataclass
class _Page:
    plots_dir: str
    sections: list[tuple[str, str, str]] = field(default_factory=list)  # (anchor, title, html)
    plot_names: list[str] = field(default_factory=list)

    def add(self, anchor: str, title: str, body: str) -> None:
        self.sections.append((anchor, title, body))

    def figure(self, fig: Any, name: str, alt: str) -> str:
        """Save a matplotlib figure as ``plots/<name>.png`` and return an ``<img>`` embedding it."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        data = buf.getvalue()
        with open(os.path.join(self.plots_dir, f"{name}.png"), "wb") as f:
            f.write(data)
        self.plot_names.append(name)
        return _img_tag(data, alt, cls="plot")

    def render(self, title: str, subtitle: str) -> str:
        nav = " &middot; ".join(f'<a href="#{a}">{_e(t)}</a>' for a, t, _ in self.sections)
        body = "\n".join(f'<section id="{a}"><h2>{_e(t)}</h2>\n{b}\n</section>' for a, t, b in self.sections)
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n"
                f"<header><h1>{_e(title)}</h1><p class=\"sub\">{subtitle}</p><nav>{nav}</nav></header>\n"
                f"{body}\n<footer>Generated by ctray. Scores are in [0, 1]; higher = more suspicious."
                f"</footer></body></html>\n")


def _img_tag(png: bytes, alt: str, cls: str = "") -> str:
    b64 = base64.b64encode(png).decode("ascii")
    c = f' class="{cls}"' if cls else ""
    return f'<img{c} alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _new_figure(w: float, h: float) -> Any:
    # Figure without pyplot: no global backend state, safe in threads/actors; PNG output uses Agg.
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def _mpl_safe(s: str, n: int = 48) -> str:
    """Shorten a label and neutralise '$' (matplotlib mathtext)."""
    s = s if len(s) <= n else "…" + s[-(n - 1):]
    return s.replace("$", r"\$")


def _run_subtitle(run: dict[str, Any]) -> str:
    parts = []
    for k in ("preset", "version", "started", "finished"):
        if run.get(k) is not None:
            parts.append(f"{_e(k)}: <b>{_e(run[k])}</b>")
    return " &middot; ".join(parts)


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0 auto;
max-width:1160px;padding:0 20px 40px;color:#222;line-height:1.4;font-size:15px}
header{border-bottom:2px solid #ddd;margin-bottom:8px}
h1{font-size:24px;margin:18px 0 4px} h2{font-size:19px;margin:26px 0 8px;border-bottom:1px solid #eee;
padding-bottom:3px} h3{font-size:15px;margin:14px 0 6px}
.sub{color:#555;margin:2px 0 8px} nav{font-size:13px;margin-bottom:10px} nav a{color:#2a5db0}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
table.kv th{text-align:left;font-weight:600} table.kv td{text-align:left}
table.wrap td{word-break:break-all;text-align:left;max-width:520px}
tr.hl td{background:#fbe3e3}
.grid{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.grid>div{flex:1 1 300px}
img.plot{max-width:100%;height:auto;display:block;margin:6px 0}
.na{color:#888;font-style:italic}
.note{color:#555;font-size:13px}
img.inline{width:56px;height:56px;image-rendering:pixelated}
.thumbs{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.thumb{border:1px solid #ddd;border-radius:4px;padding:6px;text-align:center;font-size:10.5px;
background:#fafafa;overflow:hidden}
.thumb.poison{border:2px solid #c44e52} .thumb.cover{border:2px solid #dd8452}
.thumb img{width:96px;height:96px;image-rendering:pixelated;display:block;margin:0 auto 4px;
background:#fff;object-fit:contain}
.thumb .missing{width:96px;height:96px;margin:0 auto 4px;display:flex;align-items:center;
justify-content:center;background:#eee;color:#888;font-size:10px}
.cap{font-family:ui-monospace,Menlo,Consolas,monospace;word-break:break-all;text-align:left}
.tag{display:inline-block;padding:0 4px;border-radius:3px;font-size:10px;color:#fff;margin-right:2px}
.tag.flag{background:#c44e52} .tag.poison{background:#7a1f22} .tag.cover{background:#dd8452}
footer{margin-top:30px;color:#888;font-size:12px;border-top:1px solid #eee;padding-top:6px}
"""


# ----------------------------------------------------------------------------------------------------
# sections


def _section_summary(page: _Page, d: _RunData) -> None:
    run, s = d.run, d.scores
    n = len(s) if d.totals is None else int(d.totals["rows"])
    flagged = s["flagged"].fillna(False).to_numpy(dtype=bool)
    labels = s["label"].to_numpy()
    if d.totals is None:
        n_flagged = int(flagged.sum())
        cls, cnt = np.unique(labels[flagged], return_counts=True)
    else:  # a sample of a large table: the counts come from the streaming pass
        n_flagged = int(d.totals["flagged"])
        cls = np.array(sorted(d.totals["flagged_by_class"]), dtype=np.int64)
        cnt = np.array([d.totals["flagged_by_class"][int(c)] for c in cls], dtype=np.int64)
    rows: list[tuple[str, str]] = []
    shape = run.get("image_shape")
    rows.append(("image shape (H, W, C)", _e(" x ".join(str(x) for x in shape)) if shape else "&ndash;"))
    rows.append(("classes", _fmt(run.get("num_classes"))))
    rows.append(("train shards", _fmt(len(run.get("train") or []))))
    rows.append(("clean-reserve shards", _fmt(len(run.get("clean") or []))))
    shards = d.shards.value
    if shards is not None and "samples" in shards.columns:
        rows.append(("input samples", _fmt(int(shards["samples"].sum()))))
    rows.append(("usable samples (scored)", _fmt(n)))
    q = d.quarantine.value
    if q is not None:
        rows.append(("quarantined", _fmt(len(q))))
    elif shards is not None and "quarantined" in shards.columns:
        rows.append(("quarantined", _fmt(int(shards["quarantined"].sum()))))
    rate = n_flagged / n if n else float("nan")
    rows.append(("flagged", f"{_fmt(n_flagged)} ({100 * rate:.2f}%)" if n else "0"))
    if d.totals is not None:
        rows.append(("plots", f"from a uniform sample of {_fmt(int(d.totals['sample']))} of {_fmt(n)} samples "
                              "(and the top-scored ones); counts above are exact"))
    if n_flagged:
        order = np.argsort(-cnt, kind="stable")
        txt = ", ".join(f"{int(cls[i])}: {int(cnt[i]):,}" for i in order[:20])
        rows.append(("flagged by class", txt + (f", ... ({len(cls) - 20} more classes)" if len(cls) > 20 else "")))
    dec = d.decisions.value
    if isinstance(dec, dict):
        cleansed = [c.get("class") for c in dec.get("classes", []) if c.get("cleansed")]
        rows.append(("cleansed classes (CT)", _e(", ".join(str(c) for c in cleansed)) if cleansed else "none"))
        x = dec.get("xclass")
        if isinstance(x, dict):  # the cross-class detector's test (ctray.core.xclass); flagged_by in scores.parquet
            verdict = (f"<b>{_fmt(x.get('k'))} samples flagged</b>" if x.get("attack") else "nothing flagged")
            rows.append(("cross-class detector", f"{verdict}: {_fmt(x.get('k'))} of {_fmt(x.get('n'))} samples above "
                         f"both thresholds where the reserve ({_fmt(x.get('k_ref'))} of {_fmt(x.get('n_ref'))} "
                         f"above them) predicts {_fmt(x.get('expected'))} ({_e(str(x.get('test', 'plug-in')))} "
                         f"test, p = {_fmt(x.get('p_value'))}, alpha {_fmt(x.get('alpha'))}); column flagged_by says which "
                         "evidence flagged each sample"))
        weak = [c for c in dec.get("classes", []) if c.get("weak")]
        if weak:
            from ctray.core.decide import WEAK_EVIDENCE_NOTE

            rows.append(("weak evidence", "<b>" + _e(", ".join(f"class {c.get('class')} (LR {_fmt(c.get('lr'))})" for c in weak))
                         + f"</b>: likelihood ratio under {_fmt(dec.get('weak_lr'))} (decide.weak_lr); "
                         + _e(WEAK_EVIDENCE_NOTE) + "."))
        vetoed = [c for c in dec.get("classes", []) if c.get("vetoed")]
        if vetoed:  # decide.corroborate: weak evidence that earlier rounds did not corroborate
            rows.append(("not corroborated", "<b>" + _e(", ".join(
                f"class {c.get('class')} (LR {_fmt(c.get('lr'))}, corroboration {_fmt(c.get('corroboration'))})"
                for c in vetoed)) + f"</b>: passed the likelihood-ratio test on weak evidence, but under "
                f"{_fmt(dec.get('corroborate'))} (decide.corroborate): not cleansed, nothing flagged in it"))
    groups = d.truth_groups()
    if groups is not None:
        t = d.totals
        npois = int(groups["poison"].sum()) if t is None else int(t["poison"])
        ncov = int(groups["cover"].sum()) if t is None else int(t["cover"])
        tp = int((flagged & groups["poison"]).sum()) if t is None else int(t["tp"])
        rows.append(("ground truth: poison / cover", f"{npois:,} / {ncov:,}"))
        rows.append(("flagged poison (true positives)", f"{tp:,} of {npois:,}"))
    body = ['<div class="grid"><div><h3>Counts</h3>', _kv_table(rows), "</div>"]

    secs = run.get("seconds") or {}
    body.append("<div><h3>Timings</h3>")
    if isinstance(secs, dict) and secs:
        trows = [(_e(k), _fmt_seconds(v)) for k, v in secs.items()]
        total = sum(float(v) for v in secs.values() if isinstance(v, int | float))
        trows.append(("<b>total</b>", f"<b>{_fmt_seconds(total)}</b>"))
        body.append(_table(["phase", "time"], trows))
    else:
        body.append(_na("run.json has no timings"))
    body.append("</div></div>")

    body.append("<h3>Detection metrics</h3>")
    met = d.metrics.value
    if isinstance(met, dict):
        keys = ["tpr", "fpr", "precision", "f1", "auroc", "auprc", "n", "n_poison", "n_flagged", "flag_rate"]
        mrows = []
        for method, m in met.items():
            if isinstance(m, dict) and any(k in m for k in keys):
                mrows.append([_e(method), *(_fmt(m.get(k)) for k in keys)])
        body.append(_table(["method", "TPR", "FPR", "precision", "F1", "AUROC", "AUPRC", "n", "n poison",
                            "n flagged", "flag rate"], mrows) if mrows else _na("metrics.json has no method entries"))
    else:
        body.append(_na(d.metrics.why or "no ground truth"))
    page.add("summary", "Summary", "\n".join(body))


def _section_histogram(page: _Page, d: _RunData) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    score = d.scores["score"].to_numpy(dtype=float)
    ok = np.isfinite(score)
    if not ok.any():
        page.add("scores", "Score distribution", _na("no finite scores"))
        return
    bins = np.linspace(0.0, 1.0, 51)
    groups = d.truth_groups()
    if groups is not None:
        parts = [(k, groups[k] & ok) for k in ("clean", "cover", "poison")]
        note = "Split by ground truth (cover = trigger-carrying samples with their true label)."
    else:
        fl = d.scores["flagged"].fillna(False).to_numpy(dtype=bool)
        parts = [("unflagged", ~fl & ok), ("flagged", fl & ok)]
        note = "No ground truth: split by the detector's decision."
    parts = [(name, m) for name, m in parts if m.any()]
    peak = max(int(np.histogram(np.clip(score[m], 0, 1), bins=bins)[0].max()) for _, m in parts)
    fig = _new_figure(10, 3.4)
    ax = fig.add_subplot()
    for name, m in parts:
        ax.hist(np.clip(score[m], 0, 1), bins=bins, histtype="stepfilled", alpha=0.45, color=_COLORS[name],
                edgecolor=_COLORS[name], linewidth=1.2, label=f"{name} ({int(m.sum()):,})")
    ax.set_xlim(0, 1)
    ax.set_xlabel("score (higher = more suspicious)")
    if peak >= 20:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("samples (log)")
    else:  # a log axis over 1..few is unreadable
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("samples")
    fig.legend(loc="outside upper center", frameon=False, ncols=3)
    ax.grid(alpha=0.25)
    body = page.figure(fig, "score_histogram", "histogram of scores")
    page.add("scores", "Score distribution", f'<p class="note">{_e(note)}</p>{body}')


def _section_classes(page: _Page, d: _RunData) -> None:
    title = "Per-class likelihood ratios"
    dec = d.decisions.value
    if not isinstance(dec, dict) or not isinstance(dec.get("classes"), list) or not dec["classes"]:
        page.add("classes", title, _na(d.decisions.why or "decisions.json has no classes"))
        return
    classes = [c for c in dec["classes"] if isinstance(c, dict)]
    t_max = float(dec.get("threshold_max", 1.5))
    t_any = float(dec.get("threshold_any", 2.0))
    cls_ids = np.array([int(c.get("class", i)) for i, c in enumerate(classes)])
    lr = np.array([_as_float(c.get("lr")) for c in classes])
    cleansed = np.array([bool(c.get("cleansed")) for c in classes])
    finite = np.where(np.isfinite(lr), lr, np.nan)
    top = np.nanmax(finite) if np.isfinite(finite).any() else 1.0
    lr_plot = np.where(np.isfinite(lr), lr, top * 2 if np.isposinf(lr).any() else 0.0)
    # capped: a near-degenerate class can give an LR near the float maximum, whose log-axis ticks overflow
    # in matplotlib (the table below prints the true value)
    lr_plot = np.clip(np.nan_to_num(lr_plot, nan=0.0, posinf=1e12), 1e-3, 1e12)

    fig = _new_figure(10, 3.4)
    ax = fig.add_subplot()
    x = np.arange(len(classes))
    ax.bar(x, lr_plot, color=[_COLORS["poison"] if c else _COLORS["grey"] for c in cleansed],
           width=0.8 if len(classes) <= 100 else 1.0)
    ax.axhline(t_max, color="#dd8452", ls="--", lw=1.2, label=f"threshold for the max class = {t_max:g}")
    ax.axhline(t_any, color="#c44e52", ls=":", lw=1.5, label=f"threshold for any class = {t_any:g}")
    if np.nanmax(lr_plot) > 20 * max(t_any, 1.0):
        ax.set_yscale("log")
    if len(classes) <= 60:
        ax.set_xticks(x, [str(c) for c in cls_ids], fontsize=8 if len(classes) > 20 else 10)
    ax.set_xlabel("class (red = cleansed)")
    ax.set_ylabel("likelihood ratio")
    ax.legend(loc="upper right", frameon=False, fontsize=9)
    ax.grid(axis="y", alpha=0.25)
    img = page.figure(fig, "class_likelihood_ratios", "per-class likelihood ratios")

    order = np.argsort(-np.nan_to_num(lr, nan=-np.inf), kind="stable")
    shown = [i for i in order if cleansed[i]] + [i for i in order if not cleansed[i]]
    shown = shown[:MAX_CLASS_ROWS]
    rows, hl = [], []
    for i in shown:
        c = classes[i]
        rows.append([_e(c.get("class", i)), _fmt(c.get("n")), _fmt(c.get("n_isolated")), _fmt(_as_float(c.get("lr"))),
                     "<b>cleansed</b>" if cleansed[i] else "no"])
        hl.append(bool(cleansed[i]))
    table = _table(["class", "samples", "isolated (pred = label)", "likelihood ratio", "cleansed"], rows,
                   highlight=hl)
    more = (f'<p class="note">{len(classes) - len(shown)} more classes not listed (sorted by ratio).</p>'
            if len(classes) > len(shown) else "")
    nfl = dec.get("n_flagged")
    note = (f'<p class="note">A class is cleansed when its ratio is the largest and &gt; {t_max:g}, or &gt; '
            f'{t_any:g}; all its isolated samples are flagged. Flagged in total: {_fmt(nfl)}.</p>')
    page.add("classes", title, img + note + table + more)


def _as_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _section_projection(page: _Page, d: _RunData) -> None:
    title = "Within-class projections"
    s = d.scores
    if "proj_x" not in s.columns or "proj_y" not in s.columns:
        page.add("projection", title, _na("scores.parquet has no proj_x/proj_y"))
        return
    dec = d.decisions.value
    picks: list[int] = []
    if isinstance(dec, dict) and isinstance(dec.get("classes"), list):
        cl = [c for c in dec["classes"] if isinstance(c, dict) and "class" in c]
        cl.sort(key=lambda c: (not c.get("cleansed"), -np.nan_to_num(_as_float(c.get("lr")), nan=-np.inf)))
        picks = [int(c["class"]) for c in cl[:4]]
    if not picks:
        labels, counts = np.unique(s["label"].to_numpy(), return_counts=True)
        picks = [int(labels[i]) for i in np.argsort(-counts, kind="stable")[:4]]
    groups = d.truth_groups()
    label = s["label"].to_numpy()
    pred = s["pred"].to_numpy() if "pred" in s.columns else None
    px, py = s["proj_x"].to_numpy(dtype=float), s["proj_y"].to_numpy(dtype=float)
    rng = np.random.default_rng(0)
    fig = _new_figure(2.6 * max(len(picks), 2), 2.8)
    axes = fig.subplots(1, len(picks), squeeze=False)[0]
    for ax, c in zip(axes, picks, strict=True):
        idx = np.flatnonzero(label == c)
        if idx.size > 4000:
            idx = np.sort(rng.choice(idx, 4000, replace=False))
        if groups is not None:
            cats = [("clean", groups["clean"]), ("cover", groups["cover"]), ("poison", groups["poison"])]
        elif pred is not None:
            iso = pred == label
            cats = [("other", ~iso), ("isolated", iso)]
        else:
            cats = [("samples", np.ones(len(s), bool))]
        colors = {"clean": _COLORS["clean"], "cover": _COLORS["cover"], "poison": _COLORS["poison"],
                  "other": _COLORS["clean"], "isolated": _COLORS["poison"], "samples": _COLORS["clean"]}
        for name, mask in cats:
            j = idx[mask[idx]]
            if j.size:
                ax.scatter(px[j], py[j], s=float(np.clip(3000 / max(idx.size, 1), 3, 14)), alpha=0.6, color=colors[name], label=name, linewidths=0)
        ax.set_title(f"class {c} ({int((label == c).sum()):,})", fontsize=10)
        ax.tick_params(labelsize=7)
    handles, names = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="outside lower center", ncols=3, frameon=False, markerscale=3)
    img = page.figure(fig, "class_projections", "within-class 2-D projections")
    note = ("2-D within-class PCA of the final model's features for the cleansed classes (then the highest "
            "ratios). " + ("Coloured by ground truth." if groups is not None else
                           "Isolated = the confused model still predicts the given label."))
    page.add("projection", title, f'<p class="note">{_e(note)}</p>{img}')


def _section_rounds(page: _Page, d: _RunData) -> None:
    title = "Distillation rounds"
    rounds = d.rounds.value
    if not isinstance(rounds, list) or not rounds:
        page.add("rounds", title, _na(d.rounds.why or "rounds.json is empty"))
        return
    rr = [r for r in rounds if isinstance(r, dict)]
    x = np.array([int(r.get("round", i)) for i, r in enumerate(rr)])
    kept = np.array([_as_float(r.get("kept")) for r in rr])
    kp = np.array([_as_float(r.get("kept_poison")) for r in rr])
    frac = np.where((kept > 0) & np.isfinite(kp), kp / np.where(kept > 0, kept, 1), np.nan)
    rows = [[_e(r.get("round", i)), _fmt(r.get("kept")), _fmt(r.get("kept_poison")),
             f"{100 * f:.2f}%" if np.isfinite(f) else "&ndash;", _fmt_seconds(r.get("seconds"))]
            for i, (r, f) in enumerate(zip(rr, frac, strict=True))]
    table = _table(["round", "kept after distillation", "poison in kept set", "poison fraction", "time"], rows)
    img = ""
    if np.isfinite(kept).any():
        fig = _new_figure(10, 3.2)
        ax = fig.add_subplot()
        m = np.isfinite(kept)
        ax.plot(x[m], kept[m], "o-", color=_COLORS["clean"], label="kept-set size")
        ax.set_yscale("log")
        ax.set_xlabel("round")
        ax.set_ylabel("kept samples (log)", color=_COLORS["clean"])
        ax.set_xticks(x)
        ax.grid(alpha=0.25)
        if np.isfinite(frac).any():
            ax2 = ax.twinx()
            mf = np.isfinite(frac)
            ax2.plot(x[mf], frac[mf], "s--", color=_COLORS["poison"], label="poison fraction of kept set")
            ax2.set_ylabel("poison fraction", color=_COLORS["poison"])
            ax2.set_ylim(0, min(1.0, max(0.05, float(np.nanmax(frac)) * 1.15)))
            lines = ax.get_lines() + ax2.get_lines()
            fig.legend(lines, [ln.get_label() for ln in lines], loc="outside lower center", ncols=2,
                       frameon=False, fontsize=9)
        img = page.figure(fig, "rounds", "kept-set size per round")
    page.add("rounds", title, img + table)


def roc_points(truth: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC curve of ``score`` (higher = more positive) against boolean ``truth``, ties grouped.

    Args:
        truth: bool ``(N,)``, True = positive (poison).
        score: float ``(N,)``; non-finite scores count as the lowest.

    Returns:
        ``(fpr, tpr, auroc)``: both curves start at 0 and end at 1; ``auroc`` is the trapezoid area
        (NaN when one class is empty).
    """
    y = np.asarray(truth, dtype=bool)
    s = np.nan_to_num(np.asarray(score, dtype=float), nan=-np.inf)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0]), float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    tps = np.cumsum(y)[ends]
    fps = ends + 1 - tps
    tpr = np.r_[0.0, tps / pos]
    fpr = np.r_[0.0, fps / neg]
    return fpr, tpr, float(np.trapezoid(tpr, fpr))


def _section_roc(page: _Page, d: _RunData) -> None:
    title = "ROC curve"
    groups = d.truth_groups()
    if groups is None:
        page.add("roc", title, _na("no ground truth"))
        return
    poison = groups["poison"]
    if poison.all() or not poison.any():
        page.add("roc", title, _na("ground truth has a single class"))
        return
    score = d.scores["score"].to_numpy(dtype=float)
    fpr, tpr, auc = roc_points(poison, score)
    fl = d.scores["flagged"].fillna(False).to_numpy(dtype=bool)
    op_tpr = (fl & poison).sum() / poison.sum()
    op_fpr = (fl & ~poison).sum() / (~poison).sum()
    fig = _new_figure(9, 4)
    ax1, ax2 = fig.subplots(1, 2)
    for ax, log in ((ax1, False), (ax2, True)):
        ax.plot(fpr, tpr, color=_COLORS["poison"], lw=1.8, label=f"score (AUROC {auc:.4f})")
        ax.plot([op_fpr], [op_tpr], "ko", ms=6, label=f"flagged set (TPR {op_tpr:.3f}, FPR {op_fpr:.4f})")
        ax.set_xlabel("false positive rate" + (" (log)" if log else ""))
        ax.set_ylabel("true positive rate")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.25)
        if log:
            lo = 1.0 / max(int((~poison).sum()), 1)
            ax.set_xscale("log")
            ax.set_xlim(lo / 2, 1.0)
        else:
            ax.plot([0, 1], [0, 1], color="#bbb", ls=":", lw=1)
            ax.set_xlim(-0.02, 1.02)
            ax.legend(loc="lower right", frameon=False, fontsize=9)
    img = page.figure(fig, "roc", "ROC curve")
    note = ("Positives = ground-truth poison samples; cover samples count as negatives. "
            "The dot is the detector's flagged set; right: log false-positive axis.")
    page.add("roc", title, f'<p class="note">{_e(note)}</p>{img}')


# ----------------------------------------------------------------------------------------------------
# top-k thumbnails


_RESULT_FILES = ("run.json", "scores.parquet", "decisions.json", "rounds.json", "metrics.json", "shards.parquet",
                 "quarantine.parquet")


def _write_remote_report(run_dir: str, top_k: int) -> str:
    """Stage a remote run directory's result files locally, write the page, upload page + plots."""
    import tempfile

    from ctray import io as cio

    with tempfile.TemporaryDirectory(prefix="ctray-report-") as parent:
        tmp = os.path.join(parent, run_dir.rstrip("/").rsplit("/", 1)[-1] or "run")  # the page title names it
        os.makedirs(tmp)
        for name in _RESULT_FILES:
            src = cio.join(run_dir, name)
            if cio.exists(src):
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(cio.read_bytes(src))
            elif name in ("run.json", "scores.parquet"):
                raise DataError(f"{src} is missing: cannot write a report for {run_dir}")
        local = write_report(tmp, top_k)
        with open(local, "rb") as f:
            cio.write_bytes(cio.join(run_dir, REPORT_NAME), f.read())
        plots = os.path.join(tmp, PLOTS_DIR)
        for name in sorted(os.listdir(plots)):
            with open(os.path.join(plots, name), "rb") as f:
                cio.write_bytes(cio.join(run_dir, PLOTS_DIR, name), f.read())
    out = cio.join(run_dir, REPORT_NAME)
    log.info("uploaded %s", out)
    return out


def _shard_path_map(run: dict[str, Any], run_dir: str) -> dict[str, str]:
    """Map every plausible shard id of the run's train shards to a readable path."""
    from ctray.data.shards import shard_ids

    train = [str(p) for p in (run.get("train") or [])]
    clean = [str(p) for p in (run.get("clean") or [])]
    resolved = []
    for p in train:
        if "://" not in p and not os.path.isabs(p) and not os.path.exists(p):
            alt = os.path.join(run_dir, p)
            p = alt if os.path.exists(alt) else p
        resolved.append(p)
    out: dict[str, str] = {}
    for p, orig in zip(resolved, train, strict=True):
        out.setdefault(orig, p)
        out.setdefault(os.path.basename(p.rstrip("/")), p)
    for group in (resolved, resolved + clean):
        if group:
            for p, sid in shard_ids(group).items():
                if p in resolved:
                    out.setdefault(sid, p)
    return out


def _thumbnail(image: np.ndarray) -> bytes:
    from PIL import Image

    arr = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
    im = Image.fromarray(np.ascontiguousarray(arr))
    h, w = im.height, im.width
    side = max(h, w)
    if side < THUMB_PX:
        f = max(1, THUMB_PX // side)
        im = im.resize((w * f, h * f), Image.Resampling.NEAREST)
    elif side > 2 * THUMB_PX:
        im.thumbnail((2 * THUMB_PX, 2 * THUMB_PX), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _read_images(want: pd.DataFrame, path_of: dict[str, str]) -> tuple[dict[tuple[str, str], np.ndarray],
                                                                            list[str]]:
    """Read the images of ``want`` (columns shard, key), opening each needed shard once and stopping
    as soon as its wanted keys are found. Returns ``({(shard, key): image}, problems)``."""
    from ctray.data.shards import iter_shard

    images: dict[tuple[str, str], np.ndarray] = {}
    problems: list[str] = []
    for shard, keys in want.groupby("shard", sort=True)["key"]:
        shard = str(shard)
        wanted = {str(k) for k in keys}
        path = path_of.get(shard)
        if path is None:
            problems.append(f"shard {shard}: not among the train shards listed in run.json")
            continue
        broken = False
        try:
            for rec in iter_shard(path, shard, None, None):
                if rec.level == "shard" and rec.reason:
                    problems.append(f"shard {shard} ({path}): {rec.reason}")
                    broken = True
                    break
                if rec.key in wanted and rec.ok and rec.image is not None:
                    images[(shard, rec.key)] = rec.image
                    wanted.discard(rec.key)
                    if not wanted:
                        break
        except Exception as e:  # unreadable/remote-failure: report it in the page, never crash
            log.warning("report: cannot read shard %s (%s): %s", shard, path, e)
            problems.append(f"shard {shard} ({path}) is unreadable: {type(e).__name__}: {e}")
            continue
        if wanted and not broken:
            problems.append(f"shard {shard}: {len(wanted)} key(s) not found or not decodable")
    return images, problems


def _section_top(page: _Page, d: _RunData, top_k: int) -> None:
    title = "Most suspicious samples"
    s = d.scores
    if top_k <= 0 or s.empty:
        page.add("top", title, _na("no samples" if s.empty else "top_k = 0"))
        return
    sc = s.assign(_s=np.nan_to_num(s["score"].to_numpy(dtype=float), nan=-np.inf))
    top = sc.sort_values(["_s", "shard", "key"], ascending=[False, True, True], kind="mergesort").head(top_k)
    path_of = _shard_path_map(d.run, d.run_dir)
    images, problems = _read_images(top[["shard", "key"]].astype(str), path_of)
    cells = []
    truth = d.has_truth
    for rank, (_, r) in enumerate(top.iterrows()):
        shard, key = str(r["shard"]), str(r["key"])
        img = images.get((shard, key))
        cls = ""
        tags = []
        if bool(r["flagged"]):
            tags.append('<span class="tag flag">flagged</span>')
        if truth and bool(r.get("truth_poison", False)):
            cls = " poison"
            tags.append('<span class="tag poison">poison</span>')
        elif truth and bool(r.get("truth_cover", False)):
            cls = " cover"
            tags.append('<span class="tag cover">cover</span>')
        if img is not None:
            png = _thumbnail(img)
            with open(os.path.join(page.plots_dir, f"top_{rank:03d}.png"), "wb") as f:
                f.write(png)
            pic = _img_tag(png, f"{shard} / {key}")
        else:
            pic = '<div class="missing">image not available</div>'
        pred = f", pred {int(r['pred'])}" if "pred" in s.columns and pd.notna(r["pred"]) else ""
        cells.append(
            f'<div class="thumb{cls}">{pic}<div class="cap"><b>#{rank + 1}</b> score '
            f"{float(r['score']):.4f}<br>{''.join(tags) or '&nbsp;'}<br>"
            f'<span title="shard">{_e(shard)}</span><br>key {_e(key)}<br>'
            f"label {_e(int(r['label']))}{_e(pred)}</div></div>")
    note = (f"The {len(top)} highest-scoring samples (ties by shard, key); images read back from the train "
            f"shards. Red frame = ground-truth poison, orange = cover.")
    body = f'<p class="note">{_e(note)}</p>'
    if problems:
        body += ('<p class="na">Some images are not available: ' + "; ".join(_e(p) for p in problems[:10])
                 + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "") + "</p>")
    body += f'<div class="thumbs">{"".join(cells)}</div>'
    page.add("top", title, body)


# ----------------------------------------------------------------------------------------------------
# shards and quarantine


def _section_shards(page: _Page, d: _RunData) -> None:
    sh = d.shards.value
    note = ""
    if sh is None or "shard" not in sh.columns:
        s = d.scores
        sh = (s.assign(_f=s["flagged"].fillna(False).astype(bool))
              .groupby("shard", sort=True)
              .agg(usable=("key", "size"), flagged=("_f", "sum"), mean_score=("score", "mean"))
              .reset_index())
        note = f"{d.shards.why or 'shards.parquet has no shard column'}; computed from scores.parquet."
    _group_section(page, sh, "shard", "shards", "Per-shard flagged counts", note, alpha=_alpha(d, "shards"))


def _section_sources(page: _Page, d: _RunData) -> None:
    title = "Per-source flagged counts"
    src = d.sources.value
    if src is None or "source" not in src.columns:
        page.add("sources", title, _na(d.sources.why or "sources.parquet has no source column"))
        return
    if src.empty:
        page.add("sources", title, '<p class="note">No sample carries a source (a <code>source</code> field or a '
                 "<code>url</code> in its <code>.json</code> metadata).</p>")
        return
    _group_section(page, src, "source", "sources", title, "Sources: the <code>source</code> field of a sample's "
                   "<code>.json</code>, else the host of its <code>url</code>.", note_is_html=True,
                   alpha=_alpha(d, "sources"))


def _alpha(d: _RunData, table: str) -> float:
    """The marking level the run used (run.json ``aggregate``), 0.01 for older runs."""
    agg = d.run.get("aggregate")
    if not isinstance(agg, dict):
        agg = {}
    try:
        return float((agg.get(table) or {}).get("alpha", 0.01))
    except (TypeError, ValueError):
        return 0.01


def _group_section(page: _Page, tab: pd.DataFrame, col: str, anchor: str, title: str, note: str,
                   note_is_html: bool = False, alpha: float = 0.01) -> None:
    """Chart + table of a per-group table (shards.parquet / sources.parquet), most suspicious first."""
    from ctray.core.shardstats import binomial_marks, suspicion_order

    tab = tab.copy()
    for c in ("samples", "usable", "quarantined"):
        if c not in tab.columns:
            tab[c] = np.nan
    tab["flagged"] = tab["flagged"].fillna(0).astype(int) if "flagged" in tab.columns else 0
    if "mean_score" not in tab.columns:
        tab["mean_score"] = np.nan
    usable = tab["usable"].fillna(0).astype(int).to_numpy()
    if "p_value" not in tab.columns and (usable >= tab["flagged"].to_numpy()).all():  # an older run directory
        p, marked, rate, _ = binomial_marks(tab["flagged"].to_numpy(), usable, alpha)
        tab["p_value"], tab["marked"], tab["expected"] = p, marked, usable * rate
        tab = tab.iloc[suspicion_order(p, tab["flagged"].to_numpy(), tab["mean_score"].to_numpy(),
                                       tab[col].astype(str).to_numpy())]
    for c in ("p_value", "expected"):
        if c not in tab.columns:
            tab[c] = np.nan
    if "marked" not in tab.columns:
        tab["marked"] = False
    denom = tab["usable"].where(tab["usable"] > 0)
    tab["rate"] = tab["flagged"] / denom
    top = tab.head(MAX_SHARD_BARS)
    n_marked = int(tab["marked"].fillna(False).astype(bool).sum())
    body = f'<p class="note">{note if note_is_html else _e(note)}</p>' if note else ""
    body += (f'<p class="note">{len(tab):,} {anchor}; {int((tab["flagged"] > 0).sum()):,} with at least one flagged '
             f"sample; <b>{n_marked:,} marked</b> (one-sided binomial tail of the flagged count against the run's "
             f"overall flag rate, Bonferroni-corrected level {alpha:g} / {anchor}). Most suspicious first "
             f"(p-value, then flagged count); top {len(top)}:</p>")
    bars = top[top["flagged"] > 0]
    if len(bars):
        from matplotlib.ticker import MaxNLocator

        fig = _new_figure(8, 0.8 + 0.22 * len(bars))
        ax = fig.add_subplot()
        y = np.arange(len(bars))[::-1]
        vals = bars["flagged"].to_numpy()
        mk = bars["marked"].fillna(False).astype(bool).to_numpy()
        ax.barh(y, vals, color=np.where(mk, _COLORS["poison"], _COLORS["clean"]), height=0.75)
        exp = bars["expected"].to_numpy(dtype=float)
        if np.isfinite(exp).any():
            ax.scatter(exp, y, marker="|", s=120, color="black", zorder=3, label="expected at the overall rate")
            ax.legend(loc="lower right", fontsize=8)
        for yi, v in zip(y, vals, strict=True):
            ax.text(v, yi, f" {int(v):,}", va="center", fontsize=8)
        ax.set_yticks(y, [_mpl_safe(str(v)) for v in bars[col]], fontsize=8)
        ax.set_ylim(-0.6, len(bars) - 0.4)
        ax.set_xlim(0, max(vals.max(), np.nanmax(exp) if np.isfinite(exp).any() else 0) * 1.12)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("flagged samples (red: marked)")
        ax.grid(axis="x", alpha=0.25)
        body += page.figure(fig, f"{anchor}_flagged", f"flagged samples per {col}")
    else:
        body += f'<p class="note">No {col} has a flagged sample.</p>'

    def keys(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "&ndash;"
        return _e(", ".join(str(k) for k in list(v)[:3]))

    rows, cls = [], []
    for _, r in top.iterrows():
        rows.append([_e(r[col]), _fmt_int(r["samples"]), _fmt_int(r["usable"]), _fmt_int(r["quarantined"]),
                     _fmt_int(r["flagged"]), _fmt(_as_float(r["expected"]), 3),
                     f"{100 * r['rate']:.2f}%" if pd.notna(r["rate"]) else "&ndash;", _fmt(_as_float(r["mean_score"])),
                     f"{_as_float(r['p_value']):.2g}" if pd.notna(r["p_value"]) else "&ndash;",
                     "yes" if bool(r["marked"]) else "", keys(r.get("top_keys"))])
        cls.append(bool(r["marked"]))
    html_table = _table([col, "samples", "usable", "quarantined", "flagged", "expected", "flag rate", "mean score",
                         "p-value", "marked", "top keys"], rows, highlight=cls)
    page.add(anchor, title, body + html_table)


def _fmt_int(v: Any) -> str:
    f = _as_float(v)
    return _fmt(int(f)) if math.isfinite(f) else "&ndash;"


def _section_quarantine(page: _Page, d: _RunData) -> None:
    title = "Quarantine"
    q = d.quarantine.value
    if q is None:
        page.add("quarantine", title, _na(d.quarantine.why))
        return
    if q.empty:
        page.add("quarantine", title, "<p>No sample was quarantined.</p>")
        return
    q = q.copy()
    for col in ("shard", "key", "reason", "level"):
        if col not in q.columns:
            q[col] = ""
    q["kind"] = q["reason"].astype(str).str.split(":", n=1).str[0]
    counts = (q.groupby(["kind", "level"], sort=True).size().reset_index(name="n")
              .sort_values(["n", "kind"], ascending=[False, True], kind="mergesort"))
    crow = [[_e(r["kind"]), _e(r["level"]), _fmt(int(r["n"]))] for _, r in counts.iterrows()]
    body = f"<p>{len(q):,} quarantined entries in {q['shard'].nunique():,} shard(s).</p>"
    body += _table(["reason", "level", "count"], crow)
    first = q.head(MAX_QUARANTINE_ROWS)
    rows = [[_e(r["shard"]), _e(r["key"]), _e(r["reason"]), _e(r["level"])] for _, r in first.iterrows()]
    body += f"<h3>First {len(first)} rows</h3>" + _table(["shard", "key", "reason", "level"], rows, cls="wrap")
    page.add("quarantine", title, body)


# ----------------------------------------------------------------------------------------------------
# model audit page (ctray audit --out DIR)

AUDIT_REPORT_NAME = "audit.html"
_AUDIT_SCORE_TEXT = {
    "gap": "largest success gap ASR(model) - ASR(pivotal-tuned reference); higher = more suspicious",
    "gap-size": "largest success gap weighted by median trigger size / the class's trigger size (about 1 for a "
                "median-size trigger); higher = more suspicious"}


def write_audit_report(audit_dir: str) -> str:
    """Write ``audit_dir/audit.html``: the verdict, the per-class success gaps and the inverted triggers.

    Args:
        audit_dir: local directory written by ``ctray audit --out`` (``audit.json``, ``trigger-c<k>.png``,
            ``triggered.png``).

    Returns:
        The path of the written page.

    Raises:
        DataError: ``audit.json`` is missing or unreadable.
    """
    res = _read_required_json(os.path.join(audit_dir, "audit.json"))
    page = _Page(plots_dir=audit_dir)
    verdict = "backdoored" if res.get("backdoored") else "no backdoor found"
    page.add("summary", "Verdict", _kv_table([
        ("verdict", f"<b>{_e(verdict)}</b> (score {_fmt(res.get('score'))} vs threshold {_fmt(res.get('threshold'))})"),
        ("suspected target class", _fmt(res.get("target"))),
        ("score", _e(_AUDIT_SCORE_TEXT.get(res.get("score_mode", "gap"), str(res.get("score_mode"))))),
        ("largest success gap", _fmt(res.get("gap", res.get("score")))),
        ("trusted images", f"{_fmt(res.get('n_opt'))} to invert, {_fmt(res.get('n_eval'))} to measure"),
        ("reference model", _e(res.get("ref_ckpt"))),
        ("time", _fmt_seconds(res.get("seconds")))]))
    cells = []
    for name, cap in (("trigger.png", f"trigger of class {res.get('target')}"),
                      ("triggered.png", "a trusted image with it")):
        p = os.path.join(audit_dir, name)
        if os.path.exists(p):
            with open(p, "rb") as f:
                cells.append(f'<div class="thumb">{_img_tag(f.read(), cap)}<div class="cap">{_e(cap)}</div></div>')
    page.add("trigger", "Inverted trigger", f'<div class="thumbs">{"".join(cells)}</div>' if cells else _na())
    rows, hl = [], []
    for r in res.get("per_class", []):
        p = os.path.join(audit_dir, f"trigger-c{r['class']}.png")
        pic = ""
        if os.path.exists(p):
            with open(p, "rb") as f:
                pic = _img_tag(f.read(), f"trigger of class {r['class']}", cls="inline")
        rows.append([_fmt(r["class"]), _fmt(r.get("score", r["gap"])), _fmt(r["gap"]), _fmt(r["asr_model"]),
                     _fmt(r["asr_ref"]), _fmt(r.get("trigger_l1")), pic])
        hl.append(r["class"] == res.get("target"))
    page.add("classes", "Per candidate class",
             _table(["class", "score", "gap", "ASR model", "ASR reference", "trigger size (mean |delta|)", "trigger"],
                    rows, highlight=hl) if rows else _na())
    out = os.path.join(audit_dir, AUDIT_REPORT_NAME)
    with open(out, "w", encoding="utf-8") as f:
        f.write(page.render("ctray model audit", "Calibrated Trigger Inversion (Lukas &amp; Kerschbaum 2023)"))
    return out
