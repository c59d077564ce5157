"""The one reader of record files a user names: JSON arrays, JSON lines and CSV.

Query files, QA answers and ground truth (and any file like them) are read here, so every one
of them takes UTF-8 with or without a BOM, skips blank lines, and reports malformed input as
one ``InputError`` line that names the file and the line (``queries.jsonl:7 is not valid
JSON ...``). Each record keeps that ``path:line``, so a check of its fields can name it too.

Which form a file is in is read from the file, not from its name: a file whose first
non-blank character is ``[`` is one JSON array (one record per element); any other file is
read line by line, where ``#`` lines are comments and a line is one JSON value unless the
caller reads its own plain-text lines (``text_line``, e.g. tab-separated). Where the caller
takes tables (``csv_tables``), a name ending in ``.csv`` is a CSV table with a header row (one
dict per row).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from mergeseek.errors import InputError
from mergeseek.runtime import read_text_file

_JSON_SPACE = re.compile(r"[ \t\n\r]*")  # the whitespace JSON allows between values


@dataclass(frozen=True)
class Record:
    """One record of a user file: its value and its line (where it starts; a CSV row: where it ends)."""

    path: str
    line: int
    value: Any

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def read_records(path: Union[str, Path], what: str, *, text_line: Optional[Callable[[str, str], Any]] = None,
                 single_object: bool = False, csv_tables: bool = False,
                 hint: str = "one JSON object per line") -> list[Record]:
    """The records of ``path`` in file order (``what`` names it in errors: "query file", ...).

    Args:
        text_line: reads a line that does not start with ``{`` (given the line and its
            ``path:line``); None: every line is JSON.
        single_object: a file that starts with ``{`` is one JSON object, which may span lines
            (one record), not JSON lines.
        csv_tables: a name ending in ``.csv`` is a CSV table with a header row (off: such a file
            is read by lines like any other, e.g. tab-separated lines saved as .csv).
        hint: what to write instead, added to a "not valid JSON" message.
    """
    text = read_text_file(path, what)
    name = str(path)
    if csv_tables and name.lower().endswith(".csv"):
        return _csv_records(text, name)
    body = text.lstrip()
    if body.startswith("["):
        return _array_records(text, name)
    if single_object and body.startswith("{"):
        return [Record(name, text.count("\n", 0, len(text) - len(body)) + 1, _loads(text, name, 0, hint))]
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if text_line is not None and not stripped.startswith("{"):
            out.append(Record(name, n, text_line(line, f"{name}:{n}")))
        else:
            out.append(Record(name, n, _loads(line, name, n, hint)))
    return out


def _loads(text: str, name: str, line: int, hint: str) -> Any:
    """One JSON value; a syntax error names the file and the line (``line`` 0: a whole file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = line or exc.lineno
        raise InputError(f"{name}:{at} is not valid JSON ({exc.msg}); {hint}") from None


def _array_records(text: str, name: str) -> list[Record]:
    """The elements of a JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()
    lines = _LineCounter(text)
    out: list[Record] = []
    i = _JSON_SPACE.match(text, text.index("[") + 1).end()
    closed = text.startswith("]", i)
    while not closed:
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise InputError(f"{name}:{exc.lineno} is not valid JSON ({exc.msg}); give one JSON array of objects") from None
        out.append(Record(name, lines.at(i), value))
        i = _JSON_SPACE.match(text, end).end()
        if text.startswith(",", i):
            i = _JSON_SPACE.match(text, i + 1).end()
        elif text.startswith("]", i):
            closed = True
        else:
            raise InputError(f"{name}:{lines.at(i)} is not valid JSON (expected ',' or ']' after entry {len(out)}); "
                             "give one JSON array of objects")
    rest = _JSON_SPACE.match(text, i + 1).end()
    if rest < len(text):
        raise InputError(f"{name}:{lines.at(rest)} is not valid JSON (text after the array's closing ']')")
    return out


class _LineCounter:
    """Line numbers of increasing offsets in one pass over the text."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def at(self, offset: int) -> int:
        self.line += self.text.count("\n", self.pos, offset)
        self.pos = offset
        return self.line


def _csv_records(text: str, name: str) -> list[Record]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    out = []
    try:
        for row in reader:
            out.append(Record(name, reader.line_num, row))
    except csv.Error as exc:
        raise InputError(f"{name}:{reader.line_num} is not valid CSV ({str(exc)[:120]})") from None
    return out


# ---------------------------------------------------------------------------- rows without a header
def csv_rows(path: Union[str, Path], what: str, limit: Optional[int] = None) -> list[list[str]]:
    """The non-empty rows of a headerless CSV file, strings as written; at most ``limit`` rows
    are read, so a huge file is not read whole. Errors as ``read_text_file``'s, plus a CSV error
    (a field over csv's size limit) named by its line."""
    path = Path(path)
    _check_file(path, what)
    rows: list[list[str]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            try:
                for row in _until(reader, limit):
                    rows.append(row)
            except UnicodeDecodeError:
                read_upto = fh.buffer.tell()
                raise InputError(f"{what} {path} is not UTF-8 text (byte {_bad_byte(path, read_upto)}); "
                                 "save it as UTF-8") from None
            except csv.Error as exc:
                raise InputError(f"{what} {path}:{reader.line_num} is not valid CSV ({str(exc)[:120]})") from None
    except OSError as exc:
        raise InputError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    return rows


def _until(reader, limit: Optional[int]) -> Iterator[list[str]]:
    """Non-empty rows, stopping right after the ``limit``-th (nothing more is read)."""
    n = 0
    for row in reader:
        if row:
            yield row
            n += 1
            if limit is not None and n >= limit:
                return


def _bad_byte(path: Path, upto: int) -> int:
    """Where the bytes read so far stop being UTF-8 (counted as ``read_text_file`` counts them)."""
    with open(path, "rb") as fh:
        data = fh.read(upto)
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return exc.start
    return upto


def _check_file(path: Path, what: str) -> None:
    """``read_text_file``'s refusals of a missing path or a folder (or a pipe, which would block), before streaming."""
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    if not path.is_file():
        raise InputError(f"{what} {path} is not a file")
