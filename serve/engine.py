"""What the web app serves, without HTTP: searches, frames by id, neighbours, thumbnails, videos.

``Engine`` opens an index read-only (it never writes there): a ``retrieval.search.Searcher`` for
the queries and a ``Catalog`` of the live rows for everything addressed by id. Files are reached
only through ids and video ids the index recorded (a dict or sorted-array lookup), never through a
path taken from a request.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union
from urllib.parse import quote

import numpy as np

from mergeseek.errors import InputError, NotFoundError
from mergeseek.retrieval.format import hit_dict, result_dict
from mergeseek.retrieval.search import FROM_INDEX, Hit, Searcher, TemporalHit

log = logging.getLogger(__name__)

TEXT_CACHE_SIZE = 512
MAX_K = 1000
VIDEO_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".webm": "video/webm", ".mkv": "video/x-matroska",
               ".mov": "video/quicktime", ".avi": "video/x-msvideo", ".ogv": "video/ogg"}  # what a browser may play


NotFound = NotFoundError  # the web app's name for it (HTTP 404)


class CachedSearcher(Searcher):
    """A ``Searcher`` that keeps the text vectors of recent queries and runs one encode at a time.

    The merge patches keep per-forward state on the model's modules, so two forwards must never
    overlap; FAISS searches and metadata lookups run concurrently.
    """

    def __init__(self, *args, cache_size: int = TEXT_CACHE_SIZE, **kwargs):
        super().__init__(*args, **kwargs)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        self.encode_lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0

    def text_vector(self, text: str) -> np.ndarray:
        if text is None or not text.strip():
            return super().text_vector(text)  # raises the usual message
        key = text.strip()
        with self._cache_lock:
            vec = self._cache.get(key)
            if vec is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return vec
        with self.encode_lock:
            vec = super().text_vector(key)
        vec.setflags(write=False)
        with self._cache_lock:
            self.cache_misses += 1
            self._cache[key] = vec
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return vec

    def image_vector(self, image: Any) -> np.ndarray:
        with self.encode_lock:
            return super().image_vector(image)


@dataclass(frozen=True)
class VideoFile:
    path: Path
    media_type: str
    sig: Optional[str] = None  # "size-mtime_ns" recorded at index time; the file is served only while it matches


class Catalog:
    """The live rows of an index, addressable by id (read-only, thread-safe).

    Args:
        searcher: the opened ``Searcher`` (its store gives the manifest, metadata and shards).
    """

    def __init__(self, searcher: Searcher):
        from mergeseek.indexing.thumbs import ThumbReader

        store = searcher.store
        self.root = store.root
        m = store.manifest
        meta = store.read_meta()
        self.ids = meta.column("id").to_numpy()
        order = np.argsort(self.ids, kind="stable")
        self._sorted_ids, self._row_at = self.ids[order], order
        video = meta.column("video_id").dictionary_encode().combine_chunks()
        self.video_names: list[str] = video.dictionary.to_pylist()
        self.video_code = video.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        self.frame_idx = meta.column("frame_idx").to_numpy()
        self.pts_time = meta.column("pts_time").to_numpy()
        self.paths = meta.column("path")
        self.video_meta = searcher.video_meta  # release metadata, so a hit by id carries what a searched one does
        hashes = meta.column("hash").to_numpy()
        # Frames of one video in frame order, for the neighbour strip.
        self._by_video = np.lexsort((self.frame_idx, self.video_code))
        self._pos = np.empty_like(self._by_video)
        self._pos[self._by_video] = np.arange(len(self._by_video))
        codes_sorted = self.video_code[self._by_video]
        self._video_start = np.searchsorted(codes_sorted, np.arange(len(self.video_names)), "left")
        self._video_end = np.searchsorted(codes_sorted, np.arange(len(self.video_names)), "right")
        self._video_codes = {v: i for i, v in enumerate(self.video_names)}
        # Videos the browser may fetch: only video sources, by the id the index gave them.
        self.videos: dict[str, VideoFile] = {}
        self.kinds: dict[str, str] = {}
        for key, e in m.sources.items():
            self.kinds[e.video_id] = e.kind
            if e.kind == "video":
                self.videos[e.video_id] = _video_file(Path(key), e.fingerprint)
        # Keyframe folders of an AI Challenge release: the release's own video, when indexing recorded
        # it in videos.json (indexing.aic), plays at the keyframe's time.
        for vid, entry in self.video_meta.items():
            if vid in self.kinds and vid not in self.videos and isinstance(entry, dict) and entry.get("video_path"):
                p = Path(str(entry["video_path"]))
                if p.suffix.lower() in VIDEO_TYPES:
                    sig = entry.get("video_sig")
                    self.videos[vid] = _video_file(p, sig if isinstance(sig, str) else None)
        self._searcher = searcher  # its stored vectors (retrieval.scope), read at the first "more like this"
        self.thumbs = ThumbReader(self.root, list(m.shards), self.ids, hashes)

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, id_: int) -> int:
        """Row of ``id_``; raises ``NotFound`` for an id the index does not hold."""
        i = int(np.searchsorted(self._sorted_ids, id_))
        if i >= len(self._sorted_ids) or self._sorted_ids[i] != id_:
            raise NotFound(f"no frame with id {id_} in this index")
        return int(self._row_at[i])

    def hit(self, row: int, score: float = 0.0) -> Hit:
        vid = self.video_names[self.video_code[row]]
        return Hit(float(score), vid, int(self.frame_idx[row]), float(self.pts_time[row]), self.paths[row].as_py(),
                   int(self.ids[row]), self.video_meta.get(vid))

    def vector(self, id_: int) -> np.ndarray:
        from mergeseek.retrieval.scope import stored_vectors

        self.row(id_)  # live rows only
        return stored_vectors(self._searcher).get([id_])

    def find(self, video_id: str, frame_idx: int) -> Optional[int]:
        """Row of the frame ``frame_idx`` of ``video_id`` (None when the index does not hold it)."""
        code = self._video_codes.get(video_id)
        if code is None:
            return None
        lo, hi = int(self._video_start[code]), int(self._video_end[code])
        frames = self.frame_idx[self._by_video[lo:hi]]
        i = int(np.searchsorted(frames, frame_idx))
        return int(self._by_video[lo + i]) if i < len(frames) and frames[i] == frame_idx else None

    def neighbours(self, id_: int, n: int) -> tuple[list[Hit], Hit, list[Hit]]:
        row = self.row(id_)
        p = int(self._pos[row])
        code = self.video_code[row]
        lo, hi = int(self._video_start[code]), int(self._video_end[code])
        before = [self.hit(int(r)) for r in self._by_video[max(lo, p - n) : p]]
        after = [self.hit(int(r)) for r in self._by_video[p + 1 : min(hi, p + 1 + n)]]
        return before, self.hit(row), after

    def video(self, video_id: str) -> VideoFile:
        v = self.videos.get(video_id)
        if v is None:
            what = "is not a video file (keyframes or images)" if video_id in self.kinds else "is not in this index"
            raise NotFound(f"video {video_id!r} {what}")
        # Serve only the file that was indexed: a regular file (links followed, as when indexing)
        # whose size and modification time are still those recorded, so a video replaced by a link
        # to another file (/etc/passwd, a private key) after indexing is never streamed.
        from mergeseek.runtime import regular_file_sig

        try:
            real, sig = regular_file_sig(v.path)
        except OSError:
            raise NotFound(f"video {video_id!r} was indexed from {v.path.name}, which is no longer there") from None
        except ValueError:
            raise NotFound(f"video {video_id!r} was indexed from {v.path.name}, which is no longer a regular file") from None
        if v.sig is None:
            raise NotFound(f"video {video_id!r} has no recorded file signature (indexed by an older version); run "
                           f"`cli.py index` on its release again to play it")
        if sig != v.sig:
            raise NotFound(f"video {video_id!r} ({v.path.name}) changed since it was indexed; index it again to play it")
        return VideoFile(real, v.media_type, v.sig)

    def thumb(self, id_: int) -> bytes:
        self.row(id_)
        data = self.thumbs.get(id_)
        if data is None:
            raise NotFound(f"frame {id_} has no thumbnail; run `cli.py thumbs --index {self.root}`")
        return data


def _video_file(p: Path, sig: Optional[str]) -> VideoFile:
    return VideoFile(p, VIDEO_TYPES.get(p.suffix.lower(), "application/octet-stream"), sig)


class Engine:
    """Searches and lookups for the web app; every method is safe to call from many threads."""

    def __init__(self, searcher: CachedSearcher, fused: Sequence = ()):
        self.searcher = searcher
        self.catalog = Catalog(searcher)
        self.manifest = searcher.manifest
        self.fused = list(fused)  # searchers of other models' indexes of the same media (serve --fuse)
        from mergeseek.serve.clips import ClipMaker

        self.clips = ClipMaker()  # previews of videos the browser cannot play (/api/clip)
        if self.fused:
            from mergeseek.retrieval.fusion import check_same_media

            check_same_media([searcher.store, *(s.store for s in self.fused)])

    @classmethod
    def open(cls, index_dir: Union[str, Path], model: str = FROM_INDEX, pretrained: str = FROM_INDEX,
             merge: str = FROM_INDEX, device: str = "auto", precision: str = "fp32", ngpu: int = -1,
             translate=None, fuse: Sequence = (), nprobe: Optional[int] = None, ef_search: int = 64) -> "Engine":
        """``fuse``: more index folders of the same media built with other models; plain text searches
        then fuse every index's ranking by reciprocal rank (``retrieval.fusion``), hits stay this index's."""
        if fuse:
            from mergeseek.indexing.store import IndexStore
            from mergeseek.retrieval.fusion import check_same_media

            check_same_media([IndexStore.open_for_read(Path(d)) for d in [index_dir, *fuse]])  # before the models load
        knobs = {"nprobe": nprobe, "ef_search": ef_search}
        others = [CachedSearcher.open(d, device=device, precision=precision, ngpu=ngpu, translate=translate, **knobs)
                  for d in fuse]
        return cls(CachedSearcher.open(index_dir, model=model, pretrained=pretrained, merge=merge, device=device,
                                       precision=precision, ngpu=ngpu, translate=translate, **knobs), others)

    # ------------------------------------------------------------------ shapes (retrieval.format's, plus URLs)
    def links(self, h: Hit) -> tuple[Optional[str], Optional[str]]:
        """The hit's thumbnail and video URLs on this server (None where there is none)."""
        return (f"/api/thumb/{h.id}" if h.id in self.catalog.thumbs else None,
                f"/api/video/{quote(h.video_id, safe='')}" if h.video_id in self.catalog.videos else None)

    def hit_dict(self, h: Hit) -> dict:
        return hit_dict(h, self.links, server_paths=False)  # the browser gets URLs, never server paths

    def result_dict(self, r: Union[Hit, TemporalHit]) -> dict:
        return result_dict(r, self.links, server_paths=False)

    def identity(self) -> dict:
        """What a basket is keyed by: ``uid`` names this index (its folder, creation time and model: a
        rebuilt or other index gets another), ``generation`` its committed version (``manifest.json``)."""
        import hashlib
        import os

        m = self.manifest
        seed = "\n".join([os.path.realpath(self.catalog.root), m.created, m.model, m.pretrained, str(m.dim)])
        return {"uid": hashlib.sha256(seed.encode("utf-8")).hexdigest()[:16], "generation": m.generation,
                "created": m.created, "name": Path(self.catalog.root).name, "model": m.model}

    def health(self) -> dict:
        m = self.manifest
        s = self.searcher
        return {"status": "ok", "index": self.identity(), "objects": self.object_names()[:500], "vectors": len(self.catalog), "videos": len(self.catalog.video_names),
                "thumbnails": len(self.catalog.thumbs), "model": m.model, "pretrained": m.pretrained, "merge": m.merge,
                "dim": m.dim, "index_type": m.index_type,
                "fused": [{"name": Path(f.store.root).name, "model": f.manifest.model} for f in getattr(self, "fused", [])],
                "text_cache": {"hits": getattr(s, "cache_hits", 0), "misses": getattr(s, "cache_misses", 0)}}

    # ------------------------------------------------------------------ queries
    def search(self, q: str, k: int = 20, then: Optional[str] = None, within: float = 30.0,
               per_video: bool = False) -> list:
        _check_k(k)
        from mergeseek.retrieval.hybrid import search_hybrid, split_channels

        visual, said = split_channels(q)  # "a crowd ocr: HÀ NỘI asr: thủ tướng": text channels too (--ocr, --asr)
        if getattr(self, "fused", None):  # (an Engine made without __init__, as tests do, has none)
            if said and then is not None and then.strip():
                raise InputError("ocr: and asr: go with a description or alone, not with a then… event")
            return self._fused(text=visual, thens=[then] if then is not None and then.strip() else [], within=within,
                               k=k, per_video=per_video, ocr=said.get("ocr"), asr=said.get("asr"))
        if said:
            if then is not None and then.strip():
                raise InputError("ocr: and asr: go with a description or alone, not with a then… event")
            return search_hybrid(self.searcher, visual, said.get("ocr"), k=k, per_video=per_video, asr=said.get("asr"))
        if then is not None and then.strip():
            return self.searcher.search_temporal(q, then, within_s=within, k=k, per_video=per_video)
        return self.searcher.search_text(q, k=k, per_video=per_video)

    def _fused(self, **query) -> list:
        """``serve --fuse``: the query over this index and the fused ones (``retrieval.fusion.fused_query``)."""
        from mergeseek.retrieval.fusion import fused_query

        return fused_query([self.searcher, *self.fused], **query)

    def object_names(self) -> list[str]:
        """Detected object classes of an AI Challenge release (``objects.parquet``), for the page's filter."""
        if not hasattr(self, "_objects"):
            from mergeseek.indexing.aic import object_names

            self._objects = object_names(Path(self.catalog.root))
        return self._objects

    def query(self, events: Sequence[str] = (), within: Any = 30.0, k: int = 20, per_video: bool = False,
              like: Sequence[int] = (), unlike: Sequence[int] = (), video: Optional[str] = None,
              object_name: Optional[str] = None) -> list:
        """``POST /api/search``: events in order (one: a plain query; ``ocr:`` works there), feedback
        marks, one video (``retrieval.query.run_query``). Marked ids the index lacks: ``InputError``."""
        _check_k(k)
        from mergeseek.retrieval.query import run_query

        events = list(events)
        text = events[0] if events else None
        from mergeseek.retrieval.hybrid import split_channels

        if any(split_channels(e)[1] for e in events) and (len(events) > 1 or like or unlike or video):
            raise InputError("ocr: and asr: go with a plain description or alone, not with events, marks or one video")
        allow = None
        if object_name is not None and object_name.strip():
            from mergeseek.indexing.aic import objects_in_frames

            allow = objects_in_frames(Path(self.catalog.root), object_name)
        if getattr(self, "fused", None) and (allow is not None or len(events) != 1 or like or unlike or video is not None):
            return self._fused(text=text, thens=events[1:], within=within, k=k, per_video=per_video, like=like,
                               unlike=unlike, video=video, allow=allow)
        if allow is None and len(events) == 1 and not (like or unlike) and video is None:
            return self.search(text, k=k, per_video=per_video)  # the GET search (ocr: prefix, caches)
        return run_query(self.searcher, text, None, events[1:], within, k=k, per_video=per_video, like=like,
                         unlike=unlike, video=video, allow=allow)

    def rows_for_items(self, items: Sequence[Sequence[tuple]]) -> list:
        """Basket items (each a list of ``(video_id, frame_idx)``, one per event) as results, in order;
        one ``InputError`` naming an item this index does not hold."""
        from mergeseek.retrieval.events import EventChain

        out = []
        for n, item in enumerate(items, start=1):
            hits = []
            for video_id, frame_idx in item:
                row = self.catalog.find(video_id, frame_idx)
                if row is None:
                    raise InputError(f"basket item {n}: frame {frame_idx} of video {video_id!r} is not in this index")
                hits.append(self.catalog.hit(row))
            if len({h.video_id for h in hits}) > 1:
                raise InputError(f"basket item {n} spans several videos; a chain is in one video")
            out.append(hits[0] if len(hits) == 1 else TemporalHit(0.0, *hits) if len(hits) == 2
                       else EventChain(0.0, tuple(hits)))
        return out

    def search_image(self, image: Any, k: int = 20, per_video: bool = False) -> list[Hit]:
        _check_k(k)
        if getattr(self, "fused", None):
            return self._fused(image=image, k=k, per_video=per_video)
        return self.searcher.search_image(image, k=k, per_video=per_video)

    def similar(self, id_: int, k: int = 20, per_video: bool = False) -> list[Hit]:
        """Frames nearest to frame ``id_`` (the frame itself left out)."""
        _check_k(k)
        if getattr(self, "fused", None):  # "more like this" = the frame liked alone, in every index
            self.catalog.row(id_)  # 404 for an id this index lacks
            hits = self._fused(like=[id_], k=min(k + 1, self.searcher.size), per_video=per_video)
            return [h for h in hits if h.id != id_][:k]
        vec = self.catalog.vector(id_)
        hits = self.searcher.search_vector(vec, k=min(k + 1, self.searcher.size), per_video=per_video)
        return [h for h in hits if h.id != id_][:k]

    def rows_for(self, items: Sequence) -> list:
        """Basket entries (an id, or [first_id, then_id] of one video) as results, in the given order."""
        out = []
        for it in items:
            if isinstance(it, (list, tuple)):
                if len(it) != 2:
                    raise InputError(f"basket entry {it!r}: give an id or a pair [first_id, then_id]")
                a, b = (self.catalog.hit(self._known(x)) for x in it)
                if a.video_id != b.video_id:
                    raise InputError(f"basket pair {list(it)} spans two videos ({a.video_id}, {b.video_id})")
                out.append(TemporalHit(0.0, a, b))
            else:
                out.append(self.catalog.hit(self._known(it)))
        return out

    def _known(self, x) -> int:
        if isinstance(x, bool) or not isinstance(x, int):
            raise InputError(f"basket entry {x!r} is not a frame id (an integer)")
        try:
            return self.catalog.row(x)
        except NotFound:
            raise InputError(f"basket entry {x}: no frame with that id in this index") from None


def _check_k(k: int) -> None:
    if not 1 <= int(k) <= MAX_K:
        raise InputError(f"k={k} is not valid; ask for 1..{MAX_K} results")


def submission_csv(results: Sequence, answer: Optional[str] = None) -> tuple[str, int]:
    """The AI Challenge submission text for ``results`` through the one writer (``retrieval.submission``).

    No header, distinct rows in order, at most 100; ``answer`` makes it a QA file (``video_id,frame_idx,answer``).
    """
    from mergeseek.retrieval.submission import QA, render, submission_rows

    rows = submission_rows(list(results), task=QA if answer else None, answer=answer or "")
    return render(rows), len(rows)
