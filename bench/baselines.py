"""Efficient-architecture baselines next to merged ViTs: images/s, FLOPs and agreement.

    .venv/bin/python -m bench.baselines --arch small --img-size 224 --batch-size 8 --iters 5 \
        --out bench_baselines.json

Candidates, all at the same width / depth / heads / patch size and random weights:

* ``vit``: timm ``VisionTransformer`` as shipped (fused attention): the baseline.
* ``vit + <merge>``: weight-sharing copies of it with each merge config (bipartite, lsh,
  importance, zerotprune), all at the same token budget (``r=8`` removes the same tokens per
  block for every method, so their token counts match exactly).
* ``tnt``: timm's Transformer-in-Transformer (arXiv 2103.00112) with the same outer width, depth
  and heads (TNT-S when ``--arch small``).
* ``slab`` / ``slab-fused``: the SLAB-style ViT (:mod:`encoders.slab`), with RepBN as a module and
  folded into the next linear layers (its inference form).

Everything is timed alternately, batch by batch, in one process (``eval.timing.time_alternating``).
FLOPs are counted by ``torch.utils.flop_counter`` on one image (plus a formula for the CPU
fused-attention kernel, which it lacks), so they include the extra attention-probability
computation that the importance methods need at their merging layers.
Agreement (cosine of the pooled pre-logits features and top-1 agreement of the logits, merged vs
unmerged on the same photos) applies to the merged ViTs only; with random weights it measures
fidelity to the unmerged model, not accuracy.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

ARCHS = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
DEFAULT_MERGES = ("r=8", "r=8,method=lsh", "r=8,method=importance", "r=8,method=zerotprune")


@dataclass(frozen=True)
class BaselineConfig:
    """What :func:`run_baselines` builds and how it times it.

    Args:
        arch: ``tiny`` / ``small`` / ``base``: width and heads of every candidate (depth 12, patch 16).
        img_size: input side.
        depth: blocks of every candidate.
        batch_size: images per timed forward.
        warmup: untimed rounds.
        iters: timed rounds (each candidate once per round, rotated order).
        merges: merge configs applied to the ViT.
        tnt: include TNT.
        slab: include the SLAB-style ViT (plain and norm-fused).
        device: ``cpu`` or ``cuda``.
        precision: ``fp32``, or ``fp16`` / ``bf16`` autocast around every forward.
        cpu_time: also measure single-thread CPU time per image (CPU only; see
            :func:`time_cpu_alternating`), a figure that survives a machine shared with other jobs.
        seed: weight initialisation seed.
    """

    arch: str = "small"
    img_size: int = 224
    depth: int = 12
    batch_size: int = 8
    warmup: int = 1
    iters: int = 5
    merges: tuple = DEFAULT_MERGES
    tnt: bool = True
    slab: bool = True
    device: str = "cpu"
    precision: str = "fp32"
    cpu_time: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        from mergeseek.errors import ConfigError

        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"precision={self.precision!r} is not valid; choose one of: fp32, fp16, bf16")
        if self.arch not in ARCHS:
            raise ConfigError(f"arch={self.arch!r} is not valid; choose one of: {', '.join(ARCHS)}")
        if self.img_size % 16:
            raise ConfigError(f"img_size={self.img_size} is not a multiple of the patch size 16")


@dataclass(frozen=True)
class BaselineRow:
    """One candidate: speed, cost and (merged ViTs only) agreement with the unmerged ViT."""

    name: str
    kind: str  # "vit", "merged", "tnt", "slab"
    images_per_s: float
    ratio: float  # images/s over the unmerged ViT's
    gflops: float  # per image, counted
    params_m: float
    tokens_out: Optional[int] = None  # tokens after the last block
    cpu_ms: Optional[float] = None  # median single-thread CPU time per image
    cpu_ratio: Optional[float] = None  # unmerged ViT's cpu_ms / this one's (>1: cheaper)
    cosine: Optional[float] = None
    top1_agree: Optional[float] = None


@dataclass(frozen=True)
class BaselineReport:
    config: BaselineConfig
    rows: tuple
    environment: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"config": asdict(self.config), "rows": [asdict(r) for r in self.rows], "environment": self.environment}

    def markdown(self) -> str:
        cpu = any(r.cpu_ms is not None for r in self.rows)
        head = "| candidate | img/s | ratio |" + (" CPU ms/img (1 thread) | CPU ratio |" if cpu else "")
        lines = [
            head + " GFLOPs/img | params (M) | tokens out | cosine | top-1 agree |",
            "|---|---:|---:|" + ("---:|---:|" if cpu else "") + "---:|---:|---:|---:|---:|",
        ]

        def opt(v, fmt):
            return "–" if v is None else format(v, fmt)

        for r in self.rows:
            cpu_cols = f" {opt(r.cpu_ms, '.1f')} | {opt(r.cpu_ratio, '.2f')} |" if cpu else ""
            lines.append(
                f"| {r.name} | {r.images_per_s:.1f} | {r.ratio:.2f} |{cpu_cols} {r.gflops:.2f} | {r.params_m:.1f} | "
                f"{opt(r.tokens_out, 'd')} | {opt(r.cosine, '.4f')} | {opt(r.top1_agree, '.2f')} |"
            )
        return "\n".join(lines)


def build_models(cfg: BaselineConfig) -> dict[str, tuple[str, Any]]:
    """name -> (kind, eval-mode module) for every candidate."""
    import timm
    import torch

    from mergeseek.encoders.slab import create_slab_vit, fuse_norms
    from mergeseek.eval.candidates import merged_models

    dim, heads = ARCHS[cfg.arch]
    common = dict(img_size=cfg.img_size, patch_size=16, embed_dim=dim, depth=cfg.depth, num_heads=heads)
    torch.manual_seed(cfg.seed)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, **common).eval()
    out: dict[str, tuple[str, Any]] = {"vit": ("vit", vit)}
    for name, model in merged_models(vit, list(cfg.merges)).items():
        if name != "none":
            out[f"vit {name}"] = ("merged", model)
    if cfg.tnt:
        torch.manual_seed(cfg.seed)
        tnt = timm.create_model(
            "tnt_s_patch16_224", pretrained=False, img_size=cfg.img_size, embed_dim=dim, inner_dim=dim // 16,
            depth=cfg.depth, num_heads_outer=heads,
        )
        out["tnt"] = ("tnt", tnt.eval())
    if cfg.slab:
        torch.manual_seed(cfg.seed)
        slab = create_slab_vit(**common).eval()
        out["slab"] = ("slab", slab)
        fused = create_slab_vit(**common).eval()
        fused.load_state_dict(slab.state_dict())
        out["slab-fused"] = ("slab", fuse_norms(fused))
    return {k: (kind, m.to(cfg.device)) for k, (kind, m) in out.items()}


def _sdpa_flops(q_shape, k_shape, v_shape, *_: Any, out_shape=None, **__: Any) -> int:
    """Q K^T and (probabilities) V of one fused attention call: 2 FLOPs per multiply-add."""
    b, h, nq, d = q_shape
    return 2 * b * h * nq * k_shape[-2] * (d + v_shape[-1])


def count_gflops(model: Any, pixels) -> float:
    """GFLOPs of one forward per image, as counted by ``torch.utils.flop_counter``.

    The counter has no formula for the CPU flash-attention kernel that fused attention uses on
    CPU, so one is added here; without it the unmerged ViT's attention would count as free.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        mapping[cpu_flash] = _sdpa_flops
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with torch.no_grad(), counter:
        model(pixels)
    return counter.get_total_flops() / 1e9 / pixels.shape[0]


