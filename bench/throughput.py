"""Images/s of merged vs unmerged encoders, timed alternately in one process.

    python cli.py bench --model ViT-B-16 --merge r=4 --merge r=8 --merge r=16

(``python -m bench.throughput ...`` is the same command; the options are defined in ``cli.py``,
the defaults in :class:`BenchConfig`.)

Prints, per config: images/s, the ratio to the unmerged model, the tokens after each block and the
FLOP ratio (the ideal speed-up). The unmerged baseline is the model as shipped (fused attention).
"""

from __future__ import annotations

import contextlib
import logging
import platform
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

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
    device_ms: Optional[float] = None  # CUDA-event time per batch (median), CUDA only
    kernels: Optional[int] = None  # GPU kernels launched per forward (CUDA) / aten ops (CPU)
    attention: str = ""  # attention kernel(s) the profiled forward ran
    compile_s: Optional[float] = None  # first (compiling) call, excluded from every other figure
    fallback: int = 0  # lsh: merged edges (max over blocks and images) from the fallback search


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
        compile: torch.compile every candidate, the unmerged one too (CUDA graphs on CUDA); the
            compile time is reported per row and kept out of every other figure.
        cuda_graph: replay every candidate's eager forward as a CUDA graph (no compiler; CUDA only,
            ``encoders.compile.GraphedTower``); the capture time is reported as ``compile_s``.
        cpu_time: time by the CPU time of the calling thread (one torch thread; CPU only), robust
            when other jobs share the machine.
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
    compile: Union[bool, str] = False  # True / "model": one graph; "blocks": each block alone
    cuda_graph: bool = False
    cpu_time: bool = False

    def __post_init__(self) -> None:
        from mergeseek.encoders import MergeConfig
        from mergeseek.errors import ConfigError

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
                          cfg.image_size, cfg.device, cfg.precision, progress=progress, compile=cfg.compile,
                          clock="cpu" if cfg.cpu_time else "wall", cuda_graph=cfg.cuda_graph)


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
    compile: Union[bool, str] = False,
    profile: bool = True,
    base: Any = None,
    clock: str = "wall",
    cuda_graph: bool = False,
) -> dict[str, Any]:
    """Time the unmerged model and each merge config alternately; returns a JSON-able report.

    Args:
        compile: torch.compile every candidate (``encoders.compile.CompiledTower``; CUDA graphs on
            CUDA): True / ``model`` or ``blocks`` (the scope); the first call's time is ``compile_s``
            and not part of any other figure.
        profile: also count kernels per forward and name the attention kernel (one extra forward
            per candidate under ``torch.profiler``).
        base: an ``Encoder`` to reuse (same model, device and precision; saves the load).
        clock: ``wall`` or ``cpu`` (CPU time of this thread; one torch thread is set).
        cuda_graph: replay each candidate's eager forward as a CUDA graph (CUDA only; ignored with
            ``compile``); the capture (first call) is ``compile_s``.
    """
    import torch

    from mergeseek.encoders import Encoder, MergeConfig, merge_stats, token_counts
    from mergeseek.encoders.patch import vit_shape
    from mergeseek.eval.candidates import merged_models
    from mergeseek.eval.timing import flop_ratio, time_alternating

    if clock == "cpu":
        torch.set_num_threads(1)
    if base is None and model_name == "hf-ast":  # transformers' AST, random weights (bench/hf_ast.py)
        from bench.hf_ast import ast_bench

        base = ast_bench(device, image_size)
    if base is None:
        base = Encoder(model_name, pretrained, device, precision, "none", batch_size, image_size_override=image_size)
    visual = base.model.visual
    configs = ["none"] + [str(MergeConfig.parse(m)) for m in merges if str(MergeConfig.parse(m)) != "none"]
    models = merged_models(visual, configs)
    pixels = base.sample(batch_size) if hasattr(base, "sample") else sample_pixels(batch_size, base.image_size, base.device)
    from mergeseek.runtime import autocast as _autocast

    autocast = _autocast(base.device, precision)
    callables = dict(models)
    compile_s: dict[str, Optional[float]] = {k: None for k in models}
    from mergeseek.encoders.compile import compile_scope

    compile = compile_scope(compile)  # None (off), "model" or "blocks"
    if compile:
        from mergeseek.encoders.compile import CompiledTower

        torch._dynamo.reset()
        callables = {k: CompiledTower(m, batch_size, base.device, scope=compile_scope(compile)) for k, m in models.items()}
    graphed = cuda_graph and not compile and base.device.startswith("cuda")
    if graphed:
        from mergeseek.encoders.compile import GraphedTower

        callables = {k: GraphedTower(m, batch_size, base.device) for k, m in models.items()}

    def runner(fn):
        def run():
            with autocast:
                return fn(pixels)

        return run

    with torch.inference_mode():
        for k, fn in callables.items():  # one forward each, for token counts (and the compile)
            runner(fn)()
            if compile or graphed:
                compile_s[k] = fn.compile_s
    if compile:
        log.warning("compile times (s): %s", ", ".join(f"{k}: {v:.1f}" for k, v in compile_s.items()))
    runs = {k: runner(fn) for k, fn in callables.items()}
    timings = time_alternating(runs, batch_size, warmup, iters, base.device, progress, clock=clock)
    device_ms = _device_times(runs, base.device, iters)
    profiled = {k: _profile(run, base.device) for k, run in runs.items()} if profile else {}
    base_tokens = token_counts(models["none"])
    width, mlp_ratio = vit_shape(visual)
    rows = []
    for name, model in models.items():
        tokens = token_counts(model)
        stats = merge_stats(model)
        t = timings[name]
        kernels, attention = profiled.get(name, (None, ""))
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
                device_ms=device_ms.get(name),
                kernels=kernels,
                attention=attention,
                compile_s=compile_s[name],
                fallback=max(stats.get("fallback_max", [0]) or [0]),
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
        "clock": clock,
        "compiled": bool(compile),
        "compile_scope": compile_scope(compile),
        "compile_mode": (("reduce-overhead" if base.device.startswith("cuda") else "default") if compile
                         else "eager + CUDA graph" if graphed else "eager"),
        "kernels_counted": "GPU kernels" if base.device.startswith("cuda") else "aten ops",
        "lsh_backend": _lsh_backend(base.device, compile),
        "torch": torch.__version__,
        "load_max": timings["none"].load_max,  # highest 1-minute load average during the timed rounds
        "cores": timings["none"].cores,
        "rows": [r.__dict__ | {"tokens": list(r.tokens)} for r in rows],
    }


