"""Translate the visual part of a query before the text tower reads it (``--translate``).

AI Challenge queries are Vietnamese; the CLIP text towers this project ships read English. A
translator turns the description (the part that becomes a CLIP vector: the text query and each
``--then`` event) into the tower's language; the on-screen text (``--ocr``) and speech (``--asr``)
parts stay as typed, since the text index folds Vietnamese itself. Two kinds, chosen by the spec:

* ``py:package.module:function``: a Python function ``str -> str`` (imported once);
* anything else (``cmd:`` prefix optional): a command, split like a shell line (no shell runs it),
  that reads the query on standard input (UTF-8) and writes the translation on standard output,
  e.g. ``--translate "argos-translate --from vi --to en"`` or a script of your own.

Translations are cached per process (the web app asks for the same text often). A translator
that fails, times out or answers nothing is one line naming it; nothing is searched with an
untranslated query behind the user's back.
"""

from __future__ import annotations

import importlib
import shlex
import shutil
import subprocess
from collections import OrderedDict
from typing import Callable, Optional

from mergeseek.errors import ConfigError, InputError

TIMEOUT_S = 30.0
CACHE_SIZE = 4096
MAX_OUTPUT = 100_000  # characters; a translation longer than this is refused


class Translator:
    """``translator(text) -> text``, cached; ``name`` is what error lines and reports show."""

    def __init__(self, name: str, fn: Callable[[str], str]):
        self.name, self._fn = name, fn
        self._cache: "OrderedDict[str, str]" = OrderedDict()

    def __call__(self, text: str) -> str:
        key = text.strip()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        out = self._fn(key)
        if not isinstance(out, str):
            raise InputError(f"translator {self.name} returned {type(out).__name__}, not text")
        out = out.strip()
        if not out:
            raise InputError(f"translator {self.name} returned nothing for {key[:60]!r}")
        if len(out) > MAX_OUTPUT:
            raise InputError(f"translator {self.name} returned {len(out)} characters; at most {MAX_OUTPUT} are taken")
        self._cache[key] = out
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return out

    def __repr__(self) -> str:
        return f"Translator({self.name!r})"


def get_translator(spec: Optional[str], timeout_s: float = TIMEOUT_S) -> Optional[Translator]:
    """The translator of ``spec`` (None or empty: none), checked now: a missing command or
    function fails here, before any model loads."""
    if spec is None or not str(spec).strip():
        return None
    spec = str(spec).strip()
    if spec.startswith("py:"):
        return _python(spec[3:].strip())
    return _command(spec[4:].strip() if spec.startswith("cmd:") else spec, timeout_s)


def _python(target: str) -> Translator:
    module, _, name = target.partition(":")
    if not module or not name:
        raise ConfigError(f"--translate py:{target} is not valid; give py:package.module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ConfigError(f"--translate py:{target}: cannot import {module} ({exc})") from None
    except AttributeError:
        raise ConfigError(f"--translate py:{target}: {module} has no {name}") from None
    if not callable(fn):
        raise ConfigError(f"--translate py:{target}: {name} is not a function")

    def call(text: str) -> str:
        try:
            return fn(text)
        except Exception as exc:  # the user's code: any failure is one line, not a traceback
            raise InputError(f"translator py:{target} failed: {type(exc).__name__}: {exc}") from None

    return Translator(f"py:{target}", call)


def _command(line: str, timeout_s: float) -> Translator:
    try:
        argv = shlex.split(line)
    except ValueError as exc:
        raise ConfigError(f"--translate {line!r} is not a valid command line ({exc})") from None
    if not argv:
        raise ConfigError("--translate is empty; give a command or py:module:function")
    if shutil.which(argv[0]) is None:
        raise ConfigError(f"--translate: command {argv[0]!r} not found (give its path, or install it)")

    def call(text: str) -> str:
        try:
            proc = subprocess.run(argv, input=text, capture_output=True, text=True, encoding="utf-8",
                                  errors="replace", timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise InputError(f"translator {argv[0]} did not answer within {timeout_s:g} s") from None
        except OSError as exc:
            raise InputError(f"translator {argv[0]} could not run ({exc})") from None
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1][:200]
            raise InputError(f"translator {argv[0]} exited with {proc.returncode}: {last}")
        return proc.stdout

    return Translator(argv[0] if len(argv) == 1 else f"{argv[0]} {' '.join(argv[1:])}"[:80], call)


__all__ = ["Translator", "get_translator", "TIMEOUT_S"]
