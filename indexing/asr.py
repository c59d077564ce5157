"""Speech of indexed videos (ASR): ``cli.py index --asr [ENGINE]``.

An engine turns a video's sound (``indexing.audio.read_audio``: decoded once per video, 16 kHz
mono) into timed segments (start, end, text, confidence). Engines:

* ``pocketsphinx`` (the default): CMU PocketSphinx, offline, English; its PyPI wheel ships the
  acoustic model, dictionary and language model (``pip install pocketsphinx``, in the ``asr``
  extra). Speech is cut at pauses by its voice-activity detector, each stretch decoded, and long
  stretches split at word boundaries into segments of at most ``max_segment_s`` seconds.
* ``whisper:PATH``: faster-whisper with the CTranslate2 weights in the folder ``PATH`` (any
  language, Vietnamese included: ``whisper:PATH,lang=vi``); nothing is ever downloaded.

A missing engine raises ``MissingDependencyError`` naming the package to install, before any work.

**Segments to frames.** The kept frames of a video at times t_1 < ... < t_n split the time line
at the midpoints between neighbours: frame i owns ``[(t_{i-1} + t_i) / 2, (t_i + t_{i+1}) / 2)``
(the first from minus infinity, the last to plus infinity), i.e. ``[t - half gap, t + half gap]``
with the gap on each side. A frame takes every segment that overlaps its window (a segment
``[s, e)`` overlaps ``[a, b)`` when ``s < b`` and ``e > a``; a zero-length one counts as 1 ms), so
every segment reaches at least one frame and speech between two kept frames goes to the nearer
one(s). A frame's text is its segments' texts in time order; it is stored as the ``asr`` channel
of ``indexing.text`` (each segment a "word" whose box is ``[start_ms, 0, duration_ms, 0]``, its
span on the time axis). Frames without a time (a keyframe folder without its map) get no speech;
keyframe and image folders have no sound.

**Beside encoding.** PocketSphinx holds the Python lock while it decodes, so ``AsrStage`` runs
engines in worker processes (``--asr-workers``, at nice +5 like the reader): the pipeline hands it
every video to do when the run starts, and each video's frames take their text when the video is
committed.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mergeseek.errors import ConfigError, InputError, MissingDependencyError
from mergeseek.indexing.audio import SAMPLE_RATE, pcm16, read_audio
from mergeseek.indexing.ocr import FrameText, Word

log = logging.getLogger(__name__)

POCKETSPHINX_INSTALL = "pip install pocketsphinx (or pip install 'mergeseek[asr]')"
WHISPER_INSTALL = "pip install faster-whisper"
_FILLER = re.compile(r"^(<.*>|\[.*\]|\+\+.*\+\+)$")  # <s>, </s>, <sil>, [NOISE], ++UH++: not words
_VARIANT = re.compile(r"\(\d+\)$")  # the dictionary's pronunciation number: read(2) -> read


@dataclass(frozen=True)
class Segment:
    """A stretch of recognized speech: seconds from the start of the sound, its words, confidence 0..100."""

    start_s: float
    end_s: float
    text: str
    conf: float = 0.0
    also: str = ""  # words of other hypotheses heard in this stretch (searched, not shown)


def group_words(words: Sequence[tuple[float, float, str, float]], max_segment_s: float) -> list[Segment]:
    """Consecutive ``(start, end, word, conf 0..1)`` as segments of at most ``max_segment_s`` seconds
    (a single longer word is a segment of its own); conf is the words' mean, in 0..100."""
    out: list[Segment] = []
    group: list = []
    for w in words:
        if group and w[1] - group[0][0] > max_segment_s:
            out.append(_segment(group))
            group = []
        group.append(w)
    if group:
        out.append(_segment(group))
    return out


def _segment(group: list) -> Segment:
    return Segment(float(group[0][0]), float(group[-1][1]), " ".join(w[2] for w in group),
                   round(100.0 * float(np.mean([w[3] for w in group])), 1))


