"""Small free functions around FAISS: build (train when needed), save, load, search settings.

Vectors are L2-normalised, so inner product is cosine similarity. Every index is wrapped in
``IndexIDMap2`` so FAISS returns our explicit int64 ids (also a parquet column), never row
positions. A GPU build of FAISS is used when one is present (``ngpu``: -1 = all that exist).

The append-only layout (issue #29): vectors added after ``index.faiss`` was saved go to a small
exact *delta* (``IDMap2,Flat``, same metric); a search asks both and merges the two top-k lists
(:func:`merge_top_k`); the delta is folded into the main index once it holds more than
:func:`delta_limit` vectors (``indexing.writer``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mergeseek.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_FACTORY = "Flat"
AUTO = "auto"
DEFAULT_MEMORY_BUDGET = 8 << 30  # bytes the index may take in RAM under --index-type auto
# Training sample: FAISS wants ~39..256 points per IVF centroid; 64 keeps k-means quick at 1M+.
TRAIN_POINTS_PER_LIST = 64
ADD_CHUNK = 65536
# The delta is folded into index.faiss (one rewrite) when it holds more than this share of the main
# index's vectors, or more than DELTA_MAX_ROWS (an exact search of 100k x 512 floats: 8.3 ms of one core a query).
DELTA_FRACTION = 0.10
DELTA_MAX_ROWS = 100_000
DELTA_FACTORY = "Flat"


def _faiss():
    try:
        import faiss
    except ImportError:
        from mergeseek.errors import MissingDependencyError

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


def validate_index_type(factory: str, dim: Optional[int] = None) -> str:
    """Refuse a factory string FAISS does not accept, before any model loads or vector is encoded.

    With ``dim`` unknown (the model is not loaded yet) the string must build at one of a few common
    widths; once the model is known it must build at its ``dim``. ``auto`` is always valid.
    """
    spec = (factory or DEFAULT_FACTORY).strip()
    if spec.lower() == AUTO:
        return AUTO
    first: Optional[ConfigError] = None
    for d in [int(dim)] if dim else [512, 768, 1024, 1280, 1536]:
        try:
            make_index(d, spec)
            return spec
        except ConfigError as exc:
            first = first or exc
    if dim:
        raise ConfigError(f"{first} (at the model's dim {dim})")
    raise first  # type: ignore[misc]


def choose_index_type(n: int, dim: int, memory_budget: Optional[int] = None) -> str:
    """``--index-type auto``: a factory string for ``n`` vectors of ``dim`` floats within ``memory_budget`` bytes.

    * up to 100k vectors whose raw floats fit the budget: ``Flat`` (exact; ~10 ms a query at 100k x 512);
    * when the raw floats fit: ``IVF<nlist>,Flat`` (nlist ~ 4 sqrt(n), a power of two, >= 39 vectors a list;
      IVF4096 at 1M), searched with :func:`default_nprobe` lists;
    * otherwise ``IVF<nlist>,PQ<m>`` with the largest m (bytes a vector) that divides dim and fits.

    No HNSW: the frames of a video come in shots of near-duplicates, and an HNSW graph over them
    keeps its links inside the shots. Measured on frame-like vectors (``bench.serve_latency.shot_vectors``),
    HNSW32 found 8% of the exact top 10 of a text-like query at 1M (efSearch 64; 19% at 256) and 35%
    at 100k, where IVF4096,Flat finds 96% at 1M (docs/BENCHMARKS.md, "Search at a million frames").
    ``--index-type HNSW32`` remains for data without such clusters.
    """
    budget = int(memory_budget or DEFAULT_MEMORY_BUDGET)
    flat = n * dim * 4
    if n <= 100_000 and flat <= budget:
        return "Flat"
    nlist = 1 << max(0, int(round(np.log2(max(1.0, 4 * np.sqrt(n))))))
    nlist = max(1, min(nlist, 1 << int(np.log2(max(1, n // 39)))))
    if flat * 1.05 <= budget:
        return f"IVF{nlist},Flat"
    divisors = [m for m in (64, 48, 32, 24, 16, 8, 4, 2, 1) if dim % m == 0]
    fitting = [m for m in divisors if n * (m + 8) <= budget]
    return f"IVF{nlist},PQ{(fitting or divisors[-1:])[0]}"


def build_index(vectors: np.ndarray, ids: np.ndarray, factory: str = DEFAULT_FACTORY, ngpu: int = -1, seed: int = 0,
                memory_budget: Optional[int] = None):
    """Build a CPU index over ``vectors`` (float32 [n, d]) keyed by ``ids`` (int64 [n]), training if needed.

    ``factory`` ``auto`` is resolved by :func:`choose_index_type` from the vector count and ``memory_budget``.
    """
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if (factory or "").strip().lower() == AUTO:
        factory = choose_index_type(len(vectors), vectors.shape[1], memory_budget)
        log.info("index type auto -> %s (%d vectors)", factory, len(vectors))
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


def held_ids(index) -> np.ndarray:
    """The ids an ``IndexIDMap2`` holds (int64, in the order they were added)."""
    return _faiss().vector_to_array(index.id_map).astype(np.int64, copy=False)


def file_ids(path: Path) -> Optional[np.ndarray]:
    """The ids a saved ``IndexIDMap2`` holds, read from the file's header and tail without loading the
    index (FAISS writes ``IxM2``, d int32, ntotal int64, ..., the sub-index, then the id map as a
    uint64 length and ntotal int64); None when the file does not have that shape."""
    from mergeseek.indexing.layout import FAISS_MAGIC

    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
            size = fh.seek(0, 2)
            if len(head) < 16 or head[:4] != FAISS_MAGIC:
                return None
            n = int(np.frombuffer(head[8:16], "<i8")[0])
            if n < 0 or 16 + 8 * (n + 1) > size:
                return None
            fh.seek(size - 8 * (n + 1))
            tail = fh.read(8 * (n + 1))
    except OSError:
        return None
    if len(tail) != 8 * (n + 1) or int(np.frombuffer(tail[:8], "<u8")[0]) != n:
        return None
    return np.frombuffer(tail[8:], "<i8").astype(np.int64)


def delta_limit(main_rows: int) -> int:
    """The most vectors the delta may hold beside a main index of ``main_rows``; one more and it is folded."""
    return min(DELTA_MAX_ROWS, int(DELTA_FRACTION * int(main_rows)))


def make_delta(dim: int):
    """An empty delta: exact ``IDMap2,Flat`` with inner product, the metric of every main index."""
    return make_index(dim, DELTA_FACTORY)


def delta_contents(delta) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 vectors) of a delta, in the order they were added (Flat stores the floats as given)."""
    n = int(delta.ntotal)
    vecs = delta.index.reconstruct_n(0, n) if n else np.zeros((0, delta.d), np.float32)
    return held_ids(delta).copy(), np.ascontiguousarray(vecs, dtype=np.float32)


