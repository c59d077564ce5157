"""`cli.py submit`: query files in, byte-exact KIS / QA / TRAKE files out; the N-event TRAKE chain."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from test_aic_support import FRAMES, make_release
from typer.testing import CliRunner

from mergeseek.errors import InputError
from mergeseek.retrieval.search import Hit, pair_events
from mergeseek.retrieval.submission import (
    read_queries,
    render,
    run_submit,
    submission_rows,
    write_rows,
)
from mergeseek.retrieval.events import EventChain, chain_events


def _hit(vid, frame, t, score):
    return Hit(score, vid, frame, t, f"{vid}/{frame}.jpg")


# ---------------------------------------------------------------------------- the writer
def test_rows_are_distinct_capped_at_100_and_written_exactly(tmp_path):
    hits = [_hit("L21_V001", 137, 5.48, 0.9), _hit("L21_V001", 137, 5.48, 0.8), _hit("L21_V002", 12, 0.4, 0.7)]
    hits += [_hit("L22_V001", f, f / 25, 0.5) for f in range(200)]
    path = tmp_path / "q1.csv"
    assert write_rows(path, submission_rows(hits, "kis")) == 100
    text = path.read_bytes().decode()
    lines = text.split("\n")
    assert lines[:3] == ["L21_V001,137", "L21_V002,12", "L22_V001,0"] and lines[-1] == "" and len(lines) == 101
    assert render(submission_rows(hits[:3], "qa", answer="màu xanh, đỏ")) == (
        'L21_V001,137,"màu xanh, đỏ"\nL21_V002,12,"màu xanh, đỏ"\n')
    chain = EventChain(2.0, (_hit("V", 10, 1.0, 1.0), _hit("V", 30, 2.0, 0.5), _hit("V", 75, 3.0, 0.5)))
    assert render(submission_rows([chain, chain], "trake")) == "V,10,30,75\n"
    assert not (tmp_path / "q1.csv.tmp").exists()


def test_query_files_in_all_three_forms(tmp_path):
    tsv = tmp_path / "q.tsv"
    tsv.write_text("# id\ttype\ttext\nq1\tkis\ta red car\n\nq2\tQA\twhat colour is the car?\n"
                   "q3\ttrake\ta man opens a door | he sits down | he drinks\n", encoding="utf-8")
    jl = tmp_path / "q.jsonl"
    jl.write_text("\n".join(json.dumps(d) for d in [
        {"query_id": "q1", "task": "kis", "query": "a red car"},
        {"id": "q2", "type": "vqa", "text": "what colour is the car?"},
        {"query_id": "q3", "task": "trake", "events": ["a man opens a door", "he sits down", "he drinks"]}]))
    arr = tmp_path / "q.json"
    arr.write_text(json.dumps([json.loads(x) for x in jl.read_text().splitlines()]))
    want = [("q1", "kis", ("a red car",)), ("q2", "qa", ("what colour is the car?",)),
            ("q3", "trake", ("a man opens a door", "he sits down", "he drinks"))]
    for f in (tsv, jl, arr):
        assert [(q.qid, q.task, q.events) for q in read_queries(f)] == want
    for text, words in [("q1\tkis\n", "id<TAB>type<TAB>text"), ("q1\tfoo\tx\n", "not known"),
                        ("q1\tkis\ta\nq1\tkis\tb\n", "appears twice"), ("../x\tkis\ta\n", "file name")]:
        tsv.write_text(text)
        with pytest.raises(InputError, match=words):
            read_queries(tsv)


# ---------------------------------------------------------------------------- TRAKE chains
def test_two_event_chains_equal_pair_events():
    rng = random.Random(3)
    hits_a = [_hit(f"V{rng.randrange(3)}", i, rng.uniform(0, 100), rng.random()) for i in range(60)]
    hits_b = [_hit(f"V{rng.randrange(3)}", 100 + i, rng.uniform(0, 100), rng.random()) for i in range(60)]
    hits_a.append(_hit("V0", 999, math.nan, 5.0))  # no time: cannot take part
    pairs = pair_events(hits_a, hits_b, 7.5)
    chains = chain_events([hits_a, hits_b], 7.5)
    assert [(p.first.frame_idx, p.then.frame_idx) for p in pairs] == [c.frames for c in chains]
    assert [p.score for p in pairs] == pytest.approx([c.score for c in chains])


def test_n_event_chains_agree_with_brute_force():
    rng = random.Random(7)
    events = [[_hit(f"V{rng.randrange(2)}", 1000 * e + i, rng.uniform(0, 40), rng.random()) for i in range(9)]
              for e in range(3)]
    within = 15.0
    got = chain_events(events, within)
    for a in events[0]:
        best = None
        for b in events[1]:
            for c in events[2]:
                if a.video_id == b.video_id == c.video_id and a.pts_time < b.pts_time <= a.pts_time + within \
                        and b.pts_time < c.pts_time <= b.pts_time + within:  # each gap in its window (issue #29)
                    s = a.score + b.score + c.score
                    if best is None or s > best[0]:
                        best = (s, (a.frame_idx, b.frame_idx, c.frame_idx))
        mine = [ch for ch in got if ch.hits[0] is a]
        if best is None:
            assert not mine
        else:
            assert len(mine) == 1 and mine[0].frames == best[1] and mine[0].score == pytest.approx(best[0])
    assert [c.score for c in got] == sorted((c.score for c in got), reverse=True)


# ---------------------------------------------------------------------------- end to end
def test_submit_writes_the_three_formats_byte_exact(tmp_path, monkeypatch, one_torch_thread):
    """A real index of the release (random weights); queries are the index's own vectors, so the
    ranking is known: each query's top row is the keyframe whose vector it is."""
    from mergeseek.indexing.features import import_features
    from mergeseek.retrieval.search import Searcher

    rel = make_release(tmp_path / "release")
    ix = tmp_path / "ix"
    import_features([rel], ix, pretrained="none")
    searcher = Searcher(ix)
    feats = rel / "clip-features-32-aic25-b1" / "clip-features-32"
    vec = {}
    for vid in FRAMES:
        arr = np.load(feats / f"{vid}.npy").astype(np.float32)
        for n, f in enumerate(FRAMES[vid], start=1):
            vec[f"{vid}#{n}"] = (arr[n - 1] / np.linalg.norm(arr[n - 1]))[None]
    monkeypatch.setattr(searcher, "text_vector", lambda text: vec[text.strip()])
    # L21_V001: frames 0, 137, 290, 1034 at 0, 5.48, 11.6, 41.36 s
    q = tmp_path / "queries.tsv"
    q.write_text("k1\tkis\tL21_V002#2\nqa1\tqa\tL22_V001#3\nqa2\tqa\tL21_V001#1\n"
                 "t1\ttrake\tL21_V001#1 | L21_V001#2 | L21_V001#3\n", encoding="utf-8")
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({"qa1": "hai người, một chó"}))
    out = tmp_path / "sub"
    report = run_submit(q, ix, out, answers=answers, within_s=20.0, searcher=searcher)
    assert sorted(p.name for p in out.iterdir()) == ["k1.csv", "qa1.csv", "qa2.csv", "t1.csv"]
    assert [(f[0], f[1], f[2]) for f in report.files] == [("k1", "kis", 10), ("qa1", "qa", 10), ("qa2", "qa", 10),
                                                          ("t1", "trake", 2)]

    keys = list(vec)  # the expected ranking, by brute force over the feature files
    real = {k: (k.split("#")[0], FRAMES[k.split("#")[0]][int(k.split("#")[1]) - 1]) for k in keys}

    def ranked(query: str, suffix: str = "") -> str:
        sims = [float((vec[k] @ vec[query].T)[0, 0]) for k in keys]
        order = sorted(range(len(keys)), key=lambda i: -sims[i])
        return "".join(f"{real[keys[i]][0]},{real[keys[i]][1]}{suffix}\n" for i in order)

    assert (out / "k1.csv").read_bytes() == ranked("L21_V002#2").encode()
    assert (out / "k1.csv").read_bytes().startswith(b"L21_V002,400\n")  # the real frame, not n = 2
    assert (out / "qa1.csv").read_bytes() == ranked("L22_V001#3", ',"hai người, một chó"').encode("utf-8")
    assert (out / "qa2.csv").read_bytes() == ranked("L21_V001#1", ",").encode()  # answer left for the user
    # TRAKE, 3 events within 20 s: L21_V001 at 0, 5.48, 11.6 s (41.36 s is too late); L21_V002 at
    # 0.4, 13.33, 13.37 s; L22_V001 (0.2, 3.0, 119.96 s) has no 3 frames in a window
    assert (out / "t1.csv").read_bytes() == b"L21_V001,0,137,290\nL21_V002,12,400,401\n"


