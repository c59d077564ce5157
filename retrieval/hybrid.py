"""Queries over several channels: what is seen (the image vectors), what is written on screen (OCR
text) and, next, what is said (speech). ``cli.py search "a crowd" --ocr "HÀ NỘI"``.

Each channel ranks frames on its own: the image channel by the FAISS inner product of the text
query, a text channel by SQLite FTS5's BM25 over folded words (``indexing.text``: every word of the
query, then any of them). The rankings are fused by reciprocal rank: a frame scores

    sum over the channels that ranked it of 1 / (RRF_K + rank),   rank 1 = that channel's best

with ``RRF_K = 60`` (Cormack et al., 2009), so a frame two channels agree on outranks one that only
a single channel put first. Each channel contributes its best ``depth`` frames (default ``max(5 k,
100)``). A hit lists the channels that ranked it (rank, score, and the matched text with its words
in [brackets]); ties break by the best single rank, then by id.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np

from mergeseek.errors import InputError
from mergeseek.retrieval.search import Hit, Searcher, best_per_video

RRF_K = 60


def split_channels(q: str) -> tuple[Optional[str], Optional[str]]:
    """A search box's text as (visual query, OCR query): ``a crowd ocr: HÀ NỘI`` -> ("a crowd", "HÀ NỘI");
    ``ocr:ha noi`` -> (None, "ha noi"); text without the prefix -> (text, None). The prefix is
    matched case-insensitively where a word starts."""
    import re

    m = re.search(r"(?i)(?:^|\s)ocr:", q or "")
    if m is None:
        return (q, None)
    visual, ocr = q[: m.start()].strip(), q[m.end():].strip()
    return (visual or None, ocr)


def fuse(rankings: dict, k_rrf: int = RRF_K, weights: Optional[dict] = None) -> list[tuple[int, float, dict]]:
    """Reciprocal-rank fusion of ``{channel: [ids, best first]}`` -> ``[(id, score, {channel: rank})]``,
    best first (ties: the better best rank, then the smaller id). ``weights``: ``{channel: w}``
    multiplies a channel's ``1 / (k_rrf + rank)`` (default 1 each; fused models, ``retrieval.fusion``)."""
    score: dict[int, float] = {}
    ranks: dict[int, dict] = {}
    for channel, ids in rankings.items():
        for rank, i in enumerate(ids, start=1):
            if channel in ranks.setdefault(int(i), {}):
                continue  # a channel counts a frame once, at its best rank
            ranks[int(i)][channel] = rank
            w = 1.0 if weights is None else weights.get(channel, 1.0)
            score[int(i)] = score.get(int(i), 0.0) + w / (k_rrf + rank)
    return sorted(((i, s, ranks[i]) for i, s in score.items()), key=lambda t: (-t[1], min(t[2].values()), t[0]))


def _text_index(searcher: Searcher):
    if not hasattr(searcher, "_text_ix"):
        from mergeseek.indexing.text import open_text_index

        searcher._text_ix = open_text_index(searcher.store.root, searcher.store.shard_names())
    if searcher._text_ix is None:
        raise InputError(f"index {searcher.store.root} has no on-screen text; index it with --ocr tesseract "
                         "(the frames already indexed are read, nothing is encoded again)")
    return searcher._text_ix


def _live(searcher: Searcher, ids: np.ndarray) -> np.ndarray:
    sorted_ids = searcher._sorted_ids
    pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sorted_ids) - 1, 0))
    return (sorted_ids[pos] == ids) if len(sorted_ids) else np.zeros(len(ids), bool)


def text_hits(searcher: Searcher, query: str, channel: str = "ocr", depth: int = 100) -> list[Hit]:
    """Frames whose ``channel`` text matches ``query``, best first (dead rows of re-indexed sources left out)."""
    from mergeseek.indexing.text import highlight

    if not query or not query.strip():
        raise InputError(f"empty --{channel} query; give the words to find, e.g. --{channel} \"Hà Nội\"")
    matches = _text_index(searcher).search(query, channel, depth)
    ids = np.asarray([m.id for m in matches], np.int64)
    keep = _live(searcher, ids)
    matches = [m for m, ok in zip(matches, keep) if ok]
    hits = searcher._hits(np.asarray([m.score for m in matches], np.float32), np.asarray([m.id for m in matches], np.int64))
    return [replace(h, channels={channel: {"rank": r, "score": round(m.score, 6), "text": highlight(m.text, query)}})
            for r, (h, m) in enumerate(zip(hits, matches), start=1)]


def search_hybrid(searcher: Searcher, text: Optional[str] = None, ocr: Optional[str] = None, k: int = 20,
                  per_video: bool = False, depth: Optional[int] = None, k_rrf: int = RRF_K) -> list[Hit]:
    """The best ``k`` frames by reciprocal-rank fusion of the image channel (``text``) and the OCR
    channel (``ocr``); one channel alone is that channel's ranking. ``score`` is the fused score."""
    if not (text and text.strip()) and not (ocr and ocr.strip()):
        raise InputError("empty query; give a description, --ocr WORDS, or both")
    depth = depth or max(5 * k, 100)
    by_channel: dict[str, list[Hit]] = {}
    if text and text.strip():
        image = searcher.search_text(text, k=min(depth, searcher.size))
        by_channel["image"] = [replace(h, channels={"image": {"rank": r, "score": round(h.score, 6)}})
                               for r, h in enumerate(image, start=1)]
    if ocr and ocr.strip():
        by_channel["ocr"] = text_hits(searcher, ocr, "ocr", depth)
    hit_of: dict[int, Hit] = {}
    info: dict[int, dict] = {}
    for hits in by_channel.values():
        for h in hits:
            hit_of.setdefault(h.id, h)
            info.setdefault(h.id, {}).update(h.channels)
    fused = fuse({c: [h.id for h in hits] for c, hits in by_channel.items()}, k_rrf)
    out = [replace(hit_of[i], score=round(s, 6), channels=info[i]) for i, s, _ in fused]
    if per_video:
        out = best_per_video(out)
    return out[:k]


__all__ = ["RRF_K", "fuse", "search_hybrid", "split_channels", "text_hits"]
