"""Result formatting: a text table for people, JSON for scripts, the AI Challenge submission CSV."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from mergeseek.retrieval.events import EventChain
from mergeseek.retrieval.search import Hit, TemporalHit
from mergeseek.retrieval.submission import MAX_ROWS as SUBMISSION_MAX_ROWS  # the HCMC AI Challenge's row limit

Result = Union[Hit, TemporalHit, EventChain]


def format_timestamp(seconds: float) -> str:
    """``hh:mm:ss.mmm``; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    ms = int(round(seconds * 1000))
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}.{ms:03d}"


def _cell(text: str) -> str:
    """One table cell on one line: control characters (a newline in a file name) shown escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _width(text: str) -> int:
    """Terminal columns: wide (CJK) characters take two, combining marks none."""
    import unicodedata

    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    rows = [[_cell(c) for c in r] for r in rows]
    widths = [max([_width(h)] + [_width(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(cells):
        pads = [" " * (w - _width(c)) for c, w in zip(cells, widths)]
        out = [p + c if r else c + p for c, p, r in zip(cells, pads, right)]
        return "  ".join(out).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _channels_cell(channels: dict) -> str:
    parts = []
    for name, c in channels.items():
        parts.append(f"{name}#{c['rank']}" + (f" {c['text'][:60]}" if c.get("text") else ""))
    return "; ".join(parts)


def hits_table(results: Sequence[Result]) -> str:
    if not results:
        return "no results"
    if isinstance(results[0], EventChain):
        rows = [[f"{c.score:.4f}", c.video_id, " > ".join(str(h.frame_idx) for h in c.hits),
                 " > ".join(format_timestamp(h.pts_time) for h in c.hits), c.hits[0].path] for c in results]
        return _table(["score", "video_id", "frames", "timestamps", "path"], rows, [True, False, False, False, False])
    if isinstance(results[0], TemporalHit):
        rows = [
            [f"{p.score:.4f}", p.video_id, str(p.first.frame_idx), format_timestamp(p.first.pts_time),
             str(p.then.frame_idx), format_timestamp(p.then.pts_time), p.first.path]
            for p in results
        ]
        header = ["score", "video_id", "frame_idx", "timestamp", "then_frame", "then_time", "path"]
        return _table(header, rows, [True, False, True, True, True, True, False])
    rows = [[f"{h.score:.4f}", h.video_id, str(h.frame_idx), format_timestamp(h.pts_time), h.path] for h in results]
    if any(h.channels for h in results):  # a hybrid query: which channels matched, and the matched text
        rows = [r + [_channels_cell(h.channels or {})] for r, h in zip(rows, results)]
        return _table(["score", "video_id", "frame_idx", "timestamp", "path", "matched"], rows,
                      [True, False, True, True, False, False])
    if any(h.video and h.video.get("title") for h in results):  # AI Challenge media-info
        rows = [r + [str((h.video or {}).get("title", ""))[:60]] for r, h in zip(rows, results)]
        return _table(["score", "video_id", "frame_idx", "timestamp", "path", "title"], rows,
                      [True, False, True, True, False, False])
    return _table(["score", "video_id", "frame_idx", "timestamp", "path"], rows, [True, False, True, True, False])


# The release metadata a hit carries when the index has it (AI Challenge media-info, indexing.aic).
RELEASE_KEYS = ("title", "watch_url", "video_path", "publish_date")
Links = Callable[[Hit], tuple[Optional[str], Optional[str]]]


SERVER_PATH_KEYS = ("path", "video_path")  # where the files are on the machine that indexed them


def hit_dict(h: Hit, links: Optional[Links] = None, server_paths: bool = True) -> dict:
    """The one JSON shape of a hit: ``cli.py search --json`` and every hit of the web app's API.

    ``id, score, video_id, frame_idx, pts_time, timestamp, path, thumb_url, video_url`` and,
    when the index knows them, the release's ``title, watch_url, video_path, publish_date``.
    ``pts_time`` / ``timestamp`` are None without a timestamp; ``thumb_url`` / ``video_url`` are
    None outside the web app (``links``: the hit's thumbnail and video URLs, each None when the
    server has none). ``server_paths`` False (the web app) gives ``path`` and ``video_path`` as
    None: the same shape, without the server's file layout.
    """
    thumb_url, video_url = links(h) if links is not None else (None, None)
    timed = math.isfinite(h.pts_time)
    out = {
        "id": h.id,
        "score": round(h.score, 6),
        "video_id": h.video_id,
        "frame_idx": h.frame_idx,
        "pts_time": h.pts_time if timed else None,
        "timestamp": format_timestamp(h.pts_time) if timed else None,
        "path": h.path,
        "thumb_url": thumb_url,
        "video_url": video_url,
        **({k: h.video[k] for k in RELEASE_KEYS if k in h.video} if h.video else {}),
        **({"channels": h.channels} if h.channels else {}),
    }
    if not server_paths:
        out.update({k: None for k in SERVER_PATH_KEYS if k in out})
    return out


def result_dict(r: Result, links: Optional[Links] = None, server_paths: bool = True) -> dict:
    """``hit_dict`` of a hit; a temporal pair is its first frame's hit with the pair's ``score``,
    ``first_score``, and ``first`` and ``then`` (the two frames' hits); a chain of three or more
    events (``retrieval.events``) is the same with ``chain``, every frame's hit in event order."""
    if isinstance(r, EventChain):
        chain = [hit_dict(h, links, server_paths) for h in r.hits]
        return {**chain[0], "score": round(r.score, 6), "first_score": chain[0]["score"], "first": chain[0],
                "then": chain[1] if len(chain) > 1 else None, "chain": chain}
    if not isinstance(r, TemporalHit):
        return hit_dict(r, links, server_paths)
    first = hit_dict(r.first, links, server_paths)
    return {**first, "score": round(r.score, 6), "first_score": first["score"], "first": first,
            "then": hit_dict(r.then, links, server_paths)}


def hits_json(results: Sequence[Result]) -> str:
    """``cli.py search --json``: a list of ``result_dict``."""
    return json.dumps([result_dict(r) for r in results], indent=1)


def write_submission_csv(path: Union[str, Path], results: Sequence[Result]) -> int:
    """AI Challenge format: no header, ``video_id,frame_idx`` (events: ``video_id,frame_1,...,frame_N``).

    At most ``SUBMISSION_MAX_ROWS`` distinct rows; returns the number written. Written through a
    temp name by ``retrieval.submission`` (the one submission writer).
    """
    from mergeseek.retrieval.submission import write_results

    return write_results(path, results)
