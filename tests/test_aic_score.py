"""The HCMC AI Challenge score on hand-made rankings: the worked examples, QA answers, TRAKE events."""

from __future__ import annotations

import pytest

from errors import InputError
from eval.aic_score import KS, Span, Truth, normalize_answer, query_score, rank_score, row_score, score_by_task

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
