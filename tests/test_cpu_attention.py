"""The batch-first attention path for CPU half precision: same attention as the stock module."""

from __future__ import annotations

import copy

import pytest
import torch

from mergeseek.encoders.cpu_attention import BatchFirstMultiheadAttention, batch_first_attention, use_batch_first_attention


def _mha(**kw):
    torch.manual_seed(0)
    return torch.nn.MultiheadAttention(64, 4, batch_first=True, **kw).eval()


def _masks(n):
    causal = torch.full((n, n), float("-inf")).triu_(1)  # open_clip's text mask (additive)
    banned = torch.rand(n, n, generator=torch.Generator().manual_seed(1)) < 0.3
    banned.fill_diagonal_(False)  # every query keeps itself
    per_head = torch.randn(2 * 4, n, n, generator=torch.Generator().manual_seed(2))  # [B * heads, N, N]
    return {"none": None, "causal additive": causal, "bool (True = banned)": banned, "per-head additive": per_head}


@pytest.mark.parametrize("mask_name", list(_masks(9)))
def test_batch_first_path_equals_the_stock_module_in_float32(mask_name):
    """The path written out on its own, in float32, against torch's implementation."""
    mha = _mha()
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(3))
    mask = _masks(9)[mask_name]
    with torch.inference_mode():
        want = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        got = batch_first_attention(mha, x, x, x, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("same_kv", [True, False])
def test_batch_first_cross_attention_equals_the_stock_module_in_float32(same_kv):
    """Queries attending to other tokens (open_clip's attentional pooler), with a per-head mask."""
    mha = _mha()
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 5, 64, generator=g), torch.randn(2, 11, 64, generator=g)
    v = k if same_kv else torch.randn(2, 11, 64, generator=g)
    mask = torch.randn(2 * 4, 5, 11, generator=g)
    with torch.inference_mode():
        want = mha(q, k, v, need_weights=False, attn_mask=mask)[0]
        got = batch_first_attention(mha, q, k, v, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_name", ["none", "causal additive"])
def test_switched_module_under_bf16_autocast_stays_close_to_float32(mask_name, monkeypatch):
    from mergeseek.encoders import cpu_attention

    stock = _mha()
    switched = copy.deepcopy(stock)
    assert use_batch_first_attention(switched) == 1 and isinstance(switched, BatchFirstMultiheadAttention)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(4))
    mask = _masks(9)[mask_name]
    calls = []

    def spy(*args):
        calls.append(1)
        return batch_first_attention(*args)

    monkeypatch.setattr(cpu_attention, "batch_first_attention", spy)
    with torch.inference_mode():
        want = stock(x, x, x, need_weights=False, attn_mask=mask)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = switched(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert calls, "the batch-first path did not run under CPU autocast"
    torch.testing.assert_close(got.float(), want, rtol=0, atol=0.05)


def test_every_other_call_runs_the_stock_forward_bit_for_bit():
    stock = _mha()
    switched = copy.deepcopy(stock)
    use_batch_first_attention(switched)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(5))
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, -2:] = True
    cases = [
        (False, (x, x, x), dict(need_weights=False)),  # float32 without autocast
        (True, (x, x, x), dict(need_weights=True)),  # attention weights asked for
        (True, (x, x, x), dict(need_weights=False, key_padding_mask=pad)),  # padding mask
    ]
    with torch.inference_mode():
        for autocast, args, kw in cases:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                a, b = stock(*args, **kw), switched(*args, **kw)
            assert torch.equal(a[0], b[0]), kw
            assert (a[1] is None) == (b[1] is None)


@pytest.mark.slow  # several open_clip models built and run
def test_open_clip_models_are_switched_and_float32_embeddings_unchanged(photos):
    import open_clip
    from PIL import Image

    from mergeseek.encoders import Encoder

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model.eval()
    stock = copy.deepcopy(model)
    assert use_batch_first_attention(model) == 24  # 12 vision + 12 text blocks
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    tokens = tokenizer(["a cat", "a man riding a bike"])
    pixels = torch.stack([preprocess(Image.fromarray(p)) for p in photos[:2]])
    with torch.inference_mode():
        assert torch.equal(model.encode_image(pixels), stock.encode_image(pixels))
        assert torch.equal(model.encode_text(tokens), stock.encode_text(tokens))
    enc = Encoder("ViT-B-32", pretrained=None, device="cpu", precision="bf16", merge="none", batch_size=2)
    assert any(isinstance(m, BatchFirstMultiheadAttention) for m in enc.model.modules())
    fp32 = Encoder("ViT-B-32", pretrained=None, device="cpu", precision="fp32", merge="none", batch_size=2)
    cos_img = (enc.encode_images(photos[:2]) * fp32.encode_images(photos[:2])).sum(1)
    cos_txt = (enc.encode_texts(["a cat", "a dog"]) * fp32.encode_texts(["a cat", "a dog"])).sum(1)
    assert cos_img.min() > 0.999 and cos_txt.min() > 0.999
