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
class _Plan:
    """One frame's role: a reference (``changed`` None) or a dependant with its changed patches
    [Np] (host bools); ``codes``: the hash codes its caches stand for once it is encoded (rolling
    caches; a reference's own codes)."""

    changed: Optional[np.ndarray]
    codes: np.ndarray
    wave: int  # the pass over the blocks it runs in (rolling caches: several per batch)
    starts: bool = False  # rolling caches: the first dependant of a group (compared with the newest caches)


@dataclass
class _Stream:
    ref: Optional[Reference] = None  # what the video's dependants are compared with (rolling: the group's base)
    since: int = 0  # frames since the reference
    newest: Optional[Reference] = None  # rolling caches: those its newest frame left


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
        plans = self._plan_frames(codes, video_ids)
        self.last_reused = [p.changed is not None for p in plans]
        order, outs = [], []
        for wave in self._waves(plans):
            out, done = self._run(wave, patches, plans, video_ids)
            outs.append(out)
            order += done
        while len(self.streams) > self.cfg.max_videos:
            self.streams.popitem(last=False)
        outs = outs[0] if len(outs) == 1 else torch.cat(outs)
        if order == sorted(order):
            return outs
        return outs.index_select(0, on_device(np.argsort(order), outs.device))  # back to the given order

    def _run(self, wave: List[int], patches, plans, video_ids):
        """One pass over the blocks for the frames ``wave`` (batch indices, in order): (their outputs,
        the batch indices in that order: references, then dependants); keeps each video's newest
        caches."""
        refs = [i for i in wave if plans[i].changed is None]
        deps = [i for i in wave if plans[i].changed is not None]
        latest: dict = {}  # video id -> batch index of its latest reference so far in this wave
        slot = {i: j for j, i in enumerate(refs)}  # batch index of a reference -> its row among refs
        kept: dict = {}  # id of a reference of an earlier pass -> (its row after refs, the reference)
        owner = []
        for i in wave:
            vid = video_ids[i]
            if plans[i].starts:  # a new group of dependants: compared with what the last one left
                self.streams[vid].ref = self.streams[vid].newest
            if plans[i].changed is None:
                latest[vid] = i
            elif vid in latest:
                owner.append(slot[latest[vid]])
            else:
                # all references of a stream share one token layout: it follows from the image
                # size and the merge schedule alone, so one pass can mix them
                ref = self.streams[vid].ref
                owner.append(kept.setdefault(id(ref), (len(refs) + len(kept), ref))[0])
        kept_refs = [ref for _, ref in kept.values()]
        changed = np.stack([plans[i].changed for i in deps]) if deps else None  # [F, Np] on the host
        block_pass = BlockPass(self, patches[refs] if refs else None, patches[deps] if deps else None, owner, kept_refs)
        outs, made = block_pass.run([plans[i].codes for i in refs + deps], changed)
        # A video's newest reference is what its next dependants are compared with; with rolling
        # caches its newest frame's caches are kept too (the next group's base).
        for i, ref in sorted(zip(refs + deps, made), key=lambda t: t[0]):
            st = self.streams[video_ids[i]]
            if plans[i].changed is None:
                st.ref = ref
            if ref is not None:
                st.newest = ref
        return outs, refs + deps

    @staticmethod
    def _waves(plans) -> List[List[int]]:
        """The batch's frames grouped by the pass they run in (one pass without rolling caches)."""
        waves: List[List[int]] = []
        for i, p in enumerate(plans):
            if p.wave == len(waves):
                waves.append([])
            waves[p.wave].append(i)
        return waves

    # ------------------------------------------------------------------ planning
    def _plan_frames(self, codes, video_ids) -> List["_Plan"]:
        """Per frame: a reference, or a dependant with the patches it changed, and the pass (wave)
        it runs in; updates the stream counters.

        Decided from hashes alone, in frame order, so it does not depend on batch boundaries. A
        dependant is compared with the codes of its reference. With rolling caches (``roll=k``)
        the dependants after a reference form groups of ``k``: a group's dependants are compared
        with what the previous group's last frame left (the first group: the reference), and the
        patches a dependant recomputes take its codes. A group starts a new pass over the blocks
        when its base is made in the current one.
        """
        cfg, k = self.cfg, self.cfg.roll
        plans: List[_Plan] = []
        state: dict = {}  # video id -> [codes its dependants are compared with, codes its newest frame left]
        in_wave: set = set()  # videos with a frame in the current pass
        wave = 0
        for i, vid in enumerate(video_ids):
            st = self.streams.get(vid)
            if st is None:
                st = self.streams[vid] = _Stream()
            self.streams.move_to_end(vid)
            self.stats.frames += 1
            if vid not in state:
                state[vid] = [st.ref.codes, (st.newest or st.ref).codes] if st.ref is not None else [None, None]
            base, newest = state[vid]
            starts = bool(k) and st.since > 0 and st.since % k == 0  # if it is a dependant
            cmp = newest if starts else base
            new_ref = cmp is None or not cfg.enabled
            changed = None
            if not new_ref and st.since + 1 >= cfg.refresh:
                new_ref = True
                self.stats.refreshes += 1
            elif not new_ref:
                changed = self._changed(codes[i : i + 1], cmp)[0]
                if float(changed.mean()) > cfg.cut:
                    new_ref, changed = True, None
                    self.stats.cuts += 1
            if new_ref:
                starts = False
                state[vid] = [codes[i], codes[i]]
                st.since = 0
                self.stats.references += 1
            else:
                st.since += 1
                if starts:
                    state[vid][0] = cmp
                if k:
                    state[vid][1] = np.where(changed[:, None], codes[i], cmp)
            if starts and vid in in_wave:  # its base is the newest frame of this pass: the next pass
                wave += 1
                in_wave = set()
            in_wave.add(vid)
            plans.append(_Plan(changed, state[vid][1] if k else state[vid][0], wave, starts))
        return plans

    def _changed(self, codes, ref_codes):
        """[F, Np] bool (NumPy): patches whose estimated angle to the reference is >= threshold."""
        hamming = (codes != ref_codes).sum(axis=-1)
        return hamming * (math.pi / self.cfg.bits) >= self.cfg.threshold

