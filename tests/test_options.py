"""One ``key=value`` parser (issue #24): every config that takes an option string refuses the same
mistakes with the same words and lists its valid keys."""

from __future__ import annotations

import pytest

from mergeseek.errors import ConfigError
from mergeseek.options import parse_options


def _parsers():
    from mergeseek.encoders.config import MergeConfig
    from mergeseek.encoders.reuse import ReuseConfig
    from mergeseek.eval.config import parse_sweep
    from mergeseek.eval.datasets import DatasetSpec
    from mergeseek.eval.datasets.video import load_video_set
    from mergeseek.eval.reference import ReferenceConfig

    return {
        "merge": (MergeConfig.parse, "r=8,{}"),
        "reuse": (ReuseConfig.parse, "threshold=0.05,{}"),
        "reference config": (ReferenceConfig.parse, "reference-cifar10,{}"),
        "dataset": (DatasetSpec.parse, "cifar10,{}"),
        "video set": (lambda t: load_video_set(t, "/nonexistent"), "video,{}"),
        "sweep": (parse_sweep, "r=0:8:4,{}"),
    }


@pytest.mark.parametrize("what", ["merge", "reuse", "reference config", "dataset", "video set", "sweep"])
def test_every_config_refuses_the_same_mistakes_in_the_same_words(what):
    parse, template = _parsers()[what]
    with pytest.raises(ConfigError, match=rf"^unknown {what} option 'bogus' in .*; valid keys: \w"):
        parse(template.format("bogus=1"))
    with pytest.raises(ConfigError, match=rf"^{what} option 'lonely' in .* is not key=value; valid keys: \w"):
        parse(template.format("lonely"))


@pytest.mark.parametrize("what,text", [("merge", "r=8,r=4"), ("reuse", "threshold=0.1,threshold=0.2"),
                                       ("sweep", "r=0:8:4,r=1:2"), ("dataset", "cifar10,split=a,split=b")])
def test_a_key_given_twice_is_refused_rather_than_the_last_one_winning(what, text):
    parse = _parsers()[what][0]
    with pytest.raises(ConfigError, match=rf"^{what} option '\w+' is given twice"):
        parse(text)


def test_parse_options_keeps_order_brackets_and_head():
    got = parse_options(" name , r=[16,8] , method = lsh ", "merge", ["r", "method"], head="optional")
    assert got.head == "name" and got.pairs == (("r", "[16,8]"), ("method", "lsh"))
    assert parse_options("a=1", "x", ["a"], head="optional").head is None
    assert parse_options("p:/data/a[1,k=v", "d", ["k"], head="always", brackets=False).pairs == (("k", "v"),)
    assert parse_options("", "x", ["a"]).pairs == ()
    with pytest.raises(ConfigError, match="has no value"):
        parse_options("a=", "x", ["a"], need_value=True)
