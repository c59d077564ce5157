"""Issue #28, what was left: the detector-first OCR engine (``--ocr rapidocr``) on rendered captions,
matching that tolerates OCR and speech errors (words run together, a wrong letter, words that sound
alike, the recogniser's other hypotheses), and the text index's layout change. The RapidOCR cases
need ``rapidocr_onnxruntime`` (installed by the Makefile) and skip without it."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest

from mergeseek.errors import ConfigError, MissingDependencyError
from mergeseek.indexing.ocr import FrameText, Word
from mergeseek.indexing.text import (SCHEMA, TextIndex, fold, highlight, match_score, sound_key, squash, stored_text, trigrams,
                                     words, write_text)


def _frames(texts: dict, also: dict | None = None) -> list:
    return [FrameText(tuple(Word(w, 90.0, (0, 0, 1, 1)) for w in t.split()), also=(also or {}).get(i, ""))
            for i, t in texts.items()]


def _index(root: Path, texts: dict, channel: str = "ocr", also: dict | None = None) -> TextIndex:
    write_text(root, "part-00000", channel, np.asarray(list(texts), np.int64), _frames(texts, also))
    ix = TextIndex(root)
    ix.sync(["part-00000"])
    return ix


# ---------------------------------------------------------------------------- the score, against a naive one
def _naive_score(query: str, text: str, sounds: bool) -> float:
    """The rule of ``match_score`` written out directly, word by word and character by character."""
    toks = words(text)
    run = "".join(toks)
    total = got = 0.0
    for q in words(query):
        total += len(q)
        if q in toks:
            got += len(q)
            continue
        s = 0.0
        if len(q) >= 3:
            mine = {q[i:i + 3] for i in range(len(q) - 2)}
            found = sum(1 for g in mine if any(run[j:j + 3] == g for j in range(len(run) - 2)))
            s = found / len(mine) if found / len(mine) >= 0.6 else 0.0
        elif any(len(t) > len(q) and (t[:len(q)] == q or t[-len(q):] == q) for t in toks):
            s = 0.5
        k = sound_key(q)
        if sounds and k and any(sound_key(t) == k for t in toks):
            s = max(s, 0.7)
        got += len(q) * s
    return got / total if total else 0.0


@pytest.mark.parametrize("query,text", [
    ("thu tuong tham ha noi", "Thu tuong thamHa Noi"), ("bao so 3 do bo da nang", "Bao so 3 d6bo Da Nang"),
    ("khai mac hoi cho can tho", "Khai mac hgi chg Can Tho"), ("stock market closes higher", "Stockmarketcloseshigher"),
    ("the weather today", "whether to day"), ("national assembly debated", "national assembly to make it a landlocked"),
    ("", "anything"), ("ha noi", ""), ("x", "xylophone"), ("AND OR NOT", "and or not"),
])
def test_match_score_agrees_with_a_naive_rule(query, text):
    for sounds in (False, True):
        assert match_score(query, text, sounds) == pytest.approx(_naive_score(query, text, sounds))
        assert 0.0 <= match_score(query, text, sounds) <= 1.0
    assert match_score("the weather", "whether", sounds=True) > match_score("the weather", "whether")


def test_words_run_together_or_misread_still_match_but_unrelated_text_does_not():
    assert match_score("Thủ tướng thăm Hà Nội", "Thủ tướng thăm Hà Nội") == 1.0
    merged = match_score("thu tuong tham ha noi", "Thu tuong thamHa Noi")  # 'tham' inside 'thamha', 'ha' its end
    assert 0.85 < merged < 1.0
    assert match_score("gia vang tang", "Giavang tang manh") > 0.9
    assert match_score("gia vang tang", "Election results tonight") == 0.0
    assert match_score("hanoi", "Hà Nội") == 1.0  # the trigram table runs the words together
    assert squash("Thủ tướng, thăm!") == "thutuongtham" and trigrams("abcd") == {"abc", "bcd"}


def test_sound_keys_merge_words_that_sound_alike_and_skip_short_ones():
    assert sound_key("weather") == sound_key("whether")
    assert sound_key("knight") == sound_key("night") and sound_key("photo") == sound_key("foto")
    assert sound_key("center") == sound_key("senter") and sound_key("debated") == sound_key("tepated")
    assert sound_key("cat") == "" and sound_key("h2o4") == "" and sound_key("hà") == ""  # short, not letters, not folded
    assert sound_key("market") != sound_key("minister")


# ---------------------------------------------------------------------------- the index
def test_full_matches_come_first_then_partial_ones_by_score(tmp_path):
    ix = _index(tmp_path, {1: "Thủ tướng thăm Hà Nội", 2: "Thu tuong thamHa Noi", 3: "Hà Nam mưa lớn",
                           4: "Giá vàng tăng mạnh", 5: "Thủ tướng phát biểu"})
    got = ix.search("thu tuong tham ha noi", k=10)
    assert got[0].id == 1 and got[0].score == 1.0
    assert [m.id for m in got[1:3]] == [2, 5]  # 2 matches all of it, read badly; 5 two of five words
    assert all(a.score >= b.score for a, b in zip(got, got[1:]))
    assert 4 not in [m.id for m in got]  # nothing in common: never a hit ('tang' sounds like 'tuong': not for OCR)
    assert [m.id for m in ix.search("thu tuong tham ha noi", k=1)] == [1]
    for m in got:
        assert m.score == pytest.approx(1.0 if m.id == 1 else round(match_score("thu tuong tham ha noi", m.text), 6))


@pytest.mark.parametrize("query", ['"', 'a" OR "b', "*", "ha*", "NEAR(ha noi, 1)", "'); DROP TABLE grams; --",
                                   "{folded} : x", "keys : abc", "^ha", "\\"])
def test_the_fallback_queries_are_words_too(tmp_path, query):
    ix = _index(tmp_path, {1: "Thủ tướng thăm Hà Nội", 2: "Hà Nam"})
    ix.search(query, k=5)  # no error
    ix.search(query + " weather", "asr", k=5)
    assert ix.db.execute("SELECT count(*) FROM grams").fetchone() == (2,)
    assert [m.id for m in ix.search("ha noi", k=1)] == [1]


def test_other_hypotheses_are_searched_but_not_shown(tmp_path):
    texts = {1: "national assembly to make it a landlocked a day", 2: "the price of gold rose"}
    ix = _index(tmp_path, texts, "asr", also={1: "debated land law today"})
    got = ix.search("assembly debated the land law", "asr", k=5)
    assert got[0].id == 1 and got[0].text == texts[1]  # found by its also words, shown as heard best
    assert got[0].score == pytest.approx(match_score("assembly debated the land law", texts[1] + " debated land law today", True))
    assert stored_text(tmp_path, ["part-00000"], "asr")[1].also == "debated land law today"
    assert stored_text(tmp_path, ["part-00000"], "asr")[2].also == ""


def test_a_text_file_without_the_also_column_is_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "text").mkdir()
    pq.write_table(pa.table({"id": np.asarray([7], np.int64), "text": ["Hà Nội"], "conf": np.asarray([90.0], np.float32),
                             "words": ['[["Hà", 90.0, [0, 0, 1, 1]], ["Nội", 90.0, [1, 0, 1, 1]]]'], "error": [""]}),
                   tmp_path / "text" / "part-00000.ocr.parquet")
    ix = TextIndex(tmp_path)
    ix.sync(["part-00000"])
    assert [m.id for m in ix.search("ha noi")] == [7] and stored_text(tmp_path, ["part-00000"])[7].also == ""


def test_a_text_index_of_the_older_layout_is_made_again(tmp_path):
    from mergeseek.indexing.text import open_text_index

    write_text(tmp_path, "part-00000", "ocr", np.asarray([3], np.int64), _frames({3: "Bão đổ bộ Đà Nẵng"}))
    old = sqlite3.connect(tmp_path / "text.sqlite")  # the first layout: no keys column, no trigram table
    old.executescript("CREATE VIRTUAL TABLE frames USING fts5(folded, channel UNINDEXED, id UNINDEXED, text UNINDEXED);"
                      "CREATE TABLE loaded (shard TEXT, channel TEXT, size INTEGER, mtime_ns INTEGER, PRIMARY KEY (shard, channel));")
    st = (tmp_path / "text" / "part-00000.ocr.parquet").stat()
    old.execute("INSERT INTO loaded VALUES ('part-00000', 'ocr', ?, ?)", (st.st_size, st.st_mtime_ns))
    old.commit()
    old.close()
    ro = open_text_index(tmp_path, ["part-00000"])  # read-only: not trusted, built in memory
    assert [m.id for m in ro.search("da nang")] == [3]
    ix = TextIndex(tmp_path)  # for writing: the file is laid out anew and filled by sync
    assert ix.db.execute("PRAGMA user_version").fetchone() == (SCHEMA,) and ix.loaded() == {}
    ix.sync(["part-00000"])
    assert [m.id for m in ix.search("danang")] == [3]


def test_highlight_marks_words_a_query_word_was_found_inside():
    assert highlight("Thu tuong thamHa Noi", "tham ha noi") == "Thu tuong [thamHa] [Noi]"
    assert highlight("Hà Nội, Hà Nam", "ha") == "[Hà] Nội, [Hà] Nam"


# ---------------------------------------------------------------------------- speech: other hypotheses
def test_alternate_words_take_the_time_of_the_best_words_they_replace():
    from mergeseek.indexing.asr import Segment, attach_alternates, place_alternates

    best = [(1.0, 1.5, "national", 0.9), (1.5, 2.0, "assembly", 0.9), (2.0, 2.2, "to", 0.5), (2.2, 2.6, "make", 0.5),
            (2.6, 3.0, "it", 0.5)]
    others = [["national", "assembly", "debated", "it"], ["national", "assembly", "to", "make", "it", "today"],
              ["the", "national", "assembly", "to", "make", "it"]]
    got = place_alternates(best, others)
    # 'debated' replaced 'to make' (2.0-2.6); 'today' came after the last word; 'the' before the first
    assert got == [(1.0, "the"), (2.3, "debated"), (3.0, "today")]
    assert place_alternates([], others) == [] and place_alternates(best, [[w[2] for w in best]]) == []
    segs = [Segment(1.0, 2.0, "national assembly"), Segment(2.0, 3.0, "to make it")]
    out = attach_alternates(segs, got)
    assert [s.also for s in out] == ["the", "debated today"] and [s.text for s in out] == [s.text for s in segs]


def test_the_nbest_option_is_checked_and_round_trips():
    pytest.importorskip("pocketsphinx")
    from mergeseek.indexing import asr

    e = asr.get_engine("pocketsphinx,nbest=5")
    assert e.nbest == 5 and str(e) == "pocketsphinx,nbest=5" and str(asr.get_engine(str(e))) == str(e)
    assert asr.get_engine("pocketsphinx").nbest == 100
    for bad in ("pocketsphinx,nbest=0", "pocketsphinx,nbest=x"):
        with pytest.raises(ConfigError):
            asr.get_engine(bad)


# ---------------------------------------------------------------------------- RapidOCR
def test_rapidocr_specs_and_its_missing_package(monkeypatch):
    from mergeseek.indexing import ocr

    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'mergeseek\[ocr\]'") as err:
        ocr.get_engine("rapidocr")
    assert "\n" not in str(err.value)
    monkeypatch.setattr(ocr.RapidOcrEngine, "__init__", lambda self, **kw: setattr(self, "kw", kw))
    assert ocr.get_engine("rapidocr,det_side=960,min_conf=40").kw == {"det_side": 960, "min_conf": 40.0}
    for bad, says in (("rapidocr,passes=2", "unknown ocr option 'passes'"), ("rapidocr:vie", "no ':' argument"),
                      ("rapidocr,det_side=big", "not a number")):
        with pytest.raises(ConfigError, match=says.replace("'", ".")):
            ocr.get_engine(bad)


def _caption_frame(text: str, size: int, style: str, shape=(720, 1280)) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    font = None
    for p in ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        if Path(p).is_file():
            font = ImageFont.truetype(p, size)
    if font is None:
        pytest.skip("no DejaVu font (fonts-dejavu-core)")
    rng = np.random.default_rng(size)
    im = Image.fromarray(rng.integers(40, 200, (shape[0] // 8, shape[1] // 8, 3), dtype=np.uint8)).resize(shape[::-1])
    d = ImageDraw.Draw(im, "RGBA")
    top = shape[0] - 60 - size * 2
    if style == "box":
        d.rectangle([30, top - 8, 50 + d.textlength(text, font=font), top + size * 1.4], fill=(16, 40, 120, 255))
        d.text((40, top), text, font=font, fill=(255, 255, 255))
    else:
        d.text((40, top), text, font=font, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
    return np.asarray(im)


def test_rapidocr_reads_captions_as_folded_words_with_boxes_in_frame_pixels():
    pytest.importorskip("rapidocr_onnxruntime", reason="rapidocr_onnxruntime is not installed (pip install 'mergeseek[ocr]')")
    from PIL import Image

    from mergeseek.indexing.ocr import get_engine

    engine = get_engine("rapidocr")
    caps = [("Thủ tướng thăm Hà Nội", 32, "box"), ("Breaking news flood warning", 24, "outline")]
    frames = [_caption_frame(*c) for c in caps]
    big = np.asarray(Image.fromarray(frames[0]).resize((1920, 1080)))  # larger than max_side: shrunk, boxes scaled back
    got = engine.read(frames + [big, np.zeros((50, 80, 3), np.uint8)])
    for (text, size, _), ft in zip(caps, got):
        assert not ft.error and match_score(text, ft.text) >= 0.85, (text, ft.text)
        top = 720 - 60 - size * 2
        assert all(top - size <= w.box[1] + w.box[3] / 2 <= top + 2 * size for w in ft.words)
        assert all(0 <= w.box[0] and w.box[0] + w.box[2] <= 1280 + 4 and 0 <= w.conf <= 100 for w in ft.words)
    assert fold(got[2].text) == fold(got[0].text) or match_score(caps[0][0], got[2].text) >= 0.85
    assert min(w.box[1] for w in got[2].words) > 1.3 * min(w.box[1] for w in got[0].words)  # 1080p pixels
    assert got[3] == FrameText()  # nothing written: no words, no error
    bad = engine.read([np.zeros((0, 0, 3), np.uint8), frames[1]])
    assert bad[0].error.startswith("OCR failed") and not bad[1].error  # a broken frame is reported, the rest read


# ---------------------------------------------------------------------------- TRAKE events with channels
def test_trake_events_take_ocr_and_asr_parts_and_chain_in_time(tmp_path):
    """Each event's ``ocr:`` / ``asr:`` words rank its frames (fused with its description, one
    scale for all events); the chain keeps time order and its window; ``submit`` writes them."""
    from test_indexing_support import build_encoder, write_video

    from mergeseek.indexing import Dedup, IndexOptions, Sampling, index_paths
    from mergeseek.indexing.store import IndexStore
    from mergeseek.indexing.text import sync_text_index
    from mergeseek.retrieval.events import search_events
    from mergeseek.retrieval.search import Searcher
    from mergeseek.retrieval.submission import run_submit

    (tmp_path / "v").mkdir()
    write_video(tmp_path / "v" / "news.mp4", [("red", 30), ("blue", 30), ("green", 30)], fps=10.0)
    root = tmp_path / "ix"
    encoder = build_encoder()
    index_paths([tmp_path / "v"], root, encoder, IndexOptions(sampling=Sampling("every", 10), dedup=Dedup(enabled=False)))
    store = IndexStore.open_for_read(root)
    meta = store.read_meta()
    t_of = dict(zip(meta.column("id").to_pylist(), meta.column("pts_time").to_pylist()))
    said = {0.0: ("Bão số 3", "storm warning"), 2.0: ("Đà Nẵng", ""), 4.0: ("", "the fishermen returned"),
            8.0: ("Bão số 3", "")}  # a second storm caption after the speech: a chain must go forward in time
    for shard in store.shard_names():
        ids = store.read_shard(shard, columns=["id"]).column("id").to_pylist()
        for c, channel in enumerate(("ocr", "asr")):
            write_text(root, shard, channel, np.asarray(ids, np.int64),
                       _frames({i: said.get(round(t_of[i], 1), ("", ""))[c] for i in ids}))
    sync_text_index(root, store.shard_names())
    s = Searcher(root, encoder=encoder)
    by_t = {round(t, 1): i for i, t in t_of.items()}
    chains = search_events(s, ["ocr: bao so 3", "a blue frame asr: fishermen returned"], within=5.0, k=5)
    assert [h.id for h in chains[0].hits] == [by_t[0.0], by_t[4.0]]  # not the caption at 8 s: after the speech
    assert all(c.hits[0].pts_time < c.hits[1].pts_time <= c.hits[0].pts_time + 5.0 for c in chains)
    alone = search_events(s, ["ocr: da nang", "asr: fishermen"], within=1.0, k=5)
    assert alone == [] or all(c.hits[1].pts_time - c.hits[0].pts_time <= 1.0 for c in alone)  # 2 s apart: outside 1 s

    q = tmp_path / "q.tsv"
    q.write_text("t1\ttrake\tocr: bao so 3 | asr: fishermen returned\n", encoding="utf-8")
    report = run_submit(q, root, tmp_path / "sub", searcher=s, within_s=5.0)
    first = Path(report.files[0][3]).read_text().splitlines()[0].split(",")
    frame_of = dict(zip(meta.column("id").to_pylist(), meta.column("frame_idx").to_pylist()))
    assert first[1:] == [str(frame_of[by_t[0.0]]), str(frame_of[by_t[4.0]])]


# ---------------------------------------------------------------------------- kill -9 during --ocr
_KILLED_OCR_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_indexing_support import build_encoder
from mergeseek.indexing import IndexOptions, index_paths
from mergeseek.indexing import text as text_mod

real, calls = text_mod.write_text, []

def write_then_die(*a, **k):  # the 2nd shard is committed, then the process is killed before its text
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)

text_mod.write_text = write_then_die
index_paths([{images!r}], {root!r}, build_encoder(), IndexOptions(ocr={engine!r}, shard_size=1))
"""


