"""Ray indexing throughput against the single-process path, and FAISS memory per vector.

    python -m bench.ray_scale throughput [--videos 4 --seconds 5 --workers 1,2 --model ViT-B-32]
    python -m bench.ray_scale memory [--n 100000 --dim 512]

``throughput`` writes synthetic 10 fps videos, indexes every frame (``every=1``, dedup off) once in
one process and once per worker count on a local Ray, and prints frames/s for each. Two figures per
Ray run: ``end-to-end`` (what a user waits for after the driver's model is loaded: Ray Data start,
actor start and model load in each actor, decoding, encoding, commit) and ``steady`` (frames after the
first chunk divided by the time after the first chunk arrived: the rate once the actors run). Every
run's index is checked against the single-process one (same rows, vectors within 1e-5).

``memory`` builds FAISS indexes over ``n`` random unit vectors and reports the resident memory each
one adds (RSS delta) and its serialized size, per vector and per million vectors.

Random weights (no downloads); on CPU the figures are dominated by the ViT forward.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _videos(d: Path, n: int, seconds: int) -> Path:
    import cv2

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for v in range(n):
        w = cv2.VideoWriter(str(d / f"v{v:03d}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (160, 120))
        for i in range(seconds * 10):
            frame = np.full((120, 160, 3), rng.integers(0, 255, 3), np.uint8)
            frame[10:40, (i * 3) % 120 : (i * 3) % 120 + 30] = 255 - frame[0, 0]
            w.write(frame)
        w.release()
    return d


def _rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def throughput(args) -> dict:
    import torch

    from mergeseek.encoders import Encoder
    from mergeseek.indexing import Dedup, IndexOptions, Sampling, index_paths
    from mergeseek.indexing.distributed import RayOptions, index_paths_ray
    from mergeseek.indexing.store import IndexStore

    tmp = Path(tempfile.mkdtemp(prefix="mergeseek-ray-bench-"))
    try:
        src = _videos(tmp / "videos", args.videos, args.seconds)
        enc = Encoder(model_name=args.model, pretrained=None, device="cpu", batch_size=args.batch_size)
        # shard_size=1: one commit per video, so the commit times show the steady rate
        opts = IndexOptions(sampling=Sampling.parse("every=1"), dedup=Dedup(enabled=False), shard_size=1)
        out: dict = {"model": args.model, "videos": args.videos, "seconds": args.seconds, "cpus": os.cpu_count(),
                     "torch_threads_single": torch.get_num_threads(), "load_avg_before": os.getloadavg()[0], "runs": []}
        rep = index_paths([src], tmp / "single", enc, opts)
        out["runs"].append({"mode": "single process", "frames": rep.frames_encoded, "wall_s": round(rep.times.wall_s, 2),
                            "frames_per_s": round(rep.frames_per_s, 2)})
        ref = _contents(IndexStore, tmp / "single")
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, configure_logging=False)
        out["ray_init_s"] = round(time.perf_counter() - t0, 2)
        for w in args.workers:
            arrivals: list = []
            t0 = time.perf_counter()
            rep = index_paths_ray([src], tmp / f"ray{w}", enc, opts, RayOptions(workers=w),
                                  on_commit=lambda keys: arrivals.append(time.perf_counter()))
            wall = time.perf_counter() - t0
            got = _contents(IndexStore, tmp / f"ray{w}")
            same = got[0] == ref[0] and bool(np.allclose(got[1], ref[1], atol=1e-5))
            first = arrivals[0] if arrivals else t0
            per_source = rep.frames_encoded / max(1, len(rep.indexed))
            steady = (rep.frames_encoded - per_source) / max(1e-9, (arrivals[-1] if arrivals else t0) - first)
            out["runs"].append({"mode": f"ray, {w} worker(s)", "frames": rep.frames_encoded, "wall_s": round(wall, 2),
                                "frames_per_s": round(rep.frames_encoded / wall, 2),
                                "steady_frames_per_s": round(steady, 2) if len(arrivals) > 1 else None,
                                "same_index_as_single": same})
        ray.shutdown()
        out["load_avg_after"] = os.getloadavg()[0]
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _contents(IndexStore, d: Path):
    store = IndexStore.open_for_read(d)
    meta = store.read_meta().sort_by("id")
    rows = list(zip(*(meta.column(c).to_pylist() for c in ("id", "video_id", "frame_idx"))))
    ids, vecs = store.read_vectors()
    return rows, vecs[np.argsort(ids)]


def memory(args) -> dict:
    import faiss

    from mergeseek.indexing.faiss_index import build_index

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(args.n, dtype=np.int64)
    faiss.omp_set_num_threads(1)
    rows = []
    for factory in args.types:
        before = _rss()
        t0 = time.perf_counter()
        index = build_index(x, ids, factory, ngpu=0)
        built = time.perf_counter() - t0
        delta = _rss() - before
        size = len(faiss.serialize_index(index))
        rows.append({"type": factory, "build_s": round(built, 1), "rss_bytes_per_vector": round(delta / args.n, 1),
                     "file_bytes_per_vector": round(size / args.n, 1),
                     "rss_gb_per_million": round(delta / args.n * 1e6 / 1e9, 3)})
        del index
    return {"n": args.n, "dim": args.dim, "rows": rows}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--videos", type=int, default=4)
    t.add_argument("--seconds", type=int, default=5)
    t.add_argument("--workers", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2])
    t.add_argument("--model", default="ViT-B-32")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--ray-cpus", type=int, default=os.cpu_count())
    m = sub.add_parser("memory")
    m.add_argument("--n", type=int, default=100_000)
    m.add_argument("--dim", type=int, default=512)
    m.add_argument("--types", type=lambda s: s.split(";"), default=["Flat", "SQ8", "IVF1024,PQ64", "HNSW32"])
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(throughput(args) if args.cmd == "throughput" else memory(args), indent=1))


if __name__ == "__main__":
    main()
