"""One adapter per ViT family: open_clip's ``VisionTransformer``, timm's (also as the trunk of
open_clip's ``TimmModel``, e.g. SigLIP) and transformers' Audio Spectrogram Transformer.

This is the only module that tells the families apart and checks their block classes. Token
merging (``encoders.patch``: where the blocks are, which mixins to install), its removal, the
token counts and reuse across frames (``encoders.reuse``: the parts of a block it calls one by
one) all ask the adapter that :func:`vit_family` returns, so a new family is one class here.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from mergeseek.errors import UnsupportedModelError

Tensor = torch.Tensor


def base_class(module: torch.nn.Module) -> type:
    """The class of ``module`` before merging swapped it (``encoders.patch.common.swap_class``)."""
    return getattr(module, "_merge_orig_class", type(module))


def _open_clip_vit() -> Optional[type]:
    try:
        from open_clip.transformer import VisionTransformer
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return None
    return VisionTransformer


def _timm_vit() -> Optional[type]:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    return VisionTransformer


def _hf_ast() -> Optional[type]:
    """transformers' ``ASTModel`` once transformers has loaded it (no model of it exists before, so
    nothing is imported here: asking costs nothing when transformers is absent or unused)."""
    module = sys.modules.get("transformers.models.audio_spectrogram_transformer.modeling_audio_spectrogram_transformer")
    return getattr(module, "ASTModel", None)


def _is(module: Optional[torch.nn.Module], cls: Optional[type]) -> bool:
    return module is not None and cls is not None and issubclass(base_class(module), cls)


def root_of(model: torch.nn.Module) -> torch.nn.Module:
    """The module that runs the blocks: ``model.visual`` of a CLIP model, or the timm ViT trunk of
    open_clip's ``TimmModel`` tower (SigLIP, SigLIP2: ``visual = TimmModel(trunk, head)``)."""
    visual = getattr(model, "visual", model)
    ast = getattr(visual, "audio_spectrogram_transformer", None)  # ASTForAudioClassification's ASTModel
    if _is(ast, _hf_ast()):
        return ast
    trunk = getattr(visual, "trunk", None)
    return trunk if _is(trunk, _timm_vit()) else visual


def vit_family(model: torch.nn.Module, use: str = "token merging", hint: str = "") -> "Family":
    """The adapter of an open_clip CLIP model, its ``.visual``, a timm ViT or open_clip's TimmModel
    around one. ``use`` and ``hint`` word the refusal of any other model."""
    visual = getattr(model, "visual", model)
    root = root_of(model)
    if _is(root, _open_clip_vit()):
        return OpenClipFamily(root)
    if _is(root, _timm_vit()):
        return TimmFamily(root, after=None if root is visual else visual.head)
    if _is(root, _hf_ast()):
        return HfAstFamily(root)
    inner = getattr(visual, "trunk", None)
    raise UnsupportedModelError(
        f"{use} supports open_clip VisionTransformer (or a CLIP model using one), timm VisionTransformer "
        f"(also as the trunk of open_clip's TimmModel, e.g. SigLIP) and transformers' ASTModel / "
        f"ASTForAudioClassification; got {type(visual).__name__}"
        + (f" around {type(inner).__name__}" if inner is not None else "") + hint
    )


