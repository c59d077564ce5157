"""N ordered events in one video: ``search "A" --then "B" --then "C" --within 30`` and TRAKE.

A chain is one frame per event, all in one video, at strictly increasing times, where the gap
between event i and event i+1 lies in ``(0, w_i]`` seconds. ``--within`` is given once (every gap
gets it) or once per gap (N-1 values). A chain scores the sum of its frames' scores.

For every candidate frame of the first event the best chain that starts there is found exactly by
a dynamic programme over the candidates of each event (an event's top ``depth`` frames): per
video, from the last event back, ``best_i(f) = score(f) + max best_{i+1}(g)`` over the frames g of
event i+1 in ``(t_f, t_f + w_i]``. Frames sorted by time make that window slide forward, so a
monotone queue gives each maximum in amortised O(1): O(N * T log T) for T candidates per event
(the sort), O(N * T) after it, memory O(N * T). Chains are ranked by total score (ties: the first
event's rank); ``per_video`` keeps each video's best chain. A window nothing satisfies gives no
chain, not an error; frames without a time cannot take part.

With two events this is ``search.pair_events`` (which calls it): the same pairs, the same order
(among exactly equal scores the earlier frame is kept). TRAKE (``retrieval.submission``) and the
AIC scorer's candidate search use it too; before issue #29 their window bounded the whole chain
from the first event, it now bounds each gap (the same for two events).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from mergeseek.errors import InputError
from mergeseek.retrieval.search import Hit, best_per_video

Within = Union[float, Sequence[float]]
MAX_EVENTS = 16  # events of one query (the page and the API refuse more)


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


def gap_windows(within: Within, n_events: int) -> tuple[float, ...]:
    """The window of each of the ``n_events - 1`` gaps: one value for all, or one per gap."""
    values = [within] if isinstance(within, (int, float)) else list(within)
    if len(values) == 1:
        values = values * max(n_events - 1, 1)
    if len(values) != max(n_events - 1, 1):
        raise InputError(f"{len(values)} --within values for {n_events} events; give one for every gap or one per "
                         f"gap ({n_events - 1})")
    for w in values:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w > 0):
            raise InputError(f"--within {w} is not valid; give a window in seconds > 0")
    return tuple(float(w) for w in values)


def chain_events(per_event: Sequence[Sequence[Hit]], within: Within) -> list[EventChain]:
    """The best chain starting at each (timed) hit of event 1, best first.

    Args:
        per_event: for each event, its candidate frames (in rank order: the order breaks ties).
        within: the gap window(s) in seconds (``gap_windows``).
    """
    n = len(per_event)
    if n == 0:
        raise InputError("an event query needs at least one event")
    windows = gap_windows(within, n)
    if n == 1:
        found = [(h.score, i, (h,)) for i, h in enumerate(per_event[0]) if math.isfinite(h.pts_time)]
    else:
        groups = _by_video(per_event)
        found = [c for cands in groups.values() for c in _video_chains(cands, windows)]
    found.sort(key=lambda c: (-c[0], c[1]))
    return [EventChain(score, hits) for score, _, hits in found]


def _by_video(per_event: Sequence[Sequence[Hit]]) -> dict:
    """``{video_id: [per event: [(time, rank, hit)] by time]}`` for videos every event has a timed frame in."""
    groups: dict = {}
    n = len(per_event)
    for e, hits in enumerate(per_event):
        for rank, h in enumerate(hits):
            if math.isfinite(h.pts_time):
                groups.setdefault(h.video_id, [[] for _ in range(n)])[e].append((h.pts_time, rank, h))
    out = {}
    for v, lists in groups.items():
        if all(lists):
            for lst in lists:
                lst.sort(key=lambda x: (x[0], x[1]))
            out[v] = lists
    return out


def _video_chains(cands: list, windows: tuple[float, ...]) -> list[tuple[float, int, tuple[Hit, ...]]]:
    """``(score, rank of the first frame, hits)`` of the best chain from each first-event frame of one
    video that has one. ``cands[i]``: event i's ``(time, rank, hit)`` sorted by time."""
    n = len(cands)
    best = [h.score for _, _, h in cands[-1]]  # best chain score from each frame of the current event
    links: list = [None] * n  # links[i][j]: the frame of event i+1 that frame j of event i chains to
    for i in range(n - 2, -1, -1):
        nxt_t = [t for t, _, _ in cands[i + 1]]
        cur, link = [], []
        q: deque = deque()  # frames of event i+1 in the window, best chain first (decreasing, earliest on ties)
        lo = hi = 0
        for t, _, h in cands[i]:
            while hi < len(nxt_t) and nxt_t[hi] <= t + windows[i]:
                if best[hi] > -math.inf:
                    while q and best[q[-1]] < best[hi]:
                        q.pop()
                    q.append(hi)
                hi += 1
            while lo < hi and nxt_t[lo] <= t:  # strictly later only
                lo += 1
            while q and q[0] < lo:
                q.popleft()
            if q:
                cur.append(h.score + best[q[0]])
                link.append(q[0])
            else:
                cur.append(-math.inf)
                link.append(-1)
        best, links[i] = cur, link
    out = []
    for j, (_, rank, h) in enumerate(cands[0]):
        if best[j] == -math.inf:
            continue
        hits, at = [h], j
        for i in range(n - 1):
            at = links[i][at]
            hits.append(cands[i + 1][at][2])
        out.append((best[j], rank, tuple(hits)))
    return out


