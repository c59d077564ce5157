"""Text channels of an index, on-screen text (``ocr``, ``indexing.ocr``) and speech (``asr``,
``indexing.asr``): per-frame text stored beside each shard, and an embedded full-text index over it.

::

    index_dir/
      text/<shard>.<channel>.parquet   id, text, conf, words (JSON: text, conf, box), error; one row
                                       per row of the shard, written right after the shard's commit
                                       (asr: each "word" is a speech segment overlapping the frame,
                                       its box [start_ms, 0, duration_ms, 0] its span in time)
      text.sqlite                      SQLite FTS5 over the folded text of the live shards (derived:
                                       rebuilt from text/ whenever it does not match, never the truth)

The per-shard files follow the shard's life: written atomically after its commit (a kill between
the two leaves a shard without text, which the next ``index --ocr`` run reads again), rewritten by
``compact`` with the live rows, removed with the shard. ``text.sqlite`` is brought in line with
them at the end of every run (:func:`sync_text_index`), so a killed run loses nothing committed.

Matching is on folded text (:func:`fold`): lower case, Vietnamese (and other) diacritics removed,
``đ``/``Đ`` -> ``d``, so ``ha noi`` finds ``Hà Nội``. A user's query is never FTS5 syntax: every
word is quoted (:func:`fts_query`), so quotes, ``*``, ``AND``, parentheses or SQL-looking text
are plain words.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import unicodedata
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from mergeseek.runtime import atomic_write

log = logging.getLogger(__name__)

TEXT_DIR = "text"
TEXT_DB = "text.sqlite"
CHANNELS = ("ocr", "asr")  # on-screen text, speech
SCHEMA = 2  # text.sqlite's layout (PRAGMA user_version); a file of another one is made again
_WORD = re.compile(r"\w+", re.UNICODE)
_FILE = re.compile(r"^(?P<shard>.+)\.(?P<channel>[a-z]+)\.parquet(?P<tmp>\.tmp)?$")


# ---------------------------------------------------------------------------- folding and queries
def _fold_char(c: str) -> str:
    if c in "đĐðÐ":  # Vietnamese d-bar, and the look-alike eth OCR often reads for it
        return "d"
    base = "".join(ch for ch in unicodedata.normalize("NFD", c) if not unicodedata.combining(ch)).lower()
    return base[:1] if base else c  # one character in, one out: positions in the folded text are the original's


def fold(text: str) -> str:
    """``text`` for matching: lower case without diacritics, ``đ`` -> ``d``; same length as the NFC text."""
    return "".join(_fold_char(c) for c in unicodedata.normalize("NFC", text or ""))


def words(text: str) -> list[str]:
    """The folded words of ``text`` (what a query matches)."""
    return _WORD.findall(fold(text))


def fts_query(text: str, any_word: bool = False) -> Optional[str]:
    """An FTS5 query for the words of ``text``: each a quoted string (never syntax), all of them
    required (or ``any_word``: any). None when ``text`` has no word."""
    ws = words(text)
    if not ws:
        return None
    return (" OR " if any_word else " ").join('"' + w.replace('"', '""') + '"' for w in ws)


def squash(text: str) -> str:
    """The folded words of ``text`` run together (``Thủ tướng`` -> ``thutuong``): what the trigram
    table holds, so a word OCR ran into the next one (``thamHa``) is still found inside it."""
    return "".join(words(text))


def trigrams(word: str) -> set:
    return {word[i : i + 3] for i in range(len(word) - 2)}


_SOUNDS = [(re.compile(a), b) for a, b in (
    (r"^(kn|gn|pn|wr|ps)", lambda m: m.group()[1]), (r"^x", "s"), (r"^wh", "w"), (r"tion", "xn"), (r"mb$", "m"),
    (r"ph", "f"), (r"gh", ""), (r"ck", "k"), (r"sch", "sk"), (r"t?ch|sh", "x"), (r"th", "0"), (r"c(?=[eiy])", "s"),
    (r"dg(?=[eiy])", "j"), (r"g(?=[eiy])", "j"), (r"[cqg]", "k"), (r"x", "ks"), (r"z", "s"), (r"v", "f"), (r"d", "t"),
    (r"b", "p"), (r"(?<!^)h|h(?![aeiouy])", ""), (r"[wy](?![aeiou])", ""), (r"(?<!^)[aeiouy]", ""), (r"^[aeiouy]", "a"),
    (r"(.)\1+", r"\1"))]


def sound_key(word: str) -> str:
    """A phonetic key of a folded word, a simplified Metaphone of our own: letters that sound alike
    map to one (``ph`` -> ``f``, soft ``c`` -> ``s``, ``th`` -> ``0``; voiced and voiceless pairs
    merged: ``d``/``t``, ``b``/``p``, ``g``/``k``, ``v``/``f``, ``z``/``s``), vowels after the first
    letter dropped, doubles collapsed. Speech recognisers swap words that sound alike ("whether" /
    "weather"); the ``asr`` channel matches on these keys as a fallback. "" for words of fewer than
    4 letters (their keys match too much) and for words that are not letters only."""
    if len(word) < 4 or not word.isalpha() or not word.isascii():
        return ""
    for pattern, repl in _SOUNDS:
        word = pattern.sub(repl, word)
    return word if len(word) >= 2 else ""


def _word_match(q: str, tokens: set, grams: set, keys: set) -> float:
    """How well a folded query word ``q`` is matched by a frame's folded ``tokens`` (with the
    ``grams`` of its squashed text and the sound ``keys`` of its words), 0..1: 1 as a word; else
    the share of ``q``'s trigrams found in the squashed text when that is at least 0.6 (a word read
    with an error, or run into its neighbour); a word of 1-2 letters only as the start or the end of
    a longer word (0.5); the same sound key (0.7)."""
    if q in tokens:
        return 1.0
    score = 0.0
    if len(q) >= 3:
        g = trigrams(q)
        share = len(g & grams) / len(g)
        score = share if share >= 0.6 else 0.0
    elif any(len(t) > len(q) and (t.startswith(q) or t.endswith(q)) for t in tokens):
        score = 0.5
    key = sound_key(q)
    if key and key in keys:
        score = max(score, 0.7)
    return score


def match_score(query: str, text: str, sounds: bool = False) -> float:
    """How much of ``query`` the ``text`` holds, 0..1: each folded query word's ``_word_match``,
    weighted by its length (a long word says more than "the" or "3"). 1 when every word is there.
    ``sounds``: words with the same ``sound_key`` match too (speech; OCR misreads letters by their
    look, not their sound, and the keys are made for English)."""
    qs = words(query)
    if not qs:
        return 0.0
    tokens = words(text)
    keys = {sound_key(t) for t in tokens} - {""} if sounds else set()
    tset, grams = set(tokens), trigrams("".join(tokens))
    return sum(len(q) * _word_match(q, tset, grams, keys) for q in qs) / sum(len(q) for q in qs)


def highlight(text: str, query: str, mark: tuple[str, str] = ("[", "]")) -> str:
    """``text`` with the words that match a word of ``query`` (folded) wrapped in ``mark``: the same
    word, or one holding a query word of 3 letters or more (OCR ran two words together)."""
    want = set(words(query))
    long = [w for w in want if len(w) >= 3]
    folded = fold(text)
    text = unicodedata.normalize("NFC", text or "")
    out, last = [], 0
    for m in _WORD.finditer(folded):
        if m.group() in want or any(w in m.group() for w in long):
            out += [text[last : m.start()], mark[0], text[m.start() : m.end()], mark[1]]
            last = m.end()
    return "".join(out + [text[last:]])


# ---------------------------------------------------------------------------- per-shard files
def text_path(root: Path, shard: str, channel: str) -> Path:
    return Path(root) / TEXT_DIR / f"{shard}.{channel}.parquet"


def write_text(root: Path, shard: str, channel: str, ids: np.ndarray, frames: Sequence) -> Path:
    """Write one shard's text of ``channel`` (``frames[i]``: an ``ocr.FrameText`` of row ``ids[i]``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if len(ids) != len(frames):
        raise ValueError(f"{len(ids)} ids and {len(frames)} texts do not line up")
    table = pa.table({
        "id": np.asarray(ids, np.int64),
        "text": pa.array([f.text for f in frames], pa.string()),
        "conf": np.asarray([f.conf for f in frames], np.float32),
        "words": pa.array([json.dumps([[w.text, round(w.conf, 1), list(w.box)] for w in f.words], ensure_ascii=False)
                           for f in frames], pa.string()),
        "error": pa.array([f.error for f in frames], pa.string()),
        "also": pa.array([f.also for f in frames], pa.string()),
    })
    path = text_path(root, shard, channel)
    path.parent.mkdir(exist_ok=True)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return path


