"""TRAKE: N events that happen in order in one video, all within a window of W seconds.

``chain_events`` generalises ``search.pair_events`` (two events) to N: for each frame of the
first event it finds frames ``t_1 < t_2 < ... < t_N <= t_1 + W`` of the same video, one per
event, maximising the sum of their scores. With N = 2 it gives exactly ``pair_events``' result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from errors import InputError
from retrieval.search import Hit

# Candidates per event inside one window: the chain search is quadratic in this number.
MAX_PER_WINDOW = 64


@dataclass(frozen=True)
class EventChain:
    """One frame per event, in event order, in one video; ``score`` is the sum of their scores."""

    score: float
    hits: tuple[Hit, ...]

    @property
    def video_id(self) -> str:
        return self.hits[0].video_id

    @property
    def frames(self) -> tuple[int, ...]:
        return tuple(h.frame_idx for h in self.hits)


def chain_events(per_event: Sequence[Sequence[Hit]], within_s: float) -> list[EventChain]:
    """The best chain starting at each hit of event 1, ranked by total score (ties: event-1 order).

    Args:
        per_event: for each event, its candidate frames (any order). Frames without a timestamp
            cannot take part.
        within_s: every later event must fall in (t_1, t_1 + within_s] and after the previous one.
    """
    if not per_event:
        raise InputError("a TRAKE query needs at least one event")
    if not within_s > 0:
        raise InputError(f"window {within_s} is not valid; give a window in seconds > 0")
    n = len(per_event)
    by_video: list[dict] = []
    for hits in per_event[1:]:
        groups: dict = {}
        for h in hits:
            if math.isfinite(h.pts_time):
                groups.setdefault(h.video_id, []).append(h)
        for hits_v in groups.values():
            hits_v.sort(key=lambda h: h.pts_time)
        by_video.append(groups)
    out = []
    for a in per_event[0]:
        if not math.isfinite(a.pts_time):
            continue
        if n == 1:
            out.append(EventChain(a.score, (a,)))
            continue
        cands = [_window(g.get(a.video_id, ()), a.pts_time, within_s) for g in by_video]
        chain = _best_chain(cands)
        if chain is not None:
            total, hits = chain
            out.append(EventChain(a.score + total, (a, *hits)))
    order = sorted(range(len(out)), key=lambda i: -out[i].score)  # stable: ties keep event-1 rank
    return [out[i] for i in order]


def _window(hits: list[Hit], t0: float, within_s: float) -> list[Hit]:
    """Hits in (t0, t0 + within_s], by time; only the ``MAX_PER_WINDOW`` best-scoring ones (bounds the DP)."""
    inside = [h for h in hits if t0 < h.pts_time <= t0 + within_s]
    if len(inside) > MAX_PER_WINDOW:
        best = sorted(range(len(inside)), key=lambda i: -inside[i].score)[:MAX_PER_WINDOW]
        inside = [inside[i] for i in sorted(best)]
    return inside


def _best_chain(cands: list[list[Hit]]):
    """Max-score choice of one hit per list with strictly increasing times (lists sorted by time).

    Dynamic programming from the last event back: best[j] = score of hit j plus the best
    continuation strictly after it. Among equal scores the earliest-ranked hit is kept.
    """
    if any(not c for c in cands):
        return None
    nxt_best = None  # per hit of the following event: (total, chain)
    for k in range(len(cands) - 1, -1, -1):
        cur = []
        for h in cands[k]:
            if nxt_best is None:
                cur.append((h.score, (h,)))
                continue
            best = None
            for (tot, ch), h2 in zip(nxt_best, cands[k + 1]):
                if tot is not None and h2.pts_time > h.pts_time and (best is None or tot > best[0]):
                    best = (tot, ch)
            cur.append((None, None) if best is None else (h.score + best[0], (h, *best[1])))
        nxt_best = cur
    valid = [(tot, ch) for tot, ch in nxt_best if tot is not None]
    if not valid:
        return None
    return max(valid, key=lambda x: x[0])


def search_events(searcher, events: Sequence[str], within_s: float = 60.0, k: int = 100, depth: int = 1000,
                  per_video: bool = False) -> list[EventChain]:
    """Text events -> ranked chains over ``searcher`` (a ``retrieval.Searcher`` with an encoder)."""
    events = [e.strip() for e in events if e and e.strip()]
    if not events:
        raise InputError("a TRAKE query needs at least one non-empty event text")
    qs = np.concatenate([searcher.text_vector(e) for e in events])
    depth = min(searcher.size, max(int(depth), 20 * k))
    per_event = searcher.search_vectors(qs, depth)
    chains = chain_events(per_event, within_s)
    if per_video:
        seen, kept = set(), []
        for c in chains:
            if c.video_id not in seen:
                seen.add(c.video_id)
                kept.append(c)
        chains = kept
    return chains[:k]
