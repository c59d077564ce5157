"""Timestamps and sampling (docs/INDEXING.md), each rule pinned at its boundary (issue #23).

Expected values are hand-computed, or come from a naive loop over the rule as the doc states it
("the frame whose timestamp is nearest to t = 0, 1/fps, ... for every t before the end").
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mergeseek.errors import ConfigError
from mergeseek.indexing.decoders import _fill_missing, _finite
from mergeseek.indexing.sampling import Sampling, fps_indices, fps_indices_by_time
from mergeseek.retrieval.format import format_timestamp


def naive_by_time(ts, fps):
    """Every t = t0 + k/fps before the end (the last frame's time plus the median gap): the nearest
    frame, the earlier one on a tie."""
    ts = [float(t) for t in ts]
    gaps = sorted(b - a for a, b in zip(ts, ts[1:]))
    gap = (gaps[(len(gaps) - 1) // 2] + gaps[len(gaps) // 2]) / 2 if gaps else 0.0
    end, out, k = ts[-1] + gap, [], 0
    while ts[0] + k / fps < end - 1e-6:
        t = ts[0] + k / fps
        best = min(range(len(ts)), key=lambda i: (abs(ts[i] - t), i))
        if best not in out:
            out.append(best)
        k += 1
    return out


# ---------------------------------------------------------------------------- timestamp repair
def test_missing_and_negative_timestamps_become_index_over_rate():
    got = _fill_missing(np.array([math.nan, -0.5, 0.08, math.inf, 0.16]), 25.0)
    assert got.tolist() == pytest.approx([0.0, 0.04, 0.08, 0.12, 0.16])


def test_without_a_known_rate_missing_timestamps_stay_unknown():
    got = _fill_missing(np.array([math.nan, math.nan, 0.5]), 0.0)
    assert np.isnan(got[:2]).all() and got[2] == 0.5


@pytest.mark.parametrize("raw,rate", [(25, 25.0), ("29.97", 29.97), (0, 0.0), (-25, 0.0), (math.inf, 0.0),
                                      (math.nan, 0.0), ("x", 0.0), (None, 0.0)])
def test_a_frame_rate_is_positive_and_finite_or_unknown(raw, rate):
    assert _finite(raw) == rate


# ---------------------------------------------------------------------------- printing a time
@pytest.mark.parametrize("seconds,text", [
    (0.0, "00:00:00.000"), (1.2344, "00:00:01.234"), (1.2346, "00:00:01.235"),  # rounded, not truncated
    (59.9996, "00:01:00.000"), (3599.9996, "01:00:00.000"), (3661.5, "01:01:01.500"), (90061.0, "25:01:01.000"),
    (None, "-"), (math.nan, "-"), (math.inf, "-"), (-math.inf, "-"),
])
def test_timestamps_print_as_hours_minutes_seconds_milliseconds(seconds, text):
    assert format_timestamp(seconds) == text


# ---------------------------------------------------------------------------- sampling
def test_uniform_takes_the_middle_of_k_equal_segments():
    assert Sampling("uniform", 4).indices(100, 25.0).tolist() == [12, 37, 62, 87]  # middles 12.5, 37.5, ...
    assert Sampling("uniform", 3).indices(10, 25.0).tolist() == [1, 5, 8]  # 1.67, 5, 8.33
    assert Sampling("uniform", 10).indices(7, 25.0).tolist() == list(range(7))  # more wanted than there are


def test_every_takes_frames_0_n_2n():
    assert Sampling("every", 10).indices(21, 25.0).tolist() == [0, 10, 20]
    assert Sampling("every", 10).indices(20, 25.0).tolist() == [0, 10]


@pytest.mark.parametrize("spec", ["every=0", "uniform=0", "every=0.5", "fps=0", "fps=-1"])
def test_rates_below_the_minimum_are_refused(spec):
    with pytest.raises(ConfigError):
        Sampling.parse(spec)


def test_fps_takes_the_nearest_frame_for_every_t_before_the_end():
    assert fps_indices(250, 25.0, 1.0).tolist() == list(range(0, 250, 25))  # 10 s at 1 fps: 10 frames
    assert fps_indices(300, 10.0, 0.1).tolist() == [0, 100, 200]  # 30 s at 0.1 fps: t = 0, 10, 20 (not 30)
    assert fps_indices(89, 29.97, 1.0).tolist() == [0, 30, 60]  # t = 1 s is frame 29.97: nearest 30


@pytest.mark.parametrize("n,rate,fps", [(4995, "29.97", "0.3"), (4995, "29.97", "3"), (4995, "29.97", "1.5"),
                                        (250, "25", "1"), (1001, "30000/1001", "1")])
def test_fps_counts_the_times_strictly_before_the_end_in_exact_arithmetic(n, rate, fps):
    """t = k/fps for every t < n/rate, counted with exact fractions: 4995 frames at 29.97 fps last
    exactly 166 2/3 s, so 0.3 fps gives exactly 50 times, although n / rate * fps is 50.00000000000001
    in floating point (the rule's float rounding must not add a 51st frame)."""
    from fractions import Fraction

    end, step = Fraction(n) / Fraction(rate), 1 / Fraction(fps)
    times = [k * step for k in range(int(end / step) + 2) if k * step < end]
    naive = sorted({min(max(round(t * Fraction(rate)), 0), n - 1) for t in times})
    got = Sampling.parse(f"fps={float(Fraction(fps))!r}").indices(n, float(Fraction(rate)))
    assert len(got) == len(times) and got.tolist() == naive


def test_by_time_a_tie_goes_to_the_earlier_frame():
    ts = [0.0, 0.25, 0.75, 1.0, 1.25, 1.75]  # t = 0.5 and 1.5 lie exactly between two frames
    assert fps_indices_by_time(np.array(ts), 2.0).tolist() == [0, 1, 3, 4] == naive_by_time(ts, 2.0)


def test_by_time_the_last_frame_lasts_one_frame_duration():
    ts = np.arange(250) / 25.0  # 10 s; the last frame starts at 9.96 s
    assert fps_indices_by_time(ts, 25.0).tolist() == list(range(250))
    assert fps_indices_by_time(ts, 1.0).tolist() == list(range(0, 250, 25))


def test_by_time_matches_the_naive_rule_on_a_variable_frame_rate():
    rng = np.random.default_rng(0)
    ts = np.cumsum(rng.choice([1 / 30, 1 / 15, 1 / 60], size=200))
    for fps in (0.5, 1.0, 2.0, 7.0):
        assert fps_indices_by_time(ts, fps).tolist() == naive_by_time(ts, fps), fps


def test_timestamps_out_of_order_fall_back_to_the_average_rate():
    ts = np.arange(20) / 10.0
    ts[[5, 6]] = ts[[6, 5]]  # frame 6 claims 0.5 s, frame 5 0.6 s
    assert Sampling("fps", 2.0).select(ts, 10.0).tolist() == [0, 5, 10, 15]  # 0.5 s at 10 fps is frame 5


def test_by_time_in_chunks_is_the_same_rule(monkeypatch):
    """The sample times are looked up a chunk at a time (bounded memory): chunks of 7 give what
    the naive rule gives, for rates below, at and far above the video's."""
    from mergeseek.indexing import sampling

    rng = np.random.default_rng(1)
    ts = np.cumsum(rng.choice([1 / 30, 1 / 15, 1 / 60], size=120))
    monkeypatch.setattr(sampling, "_TARGETS_PER_CHUNK", 7)
    for fps in (0.7, 3.0, 30.0, 240.0, 999.0):
        assert fps_indices_by_time(ts, fps).tolist() == naive_by_time(ts, fps), fps


@pytest.mark.parametrize("n, rate, fps", [(250, 25.0, 25.0), (250, 25.0, 60.0), (7, 24.0, 1000.0), (1, 30.0, 31.0)])
def test_a_rate_at_or_above_the_videos_keeps_every_frame(n, rate, fps):
    assert fps_indices(n, rate, fps).tolist() == list(range(n))
    assert fps_indices_by_time(np.arange(n) / rate, fps).tolist() == list(range(n))


def test_an_absurd_rate_is_refused_before_it_can_fill_the_memory():
    """fps=1e9 on a 1 s clip once tried to hold 1e9 sample times (the process was killed)."""
    with pytest.raises(ConfigError, match="above 1000.*every=1"):
        Sampling.parse("fps=1e9")
    assert Sampling.parse("fps=1000").value == 1000
