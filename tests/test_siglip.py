"""SigLIP / SigLIP2 (open_clip's ``TimmModel``: a timm ViT trunk with an attention-pool head, then a
head): token merging on the trunk, size-aware attention pooling, reuse across frames, and an
encoder that indexes without the text tokenizer's extra packages."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from mergeseek.encoders import apply_merging, remove_merging, token_counts
from mergeseek.errors import MissingDependencyError, UnsupportedModelError

MODEL = "ViT-B-16-SigLIP"


@pytest.fixture(scope="module")
def siglip(one_torch_thread):
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model(MODEL, pretrained=None).eval()


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.randn(2, 3, 224, 224)


def test_merging_the_trunk_is_exact_at_r0_and_removes_cleanly(siglip, pixels):
    with torch.inference_mode():
        stock = siglip.encode_image(pixels)
        try:
            apply_merging(siglip, "r=0")
            assert torch.equal(siglip.encode_image(pixels), stock)
            for spec in ("r=8", "r=8,method=lsh"):
                apply_merging(siglip, spec)
                out = siglip.encode_image(pixels)
                counts = token_counts(siglip)
                # no class token: 196 patches, 8 fewer after each of the 12 blocks
                assert counts == [196 - 8 * (i + 1) for i in range(12)], spec
                assert out.shape == stock.shape and torch.isfinite(out).all()
        finally:
            remove_merging(siglip)
        assert torch.equal(siglip.encode_image(pixels), stock)
        assert type(siglip.visual.trunk).__name__ == "VisionTransformer"


def test_the_attention_pool_gives_a_merged_token_the_weight_of_its_originals(siglip):
    """Pooling merged tokens with their sizes equals the stock head over the unmerged tokens when
    the merged ones are exact duplicates (the log-size bias on the keys is exact there)."""
    trunk = siglip.visual.trunk
    torch.manual_seed(2)
    unique = torch.randn(1, 5, trunk.embed_dim)
    sizes = torch.tensor([1, 3, 1, 2, 4])
    duplicated = unique.repeat_interleave(sizes, dim=1)  # [1, 11, C]
    try:
        apply_merging(siglip, "r=8")
        with torch.inference_mode():
            merged = trunk._merged_head(unique, sizes.float().view(1, 5, 1))
            stock = trunk._merge_orig_class.forward_head(trunk, duplicated)
            unweighted = trunk._merge_orig_class.forward_head(trunk, unique)
    finally:
        remove_merging(siglip)
    torch.testing.assert_close(merged, stock, atol=2e-5, rtol=1e-5)
    assert (merged - unweighted).abs().max() > 1e-3  # the sizes do matter


@pytest.mark.parametrize("merge", ["none", "r=8"])
def test_reuse_across_frames_runs_on_siglip(siglip, merge, one_torch_thread):
    from skimage import data

    from mergeseek.encoders import Encoder
    from mergeseek.eval.datasets.video import static_clip

    from open_clip.transform import PreprocessCfg, image_transform_v2

    transform = image_transform_v2(PreprocessCfg(**siglip.visual.preprocess_cfg), is_train=False)
    enc = Encoder(model_name=MODEL, pretrained=None, device="cpu", merge=merge, batch_size=8, model=siglip,
                  preprocess=transform)
    try:
        frames = enc.preprocess_images(list(static_clip(data.coffee(), 6, fps=5.0, size=224, noise=1.0).frames))
        per_frame = enc.encode_image_tensor(frames)
        exact = enc.stream("threshold=0").encode_image_tensor(frames, ["v"] * 6)
        assert torch.equal(exact, per_frame)  # the same arithmetic as the model's own forward
        stream = enc.stream("threshold=0.05,refresh=16,audit=0")
        out = stream.encode_image_tensor(frames, ["v"] * 6)
        assert stream.stats.reuse_rate > 0.3 and (out * per_frame).sum(-1).min() > 0.99
        same = enc.stream("threshold=0.05,audit=0").encode_image_tensor(frames[:1].repeat(3, 1, 1, 1), ["w"] * 3)
        assert torch.equal(same[1:], same[:1].expand(2, -1))  # identical frames: every token reused
    finally:
        remove_merging(siglip)


def test_an_index_is_built_without_the_text_tokenizer(tmp_path, siglip, one_torch_thread):
    """SigLIP's tokenizer needs `transformers` (and hub files); images are indexed without it, and a
    text query says in one line what is missing."""
    from PIL import Image

    from mergeseek.encoders import Encoder
    from mergeseek.indexing import IndexOptions, index_paths

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.fromarray(np.full((64, 64, 3), colour, np.uint8)).save(photos / f"{i}.png")
    enc = Encoder(model_name=MODEL, pretrained=None, device="cpu", merge="r=8", batch_size=4)
    report = index_paths([photos], tmp_path / "ix", enc, IndexOptions(progress=False))
    assert report.vectors_total == 3 and enc.dim == 768
    if importlib.util.find_spec("transformers") is None:
        with pytest.raises(MissingDependencyError, match="needs the Python package 'transformers'") as info:
            enc.encode_texts(["a red square"])
        assert "\n" not in str(info.value)


def test_a_non_vit_timm_tower_has_a_dim_and_a_clear_refusal():
    """open_clip's TimmModel around a ConvNeXt: no ``output_dim`` (measured once), and merging says
    what it got."""
    from mergeseek.encoders import Encoder

    enc = Encoder(model_name="convnext_base", pretrained=None, device="cpu", batch_size=2)
    assert enc.dim == 512 and enc.encode_image_tensor(torch.zeros(1, 3, 224, 224)).shape == (1, 512)
    with pytest.raises(UnsupportedModelError, match="got TimmModel around ConvNeXt"):
        apply_merging(enc.model, "r=8")


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="transformers is installed here")
def test_eval_stops_on_the_missing_tokenizer_before_encoding_any_image(siglip, monkeypatch):
    from mergeseek.encoders.encoder import LazyTokenizer
    from mergeseek.eval import runner
    from mergeseek.eval.models import ModelUnderTest

    mut = ModelUnderTest(name=MODEL, kind="clip", pretrained=None, meaningful=False, base=siglip.visual,
                         preprocess=None, clip=siglip, tokenizer=LazyTokenizer(MODEL))
    monkeypatch.setattr("mergeseek.eval.candidates.merged_models", lambda *a, **k: pytest.fail("images came first"))
    with pytest.raises(MissingDependencyError, match="pip install transformers"):
        runner.evaluate_model(mut, [], [object()], cfg=None)
