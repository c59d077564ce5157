"""One parser for the ``key=value`` option strings that every config takes (issue #24).

``--merge r=8,method=lsh``, ``--reuse threshold=0.05``, reference-model overrides, ``--dataset``
specs, video sets and ``--sweep`` all go through :func:`parse_options`, so they split on the same
commas (outside brackets), refuse the same mistakes with the same words and list their valid keys.
Converting a value stays with each config: only it knows what the value means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from mergeseek.errors import ConfigError
from mergeseek.runtime import split_top_level


@dataclass(frozen=True)
class Options:
    """What :func:`parse_options` read: an optional leading name and the ``key=value`` pairs in order."""

    head: Optional[str]
    pairs: tuple[tuple[str, str], ...]

    def as_dict(self) -> dict[str, str]:
        return dict(self.pairs)


def parse_options(text: str, what: str, keys: Iterable[str], *, head: Optional[str] = None,
                  need_value: bool = False, brackets: bool = True) -> Options:
    """Split ``text`` (``a=1,b=[2,3]``) into key/value pairs, each key one of ``keys``.

    ``what`` names the option in messages (``merge``, ``reuse``, ``dataset``...). ``head``:
    ``"always"`` when the first item is a name rather than an option (``imagenet:/data,limit=5``),
    ``"optional"`` when a first item without ``=`` is a name. A key given twice, an item without
    ``=``, an unknown key and (``need_value``) an empty value raise ``ConfigError`` naming the item
    and the valid keys. Keys and values are stripped; keys are compared as written. ``brackets``:
    commas inside ``[...]``/``(...)`` belong to the value (``r=[16,8]``); off where values are
    paths, which may hold a lone bracket.
    """
    keys = list(keys)
    valid = f"valid keys: {', '.join(keys)}"
    items = split_top_level(text or "") if brackets else [i.strip() for i in (text or "").split(",") if i.strip()]
    name = None
    if head == "always" and items:
        name = items.pop(0)
    elif head == "optional" and items and "=" not in items[0]:
        name = items.pop(0)
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in items:
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep:
            raise ConfigError(f"{what} option {item[:60]!r} in {text[:80]!r} is not key=value; {valid}")
        if key not in keys:
            raise ConfigError(f"unknown {what} option {key[:40]!r} in {text[:80]!r}; {valid}")
        if key in seen:
            raise ConfigError(f"{what} option {key!r} is given twice in {text[:80]!r}; give each key once")
        if need_value and not value:
            raise ConfigError(f"{what} option {key!r} in {text[:80]!r} has no value; write {key}=VALUE")
        seen.add(key)
        pairs.append((key, value))
    return Options(name, tuple(pairs))
