"""Search latency and recall at 1M / 10M vectors: the project's FAISS path, and exact search on the GPU.

    python -m bench.search_scale --n 1000000 --n 10000000 --device cuda --out search.json

Vectors are clustered (a mixture of Gaussian clusters on the unit sphere, like CLIP embeddings of
many shots), dim 512. For each size:

* ``faiss``: ``indexing.faiss_index.build_index`` + ``for_search`` (the index and search path of
  ``cli.py index/search``; on the GPU when a GPU build of FAISS is installed, ``gpu`` says which),
  exact (Flat) and IVF (``auto``'s choice), one query at a time: p50 / p95 ms and recall@10 of IVF
  against the exact top 10. Sizes whose host copy would not fit ``--host-limit-gb`` are skipped.
* ``torch``: exact inner-product search with one matrix product and top-k on the GPU (fp16 vectors),
  one query at a time: p50 / p95 ms (recall 1.0 by construction, checked against FAISS Flat on the
  first queries where both ran).

Wall clock (``time.perf_counter`` around each query, synchronised on the GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def clustered(n: int, dim: int, device: str, seed: int = 0, clusters: int = 4096):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=g, device=device), dim=-1)
    out = torch.empty(n, dim, device=device, dtype=torch.float16)
    step = 1 << 20
    for s in range(0, n, step):
        m = min(step, n - s)
        pick = torch.randint(0, clusters, (m,), generator=g, device=device)
        v = centres[pick] + 0.35 * torch.randn(m, dim, generator=g, device=device) / dim ** 0.5
        out[s:s + m] = torch.nn.functional.normalize(v, dim=-1).half()
    return out


def _pcts(times_ms: list) -> dict:
    times_ms = sorted(times_ms)
    return {"p50_ms": round(statistics.median(times_ms), 3), "p95_ms": round(times_ms[int(0.95 * (len(times_ms) - 1))], 3)}


def run(sizes, device: str = "cuda", queries: int = 100, k: int = 10, host_limit_gb: float = 24.0, dim: int = 512) -> list:
    import numpy as np
    import torch

    rows = []
    for n in sizes:
        data = clustered(n, dim, device)
        q = data[torch.randperm(n, device=device)[:queries]].float()
        q = torch.nn.functional.normalize(q + 0.05 * torch.randn_like(q) / dim ** 0.5, dim=-1)
        row = {"n": n, "dim": dim, "queries": queries}
        exact_ids = None
        if device.startswith("cuda"):
            times = []
            found = []
            for i in range(queries):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                scores = data @ q[i].half()
                top = torch.topk(scores.float(), k).indices
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
                found.append(top.cpu().numpy())
            exact_ids = np.stack(found)
            row["torch"] = _pcts(times[3:])
        if n * dim * 4 / 2**30 <= host_limit_gb:
            try:
                row["faiss"] = _faiss_rows(data, q, k, exact_ids)
            except ImportError as exc:
                row["faiss"] = {"error": str(exc)[:200]}
        else:
            row["faiss"] = {"skipped": f"host copy {n * dim * 4 / 2**30:.0f} GiB > --host-limit-gb {host_limit_gb}"}
        del data
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _faiss_rows(data, q, k: int, exact_ids) -> dict:
    import numpy as np

    from mergeseek.indexing.faiss_index import build_index, for_search, gpu_count

    vecs = data.float().cpu().numpy()
    qs = q.cpu().numpy().astype(np.float32)
    ids = np.arange(len(vecs), dtype=np.int64)
    out = {"gpu": gpu_count() > 0}
    flat_found = None
    for name, factory in (("flat", "Flat"), ("ivf", "auto")):
        t0 = time.perf_counter()
        index = for_search(build_index(vecs, ids, factory, memory_budget=64 << 30))
        build_s = time.perf_counter() - t0
        times, found = _one_at_a_time(index, qs, k)
        entry = {"build_s": round(build_s, 1), **_pcts(times[3:])}
        if name == "ivf":  # the recall a search knob buys: HNSW efSearch / IVF nprobe, 4x and 16x the default
            entry["sweep"] = _sweep(index, qs, k, flat_found)
        if name == "flat":
            flat_found = found
            if exact_ids is not None:  # the GPU exact search agrees with FAISS's exact search
                entry["agrees_with_torch"] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact_ids)]))
        else:
            entry["recall_at_10"] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, flat_found)]))
            from mergeseek.indexing.faiss_index import index_factory_of

            entry["type"] = index_factory_of(index) if not out["gpu"] else "gpu"
        out[name] = entry
        del index
    return out


def _one_at_a_time(index, qs, k: int):
    """(ms per query, found ids [n, k]) searching ``qs`` one query at a time."""
    import numpy as np

    times, found = [], []
    for i in range(len(qs)):
        t0 = time.perf_counter()
        _, ids = index.search(qs[i:i + 1], k)
        times.append((time.perf_counter() - t0) * 1e3)
        found.append(ids[0])
    return times, np.stack(found)


def _sweep(index, qs, k: int, truth) -> list:
    import numpy as np

    from mergeseek.indexing.faiss_index import _faiss

    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    rows = []
    for factor in (1, 4, 16):
        if hasattr(inner, "hnsw"):
            knob, value = "efSearch", 64 * factor
            inner.hnsw.efSearch = value
        else:
            ivf = faiss.try_extract_index_ivf(inner)
            if ivf is None:
                return rows
            knob, value = "nprobe", min(16 * factor, ivf.nlist)
            ivf.nprobe = value
        times, found = _one_at_a_time(index, qs, k)
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)]))
        rows.append({knob: value, "recall_at_10": recall, **_pcts(times[3:])})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.search_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, action="append", help="database sizes (repeat); default 1M")
    p.add_argument("--device", default="cuda")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--host-limit-gb", type=float, default=24.0, help="largest host copy handed to FAISS")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    a = p.parse_args(argv)
    rows = run(a.n or [1_000_000], a.device, a.queries, host_limit_gb=a.host_limit_gb)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":  # pragma: no cover
    main()