def read_text(root: Path, shard: str, channel: str):
    """The text table of ``shard`` (None when it has none, or it cannot be read: it is made again)."""
    import pyarrow.parquet as pq

    path = text_path(root, shard, channel)
    if not path.is_file():
        return None
    try:
        return pq.read_table(path)
    except Exception as exc:  # a damaged side file is derived data: read again by the next --ocr run
        log.warning("%s is unreadable (%s); the next `index --%s` run reads the text again", path, exc, channel)
        return None


def remove_stale_text(root: Path, keep: set) -> int:
    """Remove text files of shards not in ``keep`` and temporary files of killed runs; returns how many."""
    tdir = Path(root) / TEXT_DIR
    removed = 0
    for p in sorted(tdir.iterdir()) if tdir.is_dir() else ():
        m = _FILE.match(p.name)
        if m and (m.group("tmp") or m.group("shard") not in keep):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


class TextChannel:
    """The writer's side channel for one text channel: per source, the frames' text in row order
    (``ocr.FrameText``, or futures of lists of them while OCR runs beside encoding), written as the
    shard's text file right after the shard's commit. Frames OCR failed on are kept in ``failed``."""

    def __init__(self, channel: str = "ocr", engine=None):
        self.channel, self.engine = channel, engine
        self._by_key: dict[str, list] = {}
        self._lock = threading.Lock()
        self.failed: list[tuple[str, str]] = []  # (source key, reason)
        self.frames = 0
        self.busy_s = 0.0  # seconds the engine was busy (set by the run)

    def add(self, key: str, texts: Union[Future, Sequence]) -> None:
        with self._lock:
            self._by_key.setdefault(key, []).append(texts)

    def drop(self, key: str) -> None:
        with self._lock:
            parts = self._by_key.pop(key, [])
        for p in parts:
            if isinstance(p, Future):
                p.cancel()

    def write(self, root: Path, shard: str, items: Sequence, ids: np.ndarray) -> bool:
        """Write ``shard``'s text from ``items`` (committed ``EncodedSource`` in order); False if incomplete."""
        frames: list = []
        for it in items:
            with self._lock:
                parts = self._by_key.pop(it.key, None)
            if not len(it.frame_idx):
                continue
            try:
                got = [t for p in (parts or []) for t in (p.result() if isinstance(p, Future) else p)]
            except Exception as exc:  # a cancelled or failed read: this shard's text is read again next run
                log.warning("text of %s could not be read (%s); the next --%s run reads it again", shard, exc, self.channel)
                return False
            if len(got) != len(it.frame_idx):
                log.info("text of %s is incomplete; the next --%s run reads it again", shard, self.channel)
                return False
            for i, t in zip(it.frame_idx, got):
                if t.error:
                    self.failed.append((it.key, f"frame {int(i)}: {t.error}"))
            frames += got
        if len(frames) != len(ids):
            return False
        self.store(root, shard, ids, frames)
        self.frames += len(frames)
        return True

    def store(self, root: Path, shard: str, ids: np.ndarray, frames: Sequence) -> None:
        """Write the shard's file (a channel of other records, ``indexing.detect``, writes its own form)."""
        write_text(root, shard, self.channel, ids, frames)


