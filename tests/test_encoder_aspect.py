"""An image of extreme aspect ratio (a banner, a separator line) is cut around its centre before
open_clip's resize-then-centre-crop: the same square reaches the model, without an intermediate
of millions of pixels a side (a long enough one would end the run out of memory)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mergeseek.encoders.encoder import MAX_ASPECT, bounded_aspect

CLIP_LIKE = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor()])


def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("w, h", [(1200, 100), (100, 1200), (3000, 150)])
def test_the_square_that_reaches_the_model_is_the_same(w, h):
    im = random_image(w, h)
    cut = bounded_aspect(im, CLIP_LIKE)
    assert max(cut.size) == MAX_ASPECT * min(cut.size) and min(cut.size) == min(w, h)
    want, got = CLIP_LIKE(im), CLIP_LIKE(cut)
    assert got.shape == want.shape == (3, 224, 224)
    # the resize's output length is rounded differently: the square moves by under a pixel
    assert (got - want).abs().mean() < 0.02


def test_a_banner_is_cheap_now():
    banner = Image.new("RGB", (20000, 2), "red")
    cut = bounded_aspect(banner, CLIP_LIKE)
    assert cut.size == (8, 2)
    x = CLIP_LIKE(cut)
    assert x.shape == (3, 224, 224) and torch.allclose(x[0], torch.ones(224, 224), atol=1e-6)


def test_ordinary_images_and_other_preprocessing_are_left_alone():
    im = random_image(400, 100)  # 4:1 exactly
    assert bounded_aspect(im, CLIP_LIKE) is im
    squash = T.Compose([T.Resize((224, 224)), T.CenterCrop(224), T.ToTensor()])  # the whole image is kept
    tall = random_image(50, 2000)
    assert bounded_aspect(tall, squash) is tall
    assert bounded_aspect(tall, T.Compose([T.ToTensor()])) is tall