class Family:
    """Where the parts of one ViT are and how to call them.

    Args:
        root: the module that runs the blocks (the one merging patches).
        blocks: its transformer blocks, in order.
        protected: leading prefix tokens never merged (class, distillation, register tokens).
        after: a module applied to the root's output (open_clip TimmModel's head), or None.

    Merging asks for :meth:`merge_mixins`, :attr:`head_dim` (the metric's width) and
    :meth:`tokens_in`; reuse calls the block parts one by one (:meth:`patches` to :meth:`pool`).
    """

    def __init__(self, root: torch.nn.Module, blocks: List[torch.nn.Module], protected: int,
                 after: Optional[torch.nn.Module] = None) -> None:
        self.root, self.blocks, self.protected, self.after = root, blocks, protected, after

    # ------------------------------------------------------------------ shape
    @functools.cached_property
    def heads(self) -> int:
        return int(self.blocks[0].attn.num_heads)

    def vit_shape(self) -> Tuple[int, float]:
        """(width, MLP hidden / width): the inputs of the FLOP model."""
        return self.width, self.hidden / float(self.width)

    # ------------------------------------------------------------------ merging
    def merge_mixins(self) -> Tuple[List[type], type]:
        """(one mixin per block, the root's mixin) that install token merging; refuses blocks the
        merged forward cannot compute exactly."""
        raise NotImplementedError

    def tokens_in(self) -> int:
        """Tokens entering the first block of the unmerged model."""
        raise NotImplementedError

    # ------------------------------------------------------------------ reuse (per part of a block)
    def check_reuse(self) -> None:
        """Refuse what the reuse stream cannot compute part by part."""
        raise NotImplementedError

    def patches(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError

    def tokens(self, patches: Tensor) -> Tensor:
        raise NotImplementedError

    def ln1(self, b, x: Tensor) -> Tensor:
        raise NotImplementedError

    def qkv(self, b, h: Tensor) -> Tensor:
        raise NotImplementedError

    def qk(self, b, q: Tensor, k: Tensor) -> Tuple[Tensor, Tensor, float]:
        raise NotImplementedError

    def proj(self, b, a: Tensor) -> Tensor:
        raise NotImplementedError

    def mlp(self, b, y: Tensor) -> Tensor:
        raise NotImplementedError

    def pool(self, x: Tensor, size: Optional[Tensor], prop_attn: bool) -> Tensor:
        raise NotImplementedError


class OpenClipFamily(Family):
    """open_clip's ``VisionTransformer``: ``transformer.resblocks``, one class token."""

    def __init__(self, root: torch.nn.Module) -> None:
        super().__init__(root, list(root.transformer.resblocks), 1)

    @functools.cached_property
    def width(self) -> int:
        return int(self.root.transformer.width)

    @functools.cached_property
    def head_dim(self) -> int:
        attn = self.blocks[0].attn
        return int(attn.embed_dim // attn.num_heads) if hasattr(attn, "embed_dim") else int(attn.head_dim)

    @functools.cached_property
    def hidden(self) -> int:
        return int(self.blocks[0].mlp.c_fc.out_features)

    def merge_mixins(self) -> Tuple[List[type], type]:
        from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

        from mergeseek.encoders.patch import open_clip as patch

        if not getattr(self.root.transformer, "batch_first", True):
            raise UnsupportedModelError("this open_clip VisionTransformer runs sequence-first; upgrade open_clip_torch to >= 2.24")
        mixins = []
        for block in self.blocks:
            cls = base_class(block)
            if cls is ResidualAttentionBlock and hasattr(block, "ln_1_kv"):
                raise UnsupportedModelError("open_clip cross-attention blocks cannot merge tokens; merge only the image tower")
            if cls is ResidualAttentionBlock:
                mixins.append(patch.MergingResidualBlock)
            elif cls is CustomResidualAttentionBlock:
                mixins.append(patch.MergingCustomBlock)
            else:
                raise UnsupportedModelError(f"open_clip block {cls.__name__} is not supported for token merging; "
                                            "supported: ResidualAttentionBlock, CustomResidualAttentionBlock")
        return mixins, patch.MergingVisionTransformer

    def tokens_in(self) -> int:
        gh, gw = self.root.grid_size
        return gh * gw + 1

    def check_reuse(self) -> None:
        from open_clip.transformer import ResidualAttentionBlock

        root = self.root
        if getattr(root, "attn_pool", None) is None and root.pool_type not in ("tok", "avg"):
            raise UnsupportedModelError(f"reuse supports pool_type tok and avg or an attention pooler, not {root.pool_type!r}")
        for i, b in enumerate(self.blocks):
            cls = base_class(b)
            if cls is not ResidualAttentionBlock or hasattr(b, "ln_1_kv"):
                raise UnsupportedModelError(f"reuse supports open_clip ResidualAttentionBlock; block {i} is {cls.__name__}")

    def patches(self, pixels: Tensor) -> Tensor:
        x = self.root.conv1(pixels)
        return x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)

    def tokens(self, patches: Tensor) -> Tensor:
        r = self.root
        cls = r.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1) + r.positional_embedding.to(patches.dtype)
        return r.ln_pre(r.patch_dropout(x))

    def ln1(self, b, x: Tensor) -> Tensor:
        return b.ln_1(x)

    def qkv(self, b, h: Tensor) -> Tensor:
        return F.linear(h, b.attn.in_proj_weight, b.attn.in_proj_bias)

    def qk(self, b, q: Tensor, k: Tensor) -> Tuple[Tensor, Tensor, float]:
        return q, k, q.shape[-1] ** -0.5

    def proj(self, b, a: Tensor) -> Tensor:
        return b.ls_1(b.attn.out_proj(a))

    def mlp(self, b, y: Tensor) -> Tensor:
        return b.ls_2(b.mlp(b.ln_2(y)))

    def pool(self, x: Tensor, size: Optional[Tensor], prop_attn: bool) -> Tensor:
        from mergeseek.encoders.patch.open_clip import pool_tokens

        r = self.root
        pooled = pool_tokens(r, x, size, prop_attn)[0]
        return pooled @ r.proj if r.proj is not None else pooled


