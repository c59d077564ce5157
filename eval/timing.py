"""Timing protocol shared by ``cli.py eval`` and ``cli.py bench`` (see ../shared/DESIGN.md).

Candidates (the unmerged baseline and each merged variant) are timed *alternately, batch by
batch, in one process*: after a warm-up, every round runs one batch of each candidate, and the
order inside a round rotates so that no candidate is always first (first-after-another-model runs
see colder caches). Slow drift of the machine (thermal throttling, a neighbour process) then
hits all candidates alike instead of biasing whichever was timed last.

Peak memory:

* CUDA: ``torch.cuda.max_memory_allocated`` with the peak counter reset before each batch, so the
  number belongs to that candidate's forward (``mem_kind="cuda_max_allocated"``).
* CPU: the process resident-set high-water mark ``VmHWM`` from ``/proc/self/status``, reset before
  each batch by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), so it is the peak RSS
  *during that candidate's batches* (``mem_kind="rss_hwm"``). Where the reset is not allowed we
  fall back to ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the process-lifetime peak, which
  cannot tell candidates apart (``mem_kind="rss_lifetime_peak"``).

Both are process-wide peaks (they include every model's weights); ``act_mem_mb`` subtracts the
memory in use just before the batch, i.e. what the forward itself added (activations).

Memory is measured in a separate pass after the timed rounds (one batch per candidate), not
inside them: on CPU we first hand freed heap memory back to the OS (glibc ``malloc_trim``) so
the forward's allocations show up as new resident pages, and the page faults that causes must
not slow the timed batches.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

from mergeseek.errors import ConfigError

log = logging.getLogger(__name__)

_MB = 1024.0 * 1024.0


@dataclass(frozen=True)
class TimingResult:
    """Timing of one candidate under the alternating protocol.

    Args:
        name: candidate name (usually ``str(MergeConfig)``).
        images_per_s: batch_size / median batch time.
        ms_per_image: median batch time / batch_size, in milliseconds.
        p50_ms: median batch latency (ms).
        p95_ms: 95th-percentile batch latency (ms).
        batches: timed batches (after warm-up).
        batch_size: images per batch.
        peak_mem_mb: process-wide peak during one batch of this candidate (see module doc).
        act_mem_mb: that peak minus the memory in use just before the batch (activations).
        mem_kind: which memory counter produced the two numbers above.
        times_ms: every timed batch latency, in the order run.
        clock: ``wall`` (elapsed time) or ``cpu`` (CPU time of the calling thread).
    """

    name: str
    images_per_s: float
    ms_per_image: float
    p50_ms: float
    p95_ms: float
    batches: int
    batch_size: int
    peak_mem_mb: float
    act_mem_mb: float
    mem_kind: str
    times_ms: tuple[float, ...] = ()
    clock: str = "wall"
    load_max: Optional[float] = None  # highest 1-minute load average seen during the timed rounds
    cores: Optional[int] = None  # CPU cores of the machine, to read load_max against

    def speedup_over(self, base: "TimingResult") -> float:
        """Throughput ratio self / base (>1 means faster than ``base``)."""
        return self.images_per_s / base.images_per_s if base.images_per_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "images_per_s": self.images_per_s,
            "ms_per_image": self.ms_per_image,
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "batches": self.batches,
            "batch_size": self.batch_size,
            "peak_mem_mb": self.peak_mem_mb,
            "act_mem_mb": self.act_mem_mb,
            "mem_kind": self.mem_kind,
            "times_ms": list(self.times_ms),
            "clock": self.clock,
            "load_max": self.load_max,
            "cores": self.cores,
        }


def _load_average() -> Optional[float]:
    """The 1-minute load average (None where the platform has none)."""
    import os

    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def load_warning(load_max: Optional[float], cores: Optional[int], clock: str) -> Optional[str]:
    """One line when the machine was busier than its cores during a wall-clock run, else None."""
    if clock != "wall" or load_max is None or not cores or load_max <= cores:
        return None
    return (f"load average reached {load_max:.1f} on {cores} cores during the timed run: other jobs competed for the "
            "CPU, so wall-clock speeds are unreliable; rerun with --cpu-time (CPU time of one thread)")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) without numpy."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ---------------------------------------------------------------------------- memory probes
class _MemProbe:
    """Resets and reads a peak-memory counter around one batch."""

    kind = "none"

    def reset(self) -> float:
        """Reset the peak counter; return memory in use now (MB)."""
        return 0.0

    def peak(self) -> float:
        return float("nan")


class _CudaProbe(_MemProbe):
    kind = "cuda_max_allocated"

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)

    def reset(self) -> float:
        self.torch.cuda.reset_peak_memory_stats(self.device)
        return self.torch.cuda.memory_allocated(self.device) / _MB

    def peak(self) -> float:
        return self.torch.cuda.max_memory_allocated(self.device) / _MB


class _RssProbe(_MemProbe):
    """Peak RSS through /proc (resettable) or getrusage (lifetime peak)."""

    def __init__(self) -> None:
        self.resettable = _read_status_kb("VmHWM") is not None and _reset_hwm()
        self.kind = "rss_hwm" if self.resettable else "rss_lifetime_peak"

    def reset(self) -> float:
        if self.resettable:
            _reset_hwm()
        rss = _read_status_kb("VmRSS")
        return rss / 1024.0 if rss is not None else 0.0

    def peak(self) -> float:
        if self.resettable:
            hwm = _read_status_kb("VmHWM")
            if hwm is not None:
                return hwm / 1024.0
        import resource
        import sys

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is KiB on Linux, bytes on macOS.
        return maxrss / _MB if sys.platform == "darwin" else maxrss / 1024.0


def _read_status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _make_probe(device: str) -> _MemProbe:
    if device.startswith("cuda"):
        return _CudaProbe(device)
    return _RssProbe()


def _measure_memory(call: Callable[[], object], probe: _MemProbe, sync: Callable[[], None]) -> tuple[float, float]:
    """(peak MB, peak minus memory in use before) over one call of ``call``."""
    if isinstance(probe, _RssProbe):
        from mergeseek.runtime import release_freed_memory

        release_freed_memory()
    sync()
    before = probe.reset()
    call()
    sync()
    peak = probe.peak()
    return peak, max(peak - before, 0.0)


def _synchronizer(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        import torch

        dev = torch.device(device)
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


# ---------------------------------------------------------------------------- protocol
def alternate(candidates: Mapping[str, Callable[[], object]], iters: int, warmup: int = 0, clock: str = "wall",
              sync: Callable[[], None] = lambda: None, progress: bool = False) -> tuple[dict[str, list[float]], Optional[float]]:
    """The alternating protocol every speed figure uses: ``warmup`` untimed rounds, then ``iters``
    rounds that each run every candidate once, the order rotated by one each round (so no candidate
    always runs first, or right after the same neighbour). Returns (name -> milliseconds per call,
    the highest 1-minute load average seen, warned about when the machine was busy).

    ``clock``: ``wall`` (``time.perf_counter``) or ``cpu`` (``time.thread_time``, this thread's CPU
    time). ``sync`` brackets every call (a CUDA synchronize).
    """
    import os

    now = time.perf_counter if clock == "wall" else time.thread_time
    names = list(candidates)
    times: dict[str, list[float]] = {n: [] for n in names}
    loads = [_load_average()]
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    sync()
    rounds = range(iters)
    if progress:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, desc="timing", unit="round")
    for it in rounds:
        k = it % len(names)
        for name in names[k:] + names[:k]:
            sync()
            t0 = now()
            candidates[name]()
            sync()
            times[name].append((now() - t0) * 1000.0)
        loads.append(_load_average())
    seen = [v for v in loads if v is not None]
    load_max = max(seen) if seen else None
    warning = load_warning(load_max, os.cpu_count(), clock)
    if warning:
        log.warning("%s", warning)
    return times, load_max


def time_alternating(
    candidates: Mapping[str, Callable[[], object]],
    batch_size: int,
    warmup: int = 2,
    iters: int = 10,
    device: str = "cpu",
    progress: bool = False,
    clock: str = "wall",
) -> dict[str, TimingResult]:
    """Time each candidate's one-batch callable, alternating batch by batch.

    Args:
        candidates: name -> a callable that runs one forward on a prepared batch of
            ``batch_size`` images (inputs already on ``device``, so only the forward is timed).
        batch_size: images per call (for images/s and ms/image).
        warmup: untimed calls of each candidate first (allocator, kernel selection, caches).
        iters: timed rounds; every round runs each candidate once, in a rotated order.
        device: ``cpu`` or ``cuda[:N]``; on CUDA every call is bracketed by synchronize.
        progress: show a tqdm bar over rounds (CLI edge only).
        clock: ``wall`` (``time.perf_counter``, the protocol's default) or ``cpu``
            (``time.thread_time``: CPU time of this thread only; with ``torch.set_num_threads(1)``
            the forward runs in this thread, so the figure counts only the candidate's own work
            and is robust to other processes on a shared machine). CPU devices only.

    Returns:
        name -> :class:`TimingResult`, in the order of ``candidates``.
    """
    if not candidates:
        raise ConfigError("time_alternating needs at least one candidate")
    if batch_size < 1 or iters < 1 or warmup < 0:
        raise ConfigError(
            f"timing needs batch_size >= 1, iters >= 1, warmup >= 0; got batch_size={batch_size}, "
            f"iters={iters}, warmup={warmup}"
        )
    if clock not in ("wall", "cpu"):
        raise ConfigError(f"timing clock={clock!r} is not valid; choose wall or cpu")
    if clock == "cpu" and device.startswith("cuda"):
        raise ConfigError("timing clock=cpu measures CPU work and cannot time a CUDA device; use clock=wall")
    import os

    import torch

    names = list(candidates)
    sync = _synchronizer(device)
    probe = _make_probe(device)
    peaks: dict[str, float] = {n: 0.0 for n in names}
    acts: dict[str, float] = {n: 0.0 for n in names}
    with torch.inference_mode():
        times, load_max = alternate(candidates, iters, warmup, clock, sync, progress)
        for name in names:
            peaks[name], acts[name] = _measure_memory(candidates[name], probe, sync)
    cores = os.cpu_count()
    out = {}
    for name in names:
        ts = times[name]
        med = statistics.median(ts)
        out[name] = TimingResult(
            name=name,
            images_per_s=batch_size / (med / 1000.0) if med > 0 else float("inf"),
            ms_per_image=med / batch_size,
            p50_ms=med,
            p95_ms=percentile(ts, 95.0),
            batches=len(ts),
            batch_size=batch_size,
            peak_mem_mb=peaks[name],
            act_mem_mb=acts[name],
            mem_kind=probe.kind,
            times_ms=tuple(ts),
            clock=clock,
            load_max=load_max,
            cores=cores,
        )
        log.info("%s: %.1f img/s, p50 %.1f ms, p95 %.1f ms", name, out[name].images_per_s, med, out[name].p95_ms)
    return out


# ---------------------------------------------------------------------------- FLOPs
def block_macs(n_in: int, n_out: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """Multiply-accumulates of one pre-norm transformer block.

    Token merging sits between attention and MLP (ToMe), so attention (qkv and output
    projections, 4*N*d^2; scores and weighted sum, 2*N^2*d) sees ``n_in`` tokens and the MLP
    (2*mlp_ratio*N*d^2) sees ``n_out``. Norms, softmax and the merge itself are ignored:
    they are O(N*d) and this is the *ideal* cost.
    """
    attn = 4.0 * n_in * dim * dim + 2.0 * n_in * n_in * dim
    mlp = 2.0 * mlp_ratio * n_out * dim * dim
    return attn + mlp


def encoder_macs(token_counts: Sequence[int], dim: int, mlp_ratio: float = 4.0, num_tokens: Optional[int] = None) -> float:
    """MACs of all blocks given the tokens *after* each block (as ``encoders.token_counts`` gives).

    Args:
        token_counts: tokens leaving each block.
        dim: embedding width.
        mlp_ratio: MLP hidden width / dim.
        num_tokens: tokens entering block 0; defaults to ``token_counts[0]`` (right for an
            unmerged model, whose counts are all equal).
    """
    if not token_counts:
        raise ConfigError("encoder_macs needs the per-block token counts of at least one block")
    n_in = int(num_tokens if num_tokens is not None else token_counts[0])
    total = 0.0
    for n_out in token_counts:
        total += block_macs(n_in, int(n_out), dim, mlp_ratio)
        n_in = int(n_out)
    return total


def flop_ratio(
    token_counts_merged: Sequence[int],
    token_counts_base: Sequence[int],
    dim: int,
    mlp_ratio: float = 4.0,
    num_tokens: Optional[int] = None,
) -> float:
    """Block FLOPs of the base model / block FLOPs of the merged one: the ideal speed-up.

    Both lists are tokens after each block; ``num_tokens`` (tokens entering block 0, the same for
    both) defaults to ``token_counts_base[0]``.
    """
    if len(token_counts_merged) != len(token_counts_base):
        raise ConfigError(
            f"flop_ratio needs one count per block for both models; got {len(token_counts_merged)} merged "
            f"and {len(token_counts_base)} base"
        )
    n0 = num_tokens if num_tokens is not None else int(token_counts_base[0])
    base = encoder_macs(token_counts_base, dim, mlp_ratio, n0)
    merged = encoder_macs(token_counts_merged, dim, mlp_ratio, n0)
    return base / merged if merged > 0 else float("inf")
