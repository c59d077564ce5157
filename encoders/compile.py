"""torch.compile of an image tower with fixed batch shapes.

Merged and unmerged towers are compiled the same way, so a comparison stays fair. Every method's
merged forward has static shapes and no host read (``tests/test_compile.py``), so the tower
compiles into one graph; on CUDA ``mode="reduce-overhead"`` replays it as a CUDA graph (the eager
merged forward launches ~30 small kernels per block, which is what makes it slow there).

A compiled graph is specialised to its input shape: :class:`CompiledTower` pads a short batch
(the last one of a run) to the batch size it was built for, so nothing recompiles, and records
the compile time (the first call) apart from the steady-state calls.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

log = logging.getLogger(__name__)


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
    """

    def __init__(self, module: Any, batch_size: int, device: str = "cpu", mode: Optional[str] = None) -> None:
        import torch

        self.module = module
        self.batch_size = int(batch_size)
        self.mode = mode or compile_mode(device)
        self.fn = torch.compile(module, mode=self.mode, dynamic=False, fullgraph=False)
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
            out = self._run(pixels)
            if pixels.is_cuda:
                torch.cuda.synchronize(pixels.device)
            self.compile_s = time.perf_counter() - t0
            log.warning("compiled the image tower (%s, batch %d) in %.1f s", self.mode, self.batch_size, self.compile_s)
        else:
            out = self._run(pixels)
        return tuple(o[:n] for o in out) if isinstance(out, tuple) else out[:n]

    def _run(self, pixels: Any) -> Any:
        import torch

        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        out = self.fn(pixels)
        if self.mode != "reduce-overhead":
            return out
        # CUDA-graph outputs live in a pool the next replay overwrites: hand out a copy.
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()
