"""bench/merge_map.py: the merged groups it draws and counts are the patched model's own merges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergeseek.encoders import apply_merging, remove_merging, token_counts
from mergeseek.eval.datasets.speech import SpeechWordsSpec, log_mel, voiced_syllables
from mergeseek.eval.speech_reference import build_speech_model, get_speech_config, scale

from bench.merge_map import groups_of, merge_groups, reading, word_patches


@pytest.fixture(scope="module")
def clips():
    cfg = get_speech_config("reference-speech")
    feats = log_mel(voiced_syllables(3, SpeechWordsSpec(), seed=5), SpeechWordsSpec())
    return cfg, feats, scale(torch.from_numpy(feats)[:, None], cfg)


@pytest.mark.parametrize("spec", ["r=16", "r=16,method=lsh", "r=[40,0,20,0,0,0]"])
def test_groups_are_the_patched_forward_s_merges(clips, spec):
    cfg, _, x = clips
    torch.manual_seed(0)
    model = build_speech_model(cfg).eval()
    out, steps = merge_groups(model, x, spec)
    assert type(model).__name__ == "VisionTransformer"  # the patch is removed again
    apply_merging(model, spec)
    with torch.inference_mode():
        want = model(x)
    counts = token_counts(model)
    remove_merging(model)
    assert torch.equal(out, want)
    assert [s.shape[1] for s in steps] == counts  # one membership per block, blocks with r=0 too
    for member in steps:  # every patch sits in exactly one token; token sizes add up to the 128 patches
        assert torch.equal(member.sum(dim=1), torch.ones(3, 128, dtype=member.dtype))
        assert set(member.unique().tolist()) <= {0.0, 1.0}
    groups = groups_of(steps[-1])
    assert groups.shape == (3, 128) and groups.max() < counts[-1]


def test_merged_tokens_average_their_patches_like_the_model(clips):
    """The membership of block 0 reproduces the merged stream: tokens = size-weighted means of patches."""
    cfg, _, x = clips
    torch.manual_seed(0)
    model = build_speech_model(cfg).eval()
    _, steps = merge_groups(model, x, "r=24")
    with torch.inference_mode():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        h = model.blocks[0]
        y = tokens + h.ls1(h.attn(h.norm1(tokens)))  # block 0's attention half: what merging averages
    m = steps[0].float()
    merged = (m @ y) / m.sum(dim=2, keepdim=True)
    apply_merging(model, "r=24")
    seen = []
    hook = model.blocks[0].mlp.register_forward_hook(lambda mod, i, o: seen.append(i[0]))
    with torch.inference_mode():
        model(x)
    hook.remove()
    remove_merging(model)
    torch.testing.assert_close(model.blocks[0].norm2(merged), seen[0], rtol=0, atol=1e-4)


def test_word_patches_and_the_reading_by_hand():
    feats = np.zeros((1, 16, 32), np.float32)
    feats[0, 8:16, 8:16] = 3.0  # one loud 8x8 patch: row 1, column 1
    feats[0, 0:8, 24:32] = 0.9  # under the 1-nat margin
    word = word_patches(feats, 8, 1.0)
    assert word.shape == (1, 8) and np.flatnonzero(word[0]).tolist() == [5]
    member = torch.zeros(1, 3, 8, dtype=torch.float64)
    member[0, 0, [0, 1, 2, 3]] = 1  # background patches merged together
    member[0, 1, [4, 5]] = 1  # the word patch with one background patch: half word
    member[0, 2, [6, 7]] = 1
    (row,) = reading([member], word)
    assert row["tokens"] == 3 and row["word_merged"] == 1.0 and row["background_merged"] == 1.0
    assert row["word_token_size"] == 2.0 and row["background_token_size"] == pytest.approx((4 * 4 + 2 + 2 * 2) / 7)
    assert row["word_in_mostly_background"] == 0.0  # a share of exactly 0.5 is not "mostly background"
