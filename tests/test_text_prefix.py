"""encoders/text.py: the text tower on the batch's real token length equals the full-context tower.

Every open_clip model config whose text tower is open_clip's own (Hugging Face towers are left
out: their files are not here offline) is built with its text config at a tiny width, one model
per distinct text-tower layout; where :func:`prefix_length` allows a prefix the vectors must equal
the full 77-token forward (float64: to 1e-10, the identity is exact, not a tolerance; float32 and
the real ViT-B-32 tower: to 1e-6 after normalisation), and where it refuses one (no causal mask,
``last`` pooling, CoCa's appended class token) a prefix forward must in fact differ.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from mergeseek.encoders import text as text_mod  # noqa: E402
from mergeseek.encoders.text import encode_text, prefix_length  # noqa: E402

SIZE_KEYS = {"width", "heads", "layers", "context_length", "vocab_size", "output_dim", "mlp_ratio"}


def _layouts() -> dict:
    """One config name per distinct text-tower layout (the text config without its sizes, the model kind)."""
    seen: dict = {}
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name) or {}
        text = cfg.get("text_cfg") or {}
        if "hf_model_name" in text or "hf_tokenizer_name" in text and text.get("hf_model_name"):
            continue
        key = json.dumps([bool(cfg.get("custom_text")), "multimodal_cfg" in cfg,
                          {k: v for k, v in sorted(text.items()) if k not in SIZE_KEYS and not k.startswith("hf_")},
                          cfg.get("quick_gelu", False)], sort_keys=True, default=str)
        seen.setdefault(key, name)
    return seen


LAYOUTS = sorted(_layouts().values())


def _tiny(name: str):
    cfg = open_clip.get_model_config(name)
    kw = {"text_cfg": dict(cfg["text_cfg"], width=32, heads=2, layers=2), "embed_dim": 16,
          "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16}}
    if "multimodal_cfg" in cfg:
        kw["multimodal_cfg"] = dict(cfg["multimodal_cfg"], width=32, heads=2, layers=1)
    logging.disable(logging.WARNING)
    try:
        torch.manual_seed(0)
        return open_clip.create_model(name, pretrained=None, **kw).eval(), kw["text_cfg"]
    finally:
        logging.disable(logging.NOTSET)


def _tokens(text_cfg: dict, lengths=(5, 9, 3), seed: int = 0) -> torch.Tensor:
    """Texts of ``lengths`` tokens ending in the end token the tower pools at, zero padding after."""
    ctx, vocab = text_cfg.get("context_length", 77), text_cfg.get("vocab_size", 49408)
    g = torch.Generator().manual_seed(seed)
    tok = torch.zeros(len(lengths), ctx, dtype=torch.long)
    end = text_cfg.get("eos_id", vocab - 1) if text_cfg.get("pool_type") == "eos" else vocab - 1
    for i, n in enumerate(lengths):
        tok[i, :n] = torch.randint(1, vocab - 1, (n,), generator=g)
        tok[i, n - 1] = end
    return tok


def _other_tail(tok: torch.Tensor, text_cfg: dict, after: int) -> torch.Tensor:
    """``tok`` with every position from ``after`` on replaced by other ordinary tokens (no end token)."""
    vocab = text_cfg.get("vocab_size", 49408)
    out = tok.clone()
    g = torch.Generator().manual_seed(1)
    tail = torch.randint(3, vocab - 2, (tok.shape[0], tok.shape[1] - after), generator=g)
    tail[tail == text_cfg.get("eos_id", -1)] += 1
    out[:, after:] = tail
    return out


@pytest.mark.parametrize("name", LAYOUTS)
def test_prefix_equals_the_full_context_on_every_text_tower_layout(name):
    model, text_cfg = _tiny(name)
    tok = _tokens(text_cfg)
    n = prefix_length(model, tok)
    with torch.no_grad():
        full32, fast32 = model.encode_text(tok), encode_text(model, tok)
        model64 = model.double()
        full64, fast64 = model64.encode_text(tok), encode_text(model64, tok)
    assert torch.allclose(fast64, full64, rtol=0, atol=1e-10), name
    norm = torch.nn.functional.normalize
    assert torch.allclose(norm(fast32, dim=-1), norm(full32, dim=-1), rtol=0, atol=1e-6), name
    if n is not None:
        assert n == 9 or (n == 1 and text_cfg.get("pool_type") == "first"), (name, n)
    else:
        # refused: the rule is not over-cautious only where a prefix really changes the vector
        text = getattr(model64, "text", model64)
        reason = (getattr(text, "cls_emb", None) is not None or getattr(text, "attn_mask", None) is None
                  or getattr(text, "pool_type", getattr(model64, "text_pool_type", None)) == "last")
        assert reason, f"{name}: prefix refused without a reason the module names"
    with torch.no_grad():
        tail64 = model64.encode_text(_other_tail(tok, text_cfg, 9))
    if n is not None:  # what lies after the prefix cannot change the vector ...
        assert torch.allclose(tail64, full64, rtol=0, atol=1e-10), name
    else:  # ... and where a prefix is refused, it does
        assert not torch.allclose(tail64, full64, rtol=0, atol=1e-6), name


def test_layouts_cover_every_pooling_and_mask():
    kinds = set()
    for name in LAYOUTS:
        model, text_cfg = _tiny(name)
        kinds.add((text_cfg.get("pool_type", "argmax"), bool(text_cfg.get("no_causal_mask")), bool(text_cfg.get("embed_cls")),
                   prefix_length(model, _tokens(text_cfg)) is not None))
    assert ("argmax", False, False, True) in kinds  # OpenAI CLIP
    assert ("eos", False, False, True) in kinds  # towers pooling at a named end token
    assert ("last", True, False, False) in kinds  # SigLIP: refused
    assert any(cls and not ok for _, _, cls, ok in kinds)  # CoCa: refused


def test_prefix_is_the_longest_text_of_the_batch_and_first_pooling_needs_one_position():
    model, text_cfg = _tiny("ViT-B-32")
    assert prefix_length(model, _tokens(text_cfg, (4, 20, 7))) == 20
    assert prefix_length(model, _tokens(text_cfg, (77,))) == 77
    model.text_pool_type = "first"
    tok = _tokens(text_cfg, (4, 20))
    assert prefix_length(model, tok) == 1
    with torch.no_grad():
        assert torch.allclose(encode_text(model, tok), model.encode_text(tok), atol=1e-6)
    model.text_pool_type = "last"
    assert prefix_length(model, tok) is None


def test_a_tower_without_a_causal_mask_is_never_cut():
    model, text_cfg = _tiny("ViT-B-32")
    tok = _tokens(text_cfg)
    model.attn_mask = torch.zeros_like(model.attn_mask)  # full attention: padding reaches every position
    assert prefix_length(model, tok) is None
    assert not text_mod._causal(torch.zeros(4, 4))
    assert text_mod._causal(torch.full((4, 4), float("-inf")).triu(1))


def test_the_encoder_uses_the_prefix_and_matches_the_full_vit_b32_tower(monkeypatch):
    from mergeseek.encoders import Encoder

    enc = Encoder("ViT-B-32", pretrained=None, device="cpu")
    texts = ["a dog", "a man riding a bicycle down a hill at sunset", "x"]
    lengths = []
    real = text_mod.prefix_length
    monkeypatch.setattr(text_mod, "prefix_length", lambda m, t: lengths.append(real(m, t)) or lengths[-1])
    fast = enc.encode_texts(texts)
    with torch.inference_mode():
        full = torch.nn.functional.normalize(enc.model.encode_text(enc.tokenizer(texts)), dim=-1).numpy()
    assert lengths and lengths[0] is not None and lengths[0] < 20
    assert abs(fast - full).max() <= 1e-6
