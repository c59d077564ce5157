"""N ordered events (issue #29): the dynamic programme of retrieval/events.py against a brute force
over every chain, on small random inputs; windows per gap; unsatisfiable windows give nothing."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from mergeseek.errors import InputError
from mergeseek.retrieval.events import chain_events, event_texts, gap_windows
from mergeseek.retrieval.search import Hit, best_per_video, pair_events


def _hit(video, frame, t, score):
    return Hit(score, video, frame, t, f"/v/{video}", frame)


def brute_force(per_event, windows):
    """For each timed first-event hit, the best chain by trying every combination (independent of the DP)."""
    best = {}
    for a in per_event[0]:
        if not math.isfinite(a.pts_time):
            continue
        for rest in itertools.product(*per_event[1:]):
            chain = (a, *rest)
            ok = all(h.video_id == a.video_id and math.isfinite(h.pts_time) for h in chain) and all(
                0 < chain[i + 1].pts_time - chain[i].pts_time <= windows[i] for i in range(len(chain) - 1))
            if ok:
                s = sum(h.score for h in chain)
                if id(a) not in best or s > best[id(a)][0]:
                    best[id(a)] = (s, chain)
    return best


def random_events(rng, n_events, per_event, videos=2, span=12.0, timeless=0.1):
    out = []
    for e in range(n_events):
        hits = []
        for i in range(per_event):
            t = math.nan if rng.random() < timeless else float(round(rng.uniform(0, span)))  # equal times happen
            hits.append(_hit(f"V{rng.randrange(videos)}", 1000 * e + i, t, rng.random()))
        out.append(hits)
    return out


@pytest.mark.parametrize("seed", range(40))
def test_dp_equals_brute_force_over_all_chains(seed):
    rng = random.Random(seed)
    n = rng.choice([2, 3, 4])
    events = random_events(rng, n, rng.choice([3, 5, 7]))
    windows = [float(rng.randint(1, 6)) for _ in range(n - 1)] if rng.random() < 0.5 else [float(rng.randint(1, 6))]
    within = windows if len(windows) > 1 else windows[0]
    got = chain_events(events, within)
    want = brute_force(events, gap_windows(within, n))
    assert len(got) == len(want)
    for c in got:
        s, chain = want[id(c.hits[0])]
        assert c.score == pytest.approx(s, abs=1e-9)
        # the DP's chain is valid on its own terms (equal totals may pick another chain)
        ws = gap_windows(within, n)
        assert all(h.video_id == c.video_id for h in c.hits)
        assert all(0 < c.hits[i + 1].pts_time - c.hits[i].pts_time <= ws[i] for i in range(n - 1))
        assert sum(h.score for h in c.hits) == pytest.approx(c.score, abs=1e-9)
    assert [c.score for c in got] == sorted((c.score for c in got), reverse=True)
    # per video: the best chain of each video
    per_video = {c.video_id: c.score for c in best_per_video(got)}
    bf = {}
    for s, chain in want.values():
        bf[chain[0].video_id] = max(bf.get(chain[0].video_id, -1), s)
    assert per_video == pytest.approx(bf)


def test_a_hand_made_three_event_chain_and_each_gap_in_its_own_window():
    a = [_hit("v", 0, 0.0, 0.9), _hit("v", 1, 50.0, 0.1)]
    b = [_hit("v", 10, 5.0, 0.2), _hit("v", 11, 20.0, 0.9), _hit("v", 12, 55.0, 0.5)]
    c = [_hit("v", 20, 25.0, 0.8), _hit("v", 21, 60.0, 0.3), _hit("v", 22, 4.0, 1.0)]
    got = chain_events([a, b, c], [30, 10])
    # from t=0: b at 20 (0.9) then c at 25 (0.8) = 2.6; b at 5 cannot reach c at 25 (gap 20 > 10)
    # from t=50: b at 55 then c at 60 = 0.9; c at 4 is earlier than everything it could follow
    assert [(c_.frames, round(c_.score, 6)) for c_ in got] == [((0, 11, 20), 2.6), ((1, 12, 21), 0.9)]
    assert chain_events([a, b, c], [19, 10]) == [got[1]]  # 0 -> 20 is a gap of 20, past the first window
    assert chain_events([a, b, c], [30, 4.9]) == []  # both second gaps are 5 s
    assert chain_events([a, b, c], 0.5) == []  # nothing satisfies the window: empty, not an error


def test_two_events_keep_the_old_pairing_and_its_order():
    a = [_hit("v1", 0, 0.0, 0.9), _hit("v2", 0, 10.0, 0.8), _hit("v1", 50, 50.0, 0.3), _hit("img", 1, math.nan, 1.0)]
    b = [_hit("v1", 25, 25.0, 0.5), _hit("v1", 40, 40.0, 0.7), _hit("v2", 5, 5.0, 0.9), _hit("v2", 12, 12.0, 0.2)]
    pairs = pair_events(a, b, within_s=30)
    assert [(p.video_id, p.first.frame_idx, p.then.frame_idx) for p in pairs] == [("v1", 0, 25), ("v2", 0, 12)]
    # equal totals keep the first event's rank order (stable), as the pairing did
    tie = pair_events([_hit("x", 0, 0.0, 0.5), _hit("y", 0, 0.0, 0.5)], [_hit("y", 1, 1.0, 0.5), _hit("x", 1, 1.0, 0.5)], 5)
    assert [p.video_id for p in tie] == ["x", "y"]


def test_windows_and_events_are_checked_in_one_line():
    assert gap_windows(30, 4) == (30.0, 30.0, 30.0)
    assert gap_windows([5, 6], 3) == (5.0, 6.0)
    for bad, match in [([5, 6], "2 --within values for 4 events"), (0, "--within 0"), (math.nan, "nan"),
                       ([5, -1, 3], "--within -1")]:
        with pytest.raises(InputError, match=match):
            gap_windows(bad, 4)
    with pytest.raises(InputError, match="event 2 is empty"):
        event_texts("a", ["  "])
    assert event_texts(" a ", ["b", "c"]) == ["a", "b", "c"]


def test_many_candidates_in_one_video_give_valid_chains():
    """20k candidates per event in one video (the brute force would try 20k^3 chains): every chain
    returned is in order and inside its windows, and one starts at each first frame that has one."""
    rng = random.Random(1)
    events = [[_hit("v", e * 100_000 + i, rng.uniform(0, 3600), rng.random()) for i in range(20_000)] for e in range(3)]
    got = chain_events(events, 5.0)
    assert len({c.hits[0].frame_idx for c in got}) == len(got) > 10_000
    assert all(0 < c.hits[i + 1].pts_time - c.hits[i].pts_time <= 5 for c in got for i in range(2))
