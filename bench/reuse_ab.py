"""A/B of two versions of encoders/reuse.py in one process: per-frame, old and new, alternating.

    git show 8ccf298:encoders/reuse.py > /tmp/reuse_old.py
    python -m bench.reuse_ab --old /tmp/reuse_old.py --model ViT-B-32 --kind static --merge none

Prints the median single-thread CPU seconds of each pass, the gain of each version over
per-frame encoding (same batches) and the largest difference between the two versions' outputs.
Clips: two 4 s synthetic clips at 5 fps (``static``: static camera with a moving object;
``panzoom``: a pan and a zoom), random weights.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from typing import List, Optional


def _load(path: str):
    spec = importlib.util.spec_from_file_location("reuse_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reuse_old"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="path of the other encoders/reuse.py (e.g. from git show REV:...)")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--merge", default="none")
    p.add_argument("--kind", choices=("static", "panzoom"), default="static")
    p.add_argument("--reuse", default="threshold=0.05,refresh=16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args(argv)
    import torch

    from mergeseek.encoders import Encoder
    from mergeseek.encoders import reuse as new
    from mergeseek.eval.datasets import video as V

    torch.set_num_threads(1)
    old = _load(a.old)
    enc = Encoder(model_name=a.model, pretrained=None, device="cpu", batch_size=a.batch_size, merge=a.merge)
    photos, fps, n = V._photos(), 5.0, 20
    if a.kind == "static":
        clips = [V.static_clip(photos[2], n, fps, seed=0, name="a"), V.static_clip(photos[4], n, fps, seed=1, name="b")]
    else:
        clips = [V.pan_clip(photos[0], n, fps, name="p"), V.zoom_clip(photos[1], n, fps, name="z")]
    px = torch.cat([enc.preprocess_images(list(c.frames)) for c in clips])
    ids = [c.name for c in clips for _ in range(len(c))]
    bs = a.batch_size

    def per_frame():
        return torch.cat([enc.encode_image_tensor(px[s : s + bs]) for s in range(0, len(ids), bs)])

    def reused(module):
        stream = module.ReuseStream(enc.model, a.reuse, enc.merge)
        with torch.inference_mode():
            return torch.cat([stream.encode(px[s : s + bs], ids[s : s + bs]) for s in range(0, len(ids), bs)])

    times = {"per_frame": [], "old": [], "new": []}
    outs = {}
    for _ in range(a.rounds):
        for name, fn in (("per_frame", per_frame), ("old", lambda: reused(old)), ("new", lambda: reused(new))):
            t0 = time.process_time()
            outs[name] = fn()
            times[name].append(time.process_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"model": a.model, "merge": a.merge, "kind": a.kind, "seconds": {k: round(v, 3) for k, v in med.items()},
           "gain_old": round(med["per_frame"] / med["old"], 3), "gain_new": round(med["per_frame"] / med["new"], 3),
           "max_abs_diff": float((outs["new"] - outs["old"]).abs().max())}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
