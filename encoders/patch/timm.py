"""Token merging for timm's ``VisionTransformer`` (ViT, DeiT, MAE-style ``global_pool='avg'``,
SigLIP's attention-pool ``global_pool='map'``, also inside open_clip's ``TimmModel``): its standard
``Block`` and ``Attention`` (qk-norm, gate, LayerScale, drop-path kept). Which models qualify is
the family adapter's answer (``encoders.family.TimmFamily``)."""

from __future__ import annotations

from typing import Optional

import torch

from mergeseek.encoders.family import base_class, own_timm_head
from mergeseek.encoders.patch.common import (MergingBlock, TokenState, attention_bias, attention_probs, key_metric,
                                             layer_norm, run_blocks, sdpa, sized_max, sized_mean, unmerged_output)
from mergeseek.errors import UnsupportedModelError

Tensor = torch.Tensor


def timm_attention(attn, x: Tensor, bias: Optional[Tensor], needs: str, mode: str = "auto", metric: bool = True):
    """timm ``Attention`` through the fused kernel (or its plain path when fused is off)."""
    batch, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        out = sdpa(q, k, v, bias, attn.attn_drop.p if attn.training else 0.0, scale=attn.scale, mode=mode)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    out = out.transpose(1, 2).reshape(batch, n, attn.num_heads * attn.head_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, key_metric(k, metric), attention_probs(q, k, bias, attn.scale, needs)


class MergingTimmBlock(MergingBlock):
    """Mixin for timm ``Block``."""

    def _merge_attend(self, x: Tensor, bias: Optional[Tensor], needs: str, mode: str, metric: bool):
        h, metric, probs = timm_attention(self.attn, layer_norm(self.norm1, x), bias, needs, mode, metric=metric)
        return self.drop_path1(self.ls1(h)), metric, probs

    def _merge_mlp(self, x: Tensor) -> Tensor:
        return self.drop_path2(self.ls2(self.mlp(layer_norm(self.norm2, x))))


class MergingTimmViT:
    """Mixin for timm ``VisionTransformer``; pooling weighted by token size."""

    def _merged_features(self, x: Tensor):
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        x, state, stats = run_blocks(self.blocks, x, self._merge_cfg, self._merge_plan())
        self._merge_last = stats
        x, size = unmerged_output(x, state)
        return self.norm(x), size

    def _merged_head(self, x: Tensor, size: Optional[Tensor], pre_logits: bool = False) -> Tensor:
        return pool_head(self, x, size, pre_logits)

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        _no_masks(attn_mask, is_causal)
        return self._merged_features(x)[0]

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        _no_masks(attn_mask, is_causal)
        x, size = self._merged_features(x)
        return self._merged_head(x, size)

    def forward_intermediates(self, x: Tensor, indices=None, return_prefix_tokens: bool = False, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              output_dict: bool = False, attn_mask: Optional[Tensor] = None, is_causal: bool = False):
        """timm's ``forward_intermediates`` with merging: with ``unmerge=true`` every requested
        block's output is the full grid (each position its merged token), as the unmerged model
        returns it; without unmerge the grids do not exist and the call is refused."""
        from mergeseek.encoders.patch.timm_intermediates import merged_intermediates

        _no_masks(attn_mask, is_causal)
        return merged_intermediates(self, x, indices, return_prefix_tokens, norm, stop_early, output_fmt,
                                    intermediates_only, output_dict)


def pool_head(vit, x: Tensor, size: Optional[Tensor], pre_logits: bool = False) -> Tensor:
    """timm ``VisionTransformer.forward_head`` for (normed) tokens of the given sizes (None:
    unmerged): the attention-pool (MAP) head with a log-size bias on its keys, size-weighted
    avg / max pooling, or the model's own head where sizes do not matter (prefix tokens). The
    merged forward and the reuse stream (encoders/reuse/) both end here."""
    pool = vit.global_pool
    base = base_class(vit)
    map_head = getattr(vit, "attn_pool", None) is not None
    if not map_head and (pool == "token" or own_timm_head(base)):
        # Prefix-token heads (class token; DeiT's class + distillation tokens) do not depend on
        # sizes, and prefix tokens stay in place: the model's own head is exact.
        return base.forward_head(vit, x, pre_logits=pre_logits)
    if (map_head or pool) and not getattr(vit, "pool_include_prefix", False):
        x = x[:, vit.num_prefix_tokens :]
        size = None if size is None else size[:, vit.num_prefix_tokens :]
    if map_head:
        # MAP head (SigLIP): the latent query attends over the tokens; a merged token of size s
        # gets the attention of its s originals (log-size bias on its key, proportional attention)
        bias = None if size is None else attention_bias(TokenState(size, True), True, x.dtype)  # [B,1,1,N]
        x = vit.attn_pool(x, attn_mask=bias)
    elif pool == "avg":
        x = sized_mean(x, size)
    elif pool == "max":
        x = sized_max(x, size)
    elif pool == "avgmax":
        x = 0.5 * (sized_max(x, size) + sized_mean(x, size))
    elif pool:
        raise UnsupportedModelError(f"timm global_pool={pool!r} is not supported with token merging")
    x = vit.fc_norm(x)
    x = vit.head_drop(x)
    return x if pre_logits else vit.head(x)


def _no_masks(attn_mask, is_causal) -> None:
    if attn_mask is not None or is_causal:
        raise UnsupportedModelError("token merging cannot honour a caller attention mask; call the model without one")