def run_suite(
    model_name: str,
    merges: Sequence[str],
    batch_sizes: Sequence[int] = (8, 64, 256),
    precisions: Sequence[str] = ("fp16", "bf16"),
    iters: int = 20,
    warmup: int = 3,
    device: str = "auto",
    compile: bool = False,
    image_size: Optional[int] = None,
) -> list[dict[str, Any]]:
    """One report per (precision, batch size), loading the model once."""
    from mergeseek.encoders import Encoder

    base = Encoder(model_name, None, device, "fp32", "none", max(batch_sizes), image_size_override=image_size)
    out = []
    for precision in precisions:
        for bs in batch_sizes:
            rep = run_throughput(
                model_name, None, merges, bs, iters, warmup, image_size, base.device, precision,
                compile=compile, base=base,
            )
            log.info("%s", format_report(rep))
            out.append(rep)
    return out


def _device_times(runs: dict, device: str, iters: int) -> dict[str, float]:
    """Median CUDA-event time of one call per candidate (GPU time, launch gaps included)."""
    if not device.startswith("cuda"):
        return {}
    import statistics

    import torch

    out = {}
    with torch.inference_mode():
        for name, run in runs.items():
            times = []
            for _ in range(max(3, iters)):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            out[name] = statistics.median(times)
    return out