def place_alternates(best: Sequence[tuple[float, float, str, float]], others: Sequence[Sequence[str]]) -> list[tuple[float, str]]:
    """The words of other hypotheses ``others`` of one stretch that its best one (``best``: timed
    ``(start, end, word, conf)``) does not hold, each with a time: a hypothesis is aligned to the
    best word sequence (``difflib``), and a word it has instead of (or between) best words takes
    the middle of their span. Each (time, word) once, in time order."""
    import difflib

    if not best:
        return []
    ref = [w[2] for w in best]
    have, out = set(ref), {}
    for hyp in others:
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=ref, b=list(hyp), autojunk=False).get_opcodes():
            if tag == "equal":
                continue
            lo = best[min(i1, len(best) - 1)][0] if i1 < len(best) else best[-1][1]
            hi = best[i2 - 1][1] if i2 > i1 else lo
            for word in hyp[j1:j2]:
                if word not in have:
                    out.setdefault(word, round((lo + hi) / 2.0, 3))
    return sorted(((t, w) for w, t in out.items()), key=lambda tw: (tw[0], tw[1]))


def attach_alternates(segments: list[Segment], alternates: Sequence[tuple[float, str]]) -> list[Segment]:
    """``segments`` with each alternate word added to ``also`` of the segment nearest its time."""
    if not segments or not alternates:
        return segments
    extra: list[list[str]] = [[] for _ in segments]
    for t, word in alternates:
        j = min(range(len(segments)), key=lambda n: max(segments[n].start_s - t, t - segments[n].end_s, 0.0))
        extra[j].append(word)
    return [replace(seg, also=" ".join(x)) if x else seg for seg, x in zip(segments, extra)]


def sound_path(kind: str, path, video_id: str, release_parts: Optional[dict] = None) -> Optional[str]:
    """The file whose sound a source's frames take: a video, itself; a keyframe folder of an AI
    Challenge release, the release's video of the same id (its ``Videos_*`` part, or ``--videos
    DIR``: ``release_parts``), whose time line the keyframe map's ``pts_time`` is on; None for an
    image folder or a keyframe folder whose video is not there (no speech, not an error)."""
    if kind == "video":
        return str(path)
    if kind != "keyframes":
        return None
    from mergeseek.indexing.aic import find_release

    video = find_release(Path(path), release_parts).video_for(str(video_id).rsplit("/", 1)[-1])
    return str(video) if video is not None else None


class _Engine:
    release_parts: Optional[dict] = None  # where a keyframe release's videos are (set by the indexing run)

    def source_texts(self, kind: str, path: str, times: Sequence[float], backend: str = "decord",
                     video_id: str = "") -> list[FrameText]:
        """The speech of the frames at ``times`` of one source, in this process (``indexing.text.ensure_text``)."""
        sound = sound_path(kind, path, video_id or Path(path).name, self.release_parts)
        if sound is None:
            return [FrameText() for _ in times]
        return segments_to_frames(self.transcribe(read_audio(sound, backend=backend)), times)