def merge_top_k(scores: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of several [m, k_i] result lists of the same queries, merged exactly by score
    (higher first; equal scores: smaller id first; FAISS's ``-1`` padding last, kept as ``-1``)."""
    s = np.concatenate([np.asarray(x, np.float32) for x in scores], axis=1)
    i = np.concatenate([np.asarray(x, np.int64) for x in ids], axis=1)
    empty = i < 0
    order = np.lexsort((i, -np.where(empty, 0, s), empty), axis=1)[:, :k]
    s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    if s.shape[1] < k:  # fewer candidates than k in all lists together
        pad = k - s.shape[1]
        s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
        i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
    return s, i


def search_with_delta(main, delta, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``main.search`` when there is no delta; else both searched and merged (:func:`merge_top_k`)."""
    if delta is None or delta.ntotal == 0:
        return main.search(queries, k)
    parts = [idx.search(queries, min(k, max(1, int(idx.ntotal)))) for idx in (main, delta) if idx.ntotal]
    return merge_top_k([p[0] for p in parts], [p[1] for p in parts], k)


def quantizer_bytes(index) -> bytes:
    """The trained part of an IVF index (its coarse centroids), for checking that an add did not retrain it; b"" otherwise."""
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    ivf = faiss.try_extract_index_ivf(inner) if hasattr(faiss, "try_extract_index_ivf") else None
    if ivf is None:
        return b""
    return faiss.serialize_index(ivf.quantizer).tobytes()


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


def default_nprobe(nlist: int) -> int:
    """IVF lists visited per query when the user gives no ``--nprobe``: ``max(16, nlist / 64)``, at most
    ``nlist``. Measured at 1M frame-like vectors (docs/BENCHMARKS.md, "Search at a million frames"):
    IVF4096,Flat reaches recall@10 0.965 of exact search for text-like queries at 64 (0.95 at 32,
    0.92 at 16), 4-7 ms of one core; a fixed 16 lost recall as the list count grows with the index."""
    return max(1, min(int(nlist), max(16, int(nlist) // 64)))


def for_search(index, ngpu: int = -1, nprobe: Optional[int] = None, ef_search: int = 64):
    """Set search-time knobs (IVF nprobe, None: :func:`default_nprobe`; HNSW efSearch) and move to GPU where possible."""
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    ivf = faiss.try_extract_index_ivf(inner) if hasattr(faiss, "try_extract_index_ivf") else None
    if ivf is not None:
        ivf.nprobe = default_nprobe(ivf.nlist) if nprobe is None else min(int(nprobe), int(ivf.nlist))
    if hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = int(ef_search)
    gpu = _to_gpu(index, ngpu)
    return gpu if gpu is not None else index


def save_index(index, path: Path) -> None:
    """Write ``index`` to ``path`` through a temporary name (file and folder fsynced; see ``runtime``)."""
    from mergeseek.runtime import atomic_write, write_error

    faiss = _faiss()

    def write(tmp: Path) -> None:
        try:
            faiss.write_index(index, str(tmp))
        except RuntimeError as exc:  # FAISS reports a failed write (ENOSPC, EROFS) as RuntimeError
            raise OSError(_errno_of(str(exc)), _short(exc)) from None

    try:
        atomic_write(Path(path), write)
    except OSError as exc:
        raise write_error(path, exc) from None


def load_index(path: Path):
    """Read ``index.faiss``; ``DamagedIndexError`` when it is truncated or not a FAISS file."""
    from mergeseek.errors import DamagedIndexError

    try:
        return _faiss().read_index(str(path))
    except RuntimeError as exc:
        raise DamagedIndexError(f"index file {path} is damaged ({_short(exc)}); it is derived from the shards: "
                                f"run `cli.py repair --index {Path(path).parent}` to rebuild it") from None


def live_ids_by_shard(store) -> dict:
    """shard -> the ids of its live rows (int64), for every committed shard of ``store``."""
    return {s: store.read_shard(s, columns=["id"]).column("id").to_numpy() for s in store.shard_names()}


def read_rows(store, ids: np.ndarray, by_shard: Optional[dict] = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of the live rows among ``ids``, reading only the shards that hold them
    (``by_shard``: :func:`live_ids_by_shard`, when the caller has it); shard then row order."""
    by_shard = live_ids_by_shard(store) if by_shard is None else by_shard
    want = np.asarray(ids, np.int64)
    shards = [s for s, sids in by_shard.items() if len(sids) and np.isin(sids, want).any()]
    if not shards:
        return np.zeros(0, np.int64), np.zeros((0, store.manifest.dim), np.float32)
    got, vecs = store.read_vectors(shards=shards)
    keep = np.isin(got, want)
    return got[keep], vecs[keep]


def open_saved(store, live_ids: np.ndarray):
    """The saved FAISS state of ``store`` (an ``IndexStore``) over exactly ``live_ids``, as (main index,
    delta or None), for a reader.

    When the manifest says it is current, both files are loaded. Otherwise (a run killed between its
    commit and its FAISS step, a damaged delta) index.faiss is still used when every id it holds is
    live and its generation is known, and the rows it lacks are read from the shards into an exact
    delta in memory (one warning). (None, None) when index.faiss itself cannot be used."""
    from mergeseek.errors import DamagedIndexError

    m, live = store.manifest, np.asarray(live_ids, np.int64)
    main = delta = None
    if store.faiss_path.is_file() and m.faiss_generation >= 0:
        try:
            main = load_index(store.faiss_path)
        except DamagedIndexError as exc:
            log.warning("%s", str(exc).split(";")[0])
            return None, None
    if main is None or not hasattr(main, "id_map"):
        return None, None
    current, note = store.faiss_is_current(), ""
    if current and store.has_delta():
        try:
            delta = load_index(store.delta_path)
        except DamagedIndexError as exc:
            current, note = False, str(exc).split(";")[0] + "; "
    if current and main.ntotal + (delta.ntotal if delta is not None else 0) == len(live):
        return main, delta
    held = held_ids(main)
    if len(np.unique(held)) != len(held) or not np.isin(held, live).all():
        return None, None  # it holds rows that are gone (re-indexed, repaired): not usable
    missing = live[~np.isin(live, held)]
    delta = None
    if len(missing):
        log.warning("%s%s lacks %d of the %d rows (an interrupted run?); they are searched exactly from the "
                    "shards. Run `cli.py index` on the same folder (or `cli.py repair --index %s`) to save them",
                    note, store.faiss_path.name, len(missing), len(live), store.root)
        ids, vecs = read_rows(store, missing)
        delta = make_delta(m.dim)
        add_to_index(delta, vecs, ids)
    return main, delta


def index_factory_of(index) -> str:
    """A short name of the FAISS type inside an ``IndexIDMap2`` (for reports)."""
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    return type(inner).__name__


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[-1] if lines else type(exc).__name__)[:160]


def _errno_of(text: str) -> int:
    import errno

    low = text.lower()
    if "no space" in low:
        return errno.ENOSPC
    if "read-only" in low:
        return errno.EROFS
    if "permission" in low:
        return errno.EACCES
    return errno.EIO
