"""TRAKE: N events that happen in order in one video, all within a window of W seconds.

``chain_events`` generalises ``search.pair_events`` (two events) to N: for each frame of the
first event it finds frames ``t_1 < t_2 < ... < t_N <= t_1 + W`` of the same video, one per
event, maximising the sum of their scores. With N = 2 it gives exactly ``pair_events``' result.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mergeseek.errors import InputError
from mergeseek.retrieval.search import Hit, best_per_video

# Candidates per event inside one window (the best-scoring ones): bounds the work per first-event frame.
MAX_PER_WINDOW = 256


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
        for v, hits_v in groups.items():
            hits_v.sort(key=lambda h: h.pts_time)
            groups[v] = (hits_v, [h.pts_time for h in hits_v])
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


def _window(group, t0: float, within_s: float) -> list[Hit]:
    """Hits in (t0, t0 + within_s], by time; only the ``MAX_PER_WINDOW`` best-scoring ones (bounds the DP).

    ``group`` is ``(hits sorted by time, their times)``; the window is found by bisection.
    """
    if not group:
        return []
    hits, times = group
    inside = hits[bisect.bisect_right(times, t0) : bisect.bisect_right(times, t0 + within_s)]
    if len(inside) > MAX_PER_WINDOW:
        best = sorted(range(len(inside)), key=lambda i: -inside[i].score)[:MAX_PER_WINDOW]
        inside = [inside[i] for i in sorted(best)]
    return inside


def _best_chain(cands: list[list[Hit]]):
    """Max-score choice of one hit per list with strictly increasing times (lists sorted by time).

    Dynamic programming from the last event back: the best chain from a hit is its score plus the
    best chain of the next event that starts strictly later, read from a suffix maximum over that
    event's hits (found by bisection). Among equal totals the earliest hit is kept.
    """
    if any(not c for c in cands):
        return None
    nxt = [(h.score, (h,)) for h in cands[-1]]
    for k in range(len(cands) - 2, -1, -1):
        times = [h.pts_time for h in cands[k + 1]]
        suffix: list = [None] * (len(nxt) + 1)
        for j in range(len(nxt) - 1, -1, -1):
            best = suffix[j + 1]
            suffix[j] = nxt[j] if nxt[j][0] is not None and (best is None or nxt[j][0] >= best[0]) else best
        cur = []
        for h in cands[k]:
            best = suffix[bisect.bisect_right(times, h.pts_time)]
            cur.append((None, None) if best is None else (h.score + best[0], (h, *best[1])))
        nxt = cur
    valid = [(tot, ch) for tot, ch in nxt if tot is not None]
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
        chains = best_per_video(chains)
    return chains[:k]
