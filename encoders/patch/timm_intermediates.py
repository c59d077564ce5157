"""``forward_intermediates`` of a merged timm ``VisionTransformer`` (ViTDet-style dense heads).

With ``unmerge=true`` each requested block's output is unmerged to the full token grid (every
position carries its merged token's value, ``encoders/merging/unmerge.py``) and then handled as
timm handles the unmerged model's: optional final norm, prefix tokens split off, ``NCHW`` or
``NLC``, tuple / list / dict outputs. Without unmerge a merged block has fewer tokens than the
grid, so the call is refused with one line.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from mergeseek.encoders.merging.unmerge import unmerge_tokens
from mergeseek.encoders.patch.common import TokenState, run_blocks, unmerged_output
from mergeseek.errors import UnsupportedModelError

Tensor = torch.Tensor


def merged_intermediates(vit, x: Tensor, indices=None, return_prefix_tokens: bool = False, norm: bool = False,
                         stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                         output_dict: bool = False):
    from timm.models._features import feature_take_indices

    cfg = vit._merge_cfg
    if not cfg.unmerge:
        raise UnsupportedModelError("forward_intermediates of a merged ViT needs the grid back at every block: "
                                    f"merge with unmerge=true (e.g. '{cfg},unmerge=true')")
    if output_fmt not in ("NCHW", "NLC"):
        raise UnsupportedModelError(f"output_fmt={output_fmt!r} is not valid; choose NCHW or NLC")
    take, max_index = feature_take_indices(len(vit.blocks), indices)
    take = set(int(i) for i in take)
    b, _, height, width = x.shape
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    blocks = vit.blocks[: max_index + 1] if stop_early else vit.blocks
    grids: List[Tensor] = []

    def tap(i: int, tokens: Tensor, state: TokenState) -> None:
        if i in take:
            grid = unmerge_tokens(tokens, state.index)
            grids.append(vit.norm(grid) if norm else grid)

    x, state, stats = run_blocks(blocks, x, cfg, vit._merge_plan(), on_block=tap)
    vit._merge_last = stats
    npt = vit.num_prefix_tokens
    prefix: Optional[List[Tensor]] = [g[:, :npt] for g in grids] if npt else None
    grids = [g[:, npt:] for g in grids]
    if output_fmt == "NCHW":
        h, w = vit.patch_embed.dynamic_feat_size((height, width))
        grids = [g.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous() for g in grids]
    if output_dict:
        out = {"image_intermediates": grids}
        if prefix is not None and return_prefix_tokens:
            out["image_intermediates_prefix"] = prefix
        if not intermediates_only:
            out["image_features"] = vit.norm(unmerged_output(x, state)[0])
        return out
    if prefix is not None and return_prefix_tokens:
        grids = list(zip(grids, prefix))
    if intermediates_only:
        return grids
    return vit.norm(unmerged_output(x, state)[0]), grids