# ---------------------------------------------------------------------------- the full-text index
@dataclass(frozen=True)
class TextMatch:
    id: int
    score: float  # higher is better (minus FTS5's bm25)
    text: str  # the frame's text as read


class TextIndex:
    """``text.sqlite``: SQLite FTS5 over the folded text of every live shard's text files."""

    def __init__(self, root: Union[str, Path], readonly: bool = False, memory: bool = False):
        self.root = Path(root)
        self.path = self.root / TEXT_DB
        uri = "file::memory:" if memory else f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        self.db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        if (memory or not readonly) and self.db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA:
            # a file of an older layout (derived data): made again from the text files by sync()
            self.db.executescript("DROP TABLE IF EXISTS frames; DROP TABLE IF EXISTS grams; DROP TABLE IF EXISTS loaded;"
                                  f"PRAGMA user_version = {SCHEMA};")
        if memory or not readonly:
            self.db.executescript(
                "CREATE VIRTUAL TABLE IF NOT EXISTS frames USING fts5(folded, keys, channel UNINDEXED, id UNINDEXED, "
                "text UNINDEXED, tokenize='unicode61');"
                "CREATE VIRTUAL TABLE IF NOT EXISTS grams USING fts5(squashed, channel UNINDEXED, id UNINDEXED, "
                "tokenize='trigram');"
                "CREATE TABLE IF NOT EXISTS loaded (shard TEXT, channel TEXT, size INTEGER, mtime_ns INTEGER, "
                "PRIMARY KEY (shard, channel));")

    def close(self) -> None:
        self.db.close()

    def loaded(self) -> dict:
        try:
            if self.db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA:
                return {}  # an older layout: read as empty, so search builds one in memory
            return {(s, c): (size, mt) for s, c, size, mt in self.db.execute("SELECT shard, channel, size, mtime_ns FROM loaded")}
        except sqlite3.OperationalError:  # an empty or foreign file: nothing is loaded
            return {}

    def sync(self, shards: Sequence[str]) -> dict:
        """Load the text files of ``shards`` not loaded yet (or changed) and unload the others, in one
        transaction. Returns counts (frames added, shards added / removed)."""
        want = _text_files(self.root, shards)
        have = self.loaded()
        rebuild = any(want.get(k) != v for k, v in have.items())  # a file changed or went with its shard
        added = 0
        with self.db:  # one transaction: a kill leaves the previous state, which the next sync completes
            if rebuild:
                for table in ("frames", "grams", "loaded"):
                    self.db.execute(f"DELETE FROM {table}")
                have = {}
            new = [key for key in want if key not in have]
            for shard, channel in new:
                t = read_text(self.root, shard, channel)
                if t is None:
                    continue
                c = CHANNELS.index(channel)  # rowid: the frame's id and its channel, the same in both tables
                also = t.column("also").to_pylist() if "also" in t.column_names else [""] * t.num_rows
                rows = [(len(CHANNELS) * int(i) + c, fold(f"{x} {a or ''}".strip()),
                         " ".join(sorted({sound_key(w) for w in words(f"{x} {a or ''}")} - {""})), channel, int(i), x)
                        for i, x, a in zip(t.column("id").to_pylist(), t.column("text").to_pylist(), also) if x]
                self.db.executemany("INSERT INTO frames (rowid, folded, keys, channel, id, text) VALUES (?, ?, ?, ?, ?, ?)", rows)
                self.db.executemany("INSERT INTO grams (rowid, squashed, channel, id) VALUES (?, ?, ?, ?)",
                                    [(r[0], squash(r[1]), channel, r[4]) for r in rows])
                self.db.execute("INSERT OR REPLACE INTO loaded VALUES (?, ?, ?, ?)", (shard, channel, *want[(shard, channel)]))
                added += len(rows)
        return {"frames_added": added, "shards_loaded": len(new), "rebuilt": rebuild}

    def search(self, query: str, channel: str = "ocr", k: int = 20) -> list[TextMatch]:
        """The best ``k`` frames for ``query`` in ``channel``, best first; an empty list when ``query``
        has no word. First the frames holding every word (by BM25); then, to fill ``k``, the frames
        matching part of it, by ``match_score`` (words, words read with an error or run together;
        for speech also words that sound alike), then BM25 of that match. ``score``: ``match_score`` (1 for the first)."""
        qs = words(query)
        if not qs:
            return []
        try:
            rows = self.db.execute(
                "SELECT id, text FROM frames WHERE frames MATCH ? AND channel = ? ORDER BY bm25(frames), id LIMIT ?",
                ("{folded} : (" + fts_query(query) + ")", channel, k)).fetchall()
        except sqlite3.OperationalError as exc:  # no such table: an index without text
            log.debug("text search: %s", exc)
            return []
        out = [TextMatch(int(i), 1.0, text) for i, text in rows]
        if len(out) >= k:
            return out
        seen = {m.id for m in out}
        found: dict = {}  # rowid -> its best rank among the candidates
        depth = max(4 * k, 200)
        grams = " OR ".join('"' + g.replace('"', '""') + '"' for g in sorted({g for q in qs for g in trigrams(q)}))
        keys = " OR ".join('"' + key + '"' for key in sorted({sound_key(q) for q in qs} - {""}))
        for table, q in (("frames", "{folded} : (" + fts_query(query, any_word=True) + ")"), ("grams", grams),
                         ("frames", keys and channel == "asr" and "{keys} : (" + keys + ")")):
            if q:
                sql = f"SELECT rowid FROM {table} WHERE {table} MATCH ? AND channel = ? ORDER BY bm25({table}), rowid LIMIT ?"
                for rank, (r,) in enumerate(self.db.execute(sql, (q, channel, depth)).fetchall()):
                    found[r] = min(rank, found.get(r, rank))
        rows = self.db.execute(f"SELECT rowid, id, text, folded FROM frames WHERE rowid IN ({','.join('?' * len(found))})",
                               list(found)).fetchall() if found else []
        scored = sorted(((match_score(query, folded, sounds=channel == "asr"), -found[r], -int(i), text) for r, i, text, folded in rows
                         if int(i) not in seen), reverse=True)
        out += [TextMatch(-ni, round(sc, 6), text) for sc, _, ni, text in scored if sc > 0][: k - len(out)]
        return out


