"""``ReuseConfig``: how a stream of frames reuses the work of its reference frame (see
:mod:`encoders.reuse`); parsed from ``threshold=0.05,refresh=16`` by the shared option parser."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Union

from mergeseek.errors import ConfigError
from mergeseek.options import parse_options

_OFF = ("", "none", "off")
_FLOATS = ("threshold", "cut", "attn", "query")
# Named settings, usable alone or first in a spec (``footage,audit=8``). ``footage``: the one config
# measured on every sample clip and synthetic kind (docs/REUSE.md, docs/BENCHMARKS.md "Real footage"):
# ViT-B-16, CPU time, carphone 2.33x, bikes 1.74x, bigbuckbunny 2.79x, pan 1.11x (never below 1x).
PRESETS = {"footage": {"threshold": 0.15, "refresh": 1000, "cut": 0.9, "roll": 4, "query": 0.15}}


@dataclass(frozen=True)
class ReuseConfig:
    """How a stream of frames reuses the work of its reference frame.

    Args:
        threshold: change (estimated angle for patches, relative L2 for block inputs and outputs)
            at or above which a token is recomputed; 0 computes every frame in full.
        refresh: every ``refresh``-th frame of a shot is computed in full (1: every frame).
        cut: share of changed patches above which a frame starts a new shot (scene change).
        attn: relative change of a token's attention output at or above which its out-projection
            is recomputed; 0 (the default) recomputes it for every token of a frame whose
            attention was recomputed. The attention output is how a changed patch reaches the
            unchanged ones, and the out-projection is a twelfth of a block's linear work, so
            recomputing it costs little and removes most of the error (docs/REUSE.md).
        bits: SimHash bits per patch (the angle resolution is pi / bits).
        seed: seed of the hash hyperplanes.
        max_videos: reference caches kept at once (least recently used are dropped).
        audit: every ``audit``-th frame that reused work is also encoded per-frame (in batches of
            the encoder's batch size), giving the error against per-frame encoding and the
            measured frames/s gain of the run at ~1/audit of the per-frame cost; 0: no audit.
        roll: ``k`` >= 1: rolling caches (Eventful's token buffers, updated every ``k`` frames): a
            frame that reuses work leaves, for each token of each gate, the values of the frame
            that last recomputed it, and the frames that follow are compared with those instead of
            with the shot's reference, which they drift away from. A pass over the blocks holds at
            most ``k`` frames of a video that reuse work, all compared with what the previous pass
            left (``k=1``: each frame with the one before it, as Eventful; a larger ``k`` batches
            the gated rows of ``k`` frames into one matrix product). 0 (the default): every frame
            of a shot is compared with its reference, one pass per batch.
        query: ``T`` > 0: attention is recomputed only for the queries of a frame whose q/k/v row
            was recomputed or whose block input moved by ``T`` (relative L2; ``T`` >= ``threshold``:
            the q/k/v rows alone); the other queries keep their cached attention output and
            out-projection rows (they changed by less than the gate lets through). 0 (the
            default): every query of a frame in which any q/k/v row was recomputed.
    """

    threshold: float = 0.05
    refresh: int = 16
    cut: float = 0.5
    attn: float = 0.0
    bits: int = 64
    seed: int = 0
    max_videos: int = 16
    audit: int = 32
    roll: int = 0
    query: float = 0.0

    def __post_init__(self) -> None:
        if not (self.threshold >= 0 and math.isfinite(self.threshold)):
            raise ConfigError(f"reuse threshold={self.threshold} is not valid; give a number >= 0 (0: no reuse)")
        if self.refresh < 1:
            raise ConfigError(f"reuse refresh={self.refresh} is not valid; it must be >= 1")
        if not 0.0 < self.cut <= 1.0:
            raise ConfigError(f"reuse cut={self.cut} is not valid; give a share in (0, 1]")
        if not (self.attn >= 0 and math.isfinite(self.attn)):
            raise ConfigError(f"reuse attn={self.attn} is not valid; give a number >= 0 (0: always recompute)")
        if not (self.query >= 0 and math.isfinite(self.query)):
            raise ConfigError(f"reuse query={self.query} is not valid; give a number >= 0 (0: every query of a frame that moved)")
        if not 1 <= self.bits <= 1024:
            raise ConfigError(f"reuse bits={self.bits} is not valid; give 1..1024")
        if self.max_videos < 1:
            raise ConfigError(f"reuse max_videos={self.max_videos} is not valid; it must be >= 1")
        if self.audit < 0:
            raise ConfigError(f"reuse audit={self.audit} is not valid; give an integer >= 0 (0: no audit)")
        for key in ("refresh", "max_videos", "audit", "roll"):
            if getattr(self, key) > 1_000_000:
                raise ConfigError(f"reuse {key}={getattr(self, key)} is not valid; it must be <= 1000000")
        if self.roll < 0:
            raise ConfigError(f"reuse roll={self.roll} is not valid; give 0 (compare with the shot's reference) or k >= 1 "
                              "(rolling caches, k frames of a video per pass)")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"reuse seed={self.seed} is not valid; give 0..{2**63 - 1}")

    @property
    def enabled(self) -> bool:
        return self.threshold > 0 and self.refresh > 1

    @classmethod
    def parse(cls, spec: Union[str, "ReuseConfig", None]) -> "ReuseConfig":
        """``threshold=0.05,refresh=16`` (``none``/``off``/empty: no reuse); a preset name of ``PRESETS``
        alone or first (``footage``, ``footage,audit=8``: the preset with those keys changed)."""
        if isinstance(spec, ReuseConfig):
            return spec
        if spec is None or spec.strip().lower() in _OFF:
            return cls(threshold=0.0)
        head, _, rest = spec.partition(",")
        settings = dict(PRESETS.get(head.strip().lower(), {}))
        keys = [f.name for f in dataclasses.fields(cls)]
        if settings:
            spec = rest
        elif head.strip() and "=" not in head:
            raise ConfigError(f"reuse option {head.strip()[:40]!r} is neither a preset ({', '.join(PRESETS)}) nor key=value; "
                              f"valid keys: {', '.join(keys)}")
        if spec.strip():
            settings.update({key: _number(key, value) for key, value in parse_options(spec, "reuse", keys, brackets=False).pairs})
        return cls(**settings)

    @property
    def recipe(self) -> str:
        """The settings that change a vector (``audit`` only measures), for the index recipe."""
        return str(dataclasses.replace(self, audit=type(self).audit))

    def __str__(self) -> str:
        if self == ReuseConfig(threshold=0.0):
            return "none"
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("threshold", "refresh") or value != f.default:
                parts.append(f"{f.name}={value:g}" if isinstance(value, float) else f"{f.name}={value}")
        return ",".join(parts)


def _number(key: str, value: str) -> Union[int, float]:
    """``value`` as the option's number (float for threshold, cut and attn; else an integer)."""
    kind = float if key in _FLOATS else int
    if len(value) > 24:  # no option takes a number that long: refused before converting it
        raise ConfigError(f"reuse {key}={value[:24]}... is not valid; give a number up to 1000000")
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"reuse {key}={value[:40]!r} is not valid; give {'a number' if kind is float else 'an integer'}") from None