class PocketSphinxEngine(_Engine):
    """CMU PocketSphinx with the English model its wheel ships.

    Args:
        max_segment_s: a stretch of speech longer than this is split at word boundaries.
        nbest: the recogniser's best ``nbest`` hypotheses of each stretch are read; the words of the
            others that the best one lacks are kept as the segment's ``also`` words (searched, not
            shown: a word heard wrongly in the best hypothesis is often right in another). 1: the
            best hypothesis only.
    """

    name = "pocketsphinx"

    def __init__(self, max_segment_s: float = 5.0, nbest: int = 100):
        if not max_segment_s > 0:
            raise ConfigError(f"--asr max_segment_s={max_segment_s} is not valid; give a positive number of seconds")
        if not 1 <= int(nbest) <= 1000:
            raise ConfigError(f"--asr nbest={nbest} is not valid; give 1 (the best hypothesis only) to 1000")
        self.nbest = int(nbest)
        try:
            import pocketsphinx  # noqa: F401
        except ImportError:
            raise MissingDependencyError(f"--asr pocketsphinx needs the pocketsphinx package: {POCKETSPHINX_INSTALL}") from None
        self.max_segment_s = float(max_segment_s)
        self._decoder = None

    def __str__(self) -> str:
        return ("pocketsphinx" + (f",max_segment_s={self.max_segment_s:g}" if self.max_segment_s != 5.0 else "")
                + (f",nbest={self.nbest}" if self.nbest != 100 else ""))

    def transcribe(self, samples: np.ndarray) -> list[Segment]:
        """The speech in ``samples`` (16 kHz mono float32) as segments in time order."""
        import io

        from pocketsphinx import Decoder, Segmenter

        if len(samples) == 0:
            return []
        if self._decoder is None:
            # dither: half a bit of (seeded, repeatable) noise, so stretches of digital silence do not
            # throw the energy features and their running normalization off. On bench/speech_channels.py:
            # WER 0.74 -> 0.69 on its first 15 sentences, 0.814 -> 0.810 on all 30 (within noise)
            self._decoder = Decoder(samprate=SAMPLE_RATE, loglevel="FATAL", dither=True)
        d, words, alternates = self._decoder, [], []
        frate = float(d.config["frate"])
        for stretch in Segmenter(sample_rate=SAMPLE_RATE).segment(io.BytesIO(pcm16(samples))):
            d.start_utt()
            d.process_raw(stretch.pcm, full_utt=True)
            d.end_utt()
            if d.hyp() is None:
                continue
            best = []
            for w in d.seg():
                if _FILLER.match(w.word):
                    continue
                best.append((stretch.start_time + w.start_frame / frate, stretch.start_time + (w.end_frame + 1) / frate,
                             _VARIANT.sub("", w.word), min(1.0, max(0.0, float(w.prob)))))
            words += best
            if self.nbest > 1:
                others = [[_VARIANT.sub("", x) for x in h.hypstr.split() if not _FILLER.match(x)]
                          for h in itertools.islice(d.nbest(), self.nbest)]
                alternates += place_alternates(best, others)
        return attach_alternates(group_words(words, self.max_segment_s), alternates)


class WhisperEngine(_Engine):
    """faster-whisper (CTranslate2) with local weights; nothing is downloaded.

    Args:
        path: the folder of a CTranslate2 Whisper model (``model.bin``, ``config.json``, tokenizer).
        lang: the spoken language (``vi``, ``en``), or empty to let the model detect it.
        device: ``cpu`` or ``cuda``.
        threads: CPU threads of one engine.
    """

    name = "whisper"

    def __init__(self, path: str = "", lang: str = "", device: str = "cpu", threads: int = 1):
        try:
            import faster_whisper  # noqa: F401
        except ImportError:
            raise MissingDependencyError(f"--asr whisper needs the faster-whisper package: {WHISPER_INSTALL} "
                                         "(and the model folder on disk: --asr whisper:PATH)") from None
        path = str(Path(path).expanduser()) if str(path).startswith("~") else path  # the shell leaves whisper:~/x alone
        if not path or not Path(path).is_dir():
            raise InputError(f"--asr whisper:{path}: give the folder of a CTranslate2 Whisper model "
                             "(nothing is downloaded), e.g. --asr whisper:/models/faster-whisper-small")
        self.path, self.lang, self.device, self.threads = str(path), lang, device, int(threads)
        self._model = None

    def __str__(self) -> str:
        extra = "".join(f",{k}={v}" for k, v in (("lang", self.lang), ("device", self.device if self.device != "cpu" else ""),
                                                 ("threads", self.threads if self.threads != 1 else "")) if v)
        return f"whisper:{self.path}{extra}"

    def transcribe(self, samples: np.ndarray) -> list[Segment]:
        if len(samples) == 0:
            return []
        if self._model is None:
            from faster_whisper import WhisperModel

            self._model = WhisperModel(self.path, device=self.device, compute_type="int8" if self.device == "cpu" else "default",
                                       cpu_threads=self.threads, local_files_only=True)
        segments, _ = self._model.transcribe(np.asarray(samples, np.float32), language=self.lang or None)
        return [Segment(float(s.start), float(s.end), s.text.strip(), round(100.0 * float(np.exp(s.avg_logprob)), 1))
                for s in segments if s.text.strip()]


