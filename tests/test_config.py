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
        ("method=tome", "method='tome' is not valid; choose one of: none, bipartite, lsh, energy, energy_lsh, pairs, pairs_lsh, pairs_mix, pairs_mix_lsh, ward, ward_lsh, ward_imp, ward_imp_lsh, importance, zerotprune"),
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


# ---------------------------------------------------------------------------- huge values (issue #23)
@pytest.mark.parametrize("spec,needle", [
    ("r=99999999999999999999999", "up to 1000000"),
    ("r=1000001", "<= 1000000"),
    ("r=8,method=lsh,lsh_tables=65", "lsh_tables=65"),
    ("r=8,method=lsh,lsh_window=" + "9" * 5000, "lsh_window="),
    ("r=8,seed=-1", "seed=-1"),
    ("r=8,seed=" + "9" * 30, "seed="),
    ("r=[1,2,3", "closing ']'"),
    ("r=(1,2", "closing ')'"),
    ("r=[" + ",".join(["1"] * 2000) + "]", "at most 1024"),
    ("bogus=" + "9" * 10000, "unknown merge option 'bogus'"),
])
def test_huge_or_malformed_merge_values_are_one_config_error(spec, needle):
    from mergeseek.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        MergeConfig.parse(spec)
    assert needle in str(err.value) and len(str(err.value).splitlines()) == 1 and len(str(err.value)) < 400


def test_the_largest_accepted_values_still_parse():
    assert MergeConfig.parse("r=1000000").r == 1_000_000
    assert MergeConfig.parse(f"r=8,seed={2**63 - 1}").seed == 2**63 - 1
    assert MergeConfig.parse("r=8,method=lsh,lsh_tables=64").lsh_tables == 64
    assert MergeConfig.parse("r=(1,2)").r == (1, 2)


@pytest.mark.parametrize("spec,needle", [
    ("r=0:99999999999", "100000000000 values"),
    ("r=0:200,lsh_bits=1:30", "6030 configs"),
    ("r=" + "|".join(str(i) for i in range(300)), "300 configs"),
    ("nope=0:99999999999999999999", "unknown sweep option 'nope'"),
])
def test_huge_sweeps_are_refused_before_they_are_built(spec, needle):
    from mergeseek.errors import ConfigError
    from mergeseek.eval.config import parse_sweep

    with pytest.raises(ConfigError, match=needle.replace("'", ".")):
        parse_sweep(spec)
    assert len(parse_sweep("r=0:255")[0][1]) == 256  # the limit itself is allowed


@pytest.mark.parametrize("spec,needle", [
    ("refresh=99999999999999999999999", "refresh="), ("max_videos=1000001", "<= 1000000"),
    ("audit=999999999999", "<= 1000000"), ("seed=-5", "seed=-5"), ("refresh=" + "9" * 5000, "refresh="),
    ("nope=" + "9" * 5000, "unknown reuse option 'nope'"),
])
def test_huge_or_malformed_reuse_values_are_one_config_error(spec, needle):
    from mergeseek.encoders.reuse import ReuseConfig

    with pytest.raises(ConfigError) as err:
        ReuseConfig.parse(spec)
    assert needle in str(err.value) and len(str(err.value).splitlines()) == 1 and len(str(err.value)) < 400


def test_the_footage_preset_is_the_measured_config_and_takes_overrides():
    from mergeseek.encoders.reuse import ReuseConfig

    measured = ReuseConfig.parse("threshold=0.15,refresh=1000,cut=0.9,roll=4,query=0.15")
    assert ReuseConfig.parse("footage") == ReuseConfig.parse(" Footage ") == measured and measured.enabled
    assert ReuseConfig.parse("footage,audit=8,roll=2") == ReuseConfig(threshold=0.15, refresh=1000, cut=0.9, roll=2,
                                                                       query=0.15, audit=8)
    assert ReuseConfig.parse(str(measured)) == measured  # its string is a spec of the same config
    with pytest.raises(ConfigError, match="reuse option 'footage' in 'threshold=0.1,footage' is not key=value"):
        ReuseConfig.parse("threshold=0.1,footage")  # a preset only first
    with pytest.raises(ConfigError, match="reuse option 'studio' is neither a preset \\(footage\\) nor key=value"):
        ReuseConfig.parse("studio,refresh=3")


def test_merge_and_metric_options_round_trip_and_name_their_choices():
    cfg = MergeConfig.parse("r=8,method=energy,merge=mlerp,metric=heads")
    assert (cfg.merge, cfg.metric) == ("mlerp", "heads") and MergeConfig.parse(str(cfg)) == cfg
    assert str(MergeConfig.parse("r=8")) == "method=bipartite,r=8"  # defaults stay out of the string
    with pytest.raises(ConfigError, match="merge merge='avg' is not valid; choose one of: mean, mlerp"):
        MergeConfig.parse("r=8,merge=avg")
    with pytest.raises(ConfigError, match="merge metric='x' is not valid; choose one of: keys, heads"):
        MergeConfig.parse("r=8,metric=x")
