"""Typed results of an evaluation and the environment they were measured in."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mergeseek.eval.timing import TimingResult

RANDOM_WEIGHTS_NOTE = (
    "random weights: accuracy and recall of these models mean nothing (chance level at best); "
    "timings, token counts, FLOP ratios and merged-vs-unmerged agreement are still real"
)


@dataclass(frozen=True)
class CandidateResult:
    """One merge config on one dataset: task metrics (fractions) and agreement with the baseline."""

    config: str
    metrics: dict
    agreement: dict

    def to_dict(self) -> dict:
        return {"config": self.config, "metrics": dict(self.metrics), "agreement": dict(self.agreement)}


@dataclass(frozen=True)
class DatasetResult:
    """Every candidate on one dataset.

    Args:
        primary: the metric plotted against speed (``top1`` or ``R@1``; empty when none was measured).
        protocol: how it was scored (zero-shot templates, own head, text→image).
    """

    dataset: str
    kind: str
    source: str
    n_images: int
    n_queries: int
    n_classes: int
    protocol: str
    primary: str
    notes: tuple[str, ...] = ()
    results: tuple[CandidateResult, ...] = ()

    @classmethod
    def skipped(cls, ds: Any, why: str) -> "DatasetResult":
        return cls(dataset=ds.name, kind=ds.kind, source=ds.source, n_images=len(ds.images),
                   n_queries=len(getattr(ds, "queries", ())), n_classes=0, protocol="skipped", primary="", notes=(why,))

    def result(self, config: str) -> Optional[CandidateResult]:
        return next((r for r in self.results if r.config == config), None)

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset, "kind": self.kind, "source": self.source, "n_images": self.n_images,
            "n_queries": self.n_queries, "n_classes": self.n_classes, "protocol": self.protocol,
            "primary": self.primary, "notes": list(self.notes), "results": [r.to_dict() for r in self.results],
        }


@dataclass(frozen=True)
class ModelResult:
    """One model: its description, the timing of each candidate, token counts and datasets."""

    model: dict
    timing: dict  # config -> TimingResult
    tokens: dict  # config -> tokens after each block
    flop_ratio: dict  # config -> base block FLOPs / merged block FLOPs (ideal speed-up)
    merge_stats: dict  # config -> encoders.merge_stats summary of the timing forward
    datasets: tuple[DatasetResult, ...] = ()

    @property
    def name(self) -> str:
        return str(self.model["model"])

    @property
    def meaningful(self) -> bool:
        return bool(self.model.get("weights_meaningful"))

    def speedup(self, config: str) -> float:
        return self.timing[config].speedup_over(self.timing["none"])

    def gflops(self, config: str) -> float:
        """Ideal block GFLOPs per image of ``config`` (2 x the MACs of ``eval.timing.encoder_macs``
        from its token counts; the patch embedding, norms and head left out), NaN when unknown."""
        from mergeseek.eval.timing import encoder_macs

        counts, width = self.tokens.get(config), self.model.get("width")
        if not counts or not width:
            return float("nan")
        n0 = int(self.model.get("tokens") or counts[0])
        return 2.0 * encoder_macs(counts, int(width), float(self.model.get("mlp_ratio") or 4.0), n0) / 1e9

    def to_dict(self) -> dict:
        return {
            "model": dict(self.model),
            "timing": {k: (v.to_dict() if isinstance(v, TimingResult) else v) for k, v in self.timing.items()},
            "speedup": {k: self.speedup(k) for k in self.timing},
            "gflops": {k: self.gflops(k) for k in self.tokens},
            "tokens": {k: list(v) for k, v in self.tokens.items()},
            "flop_ratio": dict(self.flop_ratio),
            "merge_stats": dict(self.merge_stats),
            "datasets": [d.to_dict() for d in self.datasets],
        }


@dataclass(frozen=True)
class EvalReport:
    config: Any  # eval.config.EvalConfig
    models: tuple[ModelResult, ...]
    environment: dict = field(default_factory=dict)

    @property
    def notes(self) -> list[str]:
        out = []
        random = [m.name for m in self.models if not m.meaningful]
        if random:
            out.append(f"{', '.join(random)}: {RANDOM_WEIGHTS_NOTE}")
        return out

    def to_dict(self) -> dict:
        return {
            "format": "mergeseek-eval/1",
            "config": self.config.to_dict(),
            "notes": self.notes,
            "environment": dict(self.environment),
            "models": [m.to_dict() for m in self.models],
        }


def models_from_json(data: dict) -> list[ModelResult]:
    """The ``ModelResult``s of a saved ``report.json`` (``EvalReport.to_dict``), to redraw its plots
    and tables without running the evaluation again."""
    out = []
    for m in data["models"]:
        timing = {k: TimingResult(**{**v, "times_ms": tuple(v.get("times_ms", ()))}) for k, v in m["timing"].items()}
        datasets = tuple(
            DatasetResult(**{**{k: v for k, v in d.items() if k not in ("notes", "results")},
                             "notes": tuple(d.get("notes", ())),
                             "results": tuple(CandidateResult(**r) for r in d.get("results", ()))})
            for d in m.get("datasets", ()))
        out.append(ModelResult(model=m["model"], timing=timing, tokens=m["tokens"], flop_ratio=m["flop_ratio"],
                               merge_stats=m.get("merge_stats", {}), datasets=datasets))
    return out


def environment(device: str = "cpu") -> dict:
    """Versions and machine facts for the report (every field fail-soft)."""
    import numpy
    import torch

    env: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        # Other processes on the machine skew timings; the load when the report was written says how much.
        "load_avg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    for mod in ("open_clip", "timm"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not recorded
            env[mod] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    env["git_commit"] = _git_commit()
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