_ATTENTION_KERNELS = (  # substring of a profiler event name -> the SDPA backend it belongs to
    ("flash", "flash"),
    ("fmha", "mem-efficient"),
    ("efficient_attention", "mem-efficient"),
    ("cudnn_attention", "cudnn"),
    ("cudnn_sdpa", "cudnn"),
    ("_scaled_dot_product_attention_math", "math"),
    ("_native_multi_head_attention", "native MHA"),  # nn.MultiheadAttention's fast path (the shipped model)
)


def _profile(run, device: str) -> tuple:
    """(kernels per forward, attention kernel names) from one profiled forward.

    CUDA: GPU kernel launches. CPU: top-level aten ops (each one dispatch; the CPU's "kernel").
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with _quiet_native_stderr(not cuda), torch.inference_mode(), profile(activities=activities) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    if cuda:
        kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    else:
        kernels = sum(1 for e in events if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    backends = set()
    for e in events:
        low = e.name.lower()
        for key, backend in _ATTENTION_KERNELS:
            if key in low:
                backends.add(backend + (" (cpu)" if not cuda and "cpu" in low else ""))
    return kernels, ", ".join(sorted(backends))


@contextlib.contextmanager
def _quiet_native_stderr(quiet: bool = True):
    """Standard error closed at the file-descriptor level: on a machine without a GPU the
    profiler's native layer prints lines (kineto's ``USDT: ... profiler_start``, failed
    ``gpuGetDeviceCount`` probes) that say nothing about the run. Python's own warnings are
    flushed first and reach the terminal as before."""
    import os
    import sys

    if not quiet:
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no usable descriptor 2: nothing to hide
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _lsh_backend(device: str, compiled: bool = False) -> str:
    """How method=lsh searches here: the fused C kernel (eager CPU; half precision scored in float32) or the tensor code."""
    from mergeseek.encoders.merging import lsh_native

    if not device.startswith("cpu") or compiled:
        return "tensor code"
    if lsh_native.backend() == "native":
        return f"C kernel ({lsh_native.variant()})"
    return f"tensor code ({lsh_native.reason()})"


def format_report(report: dict[str, Any]) -> str:
    head = (
        f"{report['model']} @ {report['image_size']}{'px' if isinstance(report['image_size'], int) else ''} ({report['tokens_in']} tokens), batch {report['batch_size']}, "
        f"{report['iters']} alternating rounds on {report['device']} ({report['device_name']}, {report['threads']} threads), "
        f"{report['precision']}, {report.get('compile_mode', 'eager')}, weights: {report['pretrained']}"
    )
    if any("method=lsh" in r["merge"] for r in report["rows"]):
        head += f", lsh search: {report.get('lsh_backend', '?')}"
    cuda = report["device"].startswith("cuda")
    count = report.get("kernels_counted", "kernels")
    cols = ["merge", "images/s", "speed-up", "FLOP ratio", "p50 ms"] + (["device ms"] if cuda else []) + [
        "p95 ms", count, "attention", "compile s", "tokens after each block"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report["rows"]:
        toks = ",".join(str(t) for t in r["tokens"])
        short = f" (merged {r['shortfall']} fewer)" if r["shortfall"] else ""
        short += f" ({r['fallback']} fallback edges)" if r.get("fallback") else ""
        cells = [r["merge"], f"{r['images_per_s']:.2f}", f"{r['ratio']:.2f}x", f"{r['flop_ratio']:.2f}x", f"{r['p50_ms']:.1f}"]
        if cuda:
            cells.append("-" if r.get("device_ms") is None else f"{r['device_ms']:.2f}")
        cells += [
            f"{r['p95_ms']:.1f}",
            "-" if r.get("kernels") is None else str(r["kernels"]),
            r.get("attention") or "-",
            "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}",
            toks + short,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - script entry: the same command as `cli.py bench`
    import sys

    from mergeseek.cli import app

    app(args=["bench", *sys.argv[1:]], prog_name="mergeseek")
