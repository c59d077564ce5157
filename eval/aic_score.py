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

The submission format itself (the row limit, the tasks and their aliases, distinct rows, reading
a submission file) lives in ``retrieval.submission``; this module only scores.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mergeseek.errors import InputError
from mergeseek.retrieval.records import read_records
from mergeseek.retrieval.submission import (
    KIS,
    MAX_ROWS,
    QA,
    TASKS,
    TRAKE,
    dedup_rows,
    parse_task,
    query_file_name,
    read_rows,
    submission_rows,
)

KS = (1, 5, 20, 50, MAX_ROWS)  # the official cut-offs; the last one is the whole file


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
    answer: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise InputError(f"task {self.task!r} is not one of {', '.join(TASKS)}")
        if not self.spans:
            raise InputError("ground truth needs at least one frame range")
        if self.task != TRAKE and len(self.spans) != 1:
            raise InputError(f"a {self.task} query has one frame range, got {len(self.spans)}")
        if self.task == QA and self.answer is None:
            raise InputError("a qa query's ground truth needs its answer")


def normalize_answer(text: str | None) -> str:
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
        if truth.task == TRAKE:
            frames = [int(float(x)) for x in row[1 : 1 + len(truth.spans)]]
        else:
            frames = [int(float(row[1]))] if len(row) > 1 else []
    except (TypeError, ValueError, OverflowError):
        return 0.0  # a malformed row (text, nan, 1e400) scores nothing, like at the organisers'
    if truth.task == TRAKE:
        hit = sum(1 for f, s in zip(frames, truth.spans) if s.contains(video, f, tolerance))
        return hit / len(truth.spans)
    if not frames or not truth.spans[0].contains(video, frames[0], tolerance):
        return 0.0
    if truth.task == QA:
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


def rank_score(rank: int | None, ks: Iterable[int] = KS) -> float:
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


# ---------------------------------------------------------------------------- query sets (eval)
@dataclass(frozen=True)
class AicQuery:
    """What the official score needs of one query of a keyframe set.

    Args:
        truth: task, raw frame ranges (not snapped to keyframes) and answer.
        events: TRAKE event texts, one per span (empty for KIS / QA, and when only scoring files).
        within_s: TRAKE window: every event within this many seconds of the one before (``retrieval.events``).
        tolerance: TRAKE: frames by which each event's range is widened.
    """

    truth: Truth
    events: tuple[str, ...] = ()
    within_s: float = 60.0
    tolerance: int = 0

    def __post_init__(self) -> None:
        if self.truth.task == TRAKE and self.events and len(self.events) != len(self.truth.spans):
            raise InputError(f"a trake query has {len(self.events)} event texts but {len(self.truth.spans)} ranges")


def gallery_rows(order: Sequence[int], video_ids: Sequence[str], frame_idx: Sequence[int], answer: str = "",
                 qa: bool = False) -> list[tuple]:
    """Submission rows of a ranked gallery: (video_id, frame_idx[, answer]) by ``dedup_rows``."""
    extra = (answer,) if qa else ()
    return dedup_rows((video_ids[i], int(frame_idx[i])) + extra for i in order)


def set_scores(queries: Sequence, query_scores, event_scores: Mapping[str, object], video_ids: Sequence[str],
               frame_idx: Sequence[int], pts_time: Sequence[float], depth: int = 1000) -> dict:
    """Official scores of one candidate on a keyframe set (queries without ground truth are left out).

    Args:
        queries: ``eval.datasets.Query`` items; those with ``aic`` are scored.
        query_scores: float [Q, N] text-to-gallery similarities (KIS / QA rank by these).
        event_scores: ``{qid: float [E, N]}`` similarities of each TRAKE query's event texts.
        depth: gallery items per event handed to the TRAKE chain search.

    Returns: ``{"AIC": mean, "AIC_kis": ..., "AIC_qa": ..., "AIC_trake": ...}`` (keys only for the
    tasks present). QA rows carry the true answer: the model finds frames, it does not answer, so
    a QA score here is the frame part only (an upper bound on the real one).
    """
    import numpy as np

    from mergeseek.retrieval.search import Hit
    from mergeseek.retrieval.events import chain_events

    scores, tasks = {}, {}
    n = len(video_ids)
    for qi, q in enumerate(queries):
        a = getattr(q, "aic", None)
        if a is None:
            continue
        t = a.truth
        if t.task == TRAKE:
            ev = np.asarray(event_scores[q.qid])
            per_event = []
            for row in ev:
                top = np.argsort(-row, kind="stable")[: min(depth, n)]
                per_event.append([Hit(float(row[i]), video_ids[i], int(frame_idx[i]), float(pts_time[i]), "", int(i))
                                  for i in top])
            rows = submission_rows(chain_events(per_event, a.within_s), TRAKE)
            scores[q.qid] = query_score(rows, t, a.tolerance)
        else:
            order = np.argsort(-np.asarray(query_scores[qi]), kind="stable")
            rows = gallery_rows(order, video_ids, frame_idx, t.answer or "", qa=t.task == QA)
            scores[q.qid] = query_score(rows, t)
        tasks[q.qid] = t.task
    return {("AIC" + k[5:]): v for k, v in score_by_task(scores, tasks).items()}


