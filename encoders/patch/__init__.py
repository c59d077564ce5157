"""Install token merging into live models by swapping the classes of their module instances.

``apply_merging(model, cfg)`` accepts an open_clip CLIP model, its ``.visual`` or a timm
``VisionTransformer``; weights and the model zoo stay untouched, and ``remove_merging`` restores
the original classes.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch

from mergeseek.encoders.config import MergeConfig
from mergeseek.encoders.merging import REGISTRY, simhash_planes
from mergeseek.encoders.patch.common import MergeStats, make_plan, restore_class, swap_class
from mergeseek.errors import UnsupportedModelError

__all__ = ["apply_merging", "merge_stats", "remove_merging", "token_counts", "vit_shape", "MergeStats"]


class _MergingModel:
    """Shared part of the model-level mixins: the per-forward plan."""

    def _merge_plan(self):
        return make_plan(self._merge_cfg, self._merge_protected, getattr(self, "_merge_planes", None))


def _family(model: torch.nn.Module):
    """(root module that runs the blocks, blocks, family name)."""
    try:
        from open_clip.transformer import VisionTransformer as OpenClipViT
    except ImportError:  # pragma: no cover - open_clip is a dependency
        OpenClipViT = ()
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except ImportError:  # pragma: no cover
        TimmViT = ()
    visual = _root(model)
    base = getattr(visual, "_merge_orig_class", type(visual))
    if OpenClipViT and issubclass(base, OpenClipViT):
        return visual, list(visual.transformer.resblocks), "open_clip"
    if TimmViT and issubclass(base, TimmViT):
        return visual, list(visual.blocks), "timm"
    inner = getattr(visual, "trunk", None)
    raise UnsupportedModelError(
        f"token merging supports open_clip VisionTransformer (or a CLIP model using one) and timm VisionTransformer "
        f"(also as the trunk of open_clip's TimmModel, e.g. SigLIP); got {type(visual).__name__}"
        + (f" around {type(inner).__name__}" if inner is not None else "")
    )


def apply_merging(model: torch.nn.Module, cfg: Union[MergeConfig, str, None]) -> torch.nn.Module:
    """Patch ``model`` in place to merge tokens as ``cfg`` says; returns the model.

    Calling it again replaces the previous config. ``method=none`` removes the patch.
    """
    cfg = MergeConfig.parse(cfg)
    if not cfg.enabled:
        return remove_merging(model)
    root, blocks, family = _family(model)
    cfg.spec.fn  # import the matcher now, not inside a (possibly compiled) forward
    if family == "open_clip":
        from mergeseek.encoders.patch import open_clip as fam

        fam.check_vision_transformer(root)
        mixins = [fam.block_mixin(b) for b in blocks]
        root_mixin, protected = fam.MergingVisionTransformer, 1
    else:
        from mergeseek.encoders.patch import timm as fam

        fam.check_vit(root)
        mixins = [fam.MergingTimmBlock] * len(blocks)
        root_mixin, protected = fam.MergingTimmViT, int(root.num_prefix_tokens)
    if cfg.spec.needs_prefix and protected == 0:
        raise UnsupportedModelError(
            f"method={cfg.method} scores tokens by the class token's attention and this model has no class token; "
            f"use method={'|'.join(s.name for s in REGISTRY.values() if not s.needs_prefix)}"
        )
    for block, mixin in zip(blocks, mixins):
        swap_class(block, mixin)
    swap_class(root, _root_mixin(root_mixin))
    root._merge_cfg = cfg
    root._merge_protected = protected
    root._merge_last = None
    if "_merge_planes" in root._buffers:
        del root._buffers["_merge_planes"]
    if cfg.method == "lsh":
        head_dim = _metric_dim(root, family)
        ref = next(root.parameters())
        planes = simhash_planes(head_dim, cfg.lsh_bits, cfg.lsh_tables, cfg.seed, device=ref.device)
        root.register_buffer("_merge_planes", planes, persistent=False)
    return model


_ROOT_MIXINS: dict = {}


def _root_mixin(mixin: type) -> type:
    if mixin not in _ROOT_MIXINS:
        _ROOT_MIXINS[mixin] = type(mixin.__name__, (mixin, _MergingModel), {})
    return _ROOT_MIXINS[mixin]


def _metric_dim(root: torch.nn.Module, family: str) -> int:
    if family == "timm":
        return int(root.blocks[0].attn.head_dim)
    attn = root.transformer.resblocks[0].attn
    return int(attn.embed_dim // attn.num_heads) if hasattr(attn, "embed_dim") else int(attn.head_dim)


def remove_merging(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``apply_merging`` (no-op on an unpatched model); returns the model."""
    try:
        root, blocks, _ = _family(model)
    except UnsupportedModelError:
        return model
    for block in blocks:
        restore_class(block)
    restore_class(root)
    for attr in ("_merge_cfg", "_merge_protected", "_merge_last"):
        root.__dict__.pop(attr, None)
    root._buffers.pop("_merge_planes", None)
    return model


def _root(model: torch.nn.Module) -> torch.nn.Module:
    """The module that runs the blocks: ``model.visual`` of a CLIP model, or the timm ViT trunk of
    open_clip's ``TimmModel`` tower (SigLIP, SigLIP2: ``visual = TimmModel(trunk, head)``)."""
    visual = getattr(model, "visual", model)
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and _is_timm_vit(trunk):
        return trunk
    return visual


def _is_timm_vit(module) -> bool:
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except ImportError:  # pragma: no cover
        return False
    return issubclass(getattr(module, "_merge_orig_class", type(module)), TimmViT)


def last_stats(model: torch.nn.Module) -> Optional[MergeStats]:
    return getattr(_root(model), "_merge_last", None)


def token_counts(model: torch.nn.Module) -> List[int]:
    """Tokens after each block in the last forward of a patched model ([] before any forward).

    On an unpatched model the count is constant and is reported from the patch-free shape:
    patches + prefix tokens for every block.
    """
    stats = last_stats(model)
    if stats is not None:
        return list(stats.tokens)
    root = _root(model)
    if hasattr(root, "_merge_cfg"):
        return []
    _, blocks, family = _family(model)
    if family == "open_clip":
        gh, gw = root.grid_size
        n = gh * gw + 1
    else:
        n = int(root.patch_embed.num_patches) + int(root.num_prefix_tokens)
    return [n] * len(blocks)


def vit_shape(model: torch.nn.Module) -> tuple:
    """(width, MLP hidden / width) of the ViT that merging patches in ``model`` (a CLIP model, its
    tower, a timm ViT, or open_clip's TimmModel around one): the inputs of the FLOP model."""
    root, blocks, family = _family(model)
    if family == "open_clip":
        return int(root.transformer.width), blocks[0].mlp.c_fc.out_features / float(root.transformer.width)
    return int(root.embed_dim), blocks[0].mlp.fc1.out_features / float(root.embed_dim)


def merge_stats(model: torch.nn.Module) -> dict:
    """Requested r, tokens, and tokens actually merged (min/mean over the batch) per block."""
    stats = last_stats(model)
    return stats.summary() if stats is not None else {}
