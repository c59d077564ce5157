"""The HCMC AI Challenge score on hand-made rankings: the worked examples, QA answers, TRAKE events."""

from __future__ import annotations

import json

import pytest

from mergeseek.errors import InputError
from mergeseek.eval.aic_score import (
    KS,
    Span,
    Truth,
    normalize_answer,
    query_score,
    rank_score,
    row_score,
    score_by_task,
)

KIS = Truth("kis", (Span("L21_V001", 100, 120),))
MISS = ("L21_V002", 110)
HIT = ("L21_V001", 110)


def _ranking(hit_rank, total=100):
    rows = [MISS] * total
    if hit_rank is not None:
        rows[hit_rank - 1] = HIT
    return rows


@pytest.mark.parametrize("rank,want", [(1, 1.0), (2, 0.8), (5, 0.8), (6, 0.6), (20, 0.6), (21, 0.4), (50, 0.4),
                                       (51, 0.2), (100, 0.2), (None, 0.0)])
def test_worked_examples(rank, want):
    assert query_score(_ranking(rank), KIS) == pytest.approx(want)
    assert rank_score(rank) == pytest.approx(want)


def test_rows_past_100_are_ignored_and_later_hits_add_nothing():
    assert query_score(_ranking(None, 100) + [HIT], KIS) == 0.0
    assert query_score([HIT] + [HIT] * 99, KIS) == 1.0
    assert query_score([MISS, HIT, HIT], KIS) == pytest.approx(0.8)
    assert query_score([], KIS) == 0.0


def test_kis_range_is_inclusive_and_the_video_must_match():
    assert row_score(("L21_V001", 100), KIS) == 1.0 and row_score(("L21_V001", 120), KIS) == 1.0
    assert row_score(("L21_V001", 99), KIS) == 0.0 and row_score(("L21_V001", 121), KIS) == 0.0
    assert row_score(("L21_V002", 110), KIS) == 0.0
    assert row_score(("L21_V001", "110"), KIS) == 1.0  # rows read back from a CSV are strings
    assert row_score(("L21_V001", "x"), KIS) == 0.0 and row_score(("L21_V001",), KIS) == 0.0


def test_qa_needs_the_normalised_answer():
    qa = Truth("qa", (Span("L21_V001", 100, 120),), answer="Màu xanh")
    assert row_score(("L21_V001", 105, "  màu XANH. "), qa) == 1.0
    assert row_score(("L21_V001", 105, "mau xanh"), qa) == 0.0  # accents carry meaning
    assert row_score(("L21_V001", 105, ""), qa) == 0.0
    assert row_score(("L21_V009", 105, "màu xanh"), qa) == 0.0
    assert query_score([("L21_V001", 105, "đỏ"), ("L21_V001", 105, "Màu xanh")], qa) == pytest.approx(0.8)
    assert normalize_answer("  Hai   người!") == "hai người"


def test_trake_scores_the_fraction_of_events_hit():
    tr = Truth("trake", (Span("V", 10, 20), Span("V", 50, 60), Span("V", 90, 95)))
    assert row_score(("V", 15, 55, 93), tr) == 1.0
    assert row_score(("V", 15, 70, 93), tr) == pytest.approx(2 / 3)
    assert row_score(("V", 0, 0, 0), tr) == 0.0
    assert row_score(("W", 15, 55, 93), tr) == 0.0
    assert row_score(("V", 15, 62, 93), tr, tolerance=2) == 1.0  # widened by the tolerance
    assert row_score(("V", 15), tr) == pytest.approx(1 / 3)  # missing frames count as missed events
    # best-so-far over k: 1/3 at rank 1, full at rank 6 -> (1/3 + 1/3 + 1 + 1 + 1) / 5
    rows = [("V", 15, 0, 0)] + [("W", 0, 0, 0)] * 4 + [("V", 15, 55, 93)]
    assert query_score(rows, tr) == pytest.approx((1 / 3 + 1 / 3 + 3) / 5)


