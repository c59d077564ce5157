"""Install token merging into live models by swapping the classes of their module instances.

``apply_merging(model, cfg)`` accepts an open_clip CLIP model, its ``.visual``, a timm
``VisionTransformer`` or transformers' ``ASTModel`` / ``ASTForAudioClassification``; weights and
the model zoo stay untouched, and ``remove_merging`` restores the original classes. Which blocks
and mixins a model has is its family adapter's answer (``encoders.family``); what a method keeps
per model (lsh: its hyperplanes) is its registry entry's (``MatcherSpec.state``), kept as buffers
of the patched module.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Union

import torch

from mergeseek.encoders.config import MergeConfig
from mergeseek.encoders.family import root_of, vit_family
from mergeseek.encoders.merging import REGISTRY
from mergeseek.encoders.patch.common import MergeStats, make_plan, restore_class, swap_class
from mergeseek.errors import UnsupportedModelError

__all__ = ["apply_merging", "merge_stats", "method_state", "remove_merging", "token_counts", "vit_shape", "MergeStats"]


class _MergingModel:
    """Shared part of the model-level mixins: the per-forward plan."""

    def _merge_plan(self):
        return make_plan(self._merge_cfg, self._merge_protected, {k: getattr(self, "_merge_" + k) for k in self._merge_state})


def apply_merging(model: torch.nn.Module, cfg: Union[MergeConfig, str, None]) -> torch.nn.Module:
    """Patch ``model`` in place to merge tokens as ``cfg`` says; returns the model.

    Calling it again replaces the previous config. ``method=none`` removes the patch.
    """
    cfg = MergeConfig.parse(cfg)
    if not cfg.enabled:
        return remove_merging(model)
    fam = vit_family(model)
    cfg.spec.fn  # import the matcher now, not inside a (possibly compiled) forward
    mixins, root_mixin = fam.merge_mixins()
    if cfg.spec.needs_prefix and fam.protected == 0:
        raise UnsupportedModelError(
            f"method={cfg.method} scores tokens by the class token's attention and this model has no class token; "
            f"use method={'|'.join(s.name for s in REGISTRY.values() if not s.needs_prefix)}"
        )
    for block, mixin in zip(fam.blocks, mixins):
        swap_class(block, mixin)
    root = fam.root
    swap_class(root, _root_mixin(root_mixin))
    root._merge_cfg = cfg
    root._merge_protected = fam.protected
    root._merge_last = None
    _drop_state(root)
    state = cfg.matcher_state(_metric_dim(fam, cfg), next(root.parameters()).device) if cfg.spec.state else {}
    for name, tensor in state.items():
        root.register_buffer("_merge_" + name, tensor, persistent=False)
    root._merge_state = tuple(state)
    return model


def method_state(fam, cfg: MergeConfig) -> Dict[str, torch.Tensor]:
    """The tensors ``cfg``'s method keeps per model (``MatcherSpec.state``): the patched module's
    buffers when it was patched with ``cfg``, else made now (the same values: they are seeded)."""
    root = fam.root
    if getattr(root, "_merge_cfg", None) == cfg:
        return {k: getattr(root, "_merge_" + k) for k in root._merge_state}
    return cfg.matcher_state(_metric_dim(fam, cfg), next(root.parameters()).device) if cfg.spec.state else {}


def _metric_dim(fam, cfg: MergeConfig) -> int:
    """Width of the matchers' metric: a head's (``metric=keys``) or all heads' (``metric=heads``)."""
    return fam.vit_shape()[0] if cfg.metric == "heads" else fam.head_dim


def _drop_state(root: torch.nn.Module) -> None:
    for name in root.__dict__.pop("_merge_state", ()):
        root._buffers.pop("_merge_" + name, None)


_ROOT_MIXINS: dict = {}


def _root_mixin(mixin: type) -> type:
    if mixin not in _ROOT_MIXINS:
        _ROOT_MIXINS[mixin] = type(mixin.__name__, (mixin, _MergingModel), {})
    return _ROOT_MIXINS[mixin]


def remove_merging(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``apply_merging`` (no-op on an unpatched model); returns the model."""
    try:
        fam = vit_family(model)
    except UnsupportedModelError:
        return model
    for block in fam.blocks:
        restore_class(block)
    root = fam.root
    restore_class(root)
    for attr in ("_merge_cfg", "_merge_protected", "_merge_last"):
        root.__dict__.pop(attr, None)
    _drop_state(root)
    return model


def last_stats(model: torch.nn.Module) -> Optional[MergeStats]:
    return getattr(root_of(model), "_merge_last", None)


def token_counts(model: torch.nn.Module) -> List[int]:
    """Tokens after each block in the last forward of a patched model ([] before any forward).

    On an unpatched model the count is constant and is reported from the patch-free shape:
    patches + prefix tokens for every block.
    """
    stats = last_stats(model)
    if stats is not None:
        return list(stats.tokens)
    if hasattr(root_of(model), "_merge_cfg"):
        return []
    fam = vit_family(model)
    return [fam.tokens_in()] * len(fam.blocks)


def vit_shape(model: torch.nn.Module) -> tuple:
    """(width, MLP hidden / width) of the ViT that merging patches in ``model`` (a CLIP model, its
    tower, a timm ViT, or open_clip's TimmModel around one): the inputs of the FLOP model."""
    return vit_family(model).vit_shape()


def merge_stats(model: torch.nn.Module) -> dict:
    """Requested r, tokens, and tokens actually merged (min/mean over the batch) per block."""
    stats = last_stats(model)
    return stats.summary() if stats is not None else {}
