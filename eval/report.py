"""Write an evaluation: ``report.json`` (every number), ``report.md`` (tables) and PNG plots.

The markdown tables are also what ``cli.py eval`` prints, so the terminal and the file agree.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Optional

from mergeseek.eval.config import BASELINE
from mergeseek.eval.results import DatasetResult, EvalReport, ModelResult
from mergeseek.reports import to_json

log = logging.getLogger(__name__)

_CLS_METRICS = ("top1", "top5")
_RET_METRICS = ("R@1", "R@5", "R@10", "R@100", "MRR")
_VIDEO_METRICS = ("video_R@1", "video_R@5", "video_R@10", "video_MRR")
_AIC_METRICS = ("AIC", "AIC_kis", "AIC_qa", "AIC_trake")  # the HCMC AI Challenge score (eval/aic_score.py)
RANDOM_COLUMNS_NOTE = ("Random weights: the accuracy / recall columns are left out of the tables (with random "
                       "weights they are meaningless, chance level at best; report.json keeps them); speed, FLOPs "
                       "and agreement with the unmerged model are real")


def write_report(report: EvalReport, out_dir: Path, plots: bool = True) -> list[Path]:
    """Write the three kinds of output under ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        _atomic_write(out_dir / "report.json", to_json(report.to_dict(), indent=2) + "\n"),
    ]
    png = []
    if plots:
        from mergeseek.eval.plots import plot_report

        png = plot_report(report, out_dir)
    written.append(_atomic_write(out_dir / "report.md", render_markdown(report, [p.name for p in png])))
    return written + png


def _atomic_write(path: Path, text: str) -> Path:
    from mergeseek.runtime import atomic_write

    return atomic_write(path, text)


# ---------------------------------------------------------------------------- markdown
def render_markdown(report: EvalReport, images: Optional[list[str]] = None) -> str:
    cfg = report.config
    env = report.environment
    models = ", ".join(f"{m.name} (weights: {m.model.get('pretrained') or 'none, random'})" for m in report.models)
    lines = ["# mergeseek evaluation", ""]
    for note in report.notes:
        lines += [f"> **Note** — {note}.", ""]
    lines += [
        f"- models: {models}",
        f"- merge configs: {', '.join(f'`{c}`' for c in cfg.merge_configs())}",
        f"- datasets: {', '.join(cfg.datasets)} (limit {cfg.limit or 'none'}, seed {cfg.seed}, data root `{cfg.data_root}`)",
        f"- timing: batch {cfg.batch_size}, {cfg.warmup} warm-up + {cfg.iters} timed batches per config, "
        f"alternating in one process; {cfg.precision} on {env.get('gpu') or env.get('cpu', '?')} "
        f"({env.get('torch_threads', '?')} torch threads; load average {_load(env)})",
        f"- versions: torch {env.get('torch')}, open_clip {env.get('open_clip')}, timm {env.get('timm')}, "
        f"commit {env.get('git_commit')}",
        "",
    ]
    for m in report.models:
        lines += model_tables(m)
    if images:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in images] + [""]
    return "\n".join(lines)