def _ocr_engine_here() -> str:
    import importlib.util
    import shutil

    if importlib.util.find_spec("rapidocr_onnxruntime") is not None:
        return "rapidocr"
    if shutil.which("tesseract") is not None:
        return "tesseract,passes=1"
    pytest.skip("no OCR engine installed (pip install 'mergeseek[ocr]', or apt-get install tesseract-ocr)")


@pytest.mark.slow
def test_kill_9_during_ocr_then_resume_gives_text_rows_equal_to_vector_rows(tmp_path):
    import subprocess

    import pyarrow.parquet as pq
    from test_indexing_support import build_encoder
    from test_text import CAPTIONS, _render

    from mergeseek.indexing import IndexOptions, index_paths
    from mergeseek.indexing.store import IndexStore
    from mergeseek.retrieval.hybrid import search_hybrid
    from mergeseek.retrieval.search import Searcher

    engine = _ocr_engine_here()
    images, root = tmp_path / "news", tmp_path / "ix"
    for i, cap in enumerate(CAPTIONS):  # one folder (one source, one commit of shard_size=1) per caption
        _render(images / f"c{i}", [cap])
    script = _KILLED_OCR_RUN.format(tests=str(Path(__file__).parent), images=str(images), root=str(root), engine=engine)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == -9, done.stderr[-2000:]
    committed = sorted(IndexStore.open_for_read(root).read_vectors()[0].tolist())
    assert len(committed) == 2  # two sources committed, the second without its text
    index_paths([images], root, build_encoder(), IndexOptions(ocr=engine, shard_size=1))  # resume
    ids = sorted(IndexStore.open_for_read(root).read_vectors()[0].tolist())
    text_ids = sorted(i for p in (root / "text").glob("*.ocr.parquet") for i in pq.read_table(p).column("id").to_pylist())
    assert text_ids == ids and len(ids) == len(CAPTIONS)  # every row once: same frames, no duplicates
    s = Searcher(root)
    for i, cap in enumerate(CAPTIONS):
        assert search_hybrid(s, ocr=fold(cap), k=1)[0].path.endswith(f"c{i}/f00.png"), cap
    rows = [r for (r,) in s._text_ix.db.execute("SELECT id FROM frames WHERE channel = 'ocr' ORDER BY id")]
    assert rows == ids  # the text index holds each frame once (every caption has text)


def test_eval_refuses_queries_with_text_channels_in_one_line(tmp_path):
    """Loaded without a text source (``eval --ocr`` / ``--asr`` / ``--text-from``, eval/channels.py), a
    keyframe query with ``ocr:``/``asr:`` parts is refused (it would be encoded as a description),
    naming the query and what to pass instead."""
    import json

    from test_datasets import write_aic

    from mergeseek.errors import InputError
    from mergeseek.eval.datasets import load_dataset

    write_aic(tmp_path, {"L01_V001": [0, 50]})
    rows = [{"id": "a", "query": "a crowd", "video_id": "L01_V001", "frame_idx": 0},
            {"id": "b", "query": "a crowd OCR: HÀ NỘI", "video_id": "L01_V001", "frame_idx": 50}]
    (tmp_path / "queries.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    with pytest.raises(InputError, match=r"query b has ocr:/asr: parts \(1 such\).*--ocr ENGINE.*--text-from INDEX") as err:
        load_dataset(f"keyframes:{tmp_path}")
    assert "\n" not in str(err.value)
    (tmp_path / "queries.jsonl").write_text(json.dumps(rows[0]), encoding="utf-8")
    assert [q.qid for q in load_dataset(f"keyframes:{tmp_path}").queries] == ["a"]
