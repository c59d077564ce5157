"""PNG plots of an evaluation: the speed/accuracy trade-off, one line per merge method.

* ``tradeoff_<model>_<dataset>.png``: left, the dataset's primary metric (top-1 or R@1) against
  images/s; right, mean cosine to the unmerged embedding against images/s (meaningful even
  with random weights). Each method's points are joined in order of merging strength, starting
  from the unmerged baseline (the black star).
* ``speed_<model>.png``: measured speed-up against the FLOP ratio (the ideal speed-up).
"""

from __future__ import annotations

import logging
from pathlib import Path

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


def plot_tradeoff(m: ModelResult, ds: DatasetResult, path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [(axes[0], ds.primary, f"{ds.primary} (%)" if ds.primary else "no accuracy measured", 100.0),
              (axes[1], "cos_mean", "cosine to unmerged embedding", 1.0)]
    for ax, key, ylabel, scale in panels:
        if not key:
            ax.text(0.5, 0.5, "accuracy not measured\n(see report.md)", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        for label, names in _groups(m).items():
            xs, ys, tags = [], [], []
            for n in names:
                r = ds.result(n)
                val = (r.metrics.get(key) if key != "cos_mean" else r.agreement.get(key)) if r else None
                if r is None or val is None or n not in m.timing:
                    continue
                xs.append(m.timing[n].images_per_s)
                ys.append(val * scale)
                tags.append(_r_label(n))
            line, = ax.plot(xs, ys, marker="o", label=label)
            for x, y, t in zip(xs, ys, tags):
                if t:
                    ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=line.get_color())
        base = ds.result(BASELINE)
        if base is not None and BASELINE in m.timing:
            val = base.metrics.get(key) if key != "cos_mean" else base.agreement.get(key)
            if val is not None:
                ax.plot([m.timing[BASELINE].images_per_s], [val * scale], marker="*", color="black", markersize=14,
                        linestyle="none", label="unmerged", zorder=5)
        ax.set_xlabel("images / s (alternating timing)")
        ax.set_ylabel(ylabel)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    title = f"{m.name} · {ds.dataset} ({ds.n_images} images" + (f", {ds.n_queries} queries" if ds.n_queries else "") + ")"
    if not m.meaningful:
        title += "\nrandom weights: the accuracy panel is meaningless; speed and agreement are real"
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