# ---------------------------------------------------------------------------- ground-truth files
def _span_of(d: Mapping, video_id: str, where: str) -> Span | None:
    def given(k: str) -> bool:
        return d.get(k) not in (None, "")

    try:
        if given("span"):
            if not isinstance(d["span"], (list, tuple)) or len(d["span"]) != 2:
                raise TypeError("span is not [start, end]")
            lo, hi = d["span"]
            lo, hi = _frame(lo), _frame(hi)
        elif given("frame_start") and given("frame_end"):
            lo, hi = _frame(d["frame_start"]), _frame(d["frame_end"])
        elif given("frame_idx"):
            lo = hi = _frame(d["frame_idx"])
        else:
            return None
    except (TypeError, ValueError, OverflowError):
        shown = {k: d[k] for k in ("span", "frame_start", "frame_end", "frame_idx") if k in d}
        raise InputError(f"{where}: frame numbers must be whole numbers 0..{MAX_FRAME} (span [start, end], "
                         f"frame_start/frame_end or frame_idx); got {str(shown)[:120]}") from None
    if hi < lo:
        raise InputError(f"{where}: the frame range ends ({hi}) before it starts ({lo})")
    return Span(video_id, lo, hi)


MAX_FRAME = 10**9  # frames of any real video are far fewer


