"""A SLAB-style ViT (Guo et al., "SLAB: Efficient Transformers with Simplified Linear Attention
and Progressive Re-parameterized Batch Normalization", arXiv 2405.11582), written from the paper
as a timm ``VisionTransformer`` variant.

Two swaps in the standard pre-norm block:

* **Simplified linear attention (SLA).** ``O = relu(Q) (relu(K)^T V) / (relu(Q) sum_j relu(K_j))
  + DWC(V)``: a ReLU kernel instead of softmax, computed right-to-left so the cost is linear in
  the token count, plus a depth-wise convolution over the patch grid of V that restores the
  locality a low-rank linear attention loses (prefix tokens get no convolution term).
* **Re-parameterized BatchNorm (RepBN) instead of LayerNorm.** ``RepBN(x) = BN(x) + eta * x``;
  at inference it is a per-channel affine map, so :func:`fuse_norms` folds the block norms into
  the following linear layers and the blocks run norm-free. Training uses the *progressive*
  form ``lam * LN(x) + (1 - lam) * RepBN(x)`` with ``lam`` decayed from 1 to 0
  (:func:`set_progress`); inference has ``lam = 0``.

The model is a plain timm ``VisionTransformer`` built with these layers (``attn_layer`` and
``norm_layer``), so timm checkpoints, ``forward_features`` and ``reset_classifier`` work. Importing
this module registers ``slab_vit_tiny_patch16_224`` / ``slab_vit_small_patch16_224`` /
``slab_vit_base_patch16_224`` with timm. Token merging does not apply to it (no softmax attention
to merge with); it is an *efficient-architecture baseline* for the speed tables. No trained
weights ship with it: accuracy needs a user-supplied checkpoint.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor


class RepBN(nn.Module):
    """Progressive re-parameterized BatchNorm over the channel (last) dimension of [..., C].

    Args:
        dim: channels.
        eps: BatchNorm / LayerNorm epsilon.
        momentum: BatchNorm running-statistics momentum.
    """

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1, **_: Any) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, eps=eps, momentum=momentum)
        self.eta = nn.Parameter(torch.zeros(dim))
        # The LayerNorm branch of the progressive schedule (only used while lam > 0 in training).
        self.ln = nn.LayerNorm(dim, eps=eps)
        self.register_buffer("lam", torch.zeros(()), persistent=False)

    def _repbn(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])  # BatchNorm1d accepts [M, C]: no transposes needed
        return self.bn(flat).view_as(x) + self.eta * x

    def forward(self, x: Tensor) -> Tensor:
        lam = float(self.lam)
        if lam <= 0.0:
            return self._repbn(x)
        return lam * self.ln(x) + (1.0 - lam) * self._repbn(x)

    def affine(self) -> Tuple[Tensor, Tensor]:
        """(scale, shift) with ``RepBN(x) == x * scale + shift`` in eval mode at lam = 0."""
        bn = self.bn
        inv = torch.rsqrt(bn.running_var + bn.eps)
        w = bn.weight if bn.weight is not None else torch.ones_like(inv)
        b = bn.bias if bn.bias is not None else torch.zeros_like(inv)
        return w * inv + self.eta, b - bn.running_mean * w * inv


class SimplifiedLinearAttention(nn.Module):
    """SLA with the constructor of timm's ``Attention`` (so ``attn_layer=`` can build it).

    ``num_prefix_tokens`` and ``grid_size`` are set by :func:`create_slab_vit` after the model is
    built; until then the grid is inferred as the largest square that fits.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        kernel_size: int = 5,
        eps: float = 1e-6,
        **_: Any,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.eps = eps
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        # One depth-wise kernel shared by the heads, over each head's channels (as in SLAB).
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, kernel_size, padding=kernel_size // 2, groups=self.head_dim)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.num_prefix_tokens = 1
        self.grid_size: Optional[Tuple[int, int]] = None

    def _grid(self, n_patches: int) -> Tuple[int, int]:
        if self.grid_size is not None and self.grid_size[0] * self.grid_size[1] == n_patches:
            return self.grid_size
        side = math.isqrt(n_patches)
        if side * side != n_patches:
            raise ValueError(f"cannot lay {n_patches} patch tokens on a square grid; set grid_size")
        return side, side

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("simplified linear attention does not take an attention mask")
        batch, n, c = x.shape
        qkv = self.qkv(x).reshape(batch, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, N, D]
        q, k = F.relu(q), F.relu(k)
        kv = k.transpose(-2, -1) @ v  # [B, H, D, D]: linear in N
        denom = q @ k.sum(dim=2, keepdim=True).transpose(-2, -1)  # [B, H, N, 1]
        out = (q @ kv) / (denom + self.eps)
        p = self.num_prefix_tokens
        gh, gw = self._grid(n - p)
        vp = v[:, :, p:].reshape(batch * self.num_heads, gh, gw, self.head_dim).permute(0, 3, 1, 2)
        local = self.dwc(vp).permute(0, 2, 3, 1).reshape(batch, self.num_heads, n - p, self.head_dim)
        out = torch.cat([out[:, :, :p], out[:, :, p:] + local], dim=2)
        out = out.transpose(1, 2).reshape(batch, n, c)
        return self.proj_drop(self.proj(out))