def event_texts(text: Optional[str], thens: Union[None, str, Sequence[str]]) -> list[str]:
    """The events of a query: ``text`` then each ``--then`` (one clear error for an empty one)."""
    rest = [] if thens is None else [thens] if isinstance(thens, str) else list(thens)
    events = [text or ""] + rest
    if len(events) > MAX_EVENTS:
        raise InputError(f"{len(events)} events; at most {MAX_EVENTS}")
    for i, e in enumerate(events):
        if not isinstance(e, str) or not e.strip():
            raise InputError(f"event {i + 1} is empty; give a description for every event, e.g. \"a man\" --then \"a car\"")
    return [e.strip() for e in events]


def search_events(searcher, events: Sequence[str], within: Within = 30.0, k: int = 20, depth: int = 1000,
                  per_video: bool = False, video: Optional[str] = None) -> list[EventChain]:
    """Text events -> ranked chains over ``searcher`` (a ``retrieval.Searcher`` with an encoder).

    Each event contributes its best ``max(depth, 20 k)`` frames (all frames of ``video`` when given,
    ``retrieval.scope``). ``within``: ``gap_windows``. When an event has ``ocr:`` / ``asr:`` parts
    (``retrieval.hybrid.split_channels``), every event is ranked by ``search_hybrid`` (its fused
    channels; an event without them by the image channel alone), so chain scores add up the fused
    scores, one scale for all events.
    """
    events = event_texts(events[0] if events else None, list(events[1:]))
    gap_windows(within, len(events))  # a bad window fails before any encoding
    depth = min(searcher.size, max(int(depth), 20 * k))
    from mergeseek.retrieval.hybrid import search_hybrid, split_channels

    parts = [split_channels(e) for e in events]
    if any(said for _, said in parts):  # "a crowd ocr: HÀ NỘI": every event ranked by its fused channels (one scale)
        per_event = [[h for h in search_hybrid(searcher, visual, said.get("ocr"), k=depth, asr=said.get("asr"))
                      if video is None or h.video_id == video] for visual, said in parts]
        chains = chain_events(per_event, within)
        return (best_per_video(chains) if per_video else chains)[:k]
    qs = np.concatenate([searcher.text_vector(e) for e in events])
    if video is not None:
        from mergeseek.retrieval.scope import search_in_video

        per_event = [search_in_video(searcher, q[None], video, k=None) for q in qs]
    else:
        per_event = searcher.search_vectors(qs, depth)
    chains = chain_events(per_event, within)
    if per_video:
        chains = best_per_video(chains)
    return chains[:k]


__all__ = ["EventChain", "MAX_EVENTS", "chain_events", "event_texts", "gap_windows", "search_events"]
