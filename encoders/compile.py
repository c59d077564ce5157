"""torch.compile of an image tower with fixed batch shapes, and CUDA-graph replay of the eager tower.

Merged and unmerged towers are compiled the same way, so a comparison stays fair. Every method's
merged forward has static shapes and no host read (``tests/test_compile.py``), so the tower
compiles into one graph; on CUDA ``mode="reduce-overhead"`` replays it as a CUDA graph (the eager
merged forward launches ~30 small kernels per block, which is what makes it slow there).

A compiled graph is specialised to its input shape: :class:`CompiledTower` pads a short batch
(the last one of a run) to the batch size it was built for, so nothing recompiles, and records
the compile time (the first call) apart from the steady-state calls.

Two scopes (``--compile-scope``): ``model`` traces the whole tower into one graph; ``blocks``
compiles each transformer block alone and leaves the glue between blocks eager. The blocks share
their compiled programs (the token count becomes a dynamic dimension after two), so a merged tower
compiles in under half the time it takes whole: a merged ViT-B-16 is a 900-node graph against 337
unmerged, 2,425 with lsh; compiled whole it took 4.1x the unmerged tower's CPU time, by blocks 1.8x
(docs/BENCHMARKS.md, "Compile time").
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)


SCOPES = ("model", "blocks")


def compile_scope(value: Any) -> Optional[str]:
    """``compile`` as the options give it -> None (off), ``model`` or ``blocks``: False/None is off,
    True is ``model``; any other value is refused naming the valid ones."""
    if value is None or value is False:
        return None
    if value is True:
        return "model"
    scope = str(value).strip().lower()
    if scope not in SCOPES:
        from mergeseek.errors import ConfigError

        raise ConfigError(f"--compile-scope {value!r} is not valid; choose one of: {', '.join(SCOPES)}")
    return scope


MAX_DAMAGED_KERNELS = 256  # one compile of a large tower builds a few dozen kernels
_DAMAGED = re.compile(r"(/\S+\.so): (?:file too short|invalid ELF header|file truncated)")


def drop_damaged_kernel(exc: BaseException) -> bool:
    """Remove the compiled kernel ``exc`` (or an exception behind it) says is damaged, when it lies
    in a torch inductor cache; True if one was removed."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        found = _DAMAGED.search(str(exc))
        if found:
            path = Path(found.group(1))
            cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
            in_cache = any(p.name.startswith("torchinductor") for p in path.parents) or (
                cache and Path(cache) in path.parents)
            if in_cache and path.is_file():
                log.warning("removing %s, a compiled kernel an interrupted compile left damaged (%s); compiling "
                            "it again", path, found.group(0).split(": ", 1)[1])
                path.unlink()
                return True
            return False
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__
    return False


def _compile(fn: Any, mode: str, backend: Optional[str], **kw) -> Any:
    import torch

    if backend in (None, "inductor"):
        return torch.compile(fn, mode=mode, **kw)
    return torch.compile(fn, backend=backend, **kw)  # a mode is inductor's only


def compile_blocks(module: Any, mode: str, backend: Optional[str] = None) -> int:
    """Compile every transformer block of ``module`` on its own, in place; returns how many.

    A patched (merging) block is called through ``merged_forward`` and that is what is compiled;
    an unpatched block through its ``__call__`` (``nn.Module.compile``). ``dynamic=None``: the first
    two token counts compile as they are, the third with the count dynamic, and every later block
    reuses that program. ``r`` is a constant of the program: a per-block ``r``
    list compiles one per distinct ``r`` (still at most one per block)."""
    import torch

    from mergeseek.encoders.family import vit_family

    blocks = vit_family(module, use="--compile-scope blocks").blocks
    # The blocks of every compiled tower in the process (an eval sweep compiles one per config) add
    # entries to the cache of the same code: 2-3 per tower, one per block in the worst case. Past
    # the limit dynamo would run the rest eager without a word, so it is raised, never lowered.
    limit = max(int(getattr(torch._dynamo.config, "recompile_limit", 8)), 64, 2 * len(blocks) + 4)
    torch._dynamo.config.recompile_limit = limit
    for block in blocks:
        if hasattr(block, "merged_forward"):
            block.merged_forward = _compile(block.merged_forward, mode, backend, dynamic=None)
        else:  # what nn.Module.compile does, with the same choice of backend
            block.forward = _compile(block.forward, mode, backend, dynamic=None)
    return len(blocks)


def compile_mode(device: str) -> str:
    """``reduce-overhead`` (CUDA graphs) on CUDA, inductor's default elsewhere."""
    return "reduce-overhead" if str(device).startswith("cuda") else "default"


