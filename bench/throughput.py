"""Images/s of merged vs unmerged encoders, timed alternately in one process.

    python cli.py bench --model ViT-B-16 --merge r=4 --merge r=8 --merge r=16

(``python -m bench.throughput ...`` is the same command; the options are defined in ``cli.py``,
the defaults in :class:`BenchConfig`.)

Prints, per config: images/s, the ratio to the unmerged model, the tokens after each block and the
FLOP ratio (the ideal speed-up). The unmerged baseline is the model as shipped (fused attention).
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchRow:
    merge: str
    images_per_s: float
    ratio: float
    flop_ratio: float
    p50_ms: float
    p95_ms: float
    tokens: tuple
    shortfall: int


@dataclass(frozen=True)
class BenchConfig:
    """One ``cli.py bench`` run; the defaults of the command live here.

    Args:
        model: open_clip model name.
        pretrained: weights (timing does not depend on them); None = random.
        merges: merge configs timed against the unmerged model.
        batch_size / iters / warmup: images per forward, timed rounds, untimed rounds first.
        image_size: input side override (e.g. 448); None = the model's.
        device / precision: ``auto|cpu|cuda[:N]`` and ``fp32|fp16|bf16``.
    """

    model: str = "ViT-B-16"
    pretrained: Optional[str] = None
    merges: tuple[str, ...] = ("r=8",)
    batch_size: int = 8
    iters: int = 10
    warmup: int = 2
    image_size: Optional[int] = None
    device: str = "auto"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        from encoders import MergeConfig
        from errors import ConfigError

        for key, lo in (("batch_size", 1), ("iters", 1), ("warmup", 0)):
            if getattr(self, key) < lo:
                raise ConfigError(f"bench {key}={getattr(self, key)} is not valid; it must be >= {lo}")
        if self.image_size is not None and self.image_size < 16:
            raise ConfigError(f"bench image_size={self.image_size} is not valid; give a side of at least 16 pixels")
        for m in self.merges:
            MergeConfig.parse(m)  # fail before loading a model

    @classmethod
    def from_options(cls, *, pretrained: Optional[str] = None, merges: Optional[Sequence[str]] = None,
                     **options) -> "BenchConfig":
        """Options left out (None) take the defaults; ``pretrained`` ``none`` means random weights."""
        if pretrained is not None and pretrained.strip().lower() in ("", "none"):
            pretrained = None
        kept = {k: v for k, v in options.items() if v is not None}
        return cls(pretrained=pretrained, merges=tuple(merges) if merges else cls.merges, **kept)


def run_bench(cfg: BenchConfig, progress: bool = False) -> dict[str, Any]:
    """:func:`run_throughput` for one :class:`BenchConfig`."""
    return run_throughput(cfg.model, cfg.pretrained, cfg.merges, cfg.batch_size, cfg.iters, cfg.warmup,
                          cfg.image_size, cfg.device, cfg.precision, progress=progress)


def sample_pixels(batch_size: int, image_size: int, device: str):
    """A batch of real photos (scikit-image) resized to the model input; random if unavailable."""
    import torch
    import torch.nn.functional as F

    try:
        from skimage import data

        photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
        imgs = [torch.from_numpy(p[..., :3].copy()).permute(2, 0, 1).float() / 255 for p in photos]
        imgs = [F.interpolate(i[None], size=(image_size, image_size), mode="bilinear")[0] for i in imgs]
        batch = torch.stack([imgs[i % len(imgs)] for i in range(batch_size)])
        batch = (batch - 0.45) / 0.27
    except ImportError:  # pragma: no cover - scikit-image is a dev dependency
        batch = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return batch.to(device)


def run_throughput(
    model_name: str = "ViT-B-16",
    pretrained: Optional[str] = None,
    merges: Sequence[str] = ("r=8",),
    batch_size: int = 8,
    iters: int = 10,
    warmup: int = 2,
    image_size: Optional[int] = None,
    device: str = "auto",
    precision: str = "fp32",
    progress: bool = False,
) -> dict[str, Any]:
    """Time the unmerged model and each merge config alternately; returns a JSON-able report."""
    import torch

    from encoders import Encoder, MergeConfig, merge_stats, token_counts
    from eval.candidates import merged_models
    from eval.timing import flop_ratio, time_alternating

    base = Encoder(model_name, pretrained, device, precision, "none", batch_size, image_size_override=image_size)
    visual = base.model.visual
    configs = ["none"] + [str(MergeConfig.parse(m)) for m in merges if str(MergeConfig.parse(m)) != "none"]
    models = merged_models(visual, configs)
    pixels = sample_pixels(batch_size, base.image_size, base.device)

    def runner(model):
        def run():
            with base._autocast():
                return model(pixels)

        return run

    with torch.inference_mode():
        for m in models.values():  # one forward each, for token counts
            runner(m)()
    timings = time_alternating({k: runner(m) for k, m in models.items()}, batch_size, warmup, iters, base.device, progress)
    base_tokens = token_counts(models["none"])
    width = int(visual.transformer.width)
    mlp_ratio = visual.transformer.resblocks[0].mlp.c_fc.out_features / width
    rows = []
    for name, model in models.items():
        tokens = token_counts(model)
        stats = merge_stats(model)
        t = timings[name]
        rows.append(
            BenchRow(
                merge=name,
                images_per_s=t.images_per_s,
                ratio=t.speedup_over(timings["none"]),
                flop_ratio=flop_ratio(tokens, base_tokens, width, mlp_ratio, num_tokens=base_tokens[0]),
                p50_ms=t.p50_ms,
                p95_ms=t.p95_ms,
                tokens=tuple(tokens),
                shortfall=int(stats.get("shortfall", 0)),
            )
        )
    return {
        "model": model_name,
        "pretrained": base.pretrained or "none",
        "image_size": base.image_size,
        "tokens_in": base_tokens[0],
        "batch_size": batch_size,
        "iters": iters,
        "device": base.device,
        "device_name": torch.cuda.get_device_name(base.device) if base.device.startswith("cuda") else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "precision": precision,
        "lsh_backend": _lsh_backend(base.device),
        "torch": torch.__version__,
        "rows": [r.__dict__ | {"tokens": list(r.tokens)} for r in rows],
    }


def _lsh_backend(device: str) -> str:
    """How method=lsh searches here: the fused C kernel (CPU; half precision scored in float32) or the tensor code."""
    from encoders.merging import lsh_native

    if not device.startswith("cpu"):
        return "tensor code"
    if lsh_native.backend() == "native":
        return f"C kernel ({lsh_native.variant()})"
    return f"tensor code ({lsh_native.reason()})"


def format_report(report: dict[str, Any]) -> str:
    head = (
        f"{report['model']} @ {report['image_size']}px ({report['tokens_in']} tokens), batch {report['batch_size']}, "
        f"{report['iters']} alternating rounds on {report['device']} ({report['device_name']}, {report['threads']} threads), "
        f"{report['precision']}, weights: {report['pretrained']}"
    )
    if any("method=lsh" in r["merge"] for r in report["rows"]):
        head += f", lsh search: {report.get('lsh_backend', '?')}"
    lines = [head, "", "| merge | images/s | speed-up | FLOP ratio | p50 ms | p95 ms | tokens after each block |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        toks = ",".join(str(t) for t in r["tokens"])
        short = f" (merged {r['shortfall']} fewer)" if r["shortfall"] else ""
        lines.append(
            f"| {r['merge']} | {r['images_per_s']:.2f} | {r['ratio']:.2f}x | {r['flop_ratio']:.2f}x | {r['p50_ms']:.1f} | "
            f"{r['p95_ms']:.1f} | {toks}{short} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - script entry: the same command as `cli.py bench`
    import sys

    from cli import app

    app(args=["bench", *sys.argv[1:]], prog_name="mergeseek")
