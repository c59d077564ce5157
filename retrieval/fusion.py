"""One query over several indexes of the same media built with different models (``search --fuse``).

``cli.py search "a red car" --index ix_b32 --fuse ix_l14 [--fuse ix_siglip]``: each index encodes
the query with its own model and ranks its frames (its best ``depth`` = ``max(5 k, 100)``); the
rankings are fused by reciprocal rank on the frame's ``(video_id, frame_idx)``, the one RRF of
``retrieval.hybrid.fuse`` (``RRF_K = 60``): a frame scores

    sum over the indexes that ranked it of weight / (60 + rank)

with weight 1 for every index (``weights`` in ``search_fused`` changes that; the CLI uses 1s). A
frame two models agree on outranks one that only one model put first, whatever the scale of each
model's similarities. A hit is the first index's frame (its id, path and metadata) when that index
holds it, ranked or not (otherwise another index's, with id -1), with ``channels`` saying each
index's rank and score.

Same media: every index must hold the same set of video ids (frames may be sampled differently;
only frames at the same ``frame_idx`` fuse); anything else is one ``InputError`` line.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence, Union

from mergeseek.errors import InputError
from mergeseek.retrieval.hybrid import RRF_K, fuse
from mergeseek.retrieval.search import Hit, best_per_video


def index_labels(searchers: Sequence) -> list[str]:
    """A short name per index for a hit's ``channels``: its folder name (``name@i`` when names repeat)."""
    names = [Path(s.store.root).name or "index" for s in searchers]
    return [f"{n}@{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def check_same_media(stores: Sequence) -> None:
    """One line when the indexes (``IndexStore`` s) do not hold the same videos."""
    first = {e.video_id for e in stores[0].manifest.sources.values()}
    for s in stores[1:]:
        other = {e.video_id for e in s.manifest.sources.values()}
        if other != first:
            only_a, only_b = sorted(first - other), sorted(other - first)
            example = f"{only_a[0]!r} only in {stores[0].root}" if only_a else f"{only_b[0]!r} only in {s.root}"
            raise InputError(f"--fuse {s.root} indexes other media than {stores[0].root} "
                             f"({len(only_a) + len(only_b)} video(s) differ, e.g. {example}); fuse indexes of the same "
                             "videos built with different models")


def search_fused(searchers: Sequence, text: str, k: int = 20, per_video: bool = False, depth: Optional[int] = None,
                 weights: Optional[Sequence[float]] = None, k_rrf: int = RRF_K) -> list[Hit]:
    """The best ``k`` frames of ``text`` by RRF of each searcher's ranking (see the module docstring)."""
    return fused_query(searchers, text, k=k, per_video=per_video, depth=depth, weights=weights, k_rrf=k_rrf)


def fused_query(searchers: Sequence, text: Optional[str] = None, image=None, thens: Sequence[str] = (), within=30.0,
                k: int = 20, per_video: bool = False, like: Sequence[int] = (), unlike: Sequence[int] = (),
                video: Optional[str] = None, allow: Optional[set] = None, ocr: Optional[str] = None,
                asr: Optional[str] = None, depth: Optional[int] = None, weights: Optional[Sequence[float]] = None,
                k_rrf: int = RRF_K) -> list:
    """Every query kind of ``retrieval.query.run_query`` over several indexes of the same media.

    * a text or an image, with ``like`` / ``unlike`` marks, inside one ``video``, with an ``allow``
      set (``--object``): each index runs the query with its own model (the marks are the first
      index's frame ids, taken in the others as the same ``(video_id, frame_idx)``; a marked frame an
      index lacks is left out there) and ranks its best ``depth`` frames; the rankings are fused;
    * ``ocr`` / ``asr`` words: the first index's text channels (``retrieval.hybrid.text_hits``) are
      more rankings in the same fusion;
    * ``thens`` (events in order): each event's rankings are fused first, then the chain search of
      ``retrieval.events`` runs on the fused scores (a chain scores the sum of its frames' RRF scores;
      two events give ``TemporalHit`` pairs as ``search_temporal`` does).
    """
    from mergeseek.retrieval.query import check_session

    if len(searchers) < 2:
        raise InputError("--fuse needs a second index (--fuse DIR)")
    check_same_media([s.store for s in searchers])
    if weights is not None and len(weights) != len(searchers):
        raise InputError(f"{len(weights)} fusion weights for {len(searchers)} indexes; give one per index")
    thens = list(thens or ())
    said = {c: w for c, w in (("ocr", ocr), ("asr", asr)) if w is not None and w.strip()}
    if said and (image is not None or thens or like or unlike or video is not None):
        raise InputError("ocr: and asr: go with a plain description or alone, not with an image, events, marks or one video")
    check_session(text, image, thens, like, unlike, video)
    if thens and allow is not None:
        raise InputError("--object filters text and image queries; drop --then or --object")
    labels = index_labels(searchers)
    w = None if weights is None else {name: float(x) for name, x in zip(labels, weights)}
    if thens:
        return _fused_events(searchers, labels, [text, *thens], within, k, per_video, video, w, k_rrf, depth)
    depth = depth or max(5 * k, 100)
    rankings: dict = {}
    if (text and text.strip()) or image is not None or like:
        from mergeseek.retrieval.query import run_query

        for n, (s, name) in enumerate(zip(searchers, labels)):
            mine_like = like if n == 0 else _same_frames(searchers[0], like, s)
            mine_unlike = unlike if n == 0 else _same_frames(searchers[0], unlike, s)
            if like and not mine_like and not (text and text.strip()) and image is None:
                continue  # only marks, and this index holds none of the liked frames
            rankings[name] = run_query(s, text, image, k=min(depth, s.size), like=mine_like, unlike=mine_unlike,
                                       video=video, allow=allow)
    if said:
        from mergeseek.retrieval.hybrid import text_hits

        for channel, words in said.items():
            rankings[channel] = text_hits(searchers[0], words, channel, depth)
    out = _rrf(searchers[0], rankings, w, k_rrf)
    if per_video:
        out = best_per_video(out)
    return out[:k]


def _rrf(first, rankings: dict, weights: Optional[dict], k_rrf: int) -> list[Hit]:
    """``{label: [Hit, best first]}`` fused on ``(video_id, frame_idx)``: the first index's frames, with
    ``channels`` giving each ranking's rank and score (a text channel's matched text too)."""
    keys: dict = {}  # (video_id, frame_idx) -> a small int for fuse()
    ranked, hit_of, info = {}, {}, {}
    for n, (name, hits) in enumerate(rankings.items()):
        ranked[name] = []
        for rank, h in enumerate(hits, start=1):
            key = keys.setdefault((h.video_id, h.frame_idx), len(keys))
            ranked[name].append(key)
            if key not in hit_of or (n == 0 and hit_of[key].id == -1):
                hit_of[key] = h if n == 0 or name in ("ocr", "asr") else _in_first(first, h)  # ids: the first index's
            extra = {f: v for f, v in ((h.channels or {}).get(name) or {}).items() if f == "text"}
            info.setdefault(key, {})[name] = {"rank": rank, "score": round(h.score, 6), **extra}
    return [replace(hit_of[key], score=round(score, 6), channels=info[key]) for key, score, _ in fuse(ranked, k_rrf, weights)]


def _fused_events(searchers, labels, events, within, k, per_video, video, weights, k_rrf, depth) -> list:
    from mergeseek.retrieval.events import chain_events, event_texts, gap_windows
    from mergeseek.retrieval.scope import search_in_video
    from mergeseek.retrieval.search import TemporalHit

    events = event_texts(events[0], list(events[1:]))
    gap_windows(within, len(events))  # a bad window fails before any encoding
    per_event = []
    for e in events:
        rankings = {}
        for s, name in zip(searchers, labels):
            q = s.text_vector(e)
            rankings[name] = (search_in_video(s, q, video, k=None) if video is not None
                              else s.search_vectors(q, min(s.size, max(int(depth or 1000), 20 * k)))[0])
        per_event.append(_rrf(searchers[0], rankings, weights, k_rrf))
    chains = chain_events(per_event, within)
    if per_video:
        chains = best_per_video(chains)
    chains = chains[:k]
    return [TemporalHit(c.score, *c.hits) for c in chains] if len(events) == 2 else chains


def _same_frames(first, ids: Sequence[int], other) -> list[int]:
    """The ids in ``other`` of the first index's frames ``ids`` (same video and frame number; frames
    ``other`` lacks left out). An id the first index lacks is left for its own check (one line there)."""
    import numpy as np

    from mergeseek.retrieval.scope import video_rows

    out = []
    for i in ids:
        at = np.flatnonzero(np.asarray(first._ids) == int(i))
        if len(at) == 0:
            continue
        vid, frame = first._video[at[0]], int(first._frame[at[0]])
        try:
            rows = video_rows(other, vid)
        except InputError:
            continue
        mine = rows[np.asarray(other._frame)[rows] == frame]
        if len(mine):
            out.append(int(np.asarray(other._ids)[mine[0]]))
    return out


def _in_first(first, h: Hit) -> Hit:
    """``h`` (a frame another index ranked) as the first index's frame when it has one, else with id -1."""
    import numpy as np

    from mergeseek.retrieval.scope import video_rows

    try:
        rows = video_rows(first, h.video_id)
    except InputError:
        return replace(h, id=-1)
    at = rows[np.asarray(first._frame)[rows] == h.frame_idx]
    if len(at) == 0:
        return replace(h, id=-1)
    own = first._hits(np.asarray([h.score], np.float32), np.asarray(first._ids)[at[:1]])[0]
    return own


def open_fused(index_dirs: Sequence[Union[str, Path]], **open_kwargs) -> list:
    """A ``Searcher`` per index, each with the encoder its manifest names (checks the media first)."""
    from mergeseek.indexing.store import IndexStore
    from mergeseek.retrieval.search import Searcher

    check_same_media([IndexStore.open_for_read(Path(d)) for d in index_dirs])  # before minutes of model loading
    kw = {k: v for k, v in open_kwargs.items() if k not in ("model", "pretrained", "merge")}
    return [Searcher.open(d, **kw) for d in index_dirs]


__all__ = ["check_same_media", "fused_query", "index_labels", "open_fused", "search_fused"]
