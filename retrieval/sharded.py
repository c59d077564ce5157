"""Search several index folders as one: a FAISS index per folder, searched together (``faiss.IndexShards``).

For an archive whose vectors do not fit one machine's index (or that was indexed as separate jobs
and not merged), each folder keeps its own index; a query runs on every shard (threads) and the
top-k lists are merged by score. With ``index_type`` (IVF/PQ/SQ, HNSW...) one FAISS index of that
type is trained **once** on a sample drawn across all shards and each shard gets a copy of it
holding its own vectors, so every shard uses the same quantizer and the scores are comparable.

Ids: each folder numbers its rows from 0, so a shard's ids are offset by the sum of the previous
shards' ``max id + 1`` (folders in the order given). ``Hit.id`` is that global id;
``ShardedSearcher.locate(id)`` gives back (folder, id in that folder). A folder's delta (the vectors
added since its index.faiss was saved, ``indexing.writer``) is one more FAISS shard beside its main
index, with the same id offset, so its rows are merged by score with all the others.

Memory per million 512-d vectors with mergeseek's id map (``docs/SCALE.md`` has the derivation and
the measurement): Flat 2.08 GB, SQ8 0.54 GB, IVF4096,PQ64 0.11 GB, HNSW32 2.35 GB; the metadata
held for hits (video, frame, time, path) adds ~0.1-0.2 GB.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from mergeseek.errors import IndexMismatchError, InputError
from mergeseek.indexing.faiss_index import build_index, for_search, make_index, open_saved
from mergeseek.indexing.store import IndexStore, check_identity
from mergeseek.retrieval.search import FROM_INDEX, SEARCH_IDENTITY, Searcher, check_query

log = logging.getLogger(__name__)

TRAIN_SAMPLE = 100_000  # vectors drawn across shards to train a shared IVF/PQ/SQ index


class ShardedSearcher(Searcher):
    """``Searcher`` over several index folders (text, image and temporal queries work the same).

    Args:
        index_dirs: index folders built with the same model and weights (and dim).
        encoder: an ``encoders.Encoder`` for text/image queries (None: vector queries only).
        index_type: None: each folder's own ``index.faiss``; a FAISS factory string (``IVF1024,PQ64``,
            ``HNSW32``): build that type per shard, trained once on ``train_sample`` vectors across shards.
        ngpu, nprobe, ef_search: as for ``Searcher``.
        seed: of the training sample.
    """

    def __init__(self, index_dirs: Sequence[Union[str, Path]], encoder: Any = None, ngpu: int = -1, nprobe: Optional[int] = None,
                 ef_search: int = 64, index_type: Optional[str] = None, train_sample: int = TRAIN_SAMPLE, seed: int = 0):
        import faiss

        if not index_dirs:
            raise InputError("give at least one index folder to search")
        self.stores = [IndexStore.open_for_read(Path(d)) for d in index_dirs]
        self.store, self.manifest = self.stores[0], self.stores[0].manifest
        for s in self.stores[1:]:
            check_identity(s.root, s.manifest, self.manifest.identity, SEARCH_IDENTITY,
                           action=f"search together with {self.store.root}")
            if (s.manifest.merge, s.manifest.precision) != (self.manifest.merge, self.manifest.precision):
                log.info("%s was indexed with merge=%s precision=%s, %s with merge=%s precision=%s: same embedding "
                         "space, scores comparable", s.root, s.manifest.merge, s.manifest.precision, self.store.root,
                         self.manifest.merge, self.manifest.precision)
        self.encoder = encoder
        if encoder is not None:
            check_identity(self.store.root, self.manifest, encoder.describe(), SEARCH_IDENTITY, action="search")
        self.offsets: list[int] = []
        metas = []
        offset = 0
        for s in self.stores:
            meta = s.read_meta()
            metas.append(meta)
            self.offsets.append(offset)
            if meta.num_rows:
                offset += int(meta.column("id").to_numpy().max()) + 1
        if sum(m.num_rows for m in metas) == 0:
            raise InputError(f"the indexes {', '.join(str(s.root) for s in self.stores)} hold no vectors")
        self._ids = np.concatenate([m.column("id").to_numpy() + off for m, off in zip(metas, self.offsets)])
        self._order = np.argsort(self._ids, kind="stable")
        self._sorted_ids = self._ids[self._order]
        self._video = [v for m in metas for v in m.column("video_id").to_pylist()]
        self._frame = np.concatenate([m.column("frame_idx").to_numpy() for m in metas])
        self._pts = np.concatenate([m.column("pts_time").to_numpy() for m in metas])
        self._path = [p for m in metas for p in m.column("path").to_pylist()]
        self.video_meta = {}
        try:
            from mergeseek.indexing.aic import load_video_meta

            for s in self.stores:
                self.video_meta.update(load_video_meta(s.root))
        except ImportError:  # pragma: no cover - older trees without release metadata
            pass
        trained = self._train(index_type, train_sample, seed) if index_type else None
        self.parts = []  # IndexShards does not own its shards: keep them alive here
        self.delta = None  # each folder's delta is a shard of self.index
        self.index = faiss.IndexShards(int(self.manifest.dim), True, False)  # threaded, ids as given
        for s, meta, off in zip(self.stores, metas, self.offsets):
            if meta.num_rows == 0:
                continue
            for part in self._shard_index(s, meta, off, trained, ngpu):  # the folder's main index, and its delta
                part = for_search(part, ngpu=ngpu, nprobe=nprobe, ef_search=ef_search)
                self.parts.append(part)
                self.index.add_shard(part)

    @classmethod
    def open(cls, index_dirs: Sequence[Union[str, Path]], model: str = FROM_INDEX, pretrained: str = FROM_INDEX,
             merge: str = FROM_INDEX, device: str = "auto", precision: str = "fp32", batch_size: int = 32,
             **kwargs) -> "ShardedSearcher":
        """Build the encoder the first index needs ("from-index": the manifest's value) and open them all."""
        from mergeseek.encoders import Encoder

        m = IndexStore.open_for_read(Path(index_dirs[0])).manifest
        asked = {"model": model, "pretrained": pretrained}
        wanted = {k: (getattr(m, k) if v in (None, "", FROM_INDEX) else v) for k, v in asked.items()}
        check_identity(Path(index_dirs[0]), m, wanted, ("model", "pretrained"), action="search")
        encoder = Encoder(model_name=wanted["model"], pretrained=wanted["pretrained"], device=device, precision=precision,
                          merge=m.merge if merge in (None, "", FROM_INDEX) else merge, batch_size=batch_size)
        return cls(index_dirs, encoder, **kwargs)

    def locate(self, global_id: int) -> tuple[Path, int]:
        """(index folder, id within it) of a global id from a hit."""
        k = int(np.searchsorted(self.offsets, int(global_id), side="right")) - 1
        return self.stores[k].root, int(global_id) - self.offsets[k]

    # ------------------------------------------------------------------ building
    def _train(self, index_type: str, train_sample: int, seed: int):
        """An empty index of ``index_type`` trained on a sample spread over the shards (by their size)."""
        from mergeseek.indexing.faiss_index import AUTO, choose_index_type

        rng = np.random.default_rng(seed)
        sizes = [s.manifest.counts()["vectors"] for s in self.stores]
        total = sum(sizes)
        if index_type.strip().lower() == AUTO:
            index_type = choose_index_type(total, int(self.manifest.dim), self.manifest.memory_budget or None)
        parts = []
        for s, n in zip(self.stores, sizes):
            if n == 0:
                continue
            _, vecs = s.read_vectors()
            take = min(n, max(1, round(train_sample * n / total)))
            parts.append(vecs[np.sort(rng.choice(n, take, replace=False))] if take < n else vecs)
        sample = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
        index = make_index(int(self.manifest.dim), index_type)
        if not index.is_trained:
            from mergeseek.indexing.faiss_index import _train

            _train(index, sample, index_type, seed)
        log.info("trained %s on %d vectors across %d shard(s)", index_type, len(sample), len(parts))
        return index

    def _shard_index(self, store: IndexStore, meta, offset: int, trained, ngpu: int) -> list:
        """The FAISS indexes of one folder, ids shifted by ``offset``: [main] or [main, delta]."""
        import faiss

        if trained is not None:
            ids, vecs = store.read_vectors()
            part = faiss.clone_index(trained)
            part.add_with_ids(np.ascontiguousarray(vecs, np.float32), np.ascontiguousarray(ids + offset, np.int64))
            return [part]
        main, delta = open_saved(store, meta.column("id").to_numpy())
        if main is None:
            log.warning("index.faiss in %s is missing or older than its shards; rebuilt it in memory", store.root)
            ids, vecs = store.read_vectors()
            main = build_index(vecs, ids, store.manifest.index_type, ngpu=0,
                               memory_budget=getattr(store.manifest, "memory_budget", None) or None)
        parts = [main] + ([delta] if delta is not None and delta.ntotal else [])
        if offset:
            for part in parts:
                _shift_ids(part, offset)
        return parts


def _shift_ids(index, offset: int) -> None:
    """Add ``offset`` to every id of an ``IndexIDMap``/``IndexIDMap2`` in place."""
    import faiss

    index = faiss.downcast_index(index)
    if not hasattr(index, "id_map"):
        raise IndexMismatchError("a shard's index.faiss has no id map; rebuild it with `cli.py repair --index DIR`")
    ids = faiss.vector_to_array(index.id_map).astype(np.int64) + int(offset)
    faiss.copy_array_to_vector(ids, index.id_map)
    if hasattr(index, "construct_rev_map"):
        index.construct_rev_map()


def run_sharded_search(index_dirs: Sequence[Union[str, Path]], text: Optional[str] = None,
                       image: Optional[Union[str, Path]] = None, then: Optional[str] = None, within_s: float = 30.0,
                       k: int = 20, per_video: bool = False, model: str = FROM_INDEX, pretrained: str = FROM_INDEX,
                       merge: str = FROM_INDEX, device: str = "auto", precision: str = "fp32", batch_size: int = 32,
                       nprobe: Optional[int] = None, ef_search: int = 64, index_type: Optional[str] = None) -> list:
    """``retrieval.run_search`` over several index folders (``cli.py search --index A --shard B ...``)."""
    check_query(text, image, then, k)
    searcher = ShardedSearcher.open(index_dirs, model=model, pretrained=pretrained, merge=merge, device=device,
                                    precision=precision, batch_size=batch_size, nprobe=nprobe, ef_search=ef_search,
                                    index_type=index_type)
    from mergeseek.retrieval.query import run_query

    thens = [] if then is None else [then] if isinstance(then, str) else list(then)
    return run_query(searcher, text, image, thens, within_s, k=k, per_video=per_video)
