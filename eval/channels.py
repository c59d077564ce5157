"""Text channels in ``cli.py eval``: a keyframe-set query with ``ocr:`` / ``asr:`` parts
(``a crowd ocr: HÀ NỘI asr: thủ tướng``) is scored on the ranking ``cli.py submit`` would give it.

* The visual part is ranked by each merge config's image embeddings (as every other query).
* Each text part is ranked by the frames' text, searched exactly as ``search --ocr`` searches an
  index: the set's per-frame text is loaded into an in-memory ``indexing.text.TextIndex``.
* The rankings are fused by ``retrieval.hybrid.fuse`` (reciprocal rank, ``RRF_K``) with the depths
  ``submit`` uses: the best :func:`submit_k` (400) frames of a fused ranking, each channel's best
  ``max(5 k, 100)``; TRAKE events as ``retrieval.events.search_events`` ranks them.

Where the frames' text comes from (one source per run):

* ``--ocr ENGINE``: the engine reads every keyframe of the set once; ``--asr ENGINE``: the engine
  transcribes the video of each of the set's videos, found where ``index`` finds it
  (``indexing.asr.sound_path``: the release's ``Videos_*`` folders, or the ``videos`` folder of
  ``release_parts``, ``--videos DIR``), mapped to its keyframes by their ``pts_time`` (the indexing
  rule, ``segments_to_frames``). Both are cached by file content and engine (:class:`TextCache`),
  so a second run reads nothing again. Each engine is built once per process (:func:`text_engine`).
* ``--text-from INDEX``: the text stored in an index folder built over the same media with
  ``--ocr`` / ``--asr``, matched by (video id, frame index).
"""

from __future__ import annotations

import hashlib
import logging
import math
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Optional, Sequence

import numpy as np

from mergeseek.errors import InputError

log = logging.getLogger(__name__)

NAMES = {"ocr": "on-screen text", "asr": "speech"}
FLAGS = {"ocr": "--ocr ENGINE (e.g. --ocr rapidocr: reads the set's keyframes)",
         "asr": "--asr ENGINE (e.g. --asr pocketsphinx: transcribes the set's videos)"}


def submit_k() -> int:
    """Frames of a fused ranking ``cli.py submit`` keeps (``retrieval.submission._channel_rows``)."""
    from mergeseek.retrieval.submission import MAX_ROWS

    return 4 * MAX_ROWS


def query_channels(text: str) -> tuple[Optional[str], dict]:
    """(visual part or None, {channel: words}) of a query's text (``retrieval.hybrid.split_channels``)."""
    from mergeseek.retrieval.hybrid import split_channels

    return split_channels(text or "")


def refusal(where: str, qids: Sequence[str], missing: Collection[str]) -> str:
    """The one line for queries needing a channel the run has no text for."""
    names = " and ".join(NAMES[c] for c in sorted(missing))
    flags = " / ".join(FLAGS[c] for c in sorted(missing))
    return (f"{where}: query {qids[0]} has ocr:/asr: parts ({len(qids)} such) needing {names}, which this eval run does "
            f"not have for the set's frames; pass {flags}, or --text-from INDEX (an index of the same media built with "
            f"{' and '.join('--' + c for c in sorted(missing))}); or score them with `cli.py submit` + `cli.py score`")


# ---------------------------------------------------------------------------- the cache
def cache_path() -> Path:
    """``$XDG_CACHE_HOME/mergeseek/eval-text.sqlite`` (``~/.cache/...`` when unset)."""
    from mergeseek.runtime import xdg_cache_home

    return xdg_cache_home() / "mergeseek" / "eval-text.sqlite"


