"""The fused C kernel of the hashed partner search: same partners as the tensor code, clean fallback."""

from __future__ import annotations

import pytest
import torch

from mergeseek.encoders.merging import lsh_native, lsh_partners, lsh_soft_matching, merge_wavg

native = pytest.mark.skipif(lsh_native.load() is None, reason=f"no fused kernel here: {lsh_native.reason()}")
SHAPES = [
    ((1, 2305, 64), {}),
    ((4, 197, 64), {}),
    ((3, 65, 16), dict(lsh_window=8, lsh_chunk=4)),
    ((2, 577, 80), dict(lsh_bits=8, lsh_tables=2)),
    ((2, 129, 32), dict(lsh_bits=1, lsh_tables=6, lsh_window=200)),  # exhaustive within buckets
    ((2, 97, 8), dict(lsh_window=7, lsh_chunk=3, protected=5)),
    ((2, 301, 24), dict(lsh_window=40, lsh_chunk=12)),  # windows of several 16-lane blocks, C % 16 != 0
]


def _agree(metric, **opts):
    """Native and tensor searches pick the same partner, or partners whose scores tie within 1e-5."""
    got_b, got_p, _ = lsh_partners(metric, backend="native", **opts)
    want_b, want_p, _ = lsh_partners(metric, backend="torch", **opts)
    assert torch.equal(torch.isfinite(got_b), torch.isfinite(want_b))
    live = torch.isfinite(want_b)
    assert live.sum() > 0
    torch.testing.assert_close(got_b[live], want_b[live], rtol=0, atol=1e-5)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    differ = live & (got_p != want_p)
    for b, a in differ.nonzero().tolist():  # only genuine near-ties may pick another partner
        s_got = float(unit[b, 2 * a] @ unit[b, 2 * int(got_p[b, a]) + 1])
        assert abs(s_got - float(want_b[b, a])) < 1e-5
    return int(differ.sum())


@native
@pytest.mark.parametrize("shape,opts", SHAPES)
def test_native_kernel_matches_tensor_code(shape, opts):
    metric = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    assert _agree(metric, **opts) <= 2


@native
def test_native_kernel_with_padding_matches_tensor_code():
    g = torch.Generator().manual_seed(11)
    metric = torch.randn(3, 301, 64, generator=g)
    size = torch.ones(3, 301, 1)
    size[1, 260:] = 0  # padding after a shortfall
    size[2, 290:] = 0
    assert _agree(metric, size=size) <= 2


@native
def test_native_batch_rows_equal_single_rows():
    g = torch.Generator().manual_seed(4)
    metric = torch.randn(4, 65, 32, generator=g)
    x = torch.randn(4, 65, 8, generator=g)
    opts = dict(lsh_bits=6, lsh_tables=2, lsh_window=8)
    y, s = merge_wavg(lsh_soft_matching(metric, 24, **opts)[0], x)
    for b in range(4):
        ya, sa = merge_wavg(lsh_soft_matching(metric[b : b + 1], 24, **opts)[0], x[b : b + 1])
        torch.testing.assert_close(y[b, : ya.shape[1]], ya[0])
        torch.testing.assert_close(s[b, : ya.shape[1]], sa[0])


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A clean kernel state and an empty cache, restored afterwards."""
    saved = dict(lsh_native._state)
    lsh_native._state.clear()
    monkeypatch.setenv("MERGESEEK_CACHE", str(tmp_path))
    yield tmp_path
    lsh_native._state.clear()
    lsh_native._state.update(saved)


def test_disabled_kernel_falls_back_to_tensor_code(fresh_native, monkeypatch):
    monkeypatch.setenv("MERGESEEK_LSH_NATIVE", "0")
    assert lsh_native.backend() == "torch" and "MERGESEEK_LSH_NATIVE" in lsh_native.reason()
    metric = torch.randn(2, 197, 64, generator=torch.Generator().manual_seed(0))
    best, partner, _ = lsh_partners(metric)
    want_b, want_p, _ = lsh_partners(metric, backend="torch")
    assert torch.equal(best, want_b) and torch.equal(partner, want_p)
    with pytest.raises(RuntimeError, match="unavailable"):
        lsh_partners(metric, backend="native")


def test_broken_compiler_falls_back_with_a_reason(fresh_native, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    assert lsh_native.load() is None
    assert lsh_native.reason()
    assert not list(fresh_native.glob("*.so"))  # nothing half-written is left in the cache
    merge = lsh_soft_matching(torch.randn(1, 65, 16), 8)
    assert int(merge.num_merged) == 8


@native
def test_portable_build_matches_tensor_code(fresh_native, monkeypatch):
    """The kernel's path without AVX-512 (other CPUs) gives the same partners as the tensor code."""
    monkeypatch.setenv("MERGESEEK_LSH_CFLAGS", "-mno-avx512f")
    if lsh_native.load() is None:
        pytest.skip(f"this compiler cannot build without AVX-512: {lsh_native.reason()}")
    assert lsh_native.variant() == "portable"
    for shape, opts in SHAPES:
        metric = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        assert _agree(metric, **opts) <= 2


@native
def test_kernel_is_built_into_the_cache_once(fresh_native):
    assert lsh_native.load() is not None
    built = list(fresh_native.glob("lsh_kernel-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    lsh_native._state.clear()
    assert lsh_native.load() is not None  # loaded from the cache, not rebuilt
    assert built[0].stat().st_mtime_ns == stamp


def test_planes_of_the_wrong_shape_are_refused_before_any_search():
    from mergeseek.encoders.merging import simhash_planes

    metric = torch.randn(1, 65, 16)
    for backend in ("auto", "torch"):
        with pytest.raises(ValueError, match="planes must be"):
            lsh_partners(metric, lsh_bits=4, lsh_tables=4, planes=simhash_planes(16, 4, 2), backend=backend)


@native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cpu_metrics_are_scored_by_the_kernel_in_float32(dtype):
    metric = torch.randn(2, 197, 64, generator=torch.Generator().manual_seed(9)).to(dtype)
    best, partner, _ = lsh_partners(metric)  # auto: the kernel, on the float32 values
    want_b, want_p, _ = lsh_partners(metric.float(), backend="native")
    assert best.dtype == torch.float32
    assert torch.equal(best, want_b) and torch.equal(partner, want_p)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as inside a bf16 encoder forward
        merge = lsh_soft_matching(metric, 32)
    assert int(merge.num_merged.min()) == 32


@native
def test_a_new_build_removes_stale_builds_only(fresh_native):
    import os
    import time

    old_build, old_tmp, recent = (fresh_native / n for n in ("lsh_kernel-0000.so", "tmpabc.so", "lsh_kernel-1111.so"))
    for f in (old_build, old_tmp, recent):
        f.write_bytes(b"x")
    month_ago = time.time() - 31 * 86400
    for f in (old_build, old_tmp):
        os.utime(f, (month_ago, month_ago))
    assert lsh_native.load() is not None
    assert not old_build.exists() and not old_tmp.exists()
    assert recent.exists()  # maybe another machine's build sharing this cache: kept
    assert len(list(fresh_native.glob("lsh_kernel-*.so"))) == 2
