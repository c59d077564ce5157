"""Model kinds behind the evaluator: a timm classifier scored with its own head."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mergeseek.errors import ConfigError, WeightsUnavailableError


# One intra-op thread (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def timm_tiny():
    import torch

    from mergeseek.eval.models import load_model

    torch.manual_seed(0)
    return load_model("timm:vit_tiny_patch16_224", None, "cpu")


def test_timm_classifier_own_head_matches_direct_forward(timm_tiny, photos):
    import torch

    from mergeseek.eval.candidates import merged_models
    from mergeseek.eval.datasets.base import ArrayImages, ClassificationSet
    from mergeseek.eval.runner import evaluate_dataset

    mut = timm_tiny
    assert (mut.kind, mut.label_space, mut.num_classes, mut.meaningful) == ("classifier", "imagenet1k", 1000, False)
    arrays = np.stack([np.asarray(Image.fromarray(p).resize((48, 48))) for p in photos[:3]])
    pixels = torch.stack([mut.preprocess(Image.fromarray(a)) for a in arrays])
    with torch.inference_mode():
        logits = mut.base(pixels).numpy()
    labels = np.argsort(-logits, axis=1)[:, [0, 1, 0]].diagonal().copy()  # hits at ranks 1, 2, 1
    ds = ClassificationSet(name="in1k-mini", images=ArrayImages(arrays), labels=labels,
                           classes=tuple(f"c{i}" for i in range(1000)), label_space="imagenet1k")
    cands = merged_models(mut.base, ["none", "r=16"])
    res = evaluate_dataset(mut, cands, ds, batch_size=2)
    assert res.protocol == "own 1000-way head"
    base = res.result("none")
    assert base.metrics["top1"] == pytest.approx(2 / 3) and base.metrics["top5"] == 1.0
    merged = res.result("method=bipartite,r=16")
    assert merged.agreement["cos_mean"] < 1.0 - 1e-6  # merging really ran
    # the embedding is the head's input (pre-logits, width 192), not the logits
    emb, lg = mut.forward(cands["none"], pixels)
    assert emb.shape == (3, 192) and lg.shape == (3, 1000)


def test_bad_model_specs_raise_clear_errors(tmp_path):
    from mergeseek.eval.models import load_model, split_model_spec

    assert split_model_spec("ViT-B-16@openai", None) == ("ViT-B-16", "openai")
    assert split_model_spec("ViT-B-16", "laion") == ("ViT-B-16", "laion")
    with pytest.raises(ConfigError, match="timm model"):
        load_model("timm:not_a_model", None)
    with pytest.raises(WeightsUnavailableError, match="--pretrained"):
        load_model("timm:vit_tiny_patch16_224", str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConfigError, match="precision"):
        load_model("ViT-B-32", None, precision="fp8")
