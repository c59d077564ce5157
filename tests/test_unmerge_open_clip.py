"""``unmerge=true`` on open_clip's ``VisionTransformer`` with ``output_tokens``: the tokens it returns
are the full grid, each position carrying the token it was merged into (checked against a naive
per-image replay of every block's merge), and the pooled embedding is the one the merged model
gives without unmerge. tests/test_unmerge.py does the same for timm's ViT."""

from __future__ import annotations

import pytest
import torch

from mergeseek.encoders import apply_merging
from tests.test_unmerge import unmerged_with_naive_slots

SIDE, WIDTH, GRID = 32, 32, 64  # 8 x 8 patches + a class token, 3 blocks


def _vit(pool_type: str):
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=SIDE, patch_size=4, width=WIDTH, layers=3, heads=2, mlp_ratio=2.0,
                             output_dim=16, pool_type=pool_type, output_tokens=True).eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("pool_type", ["tok", "avg"])
def test_r0_tokens_and_embedding_are_the_unmerged_model_s(pool_type, pixels):
    model = _vit(pool_type)
    with torch.no_grad():
        ref_pooled, ref_tokens = model(pixels)
        apply_merging(model, "r=0")
        patched_pooled, patched_tokens = model(pixels)
        apply_merging(model, "r=0,unmerge=true")
        pooled, tokens = model(pixels)
    # the patched forward is open_clip's to 1e-5 (tests/test_patch.py: SDPA for its attention);
    # the unmerge at r=0 is the identity gather: bit for bit the patched forward's
    assert torch.equal(tokens, patched_tokens) and torch.equal(pooled, patched_pooled)
    torch.testing.assert_close(tokens, ref_tokens, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["r=8", "r=8,method=lsh", "r=[0,12,8],method=pairs"])
@pytest.mark.parametrize("pool_type", ["tok", "avg"])
def test_every_output_token_is_its_position_s_merged_token(spec, pool_type, pixels, monkeypatch):
    model = _vit(pool_type)
    apply_merging(model, spec)
    with torch.no_grad():
        merged_pooled, merged_tokens = model(pixels)  # no unmerge: the merged tokens, without the class token
    (pooled, grid), maps = unmerged_with_naive_slots(model, spec, lambda: model(pixels), pixels.shape[0], monkeypatch)
    assert grid.shape == (pixels.shape[0], GRID, WIDTH)
    assert merged_tokens.shape[1] < GRID  # something merged
    # the class token is never merged, so the embedding is the merged model's: exactly for the class
    # token, up to summation order for the average (a size-weighted mean vs a mean over the grid)
    if pool_type == "tok":
        assert torch.equal(pooled, merged_pooled)
    else:
        torch.testing.assert_close(pooled, merged_pooled, rtol=0, atol=1e-5)
    for b, slots in enumerate(maps):
        assert slots[0] == 0  # the class token stays first
        for p in range(GRID):
            torch.testing.assert_close(grid[b, p], merged_tokens[b, slots[p + 1] - 1], rtol=0, atol=1e-6)