def file_digest(path: Path) -> str:
    """BLAKE2b of the file's bytes (what the cache is keyed by, with the engine)."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class TextCache:
    """What an engine read from a file, keyed by (engine as written by ``str(engine)``, file digest):
    a picture's words (``ocr.FrameText``) or a video's speech segments (``asr.Segment``), as rows of
    plain columns. A frame the engine failed on is not stored (it is read again next time)."""

    def __init__(self, path: Optional[Path] = None):
        self.path = Path(path) if path is not None else cache_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=60)
        self.db.executescript(
            "CREATE TABLE IF NOT EXISTS done (engine TEXT, digest TEXT, also TEXT, PRIMARY KEY (engine, digest));"
            "CREATE TABLE IF NOT EXISTS parts (engine TEXT, digest TEXT, n INTEGER, text TEXT, conf REAL, a REAL, b REAL, "
            "c REAL, d REAL, also TEXT, PRIMARY KEY (engine, digest, n));")
        self.hits = self.misses = 0

    def _get(self, engine: str, digest: str) -> Optional[tuple]:
        row = self.db.execute("SELECT also FROM done WHERE engine = ? AND digest = ?", (engine, digest)).fetchone()
        self.hits += row is not None
        self.misses += row is None
        if row is None:
            return None
        parts = self.db.execute("SELECT text, conf, a, b, c, d, also FROM parts WHERE engine = ? AND digest = ? ORDER BY n",
                                (engine, digest)).fetchall()
        return row[0], parts

    def _put(self, engine: str, digest: str, also: str, parts: Sequence[tuple]) -> None:
        with self.db:  # one transaction: a file is cached whole or not at all
            self.db.execute("DELETE FROM parts WHERE engine = ? AND digest = ?", (engine, digest))
            self.db.executemany("INSERT INTO parts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                [(engine, digest, n, *p) for n, p in enumerate(parts)])
            self.db.execute("INSERT OR REPLACE INTO done VALUES (?, ?, ?)", (engine, digest, also))

    def get_frame(self, engine: str, digest: str):
        """The ``ocr.FrameText`` read from a picture, or None."""
        from mergeseek.indexing.ocr import FrameText, Word

        got = self._get(engine, digest)
        if got is None:
            return None
        also, parts = got
        return FrameText(tuple(Word(t, float(c), (int(a), int(b), int(w), int(h))) for t, c, a, b, w, h, _ in parts), also=also)

    def put_frame(self, engine: str, digest: str, frame) -> None:
        self._put(engine, digest, frame.also, [(w.text, w.conf, *w.box, "") for w in frame.words])

    def get_segments(self, engine: str, digest: str) -> Optional[list]:
        """The ``asr.Segment`` list heard in a video, or None."""
        from mergeseek.indexing.asr import Segment

        got = self._get(engine, digest)
        return None if got is None else [Segment(float(a), float(b), t, float(c), x or "") for t, c, a, b, _, _, x in got[1]]

    def put_segments(self, engine: str, digest: str, segments: Sequence) -> None:
        self._put(engine, digest, "", [(s.text, s.conf, s.start_s, s.end_s, 0, 0, s.also) for s in segments])

    def close(self) -> None:
        self.db.close()


# ---------------------------------------------------------------------------- reading the set's text
_ENGINES: dict = {}  # (channel, spec) -> the engine built for it in this process


def text_engine(channel: str, spec: str):
    """The OCR (``channel="ocr"``) or speech (``"asr"``) engine ``spec``, built once per process: the
    run's check before any model loads and the reading of the set use the same one (an engine's
    construction runs a command or loads models). A missing package raises as ``get_engine`` does."""
    key = (channel, spec)
    if key not in _ENGINES:
        from mergeseek.indexing import asr, ocr

        _ENGINES[key] = (ocr if channel == "ocr" else asr).get_engine(spec)
    return _ENGINES[key]


def ocr_texts(ds, spec: str, cache: TextCache, batch: int = 8, release_parts: Optional[dict] = None) -> tuple[list, list[str]]:
    """Every keyframe of ``ds`` read by the OCR engine ``spec`` (cached); (FrameTexts, notes).
    ``release_parts`` is not used (the keyframes are read themselves)."""
    engine = text_engine("ocr", spec)
    if engine is None:
        raise InputError(f"--ocr {spec!r} names no engine; give one, e.g. --ocr rapidocr")
    paths = [Path(p) for p in ds.images.paths]
    digests = [file_digest(p) for p in paths]
    out: list = [None] * len(paths)
    todo = []
    for i, d in enumerate(digests):
        out[i] = cache.get_frame(str(engine), d)
        if out[i] is None:
            todo.append(i)
    failed = 0
    for s in range(0, len(todo), batch):
        idx = todo[s : s + batch]
        for i, t in zip(idx, engine.read([np.asarray(ds.images.load(i)) for i in idx])):
            out[i] = t
            if t.error:
                failed += 1
            else:
                cache.put_frame(str(engine), digests[i], t)
    notes = [f"on-screen text: {engine} over the {len(paths)} keyframes ({len(paths) - len(todo)} from the cache "
             f"{cache.path}, {len(todo)} read)"]
    if failed:
        notes.append(f"on-screen text: OCR failed on {failed} keyframe(s); they have no text")
    return out, notes


def asr_texts(ds, spec: str, cache: TextCache, release_parts: Optional[dict] = None) -> tuple[list, list[str]]:
    """The speech of each keyframe: its video transcribed by ``spec`` (cached), mapped to the video's
    keyframes by ``pts_time`` (``indexing.asr.segments_to_frames``); (FrameTexts, notes). The video is
    found as ``index`` finds it (``sound_path`` with the same ``release_parts``: ``{"videos": DIR}``)."""
    from mergeseek.indexing.asr import segments_to_frames, sound_path
    from mergeseek.indexing.audio import read_audio
    from mergeseek.indexing.ocr import FrameText

    engine = text_engine("asr", spec)
    if engine is None:
        raise InputError(f"--asr {spec!r} names no engine; give one, e.g. --asr pocketsphinx")
    by_video: dict = {}
    for i, v in enumerate(ds.video_ids):
        by_video.setdefault(v, []).append(i)
    out: list = [FrameText() for _ in ds.video_ids]
    heard, missing, untimed, cached = 0, [], 0, 0
    for v, idx in by_video.items():
        folder = Path(ds.images.paths[idx[0]]).parent
        sound = sound_path("keyframes", folder, v, release_parts)
        if sound is None:
            missing.append(v)
            continue
        digest = file_digest(Path(sound))
        segments = cache.get_segments(str(engine), digest)
        if segments is None:
            segments = engine.transcribe(read_audio(sound))
            cache.put_segments(str(engine), digest, segments)
        else:
            cached += 1
        times = [ds.pts_time[i] if ds.pts_time else math.nan for i in idx]
        untimed += sum(1 for t in times if math.isnan(t))
        for i, t in zip(idx, segments_to_frames(segments, times)):
            out[i] = t
        heard += 1
    if not heard:
        where = f"{Path(release_parts['videos'])}" if (release_parts or {}).get("videos") else "the release's Videos_* folders"
        raise InputError(f"--asr: none of the {len(by_video)} videos of the set is there to transcribe (looked for "
                         f"{missing[0]}.mp4 in {where}, as index does); put the videos in a Videos_* folder of the "
                         "release, or give their folder (--videos DIR), or pass --text-from INDEX (an index of the same "
                         "media built with --asr)")
    notes = [f"speech: {engine} over {heard} of the set's {len(by_video)} videos ({cached} from the cache {cache.path})"]
    if missing:
        notes.append(f"speech: no video for {len(missing)} video id(s) ({', '.join(missing[:3])}); their keyframes have no speech")
    if untimed:
        notes.append(f"speech: {untimed} keyframe(s) have no time (no keyframe map), so no speech")
    return out, notes


def stored_texts(ds, index_dir: Path, channels: Collection[str]) -> tuple[dict, list[str]]:
    """{channel: FrameTexts} of ``ds``'s keyframes from the text an index folder stores, matched by
    (video id, frame index); (texts, notes)."""
    from mergeseek.indexing.ocr import FrameText
    from mergeseek.indexing.store import IndexStore
    from mergeseek.indexing.text import stored_text

    store = IndexStore.open_for_read(Path(index_dir))
    meta = store.read_meta()
    key_of = {int(i): (_video_key(v), int(f)) for i, v, f in zip(meta.column("id").to_pylist(), meta.column("video_id").to_pylist(),
                                                               meta.column("frame_idx").to_pylist())}
    want = {(_video_key(v), int(f)): n for n, (v, f) in enumerate(zip(ds.video_ids, ds.frame_idx))}
    out, notes = {}, []
    for channel in sorted(channels):
        texts: list = [FrameText() for _ in ds.video_ids]
        found = 0
        for i, t in stored_text(store.root, store.shard_names(), channel).items():
            n = want.get(key_of.get(i))
            if n is not None:
                texts[n] = t
                found += 1
        if not found:
            raise InputError(f"--text-from {index_dir}: none of the set's {len(want)} keyframes is a frame of that index with "
                             f"{NAMES[channel]} (matched by video id and frame index); index the same media with --{channel}")
        out[channel] = texts
        notes.append(f"{NAMES[channel]}: stored in {index_dir} for {found} of the {len(want)} keyframes "
                     "(matched by video id and frame index; the others have none)")
    return out, notes


def _video_key(v: str) -> str:
    return str(v).rsplit("/", 1)[-1]  # a release part's prefix (Keyframes_L01/L01_V001) is not part of the id


def index_channels(index_dir: Path) -> set:
    """The text channels an index folder holds (``--text-from``)."""
    from mergeseek.indexing.store import IndexStore
    from mergeseek.indexing.text import open_text_index

    store = IndexStore.open_for_read(Path(index_dir))
    ix = open_text_index(store.root, store.shard_names())
    if ix is None:
        return set()
    try:
        return {c for _, c in ix.loaded()}
    finally:
        ix.close()


# ---------------------------------------------------------------------------- the set's text index
@dataclass
class SetText:
    """The per-frame text of one keyframe set (gallery order) and its in-memory full-text index."""

    texts: dict  # channel -> list of FrameText, one per gallery item
    notes: list = field(default_factory=list)
    index: Any = None  # indexing.text.TextIndex over the texts, ids = gallery positions

    def __post_init__(self) -> None:
        from mergeseek.indexing.text import TextIndex, write_text

        with tempfile.TemporaryDirectory(prefix="mergeseek-eval-text-") as tmp:
            for channel, frames in self.texts.items():
                write_text(Path(tmp), "set", channel, np.arange(len(frames), dtype=np.int64), frames)
            self.index = TextIndex(Path(tmp), memory=True)
            self.index.sync(["set"])  # the rows search builds from an index's text files, the same way

    @property
    def channels(self) -> list:
        return sorted(self.texts)

    def ranking(self, words: str, channel: str, depth: int) -> list[int]:
        """Gallery positions whose ``channel`` text matches ``words``, best first (``TextIndex.search``)."""
        return [m.id for m in self.index.search(words, channel, depth)]


def read_set_text(ds, channels: Collection[str], *, ocr: Optional[str] = None, asr: Optional[str] = None,
                  text_from: Optional[str] = None, cache: Optional[TextCache] = None,
                  release_parts: Optional[dict] = None) -> SetText:
    """The text of ``channels`` for keyframe set ``ds`` from the run's one source (``release_parts``:
    where the release's parts are when elsewhere, as ``index``'s ``--videos DIR``)."""
    if text_from:
        texts, notes = stored_texts(ds, Path(text_from), channels)
        return SetText(texts, notes)
    own = cache is None
    cache = cache or TextCache()
    try:
        texts, notes = {}, []
        for channel, spec, read in (("ocr", ocr, ocr_texts), ("asr", asr, asr_texts)):
            if channel in channels:
                texts[channel], more = read(ds, spec, cache, release_parts=release_parts)
                notes += more
    finally:
        if own:
            cache.close()
    return SetText(texts, notes)


# ---------------------------------------------------------------------------- fused rankings
def fused_ranking(image_scores: Optional[np.ndarray], said: dict, text: SetText, k: int) -> list[tuple[int, float]]:
    """[(gallery position, fused score)], best first, of one query: the image channel's scores
    (None: no visual part) and the text channels' words, fused as ``retrieval.hybrid.search_hybrid``
    fuses them (each channel's best ``max(5 k, 100)``, RRF_K), the best ``k`` kept."""
    from mergeseek.retrieval.hybrid import RRF_K, fuse

    depth = max(5 * k, 100)
    rankings: dict = {}
    if image_scores is not None:
        n = min(depth, len(image_scores))
        rankings["image"] = np.argsort(-np.asarray(image_scores, np.float64), kind="stable")[:n].tolist()
    for channel, words in said.items():
        if words and words.strip():
            rankings[channel] = text.ranking(words, channel, depth)
    return [(i, s) for i, s, _ in fuse(rankings, RRF_K)][:k]


def trake_depth(n: int) -> int:
    """Frames each event of a TRAKE query contributes (``retrieval.events.search_events`` as ``submit`` calls it)."""
    from mergeseek.retrieval.submission import MAX_ROWS

    return min(n, max(1000, 20 * (MAX_ROWS + 20)))


def ranked_scores(scores: np.ndarray, fused: dict) -> np.ndarray:
    """``scores`` [Q, N] with the rows of fused queries (``{row: fused_ranking}``) replaced by values
    that sort exactly in the fused order (L, L-1, ..., 1 down the list; -inf for the frames the fused
    ranking does not hold: misses, as for a contestant)."""
    out = np.array(scores, dtype=np.float64, copy=True)
    for qi, ranking in fused.items():
        out[qi] = -np.inf
        ids = np.asarray([i for i, _ in ranking], np.int64)
        out[qi, ids] = np.arange(len(ids), 0, -1, dtype=np.float64)
    return out


def trake_per_event(visual_scores: np.ndarray, events: Sequence[str], text: SetText, ds) -> list:
    """Each event's fused hits (``retrieval.Hit``, fused score) of a TRAKE query with ``ocr:`` /
    ``asr:`` parts: every event ranked by its fused channels, as ``search_events`` does."""
    from mergeseek.retrieval.search import Hit

    k = trake_depth(len(ds.video_ids))
    per_event = []
    for row, event in zip(visual_scores, events):
        visual, said = query_channels(event)
        fused = fused_ranking(row if visual else None, said, text, k)
        per_event.append([Hit(float(s), ds.video_ids[i], int(ds.frame_idx[i]),
                              float(ds.pts_time[i]) if ds.pts_time else math.nan, "", int(i)) for i, s in fused])
    return per_event


def aic_scores(queries: Sequence, scores: np.ndarray, event_scores: dict, ds, fused: dict, text: Optional[SetText]) -> dict:
    """The HCMC AI Challenge score of one candidate (``eval.aic_score.set_scores``'s keys), with the
    queries that have ``ocr:`` / ``asr:`` parts scored on their fused rankings.

    ``fused``: {row: fused_ranking} of KIS / QA queries: each is scored by ``set_scores`` on the
    gallery of its fused frames in fused order (what ``submit`` writes). TRAKE queries whose events
    have channels are chained over each event's fused hits (``retrieval.events.chain_events``) and
    scored as ``set_scores`` scores a chain. The others go to ``set_scores`` as they are; the means
    are put together by task."""
    from mergeseek.eval.aic_score import TASKS, query_score, set_scores
    from mergeseek.retrieval.events import chain_events
    from mergeseek.retrieval.submission import TRAKE, submission_rows

    times = list(ds.pts_time) if ds.pts_time else [math.nan] * len(ds.video_ids)
    per: dict = {}  # qid -> (task, score) of the queries scored here
    plain = []
    for qi, q in enumerate(queries):
        a = getattr(q, "aic", None)
        if a is None:
            continue
        if qi in fused:
            ids = [i for i, _ in fused[qi]]
            got = set_scores([q], np.arange(len(ids), 0, -1, dtype=np.float64)[None], {}, [ds.video_ids[i] for i in ids],
                             [ds.frame_idx[i] for i in ids], [times[i] for i in ids])
            per[q.qid] = (a.truth.task, got.get("AIC", 0.0))
        elif a.truth.task == "trake" and text is not None and any(query_channels(e)[1] for e in a.events):
            rows = submission_rows(chain_events(trake_per_event(event_scores[q.qid], a.events, text, ds), a.within_s), TRAKE)
            per[q.qid] = (a.truth.task, query_score(rows, a.truth, a.tolerance))
        else:
            plain.append(qi)
    base = set_scores([queries[i] for i in plain], scores[plain], event_scores, ds.video_ids, ds.frame_idx, times) if plain else {}
    counts = {t: sum(1 for i in plain if queries[i].aic.truth.task == t) for t in TASKS}
    total = {t: base.get(f"AIC_{t}", 0.0) * counts[t] for t in TASKS}
    for task, v in per.values():
        total[task] += v
        counts[task] += 1
    out = {"AIC": sum(total.values()) / sum(counts.values())} if sum(counts.values()) else {}
    out.update({f"AIC_{t}": total[t] / counts[t] for t in TASKS if counts[t]})
    return out


def describe(text: SetText, n_queries: int, n_fused: int) -> list[str]:
    """Report notes: which channels were used, from where, and how they were fused."""
    from mergeseek.retrieval.hybrid import RRF_K

    k = submit_k()
    return [f"{n_fused} of {n_queries} queries have ocr:/asr: parts: ranked as `cli.py submit` ranks them, the image channel "
            f"(each merge config's embeddings) and {' and '.join(NAMES[c] for c in text.channels)} fused by reciprocal rank "
            f"(k={RRF_K}; each channel's best {max(5 * k, 100)} frames, the best {k} kept; frames past them are misses)"] + text.notes


__all__ = ["SetText", "TextCache", "cache_path", "fused_ranking", "index_channels", "query_channels", "read_set_text", "refusal",
           "text_engine"]
