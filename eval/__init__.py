"""Evaluation of merged encoders: datasets, metrics, the alternating timing protocol, reports.

Entry point (what ``cli.py eval`` calls)::

    from mergeseek.eval import EvalConfig, evaluate
    outcome = evaluate(EvalConfig(models=("ViT-B-32",), pretrained=None, datasets=("cifar10",),
                                  merges=("r=8", "r=8,method=lsh"), limit=200), out_dir="eval_out")
    outcome.report, outcome.paths   # typed results; report.json / report.md / *.png written

Heavy dependencies (torch, open_clip, timm, matplotlib) are imported inside functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:  # pragma: no cover
    from mergeseek.eval.config import EvalConfig
    from mergeseek.eval.results import EvalReport


@dataclass(frozen=True)
class EvalOutcome:
    report: "EvalReport"
    paths: tuple[Path, ...]

    def summary_lines(self) -> list[str]:
        """The comparison tables as printed by ``cli.py eval``."""
        from mergeseek.eval.report import model_tables

        lines = [f"note: {n}" for n in self.report.notes]
        for m in self.report.models:
            lines += [""] + model_tables(m)
        return lines + ["wrote: " + ", ".join(str(p) for p in self.paths)]

    def to_dict(self) -> dict:
        """What ``report.json`` holds."""
        return self.report.to_dict()


def evaluate(cfg: "EvalConfig", out_dir: Union[str, Path] = "eval_out", progress: bool = False) -> EvalOutcome:
    """Run ``cfg`` and write ``report.json``, ``report.md`` and the plots under ``out_dir``."""
    from mergeseek.eval.report import write_report
    from mergeseek.eval.runner import run_eval

    if cfg.plots:
        from mergeseek.eval.plots import require_matplotlib

        require_matplotlib()  # before the evaluation, not after it
    report = run_eval(cfg, progress=progress)
    paths = write_report(report, Path(out_dir), plots=cfg.plots)
    return EvalOutcome(report, tuple(paths))


def __getattr__(name: str):
    # ``from mergeseek.eval import EvalConfig`` without importing torch at package import.
    if name == "EvalConfig":
        from mergeseek.eval.config import EvalConfig

        return EvalConfig
    raise AttributeError(name)


__all__ = ["EvalConfig", "EvalOutcome", "evaluate"]