def create_slab_vit(
    img_size: int = 224,
    patch_size: int = 16,
    embed_dim: int = 384,
    depth: int = 12,
    num_heads: int = 6,
    mlp_ratio: float = 4.0,
    num_classes: int = 1000,
    **kwargs: Any,
):
    """A timm ``VisionTransformer`` with SLA attention and RepBN norms (class token, token pool).

    Extra keyword arguments go to timm's ``VisionTransformer`` (``drop_path_rate``, ...).
    """
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        num_classes=num_classes,
        attn_layer=SimplifiedLinearAttention,
        norm_layer=RepBN,
        **kwargs,
    )
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    for blk in model.blocks:
        blk.attn.num_prefix_tokens = int(model.num_prefix_tokens)
        blk.attn.grid_size = grid
    return model


def set_progress(model: nn.Module, lam: float) -> None:
    """Set the progressive-norm mix of every RepBN (1: LayerNorm, 0: RepBN; inference uses 0)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam={lam} is not valid; give a value in [0, 1]")
    for m in model.modules():
        if isinstance(m, RepBN):
            m.lam.fill_(lam)


@torch.no_grad()
def fuse_norms(model: nn.Module) -> nn.Module:
    """Fold each block's RepBN into the linear layer after it (qkv, fc1); eval mode, lam = 0.

    ``W (x * s + t) + b == (W * s) x + (W t + b)``: the norms disappear from the blocks, which is
    where SLAB's inference speed-up over LayerNorm comes from. Modifies ``model`` in place.
    """
    if model.training:
        raise ValueError("fuse_norms folds running statistics: call model.eval() first")
    for blk in model.blocks:
        for norm_name, linear in (("norm1", blk.attn.qkv), ("norm2", blk.mlp.fc1)):
            norm = getattr(blk, norm_name)
            if not isinstance(norm, RepBN):
                continue
            if float(norm.lam) > 0:
                raise ValueError("fuse_norms needs lam = 0 (pure RepBN); call set_progress(model, 0.0)")
            scale, shift = norm.affine()
            bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features, device=scale.device)
            new_bias = linear.weight @ shift + bias
            linear.weight.mul_(scale[None, :])
            if linear.bias is None:
                linear.bias = nn.Parameter(new_bias)
            else:
                linear.bias.copy_(new_bias)
            setattr(blk, norm_name, nn.Identity())
    return model


def _register() -> None:
    from timm.models import register_model

    sizes = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
    for size, (dim, heads) in sizes.items():
        name = f"slab_vit_{size}_patch16_224"

        def build(pretrained: bool = False, _dim: int = dim, _heads: int = heads, **kwargs: Any):
            if pretrained:
                from mergeseek.errors import WeightsUnavailableError

                raise WeightsUnavailableError(
                    "no SLAB-style ViT weights are published for this variant; train one or pass "
                    "checkpoint_path= to timm.create_model (cli: --pretrained /path/to/checkpoint)"
                )
            kwargs.pop("pretrained_cfg", None)
            kwargs.pop("pretrained_cfg_overlay", None)
            kwargs.pop("cache_dir", None)
            return create_slab_vit(embed_dim=_dim, num_heads=_heads, **kwargs)

        build.__name__ = name
        try:
            register_model(build)
        except Exception:  # already registered (module reloaded): keep the first registration
            pass


_register()
