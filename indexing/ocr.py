"""On-screen text (OCR) of indexed frames: ``cli.py index --ocr [ENGINE]``.

An engine reads a batch of frames and gives each frame's words with their confidence and box.
The default, ``tesseract``, runs the Tesseract command (Debian ``tesseract-ocr`` with
``tesseract-ocr-vie`` and ``tesseract-ocr-eng``) once per batch, in sparse-text mode (``--psm 11``,
captions and tickers over pictures), Vietnamese + English; words under ``min_conf`` or without a
letter or digit are dropped (a photo's texture reads as stray punctuation).

OCR runs beside encoding: the reader hands each kept frame to a small pool of threads (each one
a Tesseract process at a time), and the writer stores a source's text with its shard
(``indexing.text.TextChannel``). A frame where OCR fails is reported and the rest kept.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mergeseek.errors import ConfigError, MissingDependencyError

log = logging.getLogger(__name__)

TESSERACT_INSTALL = "apt-get install tesseract-ocr tesseract-ocr-vie tesseract-ocr-eng"


@dataclass(frozen=True)
class Word:
    text: str
    conf: float  # 0..100
    box: tuple[int, int, int, int]  # left, top, width, height in the frame's pixels


@dataclass(frozen=True)
class FrameText:
    """What OCR read in one frame: its words in reading order (``text`` joins them)."""

    words: tuple[Word, ...] = ()
    error: str = ""  # why OCR failed on this frame ("" when it did not)

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)

    @property
    def conf(self) -> float:
        return float(np.mean([w.conf for w in self.words])) if self.words else 0.0


class TesseractEngine:
    """Tesseract through its command line, one process per batch of frames.

    Args:
        langs: Tesseract languages joined by ``+`` (``vie+eng``).
        psm: page segmentation mode (11: sparse text, found anywhere in the frame).
        min_conf: words read with a lower confidence (0-100) are dropped.
        max_side: frames are downscaled to this longest side first (speed; captions stay legible).
        passes: 2 reads each frame twice in the same Tesseract process, as it is and as inverted
            grey (light captions on translucent boxes or outlined over a picture), keeping the
            words of the second pass that do not overlap the first's; 1 reads it once (half the cost).
    """

    name = "tesseract"

    def __init__(self, langs: str = "vie+eng", psm: int = 11, min_conf: float = 60.0, max_side: int = 1280,
                 passes: int = 2):
        if passes not in (1, 2):
            raise ConfigError(f"--ocr passes={passes} is not valid; give 1 (the frame) or 2 (also its inverted grey)")
        self.langs, self.psm, self.min_conf, self.max_side, self.passes = langs, psm, min_conf, max_side, passes
        self.binary = shutil.which("tesseract")
        if self.binary is None:
            raise MissingDependencyError(f"--ocr tesseract needs the tesseract command: {TESSERACT_INSTALL}")
        listing = subprocess.run([self.binary, "--list-langs"], capture_output=True, text=True, timeout=30)
        have = {w.strip() for w in (listing.stdout + listing.stderr).splitlines()[1:]}
        missing = [lang for lang in langs.split("+") if lang not in have]
        if missing:
            raise MissingDependencyError(f"tesseract has no {'+'.join(missing)} language data: "
                                         f"apt-get install {' '.join('tesseract-ocr-' + m for m in missing)}")

    def __str__(self) -> str:
        return f"tesseract:{self.langs}" + (",passes=1" if self.passes == 1 else "")

    def _run(self, args: list[str], timeout: float = 60.0) -> str:
        env = {**os.environ, "OMP_THREAD_LIMIT": "1"}  # one core per Tesseract: the encoder has the others
        done = subprocess.run([self.binary, *args], capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode != 0:
            lines = (done.stderr or "").strip().splitlines()
            raise RuntimeError(lines[-1] if lines else f"tesseract exit code {done.returncode}")
        return done.stdout

    def read(self, images: Sequence, prescale: Optional[Sequence[float]] = None) -> list[FrameText]:
        """The text of each frame (HxWx3 uint8 RGB array or PIL image); a failed batch is retried
        frame by frame. ``prescale[i]``: how much frame i was already shrunk (boxes are given in the
        original frame's pixels)."""
        if not len(images):
            return []
        prescale = list(prescale) if prescale is not None else [1.0] * len(images)
        try:
            return self._read_batch(images, prescale)
        except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
            if len(images) == 1:
                return [FrameText(error=f"OCR failed ({_short(exc)})")]
            return [t for im, s in zip(images, prescale) for t in self.read([im], [s])]

    def shrink(self, image) -> tuple:
        """(``image`` as a PIL RGB image no larger than ``max_side``, the scale applied)."""
        from PIL import Image

        im = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image))
        im = im.convert("RGB")
        scale = min(1.0, self.max_side / max(im.size))
        if scale < 1.0:
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
        return im, scale

    def _read_batch(self, images: Sequence, prescale: Sequence[float]) -> list[FrameText]:
        from PIL import ImageOps

        with tempfile.TemporaryDirectory(prefix="mergeseek-ocr-") as tmp:
            scales, names = [], []
            pages = []
            for image, pre in zip(images, prescale):
                im, scale = self.shrink(image)
                pages.append((im, scale * pre))
            if self.passes == 2:  # light text over a busy picture reads better as dark text on light
                pages += [(ImageOps.invert(ImageOps.grayscale(im)), s) for im, s in pages[: len(images)]]
            for i, (im, scale) in enumerate(pages):
                name = os.path.join(tmp, f"{i:06d}.png")
                im.save(name)
                scales.append(scale)
                names.append(name)
            listing = Path(tmp) / "frames.txt"
            listing.write_text("\n".join(names) + "\n")
            tsv = self._run([str(listing), "stdout", "-l", self.langs, "--psm", str(self.psm), "tsv"],
                            timeout=30.0 + 10.0 * len(pages))
        read = parse_tsv(tsv, len(pages), scales, self.min_conf)
        if self.passes == 1:
            return read
        return [merge_passes(a, b) for a, b in zip(read[: len(images)], read[len(images):])]


