"""One error hierarchy for mergeseek.

Library code raises these with a message that says what failed, the offending value and what to
do; ``cli.py`` turns them into a one-line message and an exit code in exactly one place.
"""

from __future__ import annotations


class MergeseekError(Exception):
    """Base class: the message is meant to be shown to the user as is."""

    exit_code = 1


class ConfigError(MergeseekError, ValueError):
    """A bad option value or config string (names the key and lists the valid choices)."""

    exit_code = 2


class InputError(MergeseekError):
    """Bad input data: missing folder, unreadable video or image, empty query."""

    exit_code = 3


class IndexMismatchError(MergeseekError):
    """An index was built with a different model / dimension than the one asked for."""

    exit_code = 4


class UnsupportedModelError(MergeseekError):
    """A model family or architecture the merge patches cannot handle."""

    exit_code = 5


class WeightsUnavailableError(MergeseekError):
    """Pretrained weights could not be loaded (offline, unknown tag, missing file)."""

    exit_code = 6


class MissingDependencyError(MergeseekError):
    """An optional package that this feature needs is not installed (the message has the pip command)."""

    exit_code = 7


class WriteError(MergeseekError):
    """A write failed (disk full, read-only or missing folder); nothing of this run was committed."""

    exit_code = 8


class PartialWriteError(WriteError):
    """A write failed after part of the run was committed (kept; the same command resumes)."""

    exit_code = 9


class NotFoundError(InputError):
    """An id, video id or route the index does not hold (the web app's 404; exit code 3 as bad input)."""


class DamagedIndexError(InputError):
    """A file of an index is damaged or missing; the message names it and the repair command."""

    exit_code = 10


class RayRunError(MergeseekError):
    """A Ray run stopped (cluster unreachable, workers died past their retries); what was committed
    is kept and the same command resumes."""

    exit_code = 11


def path_is_not(path, want: str) -> str:
    """Why ``path`` is not the ``want`` ("file" or "folder") a command needs, in a few words:
    "does not exist", "is a folder, not a file", "is a file, not a folder", or (a dangling link)
    "is a broken link"."""
    from pathlib import Path

    p = Path(path)
    if p.is_symlink() and not p.exists():
        return "is a broken link"
    if not p.exists():
        return "does not exist"
    if want == "file" and p.is_dir():
        return "is a folder, not a file"
    if want == "folder" and not p.is_dir():
        return "is a file, not a folder"
    return f"is not a {want}"