class TimmFamily(Family):
    """timm's ``VisionTransformer``: ``blocks``, ``num_prefix_tokens`` prefix tokens; ``after``:
    the head of open_clip's ``TimmModel`` around it."""

    def __init__(self, root: torch.nn.Module, after: Optional[torch.nn.Module] = None) -> None:
        super().__init__(root, list(root.blocks), int(root.num_prefix_tokens), after)

    @functools.cached_property
    def width(self) -> int:
        return int(self.root.embed_dim)

    @functools.cached_property
    def head_dim(self) -> int:
        return int(self.blocks[0].attn.head_dim)

    @functools.cached_property
    def hidden(self) -> int:
        return int(self.blocks[0].mlp.fc1.out_features)

    def _check_blocks(self, use: str, gate: bool) -> None:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        for i, blk in enumerate(self.blocks):
            cls = base_class(blk)
            attn_cls = type(getattr(blk, "attn", None))
            gated = getattr(blk.attn, "gate", None) is not None if attn_cls is Attention else False
            if cls is not Block or attn_cls is not Attention or (gated and not gate):
                raise UnsupportedModelError(
                    f"timm block {i} is {cls.__name__} with {attn_cls.__name__}{' (gated)' if gated else ''}; {use} "
                    f"supports the plain vision_transformer.Block with timm.layers.Attention{'' if gate else ' without a gate'} "
                    "(ViT, DeiT, MAE-style)"
                )

    def merge_mixins(self) -> Tuple[List[type], type]:
        from mergeseek.encoders.patch import timm as patch

        check_attn_pool(getattr(self.root, "attn_pool", None))
        self._check_blocks("token merging", gate=True)
        return [patch.MergingTimmBlock] * len(self.blocks), patch.MergingTimmViT

    def tokens_in(self) -> int:
        return int(self.root.patch_embed.num_patches) + self.protected

    def check_reuse(self) -> None:
        root = self.root
        if getattr(root, "attn_pool", None) is not None:
            check_attn_pool(root.attn_pool)  # SigLIP's MAP head (sizes as a log bias on its keys)
        elif root.global_pool not in ("token", "avg", "max", "avgmax"):
            raise UnsupportedModelError(f"reuse supports timm global_pool token, avg, max, avgmax or map, not {root.global_pool!r}")
        self._check_blocks("reuse", gate=False)

    def patches(self, pixels: Tensor) -> Tensor:
        return self.root.patch_embed(pixels)  # [B, Np, C], or NHWC with dynamic_img_size

    def tokens(self, patches: Tensor) -> Tensor:
        r = self.root
        return r.norm_pre(r.patch_drop(r._pos_embed(patches)))

    def ln1(self, b, x: Tensor) -> Tensor:
        return b.norm1(x)

    def qkv(self, b, h: Tensor) -> Tensor:
        return b.attn.qkv(h)

    def qk(self, b, q: Tensor, k: Tensor) -> Tuple[Tensor, Tensor, float]:
        return b.attn.q_norm(q), b.attn.k_norm(k), b.attn.scale

    def proj(self, b, a: Tensor) -> Tensor:
        return b.drop_path1(b.ls1(b.attn.proj(b.attn.norm(a))))

    def mlp(self, b, y: Tensor) -> Tensor:
        return b.drop_path2(b.ls2(b.mlp(b.norm2(y))))

    def pool(self, x: Tensor, size: Optional[Tensor], prop_attn: bool) -> Tensor:
        from mergeseek.encoders.patch.timm import pool_head

        out = pool_head(self.root, self.root.norm(x), size)
        return out if self.after is None else self.after(out)


