"""Result formatting: a text table for people, JSON for scripts, the AI Challenge submission CSV."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence, Union

from retrieval.search import Hit, TemporalHit

# The HCMC AI Challenge accepts at most this many rows per query file.
SUBMISSION_MAX_ROWS = 100
Result = Union[Hit, TemporalHit]


def format_timestamp(seconds: float) -> str:
    """``hh:mm:ss.mmm``; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    ms = int(round(seconds * 1000))
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}.{ms:03d}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells):
        out = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "  ".join(out).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def hits_table(results: Sequence[Result]) -> str:
    if not results:
        return "no results"
    if isinstance(results[0], TemporalHit):
        rows = [
            [f"{p.score:.4f}", p.video_id, str(p.first.frame_idx), format_timestamp(p.first.pts_time),
             str(p.then.frame_idx), format_timestamp(p.then.pts_time), p.first.path]
            for p in results
        ]
        header = ["score", "video_id", "frame_idx", "timestamp", "then_frame", "then_time", "path"]
        return _table(header, rows, [True, False, True, True, True, True, False])
    rows = [[f"{h.score:.4f}", h.video_id, str(h.frame_idx), format_timestamp(h.pts_time), h.path] for h in results]
    return _table(["score", "video_id", "frame_idx", "timestamp", "path"], rows, [True, False, True, True, False])


def _hit_dict(h: Hit) -> dict:
    return {
        "score": round(h.score, 6),
        "video_id": h.video_id,
        "frame_idx": h.frame_idx,
        "pts_time": h.pts_time if math.isfinite(h.pts_time) else None,
        "timestamp": format_timestamp(h.pts_time) if math.isfinite(h.pts_time) else None,
        "path": h.path,
        "id": h.id,
    }


def hits_json(results: Sequence[Result]) -> str:
    out = []
    for r in results:
        if isinstance(r, TemporalHit):
            out.append({"score": round(r.score, 6), "video_id": r.video_id, "first": _hit_dict(r.first), "then": _hit_dict(r.then)})
        else:
            out.append(_hit_dict(r))
    return json.dumps(out, indent=1)


def write_submission_csv(path: Union[str, Path], results: Sequence[Result]) -> int:
    """AI Challenge format: no header, ``video_id,frame_idx`` (temporal: ``video_id,frame_a,frame_b``).

    At most ``SUBMISSION_MAX_ROWS`` rows; returns the number written. Written through a temp name.
    """
    import os

    path = Path(path)
    rows = []
    for r in results[:SUBMISSION_MAX_ROWS]:
        if isinstance(r, TemporalHit):
            rows.append([r.video_id, r.first.frame_idx, r.then.frame_idx])
        else:
            rows.append([r.video_id, r.frame_idx])
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)
    os.replace(tmp, path)
    return len(rows)