def _frame(value) -> int:
    """A frame number from JSON (int, float or numeric string); ValueError when not 0..MAX_FRAME."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError("not a number")
    if isinstance(value, str) and len(value) > 24:
        raise ValueError("too long")
    f = float(value)
    if not math.isfinite(f) or f < 0 or f > MAX_FRAME or f != int(f):
        raise ValueError("out of range")
    return int(f)


def aic_query_from_row(row: Mapping, where: str, texts: bool = True) -> AicQuery | None:
    """The ground truth of one query-file row, None when it has no frame range (e.g. a ``frames`` list).

    Keys: ``task`` (or ``type``; ``kis`` unless ``events`` is given), ``video_id``, the range as
    ``span: [start, end]``, ``frame_start`` + ``frame_end`` or ``frame_idx``; QA: ``answer``;
    TRAKE: ``events``, a list of objects with a range (and ``text``; their own ``video_id``
    optional), ``within`` (seconds, default 60), ``tolerance`` (frames, default 0).
    ``texts=False`` accepts TRAKE events without texts (scoring only).
    """
    try:
        task = parse_task(row.get("task") or row.get("type") or (TRAKE if row.get("events") else KIS))
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    raw_vid = row.get("video_id")
    if raw_vid is not None and not isinstance(raw_vid, str):
        raise InputError(f"{where}: video_id must be a string, not {type(raw_vid).__name__}")
    vid = (raw_vid or "").strip()
    try:
        within = float(row.get("within") or 60.0)
        tolerance = _frame(row.get("tolerance") or 0)
        if not (math.isfinite(within) and 0 < within <= 86400.0 * 365):
            raise ValueError("within out of range")
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{where}: within (seconds, > 0) and tolerance (frames, >= 0) must be numbers") from None
    if task == TRAKE:
        events = row.get("events")
        if not isinstance(events, list) or not events or not all(isinstance(e, Mapping) for e in events):
            raise InputError(f'{where}: a trake query needs "events": a list of {{"text", "frame_start", "frame_end"}}')
        spans = []
        for e in events:
            ev_vid = e.get("video_id")
            if ev_vid is not None and not isinstance(ev_vid, str):
                raise InputError(f"{where}: an event's video_id must be a string, not {type(ev_vid).__name__}")
            s = _span_of(e, (ev_vid or "").strip() or vid, where)
            if s is None or not s.video_id:
                raise InputError(f"{where}: every trake event needs a video_id and a frame range")
            spans.append(s)
        names = tuple(str(e.get("text") or e.get("query") or "").strip() for e in events)
        if texts and not all(names):
            raise InputError(f"{where}: every trake event needs a 'text'")
        return AicQuery(Truth(TRAKE, tuple(spans)), names if texts else (), within, tolerance)
    if not vid:
        raise InputError(f"{where}: no video_id")
    span = _span_of(row, vid, where)
    if span is None:
        return None
    if task == QA and row.get("answer") in (None, ""):
        raise InputError(f"{where}: a qa query needs its 'answer' for the official score")
    return AicQuery(Truth(task, (span,), str(row["answer"]) if task == QA else None), (), within, tolerance)


def read_truth(path) -> dict:
    """``{query_id: AicQuery}`` from a JSON-lines file or a JSON array of ground-truth rows."""
    out = {}
    for rec in read_records(path, "ground-truth file"):
        r, where = rec.value, rec.where
        if not isinstance(r, Mapping):
            raise InputError(f"{where}: not a JSON object")
        raw_qid = r.get("query_id") if r.get("query_id") is not None else r.get("id")
        if raw_qid is not None and (isinstance(raw_qid, bool) or not isinstance(raw_qid, (str, int))):
            raise InputError(f"{where}: query_id must be a string or a number, not {type(raw_qid).__name__}")
        qid = str(raw_qid if raw_qid is not None else "").strip()
        if not qid:
            raise InputError(f"{where}: no query_id (or id)")
        if len(qid) > 200:
            raise InputError(f"{where}: query_id of {len(qid)} characters; at most 200")
        a = aic_query_from_row(r, where, texts=False)
        if a is None:
            raise InputError(f"{where}: no frame range (span, frame_start + frame_end, or frame_idx)")
        out[qid] = a
    if not out:
        raise InputError(f"ground-truth file {path} holds no queries")
    return out


class ScoreReport(dict):
    """What :func:`score_submission_dir` returns: the score dict, with the report protocol's two views."""

    def to_dict(self) -> dict:
        return dict(self)

    def summary_lines(self) -> list[str]:
        unreadable = self.get("unreadable", {})
        lines = []
        for qid, v in self["queries"].items():
            note = " (no file)" if qid in self["missing"] else f" ({unreadable[qid]})" if qid in unreadable else ""
            lines.append(f"{qid}: {v:.3f}{note}")
        per_task = ", ".join(f"{k} {self[k]:.3f}" for k in ("AIC_kis", "AIC_qa", "AIC_trake") if k in self)
        return lines + [f"score {self['AIC']:.3f} over {self['n_queries']} queries ({per_task})"]


def score_submission_dir(sub_dir, truth_path, tolerance: int | None = None) -> ScoreReport:
    """Score ``{query_id}.csv`` files against a ground-truth file; a missing file scores 0 and is listed.

    Returns: ``{"queries": {qid: score}, "missing": [...], "AIC": ..., "AIC_kis": ..., ...}``.
    """
    truth = read_truth(truth_path)
    sub_dir = Path(sub_dir)
    if not sub_dir.is_dir():
        raise InputError(f"submission folder {sub_dir} does not exist")
    scores, missing, unreadable = {}, [], {}
    for qid, a in truth.items():
        scores[qid] = 0.0
        try:
            f = sub_dir / query_file_name(qid)  # a query id like ../../x never leaves the folder
            if not f.is_file():
                missing.append(qid)
                continue
            rows = read_rows(f, limit=MAX_ROWS)  # only the first rows count: a huge file is not read whole
        except InputError as exc:
            unreadable[qid] = str(exc)  # one bad file scores 0 and is listed; the rest of the folder is still scored
            continue
        scores[qid] = query_score(rows, a.truth, a.tolerance if tolerance is None else tolerance)
    out = {("AIC" + k[5:]): v for k, v in score_by_task(scores, {q: a.truth.task for q, a in truth.items()}).items()}
    return ScoreReport({**out, "queries": scores, "missing": missing, "unreadable": unreadable, "n_queries": len(truth)})
