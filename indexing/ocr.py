"""On-screen text (OCR) of indexed frames: ``cli.py index --ocr ENGINE``.

An engine reads a batch of frames and gives each frame's words with their confidence and box.
``rapidocr`` (below) finds the text lines first and meets the targets of docs/TEXT.md;
``tesseract`` runs the Tesseract command (Debian ``tesseract-ocr`` with
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
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mergeseek.errors import ConfigError, MissingDependencyError

log = logging.getLogger(__name__)

TESSERACT_INSTALL = "apt-get install tesseract-ocr tesseract-ocr-vie tesseract-ocr-eng"
RUNTIMES = ("auto", "onnxruntime", "openvino")  # what runs RapidOCR's models (RapidOcrEngine(runtime=...))
RAPIDOCR_INSTALL = "pip install 'mergeseek[ocr]' (rapidocr_onnxruntime and onnxruntime; its wheel ships the models)"


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
    also: str = ""  # other readings, searched but not shown (speech: words of the recogniser's n-best hypotheses)

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


class RapidOcrEngine:
    """RapidOCR (PaddleOCR's PP-OCRv4 detector and recogniser as ONNX models, shipped in the
    ``rapidocr_onnxruntime`` wheel): a text detector finds the text lines, and only those crops are
    read. Detection runs on the frame shrunk to ``det_side`` pixels on its long side (the detector's
    cost grows with the pixels; a line of 20 px on a 720p frame is still found at 640); each line
    is recognised from the frame at up to ``max_side``. The recogniser's alphabet has no Vietnamese
    diacritics ("Hà Nội" reads "Ha Noi"): matching is on folded words (``indexing.text.fold``), so
    that costs no recall. A line is split into words, each given its share of the line's box.

    RapidOCR's models and its detector's post-processing are used; the steps around them are ours:
    the detector's input is made in one pass from the RGB frame (:func:`detector_input`), its boxes
    are mapped straight to the frame, each line is recognised on its own (RapidOCR batches them,
    padded to the widest: more CPU per line here), and a line crop of exactly the pixels of one
    read lately (a ticker, a logo) is not read again (``remember`` crops per thread).

    Args:
        det_side: long side of the frame for the detector.
        max_side: long side of the frame the lines are cut from.
        min_conf: lines read with a lower confidence (0-100) are dropped.
        threads: threads per engine of the runtime (ONNX Runtime or OpenVINO; one per OCR worker by default).
        rec_height: height in pixels of the lines given to the recogniser (trained at 48; 40 is
            12% cheaper and makes about twice the character errors, docs/BENCHMARKS.md).
        runtime: what runs the two models: ``onnxruntime`` (RapidOCR's own sessions), ``openvino``
            (the same ONNX files compiled by OpenVINO, ``indexing.ocr_openvino``: less CPU), or
            ``auto`` (OpenVINO where it is installed, else ONNX Runtime).
        rec_precision: the recogniser's arithmetic under OpenVINO: ``f32``, ``bf16`` (about half
            the CPU per line, the same error rate on the benchmarks), or ``auto`` (bf16 where the CPU
            has native bf16, else f32). The detector is always fp32.
    """

    name = "rapidocr"

    def __init__(self, det_side: int = 640, max_side: int = 1280, min_conf: float = 50.0, threads: int = 1,
                 rec_height: int = 48, runtime: str = "auto", rec_precision: str = "auto"):
        from mergeseek.indexing import ocr_openvino

        if det_side < 64 or max_side < 64 or threads < 1 or not 16 <= rec_height <= 48:
            raise ConfigError(f"--ocr rapidocr: det_side={det_side}, max_side={max_side}, threads={threads}, "
                              f"rec_height={rec_height} are not valid; give det_side and max_side of at least 64 pixels, "
                              "threads >= 1 and rec_height from 16 to 48")
        if runtime not in RUNTIMES or rec_precision not in ("auto", *ocr_openvino.PRECISIONS):
            raise ConfigError(f"--ocr rapidocr: runtime={runtime}, rec_precision={rec_precision} are not valid; give runtime "
                              f"one of {', '.join(RUNTIMES)} and rec_precision one of auto, {', '.join(ocr_openvino.PRECISIONS)}")
        if runtime == "onnxruntime" and rec_precision not in ("auto", "f32"):
            raise ConfigError(f"--ocr rapidocr: rec_precision={rec_precision} needs runtime=openvino "
                              "(ONNX Runtime runs these models in f32 only)")
        try:
            import rapidocr_onnxruntime  # noqa: F401
        except ImportError:
            raise MissingDependencyError(f"--ocr rapidocr needs the rapidocr_onnxruntime package: {RAPIDOCR_INSTALL}") from None
        if (runtime == "openvino" or rec_precision == "bf16") and not ocr_openvino.available():
            raise MissingDependencyError(f"--ocr rapidocr,runtime=openvino (and rec_precision=bf16) needs the openvino "
                                         f"package: {ocr_openvino.OPENVINO_INSTALL}")
        self.det_side, self.max_side, self.min_conf, self.threads = int(det_side), int(max_side), float(min_conf), int(threads)
        self.rec_height = int(rec_height)
        self.asked = {"runtime": runtime, "rec_precision": rec_precision}  # as given (``__str__``)
        # what runs: auto resolved on this machine
        self.runtime = runtime if runtime != "auto" else ("openvino" if ocr_openvino.available() else "onnxruntime")
        self.rec_precision = "f32" if self.runtime == "onnxruntime" else (
            rec_precision if rec_precision != "auto" else ("bf16" if ocr_openvino.native_bf16() else "f32"))
        self._local = threading.local()  # per OCR thread: its ONNX sessions (RapidOCR keeps state per call), crops read lately
        self.remember = 64  # line crops remembered per thread (a news screen holds a few lines at a time)
        self.recognised = self.reused = 0  # line crops read, and crops found among those remembered (counts)
        self._count = threading.Lock()

    def __str__(self) -> str:
        extra = "".join(f",{k}={v:g}" for k, v, d in (("det_side", self.det_side, 640), ("max_side", self.max_side, 1280),
                                                        ("min_conf", self.min_conf, 50.0), ("rec_height", self.rec_height, 48))
                        if v != d)
        extra += "".join(f",{k}={v}" for k, v in self.asked.items() if v != "auto")
        return "rapidocr" + extra

    def describe(self) -> str:
        """What reads, as resolved here: ``str(self)`` and the runtime and recogniser precision."""
        return f"{self} ({self.runtime}, recogniser {self.rec_precision})"

    def _model(self):
        model = getattr(self._local, "model", None)
        if model is None:
            from rapidocr_onnxruntime import RapidOCR

            model = self._local.model = RapidOCR(intra_op_num_threads=self.threads, inter_op_num_threads=1)
            model.text_det.limit_type = "max"  # never enlarge the detector's input (it is shrunk here first)
            if self.rec_height != 48:  # lines given to the recogniser lower than it was trained on (48 px): cheaper
                model.text_rec.rec_image_shape = [3, self.rec_height, round(320 * self.rec_height / 48)]
            if self.runtime == "openvino":
                from mergeseek.indexing import ocr_openvino

                ocr_openvino.install(model, self.threads, self.rec_precision)
        return model

    def shrink(self, image) -> tuple:
        """(``image`` as an RGB uint8 array no larger than ``max_side``, the scale applied)."""
        import cv2

        arr = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        arr = np.ascontiguousarray(arr[:, :, :3], dtype=np.uint8)
        scale = min(1.0, self.max_side / max(arr.shape[:2]))
        if scale < 1.0:
            arr = cv2.resize(arr, (max(1, round(arr.shape[1] * scale)), max(1, round(arr.shape[0] * scale))),
                             interpolation=cv2.INTER_AREA)
        return arr, scale

    def read(self, images: Sequence, prescale: Optional[Sequence[float]] = None) -> list[FrameText]:
        """The text of each frame (HxWx3 uint8 RGB array or PIL image); a frame that fails gets its
        error, the others are read. ``prescale`` as for ``TesseractEngine.read``."""
        prescale = list(prescale) if prescale is not None else [1.0] * len(images)
        out = []
        for image, pre in zip(images, prescale):
            try:
                out.append(self._read_one(image, pre))
            except Exception as exc:  # a damaged frame, an ONNX error: reported, the run goes on
                out.append(FrameText(error=f"OCR failed ({_short(exc)})"))
        return out

    def _read_one(self, image, pre: float) -> FrameText:
        rgb, scale = self.shrink(image)
        model = self._model()
        h, w = rgb.shape[:2]
        blob = detector_input(rgb, self.det_side)
        if blob is None:
            return FrameText()
        boxes, _ = model.text_det.postprocess_op(model.text_det.infer(blob)[0], (h, w))
        boxes = model.text_det.filter_tag_det_res(boxes, (h, w)) if len(boxes) else boxes
        if not len(boxes):
            return FrameText()
        quads = np.asarray(boxes, np.float32)
        read = [self._recognise(model, np.ascontiguousarray(crop[:, :, ::-1]))
                for crop in model.get_crop_img_list(rgb, quads)]
        to_frame = 1.0 / ((scale * pre) or 1.0)
        lines = []
        for quad, (text, conf) in zip(quads, read):
            if 100.0 * float(conf) < self.min_conf or not text.strip():
                continue
            (x0, y0), (x1, y1) = quad.min(0) * to_frame, quad.max(0) * to_frame
            lines.append((float(x0), float(y0), float(x1), float(y1), text.strip(), 100.0 * float(conf)))
        return FrameText(tuple(w for line in _reading_order(lines) for w in _line_words(*line)))

    def forget(self) -> None:
        """Forget the line crops this thread read (a benchmark reading the same frames again)."""
        self._local.__dict__.pop("seen", None)

    def _recognise(self, model, crop: np.ndarray) -> tuple:
        """(text, confidence 0-1) of one line crop (BGR). A crop of exactly the pixels of one read
        lately (a ticker or a logo that stays on screen across keyframes) is not read again: the same
        input gives the same output. One crop per call: batching lines pads them to the widest and
        cost more per line here (docs/BENCHMARKS.md, OCR)."""
        import hashlib

        key = (crop.shape, hashlib.blake2b(crop.tobytes(), digest_size=16).digest())
        seen = self._local.__dict__.setdefault("seen", OrderedDict())
        if key in seen:
            seen.move_to_end(key)
            with self._count:
                self.reused += 1
            return seen[key]
        (out,), _ = model.text_rec([crop])
        seen[key] = out
        if len(seen) > self.remember:
            seen.popitem(last=False)
        with self._count:
            self.recognised += 1
        return out


def detector_input(rgb: np.ndarray, det_side: int) -> Optional[np.ndarray]:
    """The text detector's input for an RGB frame: float32 [1, 3, H, W], BGR, ``(x / 255 - 0.5) / 0.5``;
    None for a frame too small to hold text.

    These are RapidOCR's own pixels exactly (the frame shrunk by area to ``det_side`` on its long side,
    then resized to multiples of 32), made in one pass from the RGB frame. RapidOCR's path also copies
    the whole frame to BGR first and normalises in float64. A direct area resize to the multiple of 32
    would be one step fewer, but an area resize by a ratio that is not a whole number costs 8x more.
    """
    import cv2

    h, w = rgb.shape[:2]
    s = min(1.0, det_side / max(h, w))
    small = rgb if s >= 1.0 else cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    dw, dh = (int(round(int(x) / 32) * 32) for x in (small.shape[1], small.shape[0]))
    if not dw or not dh:
        return None
    if (dh, dw) != small.shape[:2]:
        small = cv2.resize(small, (dw, dh))
    return cv2.dnn.blobFromImage(small, 1 / 127.5, None, (127.5, 127.5, 127.5), swapRB=True, crop=False)


def _reading_order(lines: list) -> list:
    """Lines ``(x0, y0, x1, y1, ...)`` top to bottom (a row is one median line height), then left to right."""
    if not lines:
        return lines
    row = max(1.0, float(np.median([y1 - y0 for _, y0, _, y1, *_ in lines])))
    return sorted(lines, key=lambda t: (int((t[1] + t[3]) / 2 // row), t[0]))


def _line_words(x0: float, y0: float, x1: float, y1: float, text: str, conf: float) -> list[Word]:
    """A recognised line as its words (those with a letter or digit), each given the share of the
    line's width its characters take."""
    out, n = [], max(1, len(text))
    for m in re.finditer(r"\S+", text):
        if not any(ch.isalnum() for ch in m.group()):
            continue
        left, right = x0 + (x1 - x0) * m.start() / n, x0 + (x1 - x0) * m.end() / n
        out.append(Word(m.group(), round(conf, 1), (round(left), round(y0), max(1, round(right - left)), max(1, round(y1 - y0)))))
    return out


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


