"""Metrics on hand-made cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mergeseek.errors import InputError
from mergeseek.eval.metrics import (
    cosine_agreement,
    first_relevant_rank,
    group_max,
    mean_reciprocal_rank,
    ranking,
    recall_at_k,
    retrieval_metrics,
    topk_accuracy,
    topk_overlap,
)


def test_target_at_position_three():
    # one query over 6 items; item 4 is the target and has the 3rd best score
    scores = np.array([[0.9, 0.1, 0.8, 0.0, 0.7, 0.2]])
    order = ranking(scores)
    assert order[0].tolist() == [0, 2, 4, 5, 1, 3]
    ranks = first_relevant_rank(order, [{4}])
    assert ranks.tolist() == [3]
    m = retrieval_metrics(ranks, ks=(1, 5, 10))
    assert m["R@1"] == 0.0 and m["R@5"] == 1.0 and m["R@10"] == 1.0
    assert m["MRR"] == pytest.approx(1 / 3)


def test_several_queries_and_acceptable_sets():
    order = np.array([[3, 1, 2, 0], [0, 1, 2, 3], [2, 3, 0, 1]])
    # q0 accepts {1, 0}: first hit at position 2; q1 accepts 3: position 4; q2 accepts 9: never
    ranks = first_relevant_rank(order, [{1, 0}, {3}, {9}])
    assert ranks[:2].tolist() == [2, 4] and math.isinf(ranks[2])
    assert recall_at_k(ranks, (1, 2, 4)) == {1: 0.0, 2: pytest.approx(1 / 3), 4: pytest.approx(2 / 3)}
    assert mean_reciprocal_rank(ranks) == pytest.approx((1 / 2 + 1 / 4 + 0) / 3)


def test_ties_are_broken_by_item_order():
    order = ranking(np.array([[0.5, 0.5, 0.5]]))
    assert order[0].tolist() == [0, 1, 2]


def test_ranking_rows_must_match_queries():
    with pytest.raises(InputError):
        first_relevant_rank(np.zeros((2, 3), dtype=int), [{0}])


def test_video_level_by_best_frame():
    # frames: v1 f0, v1 f1, v2 f0, v3 f0
    scores = np.array([[0.1, 0.6, 0.9, 0.3]])
    vs, names = group_max(scores, ["v1", "v1", "v2", "v3"])
    assert names == ["v1", "v2", "v3"]
    assert vs.tolist() == [[0.6, 0.9, 0.3]]
    # the target video v1 is 2nd at video level though its best frame is 2nd of 4 too
    ranks = first_relevant_rank(ranking(vs), [{0}])
    assert ranks.tolist() == [2]


def test_topk_accuracy_known_answers():
    logits = np.array(
        [
            [0.1, 0.7, 0.2],  # label 1: top1 hit
            [0.5, 0.3, 0.2],  # label 2: last -> miss at top1 and top2
            [0.2, 0.5, 0.3],  # label 2: second -> top2 hit
            [0.9, 0.0, 0.1],  # label 0: hit
        ]
    )
    labels = np.array([1, 2, 2, 0])
    acc = topk_accuracy(logits, labels, ks=(1, 2, 3))
    assert acc == {"top1": 0.5, "top2": 0.75, "top3": 1.0}
    with pytest.raises(InputError):
        topk_accuracy(logits, labels[:2])


def test_cosine_agreement_and_overlap():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[1.0, 0.0], [2.0, 0.0]])
    c = cosine_agreement(a, b)
    assert c["cos_mean"] == pytest.approx(0.5) and c["cos_min"] == pytest.approx(0.0)
    assert cosine_agreement(a, a)["cos_mean"] == pytest.approx(1.0)
    oa = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    ob = np.array([[1, 0, 5, 6], [7, 8, 9, 3]])
    # k=2: {0,1} vs {1,0} -> 1; {0,1} vs {7,8} -> 0
    assert topk_overlap(oa, ob, 2) == pytest.approx(0.5)
    # k=4: 2/4 and 1/4
    assert topk_overlap(oa, ob, 4) == pytest.approx(0.375)
    with pytest.raises(InputError):
        cosine_agreement(a, b[:1])


@pytest.mark.parametrize("a, b, want", [
    ("", "", 0), ("abc", "abc", 0), ("", "abc", 3), ("abc", "", 3),
    ("kitten", "sitting", 3),  # two substitutions and an insertion
    ("Hà Nội", "Ha Noi", 2), ("flaw", "lawn", 2),
    (["the", "anchor", "says"], ["the", "anchors", "says", "it"], 2),  # words: a substitution and an insertion
])
def test_edit_distance_against_hand_counts_and_is_symmetric(a, b, want):
    from mergeseek.eval.metrics import edit_distance

    assert edit_distance(a, b) == want == edit_distance(b, a)