def _text_files(root: Path, shards: Sequence[str]) -> dict:
    """(shard, channel) -> (size, mtime_ns) of the text files of ``shards``."""
    want = {}
    for shard in shards:
        for channel in CHANNELS:
            p = text_path(root, shard, channel)
            if p.is_file():
                st = p.stat()
                want[(shard, channel)] = (st.st_size, st.st_mtime_ns)
    return want


def open_text_index(root: Path, shards: Sequence[str]) -> Optional[TextIndex]:
    """The text index of an index folder for searching (read-only), or None when it has no text. When
    ``text.sqlite`` does not match the text files (a run killed before it was updated), one is built
    in memory from the files instead, as search does with a stale index.faiss."""
    want = _text_files(root, shards)
    if not want:
        return None
    if (Path(root) / TEXT_DB).is_file():
        ix = TextIndex(root, readonly=True)
        if ix.loaded() == want:
            return ix
        ix.close()
    log.warning("%s does not match the text files in %s (interrupted run?); built it in memory. Run "
                "`cli.py index --ocr ...` on the same folder to save it", TEXT_DB, root)
    ix = TextIndex(root, memory=True)
    ix.sync(shards)
    return ix


def sync_text_index(root: Path, shards: Sequence[str]) -> dict:
    """Bring ``text.sqlite`` in line with the text files of ``shards`` (the index's live shards)."""
    if not (Path(root) / TEXT_DIR).is_dir() and not (Path(root) / TEXT_DB).exists():
        return {}
    ix = TextIndex(root)
    try:
        return ix.sync(shards)
    finally:
        ix.close()