def test_per_task_means_and_bad_truth():
    s = score_by_task({"a": 1.0, "b": 0.2, "c": 0.6}, {"a": "kis", "b": "kis", "c": "trake"})
    assert s == pytest.approx({"score": 0.6, "score_kis": 0.6, "score_trake": 0.6})
    assert KS == (1, 5, 20, 50, 100)
    with pytest.raises(InputError):
        Span("V", 5, 4)
    with pytest.raises(InputError):
        Truth("qa", (Span("V", 1, 2),))
    with pytest.raises(InputError):
        Truth("kis", (Span("V", 1, 2), Span("V", 3, 4)))


# ---------------------------------------------------------------------------- wired into eval
def test_eval_reports_the_official_score_per_task_on_a_release(tmp_path):
    """A keyframe set in the release layout, queries of the three types; the text 'vectors' are
    gallery vectors, so every ranking is known and the score is recomputed by brute force."""
    import json
    import shutil

    import numpy as np
    from test_aic_support import FRAMES, make_release, pts

    from mergeseek.eval.datasets import load_dataset
    from mergeseek.eval.runner import _retrieval

    rel = make_release(tmp_path / "release")
    with pytest.raises(InputError, match="L22_V002.csv does not exist"):  # a keyframe folder without its map
        load_dataset(f"keyframes:{rel},queries={tmp_path / 'none.jsonl'}")
    shutil.rmtree(rel / "Keyframes_L22" / "keyframes" / "L22_V002")
    queries = [
        {"id": "k1", "task": "kis", "query": "L21_V001#2", "video_id": "L21_V001", "frame_start": 130, "frame_end": 140},
        {"id": "k2", "task": "kis", "query": "L21_V002#1", "video_id": "L21_V002", "frame_start": 395, "frame_end": 405},
        {"id": "q1", "task": "qa", "query": "L22_V001#3", "video_id": "L22_V001", "frame_idx": 2999, "answer": "ba"},
        {"id": "t1", "task": "trake", "video_id": "L21_V001", "within": 20,
         "events": [{"text": "L21_V001#1", "frame_start": 0, "frame_end": 0},
                    {"text": "L21_V001#2", "frame_start": 130, "frame_end": 140},
                    {"text": "L21_V001#3", "frame_start": 500, "frame_end": 600}]},
    ]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(q) for q in queries))
    ds = load_dataset(f"keyframes:{rel},queries={tmp_path / 'q.jsonl'}")
    assert [x.aic.truth.task for x in ds.queries] == ["kis", "kis", "qa", "trake"]
    assert list(ds.frame_idx) == [f for v in sorted(FRAMES) for f in FRAMES[v]]
    assert list(ds.pts_time) == [pts(v, n) for v in sorted(FRAMES) for n in range(1, len(FRAMES[v]) + 1)]

    feats = rel / "clip-features-32-aic25-b1" / "clip-features-32"
    gallery = np.concatenate([np.load(feats / f"{v}.npy").astype(np.float32) for v in sorted(FRAMES)])
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    keys = [f"{v}#{n}" for v in sorted(FRAMES) for n in range(1, len(FRAMES[v]) + 1)]

    class Texts:  # a "text tower" that returns the named gallery vector
        def encode_texts(self, texts):
            return np.stack([gallery[keys.index(t)] for t in texts])

    res = _retrieval(Texts(), ds, {"none": gallery}, topk=3)
    (row,) = res.results
    m = row.metrics

    def first_hit_rank(key, video, lo, hi):  # brute force
        sims = gallery @ gallery[keys.index(key)]
        order = sorted(range(len(keys)), key=lambda i: -sims[i])
        for r, i in enumerate(order, start=1):
            if ds.video_ids[i] == video and lo <= ds.frame_idx[i] <= hi:
                return r
        return None

    k1 = rank_score(first_hit_rank("L21_V001#2", "L21_V001", 130, 140))
    k2 = rank_score(first_hit_rank("L21_V002#1", "L21_V002", 395, 405))
    assert k1 == 1.0 and k2 < 1.0  # k2's text names frame 12, the truth is 400 or 401
    qa = 1.0  # its own frame, true answer filled in
    trake = 2 / 3  # the chain 0, 137, 290 is found first; event 3's range holds no keyframe
    assert m["AIC_kis"] == pytest.approx((k1 + k2) / 2)
    assert m["AIC_qa"] == pytest.approx(qa) and m["AIC_trake"] == pytest.approx(trake)
    assert m["AIC"] == pytest.approx((k1 + k2 + qa + trake) / 4)
    assert "R@1" in m and any("AIC = the HCMC AI Challenge score" in n for n in res.notes)
    assert any("TRAKE queries are left out of R@K" in n for n in res.notes)


