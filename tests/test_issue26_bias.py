"""The sixth round's screening variants (bench/issue26_bias.py) do what their names say: the
neutral setting of each knob is the shipped forward, the extreme one equals an independent
config, and leaving the block restores the shipped forward."""

from __future__ import annotations

import copy

import pytest
import torch

from mergeseek.bench.issue26_bias import variant
from mergeseek.encoders import apply_merging
from mergeseek.encoders.patch import common


@pytest.fixture(scope="module")
def tiny():
    """Four blocks: the last block's merge cannot reach the class token and the first one's sizes
    are all 1, so a size-weighting variant needs two blocks in between to show."""
    import dataclasses

    from mergeseek.eval.reference import build_model, get_config

    torch.manual_seed(0)
    return build_model(dataclasses.replace(get_config("reference-tiny"), depth=4)).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def run(model, cfg, images, name="base"):
    merged = apply_merging(copy.deepcopy(model), cfg)
    with variant(name), torch.no_grad():
        return merged(images)


@pytest.mark.parametrize("method", ["pairs", "bipartite"])
def test_neutral_settings_are_the_shipped_forward(tiny, images, method):
    want = run(tiny, f"method={method},r=4", images)
    torch.testing.assert_close(run(tiny, f"method={method},r=4", images, "alpha=1"), want, rtol=0, atol=0)
    torch.testing.assert_close(run(tiny, f"method={method},r=4", images, "gamma=1"), want, rtol=1e-5, atol=1e-5)


def test_alpha_zero_is_proportional_attention_off(tiny, images):
    want = run(tiny, "method=pairs,r=4,prop_attn=off", images)
    torch.testing.assert_close(run(tiny, "method=pairs,r=4", images, "alpha=0"), want, rtol=0, atol=0)
    assert not torch.allclose(run(tiny, "method=pairs,r=4", images, "alpha=1.5"), want, atol=1e-4)


def test_gamma_zero_is_an_unweighted_mean(tiny, images):
    """gamma=0 averages merged tokens with equal weights: the same as passing weights of one."""
    saved = common.merge_wavg

    def plain(result, x, size, mlerp=False):
        return saved(result, x, size, weight=torch.ones_like(x[..., :1]), mlerp=mlerp)
    want_model = apply_merging(copy.deepcopy(tiny), "method=pairs,r=4")
    common.merge_wavg = plain
    try:
        with torch.no_grad():
            want = want_model(images)
    finally:
        common.merge_wavg = saved
    torch.testing.assert_close(run(tiny, "method=pairs,r=4", images, "gamma=0"), want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["xmetric", "kxmetric", "alpha=0.5", "gamma=2"])
def test_a_variant_changes_the_output_and_is_undone(tiny, images, name):
    base = run(tiny, "method=pairs,r=4", images)
    assert not torch.allclose(run(tiny, "method=pairs,r=4", images, name), base, atol=1e-5)
    torch.testing.assert_close(run(tiny, "method=pairs,r=4", images), base, rtol=0, atol=0)
    assert common.merge_tokens.__module__ == common.__name__


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown variant"):
        with variant("beta=2"):
            pass
