"""PNG plots of an evaluation: the speed/accuracy trade-off, one line per merge method.

* ``tradeoff_<model>_<dataset>.png``: the dataset's primary metric (top-1 or R@1) against images/s
  and against block GFLOPs per image, and the mean cosine to the unmerged embedding against
  images/s (meaningful even with random weights; their accuracy panels are left out, saying why).
  One line per method (its config without r), points sorted by x and labelled by r, the
  unmerged model as a black star.
* ``speed_<model>.png``: measured speed-up against the FLOP ratio (the ideal speed-up).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from mergeseek.encoders.config import MergeConfig
from mergeseek.eval.config import BASELINE, group_label
from mergeseek.eval.report import safe_name
from mergeseek.eval.results import DatasetResult, EvalReport, ModelResult

log = logging.getLogger(__name__)


def require_matplotlib() -> None:
    """Fail before any work when plots are asked for and matplotlib (the 'eval' extra) is missing."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        from mergeseek.errors import MissingDependencyError

        raise MissingDependencyError("plots need matplotlib: pip install matplotlib (the 'eval' extra: "
                                     "pip install '.[eval]'), or pass --no-plots")


def _pyplot():
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def plot_report(report: EvalReport, out_dir: Path) -> list[Path]:
    paths = []
    for m in report.models:
        paths.append(plot_speed(m, out_dir / f"speed_{safe_name(m.name)}.png"))
        for ds in m.datasets:
            if ds.results and ds.kind != "video":  # video sets: a table of reuse vs per-frame, no trade-off plot
                paths.append(plot_tradeoff(m, ds, out_dir / f"tradeoff_{safe_name(m.name)}_{safe_name(ds.dataset)}.png"))
    return paths


def replot(report_json: Path, out_dir: Optional[Path] = None) -> list[Path]:
    """Draw the plots of a saved ``report.json`` again (beside it, or under ``out_dir``): for runs
    made with ``--no-plots`` or before a plot changed."""
    import json

    from mergeseek.eval.results import models_from_json

    report_json = Path(report_json)
    out_dir = Path(out_dir) if out_dir is not None else report_json.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    report = EvalReport(config=None, models=tuple(models_from_json(json.loads(report_json.read_text()))))
    return plot_report(report, out_dir)


def _groups(m: ModelResult) -> dict[str, list[str]]:
    """method line -> configs ordered by merging strength (FLOP ratio), baseline first."""
    out: dict[str, list[str]] = {}
    for name in m.timing:
        if name == BASELINE:
            continue
        out.setdefault(group_label(MergeConfig.parse(name)), []).append(name)
    for label, names in out.items():
        names.sort(key=lambda n: m.flop_ratio.get(n, 1.0))
        if BASELINE in m.timing:
            names.insert(0, BASELINE)
    return out


def _r_label(name: str) -> str:
    if name == BASELINE:
        return ""
    r = MergeConfig.parse(name).r
    return f"r={r}" if isinstance(r, int) else "r=[…]"


def _value(ds: DatasetResult, name: str, key: str, scale: float):
    r = ds.result(name)
    if r is None:
        return None
    val = r.agreement.get(key) if key == "cos_mean" else r.metrics.get(key)
    return None if val is None else val * scale


def _x(m: ModelResult, name: str, axis: str) -> float:
    return m.timing[name].images_per_s if axis == "speed" else m.gflops(name)


def _panel(ax, m: ModelResult, ds: DatasetResult, axis: str, key: str, ylabel: str, scale: float) -> None:
    """One trade-off panel: a line per method (points sorted by x, labelled by r), the unmerged star."""
    for label, names in _groups(m).items():
        pts = [(_x(m, n, axis), _value(ds, n, key, scale), _r_label(n)) for n in names
               if n != BASELINE and n in m.timing]
        pts = sorted(p for p in pts if p[1] is not None)
        if not pts:
            continue
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        for x, y, tag in pts:
            ax.annotate(tag, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=line.get_color())
    val = _value(ds, BASELINE, key, scale) if BASELINE in m.timing else None
    if val is not None:
        ax.plot([_x(m, BASELINE, axis)], [val], marker="*", color="black", markersize=14, linestyle="none",
                label="unmerged", zorder=5)
    ax.set_xlabel("images / s (alternating timing)" if axis == "speed" else "GFLOPs per image (blocks, ideal)")
    ax.set_ylabel(ylabel)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_tradeoff(m: ModelResult, ds: DatasetResult, path: Path) -> Path:
    """Accuracy against images/s and against GFLOPs, and the cosine to the unmerged embedding
    against images/s. Random weights: the accuracy panels say why they are left out."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    scored = bool(ds.primary) and m.meaningful
    why = ("accuracy left out:\nrandom weights (chance level)" if ds.primary else "accuracy not measured\n(see report.md)")
    panels = [("speed", ds.primary, f"{ds.primary} (%)", 100.0), ("gflops", ds.primary, f"{ds.primary} (%)", 100.0),
              ("speed", "cos_mean", "cosine to unmerged embedding", 1.0)]
    for ax, (axis, key, ylabel, scale) in zip(axes, panels):
        if key != "cos_mean" and not scored:
            ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        _panel(ax, m, ds, axis, key, ylabel, scale)
    clock = next(iter(m.timing.values())).clock if m.timing else "wall"
    title = (f"{m.name} · {ds.dataset} ({ds.n_images} images" + (f", {ds.n_queries} queries" if ds.n_queries else "")
             + f"; speed by {'single-thread CPU time' if clock == 'cpu' else 'wall clock'})")
    if not m.meaningful:
        title += "\nrandom weights: accuracy left out; speed, FLOPs and agreement are real"
    fig.suptitle(title, fontsize=10, color="black" if m.meaningful else "firebrick")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speed(m: ModelResult, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    top = 1.0
    for label, names in _groups(m).items():
        xs = [m.flop_ratio[n] for n in names if n in m.flop_ratio]
        ys = [m.speedup(n) for n in names if n in m.flop_ratio]
        ax.plot(xs, ys, marker="o", label=label)
        top = max([top] + xs + ys)
    ax.plot([1, top], [1, top], linestyle="--", color="grey", linewidth=1, label="ideal (speed-up = FLOP ratio)")
    ax.set_xlabel("FLOP ratio unmerged / merged (ideal speed-up)")
    ax.set_ylabel("measured speed-up (images/s ratio)")
    ax.set_title(f"{m.name}: measured vs ideal speed-up", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
