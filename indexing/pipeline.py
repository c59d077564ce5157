"""Batch indexing: reader -> mapper -> writer, each stage timed.

* reader (a background thread): decodes the sampled frames of one source at a time, hashes them
  to drop near-duplicates, and preprocesses the rest into pixel tensors;
* mapper (the calling thread): runs the image tower on each batch;
* writer (the calling thread): buffers finished sources and commits them as one shard when the
  buffer holds ``shard_size`` vectors or ``commit_every_s`` passed, then refreshes index.faiss.

The reader runs ahead by at most ``prefetch`` batches, so decoding overlaps encoding while memory
stays bounded. A source is committed whole or not at all; a bad file is listed and skipped.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from mergeseek.errors import InputError
from mergeseek.indexing import aic
from mergeseek.indexing.dedup import Dedup, DuplicateFilter, phash
from mergeseek.indexing.sampling import Sampling
from mergeseek.indexing.decoders import reader_tag, require_backend
from mergeseek.indexing.sources import BadInput, MediaSource, SourceReader, assign_ids, discover
from mergeseek.indexing.store import EncodedSource, preflight
from mergeseek.indexing.thumbs import ensure_thumbs, make_jpeg
from mergeseek.indexing.asr import AsrStage, sound_path
from mergeseek.indexing.asr import get_engine as get_asr_engine
from mergeseek.indexing.detect import attach_channel, channel_of, finish_objects, get_detector, report_lines
from mergeseek.indexing.ocr import OcrStage
from mergeseek.indexing.ocr import get_engine as get_ocr_engine
from mergeseek.indexing.text import TextChannel, drop_foreign_text, ensure_text, remove_stale_text, sync_text_index
from mergeseek.indexing.writer import IndexWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexOptions:
    """How to index.

    Args:
        sampling: which frames of a video to keep (keyframe and image folders are taken whole).
        dedup: near-duplicate rule (``Dedup(enabled=False)`` encodes every sampled frame).
        index_type: FAISS factory string (``Flat``, ``IVF1024,Flat``, ``HNSW32``) or ``auto``; None keeps
            the index's current type (``Flat`` for a new index).
        force: index everything again into a new generation, which replaces the old one at the end
            of the run when it holds at least one source (a failed run leaves the old index).
        shard_size: commit once this many vectors are buffered...
        commit_every_s: ...or this many seconds after the last commit (bounds the work a kill loses).
        prefetch: batches the reader may decode ahead of the encoder.
        read_workers: threads that hash and preprocess decoded frames (0: min(8, CPU count)).
        ngpu: GPUs for FAISS (-1: all that exist, 0: none).
        progress: tqdm bars over sources and frames.
        decoder: video decoder, ``decord``, ``torchcodec`` or ``ffmpeg`` (see ``indexing.decoders``).
        release_parts: AI Challenge release parts that live elsewhere (``{"maps": DIR, "media_info": DIR,
            "videos": DIR, "objects": DIR, "features": DIR}``, see ``indexing.aic``).
        memory_budget: bytes the FAISS index may use, for ``index_type="auto"`` (None: 8 GiB).
        reuse: reuse work across the frames of a shot (``threshold=0.05,refresh=16``, see
            ``encoders.reuse``); None or ``none`` encodes every frame on its own.
        ocr: read on-screen text of the kept frames with this engine (``tesseract``,
            ``tesseract:vie+eng``; see ``indexing.ocr``), stored beside the shards and searchable
            (``indexing.text``); None: no text channel.
        ocr_workers: OCR processes running beside the encoder.
        asr: transcribe the speech of videos with this engine (``pocketsphinx``, ``whisper:PATH``; see
            ``indexing.asr``); each kept frame takes the segments around it (the ``asr`` text channel).
        asr_workers: speech processes running beside the encoder.
        detect, detect_min_score, detect_workers: ``--detect`` (``indexing.detect``: objects for ``search --object``).
    """

    sampling: Sampling = field(default_factory=Sampling)
    dedup: Dedup = field(default_factory=Dedup)
    index_type: Optional[str] = None
    force: bool = False
    shard_size: int = 4096
    commit_every_s: float = 60.0
    prefetch: int = 4
    read_workers: int = 0
    ngpu: int = -1
    progress: bool = False
    release_parts: Optional[dict] = None
    decoder: str = "decord"  # video backend, see indexing.decoders.BACKENDS
    memory_budget: Optional[int] = None
    reuse: Any = None  # a ReuseConfig, or its spelling; stored as the enabled ReuseConfig or None
    ocr: Optional[str] = None
    ocr_workers: int = 1
    asr: Optional[str] = None
    asr_workers: int = 1
    detect: Optional[str] = None
    detect_min_score: float = aic.OBJECT_MIN_SCORE
    detect_workers: int = 1

    def __post_init__(self) -> None:
        # The library takes the command line's spellings too: sampling="fps=2", reuse="threshold=0.05"
        # (checked here, before any work, not deep inside the reader).
        if not isinstance(self.sampling, Sampling):
            object.__setattr__(self, "sampling", Sampling.parse(self.sampling))
        if self.reuse is not None:  # parsed once, here: everything downstream reads the ReuseConfig
            from mergeseek.encoders.reuse import ReuseConfig

            cfg = ReuseConfig.parse(self.reuse if isinstance(self.reuse, (str, ReuseConfig)) else str(self.reuse))
            object.__setattr__(self, "reuse", cfg if cfg.enabled else None)


@dataclass
class StageTimes:
    """Seconds each stage was busy (read: decode + hash + preprocess, in its own thread)."""

    read_s: float = 0.0
    encode_s: float = 0.0
    write_s: float = 0.0
    faiss_s: float = 0.0
    wall_s: float = 0.0


@dataclass
class IndexReport:
    """What a run did; ``failed`` lists every input that was skipped and why."""

    index_dir: str
    sources_found: int = 0
    indexed: list = field(default_factory=list)  # video ids committed in this run
    up_to_date: int = 0
    failed: list = field(default_factory=list)  # BadInput
    frames_sampled: int = 0
    frames_encoded: int = 0
    duplicates_skipped: int = 0
    vectors_total: int = 0
    times: StageTimes = field(default_factory=StageTimes)
    unmapped: list = field(default_factory=list)  # keyframe video ids without a map-keyframes CSV
    metadata: dict = field(default_factory=dict)  # release metadata written beside the index (indexing.aic)
    reuse: dict = field(default_factory=dict)  # --reuse: config and ReuseStats.summary() (encoders.reuse)
    text: dict = field(default_factory=dict)  # --ocr: engine, frames read, busy seconds (indexing.text)
    objects: dict = field(default_factory=dict)  # --detect: detector, frames, rows (indexing.detect)

    @property
    def frames_per_s(self) -> float:
        return self.frames_encoded / self.times.wall_s if self.times.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["failed"] = [{"path": b.path, "reason": b.reason} for b in self.failed]
        d["frames_per_s"] = round(self.frames_per_s, 3)
        return d

    def summary_lines(self) -> list[str]:
        t = self.times
        lines = [
            f"index {self.index_dir}: {len(self.indexed)} source(s) indexed, {self.up_to_date} already up to date, "
            f"{len(self.failed)} skipped; {self.frames_encoded} frames encoded "
            f"({self.duplicates_skipped} near-duplicates skipped of {self.frames_sampled} sampled); "
            f"{self.vectors_total} vectors in the index",
            f"time: {t.wall_s:.1f}s wall ({self.frames_per_s:.1f} frames/s); busy read {t.read_s:.1f}s, "
            f"encode {t.encode_s:.1f}s, write {t.write_s:.1f}s, faiss {t.faiss_s:.1f}s",
        ]
        if self.unmapped:
            names = ", ".join(self.unmapped[:10]) + (f" (+{len(self.unmapped) - 10} more)" if len(self.unmapped) > 10 else "")
            lines.append(f"WARNING: {len(self.unmapped)} keyframe folder(s) have no map-keyframes CSV, so their frame_idx "
                         f"is only the keyframe number and their time is unknown: {names}; pass --maps DIR")
        if self.metadata:
            lines.append(f"release metadata: {self.metadata.get('videos_with_metadata', 0)} video(s) in videos.json, "
                         f"{self.metadata.get('objects', 0)} detections in objects.parquet")
        if self.reuse:
            r = self.reuse
            lines.append(f"reuse {r['config']}: {r['reuse_rate']:.0%} of the linear-layer work reused "
                         f"(ideal speed-up {1 / max(1e-9, 1 - r['reuse_rate']):.2f}x); {r['references']} of {r['frames']} "
                         f"frames computed in full ({r['cuts']} scene cuts, {r['refreshes']} refreshes)")
            if r.get("block_reuse"):
                g = r.get("gate_reuse", {})
                lines.append("reuse per block, first to last: " + " ".join(f"{v:.0%}" for v in r["block_reuse"])
                             + (f" (per gate: q/k/v {g['qkv']:.0%}, out-projection {g['proj']:.0%}, MLP {g['mlp']:.0%})"
                                if g else ""))
            a = r.get("audit")
            if a:
                gain = f"{a['gain']:.2f}x the per-frame frames/s" if a.get("gain") else "gain not measured"
                lines.append(f"reuse vs per-frame on {a['frames']} audited frame(s) (1 in {r['audit_every']} that reused work): "
                             f"cosine min {a['cos_min']:.4f}, mean {a['cos_mean']:.4f}; {gain} "
                             f"(audit cost {a['cost']:.0%} of the encode time; audit=0 turns it off)")
            else:
                lines.append("reuse vs per-frame: no frame audited (audit=0, or no frame reused work); "
                             "error and gain: cli.py eval --dataset video --reuse, bench/reuse.py")
        for channel, t in self.text.items():
            lines.append(f"{channel} ({t['engine']}): text of {t['frames']} frame(s) read, {t['with_text']} with text "
                         f"({t['read_again']} read again for shards that had none); busy {t['busy_s']:.1f}s")
        lines += report_lines(self.objects) + [f"skipped {b.path}: {b.reason}" for b in self.failed]
        return lines


# ---------------------------------------------------------------------------- reader stage
@dataclass
class _Batch:
    source: MediaSource
    frame_idx: list
    pts_time: list
    paths: list
    hashes: list
    pixels: Any  # preprocessed tensor [B,3,H,W] or None when every frame was a duplicate
    sampled: int
    thumbs: list = field(default_factory=list)  # JPEG thumbnail of each kept frame (indexing.thumbs)
    texts: Any = None  # --ocr: a Future of each kept frame's ocr.FrameText (indexing.text)
    objects: Any = None  # --detect: a Future of each kept frame's detect.FrameObjects


@dataclass
class _Done:
    source: MediaSource
    duplicates: int
    skipped: list


@dataclass
class _Failed:
    source: MediaSource
    reason: str


class _Stop(Exception):
    pass


class Reader(threading.Thread):
    """Background stage: sources in, preprocessed batches out (bounded queue)."""

    def __init__(self, sources: Sequence[MediaSource], sampling: Sampling, dedup: Dedup, preprocess: Callable,
                 batch_size: int, prefetch: int, workers: int = 0, decoder: str = "decord",
                 ocr: Optional[Callable] = None, detect: Optional[Callable] = None):
        super().__init__(name="mergeseek-reader", daemon=True)
        self.sources, self.sampling, self.dedup, self.decoder = list(sources), sampling, dedup, decoder
        self.ocr, self.detect = ocr, detect
        self.preprocess, self.batch_size = preprocess, batch_size
        # Hashing and preprocessing (PIL resize, which releases the GIL) run on a small pool; decoding
        # stays sequential per video so frames, duplicates and ids come out in a fixed order.
        self.workers = workers if workers > 0 else min(8, os.cpu_count() or 1)
        self.out: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self.stop_event = threading.Event()
        self.busy_s = 0.0
        self.error: Optional[BaseException] = None

    def _put(self, item) -> None:
        while not self.stop_event.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stop

    def run(self) -> None:
        _lower_priority()
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="mergeseek-prep", initializer=_lower_priority) as pool:
                for src in self.sources:
                    self._read_source(src, pool)
        except _Stop:
            return
        except BaseException as exc:  # handed to the main thread, which re-raises it
            self.error = exc
        finally:
            try:
                self._put(None)
            except _Stop:
                pass

    def _read_source(self, src: MediaSource, pool: ThreadPoolExecutor) -> None:
        t0 = time.perf_counter()
        for item in read_source(src, self.sampling, self.dedup, self.preprocess, self.batch_size, pool, self.workers,
                                self.decoder, self.ocr, self.detect):
            self.busy_s += time.perf_counter() - t0
            self._put(item)
            t0 = time.perf_counter()
        self.busy_s += time.perf_counter() - t0


def read_source(src: MediaSource, sampling: Sampling, dedup: Dedup, preprocess: Callable, batch_size: int,
                pool: Optional[ThreadPoolExecutor] = None, workers: int = 1, decoder: str = "decord",
                ocr: Optional[Callable] = None, detect: Optional[Callable] = None):
    """One source's items: a ``_Batch`` per decoded batch, then ``_Done`` (or ``_Failed`` for a bad file).
    ``ocr(images)`` / ``detect(images)``: start reading the kept frames' text / objects; a Future each.

    Decoding, sampling, near-duplicate skipping and preprocessing of one source, in order; the
    threaded ``Reader`` and the Ray decode tasks (``indexing.distributed``) both run this.
    """
    run = pool.map if pool is not None else map
    reader = SourceReader(src, sampling, batch_size, decoder, map_fn=run)
    filt = DuplicateFilter(dedup)
    try:
        for frames in reader.batches():
            kept, hashes = [], []
            for f, h in zip(frames, run(phash, [f.image for f in frames])):
                if filt.keep(h):  # sequential: each decision depends on the last kept frame
                    kept.append(f)
                    hashes.append(h.signed)
            pixels = _preprocess([f.image for f in kept], preprocess, run, workers) if kept else None
            texts = ocr([f.image for f in kept]) if ocr is not None and kept else None
            objects = detect([f.image for f in kept]) if detect is not None and kept else None
            yield _Batch(src, [f.frame_idx for f in kept], [f.pts_time for f in kept], [f.path for f in kept], hashes,
                         pixels, len(frames), list(run(make_jpeg, [f.image for f in kept])), texts, objects)
    except InputError as exc:
        log.warning("skip %s", exc)
        yield _Failed(src, str(exc))
        return
    except (MemoryError, ImportError):
        raise  # not this file's fault: the run cannot go on
    except Exception as exc:  # a bug or an odd file: it fails this source, never the whole run
        log.warning("skip %s: unexpected %s while reading it", src.path, type(exc).__name__, exc_info=True)
        yield _Failed(src, f"{src.path}: unexpected error while reading ({type(exc).__name__}: {str(exc)[:200]}); "
                           "the file was skipped, please report it")
        return
    yield _Done(src, filt.skipped, reader.skipped)


def _preprocess(images: list, preprocess: Callable, run: Callable = map, workers: int = 1):
    import torch

    step = max(1, -(-len(images) // max(1, workers)))
    chunks = [images[i : i + step] for i in range(0, len(images), step)]
    return torch.cat(list(run(preprocess, chunks)))


def _lower_priority() -> None:
    """Run this thread (and the decoder threads it starts) at nice +5.

    When the encoder runs on the same CPU cores (no GPU), the reader should only fill the gaps the
    encoder leaves: it is the faster stage, and every cycle it takes from the encoder slows the
    whole run. With a GPU encoder the CPU is idle anyway and the niceness changes nothing.
    """
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 5))
    except (AttributeError, OSError):  # not Linux, or not allowed: plain priority is fine
        pass


# ---------------------------------------------------------------------------- the run
def recipe_for(source: MediaSource, options: IndexOptions) -> str:
    sampling = str(options.sampling) if source.kind == "video" else "all"
    recipe = f"{sampling};dedup={options.dedup}" + (reader_tag(source.path, options.decoder) if source.kind == "video" else "")
    reuse = _reuse_config(options)
    return recipe + (f";reuse={reuse.recipe}" if reuse is not None else "")


def _reuse_config(options: IndexOptions):
    """The enabled ``ReuseConfig`` of ``options``, or None (``IndexOptions`` parsed it)."""
    return options.reuse


def index_paths(
    paths: Sequence[Union[str, Path]],
    index_dir: Union[str, Path],
    encoder: Any,
    options: IndexOptions = IndexOptions(),
    on_commit: Optional[Callable[[list], None]] = None,
    stages: Optional[Callable] = None,
) -> IndexReport:
    """Index videos / keyframe folders / image folders under ``paths`` into ``index_dir``.

    Args:
        encoder: an ``encoders.Encoder``, or a zero-argument callable returning one (called only
            after the inputs were found, so a missing folder fails before the model loads).
        on_commit: called with the committed source keys after every commit (progress hooks, tests).
        stages: ``(writer, todo, encoder, options, report)``, the part that encodes the sources still
            to do and hands them to the ``IndexWriter`` (default: the threaded reader/encoder of this
            process; ``indexing.distributed.index_paths_ray`` passes its Ray version).

    Raises:
        InputError: nothing could be indexed (every input missing, empty or unreadable).
        IndexMismatchError: the index was built with another model or merge config.
    """
    t_start = time.perf_counter()
    sources, bad = discover([Path(p) for p in paths], options.release_parts)
    for b in bad:
        log.warning("skip %s: %s", b.path, b.reason)
    unmapped = [s for s in sources if s.kind == "keyframes" and s.map_csv is None]
    for s in unmapped:
        log.warning("%s", aic.unmapped_warning(s.video_id, s.path))
    require_backend(options.decoder)  # a wrong or missing --decoder fails before the model loads
    ocr_engine = get_ocr_engine(options.ocr)  # a missing OCR engine fails before the model loads too
    asr_engine = get_asr_engine(options.asr, options.release_parts)  # so does a missing speech engine
    detector = get_detector(options.detect, options.detect_min_score)  # and a missing detector or weights file
    preflight(Path(index_dir), options.index_type)  # a wrong --index or --index-type fails before the model loads
    if not hasattr(encoder, "describe"):
        encoder = encoder()
        t_start = time.perf_counter()  # the run's wall time leaves out loading the model
    identity = encoder.describe()
    if _reuse_config(options) is not None:
        from mergeseek.encoders.reuse import family_of

        family_of(encoder.model)  # a model --reuse cannot run (a ResNet, an attention pooler) fails before the index opens
    report = IndexReport(str(index_dir), sources_found=len(sources), failed=list(bad),
                         unmapped=[s.video_id for s in unmapped])
    with IndexWriter(Path(index_dir), identity, index_type=options.index_type, force=options.force,
                     memory_budget=options.memory_budget, ngpu=options.ngpu,
                     settings={"sampling": str(options.sampling), "dedup": str(options.dedup)},
                     shard_rows=options.shard_size, commit_every_s=options.commit_every_s, on_commit=on_commit) as writer:
        # A stem another source of the index already has gets a distinct id (logged); known sources keep theirs.
        sources = assign_ids(sources, {key: e.video_id for key, e in writer.manifest.sources.items()})
        todo = [s for s in sources if not writer.is_current(s.key, s.fingerprint, recipe_for(s, options))]
        report.up_to_date = len(sources) - len(todo)
        if ocr_engine is not None:
            writer.add_text_channel(TextChannel("ocr", ocr_engine))
        if asr_engine is not None:
            writer.add_text_channel(TextChannel("asr", asr_engine))
        attach_channel(writer, detector)
        if todo:
            log.info("%d source(s) to index, %d up to date", len(todo), report.up_to_date)
            (stages or _run_stages)(writer, todo, encoder, options, report)
        writer.finish()
        report.times.write_s, report.times.faiss_s = writer.stats.write_s, writer.stats.faiss_s
        report.vectors_total = writer.manifest.counts()["vectors"]
        ensure_thumbs(writer.store)  # packs a killed run or an older version did not write (decodes those frames again)
        _finish_text(writer, report)
        have = set(aic.load_video_meta(Path(index_dir)))
        report.metadata = aic.write_release_metadata(
            Path(index_dir), sources, options.release_parts, {s.video_id for s in sources if s.video_id not in have}
            | set(report.indexed))
        report.objects = finish_objects(writer, detector, report.failed)
    report.times.wall_s = time.perf_counter() - t_start
    if not report.indexed and not report.up_to_date:
        reasons = "; ".join(f"{Path(b.path).name}: {b.reason}" for b in report.failed[:5])
        more = f" (+{len(report.failed) - 5} more)" if len(report.failed) > 5 else ""
        raise InputError(f"nothing could be indexed: {len(report.failed)} input(s) failed ({reasons}{more})")
    return report


def _finish_text(writer: IndexWriter, report: IndexReport) -> None:
    """Text channels at the end of a run: read what a killed run (or an index built without them) lacks,
    drop the files of shards the index no longer has, and bring text.sqlite in line (indexing.text)."""
    from mergeseek.indexing.store import read_manifest

    store = writer.store
    drop_foreign_text(store)
    for name, channel in writer.text.items():
        again, failed = ensure_text(store, channel.engine, name)
        failed = channel.failed + failed
        report.failed += [BadInput(key, f"{name}: {reason}") for key, reason in failed]
        report.text[name] = {"engine": str(channel.engine), "frames": channel.frames + again, "read_again": again,
                             "with_text": _frames_with_text(store, name), "busy_s": round(channel.busy_s, 3),
                             "failed_frames": len(failed)}
    active = read_manifest(store.root)
    remove_stale_text(store.root, set(store.manifest.shards) | set(active.shards if active is not None else ()))
    sync_text_index(store.root, store.shard_names())


def _frames_with_text(store, channel: str) -> int:
    from mergeseek.indexing.text import read_text

    total = 0
    for shard in store.shard_names():
        t = read_text(store.root, shard, channel)
        total += sum(1 for x in (t.column("text").to_pylist() if t is not None else ()) if x)
    return total


def _run_stages(writer: IndexWriter, todo: list, encoder, options: IndexOptions, report: IndexReport) -> None:
    text, speech, objects = writer.text.get("ocr"), writer.text.get("asr"), channel_of(writer)
    ocr = OcrStage(text.engine, options.ocr_workers) if text is not None else None
    det = OcrStage(objects.engine, options.detect_workers) if objects is not None else None
    asr = AsrStage(speech.engine, options.asr_workers, options.decoder) if speech is not None else None
    for src in todo if asr is not None else ():  # every sound is queued now: speech runs ahead, beside the encoder
        if (sound := sound_path(src.kind, src.path, src.video_id, options.release_parts)) is not None:
            asr.submit(src.key, sound)
    try:
        _read_and_encode(writer, todo, encoder, options, report, ocr, asr, det)
    finally:
        for stage, channel in ((ocr, text), (asr, speech), (det, objects)):
            if stage is not None:
                channel.busy_s = stage.busy_s
                stage.close()


def _read_and_encode(writer: IndexWriter, todo: list, encoder, options: IndexOptions, report: IndexReport, ocr,
                     asr=None, det=None) -> None:
    reader = Reader(todo, options.sampling, options.dedup, encoder.preprocess_images, encoder.batch_size, options.prefetch,
                    options.read_workers, decoder=options.decoder, ocr=getattr(ocr, "submit", None), detect=getattr(det, "submit", None))
    bars = _Bars(len(todo)) if options.progress else None
    # --reuse: frames of one source reach the encoder in order (the reader decodes sources one
    # at a time, sequentially), so a per-source cache in the stream encoder is valid.
    reuse = _reuse_config(options)
    stream = encoder.stream(reuse) if reuse is not None else None
    partial: dict = {}  # source key -> list of (batch, vectors)

    reader.start()
    try:
        while True:
            item = reader.out.get()
            if item is None:
                break
            if isinstance(item, _Batch):
                report.frames_sampled += item.sampled
                writer.thumbs.add(item.source.key, item.thumbs)
                if item.texts is not None:
                    writer.text["ocr"].add(item.source.key, item.texts)
                if item.objects is not None:
                    channel_of(writer).add(item.source.key, item.objects)
                if item.pixels is not None:
                    t0 = time.perf_counter()
                    if stream is not None:
                        keys = [item.source.key] * int(item.pixels.shape[0])
                        vecs = stream.encode_image_tensor(item.pixels, keys).cpu().numpy()
                    else:
                        vecs = encoder.encode_image_tensor(item.pixels).cpu().numpy()
                    report.times.encode_s += time.perf_counter() - t0
                    partial.setdefault(item.source.key, []).append((item, vecs))
                    report.frames_encoded += len(vecs)
                if bars:
                    bars.frames(item.sampled)
            elif isinstance(item, _Failed):
                partial.pop(item.source.key, None)
                if asr is not None:
                    asr.cancel(item.source.key)
                if stream is not None:
                    stream.end(item.source.key)
                writer.drop(item.source.key)
                report.failed.append(BadInput(str(item.source.path), item.reason.split(": ", 1)[-1]))
                if bars:
                    bars.source_done()
            else:
                if stream is not None:
                    stream.end(item.source.key)
                if asr is not None:  # the source's kept frames take their speech when its transcript is done
                    times = [t for b, _ in partial.get(item.source.key, []) for t in b.pts_time]
                    writer.text["asr"].add(item.source.key, asr.frames(item.source.key, times))
                take_source(writer, report, options, item, partial.pop(item.source.key, []))
                if bars:
                    bars.source_done()
                writer.commit_if_due()
        if reader.error is not None:
            raise reader.error
        writer.flush()
    finally:
        reader.stop_event.set()
        reader.join(timeout=5)
        if bars:
            bars.close()
    report.times.read_s = reader.busy_s
    if stream is not None:
        report.reuse = {"config": str(stream.cfg), "audit_every": stream.cfg.audit, **stream.finish().summary()}


def take_source(writer: IndexWriter, report: IndexReport, options: IndexOptions, done: _Done, parts: list) -> None:
    """A source whose frames are all encoded: its bad frames reported, its rows handed to the writer
    (the threaded pipeline and the Ray driver both call this, so a source counts the same in both)."""
    report.failed.extend(done.skipped)
    enc = _finish(done, parts, recipe_for(done.source, options), writer.manifest.dim)
    if enc is None:
        writer.drop(done.source.key)
        report.failed.append(BadInput(str(done.source.path), "no readable frames"))
        return
    report.duplicates_skipped += done.duplicates
    report.indexed.append(enc.video_id)
    writer.add(enc)


def _finish(done: _Done, parts: list, recipe: str, dim: int) -> Optional[EncodedSource]:
    if not parts:
        return None
    src = done.source
    batches = [b for b, _ in parts]
    return EncodedSource(
        key=src.key,
        video_id=src.video_id,
        kind=src.kind,
        fingerprint=src.fingerprint,
        recipe=recipe,
        frame_idx=np.asarray([i for b in batches for i in b.frame_idx], np.int64),
        pts_time=np.asarray([t for b in batches for t in b.pts_time], np.float64),
        paths=[p for b in batches for p in b.paths],
        hashes=np.asarray([h for b in batches for h in b.hashes], np.int64),
        vectors=np.concatenate([v for _, v in parts]).astype(np.float32).reshape(-1, dim),
        duplicates=done.duplicates,
    )


class _Bars:
    """tqdm bars over sources and frames (only when asked for: progress is the edge's business)."""

    def __init__(self, n_sources: int):
        from tqdm.auto import tqdm

        self.src = tqdm(total=n_sources, desc="videos", unit="video", position=0)
        self.frm = tqdm(desc="frames", unit="frame", position=1)

    def frames(self, n: int) -> None:
        self.frm.update(n)

    def source_done(self) -> None:
        self.src.update(1)

    def close(self) -> None:
        self.frm.close()
        self.src.close()

