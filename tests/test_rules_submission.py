"""The AI Challenge's documented rules (docs/AIC.md sections 4 and 5), each pinned at its boundary.

Issue #23: a one-line bug in a rule must fail a test. Expected values are stated independently of
the code under test: hand-computed cases, or a naive loop over the rule as the doc words it.
"""

from __future__ import annotations

import math

import pytest

from mergeseek.errors import InputError
from mergeseek.eval.aic_score import (
    Span,
    Truth,
    aic_query_from_row,
    query_score,
    rank_score,
    read_truth,
    row_score,
    score_from_row_scores,
    score_submission_dir,
)
from mergeseek.retrieval.search import Hit
from mergeseek.retrieval.submission import (
    MAX_QUERY_TEXT,
    dedup_rows,
    parse_task,
    query_file_name,
    read_queries,
    read_rows,
    run_submit,
    write_results,
)

CUTOFFS = (1, 5, 20, 50, 100)  # docs/AIC.md: "the mean over k in {1, 5, 20, 50, 100}"
KIS = Truth("kis", (Span("V", 100, 120),))
HIT, MISS = ("V", 110), ("W", 110)


def naive_single_hit_score(rank):
    """The doc's rule as a loop: for each cut-off, 1 when the hit is within the top k."""
    if rank is None:
        return 0.0
    total = 0
    for k in CUTOFFS:
        if rank <= k:
            total += 1
    return total / len(CUTOFFS)


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- the score
def test_a_single_hit_scores_by_the_five_cutoffs_at_every_rank():
    for rank in range(1, 101):
        rows = [MISS] * 100
        rows[rank - 1] = HIT
        assert (query_score(rows, KIS), rank_score(rank)) == (pytest.approx(naive_single_hit_score(rank)),) * 2, rank
    assert query_score([MISS] * 100 + [HIT], KIS) == 0.0 and rank_score(None) == 0.0


def test_rows_past_100_are_ignored_whatever_the_cutoffs():
    assert score_from_row_scores([0.0] * 100 + [1.0], ks=(1000,)) == 0.0


def test_a_range_is_inclusive_and_widened_by_the_tolerance_on_both_sides():
    trake = Truth("trake", (Span("V", 10, 20),))
    hit_frames = [f for f in range(0, 40) if row_score(("V", f), trake, tolerance=3) == 1.0]
    assert hit_frames == list(range(7, 24))  # 10 - 3 .. 20 + 3, both ends included
    kis = Truth("kis", (Span("V", 10, 20),))
    assert [f for f in range(0, 40) if row_score(("V", f), kis) == 1.0] == list(range(10, 21))


def test_each_trake_event_is_scored_by_its_own_column():
    trake = Truth("trake", (Span("V", 10, 20), Span("V", 50, 60)))
    assert row_score(("V", 15, 55, 999), trake) == 1.0  # one frame per event; extra columns ignored
    assert row_score(("V", 55, 15), trake) == 0.0  # order matters


def test_an_empty_answer_never_scores_even_against_an_answer_of_punctuation():
    qa = Truth("qa", (Span("V", 100, 120),), answer="?")  # normalises to ""
    assert row_score(("V", 110, ""), qa) == 0.0


def test_answers_are_compared_case_folded():
    qa = Truth("qa", (Span("V", 100, 120),), answer="Hai NGƯỜI")
    assert row_score(("V", 110, "hai người"), qa) == 1.0


@pytest.mark.parametrize("frame", ["1e400", "nan", "inf", "-inf", "x", ""])
def test_a_malformed_frame_scores_nothing(frame):
    assert row_score(("V", frame), KIS) == 0.0


# ---------------------------------------------------------------------------- ground truth
def test_within_defaults_to_60_seconds_and_tolerance_to_0_frames():
    a = aic_query_from_row({"task": "trake", "events": [{"video_id": "V", "span": [1, 2], "text": "a"}]}, "t:1")
    assert (a.within_s, a.tolerance) == (60.0, 0)


