"""What every model family's patch shares: the per-forward merge plan, the block loop, the
attention bias from token sizes, size-aware pooling and the merge step after attention.

Merge state lives in local variables of one forward: nothing global and no module attribute is
changed while a forward runs. The only write is the record of the finished forward
(``_merge_last``, read by ``token_counts``), made once at its end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from encoders.config import MergeConfig
from encoders.merging import MATCHERS, merge_wavg

Tensor = torch.Tensor


@dataclass
class MergeStats:
    """Record of one forward: per block the requested r, the token count after it, and the
    tokens each image actually merged (an int when every image merged the same number)."""

    requested: List[int] = field(default_factory=list)
    tokens: List[int] = field(default_factory=list)
    merged: List[Any] = field(default_factory=list)

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
        }


@dataclass(frozen=True)
class Plan:
    """Everything a block needs to merge in one forward (immutable)."""

    matcher: Callable
    needs: str  # "keys", "cls_attn" or "attn"
    prop_attn: bool
    protected: int
    options: dict


@dataclass
class TokenState:
    """The token stream between blocks: sizes (None before the first merge) and padding flag."""

    size: Optional[Tensor] = None
    padded: bool = False


def make_plan(cfg: MergeConfig, protected: int, planes: Optional[Tensor]) -> Plan:
    matcher = MATCHERS[cfg.method]
    options = {}
    if cfg.method == "lsh":
        options = dict(cfg.lsh_options(), planes=planes)
    elif cfg.method == "zerotprune":
        options = dict(iters=cfg.iters, prune=cfg.prune)
    return Plan(matcher, getattr(matcher, "needs", "keys"), cfg.prop_attn, protected, options)


def attention_bias(state: TokenState, prop_attn: bool, dtype: torch.dtype) -> Optional[Tensor]:
    """[B, 1, 1, N] additive attention mask: log(size) (proportional attention), or 0/-inf that
    hides padding; None when neither applies (the fused kernel then runs unmasked)."""
    size = state.size
    if size is None:
        return None
    if prop_attn:
        bias = size[..., 0].log()
    elif state.padded:
        bias = torch.zeros_like(size[..., 0]).masked_fill(size[..., 0] <= 0, float("-inf"))
    else:
        return None
    return bias[:, None, None, :].to(dtype)


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
    x: Tensor, state: TokenState, metric: Tensor, attn: Optional[Tensor], r: int, plan: Plan
) -> Tuple[Tensor, TokenState, Any]:
    """Run the matcher and merge; returns (x, new state, tokens merged per image)."""
    if r <= 0:
        return x, state, 0
    merge, _ = plan.matcher(
        metric, r, size=state.size, padded=state.padded, protected=plan.protected, attn=attn, **plan.options
    )
    if getattr(merge, "width", None) is None:  # nothing to merge (too few tokens)
        return x, state, 0
    x, size = merge_wavg(merge, x, state.size, getattr(merge, "weight", None))
    return x, TokenState(size, getattr(merge, "padded", False)), merge.num_merged


def run_blocks(blocks: Sequence[torch.nn.Module], x: Tensor, cfg: MergeConfig, plan: Plan) -> Tuple[Tensor, TokenState, MergeStats]:
    """Run the (patched) blocks with the per-layer schedule; returns tokens, sizes and the record."""
    wanted = cfg.wanted(len(blocks))
    state = TokenState()
    stats = MergeStats()
    for block, want in zip(blocks, wanted):
        # Clamped against the tokens actually present: after a shortfall (lsh) later blocks may
        # take more, as the budget allows.
        r = cfg.layer_r(want, int(x.shape[1]), plan.protected)
        stats.requested.append(r)
        x, state, merged = block.merged_forward(x, state, r, plan)
        stats.tokens.append(int(x.shape[1]))
        stats.merged.append(merged)
    return x, state, stats


def sized_mean(x: Tensor, size: Optional[Tensor]) -> Tensor:
    """Mean over tokens, each weighted by the number of patches it stands for."""
    if size is None:
        return x.mean(dim=1)
    return (x * size).sum(dim=1) / size.sum(dim=1)


def sized_max(x: Tensor, size: Optional[Tensor]) -> Tensor:
    if size is None:
        return x.amax(dim=1)
    return x.masked_fill(size <= 0, float("-inf")).amax(dim=1)


def sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], dropout_p: float = 0.0) -> Tensor:
    if bias is not None:
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)


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
