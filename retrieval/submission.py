"""The HCMC AI Challenge submission format, in one home: the row limit (``MAX_ROWS``), the tasks
and their aliases (``parse_task``), the row rule (``dedup_rows``), the writer every command and
the web app use, and the reader the scorer uses (``read_rows``; ``eval.aic_score`` only scores).

One CSV per query, named ``{query_id}.csv``, no header, at most ``MAX_ROWS`` ranked lines:

* KIS: ``video_id,frame_idx``
* QA: ``video_id,frame_idx,answer``
* TRAKE: ``video_id,frame1,...,frameN`` (one frame per event, in event order)

``frame_idx`` is the real frame number of the video (the keyframe map's ``frame_idx``, which the
index stores), never the keyframe number. A row that repeats an earlier one is dropped, so the
file holds up to ``MAX_ROWS`` distinct candidates; rows are written through a temp file and a rename.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mergeseek.errors import InputError
from mergeseek.retrieval.records import csv_rows, read_records

MAX_ROWS = 100
KIS, QA, TRAKE = "kis", "qa", "trake"
TASKS = (KIS, QA, TRAKE)
_ALIASES = {"kis": KIS, "qa": QA, "vqa": QA, "trake": TRAKE}
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def parse_task(text: str) -> str:
    """``kis`` / ``qa`` (or ``vqa``) / ``trake``, case-insensitive."""
    task = _ALIASES.get(str(text).strip().lower())
    if task is None:
        raise InputError(f"query type {text!r} is not known; use one of kis, qa (or vqa), trake")
    return task


def result_row(result, task: str = KIS, answer: str = "") -> tuple:
    """One submission row from a search result (``Hit``, ``TemporalHit`` or ``events.EventChain``)."""
    frames = _frames(result)
    if task == QA:
        return (result.video_id, frames[0], answer)
    if task == KIS:
        return (result.video_id, frames[0])
    return (result.video_id, *frames)


def _frames(result) -> list[int]:
    if hasattr(result, "hits"):  # events.EventChain
        return [int(h.frame_idx) for h in result.hits]
    if hasattr(result, "then"):  # search.TemporalHit
        return [int(result.first.frame_idx), int(result.then.frame_idx)]
    return [int(result.frame_idx)]


def submission_rows(results: Iterable, task: str | None = None, answer: str = "", limit: int = MAX_ROWS) -> list[tuple]:
    """Distinct rows of ``results`` in rank order, at most ``limit`` (``dedup_rows``).

    Args:
        task: ``kis``, ``qa`` or ``trake``; None picks it from the results (frames per result:
            one -> KIS, more -> TRAKE).
        answer: the QA answer written on every row.
    """
    def task_of(r) -> str:
        return task if task is not None else (KIS if len(_frames(r)) == 1 else TRAKE)

    return dedup_rows((result_row(r, task_of(r), answer) for r in results), limit)


def dedup_rows(rows: Iterable[Sequence], limit: int = MAX_ROWS) -> list[tuple]:
    """The submission rule for rows: the first occurrence of each row, in order, at most ``limit``
    (rows past the limit are never read: ``rows`` may be a lazy generator)."""
    out, seen = [], set()
    for r in rows:
        r = tuple(r)
        if r not in seen:
            seen.add(r)
            out.append(r)
            if len(out) >= limit:
                break
    return out


def render(rows: Sequence[Sequence]) -> str:
    """The file's text: comma-separated, ``\\n`` line ends, quoted only where needed (answers)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def write_rows(path: str | Path, rows: Sequence[Sequence], limit: int = MAX_ROWS) -> int:
    """Write distinct ``rows`` (at most ``limit``) to ``path`` atomically; returns the rows written."""
    path = Path(path)
    rows = dedup_rows(rows, limit)
    from mergeseek.runtime import atomic_write

    atomic_write(path, render(rows))  # UTF-8, "\n" line ends as rendered; file and folder fsynced
    return len(rows)


def write_results(path: str | Path, results: Iterable, task: str | None = None, answer: str = "") -> int:
    """``submission_rows`` then ``write_rows``: search results straight to a submission file."""
    return write_rows(path, submission_rows(results, task, answer))


def query_file_name(query_id: str) -> str:
    """``{query_id}.csv``; refuses ids that are not plain file names."""
    qid = str(query_id).strip()
    if not _SAFE_ID.match(qid):
        raise InputError(f"query id {query_id!r} cannot be a file name; use letters, digits, '.', '_' or '-'")
    return f"{qid}.csv"


def read_rows(path: str | Path, limit: int | None = None) -> list[list[str]]:
    """A submission file's non-empty rows as strings (for scoring and checks); at most ``limit``
    rows are read, so a huge file is not read whole. A bad file is one ``InputError`` line."""
    return csv_rows(path, "submission file", limit)


