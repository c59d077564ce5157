"""A batch-first path for ``nn.MultiheadAttention`` under CPU half-precision autocast.

open_clip's towers use ``torch.nn.MultiheadAttention``. Under CPU bf16 autocast it leaves its
fused path whenever an attention mask is passed (the causal text tower) or its input is already
half precision while its weights are float32 (every vision block after the autocast patch
embedding). The fallback projects the transposed, sequence-first and therefore non-contiguous
input with ``F.linear``, and for that layout this torch builds the product as a batched matmul
over a copy of the weight per token. Measured on the 2-core development CPU (random weights):
ViT-B-16 took 5.2 s instead of 0.24 s per two images and its text tower 1.1 s instead of 0.1 s
per four queries with this path (see docs/BENCHMARKS.md).

``use_batch_first_attention(model)`` switches each plain attention module to a subclass whose
forward, on CPU under autocast or with half-precision inputs, computes the same attention
batch-first: the in-projection of the contiguous inputs (one packed product for self-attention),
``scaled_dot_product_attention`` with the same mask, the output projection. Every other call
(float32 without autocast, attention weights requested, padding masks, training) runs the stock
forward, so float32 results are unchanged bit for bit.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

HALF = (torch.bfloat16, torch.float16)


class BatchFirstMultiheadAttention(torch.nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose CPU half-precision attention runs batch-first."""

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self._takes_batch_first_path(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
            return batch_first_attention(self, query, key, value, attn_mask), None
        return super().forward(
            query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal,
        )

    def _takes_batch_first_path(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal) -> bool:
        return (
            query.device.type == "cpu"
            and (torch.is_autocast_enabled("cpu") or query.dtype in HALF)
            and query.dim() == 3
            and key.dim() == 3
            and key.shape[1] == value.shape[1]
            and key_padding_mask is None
            and not need_weights
            and not (is_causal and attn_mask is None)
            and (attn_mask is None or attn_mask.dim() in (2, 3))
            and not self.training
        )


def batch_first_attention(
    mha: torch.nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``mha``'s attention of batch-first ``query`` [B, L, C] over ``key``/``value`` [B, S, C].

    Computed as ``nn.MultiheadAttention`` computes it (packed in-projection when all three are
    one tensor, else its three slices), without weights. ``attn_mask`` follows
    ``nn.MultiheadAttention``: [L, S] or [B * heads, L, S], boolean (True: not allowed) or additive.
    """
    batch, length, c = query.shape
    source, heads = key.shape[1], mha.num_heads
    if query is key and key is value:
        q, k, v = F.linear(query.contiguous(), mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    else:
        weights = mha.in_proj_weight.chunk(3)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        q, k, v = (F.linear(t.contiguous(), w, b) for t, w, b in zip((query, key, value), weights, biases))
    q = q.reshape(batch, length, heads, -1).transpose(1, 2)
    k, v = (t.reshape(batch, source, heads, -1).transpose(1, 2) for t in (k, v))
    mask = attn_mask
    if mask is not None:
        mask = ~mask if mask.dtype == torch.bool else mask.to(q.dtype)  # SDPA: True = allowed
        if mask.dim() == 3:
            mask = mask.reshape(batch, heads, length, source)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return mha.out_proj(out.transpose(1, 2).reshape(batch, length, c))


def use_batch_first_attention(model: torch.nn.Module) -> int:
    """Switch ``model``'s plain batch-first attention modules to the batch-first path.

    Only modules the path can compute exactly are switched (batch_first, packed in-projection, no
    extra key/value biases, no zero attention). Returns how many were switched (already switched
    ones count too, so calling twice is harmless).
    """
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.MultiheadAttention:
            if not (module.batch_first and module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn):
                continue
            module.__class__ = BatchFirstMultiheadAttention
        if isinstance(module, BatchFirstMultiheadAttention):
            count += 1
    return count