def test_a_submission_folder_is_scored_against_a_truth_file(tmp_path):
    import json

    from typer.testing import CliRunner

    from mergeseek.cli import app
    from mergeseek.eval.aic_score import score_submission_dir
    from mergeseek.retrieval.submission import write_rows

    truth = tmp_path / "truth.jsonl"
    truth.write_text("\n".join(json.dumps(r) for r in [
        {"query_id": "k1", "task": "kis", "video_id": "L21_V001", "span": [500, 510]},
        {"query_id": "q1", "task": "vqa", "video_id": "L22_V002", "frame_start": 800, "frame_end": 900, "answer": "Màu xanh"},
        {"query_id": "t1", "task": "trake", "video_id": "V", "tolerance": 1,
         "events": [{"frame_start": 10, "frame_end": 20}, {"span": [50, 60]}]},
        {"query_id": "gone", "task": "kis", "video_id": "V", "frame_idx": 3},
    ]))
    sub = tmp_path / "sub"
    sub.mkdir()
    write_rows(sub / "k1.csv", [("L21_V001", 1)] * 1 + [("L21_V001", 2), ("L21_V001", 505)])  # rank 3
    write_rows(sub / "q1.csv", [("L22_V002", 850, "màu xanh.")])  # rank 1
    write_rows(sub / "t1.csv", [("V", 15, 61)])  # 61 is within the tolerance of 1
    got = score_submission_dir(sub, truth)
    assert got["queries"] == pytest.approx({"k1": 0.8, "q1": 1.0, "t1": 1.0, "gone": 0.0})
    assert got["missing"] == ["gone"]
    assert got["AIC"] == pytest.approx(2.8 / 4) and got["AIC_kis"] == pytest.approx(0.4)
    assert got["AIC_qa"] == 1.0 and got["AIC_trake"] == 1.0
    assert score_submission_dir(sub, truth, tolerance=0)["queries"]["t1"] == pytest.approx(0.5)

    res = CliRunner().invoke(app, ["score", str(sub), "--truth", str(truth), "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["AIC"] == pytest.approx(0.7)
    truth.write_text('{"query_id": "x", "task": "qa", "video_id": "V", "frame_idx": 1}\n')
    res = CliRunner().invoke(app, ["score", str(sub), "--truth", str(truth)])
    assert res.exit_code == 3 and "needs its 'answer'" in res.stderr


# ---------------------------------------------------------------------------- bad inputs (issue #23)
def test_bad_submission_files_score_zero_one_line_each_and_never_abort_the_folder(tmp_path):
    from mergeseek.eval.aic_score import score_submission_dir

    sub = tmp_path / "sub"
    sub.mkdir()
    truth = tmp_path / "truth.jsonl"
    truth.write_text("\n".join(json.dumps(r) for r in [
        {"query_id": "good", "task": "kis", "video_id": "L01_V001", "span": [90, 110]},
        {"query_id": "latin1", "task": "kis", "video_id": "L01_V001", "span": [90, 110]},
        {"query_id": "numbers", "task": "kis", "video_id": "L01_V001", "span": [90, 110]},
        {"query_id": "huge_field", "task": "kis", "video_id": "L01_V001", "span": [90, 110]},
        {"query_id": "many_rows", "task": "kis", "video_id": "L01_V001", "span": [90, 110]},
        {"query_id": "../escape", "task": "kis", "video_id": "L01_V001", "span": [90, 110]},
        {"query_id": "folder", "task": "kis", "video_id": "L01_V001", "span": [90, 110]},
    ]))
    (sub / "good.csv").write_text("L01_V001,100\n")
    (sub / "latin1.csv").write_bytes("L01_V001,100,ré\n".encode("latin-1") + b"\xff\xfe\n")
    (sub / "numbers.csv").write_text("L01_V001,nan\nL01_V001,1e400\nL01_V001,-inf\nL01_V001," + "9" * 400 + "\nL01_V001,100\n")
    (sub / "huge_field.csv").write_text("L01_V001," + "1" * 200_000 + "\n")
    (sub / "many_rows.csv").write_text("L01_V002,1\n" * 100 + "L01_V001,100\n" * 1000)  # the hit is row 101
    (tmp_path / "escape.csv").write_text("L01_V001,100\n")  # what ../escape would reach
    (sub / "folder.csv").mkdir()
    got = score_submission_dir(sub, truth)
    q = got["queries"]
    assert q["good"] == 1.0
    assert q["latin1"] == 0.0 and "not UTF-8" in got["unreadable"]["latin1"]
    # nan, inf, -inf and a 400-digit frame score 0; the hit is row 5: inside top 5, 20, 50, 100 -> 4/5
    assert q["numbers"] == pytest.approx(0.8)
    assert q["huge_field"] == 0.0 and "huge_field" in got["unreadable"]
    assert q["many_rows"] == 0.0  # only the first 100 rows count
    assert q["../escape"] == 0.0 and "cannot be a file name" in got["unreadable"]["../escape"]
    assert q["folder"] == 0.0 and "folder" in got["missing"]
    assert all(len(v.splitlines()) == 1 for v in got["unreadable"].values())


@pytest.mark.parametrize("row,needle", [
    ({"query_id": "x", "task": "kis", "video_id": "v", "span": [1e400, 5]}, "whole numbers"),
    ({"query_id": "x", "task": "kis", "video_id": "v", "span": "12"}, "whole numbers"),
    ({"query_id": "x", "task": "kis", "video_id": "v", "span": [1, 2, 3]}, "whole numbers"),
    ({"query_id": "x", "task": "kis", "video_id": "v", "span": [5, 1]}, "ends (1) before it starts (5)"),
    ({"query_id": "x", "task": "kis", "video_id": "v", "frame_start": "abc", "frame_end": 3}, "whole numbers"),
    ({"query_id": "x", "task": "kis", "video_id": "v", "frame_idx": -1}, "whole numbers"),
    ({"query_id": "x", "task": "kis", "video_id": "v", "frame_idx": 2.5}, "whole numbers"),
    ({"query_id": "x", "task": "kis", "video_id": "v", "frame_idx": True}, "whole numbers"),
    ({"query_id": "x", "task": "kis", "video_id": "v", "span": [1, 2], "tolerance": 1e400}, "tolerance"),
    ({"query_id": "x", "task": "kis", "video_id": "v", "span": [1, 2], "within": -3}, "within"),
    ({"query_id": ["a"], "task": "kis", "video_id": "v", "span": [1, 2]}, "not list"),
    ({"query_id": "x" * 500, "task": "kis", "video_id": "v", "span": [1, 2]}, "at most 200"),
    ({"query_id": "x", "task": "kis", "video_id": {"a": 1}, "span": [1, 2]}, "not dict"),
    ({"query_id": "x", "task": "trake", "video_id": "v", "events": {"a": 1}}, "a list of"),
    ({"query_id": "x", "task": "trake", "video_id": "v", "events": [{"span": [1, 2], "video_id": 5}]}, "not int"),
    ({"query_id": "x", "task": 5, "video_id": "v", "span": [1, 2]}, "not known"),
])
def test_bad_ground_truth_rows_are_one_line_naming_the_row(tmp_path, row, needle):
    from mergeseek.errors import InputError
    from mergeseek.eval.aic_score import read_truth

    path = tmp_path / "truth.jsonl"
    path.write_text(json.dumps({"query_id": "ok", "task": "kis", "video_id": "v", "span": [1, 2]}) + "\n" + json.dumps(row))
    with pytest.raises(InputError) as err:
        read_truth(path)
    msg = str(err.value)
    assert needle in msg and f"{path}:2" in msg and len(msg.splitlines()) == 1 and len(msg) < 400