ENGINES = {"pocketsphinx": PocketSphinxEngine, "whisper": WhisperEngine}
_KEYS = {"pocketsphinx": ("max_segment_s", "nbest"), "whisper": ("lang", "device", "threads")}


def get_engine(spec: Optional[str], release_parts: Optional[dict] = None):
    """``--asr`` value -> an engine: ``pocketsphinx`` (the default), ``pocketsphinx,max_segment_s=8``,
    ``whisper:PATH[,lang=vi,device=cuda,threads=4]``; None or ``none`` -> None. A missing engine
    raises ``MissingDependencyError`` naming the package to install. ``release_parts``: where a
    keyframe release's videos are (``--videos DIR``; ``sound_path``)."""
    from mergeseek.options import parse_options

    if spec is None or spec.strip().lower() in ("", "none", "off"):
        return None
    head = spec.strip().split(",", 1)[0]
    name, _, arg = head.partition(":")
    name = name.strip().lower()
    if name not in ENGINES:
        raise ConfigError(f"--asr {spec!r}: unknown engine; choose one of {', '.join(ENGINES)} "
                          "(pocketsphinx, or whisper:PATH with a local faster-whisper model)")
    parsed = parse_options(spec.strip(), "asr", _KEYS[name], head="always", brackets=False)
    kwargs: dict = {"path": arg} if name == "whisper" else {}
    if name == "pocketsphinx" and arg:
        raise ConfigError(f"--asr {spec!r}: pocketsphinx takes no ':' argument (its English model is built in)")
    for key, value in parsed.pairs:
        try:
            kwargs[key] = float(value) if key == "max_segment_s" else int(value) if key in ("threads", "nbest") else value
        except ValueError:
            raise ConfigError(f"--asr {key}={value[:20]!r} is not a number") from None
    engine = ENGINES[name](**kwargs)
    engine.release_parts = release_parts
    return engine


# ---------------------------------------------------------------------------- segments -> frames
def frame_windows(times: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of each frame's window for ``times`` sorted ascending: the midpoints to its
    neighbours, minus/plus infinity at the ends."""
    t = np.asarray(times, np.float64)
    mid = (t[1:] + t[:-1]) / 2.0
    return np.concatenate([[-np.inf], mid]), np.concatenate([mid, [np.inf]])


def segments_to_frames(segments: Sequence[Segment], times: Sequence[float]) -> list[FrameText]:
    """Each frame's speech: the segments overlapping its window (see the module docstring), as a
    ``FrameText`` whose words are the segments. ``times``: the frames' pts_time in any order (NaN:
    no time, no speech)."""
    t = np.asarray(times, np.float64)
    out = [FrameText() for _ in range(len(t))]
    valid = np.flatnonzero(~np.isnan(t))
    if not len(valid) or not len(segments):
        return out
    order = valid[np.argsort(t[valid], kind="stable")]
    lo, hi = frame_windows(t[order])
    took: list[list[Segment]] = [[] for _ in range(len(order))]
    for seg in sorted(segments, key=lambda s: (s.start_s, s.end_s)):
        end = max(seg.end_s, seg.start_s + 1e-3)
        first = int(np.searchsorted(hi, seg.start_s, side="right"))  # the first window ending after the start
        last = int(np.searchsorted(lo, end, side="left"))  # windows starting before the end
        for j in range(first, last):
            took[j].append(seg)
    for j, segs in zip(order, took):
        if segs:
            out[int(j)] = FrameText(tuple(Word(s.text, s.conf, (round(1000 * s.start_s), 0,
                                                                 max(0, round(1000 * (s.end_s - s.start_s))), 0))
                                          for s in segs), also=" ".join(s.also for s in segs if s.also))
    return out


# ---------------------------------------------------------------------------- beside encoding
_WORKER: dict = {}


def _worker_init(backend: str = "decord") -> None:
    try:
        os.nice(5)  # the encoder comes first; speech fills the gaps (see pipeline._lower_priority)
    except OSError:
        pass
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="mergeseek-asr-watch").start()
    if backend == "decord":
        # This process never loads torch or torchcodec, so decord needs none of the import order
        # indexing.decoders keeps for processes that do (a worker saves torch's seconds and memory).
        try:
            import decord  # noqa: F401
        except ImportError:  # read_audio names the package to install
            pass


def _exit_with_parent(parent: int) -> None:
    """A worker whose run was killed (kill -9: no shutdown message) would wait for work forever: it
    leaves once its parent is gone (re-parented), at the latest when its current video is done."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def transcribe_file(spec: str, path: str, backend: str = "decord") -> tuple[list[Segment], float, float]:
    """(segments, CPU seconds, seconds of sound) of ``path`` with the engine ``spec`` (made once per process)."""
    from mergeseek.indexing.decoders import require_backend

    engine = _WORKER.get(spec)
    if engine is None:  # made and its libraries loaded once per process, outside the timed part
        engine = _WORKER[spec] = get_engine(spec)
        require_backend(backend)
    t0 = time.process_time()
    samples = read_audio(path, backend=backend)
    return engine.transcribe(samples), time.process_time() - t0, len(samples) / SAMPLE_RATE


