"""``ReuseStream``: encode the frames of videos in order, reusing each shot's reference frame.

Planning (which frame is a reference, which reuses which) runs on the host from the patches'
hash codes; the blocks run as one :class:`~encoders.reuse.forward.BlockPass` per batch.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, List, Optional, Sequence, Union

import numpy as np
import torch

from mergeseek.encoders.config import MergeConfig
from mergeseek.encoders.family import Family, vit_family
from mergeseek.encoders.reuse.config import ReuseConfig
from mergeseek.encoders.reuse.forward import BlockPass, Reference, on_device
from mergeseek.encoders.reuse.stats import ReuseStats
from mergeseek.errors import ConfigError


def family_of(model) -> Family:
    """The family adapter (``encoders.family``) of an open_clip CLIP model / its ``.visual``, or a
    timm ViT, refused when the stream cannot run it part by part."""
    fam = vit_family(model, "reuse", hint=" (encode this model without --reuse)")
    fam.check_reuse()
    return fam


@dataclass
class _Stream:
    ref: Optional[Reference] = None
    since: int = 0  # frames since the reference


class ReuseStream:
    """Encode frames of videos in order, reusing each shot's reference frame.

    Args:
        model: open_clip CLIP model (or its ``.visual``) or timm ViT; may carry the merging patch.
        cfg: reuse config.
        merge: the merge config the model was patched with (``none`` when unpatched).

    ``encode(pixels, video_ids)`` takes a batch of preprocessed frames; frames of one video must
    come in order (across calls too); frames of different videos never share a cache.
    """

    def __init__(self, model, cfg: Union[ReuseConfig, str, None], merge=None):
        from mergeseek.encoders.patch import method_state
        from mergeseek.encoders.patch.common import make_plan

        self.cfg = ReuseConfig.parse(cfg)
        self.merge = MergeConfig.parse(merge)
        self.fam = family_of(model)
        self.streams: "OrderedDict[Hashable, _Stream]" = OrderedDict()
        self.last_reused: List[bool] = []  # per frame of the last encode(): did it reuse work
        self.stats = ReuseStats(weights=(3.0, 1.0, 2.0 * self.fam.hidden / self.fam.width))
        ref = next(self.fam.root.parameters())
        g = torch.Generator().manual_seed(self.cfg.seed)
        self.planes = torch.randn(self.fam.width, self.cfg.bits, generator=g).to(ref.device)
        self.plan = make_plan(self.merge, self.fam.protected, method_state(self.fam, self.merge)) if self.merge.enabled else None

    def reset(self, video_id: Optional[Hashable] = None) -> None:
        """Drop the cache of one video (or of all)."""
        if video_id is None:
            self.streams.clear()
        else:
            self.streams.pop(video_id, None)

    # ------------------------------------------------------------------ public
    def encode(self, pixels, video_ids: Sequence[Hashable]):
        """Model outputs [B, D] for preprocessed frames [B,3,H,W] (same order as given)."""
        if len(video_ids) != pixels.shape[0]:
            raise ConfigError(f"got {pixels.shape[0]} frames but {len(video_ids)} video ids; pass one id per frame")
        patches = self.fam.patches(pixels)
        flat = patches.flatten(1, -2) if patches.ndim == 4 else patches
        # Planning runs on the host from the hash codes (B x Np x bits bools): the batch's one
        # read of device data before the blocks.
        codes = ((flat.float() @ self.planes.to(flat.device)) > 0).cpu().numpy()  # [B, Np, bits]
        roles, kept = self._plan_frames(codes, video_ids)
        self.last_reused = [kind == "dep" for kind, _ in roles]
        refs = [i for i, (kind, _) in enumerate(roles) if kind == "ref"]
        slot = {i: j for j, i in enumerate(refs)}  # batch index of a reference -> its row among refs
        deps = [i for i, (kind, _) in enumerate(roles) if kind == "dep"]
        kept_refs = list({id(r): r for r in kept.values()}.values())
        # One pass over the blocks for the references and every dependant: the references'
        # linear layers and the dependants' recomputed rows share each matrix product. Dependant
        # ``j`` reuses reference ``owner[j]``: a row among ``refs``, or after them one of
        # ``kept_refs`` (all references of a stream share one token layout: it follows from the
        # image size and the merge schedule alone).
        kept_slot = {id(r): len(refs) + j for j, r in enumerate(kept_refs)}
        owner = [slot[key[1]] if key[0] == "batch" else kept_slot[id(kept[key[1]])] for _, key in (roles[i] for i in deps)]
        ref_codes = [codes[refs[o]] if o < len(refs) else kept_refs[o - len(refs)].codes for o in owner]
        changed = self._changed(codes[deps], np.stack(ref_codes)) if deps else None  # [F, Np] on the host
        block_pass = BlockPass(self, patches[refs] if refs else None, patches[deps] if deps else None, owner, kept_refs)
        outs, made = block_pass.run(codes[refs] if refs else None, changed)
        # Keep the last reference of every video seen in this batch.
        for i, ref in zip(refs, made):
            self.streams[video_ids[i]].ref = ref
        while len(self.streams) > self.cfg.max_videos:
            self.streams.popitem(last=False)
        return outs.index_select(0, on_device(np.argsort(refs + deps), outs.device))  # back to the given order

    # ------------------------------------------------------------------ planning
    def _plan_frames(self, codes, video_ids) -> tuple:
        """Per frame ("ref", None) or ("dep", key of its reference), and the references kept from
        earlier calls that this batch uses; updates the stream counters.

        Decided from hashes alone, in frame order, so it does not depend on batch boundaries.
        """
        cfg = self.cfg
        roles: list = []
        kept: dict = {}  # video id -> reference from an earlier call
        pending: dict = {}  # video id -> (batch index of its latest reference, its codes)
        for i, vid in enumerate(video_ids):
            st = self.streams.get(vid)
            if st is None:
                st = self.streams[vid] = _Stream()
            self.streams.move_to_end(vid)
            self.stats.frames += 1
            ref_codes = pending[vid][1] if vid in pending else (st.ref.codes if st.ref is not None else None)
            new_ref = ref_codes is None or not cfg.enabled
            if not new_ref and st.since + 1 >= cfg.refresh:
                new_ref = True
                self.stats.refreshes += 1
            elif not new_ref and float(self._changed(codes[i : i + 1], ref_codes).mean()) > cfg.cut:
                new_ref = True
                self.stats.cuts += 1
            if new_ref:
                pending[vid] = (i, codes[i])
                st.since = 0
                roles.append(("ref", None))
                self.stats.references += 1
            else:
                st.since += 1
                if vid in pending:
                    key = ("batch", pending[vid][0])
                else:
                    key = ("kept", vid)
                    kept[vid] = st.ref
                roles.append(("dep", key))
        return roles, kept

    def _changed(self, codes, ref_codes):
        """[F, Np] bool (NumPy): patches whose estimated angle to the reference is >= threshold."""
        hamming = (codes != ref_codes).sum(axis=-1)
        return hamming * (math.pi / self.cfg.bits) >= self.cfg.threshold

