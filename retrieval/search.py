"""Query -> hits over an index directory: text, image and temporal ("A then B within W s") queries.

``Searcher`` loads the manifest, the FAISS index and its delta (the vectors added since index.faiss
was saved: searched too, the two top-k lists merged exactly by score; rows a run interrupted before
its FAISS step left out are read from the shards, and the whole index is rebuilt in memory only when
index.faiss itself is unusable) and the metadata, and refuses an encoder whose model, weights or
dimension differ from the ones the index was built with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from mergeseek.errors import IndexMismatchError, InputError, path_is_not
from mergeseek.indexing.faiss_index import build_index, for_search, open_saved, search_with_delta
from mergeseek.indexing.store import IndexStore, check_identity

log = logging.getLogger(__name__)

# A query vector must come from the same embedding space: same model, same weights (merging
# changes image vectors only slightly and text vectors not at all, so it is not checked here).
SEARCH_IDENTITY = ("model", "pretrained", "dim")
FROM_INDEX = "from-index"


@dataclass(frozen=True)
class Hit:
    """One retrieved frame. ``pts_time`` is seconds (NaN when the source had no timestamps).

    ``video`` is the video's metadata from the index's ``videos.json`` (AI Challenge releases:
    title, watch_url, video_path, ...; see ``indexing.aic``), None when there is none.
    """

    score: float
    video_id: str
    frame_idx: int
    pts_time: float
    path: str
    id: int = -1
    video: Optional[dict] = field(default=None, compare=False, repr=False)
    # Hybrid queries (retrieval.hybrid): per channel that matched, its rank (1 = best), score and,
    # for a text channel, the frame's text with the matched words in [brackets].
    channels: Optional[dict] = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class TemporalHit:
    """A frame of the first event followed, in the same video, by a frame of the second."""

    score: float
    first: Hit
    then: Hit

    @property
    def video_id(self) -> str:
        return self.first.video_id


class Searcher:
    """Search one index directory.

    Args:
        index_dir: a folder written by ``indexing.index_paths``.
        encoder: an ``encoders.Encoder`` for text/image queries (None: vector queries only).
        ngpu: GPUs for FAISS search (-1: all that exist).
        nprobe: IVF lists visited per query; ef_search: HNSW search depth.
        translate: applied to each description before the text tower reads it (a
            ``retrieval.translate`` spec such as ``"py:mymod:vi_to_en"``, or a callable).
    """

    def __init__(self, index_dir: Union[str, Path], encoder: Any = None, ngpu: int = -1, nprobe: Optional[int] = None,
                 ef_search: int = 64, translate: Any = None):
        from mergeseek.retrieval.translate import get_translator

        self.translate = get_translator(translate) if isinstance(translate, str) else translate
        self.store = IndexStore.open_for_read(Path(index_dir))
        self.manifest = self.store.manifest
        self.encoder = encoder
        if encoder is not None:
            check_identity(self.store.root, self.manifest, encoder.describe(), SEARCH_IDENTITY, action="search")
        meta = self.store.read_meta()
        if meta.num_rows == 0:
            raise InputError(f"index {index_dir} holds no vectors; index some videos into it first")
        self._ids = meta.column("id").to_numpy()
        self._order = np.argsort(self._ids, kind="stable")
        self._sorted_ids = self._ids[self._order]
        self._video = meta.column("video_id").to_pylist()
        self._frame = meta.column("frame_idx").to_numpy()
        self._pts = meta.column("pts_time").to_numpy()
        self._path = meta.column("path").to_pylist()
        from mergeseek.indexing.aic import load_video_meta

        self.video_meta = load_video_meta(self.store.root)
        main, delta = self._load_faiss(ngpu)
        self.index = for_search(main, ngpu=ngpu, nprobe=nprobe, ef_search=ef_search)  # nprobe/efSearch: set on this one
        self.delta = for_search(delta, ngpu=ngpu) if delta is not None else None  # exact: no knobs

    @classmethod
    def open(cls, index_dir: Union[str, Path], model: str = FROM_INDEX, pretrained: str = FROM_INDEX,
             merge: str = FROM_INDEX, device: str = "auto", precision: str = "fp32", batch_size: int = 32,
             **kwargs) -> "Searcher":
        """Build the encoder the index needs ("from-index" takes the manifest's value) and open it."""
        from mergeseek.encoders import Encoder
        from mergeseek.retrieval.translate import get_translator

        if isinstance(kwargs.get("translate"), str):  # a bad translator fails before the model loads
            kwargs["translate"] = get_translator(kwargs["translate"])
        m = IndexStore.open_for_read(Path(index_dir)).manifest
        asked = {"model": model, "pretrained": pretrained}
        wanted = {k: (getattr(m, k) if v in (None, "", FROM_INDEX) else v) for k, v in asked.items()}
        check_identity(Path(index_dir), m, wanted, ("model", "pretrained"), action="search")
        encoder = Encoder(
            model_name=wanted["model"], pretrained=wanted["pretrained"], device=device, precision=precision,
            merge=m.merge if merge in (None, "", FROM_INDEX) else merge, batch_size=batch_size,
        )
        return cls(index_dir, encoder, **kwargs)

    def _load_faiss(self, ngpu: int):
        """(main index, delta or None) over the live rows (``faiss_index.open_saved``), else rebuilt in memory."""
        main, delta = open_saved(self.store, self._ids)
        if main is not None:
            return main, delta
        log.warning(
            "index.faiss in %s is missing, damaged or older than its shards (interrupted run?); rebuilt it in memory. "
            "Run `cli.py repair --index %s` (or `cli.py index` on the same folder) to save it", self.store.root,
            self.store.root,
        )
        ids, vecs = self.store.read_vectors()
        return build_index(vecs, ids, self.manifest.index_type, ngpu=ngpu, memory_budget=self.manifest.memory_budget), None

    @property
    def size(self) -> int:
        return len(self._ids)

    # ------------------------------------------------------------------ queries
    def search_vectors(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Nearest frames for each row of ``queries`` (float32 [m, dim], L2-normalised)."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.manifest.dim:
            raise IndexMismatchError(
                f"query vectors have dim {q.shape[1]} but index {self.store.root} has dim {self.manifest.dim} "
                f"({self.manifest.model}); encode queries with {self.manifest.model}"
            )
        k = max(1, min(int(k), self.size))
        scores, ids = search_with_delta(self.index, self.delta, q, k)
        return [self._hits(s, i) for s, i in zip(scores, ids)]

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
        valid = ids >= 0
        scores, ids = scores[valid], ids[valid]
        rows = self._order[np.searchsorted(self._sorted_ids, ids)]
        return [
            Hit(float(s), self._video[r], int(self._frame[r]), float(self._pts[r]), self._path[r], int(i),
                self.video_meta.get(self._video[r]))
            for s, i, r in zip(scores, ids, rows)
        ]

    def search_vector(self, vector: np.ndarray, k: int = 20, per_video: bool = False,
                      allow: Optional[set] = None) -> list[Hit]:
        """Hits for one query vector; ``per_video`` keeps the best hit of each video, ``allow`` only
        the frames in it (a set of ``(video_id, frame_idx)``), searching deeper as needed."""
        if not per_video and allow is None:
            return self.search_vectors(vector, k)[0]
        depth = min(self.size, max(4 * k, 64))
        while True:
            best = self.search_vectors(vector, depth)[0]
            if allow is not None:
                best = [h for h in best if (h.video_id, h.frame_idx) in allow]
            if per_video:
                best = best_per_video(best)
            if len(best) >= k or depth >= self.size:
                return best[:k]
            depth = min(self.size, depth * 4)

    def text_vector(self, text: str) -> np.ndarray:
        if text is None or not text.strip():
            raise InputError("empty query; give a description such as \"a man riding a bike\", or --image query.jpg")
        self._need_encoder()
        if self.translate is not None:
            text = self.translate(text)
        return self.encoder.encode_texts([text.strip()])

    def image_vector(self, image: Union[str, Path, np.ndarray, Any]) -> np.ndarray:
        self._need_encoder()
        return self.encoder.encode_images([load_query_image(image)])

    def search_text(self, text: str, k: int = 20, per_video: bool = False, allow: Optional[set] = None) -> list[Hit]:
        return self.search_vector(self.text_vector(text), k, per_video, allow)

    def search_image(self, image: Union[str, Path, np.ndarray, Any], k: int = 20, per_video: bool = False,
                     allow: Optional[set] = None) -> list[Hit]:
        return self.search_vector(self.image_vector(image), k, per_video, allow)

    def search_temporal(self, first: str, then: str, within_s: float = 30.0, k: int = 20, per_video: bool = False,
                        depth: int = 1000, video: Optional[str] = None) -> list[TemporalHit]:
        """Frames of ``first`` followed in the same video by ``then`` within ``within_s`` seconds
        (``retrieval.events`` with two events; ``video``: inside that video only)."""
        from mergeseek.retrieval.events import search_events

        chains = search_events(self, [first, then], within_s, k=k, depth=depth, per_video=per_video, video=video)
        return [TemporalHit(c.score, *c.hits) for c in chains]

    def _need_encoder(self) -> None:
        if self.encoder is None:
            raise InputError("this Searcher was opened without an encoder; use Searcher.open(...) for text or image queries")


def check_query(text: Optional[str], image: Optional[Union[str, Path]], then, k: int, ocr: Optional[str] = None,
                like: Sequence[int] = (), unlike: Sequence[int] = (), video: Optional[str] = None,
                fuse: Sequence = (), asr: Optional[str] = None) -> None:
    """Refuse a bad command-line query in one line, before any model or index is loaded.

    ``then``: None, one next event or a list of them (``retrieval.events``)."""
    from mergeseek.retrieval.query import check_session

    thens = [] if then is None else [then] if isinstance(then, str) else list(then)
    marks = bool(like or unlike)
    said = {name: words for name, words in (("--ocr", ocr), ("--asr", asr)) if words is not None}  # text channels
    for name, words in said.items():
        if not words.strip():
            where = "on screen, e.g. --ocr \"Hà Nội\"" if name == "--ocr" else "spoken, e.g. --asr \"prime minister\""
            raise InputError(f"empty {name} query; give the words to find {where}")
        if image is not None or thens or marks or video is not None:
            raise InputError(f"{name} goes with a text query or alone, not with --image or --then (nor --like/--unlike, --video)")
    if not said and image is None and (text is None or not text.strip()) and not like:
        raise InputError("empty query; give a description such as \"a man riding a bike\", or --image query.jpg")
    if image is not None and text:
        raise InputError("give either a text query or --image, not both")
    for t in thens:
        if image is not None or not isinstance(t, str) or not t.strip():
            raise InputError("--then needs a text query and a non-empty next event, e.g. \"a man\" --then \"a car\"")
    check_session(text, image, thens, like, unlike, video)
    if image is not None:
        load_query_image(image)  # fail before loading the model
    if k < 1:
        raise InputError(f"-k {k} is not valid; ask for at least 1 result")


def run_search(index_dir: Union[str, Path], text: Optional[str] = None, image: Optional[Union[str, Path]] = None,
               then=None, within_s=30.0, k: int = 20, per_video: bool = False,
               model: str = FROM_INDEX, pretrained: str = FROM_INDEX, merge: str = FROM_INDEX, device: str = "auto",
               precision: str = "fp32", batch_size: int = 32, nprobe: Optional[int] = None, ef_search: int = 64,
               object_name: Optional[str] = None, ocr: Optional[str] = None, like: Sequence[int] = (),
               unlike: Sequence[int] = (), video: Optional[str] = None, fuse: Sequence = (), asr: Optional[str] = None,
               translate: Optional[str] = None) -> list:
    """One query from the command line: checks the query first (no model load for a bad one).

    ``nprobe`` (IVF lists visited) and ``ef_search`` (HNSW depth) trade speed for recall on
    approximate index types; exact ``Flat`` ignores them. ``object_name`` keeps only keyframes
    with that detected object (AI Challenge releases, ``indexing.aic.objects_in_frames``).
    ``ocr``: words on screen (``index --ocr``), fused with ``text`` when both are given
    (``retrieval.hybrid``); alone, no model is loaded; ``asr``: words spoken (``index --asr``), the
    same way. ``then`` (one or several next events,
    ``within_s`` one window or one per gap), ``like`` / ``unlike`` and ``video``: ``retrieval.query``.
    ``fuse``: more index folders of the same media, other models (``retrieval.fusion``).
    ``translate``: a ``retrieval.translate`` spec applied to the descriptions (not to ``ocr``/``asr``).
    """
    from mergeseek.retrieval.translate import get_translator

    check_query(text, image, then, k, ocr, like, unlike, video, fuse, asr)
    translator = get_translator(translate)  # a missing command fails before the model loads
    thens = [] if then is None else [then] if isinstance(then, str) else list(then)
    if thens:
        from mergeseek.retrieval.events import gap_windows

        gap_windows(within_s, len(thens) + 1)  # a bad window fails before the model loads
    from mergeseek.retrieval.scope import preflight

    visual = bool(text and text.strip())  # a text channel alone loads no model: the search itself says what is missing
    said = [name for name, words in (("ocr", ocr), ("asr", asr)) if words is not None] if visual else []
    preflight(index_dir, video, said, [*(like or ()), *(unlike or ())])  # what the index lacks, before the model loads
    opened = dict(model=model, pretrained=pretrained, merge=merge, device=device, precision=precision,
                  batch_size=batch_size, nprobe=nprobe, ef_search=ef_search, translate=translator)
    if fuse:
        from mergeseek.retrieval.fusion import fused_query, open_fused

        allow = None
        if object_name is not None:
            from mergeseek.indexing.aic import objects_in_frames

            allow = objects_in_frames(Path(index_dir), object_name)
        return fused_query(open_fused([index_dir, *fuse], **opened), text, image, thens, within_s, k=k,
                           per_video=per_video, like=like or (), unlike=unlike or (), video=video, allow=allow, ocr=ocr,
                           asr=asr)
    if ocr is not None or asr is not None:
        from mergeseek.retrieval.hybrid import search_hybrid

        if object_name is not None:
            raise InputError(f"--object filters image-channel queries; drop {'--ocr' if ocr is not None else '--asr'} or --object")
        searcher = (Searcher.open(index_dir, **opened) if visual else Searcher(index_dir, nprobe=nprobe, ef_search=ef_search))
        return search_hybrid(searcher, text if visual else None, ocr, k=k, per_video=per_video, asr=asr)
    allow = None
    if object_name is not None:
        from mergeseek.indexing.aic import objects_in_frames

        if then is not None:
            raise InputError("--object filters text and image queries; drop --then or --object")
        allow = objects_in_frames(Path(index_dir), object_name)
        if not allow:
            from mergeseek.indexing.aic import object_names

            names = object_names(Path(index_dir))
            raise InputError(f"no keyframe of {index_dir} has a detection of {object_name!r}; "
                             + (f"its objects are: {', '.join(names[:30])}{' ...' if len(names) > 30 else ''}"
                                if names else "its objects.parquet holds no detections"))
    from mergeseek.retrieval.query import run_query

    return run_query(Searcher.open(index_dir, **opened), text, image, thens, within_s, k=k, per_video=per_video,
                     like=like, unlike=unlike, video=video, allow=allow)


def best_per_video(hits: Sequence) -> list:
    """Keep the first (best) hit of each video, in order (hits, pairs or chains: anything with a video_id)."""
    from mergeseek.runtime import first_by

    return first_by(hits, lambda h: h.video_id)


def pair_events(hits_a: Sequence[Hit], hits_b: Sequence[Hit], within_s: float) -> list[TemporalHit]:
    """For each frame of event A, the best frame of B in (t_A, t_A + within_s] of the same video.

    Ranked by score_A + score_B (ties: A's order). Frames without a timestamp cannot take part.
    The two-event case of ``retrieval.events.chain_events``.
    """
    from mergeseek.retrieval.events import chain_events

    return [TemporalHit(c.score, *c.hits) for c in chain_events([hits_a, hits_b], within_s)]


def load_query_image(image: Union[str, Path, np.ndarray, Any]) -> Any:
    """A query image from a path (or an array / PIL image passed through); one clear error if unreadable."""
    if isinstance(image, (str, Path)):
        from PIL import Image

        from mergeseek.indexing.formats import read_rgb

        path = Path(image)
        if not path.is_file():
            raise InputError(f"query image {path} {path_is_not(path, 'file')}; pass an existing .jpg/.png file to --image")
        try:
            return Image.fromarray(read_rgb(path))  # the pixels indexing reads from the same file
        except Exception as exc:  # PIL raises several types for bad files
            raise InputError(f"query image {path} cannot be read ({str(exc)[:120]}); pass a JPEG or PNG file") from None
    return image
