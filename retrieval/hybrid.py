"""Queries over several channels: what is seen (the image vectors), what is written on screen (OCR
text) and what is said (speech). ``cli.py search "a crowd" --ocr "HÀ NỘI" --asr "prime minister"``.

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


TEXT_PREFIXES = ("ocr", "asr")  # search-box prefixes of the text channels (indexing.text.CHANNELS)


def split_channels(q: str) -> tuple[Optional[str], dict]:
    """A search box's text as (visual query, {text channel: words}): ``a crowd ocr: HÀ NỘI asr: prime
    minister`` -> ("a crowd", {"ocr": "HÀ NỘI", "asr": "prime minister"}); ``ocr:ha noi`` -> (None,
    {"ocr": "ha noi"}); text without a prefix -> (text, {}). Each prefix runs to the next one; a
    prefix is matched case-insensitively where a word starts; one given twice has its words joined."""
    import re

    q = q or ""
    found = list(re.finditer(r"(?i)(?:^|\s)(" + "|".join(TEXT_PREFIXES) + r"):", q))
    if not found:
        return (q, {})
    said: dict = {}
    for m, nxt in zip(found, found[1:] + [None]):
        words = q[m.end(): nxt.start() if nxt is not None else len(q)].strip()
        name = m.group(1).lower()
        said[name] = f"{said[name]} {words}".strip() if name in said else words
    visual = q[: found[0].start()].strip()
    return (visual or None, said)


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


_NONE = {"ocr": ("on-screen text", "--ocr rapidocr (or --ocr tesseract)"), "asr": ("speech", "--asr pocketsphinx")}


def _text_index(searcher: Searcher, channel: str = "ocr"):
    if not hasattr(searcher, "_text_ix"):
        from mergeseek.indexing.text import open_text_index

        searcher._text_ix = open_text_index(searcher.store.root, searcher.store.shard_names())
    return require_channel(searcher._text_ix, searcher.store.root, channel)


def require_channel(ix, root, channel: str):
    """``ix`` (an ``indexing.text`` index or None) when it holds ``channel``'s text; else one line
    saying how to add it."""
    if ix is None or channel not in {c for _, c in ix.loaded()}:
        what, how = _NONE.get(channel, (channel, f"--{channel}"))
        raise InputError(f"index {root} has no {what}; index it with {how} "
                         "(the frames already indexed are read, nothing is encoded again)")
    return ix


def _live(searcher: Searcher, ids: np.ndarray) -> np.ndarray:
    sorted_ids = searcher._sorted_ids
    pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sorted_ids) - 1, 0))
    return (sorted_ids[pos] == ids) if len(sorted_ids) else np.zeros(len(ids), bool)


def text_hits(searcher: Searcher, query: str, channel: str = "ocr", depth: int = 100) -> list[Hit]:
    """Frames whose ``channel`` text matches ``query``, best first (dead rows of re-indexed sources left out)."""
    from mergeseek.indexing.text import highlight

    if not query or not query.strip():
        raise InputError(f"empty --{channel} query; give the words to find, e.g. --{channel} \"Hà Nội\"")
    matches = _text_index(searcher, channel).search(query, channel, depth)
    ids = np.asarray([m.id for m in matches], np.int64)
    keep = _live(searcher, ids)
    matches = [m for m, ok in zip(matches, keep) if ok]
    hits = searcher._hits(np.asarray([m.score for m in matches], np.float32), np.asarray([m.id for m in matches], np.int64))
    return [replace(h, channels={channel: {"rank": r, "score": round(m.score, 6), "text": highlight(m.text, query)}})
            for r, (h, m) in enumerate(zip(hits, matches), start=1)]


def search_hybrid(searcher: Searcher, text: Optional[str] = None, ocr: Optional[str] = None, k: int = 20,
                  per_video: bool = False, depth: Optional[int] = None, k_rrf: int = RRF_K,
                  asr: Optional[str] = None) -> list[Hit]:
    """The best ``k`` frames by reciprocal-rank fusion of the image channel (``text``), the OCR
    channel (``ocr``) and the speech channel (``asr``); one channel alone is that channel's ranking.
    ``score`` is the fused score."""
    if not any(q and q.strip() for q in (text, ocr, asr)):
        raise InputError("empty query; give a description, --ocr WORDS, --asr WORDS, or several")
    depth = depth or max(5 * k, 100)
    by_channel: dict[str, list[Hit]] = {}
    if text and text.strip():
        image = searcher.search_text(text, k=min(depth, searcher.size))
        by_channel["image"] = [replace(h, channels={"image": {"rank": r, "score": round(h.score, 6)}})
                               for r, h in enumerate(image, start=1)]
    for channel, words in (("ocr", ocr), ("asr", asr)):
        if words and words.strip():
            by_channel[channel] = text_hits(searcher, words, channel, depth)
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


__all__ = ["RRF_K", "TEXT_PREFIXES", "fuse", "search_hybrid", "split_channels", "text_hits"]