def ensure_text(store, engine, channel: str = "ocr") -> tuple[int, list]:
    """Read the ``channel`` text of the live rows of every shard that has no text file (a run killed
    between a commit and its text, or an index built before ``--ocr``/``--asr``): the frames are
    decoded again from their sources (speech: the source's sound is transcribed, ``engine.source_texts``).
    Returns (frames read, [(source key, reason)] for frames that could not be).

    ``store`` is an ``IndexStore`` opened for writing (its lock keeps other writers out).
    """
    from mergeseek.indexing.ocr import FrameText
    from mergeseek.indexing.thumbs import iter_decoded

    kinds = {k: e.kind for k, e in store.manifest.sources.items()}
    vids = {k: e.video_id for k, e in store.manifest.sources.items()}
    read, failed = 0, []
    for shard in store.shard_names():
        if text_path(store.root, shard, channel).is_file():
            continue
        rows = store.read_shard(shard, columns=["id", "frame_idx", "pts_time", "path", "source"])
        ids, texts = [], []
        keys = rows.column("source").to_pylist()
        order = sorted(range(len(keys)), key=lambda i: (keys[i], rows.column("frame_idx")[i].as_py()))
        by_source: dict[str, list[int]] = {}
        for i in order:
            by_source.setdefault(keys[i], []).append(i)
        for key, idx in by_source.items():
            frame_idx = np.asarray([rows.column("frame_idx")[i].as_py() for i in idx], np.int64)
            paths = [rows.column("path")[i].as_py() for i in idx]
            got: list = []
            decoded = len(idx)
            try:
                if hasattr(engine, "source_texts"):  # speech: the whole source's sound, mapped to these frames
                    got = engine.source_texts(kinds.get(key, "video"), key, [rows.column("pts_time")[i].as_py() for i in idx],
                                              video_id=vids.get(key, ""))
                for chunk in () if hasattr(engine, "source_texts") else iter_decoded(kinds.get(key, "video"), key,
                                                                                    frame_idx, paths, _rgb):
                    got += engine.read(chunk)
            except Exception as exc:  # a moved or broken source: its rows get no text, the rest do
                reason = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
                failed.append((key, f"cannot be decoded again for {channel} ({reason})"))
                decoded = len(got)
                got += [FrameText(error=reason)] * (len(idx) - len(got))
            failed += [(key, f"frame {int(f)}: {t.error}") for f, t in zip(frame_idx[:decoded], got) if t.error]
            ids += [rows.column("id")[i].as_py() for i in idx]
            texts += got
        write_text(store.root, shard, channel, np.asarray(ids, np.int64), texts)
        read += len(texts)
    return read, failed


