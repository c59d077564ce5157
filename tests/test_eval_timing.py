"""Timing protocol: alternation, statistics, FLOP model, weight-sharing copies."""

from __future__ import annotations

import math

import pytest

from mergeseek.errors import ConfigError
from mergeseek.eval.timing import block_macs, encoder_macs, flop_ratio, percentile, time_alternating


def test_candidates_alternate_batch_by_batch_with_rotation():
    calls = []
    cands = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    res = time_alternating(cands, batch_size=4, warmup=1, iters=3)
    # warm-up once each, then rounds rotated so no candidate is always first
    assert calls[:3] == ["a", "b", "c"]
    assert calls[3:12] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert calls[12:] == ["a", "b", "c"]  # the separate memory pass, one batch each
    assert list(res) == ["a", "b", "c"]
    for r in res.values():
        assert r.batches == 3 and r.batch_size == 4 and len(r.times_ms) == 3
        assert r.p50_ms <= r.p95_ms + 1e-12
        assert math.isclose(r.ms_per_image, r.p50_ms / 4)
        assert math.isclose(r.images_per_s, 4 / (r.p50_ms / 1000))


def test_slower_candidate_is_measured_slower_and_memory_is_seen():
    import time

    def slow():
        time.sleep(0.02)

    def hungry():
        buf = bytearray(64 * 1024 * 1024)
        buf[::4096] = b"\x01" * len(buf[::4096])  # touch pages so they count in RSS
        return len(buf)

    res = time_alternating({"slow": slow, "hungry": hungry}, batch_size=2, warmup=0, iters=3)
    assert res["slow"].p50_ms >= 20.0
    assert res["slow"].images_per_s < 2 / 0.02 + 1e-9
    assert res["hungry"].peak_mem_mb > 0
    if res["hungry"].mem_kind == "rss_hwm":  # resettable peak: the 64 MB buffer is attributed to it
        assert res["hungry"].act_mem_mb >= 48
        assert res["slow"].act_mem_mb < res["hungry"].act_mem_mb


def test_bad_arguments_raise_config_error():
    with pytest.raises(ConfigError):
        time_alternating({}, batch_size=1)
    with pytest.raises(ConfigError):
        time_alternating({"a": lambda: None}, batch_size=0)


def test_percentile_known_values():
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([1, 2, 3, 4, 5], 95) == pytest.approx(4.8)
    assert percentile([7.0], 95) == 7.0
    assert math.isnan(percentile([], 50))


def test_block_macs_hand_computed():
    # N=10, d=4, mlp 4: attn 4*10*16 + 2*100*4 = 640 + 800; mlp 8*10*16 = 1280
    assert block_macs(10, 10, 4, 4.0) == 640 + 800 + 1280
    # merge between attention and MLP: MLP sees the reduced count
    assert block_macs(10, 6, 4, 4.0) == 640 + 800 + 8 * 6 * 16


def test_flop_ratio_is_one_without_merging_and_matches_hand_count():
    base = [50] * 12
    assert flop_ratio(base, base, dim=768) == 1.0
    merged = [40, 30]
    d = 8
    expect_base = encoder_macs([50, 50], d, num_tokens=50)
    manual = block_macs(50, 40, d) + block_macs(40, 30, d)
    assert encoder_macs(merged, d, num_tokens=50) == manual
    assert flop_ratio(merged, [50, 50], dim=d) == pytest.approx(expect_base / manual)
    assert flop_ratio(merged, [50, 50], dim=d) > 1.0
    with pytest.raises(ConfigError):
        flop_ratio([1, 2], [3], dim=4)


def test_shared_copy_shares_weights_but_not_modules():
    import torch

    from mergeseek.eval.candidates import shared_copy

    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    c = shared_copy(m)
    assert c is not m and c[0] is not m[0]
    assert c[0].weight is m[0].weight
    assert c[1].running_mean is m[1].running_mean

    class Swapped(torch.nn.Linear):
        pass

    c[0].__class__ = Swapped  # what the merge patch does to a copy
    assert type(m[0]) is torch.nn.Linear


def test_cpu_clock_counts_only_own_work():
    import time

    def sleeper():
        time.sleep(0.02)  # waits, does no work

    def busy():
        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.01:
            pass

    res = time_alternating({"sleep": sleeper, "busy": busy}, batch_size=1, warmup=0, iters=3, clock="cpu")
    assert res["sleep"].clock == "cpu" and res["sleep"].p50_ms < 5.0
    assert res["busy"].p50_ms >= 10.0
    with pytest.raises(ConfigError):
        time_alternating({"a": lambda: None}, batch_size=1, clock="cpu", device="cuda")
    with pytest.raises(ConfigError):
        time_alternating({"a": lambda: None}, batch_size=1, clock="gpu")