class AsrStage:
    """Speech beside encoding: ``workers`` processes transcribe videos in the order they were
    submitted; ``frames`` turns a video's transcript into its kept frames' text once both are known."""

    def __init__(self, engine, workers: int = 1, backend: str = "decord"):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.spec, self.backend = str(engine), backend
        self.workers = max(1, int(workers))
        # spawn: a fresh interpreter (no copy of the encoder, no fork of a process holding threads)
        self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_worker_init, initargs=(backend,))
        self.jobs: dict[str, Future] = {}
        self._all: list[Future] = []
        self.busy_s = self.audio_s = 0.0  # the workers' CPU seconds transcribing, and the seconds of sound
        self._lock = threading.Lock()

    def submit(self, key: str, path: str) -> None:
        """Start transcribing the video ``path`` (source ``key``)."""
        self.jobs[key] = self.pool.submit(transcribe_file, self.spec, str(path), self.backend)
        self._all.append(self.jobs[key])

    def cancel(self, key: str) -> None:
        job = self.jobs.pop(key, None)
        if job is not None:
            job.cancel()

    def frames(self, key: str, times: Sequence[float]) -> Future:
        """A Future of the ``FrameText`` of frames at ``times`` of source ``key`` (empty ones for a
        source that was not submitted: no sound). A source whose sound cannot be read gets frames
        whose ``error`` says why (reported; the rest of the run goes on)."""
        out: Future = Future()
        job = self.jobs.pop(key, None)
        if job is None:
            out.set_result([FrameText() for _ in times])
            return out

        def done(f: Future) -> None:
            if f.cancelled():
                out.cancel()
                return
            exc = f.exception()
            if isinstance(exc, InputError):  # unreadable sound: reported on each frame, the vectors are kept
                out.set_result([FrameText(error=f"speech not read ({str(exc)[:160]})") for _ in times])
                return
            if exc is not None:
                out.set_exception(exc)
                return
            segments, cpu_s, audio_s = f.result()
            with self._lock:
                self.busy_s += cpu_s
                self.audio_s += audio_s
            out.set_result(segments_to_frames(segments, times))

        job.add_done_callback(done)
        return out

    def close(self) -> None:
        """Stop the workers: at once when every job is done (their CPU time is then counted as this
        process's children), else without waiting for a transcript nobody will read."""
        self.pool.shutdown(wait=all(f.done() for f in self._all), cancel_futures=True)


__all__ = ["ENGINES", "AsrStage", "PocketSphinxEngine", "Segment", "WhisperEngine", "attach_alternates", "frame_windows",
           "get_engine", "group_words", "place_alternates", "segments_to_frames", "sound_path", "transcribe_file"]
