"""The HCMC AI Challenge score of ranked submission rows, as pure functions.

Ground truth per query: a video id and an inclusive frame range (KIS, QA), plus the answer (QA),
or one range per event (TRAKE). A row's score (the "R-score"):

* KIS: 1 when the row's video is the target and its frame lies in the range (inclusive), else 0;
* QA: the same, and the row's normalised answer must equal the normalised true answer;
* TRAKE: the fraction of events whose row frame lies in that event's range (widened by
  ``tolerance`` frames on each side), 0 when the video differs.

A query's score is the mean over k in ``KS`` = (1, 5, 20, 50, 100) of the best row score within
the top k; rows past 100 are ignored. A hit at rank 1 scores 1.0, at rank 2 0.8, at rank 6 0.6,
at rank 21 0.4, at rank 100 0.2, none 0.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

from errors import InputError

KS = (1, 5, 20, 50, 100)
MAX_ROWS = 100
TASKS = ("kis", "qa", "trake")


@dataclass(frozen=True)
class Span:
    """An inclusive frame range of one video."""

    video_id: str
    start: int
    end: int

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise InputError(f"frame range {self.start}..{self.end} of {self.video_id} ends before it starts")

    def contains(self, video_id: str, frame: int, tolerance: int = 0) -> bool:
        return video_id == self.video_id and self.start - tolerance <= frame <= self.end + tolerance


@dataclass(frozen=True)
class Truth:
    """Ground truth of one query: one span (KIS, QA) or one per event (TRAKE); ``answer`` for QA."""

    task: str
    spans: tuple[Span, ...]
    answer: Optional[str] = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise InputError(f"task {self.task!r} is not one of {', '.join(TASKS)}")
        if not self.spans:
            raise InputError("ground truth needs at least one frame range")
        if self.task != "trake" and len(self.spans) != 1:
            raise InputError(f"a {self.task} query has one frame range, got {len(self.spans)}")
        if self.task == "qa" and self.answer is None:
            raise InputError("a qa query's ground truth needs its answer")


def normalize_answer(text: Optional[str]) -> str:
    """Case-folded, Unicode NFC (accents kept: they carry meaning in Vietnamese), punctuation
    dropped, runs of spaces collapsed; ``"  Màu XANH. "`` -> ``"màu xanh"``."""
    if text is None:
        return ""
    t = unicodedata.normalize("NFC", str(text)).casefold()
    t = "".join(" " if unicodedata.category(c).startswith("P") else c for c in t)
    return re.sub(r"\s+", " ", t).strip()


def row_score(row: Sequence, truth: Truth, tolerance: int = 0) -> float:
    """R-score of one submission row (``video_id, frame[, answer]`` or ``video_id, f1, ..., fN``)."""
    if not row:
        return 0.0
    video = str(row[0])
    try:
        if truth.task == "trake":
            frames = [int(float(x)) for x in row[1 : 1 + len(truth.spans)]]
        else:
            frames = [int(float(row[1]))] if len(row) > 1 else []
    except (TypeError, ValueError):
        return 0.0  # a malformed row scores nothing, like at the organisers'
    if truth.task == "trake":
        hit = sum(1 for f, s in zip(frames, truth.spans) if s.contains(video, f, tolerance))
        return hit / len(truth.spans)
    if not frames or not truth.spans[0].contains(video, frames[0], tolerance):
        return 0.0
    if truth.task == "qa":
        given = row[2] if len(row) > 2 else ""
        return 1.0 if normalize_answer(given) == normalize_answer(truth.answer) and normalize_answer(given) else 0.0
    return 1.0


def score_from_row_scores(scores: Sequence[float], ks: Iterable[int] = KS) -> float:
    """Mean over ``ks`` of the best of the first k row scores (rows past ``MAX_ROWS`` ignored)."""
    scores = list(scores)[:MAX_ROWS]
    ks = tuple(ks)
    total = 0.0
    for k in ks:
        top = scores[:k]
        total += max(top) if top else 0.0
    return total / len(ks)


def query_score(rows: Sequence[Sequence], truth: Truth, tolerance: int = 0, ks: Iterable[int] = KS) -> float:
    """The official score of one query's ranked rows."""
    return score_from_row_scores([row_score(r, truth, tolerance) for r in list(rows)[:MAX_ROWS]], ks)


def rank_score(rank: Optional[int], ks: Iterable[int] = KS) -> float:
    """Score of a single full hit at 1-based ``rank`` (None: no hit)."""
    ks = tuple(ks)
    if rank is None:
        return 0.0
    return sum(1 for k in ks if rank <= k) / len(ks)


def score_by_task(scores: Mapping[str, float], tasks: Mapping[str, str]) -> dict:
    """``{"score": mean, "score_kis": ..., "score_qa": ..., "score_trake": ...}`` over the queries given."""
    out = {}
    if scores:
        out["score"] = sum(scores.values()) / len(scores)
    for t in TASKS:
        vals = [v for q, v in scores.items() if tasks.get(q) == t]
        if vals:
            out[f"score_{t}"] = sum(vals) / len(vals)
    return out