class HfAstFamily(Family):
    """transformers' ``ASTModel`` (``layers``; class and distillation tokens first, never merged,
    pooled as their mean by the model itself). Merging only: reuse across frames is refused."""

    def __init__(self, root: torch.nn.Module) -> None:
        layers = getattr(root, "layers", None)
        if layers is None:  # transformers 4.x: encoder.layer with query/key/value
            raise UnsupportedModelError("token merging supports the AST of transformers >= 5 (ASTModel.layers with q_proj/"
                                        "k_proj/v_proj); upgrade it: pip install -U 'transformers>=5'")
        super().__init__(root, list(layers), 2)

    @functools.cached_property
    def heads(self) -> int:
        return int(self.root.config.num_attention_heads)

    @functools.cached_property
    def width(self) -> int:
        return int(self.root.config.hidden_size)

    @functools.cached_property
    def head_dim(self) -> int:
        return int(self.blocks[0].attention.head_dim)

    @functools.cached_property
    def hidden(self) -> int:
        return int(self.blocks[0].mlp.fc1.out_features)

    def merge_mixins(self) -> Tuple[List[type], type]:
        from transformers.models.audio_spectrogram_transformer import modeling_audio_spectrogram_transformer as hf

        from mergeseek.encoders.patch import hf_ast as patch

        for i, blk in enumerate(self.blocks):
            cls, attn = base_class(blk), getattr(blk, "attention", None)
            if cls is not hf.ASTLayer or type(attn) is not hf.ASTAttention or not hasattr(attn, "q_proj"):
                raise UnsupportedModelError(f"AST layer {i} is {cls.__name__} with {type(attn).__name__}; token merging "
                                            "supports transformers' ASTLayer with ASTAttention (q_proj, k_proj, v_proj)")
        return [patch.MergingASTLayer] * len(self.blocks), patch.MergingASTModel

    def tokens_in(self) -> int:
        freq, time = self.root.embeddings.get_shape(self.root.config)
        return int(freq * time) + self.protected

    def check_reuse(self) -> None:
        raise UnsupportedModelError("reuse across frames supports open_clip and timm ViTs, not transformers' AST; "
                                    "merge its tokens (apply_merging) instead")


def own_timm_head(cls: type) -> bool:
    """The timm ViT class overrides ``forward_head`` (DeiT's class + distillation head)."""
    from timm.models.vision_transformer import VisionTransformer  # plain import: traced by torch.compile

    return cls.forward_head is not VisionTransformer.forward_head


def check_attn_pool(pool: Optional[torch.nn.Module]) -> None:
    """An attention-pool head the merged forward can give token sizes to (timm's
    ``AttentionPoolLatent``, whose ``forward`` takes ``attn_mask``), or none."""
    if pool is None:
        return
    from timm.layers import AttentionPoolLatent

    if type(pool) is not AttentionPoolLatent or "attn_mask" not in inspect.signature(pool.forward).parameters:
        raise UnsupportedModelError(f"timm attention-pool head {type(pool).__name__} is not supported with token merging "
                                    "(supported: timm.layers.AttentionPoolLatent whose forward takes attn_mask; upgrade timm if "
                                    "yours does not)")
    if getattr(pool, "pos_embed", None) is not None:  # per-position keys: a merged token has no one position
        raise UnsupportedModelError("timm attention-pool heads with their own position embedding are not supported with token merging")
