"""Small free functions around FAISS: build (train when needed), save, load, search settings.

Vectors are L2-normalised, so inner product is cosine similarity. Every index is wrapped in
``IndexIDMap2`` so FAISS returns our explicit int64 ids (also a parquet column), never row
positions. A GPU build of FAISS is used when one is present (``ngpu``: -1 = all that exist).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_FACTORY = "Flat"
# Training sample: FAISS wants ~39..256 points per IVF centroid; 64 keeps k-means quick at 1M+.
TRAIN_POINTS_PER_LIST = 64
ADD_CHUNK = 65536


def _faiss():
    try:
        import faiss
    except ImportError:
        from errors import MissingDependencyError

        raise MissingDependencyError(
            "FAISS is not installed; run pip install faiss-cpu (the 'cpu' extra: pip install '.[cpu]'), "
            "or faiss-gpu-cu12 for NVIDIA GPUs (the 'gpu' extra), never both in one environment"
        ) from None
    return faiss


def make_index(dim: int, factory: str = DEFAULT_FACTORY):
    """An empty ``IndexIDMap2`` around ``faiss.index_factory(dim, factory, inner product)``."""
    faiss = _faiss()
    spec = (factory or DEFAULT_FACTORY).strip()
    if spec.upper().startswith("IDMAP"):
        raise ConfigError(f"index type {factory!r}: leave out IDMap, ids are added by mergeseek; e.g. 'IVF1024,Flat'")
    try:
        base = faiss.index_factory(int(dim), spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ConfigError(
            f"index type {factory!r} is not a FAISS factory string FAISS accepts ({str(exc).strip().splitlines()[-1][:160]}); "
            "examples: Flat, IVF1024,Flat, IVF4096,PQ64, HNSW32, IVF1024,SQ8"
        ) from None
    return faiss.IndexIDMap2(base)


def build_index(vectors: np.ndarray, ids: np.ndarray, factory: str = DEFAULT_FACTORY, ngpu: int = -1, seed: int = 0):
    """Build a CPU index over ``vectors`` (float32 [n, d]) keyed by ``ids`` (int64 [n]), training if needed."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    index = make_index(vectors.shape[1], factory)
    gpu = _to_gpu(index, ngpu) if len(vectors) else None
    work = gpu if gpu is not None else index
    if not work.is_trained:
        _train(work, vectors, factory, seed)
    for s in range(0, len(vectors), ADD_CHUNK):
        work.add_with_ids(vectors[s : s + ADD_CHUNK], ids[s : s + ADD_CHUNK])
    return faiss.index_gpu_to_cpu(gpu) if gpu is not None else index


def add_to_index(index, vectors: np.ndarray, ids: np.ndarray) -> None:
    for s in range(0, len(vectors), ADD_CHUNK):
        index.add_with_ids(
            np.ascontiguousarray(vectors[s : s + ADD_CHUNK], np.float32), np.ascontiguousarray(ids[s : s + ADD_CHUNK], np.int64)
        )


def _train(index, vectors: np.ndarray, factory: str, seed: int) -> None:
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    nlist = getattr(faiss.try_extract_index_ivf(inner), "nlist", 0) if hasattr(faiss, "try_extract_index_ivf") else 0
    if nlist and len(vectors) < nlist:
        raise ConfigError(
            f"index type {factory!r} needs at least {nlist} vectors to train its {nlist} lists but there are "
            f"{len(vectors)}; use --index-type Flat or fewer lists (e.g. IVF{max(1, len(vectors) // 39)},Flat)"
        )
    sample = vectors
    limit = max(nlist * TRAIN_POINTS_PER_LIST, 100_000)
    if len(vectors) > limit:
        pick = np.random.default_rng(seed).choice(len(vectors), limit, replace=False)
        sample = vectors[np.sort(pick)]
    log.info("training %s on %d vectors", factory, len(sample))
    try:
        index.train(sample)
    except RuntimeError as exc:
        raise ConfigError(f"training index type {factory!r} failed: {str(exc).strip().splitlines()[-1][:200]}") from None


def gpu_count() -> int:
    try:
        return int(_faiss().get_num_gpus())
    except Exception:  # faiss-cpu builds without the GPU symbols
        return 0


def _to_gpu(index, ngpu: int):
    """A GPU clone of ``index`` when a GPU FAISS build and a GPU exist and the type supports it."""
    if ngpu == 0 or gpu_count() == 0:
        return None
    faiss = _faiss()
    try:
        if ngpu < 0:
            return faiss.index_cpu_to_all_gpus(index)
        return faiss.index_cpu_to_gpus_list(index, gpus=list(range(ngpu)))
    except Exception as exc:  # HNSW and some codecs have no GPU version: stay on CPU
        log.info("FAISS index stays on CPU (%s)", str(exc).strip().splitlines()[-1][:120] if str(exc).strip() else exc)
        return None


def for_search(index, ngpu: int = -1, nprobe: int = 16, ef_search: int = 64):
    """Set search-time knobs (IVF nprobe, HNSW efSearch) and move to GPU where possible."""
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    ivf = faiss.try_extract_index_ivf(inner) if hasattr(faiss, "try_extract_index_ivf") else None
    if ivf is not None:
        ivf.nprobe = min(int(nprobe), int(ivf.nlist))
    if hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = int(ef_search)
    gpu = _to_gpu(index, ngpu)
    return gpu if gpu is not None else index


def save_index(index, path: Path) -> None:
    """Write ``index`` to ``path`` through a temporary name and ``os.replace``."""
    import os

    faiss = _faiss()
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_index(path: Path):
    return _faiss().read_index(str(path))
