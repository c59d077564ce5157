"""EvalConfig: --merge / --sweep expansion, validation, method lines for plots."""

from __future__ import annotations

import pytest

from mergeseek.errors import ConfigError
from mergeseek.eval.config import EvalConfig, expand_merges, group_label, parse_sweep


def names(cfgs):
    return [str(c) for c in cfgs]


def test_baseline_is_always_first_and_duplicates_drop():
    assert names(expand_merges(["r=8", "none", "method=bipartite,r=8"])) == ["none", "method=bipartite,r=8"]


def test_sweep_applies_to_each_enabled_merge_config():
    got = names(expand_merges(["r=8,method=lsh,lsh_bits=6", "none"], "r=0:8:4"))
    assert got == ["none", "method=lsh,r=8,lsh_bits=6", "method=lsh,r=0,lsh_bits=6", "method=lsh,r=4,lsh_bits=6"]


def test_sweep_grid_with_alternatives_defaults_to_bipartite():
    assert names(expand_merges([], "r=4|16")) == ["none", "method=bipartite,r=4", "method=bipartite,r=16"]
    got = names(expand_merges(["none"], "r=4|8,method=bipartite|importance"))
    assert got == ["none", "method=bipartite,r=4", "method=importance,r=4", "method=bipartite,r=8", "method=importance,r=8"]


def test_parse_sweep_ranges_and_errors():
    assert parse_sweep("r=0:16:4") == [("r", ["0", "4", "8", "12", "16"])]
    assert parse_sweep("r=2:3") == [("r", ["2", "3"])]
    for bad in ("r", "r=8:0", "r=0:8:0", "r=a:b", "method=none|lsh", ""):
        with pytest.raises(ConfigError):
            parse_sweep(bad)
    with pytest.raises(ConfigError, match="valid keys"):
        expand_merges([], "colour=1|2")


def test_group_label_drops_r_only():
    from mergeseek.encoders import MergeConfig

    assert group_label(MergeConfig.parse("r=8,method=lsh,lsh_bits=6")) == "method=lsh,lsh_bits=6"
    assert group_label(MergeConfig.parse("r=[1,2,3],method=lsh")) == "method=lsh"
    assert group_label(MergeConfig.parse("none")) == "none"


def test_eval_config_validates_early():
    with pytest.raises(ConfigError):
        EvalConfig(merges=("r=8,method=nope",))
    with pytest.raises(ConfigError):
        EvalConfig(models=())
    with pytest.raises(ConfigError):
        EvalConfig(limit=0)
    d = EvalConfig(merges=("r=4",), sweep="r=8|16").to_dict()
    assert d["merge_configs"] == ["none", "method=bipartite,r=4", "method=bipartite,r=8", "method=bipartite,r=16"]
