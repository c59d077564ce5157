"""Near-duplicate frames (a static news shot sampled once a second) found by a perceptual hash.

The hash is a 64-bit difference hash (dHash): a 9x8 grey thumbnail, one bit per horizontal
neighbour pair saying which is brighter. It ignores small motion and compression noise but it
is blind to flat colour (every solid frame hashes to 0), so a frame only counts as a duplicate
when an 8x8 colour thumbnail agrees too: two different solid-colour shots stay distinct.

Frames are compared with the last *kept* frame of the same video only: a shot that comes back
later in the video is a different moment and keeps its own timestamp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from mergeseek.errors import ConfigError


@dataclass(frozen=True)
class PHash:
    """A frame's perceptual fingerprint: the dHash bits and a coarse colour thumbnail."""

    dhash: int  # unsigned 64-bit value
    colour: np.ndarray  # [8, 8, 3] float32, 0..255

    @property
    def signed(self) -> int:
        """The dHash as a signed int64 (how parquet stores it)."""
        return self.dhash - (1 << 64) if self.dhash >= (1 << 63) else self.dhash


def phash(image: np.ndarray) -> PHash:
    """Fingerprint of an HxWx3 uint8 frame."""
    from PIL import Image

    # A 9x8 hash needs little of a 720p frame: a strided view (~64 px on the short side) makes
    # hashing ~20x cheaper than resampling every pixel, and the hash is no less stable.
    step = max(1, min(image.shape[:2]) // 64)
    pil = Image.fromarray(np.ascontiguousarray(image[::step, ::step]))
    grey = np.asarray(pil.convert("L").resize((9, 8), Image.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).ravel()
    value = int(np.packbits(bits).view(">u8")[0])
    colour = np.asarray(pil.convert("RGB").resize((8, 8), Image.BILINEAR), dtype=np.float32)
    return PHash(value, colour)


@dataclass(frozen=True)
class Dedup:
    """Near-duplicate rule.

    Args:
        enabled: skip near-duplicates at all.
        max_bits: dHash bits (of 64) that may differ for a duplicate.
        max_colour: mean absolute difference (0..255) the colour thumbnails may have.
    """

    enabled: bool = True
    max_bits: int = 4
    max_colour: float = 6.0

    def __post_init__(self) -> None:
        if not 0 <= self.max_bits <= 64:
            raise ConfigError(f"dedup max_bits={self.max_bits} is not valid; give 0..64 (differing hash bits)")
        if self.max_colour < 0:
            raise ConfigError(f"dedup max_colour={self.max_colour} is not valid; give a value >= 0")

    def __str__(self) -> str:
        return f"dhash<={self.max_bits},colour<={self.max_colour:g}" if self.enabled else "off"

    def is_duplicate(self, a: PHash, b: Optional[PHash]) -> bool:
        if not self.enabled or b is None:
            return False
        if bin(a.dhash ^ b.dhash).count("1") > self.max_bits:
            return False
        return float(np.abs(a.colour - b.colour).mean()) <= self.max_colour


class DuplicateFilter:
    """Stateful per-video filter: call :meth:`keep` on frames in order."""

    def __init__(self, rule: Dedup):
        self.rule = rule
        self._last: Optional[PHash] = None
        self.skipped = 0

    def keep(self, h: PHash) -> bool:
        if self.rule.is_duplicate(h, self._last):
            self.skipped += 1
            return False
        self._last = h
        return True