def agreement(model: Any, base: Any, pixels) -> tuple[float, float]:
    """(mean cosine of pooled pre-logits features, fraction of equal top-1 logits) vs ``base``."""
    import torch
    import torch.nn.functional as F

    # The ViTs here pool the class token, which merging keeps at index 0, so timm's own
    # forward_head reads the right token from the merged sequence.
    with torch.inference_mode():
        fa = model.forward_head(model.forward_features(pixels), pre_logits=True)
        fb = base.forward_head(base.forward_features(pixels), pre_logits=True)
        cos = F.cosine_similarity(fa.float(), fb.float(), dim=-1).mean().item()
        top = (model(pixels).argmax(-1) == base(pixels).argmax(-1)).float().mean().item()
    return cos, top


def time_cpu_alternating(candidates: dict, batch_size: int, warmup: int = 1, iters: int = 5) -> dict[str, float]:
    """Median CPU time per image (ms) of each one-batch callable, one torch thread, alternating.

    Wall-clock time on a machine shared with other jobs measures the neighbours as much as the
    model. With one intra-op thread the whole forward runs on the calling thread, so that
    thread's CPU time (``time.thread_time``) counts only the work this candidate did; it still
    includes cache and frequency effects, but no time spent waiting for a core.
    """
    import statistics
    import time

    import torch

    names = list(candidates)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {n: [] for n in names}
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                for n in names:
                    candidates[n]()
            for it in range(iters):
                k = it % len(names)
                for n in names[k:] + names[:k]:
                    t0 = time.thread_time()
                    candidates[n]()
                    times[n].append((time.thread_time() - t0) * 1000.0 / batch_size)
    finally:
        torch.set_num_threads(before)
    return {n: statistics.median(ts) for n, ts in times.items()}