def _overlap(a: tuple, b: tuple) -> float:
    """Intersection over the smaller box's area of two (left, top, width, height) boxes."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / max(1, min(a[2] * a[3], b[2] * b[3]))


def merge_passes(first: FrameText, second: FrameText) -> FrameText:
    """The words of ``first`` and those of ``second`` that overlap none of them (less than half of
    the smaller box), in reading order (lines top to bottom, then left to right)."""
    extra = [w for w in second.words if all(_overlap(w.box, v.box) < 0.5 for v in first.words)]
    words = list(first.words) + extra
    if not extra:
        return first
    line = max(1, int(np.median([w.box[3] for w in words])))
    return FrameText(tuple(sorted(words, key=lambda w: ((w.box[1] + w.box[3] // 2) // line, w.box[0]))), first.error)


def parse_tsv(tsv: str, frames: int, scales: Sequence[float], min_conf: float) -> list[FrameText]:
    """Tesseract's TSV (one page per frame, ``page_num`` from 1) as each frame's kept words."""
    words: list[list[Word]] = [[] for _ in range(frames)]
    for line in tsv.splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) < 12 or cols[0] != "5":  # level 5 = a word
            continue
        text = cols[11].strip()
        try:
            page, conf = int(cols[1]) - 1, float(cols[10])
            left, top, width, height = (int(c) for c in cols[6:10])
        except ValueError:
            continue
        if not 0 <= page < frames or conf < min_conf or not any(ch.isalnum() for ch in text):
            continue
        s = scales[page] or 1.0
        words[page].append(Word(text, conf, (round(left / s), round(top / s), round(width / s), round(height / s))))
    return [FrameText(tuple(w)) for w in words]


class OcrStage:
    """OCR beside encoding: frames are shrunk on arrival and read by ``workers`` threads (each
    running one engine process at a time); at most ``2 * workers`` batches wait, so a slow engine
    slows the reader rather than filling memory."""

    def __init__(self, engine, workers: int = 1):
        from concurrent.futures import ThreadPoolExecutor

        self.engine, self.workers = engine, max(1, int(workers))
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="mergeseek-ocr")
        self.slots = threading.BoundedSemaphore(2 * self.workers)
        self.busy_s = 0.0
        self._lock = threading.Lock()

    def submit(self, images: Sequence):
        """Start reading ``images``; returns a Future of their ``FrameText`` list."""
        shrunk = [self.engine.shrink(im) for im in images]
        self.slots.acquire()
        try:
            fut = self.pool.submit(self._read, [im for im, _ in shrunk], [s for _, s in shrunk])
        except BaseException:
            self.slots.release()
            raise
        fut.add_done_callback(lambda _: self.slots.release())
        return fut

    def _read(self, images, scales) -> list[FrameText]:
        t0 = time.perf_counter()
        out = self.engine.read(images, scales)
        with self._lock:
            self.busy_s += time.perf_counter() - t0
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


ENGINES = {"tesseract": TesseractEngine}


def get_engine(spec: Optional[str]) -> Optional[TesseractEngine]:
    """``--ocr`` value -> an engine: ``tesseract`` (the default), ``tesseract:LANGS`` (``vie+eng``)
    and options (``tesseract:vie,passes=1,min_conf=50``); None or ``none`` -> None. A missing engine
    raises ``MissingDependencyError`` naming what to install."""
    from mergeseek.options import parse_options

    if spec is None or spec.strip().lower() in ("", "none", "off"):
        return None
    parsed = parse_options(spec.strip(), "ocr", ("passes", "min_conf", "max_side"), head="always", brackets=False)
    name, _, langs = (parsed.head or "").partition(":")
    if name.lower() not in ENGINES:
        raise ConfigError(f"--ocr {spec!r}: unknown engine; choose one of {', '.join(ENGINES)} (e.g. tesseract:vie+eng)")
    kwargs: dict = {"langs": langs} if langs else {}
    for key, value in parsed.pairs:
        try:
            kwargs[key] = int(value) if key != "min_conf" else float(value)
        except ValueError:
            raise ConfigError(f"--ocr {key}={value[:20]!r} is not a number") from None
    return ENGINES[name.lower()](**kwargs)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:160]


__all__ = ["ENGINES", "FrameText", "OcrStage", "TesseractEngine", "Word", "get_engine", "parse_tsv"]