class CompiledTower:
    """A compiled module called with batches padded to ``batch_size``.

    Args:
        module: the image tower (open_clip ``VisionTransformer``, merged or not; a timm ViT).
        batch_size: the batch every call is padded to (larger batches are split).
        device: where it runs (picks the compile mode).
        mode: torch.compile mode (None: :func:`compile_mode`).
        scope: ``model`` (one graph) or ``blocks`` (:func:`compile_blocks`; the module is changed
            in place).
        backend: torch.compile's backend (None: inductor; the tests trace with ``aot_eager``).
    """

    def __init__(self, module: Any, batch_size: int, device: str = "cpu", mode: Optional[str] = None,
                 scope: str = "model", backend: Optional[str] = None) -> None:
        self.module = module
        self.batch_size = int(batch_size)
        self.mode = mode or compile_mode(device)
        self.scope = compile_scope(scope) or "model"
        if self.scope == "model":
            self.fn = _compile(module, self.mode, backend, dynamic=False, fullgraph=False)
        else:
            compile_blocks(module, self.mode, backend)
            self.fn = module
        self.compile_s: Optional[float] = None  # wall time of the first (compiling) call

    def __call__(self, pixels: Any) -> Any:
        import torch

        n = int(pixels.shape[0])
        if n > self.batch_size:
            return torch.cat([self(pixels[i : i + self.batch_size]) for i in range(0, n, self.batch_size)])
        # Pad with copies of the last image: same shape, nothing recompiles. Full batches are copied
        # too, so every input is made under the caller's grad mode (an inference tensor inside
        # inference_mode): a tensor made outside would fail the graph's guards and recompile it.
        pad = pixels[-1:].expand(self.batch_size - n, *pixels.shape[1:])
        pixels = torch.cat([pixels, pad])
        if self.compile_s is None:
            t0 = time.perf_counter()
            out = self._first_run(pixels)
            if pixels.is_cuda:
                torch.cuda.synchronize(pixels.device)
            self.compile_s = time.perf_counter() - t0
            log.warning("compiled the image tower (%s, scope %s, batch %d) in %.1f s", self.mode, self.scope,
                        self.batch_size, self.compile_s)
        else:
            out = self._run(pixels)
        return tuple(o[:n] for o in out) if isinstance(out, tuple) else out[:n]

    def _first_run(self, pixels: Any) -> Any:
        """The compiling call. A kernel that an interrupted compile left damaged in inductor's cache
        (a ``.so`` cut short: "file too short") would fail every later run of every tower that
        needs it; it is removed, with a warning, and compiled again."""
        for _ in range(MAX_DAMAGED_KERNELS):
            try:
                return self._run(pixels)
            except Exception as exc:  # BackendCompilerFailed wrapping the loader's ImportError
                if not drop_damaged_kernel(exc):
                    raise
        return self._run(pixels)

    def _run(self, pixels: Any) -> Any:
        import torch

        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        out = self.fn(pixels)
        if self.mode != "reduce-overhead":
            return out
        # CUDA-graph outputs live in a pool the next replay overwrites: hand out a copy.
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()


class GraphedTower:
    """The eager tower (merged or not) replayed as a CUDA graph: no compiler, no compile time.

    The merged forward has static shapes and no host read (``tests/test_compile.py``), so one
    eager forward can be captured as it is and replayed: the ~40-50 small ops of each merging block
    then cost one graph launch instead of one dispatch each, which is what makes the eager merged
    forward slow on a GPU. Capture takes about three forwards (two warm-ups on a side stream, one
    captured); autocast runs with its weight-cast cache off inside the graph (cached casts made
    during capture would be freed when autocast exits). Batches are padded to ``batch_size`` as in
    :class:`CompiledTower`; off CUDA the module is called as it is.

    Args:
        module: the image tower.
        batch_size: the batch every call is padded to (larger batches are split).
        device: where it runs.
        warmup: eager calls on a side stream before the capture.
    """

    def __init__(self, module: Any, batch_size: int, device: str = "cuda", warmup: int = 2) -> None:
        self.module = module
        self.batch_size = int(batch_size)
        self.device = str(device)
        self.warmup = int(warmup)
        self.compile_s: Optional[float] = None  # wall time of the first call (warm-up + capture)
        self._graph = None
        self._static_in = None
        self._static_out = None
        self._key = None  # (dtype, autocast dtype) the graph was captured for

    def __call__(self, pixels: Any) -> Any:
        import torch

        if not pixels.is_cuda:
            return self.module(pixels)
        n = int(pixels.shape[0])
        if n > self.batch_size:
            return torch.cat([self(pixels[i : i + self.batch_size]) for i in range(0, n, self.batch_size)])
        key = (pixels.dtype, torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None,
               tuple(pixels.shape[1:]))
        if self._graph is None or key != self._key:
            t0 = time.perf_counter()
            self._capture(pixels, key)
            torch.cuda.synchronize(pixels.device)
            if self.compile_s is None:
                self.compile_s = time.perf_counter() - t0
                log.info("captured the image tower as a CUDA graph (batch %d) in %.2f s", self.batch_size, self.compile_s)
        self._static_in[:n].copy_(pixels)
        if n < self.batch_size:  # pad with copies of the last image (its rows are dropped)
            self._static_in[n:].copy_(pixels[-1:].expand(self.batch_size - n, *pixels.shape[1:]))
        self._graph.replay()
        out = self._static_out
        # the next replay overwrites the graph's output: hand out a copy
        return tuple(o[:n].clone() for o in out) if isinstance(out, tuple) else out[:n].clone()

    def _capture(self, pixels: Any, key: tuple) -> None:
        import contextlib

        import torch

        self._graph = self._static_in = self._static_out = None
        static_in = torch.empty((self.batch_size, *pixels.shape[1:]), dtype=pixels.dtype, device=pixels.device)
        static_in.copy_(pixels[-1:].expand_as(static_in))
        static_in[: pixels.shape[0]].copy_(pixels)
        amp = key[1]
        autocast = (torch.autocast("cuda", dtype=amp, cache_enabled=False) if amp is not None
                    else contextlib.nullcontext())
        side = torch.cuda.Stream(device=pixels.device)
        side.wait_stream(torch.cuda.current_stream(pixels.device))
        with torch.cuda.stream(side), autocast:
            for _ in range(self.warmup):  # allocator, kernel selection, lazily built constants
                self.module(static_in)
        torch.cuda.current_stream(pixels.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), autocast:
            static_out = self.module(static_in)
        self._graph, self._static_in, self._static_out, self._key = graph, static_in, static_out, key