def test_frame_numbers_are_whole_numbers_0_to_a_billion_and_a_range_may_be_one_frame(tmp_path):
    ok = _write(tmp_path / "ok.jsonl", '{"query_id": "a", "video_id": "V", "span": [0, 1000000000]}\n'
                                       '{"query_id": "b", "video_id": "V", "span": [5, 5]}\n')
    t = read_truth(ok)
    assert [(s.start, s.end) for q in ("a", "b") for s in t[q].truth.spans] == [(0, 10**9), (5, 5)]
    for bad in ("[-1, 5]", "[0, 1000000001]", "[1.5, 3]", "[6, 5]"):
        path = _write(tmp_path / "bad.jsonl", '{"query_id": "a", "video_id": "V", "span": %s}\n' % bad)
        with pytest.raises(InputError):
            read_truth(path)


# ---------------------------------------------------------------------------- scoring a folder
def _truth_file(tmp_path, tolerance=None):
    lines = ['{"query_id": "k", "task": "kis", "video_id": "V", "span": [100, 120]}']
    tol = "" if tolerance is None else f', "tolerance": {tolerance}'
    lines.append('{"query_id": "t", "task": "trake", "video_id": "V"%s, "events": [{"span": [10, 20]}]}' % tol)
    return _write(tmp_path / "truth.jsonl", "\n".join(lines) + "\n")


def _miss_rows(n):
    return [f"W,{i}" for i in range(n)]  # distinct rows of another video


def test_the_100th_row_of_a_file_counts_and_the_101st_does_not(tmp_path):
    truth = _truth_file(tmp_path)
    sub = tmp_path / "sub"
    sub.mkdir()
    _write(sub / "k.csv", "\n".join(_miss_rows(99) + ["V,110"]) + "\n")
    assert score_submission_dir(sub, truth)["queries"]["k"] == pytest.approx(0.2)  # rank 100: k=100 only
    _write(sub / "k.csv", "\n".join(_miss_rows(100) + ["V,110"]) + "\n")
    assert score_submission_dir(sub, truth)["queries"]["k"] == 0.0


def test_blank_lines_are_not_rows_of_a_submission(tmp_path):
    truth = _truth_file(tmp_path)
    sub = tmp_path / "sub"
    sub.mkdir()
    _write(sub / "k.csv", "\n\n".join(_miss_rows(99) + ["V,110"]) + "\n\n")
    assert score_submission_dir(sub, truth)["queries"]["k"] == pytest.approx(0.2)


def test_a_submission_file_with_a_bom_scores_like_one_without(tmp_path):
    truth = _truth_file(tmp_path)
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "k.csv").write_bytes(b"\xef\xbb\xbfV,110\n")
    assert score_submission_dir(sub, truth)["queries"]["k"] == 1.0


def test_read_rows_reads_at_most_its_limit(tmp_path):
    path = _write(tmp_path / "s.csv", "\n".join(_miss_rows(150)) + "\n")
    assert len(read_rows(path, limit=100)) == 100 and len(read_rows(path)) == 150


def test_a_tolerance_given_to_the_scorer_replaces_the_truths_even_when_it_is_0(tmp_path):
    truth = _truth_file(tmp_path, tolerance=5)
    sub = tmp_path / "sub"
    sub.mkdir()
    _write(sub / "t.csv", "V,23\n")  # 3 frames past the event's end
    assert score_submission_dir(sub, truth)["queries"]["t"] == 1.0  # the truth's tolerance 5
    assert score_submission_dir(sub, truth, tolerance=0)["queries"]["t"] == 0.0


# ---------------------------------------------------------------------------- writing submissions
def test_distinct_rows_keep_the_first_occurrence_and_stop_at_100():
    rows = [("V", i % 150) for i in range(400)]
    out = dedup_rows(rows)
    assert out == [("V", i) for i in range(100)]
    assert dedup_rows([("a", 1), ("a", 1), ("b", 2), ("a", 1)]) == [("a", 1), ("b", 2)]


def test_a_written_file_holds_100_lines(tmp_path):
    hits = [Hit(1.0, "V", i, float(i), "") for i in range(150)]
    assert write_results(tmp_path / "q.csv", hits) == 100
    assert (tmp_path / "q.csv").read_text().count("\n") == 100


def test_task_names_are_case_insensitive_and_vqa_is_qa():
    assert [parse_task(t) for t in ("KIS", " Vqa ", "QA", "Trake")] == ["kis", "qa", "qa", "trake"]


