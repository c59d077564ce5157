"""One report protocol: every command that does work returns a report with ``to_dict()`` (the JSON
a script reads, ``--json``) and ``summary_lines()`` (what a person reads), printed by :func:`render`."""

from __future__ import annotations

import json
from typing import Protocol, runtime_checkable


@runtime_checkable
class Report(Protocol):
    def to_dict(self) -> dict: ...

    def summary_lines(self) -> list[str]: ...


def json_default(o):
    """``json.dumps(default=...)`` for what reports hold besides plain JSON: numpy scalars, sets, tuples, paths."""
    from pathlib import PurePath

    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, frozenset, tuple)):
        return sorted(o, key=str) if isinstance(o, (set, frozenset)) else list(o)
    if isinstance(o, PurePath):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")


def to_json(data, indent: int = 1) -> str:
    return json.dumps(data, indent=indent, ensure_ascii=False, default=json_default)


def render(report: Report, json_out: bool = False) -> str:
    """``report`` as indented JSON (``json_out``) or as its summary lines."""
    return to_json(report.to_dict()) if json_out else "\n".join(report.summary_lines())
