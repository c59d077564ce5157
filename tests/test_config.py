"""MergeConfig parsing, round-trips, schedules and error messages."""

from __future__ import annotations

import pytest

from mergeseek.encoders import MergeConfig
from mergeseek.errors import ConfigError


@pytest.mark.parametrize(
    "spec",
    [
        "r=8",
        "r=8,method=bipartite,prop_attn=off",
        "r=[16,16,8,8,0,0,0,0,0,0,0,0]",
        "r=8,schedule=decreasing",
        "r=8,method=lsh,lsh_bits=6,lsh_tables=2,lsh_window=32,lsh_chunk=8,seed=3",
        "method=importance,keep=0.7,layers=[3,6,9]",
        "method=zerotprune,r=4,iters=10",
        "method=zerotprune,r=4,prune=on",
        "none",
    ],
)
def test_str_round_trips(spec):
    cfg = MergeConfig.parse(spec)
    assert MergeConfig.parse(str(cfg)) == cfg


def test_fields_parsed():
    cfg = MergeConfig.parse("r=8,method=lsh,prop_attn=off,lsh_bits=6")
    assert (cfg.method, cfg.r, cfg.prop_attn, cfg.lsh_bits) == ("lsh", 8, False, 6)
    assert MergeConfig.parse("r=[1,2]").r == (1, 2)
    assert not MergeConfig.parse("none").enabled and not MergeConfig.parse("").enabled


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("r=8,foo=1", "unknown merge option 'foo'.*valid keys: method, r, schedule"),
        ("method=tome", "method='tome' is not valid; choose one of: none, bipartite, lsh, importance, zerotprune"),
        ("r=eight", "r='eight' is not valid"),
        ("r=-2", "non-negative"),
        ("schedule=fast", "schedule='fast' is not valid; choose one of: constant, decreasing"),
        ("prop_attn=maybe", "prop_attn='maybe' is not valid; choose one of: on, off"),
        ("r=8,lsh_bits=0", "lsh_bits=0 is not valid"),
        ("r8", "'r8' .* is not key=value"),
        ("method=lsh,keep=0.5", "keep= applies to importance and zerotprune"),
        ("r=4,prune=on", "prune=on applies to method=zerotprune"),
    ],
)
def test_errors_name_key_and_valid_values(spec, needle):
    with pytest.raises(ConfigError, match=needle):
        MergeConfig.parse(spec)


def test_schedules():
    assert MergeConfig.parse("r=8").schedule_for(12, 197) == [8] * 12
    dec = MergeConfig.parse("r=8,schedule=decreasing").schedule_for(12, 197)
    assert sum(dec) == 96 and dec == sorted(dec, reverse=True) and dec[0] > 8 > dec[-1]
    # clamped to half of the unprotected tokens each layer
    assert MergeConfig.parse("r=16").schedule_for(12, 50) == [16, 16, 8, 4, 2, 1, 1, 0, 0, 0, 0, 0]
    assert MergeConfig.parse("method=importance,keep=0.5,layers=[1]").schedule_for(3, 101) == [0, 50, 0]
    with pytest.raises(ConfigError, match="r has 2 entries but the model has 12 blocks"):
        MergeConfig.parse("r=[1,2]").schedule_for(12, 197)
    with pytest.raises(ConfigError, match="names blocks \\[12\\]"):
        MergeConfig.parse("r=2,layers=[12]").schedule_for(12, 197)