def _rgb(frame):
    """A decoded frame as an RGB array (a PIL image is closed after decoding: copied out now)."""
    return np.asarray(frame.convert("RGB")) if hasattr(frame, "convert") else np.asarray(frame)


def carry_text(root: Path, old: str, new: str, ids: np.ndarray) -> int:
    """Copy the text rows of ``ids`` from shard ``old``'s files to shard ``new``'s (``compact``)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    copied = 0
    for channel in CHANNELS:
        t = read_text(root, old, channel)
        if t is None:
            continue
        kept = t.filter(pc.is_in(t.column("id"), value_set=pa.array(np.asarray(ids, np.int64))))
        path = text_path(root, new, channel)
        atomic_write(path, lambda tmp: pq.write_table(kept, tmp))
        copied += kept.num_rows
    return copied


def drop_foreign_text(store) -> int:
    """Remove text files that do not belong to the shard of their name: every id in a text file must be
    a row of that shard (ids are never given twice, so a file left by a killed run under a name a later
    shard took is found). Returns how many were removed."""
    removed = 0
    for shard in store.shard_names():
        rows = None
        for channel in CHANNELS:
            t = read_text(store.root, shard, channel)
            if t is None:
                continue
            if rows is None:
                rows = set(store.read_shard(shard, columns=["id"], live=False).column("id").to_pylist())
            if not set(t.column("id").to_pylist()) <= rows:
                log.warning("%s holds rows of another shard (left by an interrupted run); removed, read again by the "
                            "next --%s run", text_path(store.root, shard, channel), channel)
                text_path(store.root, shard, channel).unlink(missing_ok=True)
                removed += 1
    return removed


def stored_text(root: Path, shards: Sequence[str], channel: str = "ocr") -> dict:
    """id -> ``ocr.FrameText`` of every row the text files of ``shards`` hold (``merge-index``, ``export``)."""
    from mergeseek.indexing.ocr import FrameText, Word

    out: dict = {}
    for shard in shards:
        t = read_text(root, shard, channel)
        if t is None:
            continue
        also = t.column("also").to_pylist() if "also" in t.column_names else [""] * t.num_rows
        for i, ws, err, alt in zip(t.column("id").to_pylist(), t.column("words").to_pylist(), t.column("error").to_pylist(), also):
            try:
                words = tuple(Word(str(w), float(c), tuple(int(v) for v in box)) for w, c, box in json.loads(ws or "[]"))
            except (ValueError, TypeError):  # a hand-edited or damaged cell: that frame has no words
                words = ()
            out[int(i)] = FrameText(words, err or "", alt or "")
    return out
