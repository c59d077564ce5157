"""Search over real indexes (random-weight ViT-B-32): image, text, per-video, temporal, stale index, formats."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_indexing_support import (  # noqa: F401  (fixtures)
    built_index,
    encoder,
    sample_index,
    sample_videos,
    shots_dir,
)

from mergeseek.errors import IndexMismatchError, InputError
from mergeseek.indexing import IndexOptions, index_paths
from mergeseek.indexing.store import IndexStore
from mergeseek.retrieval import (
    Hit,
    Searcher,
    TemporalHit,
    format_timestamp,
    hits_json,
    hits_table,
    pair_events,
    run_search,
    write_submission_csv,
)


@pytest.fixture(scope="module")
def searcher(sample_index, encoder):  # noqa: F811
    return Searcher(sample_index[0], encoder)


def _frame(path: Path, idx: int) -> np.ndarray:
    import decord

    return decord.VideoReader(str(path))[idx].asnumpy()


def test_a_query_by_an_indexed_frame_returns_that_frame_first(searcher, sample_videos, tmp_path):  # noqa: F811
    hits = searcher.search_image(_frame(sample_videos["bikes"], 125), k=5)
    assert (hits[0].video_id, hits[0].frame_idx) == ("bikes", 125)
    assert hits[0].pts_time == pytest.approx(5.0, abs=1e-3) and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].path == str(sample_videos["bikes"])
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # The same through a lossless file on disk (the --image path).
    from PIL import Image

    Image.fromarray(_frame(sample_videos["bigbuckbunny"], 0)).save(tmp_path / "q.png")
    top = searcher.search_image(tmp_path / "q.png", k=1)[0]
    assert (top.video_id, top.frame_idx, top.pts_time) == ("bigbuckbunny", 0, 0.0)


def test_text_search_and_best_hit_per_video(searcher):
    hits = searcher.search_text("a man riding a bike", k=8)
    assert len(hits) == 8 and len({h.id for h in hits}) == 8
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    q = searcher.text_vector("a man riding a bike")
    assert [h.id for h in searcher.search_vector(q, k=8)] == [h.id for h in hits]
    everything = searcher.search_vector(q, k=searcher.size)
    best = searcher.search_vector(q, k=5, per_video=True)
    assert [h.video_id for h in best] == list(dict.fromkeys(h.video_id for h in everything))
    assert best[0] == everything[0]
    assert len(searcher.search_vector(q, k=10_000)) == searcher.size


def test_empty_and_bad_queries_are_one_clear_error(searcher, tmp_path):
    for text in ("", "   "):
        with pytest.raises(InputError, match="empty query"):
            searcher.search_text(text)
    with pytest.raises(InputError, match="does not exist"):
        searcher.search_image(tmp_path / "nope.jpg")
    (tmp_path / "bad.jpg").write_text("not an image")
    with pytest.raises(InputError, match="cannot be read"):
        searcher.search_image(tmp_path / "bad.jpg")
    # run_search checks the query before it opens the index or loads a model.
    with pytest.raises(InputError, match="empty query"):
        run_search(tmp_path / "no_index", text=" ")


def test_another_model_is_refused_with_a_clear_message(sample_index):  # noqa: F811
    index_dir = sample_index[0]
    with pytest.raises(IndexMismatchError, match="ViT-L-14") as info:
        Searcher.open(index_dir, model="ViT-L-14")  # refused before any weights load
    assert "--model ViT-B-32" in str(info.value)
    with pytest.raises(IndexMismatchError, match="pretrained"):
        Searcher.open(index_dir, pretrained="openai")

    class WideEncoder:
        def describe(self):
            return {"model": "ViT-B-32", "pretrained": "none", "merge": "none", "dim": 768, "precision": "fp32"}

    with pytest.raises(IndexMismatchError, match="dim"):
        Searcher(index_dir, WideEncoder())


def test_a_missing_or_stale_faiss_file_is_rebuilt_from_the_shards(sample_index, searcher, tmp_path, caplog):  # noqa: F811
    copy = tmp_path / "copy"
    shutil.copytree(sample_index[0], copy)
    (copy / "index.faiss").unlink()
    q = searcher.store.read_vectors()[1][[3, 11]]
    with caplog.at_level("WARNING"):
        rebuilt = Searcher(copy)
    assert "rebuilt it in memory" in caplog.text
    assert [[h.id for h in hs] for hs in rebuilt.search_vectors(q, 5)] == [[h.id for h in hs] for hs in searcher.search_vectors(q, 5)]


@pytest.fixture(scope="module")
def shots_searcher(tmp_path_factory, encoder, shots_dir):  # noqa: F811
    def make():
        d = tmp_path_factory.mktemp("uninterrupted")
        index_paths([shots_dir], d, encoder, IndexOptions())
        return d

    return Searcher(built_index(f"shots-uninterrupted:{shots_dir}", make), encoder)


def _as_text_queries(searcher: Searcher, frames: dict) -> None:
    """Make the named 'texts' encode to the vectors of known frames (random weights know no words)."""
    meta = searcher.store.read_meta()
    ids, vecs = searcher.store.read_vectors()
    by_frame = {(v, f): i for v, f, i in zip(*(meta.column(c).to_pylist() for c in ("video_id", "frame_idx", "id")))}
    lookup = {text: vecs[list(ids).index(by_frame[key])][None] for text, key in frames.items()}
    searcher.text_vector = lambda text: lookup[text]


def test_temporal_query_finds_the_first_event_followed_by_the_second(shots_searcher):
    # rg.mp4 is red for 1 s then green; yw.mp4 yellow then white; bk.mp4 blue then black.
    _as_text_queries(shots_searcher, {"red": ("rg", 0), "green": ("rg", 10), "black": ("bk", 10)})
    top = shots_searcher.search_temporal("red", "green", within_s=5, k=3)[0]
    assert (top.video_id, top.first.frame_idx, top.then.frame_idx) == ("rg", 0, 10)
    assert top.score == pytest.approx(2.0, abs=1e-4) and top.then.pts_time - top.first.pts_time == pytest.approx(1.0, abs=1e-3)
    # Outside the window, in the wrong order, or across videos: no such pair.
    assert not any(p.video_id == "rg" for p in shots_searcher.search_temporal("red", "green", within_s=0.5, k=10))
    reverse = shots_searcher.search_temporal("green", "red", within_s=5, k=10)
    assert not any(p.video_id == "rg" and p.first.frame_idx == 10 for p in reverse)  # nothing follows green
    assert all(p.score < 2.0 - 1e-3 for p in reverse)
    assert all(p.first.video_id == p.then.video_id for p in shots_searcher.search_temporal("red", "black", within_s=5, k=10))
    with pytest.raises(InputError, match="within"):
        shots_searcher.search_temporal("red", "green", within_s=0)


def _hit(video, frame, t, score):
    return Hit(score, video, frame, t, f"/v/{video}.mp4", frame)


def test_pair_events_ranks_by_combined_score_within_the_window():
    a = [_hit("v1", 0, 0.0, 0.9), _hit("v2", 0, 10.0, 0.8), _hit("v1", 50, 50.0, 0.3), _hit("img", 1, math.nan, 1.0)]
    b = [_hit("v1", 25, 25.0, 0.5), _hit("v1", 40, 40.0, 0.7), _hit("v2", 5, 5.0, 0.9), _hit("v2", 12, 12.0, 0.2)]
    pairs = pair_events(a, b, within_s=30)
    assert [(p.video_id, p.first.frame_idx, p.then.frame_idx) for p in pairs] == [("v1", 0, 25), ("v2", 0, 12)]
    assert [p.score for p in pairs] == pytest.approx([1.4, 1.0])


def test_formats_table_json_and_submission_csv(tmp_path):
    assert format_timestamp(3661.5) == "01:01:01.500"
    assert format_timestamp(0.04) == "00:00:00.040"
    assert format_timestamp(math.nan) == "-"
    hits = [_hit(f"L01_V{i % 3:03d}", i * 25, i * 1.0, 1 - i / 200) for i in range(150)]
    table = hits_table(hits[:3])
    assert table.splitlines()[0].split() == ["score", "video_id", "frame_idx", "timestamp", "path"]
    assert "00:00:02.000" in table.splitlines()[4]
    data = json.loads(hits_json([_hit("x", 3, math.nan, 0.5)]))
    assert data[0]["pts_time"] is None and data[0]["frame_idx"] == 3
    assert write_submission_csv(tmp_path / "sub.csv", hits) == 100
    rows = list(csv.reader(open(tmp_path / "sub.csv")))
    assert len(rows) == 100 and rows[0] == ["L01_V000", "0"] and rows[1] == ["L01_V001", "25"]
    pair = TemporalHit(1.5, hits[0], hits[3])
    write_submission_csv(tmp_path / "t.csv", [pair])
    assert (tmp_path / "t.csv").read_text() == "L01_V000,0,75\n"
    assert json.loads(hits_json([pair]))[0]["then"]["frame_idx"] == 75
    assert "then_frame" in hits_table([pair])


# ---------------------------------------------------------------------------- --translate (retrieval/translate.py)
DICTIONARY = {"một người đạp xe": "a man riding a bike", "con chó": "a dog"}


def vi_to_en(text: str) -> str:  # the py: entry point the tests name (tests/ is on sys.path under pytest)
    return DICTIONARY[text]


def _script(tmp_path: Path, body: str) -> str:
    script = tmp_path / f"tr{len(list(tmp_path.glob('tr*.py')))}.py"
    script.write_text("import sys\n" + body, encoding="utf-8")
    import shlex
    import sys as _sys

    return f"{shlex.quote(_sys.executable)} {shlex.quote(str(script))}"


def test_translate_turns_the_description_into_the_towers_language(searcher, sample_index, encoder, tmp_path):  # noqa: F811
    from mergeseek.retrieval.translate import get_translator

    cmd = _script(tmp_path, "d = {'một người đạp xe': 'a man riding a bike'}\n"
                            "sys.stdout.write(d[sys.stdin.read().strip()])\n")
    want = encoder.encode_texts(["a man riding a bike"])
    for spec in (cmd, "cmd:" + cmd, "py:test_retrieval_search:vi_to_en"):
        translated = Searcher(sample_index[0], encoder, translate=spec)
        assert np.array_equal(translated.text_vector("một người đạp xe"), want)
        assert [h.id for h in translated.search_text("  một người đạp xe ", k=5)] == \
            [h.id for h in searcher.search_text("a man riding a bike", k=5)]
    assert not np.array_equal(searcher.text_vector("một người đạp xe"), want)  # untranslated: another vector
    calls = []
    tr = get_translator("py:test_retrieval_search:vi_to_en")
    tr._fn = lambda t: calls.append(t) or DICTIONARY[t]
    assert tr("con chó") == tr("con chó ") == "a dog" and calls == ["con chó"]  # cached per process


def test_a_broken_translator_is_one_line_and_never_searches_untranslated(sample_index, encoder, tmp_path):  # noqa: F811
    from mergeseek.errors import ConfigError
    from mergeseek.retrieval.translate import get_translator

    for spec, words in (("no-such-translator-cmd --to en", "not found"), ("py:no_such_module_xyz:f", "cannot import"),
                        ("py:test_retrieval_search:NOPE", "has no NOPE"), ("py:test_retrieval_search", "py:package.module:function"),
                        ("cmd:'unterminated", "not a valid command line"), ("py:test_retrieval_search:DICTIONARY", "not a function")):
        with pytest.raises(ConfigError, match=words):
            get_translator(spec)
    with pytest.raises(ConfigError, match="not found"):  # before the index or a model is opened
        run_search(tmp_path / "no_index", text="con chó", translate="no-such-translator-cmd")
    cases = ((_script(tmp_path, "sys.stderr.write('model not installed\\n'); sys.exit(3)\n"), "exited with 3: model not installed"),
             (_script(tmp_path, "pass\n"), "returned nothing"),
             ("py:test_retrieval_search:vi_to_en", "KeyError"))
    for spec, words in cases:
        s = Searcher(sample_index[0], encoder, translate=spec)
        with pytest.raises(InputError, match=words):
            s.search_text("không có trong từ điển")
    slow = get_translator(_script(tmp_path, "import time; time.sleep(5)\n"), timeout_s=0.5)
    with pytest.raises(InputError, match="did not answer within 0.5 s"):
        slow("con chó")


def test_cli_search_translates_the_description_but_not_the_ocr_words(sample_index, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from mergeseek.cli import app

    cmd = _script(tmp_path, "d = {'con chó': 'a dog'}\nsys.stdout.write(d[sys.stdin.read().strip()])\n")
    index = str(sample_index[0])
    a = CliRunner().invoke(app, ["search", "con chó", "--index", index, "--translate", cmd, "--json", "-k", "5"])
    b = CliRunner().invoke(app, ["search", "a dog", "--index", index, "--json", "-k", "5"])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert [h["id"] for h in json.loads(a.stdout)] == [h["id"] for h in json.loads(b.stdout)]
    bad = CliRunner().invoke(app, ["search", "con chó", "--index", index, "--translate", "no-such-translator-cmd"])
    assert bad.exit_code != 0 and "not found" in bad.output and "Traceback" not in bad.output
