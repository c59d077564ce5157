"""The text tower on the batch's real token length instead of the full context (exact, where it is).

A CLIP text tower of open_clip pads every text to its context (77 tokens) and, in the towers with a
causal attention mask, reads the text vector off one position: the end-of-text token (``argmax``:
the highest token id, the OpenAI BPE's end token; ``eos``: the first ``eos_id``) or the first
token (``first``). Under a causal mask position ``i`` attends only to positions ``<= i``, so the
positions after the pooled one cannot change its output: running the tower on the first
``max(pooled position) + 1`` tokens of the batch gives the same vector, for a fraction of the
work (a 10-token query: ~1/7 of the full 77-token forward).

Where that does not hold the full context is used: no causal mask (SigLIP: every position sees the
padding), ``last`` pooling (the last position is a padding one), an appended class token (CoCa),
a Hugging Face text tower (bidirectional, masked mean or class-token pooling) or a tower whose
layout is not the one below. :func:`prefix_length` says which.
"""

from __future__ import annotations

from typing import Optional

import torch


def _tower(model):
    """(module holding the text tower's parts, its pool type, its eos id) or None for a layout not handled."""
    text = getattr(model, "text", None)
    if text is not None:  # CustomTextCLIP: open_clip's TextTransformer (or a HF tower, not handled)
        if getattr(text, "cls_emb", None) is not None:
            return None  # CoCa: a class token appended after the padding, pooled from the last position
        return (text, getattr(text, "pool_type", None), getattr(text, "eos_id", None)) if _has_parts(text) else None
    if _has_parts(model):  # CLIP: the text tower's parts sit on the model itself
        return model, getattr(model, "text_pool_type", None), getattr(model, "text_eos_id", None)
    return None


def _has_parts(m) -> bool:
    return all(hasattr(m, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask"))


def _causal(mask) -> bool:
    """``mask`` is the additive causal mask (-inf strictly above the diagonal, 0 elsewhere)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    upper = torch.ones_like(mask, dtype=torch.bool).triu(1)
    return bool(torch.isneginf(mask[upper]).all()) and bool((mask[~upper] == 0).all())


def prefix_length(model, tokens: torch.Tensor) -> Optional[int]:
    """How many leading positions of ``tokens`` [batch, context] decide the text vectors exactly, or
    None when the model's tower is not one where a prefix does (see the module docstring)."""
    found = _tower(model)
    if found is None:
        return None
    tower, pool, eos_id = found
    if getattr(tower, "use_pad_mask", False) or not _causal(tower.attn_mask):
        return None
    if pool == "first":
        return 1
    if pool == "argmax":
        at = tokens.argmax(dim=-1)
    elif pool == "eos" and eos_id is not None:
        at = (tokens == eos_id).int().argmax(dim=-1)
    else:
        return None
    return int(at.max()) + 1 if tokens.numel() else None


def encode_text(model, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)``, run on the first :func:`prefix_length` positions where that is exact."""
    n = prefix_length(model, tokens)
    if n is None or n >= tokens.shape[1]:
        return model.encode_text(tokens)
    from open_clip.transformer import text_global_pool

    tower, pool, eos_id = _tower(model)
    t = tokens[:, :n]
    cast = tower.transformer.get_cast_dtype() if hasattr(tower.transformer, "get_cast_dtype") else tower.token_embedding.weight.dtype
    x = tower.token_embedding(t).to(cast) + tower.positional_embedding[:n].to(cast)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:n, :n])
    x = tower.ln_final(x)
    x = text_global_pool(x, t, pool, eos_token_id=eos_id)
    proj = tower.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Module) else x @ proj
    return x


__all__ = ["encode_text", "prefix_length"]
