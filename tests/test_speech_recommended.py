"""Audio: the documented merge recommendation for the speech reference (``RECOMMENDED_MERGE``) is
the "about -40% FLOPs" point of issue #30 on the reference architecture, measured from the patched
forward's own token counts (random weights: the counts do not depend on them)."""

from __future__ import annotations

import pytest
import torch

from mergeseek.encoders import apply_merging, token_counts
from mergeseek.eval.speech_reference import (RECOMMENDED_MERGE, RECOMMENDED_MERGE_HASHED, build_speech_model,
                                             get_speech_config)
from mergeseek.eval.timing import flop_ratio


@pytest.mark.parametrize("text", [RECOMMENDED_MERGE, RECOMMENDED_MERGE_HASHED])
def test_recommended_merge_takes_about_40_percent_of_the_block_flops_off(text):
    cfg = get_speech_config("reference-speech")
    torch.manual_seed(0)
    model = build_speech_model(cfg).eval()
    apply_merging(model, text)
    with torch.inference_mode():
        logits = model(torch.randn(2, 1, cfg.n_mels, cfg.frames))
    counts = token_counts(model)
    assert logits.shape == (2, cfg.num_classes)
    assert counts == [112, 96, 80, 64, 48, 32]  # r=16 in each of the 6 blocks, nothing clamped
    saved = 1 - 1 / flop_ratio(counts, [cfg.num_tokens] * cfg.depth, cfg.embed_dim, cfg.mlp_ratio)
    assert 0.38 <= saved <= 0.44, saved