def test_submit_cli_checks_the_query_file_before_the_model(tmp_path, monkeypatch):
    from mergeseek import encoders
    from mergeseek.cli import app

    def no_model(**kw):
        raise AssertionError("the model must not load for a bad query file")

    monkeypatch.setattr(encoders, "Encoder", no_model)
    q = tmp_path / "q.tsv"
    q.write_text("q1\tbogus\ttext\n")
    res = CliRunner().invoke(app, ["submit", str(q), "--index", str(tmp_path / "ix"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 3 and "kis, qa (or vqa), trake" in res.stderr


def test_import_features_then_submit_through_the_cli(tmp_path, monkeypatch, one_torch_thread):
    """As a contestant: import the organisers' features, then submit a query file."""
    from test_indexing_support import build_encoder

    from mergeseek import encoders
    from mergeseek.cli import app

    calls = []
    model = build_encoder()

    def fake_encoder(**kw):
        calls.append(kw)
        return model

    monkeypatch.setattr(encoders, "Encoder", fake_encoder)
    rel = make_release(tmp_path / "release")
    run = CliRunner().invoke
    res = run(app, ["import-features", str(rel), "--index", str(tmp_path / "ix"), "--pretrained", "none", "--json"])
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    assert sorted(rep["indexed"]) == sorted(FRAMES) and rep["vectors_total"] == sum(map(len, FRAMES.values()))
    assert calls == []  # nothing was encoded
    q = tmp_path / "q.jsonl"
    q.write_text("\n".join(json.dumps(d) for d in [
        {"query_id": "a1", "task": "kis", "query": "a news anchor"},
        {"query_id": "a2", "task": "vqa", "query": "how many people?"},
        {"query_id": "a3", "task": "trake", "events": ["a door", "a chair"]}]))
    (tmp_path / "ans.tsv").write_text("a2\tba\n")
    res = run(app, ["submit", str(q), "--index", str(tmp_path / "ix"), "--out", str(tmp_path / "sub"),
                    "--answers", str(tmp_path / "ans.tsv"), "--within", "30"])
    assert res.exit_code == 0, res.stderr
    assert (calls[-1]["model_name"], calls[-1]["pretrained"]) == ("ViT-B-32", "none")  # from the index
    real = {(v, str(f)) for v in FRAMES for f in FRAMES[v]}
    a1 = [tuple(r.split(",")) for r in (tmp_path / "sub" / "a1.csv").read_text().splitlines()]
    assert len(a1) == len(real) and set(a1) == real
    a2 = (tmp_path / "sub" / "a2.csv").read_text().splitlines()
    assert len(a2) == len(real) and all(r.endswith(",ba") and tuple(r.split(",")[:2]) in real for r in a2)
    for r in (tmp_path / "sub" / "a3.csv").read_text().splitlines():
        vid, f1, f2 = r.split(",")
        assert (vid, f1) in real and (vid, f2) in real and int(f1) < int(f2)
    assert "wrote 3 submission file(s)" in res.stdout


def test_frames_without_a_map_are_left_out_of_submissions(tmp_path, monkeypatch):
    from mergeseek.indexing.features import import_features
    from mergeseek.retrieval.search import Searcher

    rel = make_release(tmp_path / "release")
    (rel / "map-keyframes-aic25-b1" / "map-keyframes" / "L21_V002.csv").unlink()
    report = import_features([rel], tmp_path / "ix", pretrained="none")
    assert report.unmapped == ["L21_V002"]
    searcher = Searcher(tmp_path / "ix")
    v = np.load(rel / "clip-features-32-aic25-b1/clip-features-32/L21_V002.npy").astype(np.float32)[:1]
    monkeypatch.setattr(searcher, "text_vector", lambda text: v / np.linalg.norm(v))
    q = tmp_path / "q.tsv"
    q.write_text("k\tkis\tanything\n")
    rep = run_submit(q, None, tmp_path / "out", searcher=searcher)
    rows = (tmp_path / "out" / "k.csv").read_text().splitlines()
    assert rep.unmapped == {"L21_V002"} and len(rows) == 7 and not any(r.startswith("L21_V002,") for r in rows)
    assert any("WARNING: left out the frames of 1 video" in line for line in rep.summary_lines())
    rep = run_submit(q, None, tmp_path / "out2", searcher=searcher, allow_unmapped=True)
    rows = (tmp_path / "out2" / "k.csv").read_text().splitlines()
    assert rows[0] == "L21_V002,1" and len(rows) == 10  # keyframe numbers: what --allow-unmapped accepts


def test_kis_searches_deeper_until_it_has_100_usable_rows(tmp_path):
    """The first 300 hits are frames without a map or repeats: the file still gets 100 real rows."""
    from mergeseek.retrieval.submission import SubmitReport, _frame_rows

    ranking = [_hit("U", i, math.nan, 1.0) for i in range(150)]  # indexed without a map
    ranking += [_hit("V", 7, 0.28, 0.9)] * 150  # one frame indexed many times
    ranking += [_hit("W", i, i / 25, 0.5) for i in range(500)]

    class Ranked:  # the Searcher interface run_submit uses, over a fixed ranking
        size = len(ranking)

        def __init__(self):
            self.asked = []

        def search_vector(self, vector, k):
            self.asked.append(k)
            return ranking[:k]

    report, engine = SubmitReport(str(tmp_path)), Ranked()
    rows = _frame_rows(engine, None, "kis", "", False, report)
    assert rows == [("V", 7)] + [("W", i) for i in range(99)]
    assert engine.asked == [200, 800] and report.unmapped == {"U"}


# ---------------------------------------------------------------------------- bad inputs (issue #23)
@pytest.mark.parametrize("row,needle", [
    ({"query_id": "a", "task": "trake", "events": "abc"}, "events must be a list of texts, not str"),
    ({"query_id": "a", "task": "trake", "events": {"x": 1}}, "not dict"),
    ({"query_id": "a", "task": "trake", "events": ["ok", {"x": 1}]}, "an event must be a string"),
    ({"query_id": ["a"], "task": "kis", "query": "x"}, "query_id must be a string, not list"),
    ({"query_id": True, "task": "kis", "query": "x"}, "query_id must be a string, not bool"),
    ({"query_id": "a", "task": "kis", "query": "x" * 5000}, "at most 4000"),
    ({"query_id": "a", "task": {"k": 1}, "query": "x"}, "task must be a string"),
    ({"query_id": "a", "task": "qa", "query": "x", "answer": [1]}, "answer must be a string"),
    ({"query_id": "../a", "task": "kis", "query": "x"}, "cannot be a file name"),
    ({"query_id": "/etc/passwd", "task": "kis", "query": "x"}, "cannot be a file name"),
])
def test_bad_query_rows_are_one_line_naming_the_row(tmp_path, row, needle):
    import json

    from mergeseek.retrieval.submission import read_queries

    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"query_id": "ok", "task": "kis", "query": "a dog"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(InputError) as err:
        read_queries(path)
    msg = str(err.value)
    assert needle in msg and f"{path}:2" in msg and len(msg.splitlines()) == 1 and len(msg) < 400


def test_bad_query_and_answer_files_are_one_line(tmp_path):
    from mergeseek.retrieval.submission import read_answers, read_queries

    q = tmp_path / "q.txt"
    q.write_bytes(b"q1\tkis\ta caf\xe9 in latin-1\n")
    with pytest.raises(InputError, match="not UTF-8"):
        read_queries(q)
    a = tmp_path / "a.json"
    for text, needle in (('{"q1": {"a": 1}}', "must be a string, not dict"), ('{"q1": ' + '"x' * 1, "not valid JSON")):
        a.write_text(text)
        with pytest.raises(InputError, match=needle):
            read_answers(a)


def test_an_out_that_is_a_file_or_cannot_be_made_is_one_line_before_the_index_opens(tmp_path):
    from mergeseek.errors import WriteError
    from mergeseek.retrieval.submission import run_submit

    q = tmp_path / "q.txt"
    q.write_text("q1\tkis\ta dog\n")
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    with pytest.raises(InputError, match="is a file, not a folder"):
        run_submit(q, tmp_path / "no_index", afile)
    assert afile.read_text() == "mine"
    with pytest.raises(WriteError) as err:
        run_submit(q, tmp_path / "no_index", afile / "sub")  # a folder under a file cannot exist
    assert err.value.exit_code == 8 and len(str(err.value).splitlines()) == 1