# ---------------------------------------------------------------------------- batch submissions
@dataclass(frozen=True)
class SubmitQuery:
    """One query of a query file: ``events`` holds the TRAKE event texts (one for KIS / QA)."""

    qid: str
    task: str
    text: str
    events: tuple[str, ...]
    answer: str = ""


@dataclass
class SubmitReport:
    out_dir: str
    files: list = field(default_factory=list)  # (query id, task, rows written, path)
    unmapped: set = field(default_factory=set)  # videos whose frames were left out (no time, no real frame)

    def summary_lines(self) -> list[str]:
        lines = [f"{qid} ({task}): {n} rows -> {path}" for qid, task, n, path in self.files]
        if self.unmapped:
            lines.append(f"WARNING: left out the frames of {len(self.unmapped)} video(s) indexed without a keyframe map: "
                         f"{', '.join(sorted(self.unmapped)[:10])}")
        return lines + [f"wrote {len(self.files)} submission file(s) to {self.out_dir}"]

    def to_dict(self) -> dict:
        return {"out_dir": self.out_dir, "unmapped_left_out": sorted(self.unmapped),
                "files": [{"query_id": q, "task": t, "rows": n, "path": p} for q, t, n, p in self.files]}


def read_queries(path: str | Path) -> list[SubmitQuery]:
    """A query file: tab-separated ``id<TAB>type<TAB>text`` lines, JSON lines, or one JSON array.

    TRAKE events are separated by `` | `` in the text (or given as a JSON list ``events``). Blank
    lines and lines starting with ``#`` are skipped. JSON keys: ``query_id`` (or ``id``),
    ``task`` (or ``type``), ``query`` (or ``text``), optional ``events`` and ``answer``.
    """
    out, seen = [], set()
    for rec in read_records(path, "query file", text_line=_query_line):
        if not isinstance(rec.value, dict):
            raise InputError(f"{rec.where}: not an object with query_id, task and query")
        q = _query(rec.value, rec.where)
        if q.qid in seen:
            raise InputError(f"{rec.where}: query id {q.qid!r} appears twice; ids name the output files")
        seen.add(q.qid)
        out.append(q)
    if not out:
        raise InputError(f"query file {path} holds no queries")
    return out


def _query_line(line: str, where: str) -> dict:
    cells = line.split("\t")
    if len(cells) < 3:
        raise InputError(f"{where}: expected id<TAB>type<TAB>text, got {line[:80]!r}")
    return {"query_id": cells[0], "task": cells[1], "query": "\t".join(cells[2:])}


MAX_QUERY_TEXT = 4000  # characters of a query (CLIP reads 77 tokens; anything this long is a mistake)