@pytest.mark.parametrize("qid", ["q1", "1", "a.b-c_d", "Q..1"])
def test_plain_query_ids_name_files(qid):
    assert query_file_name(qid) == f"{qid}.csv"


@pytest.mark.parametrize("qid", ["", ".", "..", ".hidden", "-x", "_x", "q1/x", "q1/../x", "../q1", "q 1", "q1\\x"])
def test_query_ids_that_are_not_plain_file_names_are_refused(qid):
    with pytest.raises(InputError):
        query_file_name(qid)


# ---------------------------------------------------------------------------- query files
def test_query_files_skip_a_bom_comments_and_blank_lines(tmp_path):
    path = tmp_path / "q.tsv"
    path.write_bytes("\ufeff# id\ttype\ttext\n\nq1\tkis\ta red car\n  # another\tcomment\there\n"
                     '{"query_id": "q2", "task": "qa", "query": "how many?"}\n'.encode())
    assert [(q.qid, q.task, q.text) for q in read_queries(path)] == [("q1", "kis", "a red car"), ("q2", "qa", "how many?")]


def test_a_query_id_given_twice_is_refused(tmp_path):
    path = _write(tmp_path / "q.tsv", "q1\tkis\ta\nq1\tkis\tb\n")
    with pytest.raises(InputError, match="twice"):
        read_queries(path)


def test_a_query_text_may_be_4000_characters_not_4001(tmp_path):
    assert MAX_QUERY_TEXT == 4000
    ok = _write(tmp_path / "ok.tsv", "q1\tkis\t" + "a" * 4000 + "\n")
    assert len(read_queries(ok)[0].text) == 4000
    with pytest.raises(InputError, match="4001 characters"):
        read_queries(_write(tmp_path / "long.tsv", "q1\tkis\t" + "a" * 4001 + "\n"))


# ---------------------------------------------------------------------------- run_submit with a stand-in searcher
class FakeSearcher:
    """``search_vector`` returns the first ``depth`` of ``hits``; records every depth asked."""

    def __init__(self, hits):
        self.hits, self.size, self.depths = hits, len(hits), []

    def text_vector(self, text):
        return [0.0]

    def search_vector(self, vector, depth):
        self.depths.append(depth)
        assert len(self.depths) < 10, f"searched {self.depths}: the search never stops"
        return self.hits[:depth]


def _queries(tmp_path):
    return _write(tmp_path / "q.tsv", "k1\tkis\ta red car\n")


@pytest.mark.parametrize("within", [0, -1, math.nan])
def test_a_trake_window_must_be_positive(tmp_path, within):
    with pytest.raises(InputError, match="--within"):
        run_submit(_queries(tmp_path), tmp_path, tmp_path / "out", within_s=within, searcher=FakeSearcher([]))


def test_frames_without_a_time_are_left_out_by_default(tmp_path):
    hits = [Hit(0.9, "A", 10, 0.4, ""), Hit(0.8, "B", 3, math.nan, ""), Hit(0.7, "A", 20, 0.8, "")]
    report = run_submit(_queries(tmp_path), tmp_path, tmp_path / "out", searcher=FakeSearcher(hits))
    assert (tmp_path / "out" / "k1.csv").read_text() == "A,10\nA,20\n" and report.unmapped == {"B"}


def test_the_search_stops_at_the_whole_index_of_a_small_index(tmp_path):
    searcher = FakeSearcher([Hit(1.0 - i / 10, "A", i, float(i), "") for i in range(5)])
    run_submit(_queries(tmp_path), tmp_path, tmp_path / "out", searcher=searcher)
    assert searcher.depths == [5] and (tmp_path / "out" / "k1.csv").read_text().count("\n") == 5


def test_the_search_goes_deeper_until_100_distinct_rows(tmp_path):
    # every frame is found 4 times (four copies of a video's row): 200 hits hold 50 distinct rows
    hits = [Hit(1.0, "A", i // 4, float(i // 4), "") for i in range(1000)]
    searcher = FakeSearcher(hits)
    run_submit(_queries(tmp_path), tmp_path, tmp_path / "out", searcher=searcher)
    rows = (tmp_path / "out" / "k1.csv").read_text().splitlines()
    assert rows == [f"A,{i}" for i in range(100)] and searcher.depths[0] == 200 and len(searcher.depths) > 1