def run_baselines(cfg: BaselineConfig, progress: bool = False) -> BaselineReport:
    """Build, count, check agreement and time every candidate; returns the report."""
    import platform

    import torch

    from bench.throughput import sample_pixels
    from mergeseek.encoders import token_counts
    from mergeseek.eval.timing import time_alternating

    models = build_models(cfg)
    pixels = sample_pixels(cfg.batch_size, cfg.img_size, cfg.device)
    photos = sample_pixels(4, cfg.img_size, cfg.device)
    base = models["vit"][1]
    info: dict[str, dict] = {}
    for name, (kind, m) in models.items():
        row: dict[str, Any] = {"kind": kind, "params_m": sum(p.numel() for p in m.parameters()) / 1e6}
        row["gflops"] = count_gflops(m, pixels[:1])
        if kind in ("vit", "merged"):
            row["tokens_out"] = int(token_counts(m)[-1])
        if kind == "merged":
            row["cosine"], row["top1_agree"] = agreement(m, base, photos)
        info[name] = row
        log.info("%s: %.2f GFLOPs/img", name, row["gflops"])

    amp = None if cfg.precision == "fp32" else getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[cfg.precision])

    def call(m):
        if amp is None:
            return lambda: m(pixels)

        def run():
            with torch.autocast(torch.device(cfg.device).type, dtype=amp):
                return m(pixels)

        return run

    timing = time_alternating({n: call(m) for n, (_, m) in models.items()}, cfg.batch_size, cfg.warmup, cfg.iters,
                              cfg.device, progress)
    if cfg.cpu_time and cfg.device == "cpu":
        cpu = time_cpu_alternating({n: call(m) for n, (_, m) in models.items()}, cfg.batch_size, cfg.warmup, cfg.iters)
        for n in models:
            info[n]["cpu_ms"], info[n]["cpu_ratio"] = cpu[n], cpu["vit"] / cpu[n]
    base_ips = timing["vit"].images_per_s
    rows = tuple(
        BaselineRow(name=n, images_per_s=timing[n].images_per_s, ratio=timing[n].images_per_s / base_ips, **info[n])
        for n in models
    )
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
           "processor": platform.processor() or platform.platform()}
    return BaselineReport(config=cfg, rows=rows, environment=env)


def main(argv: Optional[Sequence[str]] = None) -> None:
    import argparse
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m bench.baselines", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="small", choices=list(ARCHS))
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--merge", action="append", help="merge config (repeatable); default: r=8 with every method")
    p.add_argument("--no-tnt", action="store_true")
    p.add_argument("--no-slab", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--cpu-time", action="store_true", help="also time single-thread CPU time per image (CPU only)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = BaselineConfig(
        arch=a.arch, img_size=a.img_size, depth=a.depth, batch_size=a.batch_size, warmup=a.warmup, iters=a.iters,
        merges=tuple(a.merge) if a.merge else DEFAULT_MERGES, tnt=not a.no_tnt, slab=not a.no_slab, device=a.device,
        precision=a.precision, cpu_time=a.cpu_time,
    )
    report = run_baselines(cfg, progress=True)
    print(report.markdown())
    if a.out:
        from mergeseek.runtime import atomic_write

        atomic_write(a.out, json.dumps(report.to_dict(), indent=1))


if __name__ == "__main__":
    main()
