"""Encoder loading (tags, paths, random weights, offline errors) and batch encoding."""

from __future__ import annotations

import numpy as np
import pytest

from mergeseek.encoders import Encoder, token_counts
from mergeseek.errors import ConfigError, WeightsUnavailableError


@pytest.fixture(scope="module")
def random_b32():
    return Encoder("ViT-B-32", pretrained=None, device="cpu", merge="none", batch_size=2)


def test_random_weights_encode_images_and_texts(random_b32, photos):
    img = random_b32.encode_images(photos[:3])
    txt = random_b32.encode_texts(["a man riding a bike", "a cat"])
    assert img.shape == (3, 512) and txt.shape == (2, 512) and img.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    assert random_b32.describe() == {"model": "ViT-B-32", "pretrained": "none", "merge": "none", "dim": 512, "precision": "fp32"}


def test_batching_does_not_change_embeddings(random_b32, photos):
    one = np.concatenate([random_b32.encode_images([p]) for p in photos])
    assert np.abs(one - random_b32.encode_images(photos)).max() < 1e-4


def test_merged_encoder_reports_tokens(photos):
    enc = Encoder("ViT-B-32", pretrained="none", device="cpu", merge="r=4")
    enc.encode_images(photos[:1])
    expected, n = [], 50
    for r in enc.merge.schedule_for(12, 50):
        n -= r
        expected.append(n)
    assert token_counts(enc.model) == expected and expected[:3] == [46, 42, 38]
    assert str(enc.merge) == "method=bipartite,r=4"


def test_offline_tag_fails_with_one_clear_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="--pretrained /path/to/.*or pass --pretrained none"):
        Encoder("ViT-B-32", pretrained="openai", device="cpu")


def test_bad_tag_path_model_precision():
    with pytest.raises(ConfigError, match="unknown for ViT-B-32; valid tags: openai"):
        Encoder("ViT-B-32", pretrained="no-such-tag", device="cpu")
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        Encoder("ViT-B-32", pretrained="/nonexistent/ckpt.pt", device="cpu")
    with pytest.raises(ConfigError, match="not an open_clip model"):
        Encoder("ViT-X-99", pretrained=None, device="cpu")
    with pytest.raises(ConfigError, match="precision='fp8' is not valid"):
        Encoder("ViT-B-32", pretrained=None, precision="fp8")


def test_local_checkpoint_path_loads(tmp_path, random_b32, photos):
    import torch

    path = tmp_path / "b32.pt"
    torch.save(random_b32.model.state_dict(), path)
    enc = Encoder("ViT-B-32", pretrained=str(path), device="cpu", merge="none")
    assert enc.pretrained == str(path)
    np.testing.assert_allclose(enc.encode_images(photos[:1]), random_b32.encode_images(photos[:1]), atol=1e-5)


def test_bf16_precision_runs(photos):
    enc = Encoder("ViT-B-32", pretrained=None, device="cpu", precision="bf16", merge="r=4,method=lsh")
    out = enc.encode_images(photos[:2])
    assert out.shape == (2, 512) and np.isfinite(out).all()


def test_random_weights_are_the_same_in_every_load(random_b32, photos):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    again = Encoder("ViT-B-32", pretrained=None, device="cpu", merge="none")
    assert torch.equal(torch.rand(1), expected)  # loading did not consume the global RNG stream
    np.testing.assert_allclose(again.encode_images(photos[:1]), random_b32.encode_images(photos[:1]), atol=1e-6)


@pytest.mark.parametrize("name,tower", [("xlm-roberta-base-ViT-B-32", "xlm-roberta-base"),
                                        ("nllb-clip-base", "facebook/nllb-200-distilled-600M")])
def test_multilingual_models_name_what_their_hugging_face_text_tower_needs(name, tower):
    """Multilingual CLIPs (Vietnamese queries without --translate) build their text tower from
    Hugging Face files: without transformers, or offline without those files in the cache, one
    line says which (never a traceback from deep inside transformers)."""
    from mergeseek.errors import MissingDependencyError, WeightsUnavailableError

    with pytest.raises((MissingDependencyError, WeightsUnavailableError)) as info:
        Encoder(model_name=name, pretrained=None, device="cpu")
    assert tower in str(info.value) and "\n" not in str(info.value)
