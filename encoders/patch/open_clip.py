"""Token merging for open_clip's ``VisionTransformer`` (its default ``ResidualAttentionBlock``
with ``nn.MultiheadAttention`` and its ``CustomResidualAttentionBlock``; LayerScale kept;
class-token, average and attention pooling weighted by token size). Which blocks get which mixin
is the family adapter's answer (``encoders.family.OpenClipFamily``)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from mergeseek.encoders.patch.common import (MergingBlock, TokenState, attention_bias, attention_probs, key_metric,
                                             layer_norm, run_blocks, sdpa, sized_mean,
                                             unmerged_output)

Tensor = torch.Tensor


def _heads(t: Tensor, batch: int, n: int, heads: int) -> Tensor:
    return t.reshape(batch, n, heads, -1).transpose(1, 2)


def mha_attention(
    attn: torch.nn.MultiheadAttention, x: Tensor, bias: Optional[Tensor], needs: str, mode: str = "auto",
    metric: bool = True,
):
    """``nn.MultiheadAttention`` self-attention through the fused kernel with an additive bias
    (``mode``: how the bias reaches the kernel, see ``common.sdpa``).

    Returns (output, metric = ``key_metric(keys, metric)`` (None when ``metric`` is false), attention
    probabilities if ``needs`` them).
    """
    batch, n, c = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(batch, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = sdpa(q, k, v, bias, attn.dropout if attn.training else 0.0, mode=mode)
    out = F.linear(out.transpose(1, 2).reshape(batch, n, c), attn.out_proj.weight, attn.out_proj.bias)
    probs = attention_probs(q, k, bias, q.shape[-1] ** -0.5, needs)
    return out, key_metric(k, metric), probs


def custom_attention(attn, x: Tensor, bias: Optional[Tensor], needs: str, mode: str = "auto", metric: bool = True):
    """open_clip's own ``Attention`` (qk-norm, scaled-cosine, head scale, inner norm)."""
    batch, n, c = x.shape
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (_heads(t, batch, n, attn.num_heads) for t in (q, k, v))
    if attn.logit_scale is not None:
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
        logits = logits * torch.clamp(attn.logit_scale, max=attn.logit_scale_max).exp()
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        weights = attn.attn_drop(logits.softmax(dim=-1))
        out = weights @ v
        probs = None if needs == "keys" else (weights[:, :, :1] if needs == "cls_attn" else weights)
    else:
        q, k = attn.ln_q(q), attn.ln_k(k)
        out = sdpa(q, k, v, bias, attn.attn_drop.p if attn.training else 0.0, scale=attn.scale, mode=mode)
        probs = attention_probs(q, k, bias, attn.scale, needs)
    if attn.head_scale is not None:
        out = out * attn.head_scale
    out = attn.ln_inner(out.transpose(1, 2).reshape(batch, n, c))
    out = attn.out_drop(attn.out_proj(out))
    return out, key_metric(k, metric), probs


class MergingResidualBlock(MergingBlock):
    """Mixin for ``ResidualAttentionBlock`` (``nn.MultiheadAttention``)."""

    def _merge_attend(self, x: Tensor, bias: Optional[Tensor], needs: str, mode: str, metric: bool):
        h, metric, probs = mha_attention(self.attn, layer_norm(self.ln_1, x), bias, needs, mode, metric=metric)
        return _layer_scale(self.ls_1, h), metric, probs

    def _merge_mlp(self, x: Tensor) -> Tensor:
        return _layer_scale(self.ls_2, self.mlp(layer_norm(self.ln_2, x)))


class MergingCustomBlock(MergingBlock):
    """Mixin for ``CustomResidualAttentionBlock``."""

    def _merge_attend(self, x: Tensor, bias: Optional[Tensor], needs: str, mode: str, metric: bool):
        h, metric, probs = custom_attention(self.attn, self.ln_1(x), bias, needs, mode, metric=metric)
        return self.ls_1(self.ln_attn(h)), metric, probs

    def _merge_mlp(self, x: Tensor) -> Tensor:
        return self.ls_2(self.mlp(self.ln_2(x)))


def _layer_scale(ls: torch.nn.Module, x: Tensor) -> Tensor:
    """``ls(x)``, skipping the call (not an op, but a module call per block) for ``Identity``."""
    return x if type(ls) is torch.nn.Identity else ls(x)


def _attn_pool(pooler, x: Tensor, size: Optional[Tensor], prop_attn: bool) -> Tensor:
    """open_clip ``AttentionalPooler`` with size-aware keys (log size bias; padding hidden)."""
    batch = x.shape[0]
    keys = pooler.ln_k(x)
    queries = pooler.ln_q(pooler.query).unsqueeze(0).expand(batch, -1, -1)
    mask = None
    if size is not None:
        bias = attention_bias(TokenState(size, True), prop_attn, keys.dtype)  # [B,1,1,S]
        heads = pooler.attn.num_heads
        mask = bias.expand(batch, heads, queries.shape[1], x.shape[1]).reshape(batch * heads, queries.shape[1], x.shape[1])
    return pooler.attn(queries, keys, keys, need_weights=False, attn_mask=mask)[0]


def _global_pool(visual, x: Tensor, size: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    if visual.pool_type == "avg":
        return sized_mean(x[:, 1:], None if size is None else size[:, 1:]), x[:, 1:]
    if visual.pool_type == "tok":
        return x[:, 0], x[:, 1:]
    return x, x


def pool_tokens(visual, x: Tensor, size: Optional[Tensor], prop_attn: bool) -> Tuple[Tensor, Tensor]:
    """(pooled, tokens) of open_clip's ``VisionTransformer`` after its blocks, for tokens of the
    given sizes (None: unmerged), before ``proj``: the class token, a size-weighted average, or
    the attention pooler(s) with a log-size bias on their keys. The merged forward and the reuse
    stream (encoders/reuse/) both pool through it."""
    if visual.attn_pool is not None:
        if visual.attn_pool_contrastive is not None:
            x = visual.ln_post(x)
            tokens = _attn_pool(visual.attn_pool, x, size, prop_attn)
            if visual.attn_pool_type == "parallel":
                pooled = _attn_pool(visual.attn_pool_contrastive, x, size, prop_attn)
            else:
                pooled = _attn_pool(visual.attn_pool_contrastive, tokens, None, prop_attn)
            return pooled, tokens
        x = visual.ln_post(_attn_pool(visual.attn_pool, x, size, prop_attn))
        return _global_pool(visual, x, None)
    if visual.final_ln_after_pool:
        pooled, tokens = _global_pool(visual, x, size)
        return visual.ln_post(pooled), tokens
    return _global_pool(visual, visual.ln_post(x), size)


class MergingVisionTransformer:
    """Mixin for open_clip's ``VisionTransformer``: merged blocks and size-aware pooling."""

    def forward(self, x: Tensor):
        x = self._embeds(x)
        x, state, stats = run_blocks(self.transformer.resblocks, x, self._merge_cfg, self._merge_plan())
        x, size = unmerged_output(x, state)  # unmerge=true: the full grid again
        pooled, tokens = pool_tokens(self, x, size, self._merge_cfg.prop_attn)
        if self.proj is not None:
            pooled = pooled @ self.proj
        self._merge_last = stats
        return (pooled, tokens) if self.output_tokens else pooled
