"""Compile time of an image tower, whole (``--compile-scope model``) or block by block (``blocks``).

One fresh process per configuration (a fresh inductor cache each, so nothing is reused), one
torch thread and one compile worker; prints one JSON line per configuration: the CPU seconds of
the compiling first call (this process and its compile workers), its wall seconds, the graphs
dynamo made, and the steady-state CPU seconds of a forward after it.

    python -m bench.compile_time --model ViT-B-16 --merge none --merge r=8 --scope model --scope blocks
    python -m bench.compile_time --speed --rounds 4     # eager / whole / blocks forwards alternated in one process
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def measure(model_name: str, merge: str, scope: str, batch: int, side: int | None) -> dict:
    """In this process: build, compile (first call) and time one more call."""
    import resource
    import time

    import torch

    from mergeseek.encoders import apply_merging
    from mergeseek.encoders.compile import CompiledTower
    from mergeseek.encoders.encoder import load_open_clip

    torch.set_num_threads(1)
    model, _, _ = load_open_clip(model_name, None, "cpu", side)
    visual = model.visual.eval()
    if merge != "none":
        apply_merging(visual, merge)
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    tower = CompiledTower(visual, batch, "cpu", scope=scope)
    from torch._dynamo.utils import counters

    c0, w0 = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        tower(x)
    compile_cpu, compile_wall = time.process_time() - c0, time.perf_counter() - w0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    c1 = time.process_time()
    with torch.inference_mode():
        tower(x)
    return {"model": model_name, "merge": merge, "scope": scope, "batch": batch,
            "compile_cpu_s": round(compile_cpu + children.ru_utime + children.ru_stime, 1),
            "compile_wall_s": round(compile_wall, 1), "graphs": int(counters["stats"]["unique_graphs"]),
            "forward_cpu_s": round(time.process_time() - c1, 3), "torch": torch.__version__}


def speed(model_name: str, merges: list, batch: int, rounds: int) -> list:
    """Steady-state CPU seconds a forward of each (merge, eager | model | blocks), the configurations
    alternated round by round in this process after each one's compiling call; one torch thread."""
    import statistics
    import time

    import torch

    from mergeseek.encoders import apply_merging
    from mergeseek.encoders.compile import CompiledTower
    from mergeseek.encoders.encoder import load_open_clip

    torch.set_num_threads(1)
    runs = {}
    for merge in merges:
        for scope in ("eager", "model", "blocks"):
            visual = load_open_clip(model_name, None, "cpu")[0].visual.eval()
            if merge != "none":
                apply_merging(visual, merge)
            runs[(merge, scope)] = visual if scope == "eager" else CompiledTower(visual, batch, "cpu", scope=scope)
    size = next(iter(runs.values()))
    side = 224 if not hasattr(size, "image_size") else (size.image_size if isinstance(size.image_size, int)
                                                      else size.image_size[0])
    x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(0))
    times: dict = {k: [] for k in runs}
    with torch.inference_mode():
        for fn in runs.values():
            fn(x)  # compiles
        for _ in range(rounds):
            for k, fn in runs.items():
                t0 = time.process_time()
                fn(x)
                times[k].append(time.process_time() - t0)
    return [{"merge": m, "scope": s, "forward_cpu_s": round(statistics.median(v), 3), "rounds": rounds, "batch": batch}
            for (m, s), v in times.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-16", help="open_clip model (random weights).")
    ap.add_argument("--merge", action="append", help="merge configs (repeatable; default: none and r=8).")
    ap.add_argument("--scope", action="append", help="model and/or blocks (repeatable; default both).")
    ap.add_argument("--batch-size", type=int, default=2, help="batch of the compiled forward (default 2).")
    ap.add_argument("--image-size", type=int, default=None, help="input side override.")
    ap.add_argument("--speed", action="store_true", help="time the forwards instead (eager, model, blocks alternated).")
    ap.add_argument("--rounds", type=int, default=4, help="with --speed: timed rounds (default 4).")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    merges, scopes = args.merge or ["none", "r=8"], args.scope or ["model", "blocks"]
    if args.speed:
        for row in speed(args.model, merges, args.batch_size, args.rounds):
            print(json.dumps(row), flush=True)
        return 0
    if args.one:
        print(json.dumps(measure(args.model, merges[0], scopes[0], args.batch_size, args.image_size)), flush=True)
        return 0
    for merge in merges:
        for scope in scopes:
            env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1", HF_HUB_OFFLINE="1")
            with tempfile.TemporaryDirectory() as cache:
                env["TORCHINDUCTOR_CACHE_DIR"] = cache
                cmd = [sys.executable, "-m", "bench.compile_time", "--one", "--model", args.model, "--merge", merge,
                       "--scope", scope, "--batch-size", str(args.batch_size)]
                if args.image_size:
                    cmd += ["--image-size", str(args.image_size)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            print(lines[-1] if lines else json.dumps({"merge": merge, "scope": scope, "error": out.stderr[-500:]}),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