def model_tables(m: ModelResult) -> list[str]:
    """The timing table and one comparison table per dataset, for one model."""
    d = m.model
    head = f"## {m.name} ({d.get('kind')}, pretrained {d.get('pretrained')}, {d.get('tokens')} tokens × {d.get('layers')} blocks)"
    lines = [head, ""]
    if not m.meaningful:
        lines += [f"*{RANDOM_COLUMNS_NOTE}*", ""]
    first = next(iter(m.timing.values()), None)
    mem_kind = first.mem_kind if first else ""
    clock = "single-thread CPU time" if first is not None and first.clock == "cpu" else "wall-clock"
    lines += [
        "| config | img/s | speed-up | FLOP ratio (ideal) | ms/img | p50 ms | p95 ms | peak MB | act. MB | tokens at exit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in m.timing.items():
        toks = m.tokens.get(name) or [float("nan")]
        lines.append(
            f"| `{name}` | {t.images_per_s:.1f} | {m.speedup(name):.2f}× | {m.flop_ratio.get(name, float('nan')):.2f}× | "
            f"{t.ms_per_image:.2f} | {t.p50_ms:.1f} | {t.p95_ms:.1f} | {t.peak_mem_mb:.0f} | {t.act_mem_mb:.0f} | {toks[-1]} |"
        )
    lines += ["", f"Timed by {clock}. Peak memory: `{mem_kind}` (see eval/timing.py). "
              "Speed-up = img/s ÷ unmerged img/s.", ""]
    from mergeseek.eval.timing import load_warning

    warning = first and load_warning(first.load_max, first.cores, first.clock)
    if warning:
        lines += [f"> **Warning** — {warning}.", ""]
    for ds in m.datasets:
        lines += reuse_table(m, ds) if ds.kind == "video" else dataset_table(m, ds)
    return lines


def reuse_table(m: ModelResult, ds: DatasetResult) -> list[str]:
    """A video set: reuse across frames against per-frame encoding (eval/datasets/video.py)."""
    lines = [f"### {m.name} · {ds.dataset} ({ds.n_images} frames; {ds.protocol})", ""]
    lines += [f"- {note}" for note in ds.notes] + ([""] if ds.notes else [])
    labelled = any("top1" in r.metrics for r in ds.results)
    head = ["config", "frames/s per frame", "frames/s reuse", "gain", "reuse rate", "full / cuts / refreshes",
            "cos min", "cos mean", "top-k overlap"] + (["top1 per frame", "top1 reuse", "Δtop1"] if labelled else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for r in ds.results:
        x, a = r.metrics, r.agreement
        overlap = next((v for k, v in a.items() if k.endswith("_overlap")), math.nan)
        row = [f"`{r.config}`", f"{x['per_frame_fps']:.1f}", f"{x['reuse_fps']:.1f}", f"{x['gain']:.2f}×",
               _pct(x["reuse_rate"]), f"{x['references']} / {x['cuts']} / {x['refreshes']}",
               f"{a['cos_min']:.4f}", f"{a['cos_mean']:.4f}", f"{overlap:.3f}"]
        if labelled:
            row += [_pct(x.get("top1_per_frame")), _pct(x.get("top1")),
                    f"{(x.get('top1', math.nan) - x.get('top1_per_frame', math.nan)) * 100:+.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "gain = per-frame time ÷ reuse time (same frames, same merge config, run one after the other); "
              "reuse rate = share of linear-layer work reused; see docs/REUSE.md.", ""]
    return lines


def metric_columns(ds: DatasetResult) -> list[str]:
    present = set()
    for r in ds.results:
        present.update(r.metrics)
    cols = [k for k in _CLS_METRICS + _RET_METRICS + _VIDEO_METRICS + _AIC_METRICS if k in present]
    return cols


def dataset_table(m: ModelResult, ds: DatasetResult) -> list[str]:
    what = f"{ds.n_images} images" + (f", {ds.n_queries} queries" if ds.n_queries else "") + (
        f", {ds.n_classes} classes" if ds.n_classes else "")
    lines = [f"### {m.name} · {ds.dataset} ({what}; {ds.protocol})", ""]
    for note in ds.notes:
        lines += [f"- {note}"]
    if ds.notes:
        lines.append("")
    if not ds.results:
        return lines
    scored = m.meaningful
    cols = metric_columns(ds) if scored else []
    primary = ds.primary if scored else ""
    agree_cols = [k for k in ds.results[0].agreement if k not in ("cos_p5", "cos_min")]
    header = (["config", "img/s", "speed-up", "GFLOPs", "FLOP ratio"] + cols + ([f"Δ{primary}"] if primary else [])
              + agree_cols)
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    base = ds.result(BASELINE)
    for r in ds.results:
        t = m.timing.get(r.config)
        row = [f"`{r.config}`", f"{t.images_per_s:.1f}" if t else "–", f"{m.speedup(r.config):.2f}×" if t else "–",
               f"{m.gflops(r.config):.2f}", f"{m.flop_ratio.get(r.config, float('nan')):.2f}×"]
        row += [_pct(r.metrics.get(c)) for c in cols]
        if primary:
            delta = r.metrics.get(ds.primary, math.nan) - (base.metrics.get(ds.primary, math.nan) if base else math.nan)
            row.append(f"{delta * 100:+.1f}")
        row += [f"{r.agreement[c]:.3f}" for c in agree_cols]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Metrics in %; Δ in points vs `none`; GFLOPs = ideal block GFLOPs per image from the token "
              "counts (FLOP ratio = unmerged ÷ merged); cos_mean = mean cosine to the unmerged embedding; "
              "overlap = shared fraction of the top-k results (or classes) with the unmerged model.", ""]
    if not scored and metric_columns(ds):
        lines += [f"Accuracy columns left out: {m.name} has random weights (its top-1 / recall are chance level "
                  "and say nothing about merging; they stay in report.json).", ""]
    return lines


def _load(env: dict) -> str:
    la = env.get("load_avg_1_5_15")
    return "/".join(f"{x:.1f}" for x in la) if la else "n/a"


def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")