ENGINES = {"tesseract": TesseractEngine, "rapidocr": RapidOcrEngine}
_KEYS = {"tesseract": ("passes", "min_conf", "max_side"),
         "rapidocr": ("det_side", "max_side", "min_conf", "threads", "rec_height", "runtime", "rec_precision")}
_WORDS = ("runtime", "rec_precision")  # options whose values are words, not numbers


def get_engine(spec: Optional[str]):
    """``--ocr`` value -> an engine: ``tesseract``, ``tesseract:LANGS`` (``vie+eng``)
    and options (``tesseract:vie,passes=1,min_conf=50``), ``rapidocr`` (``rapidocr,det_side=960``,
    ``rapidocr,runtime=openvino,rec_precision=f32``); None or ``none`` -> None. A missing engine
    raises ``MissingDependencyError`` naming what to install."""
    from mergeseek.options import parse_options

    if spec is None or spec.strip().lower() in ("", "none", "off"):
        return None
    name = spec.strip().split(",", 1)[0].partition(":")[0].strip().lower()
    if name not in ENGINES:
        raise ConfigError(f"--ocr {spec!r}: unknown engine; choose one of {', '.join(ENGINES)} (e.g. tesseract:vie+eng)")
    parsed = parse_options(spec.strip(), "ocr", _KEYS[name], head="always", brackets=False)
    langs = (parsed.head or "").partition(":")[2]
    if langs and name != "tesseract":
        raise ConfigError(f"--ocr {spec!r}: {name} takes no ':' argument (its models read Latin text and digits)")
    kwargs: dict = {"langs": langs} if langs else {}
    for key, value in parsed.pairs:
        if key in _WORDS:
            kwargs[key] = value.strip().lower()
            continue
        try:
            kwargs[key] = float(value) if key == "min_conf" else int(value)
        except ValueError:
            raise ConfigError(f"--ocr {key}={value[:20]!r} is not a number") from None
    return ENGINES[name](**kwargs)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:160]


__all__ = ["ENGINES", "FrameText", "OcrStage", "RapidOcrEngine", "TesseractEngine", "Word", "get_engine", "parse_tsv"]