def _scalar(value, what: str, where: str) -> str:
    """A JSON string or number as text; objects, lists and booleans are refused (one line)."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InputError(f"{where}: {what} must be a string, not {type(value).__name__}")
    text = str(value).strip()
    if len(text) > MAX_QUERY_TEXT:
        raise InputError(f"{where}: {what} of {len(text)} characters; at most {MAX_QUERY_TEXT}")
    return text


def _query(r: dict, where: str) -> SubmitQuery:
    qid = _scalar(r.get("query_id", r.get("id")), "query_id", where)
    if not qid:
        raise InputError(f"{where}: no query id (query_id or id)")
    try:
        query_file_name(qid)
        task = parse_task(_scalar(r.get("task", r.get("type")), "task", where))
    except InputError as exc:
        raise InputError(f"{where}: {exc}" if not str(exc).startswith(where) else str(exc)) from None
    text = _scalar(r.get("query", r.get("text")), "query", where)
    events = r.get("events")
    if events is None:
        events = [e.strip() for e in text.split(" | ")] if task == TRAKE else [text]
    elif not isinstance(events, list):  # a string would be read letter by letter, an object by its keys
        raise InputError(f"{where}: events must be a list of texts, not {type(events).__name__}")
    events = tuple(e for e in (_scalar(e, "an event", where) for e in events) if e)
    if not events:
        raise InputError(f"{where}: query {qid} has no text")
    return SubmitQuery(qid, task, text or " | ".join(events), events, _scalar(r.get("answer"), "answer", where))


def read_answers(path: str | Path) -> dict:
    """QA answers: a JSON object ``{query_id: answer}`` or ``id<TAB>answer`` lines."""
    hint = 'give {"query_id": "answer"}'
    out = {}
    for rec in read_records(path, "answers file", text_line=_answer_line, single_object=True, hint=hint):
        if isinstance(rec.value, tuple):
            out[rec.value[0]] = rec.value[1]
        elif isinstance(rec.value, dict):
            out.update({str(k): _scalar(v, f"the answer of {str(k)[:40]!r}", rec.where) for k, v in rec.value.items()})
        else:
            raise InputError(f"{rec.where} is not a JSON object; {hint}")
    return out


def _answer_line(line: str, where: str) -> tuple[str, str]:
    qid, sep, ans = line.partition("\t")
    if not sep:
        raise InputError(f"{where}: expected id<TAB>answer, got {line[:80]!r}")
    return qid.strip(), ans.strip()


def run_submit(queries: str | Path, index_dir: str | Path, out_dir: str | Path,
               answers: str | Path | None = None, within_s: float = 60.0, searcher=None,
               allow_unmapped: bool = False, **open_kwargs) -> SubmitReport:
    """One submission file per query of ``queries`` under ``out_dir`` (checks every input first).

    Args:
        answers: QA answers file (``read_answers``); a query's own ``answer`` is used otherwise,
            else the answer is left empty for you to fill in.
        within_s: TRAKE window: every event within this many seconds of the one before (``retrieval.events``).
        searcher: an open ``retrieval.Searcher`` (default: ``Searcher.open(index_dir, **open_kwargs)``).
        allow_unmapped: also submit frames without a time (keyframes indexed without their map,
            whose frame_idx is only the keyframe number); by default they are left out, with a warning.
    """
    import logging

    from mergeseek.retrieval.events import search_events
    from mergeseek.retrieval.hybrid import split_channels
    from mergeseek.retrieval.search import Searcher

    qs = read_queries(queries)
    given = read_answers(answers) if answers else {}
    if not within_s > 0:
        raise InputError(f"--within {within_s} is not valid; give a window in seconds > 0")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "permission denied")
    except OSError as exc:
        from mergeseek.runtime import write_error

        if isinstance(exc, FileExistsError) or (out.exists() and not out.is_dir()):
            raise InputError(f"--out {out} is a file, not a folder; choose a folder for the {{query_id}}.csv files") from None
        raise write_error(out, exc) from None
    if searcher is None:
        searcher = Searcher.open(index_dir, **open_kwargs)
    report = SubmitReport(str(out))
    for q in qs:
        answer = given.get(q.qid, q.answer) if q.task == QA else ""
        if q.task == TRAKE:
            # chains start at distinct frames, so few repeat: the 100 rows plus a margin (search depth is 20x this)
            rows = submission_rows(search_events(searcher, q.events, within_s, k=MAX_ROWS + 20), TRAKE)
        elif split_channels(q.events[0])[1]:  # "a crowd ocr: HÀ NỘI asr: thủ tướng": text channels fused in
            rows = _channel_rows(searcher, q.events[0], q.task, answer, allow_unmapped, report)
        else:
            rows = _frame_rows(searcher, searcher.text_vector(q.events[0]), q.task, answer, allow_unmapped, report)
        path = out / query_file_name(q.qid)
        n = write_rows(path, rows)
        report.files.append((q.qid, q.task, n, str(path)))
    if report.unmapped:
        logging.getLogger(__name__).warning(
            "left out frames of %d video(s) without a keyframe map (their frame_idx is only the keyframe number): %s; "
            "index them with their map-keyframes CSV (--maps DIR), or pass --allow-unmapped",
            len(report.unmapped), ", ".join(sorted(report.unmapped)[:10]))
    return report


def _frame_rows(searcher, vector, task: str, answer: str, allow_unmapped: bool, report: SubmitReport) -> list[tuple]:
    """KIS / QA rows: the nearest frames, searching deeper until 100 distinct usable rows (or the whole index)."""
    depth = min(searcher.size, 2 * MAX_ROWS)
    while True:
        hits = searcher.search_vector(vector, depth)
        if not allow_unmapped:
            hits = _timed(hits, report)
        rows = submission_rows(hits, task, answer)
        if len(rows) >= MAX_ROWS or depth >= searcher.size:
            return rows
        depth = min(searcher.size, depth * 4)


def _channel_rows(searcher, text: str, task: str, answer: str, allow_unmapped: bool, report: SubmitReport) -> list[tuple]:
    """KIS / QA rows of a query with ``ocr:`` / ``asr:`` parts (``retrieval.hybrid``): the fused ranking
    of its description and text channels (a text channel alone gives only the frames that hold its words)."""
    from mergeseek.retrieval.hybrid import search_hybrid, split_channels

    visual, said = split_channels(text)
    hits = search_hybrid(searcher, visual, said.get("ocr"), k=min(searcher.size, 4 * MAX_ROWS), asr=said.get("asr"))
    if not allow_unmapped:
        hits = _timed(hits, report)
    return submission_rows(hits, task, answer)


def _timed(hits: list, report: SubmitReport) -> list:
    """Hits with a known time: a keyframe indexed without its map has none, and no real frame number."""
    import math

    kept = []
    for h in hits:
        if math.isfinite(h.pts_time):
            kept.append(h)
        else:
            report.unmapped.add(h.video_id)
    return kept
