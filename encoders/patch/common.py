"""What every model family's patch shares: the per-forward merge plan, the block step and loop,
the attention bias from token sizes, size-aware pooling and the merge step after attention.

Merge state lives in local variables of one forward: nothing global and no module attribute is
changed while a forward runs. The only write is the record of the finished forward
(``_merge_last``, read by ``token_counts``), made once at its end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from mergeseek.encoders.config import MergeConfig
from mergeseek.encoders.merging import merge_wavg
from mergeseek.encoders.merging.registry import MergeResult
from mergeseek.encoders.merging.unmerge import advance, start_index, unmerge_tokens

Tensor = torch.Tensor


@dataclass
class MergeStats:
    """Record of one forward: per block the requested r, the token count after it, and the
    tokens each image actually merged (an int when every image merged the same number)."""

    requested: List[int] = field(default_factory=list)
    tokens: List[int] = field(default_factory=list)
    merged: List[Any] = field(default_factory=list)
    fallback: List[Any] = field(default_factory=list)

    def summary(self) -> dict:
        merged_min, merged_mean = [], []
        for m in self.merged:
            if isinstance(m, torch.Tensor):
                merged_min.append(int(m.min()))
                merged_mean.append(float(m.float().mean()))
            else:
                merged_min.append(int(m))
                merged_mean.append(float(m))
        return {
            "requested": list(self.requested),
            "tokens": list(self.tokens),
            "merged_min": merged_min,
            "merged_mean": merged_mean,
            "shortfall": int(sum(r - m for r, m in zip(self.requested, merged_min))),
            # lsh: merged edges per block (max over the batch) that came from the fallback search
            "fallback_max": [int(f.max()) if isinstance(f, torch.Tensor) else int(f) for f in self.fallback],
        }


@dataclass(frozen=True)
class Plan:
    """Everything a block needs to merge in one forward (immutable)."""

    matcher: Callable
    needs: str  # "keys", "cls_attn" or "attn" (from the method's MatcherSpec)
    prop_attn: bool
    protected: int
    options: dict
    attn_mode: str = "auto"  # how log(size) reaches the fused attention: "auto", "channel" or "mask"
    mlerp: bool = False  # norm-preserving merge (MergeConfig.merge)
    metric: str = "keys"  # what similarity is measured on (MergeConfig.metric, key_metric)
    tokens: bool = False  # the matcher also gets the block's tokens (MatcherSpec.tokens)


@dataclass
class TokenState:
    """The token stream between blocks: sizes (None before the first merge), padding flag, and
    with ``unmerge`` the current slot of every original position (``encoders/merging/unmerge.py``)."""

    size: Optional[Tensor] = None
    padded: bool = False
    index: Optional[Tensor] = None


def make_plan(cfg: MergeConfig, protected: int, state: Optional[Dict[str, Tensor]] = None,
              attn_mode: Optional[str] = None) -> Plan:
    """The plan of one forward: the method's matcher, what it needs, its options and the tensors
    it keeps per model (``state``, from ``MatcherSpec.state``)."""
    spec = cfg.spec
    options = cfg.matcher_options()
    if state:
        options = dict(options, **state)
    return Plan(spec.fn, spec.needs, cfg.prop_attn, protected, options, attn_mode or default_attn_mode(),
                cfg.merge == "mlerp", cfg.metric, spec.tokens)


ATTN_MODES = ("auto", "channel", "mask")


def default_attn_mode() -> str:
    """How log(size) reaches the fused attention (``MERGESEEK_PROP_ATTN``, default ``auto``).

    ``channel``: inside the dot product (:func:`channel_sdpa`; no mask, so FlashAttention stays
    eligible); ``mask``: as ``attn_mask``; ``auto``: ``channel`` under torch.compile and off the
    CPU, ``mask`` in eager CPU runs, where the masked kernel was faster in most measured runs
    (5-15% per merged ViT-B-16 forward; docs/MERGING.md).
    """
    if torch.compiler.is_compiling():
        return "auto"
    mode = os.environ.get("MERGESEEK_PROP_ATTN", "auto").strip().lower()
    return mode if mode in ATTN_MODES else "auto"


def key_metric(k: Tensor, kind) -> Optional[Tensor]:
    """The matchers' metric from an attention's keys [B, H, N, D]: ``keys`` (or True) the
    head-averaged keys [B, N, D] (ToMe's); ``heads`` every head's keys unit-normalised and
    concatenated [B, N, H * D], whose cosine is the mean of the per-head cosines; None for a
    false ``kind`` (the block does not merge)."""
    if not kind:
        return None
    if kind is True or kind == "keys":
        return k.mean(dim=1)
    b, h, n, d = k.shape
    unit = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit.transpose(1, 2).reshape(b, n, h * d)


def attention_bias(state: TokenState, prop_attn: bool, dtype: torch.dtype) -> Optional[Tensor]:
    """[B, 1, 1, N] additive attention mask: log(size) (proportional attention), or 0/-inf that
    hides padding; None when neither applies (the fused kernel then runs unmasked)."""
    size = state.size
    if size is None:
        return None
    if prop_attn:
        bias = size.log()  # [B, N, 1], contiguous
    elif state.padded:
        bias = torch.zeros_like(size).masked_fill_(size <= 0, float("-inf"))
    else:
        return None
    bias = bias.view(size.shape[0], 1, 1, size.shape[1])
    return bias if bias.dtype == dtype else bias.to(dtype)


def channel_sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float, dropout_p: float = 0.0) -> Tensor:
    """Fused attention with an additive per-key bias but no ``attn_mask``.

    ``softmax(q.k * scale + bias_j)`` equals ``softmax(q'.k' * scale)`` with one more channel: 1 in
    every query, ``bias_j / scale`` in key j (log(size) for proportional attention; log(0) = -inf
    hides a size-0 key, as the mask did, and 1 * -inf stays -inf). The head dim is padded with
    zeros to a multiple of 8 (what the flash / memory-efficient kernels take), ``scale`` is passed
    explicitly (the kernel would otherwise use the padded dim) and the output's extra channels are
    cut off.

    Args:
        q, k, v: [B, H, N, D].
        bias: [B, 1, 1, N] additive key bias, or None (plain fused attention).
        scale: the attention's own logit scale (usually D ** -0.5).
    """
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    b, h, n, d = k.shape
    extra = -(-(d + 1) // 8) * 8 - d
    # Every extra query channel is 1 and every extra key channel 0 except the first, which holds
    # bias / scale: the dot product gains exactly bias_j / scale (1 * 0 adds nothing).
    key_bias = (bias.float() / scale).to(k.dtype).view(b, 1, n, 1)
    if extra > 1:
        key_bias = F.pad(key_bias, (0, extra - 1))
    q2 = F.pad(q, (0, extra), value=1.0)
    k2 = torch.cat([k, key_bias.expand(b, h, n, extra)], dim=-1)
    v2 = F.pad(v, (0, extra))
    out = F.scaled_dot_product_attention(q2, k2, v2, dropout_p=dropout_p, scale=scale)
    return out[..., :d]


def attention_probs(q: Tensor, k: Tensor, bias: Optional[Tensor], scale: float, needs: str) -> Optional[Tensor]:
    """Softmax attention probabilities, only where a matcher asks for them.

    ``cls_attn``: the class token's row only, [B, H, 1, N] (cheap); ``attn``: the full matrix.
    """
    if needs == "keys":
        return None
    rows = q[:, :, :1] if needs == "cls_attn" else q
    logits = (rows @ k.transpose(-1, -2)).float() * scale
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1)


def merge_tokens(
    x: Tensor, state: TokenState, metric: Tensor, attn: Optional[Tensor], r: int, plan: Plan,
    scored: Optional[Tensor] = None,
) -> Tuple[Tensor, TokenState, Any]:
    """Run the matcher and merge; returns (x, new state, tokens merged per image). ``scored``: the
    block's tokens for a matcher that scores them (``MatcherSpec.tokens``) when ``x`` carries more
    columns than the tokens (the reuse pass appends an identity block); default ``x``."""
    if r <= 0:
        return x, state, 0
    extra = {"tokens": x if scored is None else scored} if plan.tokens else {}
    result: MergeResult = plan.matcher(
        metric, r, size=state.size, padded=state.padded, protected=plan.protected, attn=attn, **plan.options, **extra
    )
    if result.identity:  # nothing to merge (too few tokens)
        return x, state, result
    x, size = merge_wavg(result, x, state.size, mlerp=plan.mlerp)
    index = None if state.index is None else advance(state.index, result)
    return x, TokenState(size, result.padded, index), result


class MergingBlock:
    """Mixin base of every family's block: attention, merge, then MLP (ToMe's order).

    A family's mixin gives ``_merge_attend(x, bias, needs, mode, metric) -> (attention branch,
    metric or None, probabilities or None)`` and ``_merge_mlp(x) -> MLP branch``, both with the
    block's LayerScale applied; the residual adds and the merge between them live here.
    """

    def merged_forward(self, x: Tensor, state: TokenState, r: int, plan: Plan):
        bias = attention_bias(state, plan.prop_attn, x.dtype)
        h, metric, probs = self._merge_attend(x, bias, plan.needs if r > 0 else "keys", plan.attn_mode,
                                              plan.metric if r > 0 else None)
        x = x + h
        x, state, merged = merge_tokens(x, state, metric, probs, r, plan)
        x = x + self._merge_mlp(x)
        return x, state, merged


def run_blocks(blocks: Sequence[torch.nn.Module], x: Tensor, cfg: MergeConfig, plan: Plan,
               on_block: Optional[Callable[[int, Tensor, TokenState], None]] = None) -> Tuple[Tensor, TokenState, MergeStats]:
    """Run the (patched) blocks with the per-layer schedule; returns tokens, sizes and the record.

    With ``cfg.unmerge`` the state tracks each original position's slot (``state.index``);
    ``on_block(i, x, state)`` is called after block i (intermediate features)."""
    wanted = cfg.wanted(len(blocks))
    state = TokenState(index=start_index(x) if cfg.unmerge else None)
    stats = MergeStats()
    for i, (block, want) in enumerate(zip(blocks, wanted)):
        # Clamped against the tokens actually present: after a shortfall (lsh) later blocks may
        # take more, as the budget allows.
        r = cfg.layer_r(want, int(x.shape[1]), plan.protected)
        stats.requested.append(r)
        x, state, result = block.merged_forward(x, state, r, plan)
        stats.tokens.append(int(x.shape[1]))
        stats.merged.append(result.num_merged if isinstance(result, MergeResult) else result)
        fallback = result.fallback if isinstance(result, MergeResult) else None
        stats.fallback.append(0 if fallback is None else fallback)
        if on_block is not None:
            on_block(i, x, state)
    return x, state, stats


def unmerged_output(x: Tensor, state: TokenState) -> Tuple[Tensor, Optional[Tensor]]:
    """(tokens, sizes) the model ends with: with ``unmerge`` the full grid (every original position
    its merged token's value) and sizes None (each position is one patch again; the plain mean
    over the grid equals the size-weighted mean over merged tokens), else as they are."""
    if state.index is None:
        return x, state.size
    return unmerge_tokens(x, state.index), None


def sized_mean(x: Tensor, size: Optional[Tensor]) -> Tensor:
    """Mean over tokens, each weighted by the number of patches it stands for."""
    if size is None:
        return x.mean(dim=1)
    return (x * size).sum(dim=1) / size.sum(dim=1)


def sized_max(x: Tensor, size: Optional[Tensor]) -> Tensor:
    if size is None:
        return x.amax(dim=1)
    return x.masked_fill(size <= 0, float("-inf")).amax(dim=1)


def sdpa(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], dropout_p: float = 0.0,
    scale: Optional[float] = None, mode: str = "mask",
) -> Tensor:
    """Fused attention with an additive key bias: as ``attn_mask`` (``mode="mask"``) or as an
    extra channel of the dot product (``mode="channel"``, :func:`channel_sdpa`; no mask);
    ``auto``: channel under torch.compile and off the CPU, else mask (see ``default_attn_mode``)."""
    if mode == "auto":
        mode = "channel" if (q.device.type != "cpu" or torch.compiler.is_compiling()) else "mask"
    if mode == "channel":
        return channel_sdpa(q, k, v, bias, q.shape[-1] ** -0.5 if scale is None else scale, dropout_p)
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


def layer_norm(module: torch.nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` in one dispatched op for torch's ``LayerNorm`` and open_clip's (which casts
    back to the input dtype: only when that is another dtype); other norms are called as they are."""
    cls = type(module)
    if cls is torch.nn.LayerNorm:
        return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
    if cls.__name__ == "LayerNorm" and cls.__module__.startswith("open_clip"):  # casts back to the input dtype
        out = F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
        return out if out.dtype == x.dtype else out.to(x.dtype)
    return module(x)


_SUBCLASSES: dict = {}


def swap_class(module: torch.nn.Module, mixin: type) -> None:
    """Give a live module a subclass of its class that adds ``mixin`` (weights untouched)."""
    cls = module.__class__
    if getattr(module, "_merge_orig_class", None) is not None:
        cls = module._merge_orig_class
    key = (mixin, cls)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"Merging{cls.__name__}", (mixin, cls), {})
    module._merge_orig_class = cls
    module.__class__ = _SUBCLASSES[key]


def restore_class(module: torch.nn.Module) -> None:
    cls = getattr(module, "_merge_orig_class", None)
    if cls is not None:
        module.__class__ = cls
        del module._merge_orig_class
