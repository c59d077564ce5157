"""Reuse work across the frames of a shot (training-free, after Eventful Transformers).

A video is encoded in order. The first frame of a shot is computed in full and becomes the
*reference*: for every block the stream keeps the block input, the packed q/k/v projection, the
attention output, the attention branch (out-projection with LayerScale), the post-attention
tokens and the MLP branch. A later frame of the same shot is compared with that reference and
only what changed is recomputed:

* which patches changed is found by hashing: a ``bits``-bit SimHash of each patch embedding
  (random hyperplanes, seeded) is compared with the reference's code at the same position. The
  Hamming distance estimates the angle between the two embeddings (``pi * h / bits``); a patch
  whose estimated angle is at least ``threshold`` is *changed*. No N x N comparison is made.
* a frame where more than ``cut`` of the patches changed starts a new shot (scene change), and
  every ``refresh``-th frame of a shot is a new reference, so error cannot build up;
* inside each block three gates decide per token: the q/k/v projection is recomputed for tokens
  whose input moved (block 0: the hash; later blocks: relative L2 change of the block input
  against the reference's, ``||x - x_ref|| / ||x_ref|| >= threshold``), attention is recomputed
  for every query of a frame in which any token was recomputed (cheap: N^2 C against the N C^2 of
  the linear layers), the out-projection for every token of such a frame (``attn=0``, the default:
  stale out-projection rows were the largest error; ``attn=T`` gates them by the relative change of
  the attention output), the MLP for tokens whose post-attention input moved. Unchanged tokens take the reference's outputs of those
  linear layers; the residual stream always carries the frame's own input. Class / prefix tokens
  are recomputed at every gate where any token of the frame is, since the pooled output reads them.

The linear layers run only on the gathered changed rows (flattened across the frames of a batch),
in the same matrix product as the rows of the batch's reference frames (a reference alone in a
batch would otherwise pay for a one-frame product), and are written into copies of the cached
outputs, so the saving is real compute.

Token merging composes by *replaying the reference's merges*: the reference runs the configured
matcher (``encoders.patch`` machinery) and records, per merging block, the linear map from the
block's tokens to the merged slots (a size-weighted average) and the slot sizes. Frames that reuse
the reference merge with the same map, so every block sees the same token layout as its
reference and cached values line up position by position; the matcher itself is skipped for them.

``threshold=0`` computes every frame in full (each frame is its own reference), which equals
per-frame encoding. See docs/REUSE.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Hashable, List, Optional, Sequence, Tuple, Union

import numpy as np

from mergeseek.errors import ConfigError, UnsupportedModelError

_OFF = ("", "none", "off")


# ---------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ReuseConfig:
    """How a stream of frames reuses the work of its reference frame.

    Args:
        threshold: change (estimated angle for patches, relative L2 for block inputs and outputs)
            at or above which a token is recomputed; 0 computes every frame in full.
        refresh: every ``refresh``-th frame of a shot is computed in full (1: every frame).
        cut: share of changed patches above which a frame starts a new shot (scene change).
        attn: relative change of a token's attention output at or above which its out-projection
            is recomputed; 0 (the default) recomputes it for every token of a frame whose
            attention was recomputed. The attention output is how a changed patch reaches the
            unchanged ones, and the out-projection is a twelfth of a block's linear work, so
            recomputing it costs little and removes most of the error (docs/REUSE.md).
        bits: SimHash bits per patch (the angle resolution is pi / bits).
        seed: seed of the hash hyperplanes.
        max_videos: reference caches kept at once (least recently used are dropped).
        audit: every ``audit``-th frame that reused work is also encoded per-frame (in batches of
            the encoder's batch size), giving the error against per-frame encoding and the
            measured frames/s gain of the run at ~1/audit of the per-frame cost; 0: no audit.
    """

    threshold: float = 0.05
    refresh: int = 16
    cut: float = 0.5
    attn: float = 0.0
    bits: int = 64
    seed: int = 0
    max_videos: int = 16
    audit: int = 32

    def __post_init__(self) -> None:
        if not (self.threshold >= 0 and math.isfinite(self.threshold)):
            raise ConfigError(f"reuse threshold={self.threshold} is not valid; give a number >= 0 (0: no reuse)")
        if self.refresh < 1:
            raise ConfigError(f"reuse refresh={self.refresh} is not valid; it must be >= 1")
        if not 0.0 < self.cut <= 1.0:
            raise ConfigError(f"reuse cut={self.cut} is not valid; give a share in (0, 1]")
        if not (self.attn >= 0 and math.isfinite(self.attn)):
            raise ConfigError(f"reuse attn={self.attn} is not valid; give a number >= 0 (0: always recompute)")
        if not 1 <= self.bits <= 1024:
            raise ConfigError(f"reuse bits={self.bits} is not valid; give 1..1024")
        if self.max_videos < 1:
            raise ConfigError(f"reuse max_videos={self.max_videos} is not valid; it must be >= 1")
        if self.audit < 0:
            raise ConfigError(f"reuse audit={self.audit} is not valid; give an integer >= 0 (0: no audit)")
        for key in ("refresh", "max_videos", "audit"):
            if getattr(self, key) > 1_000_000:
                raise ConfigError(f"reuse {key}={getattr(self, key)} is not valid; it must be <= 1000000")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"reuse seed={self.seed} is not valid; give 0..{2**63 - 1}")

    @property
    def enabled(self) -> bool:
        return self.threshold > 0 and self.refresh > 1

    @classmethod
    def parse(cls, spec: Union[str, "ReuseConfig", None]) -> "ReuseConfig":
        """``threshold=0.05,refresh=16`` (``none``/``off``/empty: no reuse)."""
        if isinstance(spec, ReuseConfig):
            return spec
        if spec is None or spec.strip().lower() in _OFF:
            return cls(threshold=0.0)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict = {}
        for item in [s.strip() for s in spec.split(",") if s.strip()]:
            key, sep, value = (s.strip() for s in item.partition("="))
            if not sep:
                raise ConfigError(f"reuse option {item[:60]!r} in {spec[:80]!r} is not key=value; valid keys: {', '.join(fields)}")
            if key not in fields:
                raise ConfigError(f"unknown reuse option {key[:40]!r} in {spec[:80]!r}; valid keys: {', '.join(fields)}")
            kind = float if key in ("threshold", "cut", "attn") else int
            if len(value) > 24:  # no option takes a number that long: refused before converting it
                raise ConfigError(f"reuse {key}={value[:24]}... is not valid; give a number up to 1000000")
            try:
                kwargs[key] = kind(value)
            except ValueError:
                raise ConfigError(f"reuse {key}={value[:40]!r} is not valid; give {'a number' if kind is float else 'an integer'}") from None
        return cls(**kwargs)

    @property
    def recipe(self) -> str:
        """The settings that change a vector (``audit`` only measures), for the index recipe."""
        return str(dataclasses.replace(self, audit=type(self).audit))

    def __str__(self) -> str:
        if self == ReuseConfig(threshold=0.0):
            return "none"
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("threshold", "refresh") or value != f.default:
                parts.append(f"{f.name}={value:g}" if isinstance(value, float) else f"{f.name}={value}")
        return ",".join(parts)


# ---------------------------------------------------------------------------- statistics
@dataclass
class ReuseStats:
    """Counters over every frame a stream encoded.

    Per block and gate (``qkv``, ``proj``, ``mlp``) the token rows that were computed, out of
    ``rows`` (rows of reference frames count as computed); ``reuse_rate`` weights the three gates
    by their multiply-adds (3 C^2, C^2, 2 C H per row).
    """

    frames: int = 0
    references: int = 0
    cuts: int = 0
    refreshes: int = 0
    rows: List[List[int]] = field(default_factory=list)  # per block [qkv, proj, mlp] rows seen
    computed: List[List[int]] = field(default_factory=list)  # per block [qkv, proj, mlp] rows computed
    weights: Tuple[float, float, float] = (3.0, 1.0, 8.0)
    # audit (ReuseConfig.audit): frames also encoded per-frame, their cosines, and the seconds of
    # the reuse path (all frames) and of the per-frame encoding of the audited frames
    audited: int = 0
    audit_cos_sum: float = 0.0
    audit_cos_min: float = 1.0
    audit_s: float = 0.0
    stream_s: float = 0.0

    def add(self, block: int, gate: int, rows: int, computed: int) -> None:
        while len(self.rows) <= block:
            self.rows.append([0, 0, 0])
            self.computed.append([0, 0, 0])
        self.rows[block][gate] += rows
        self.computed[block][gate] += computed

    def merge(self, other: "ReuseStats") -> None:
        self.frames += other.frames
        self.references += other.references
        self.cuts += other.cuts
        self.refreshes += other.refreshes
        self.audited += other.audited
        self.audit_cos_sum += other.audit_cos_sum
        self.audit_cos_min = min(self.audit_cos_min, other.audit_cos_min)
        self.audit_s += other.audit_s
        self.stream_s += other.stream_s
        for b, (rows, comp) in enumerate(zip(other.rows, other.computed)):
            for g in range(3):
                self.add(b, g, rows[g], comp[g])

    def block_reuse(self) -> List[float]:
        """Share of linear-layer work reused per block (multiply-add weighted)."""
        out = []
        for rows, comp in zip(self.rows, self.computed):
            total = sum(w * r for w, r in zip(self.weights, rows))
            done = sum(w * c for w, c in zip(self.weights, comp))
            out.append(1.0 - done / total if total else 0.0)
        return out

    def gate_reuse(self) -> dict:
        out = {}
        for g, name in enumerate(("qkv", "proj", "mlp")):
            rows = sum(r[g] for r in self.rows)
            comp = sum(c[g] for c in self.computed)
            out[name] = 1.0 - comp / rows if rows else 0.0
        return out

    @property
    def reuse_rate(self) -> float:
        total = sum(w * r for rows in self.rows for w, r in zip(self.weights, rows))
        done = sum(w * c for comp in self.computed for w, c in zip(self.weights, comp))
        return 1.0 - done / total if total else 0.0

    def audit_summary(self) -> Optional[dict]:
        """Error and measured gain against per-frame encoding on the audited frames (None: none).

        ``gain`` = (per-frame seconds per audited frame) / (reuse seconds per frame of the run):
        frames/s of the reuse path over per-frame encoding of the same kind of frames, measured in
        the same process. The audited frames reused work, so their error is the worst case; frames
        computed in full are per-frame encoding already."""
        if not self.audited:
            return None
        reuse_per_frame = self.stream_s / max(1, self.frames)
        per_frame = self.audit_s / self.audited
        return {
            "frames": self.audited,
            "cos_min": round(self.audit_cos_min, 6),
            "cos_mean": round(self.audit_cos_sum / self.audited, 6),
            "per_frame_s": round(per_frame, 6),
            "reuse_s": round(reuse_per_frame, 6),
            "gain": round(per_frame / reuse_per_frame, 3) if reuse_per_frame > 0 else None,
            "cost": round(self.audit_s / self.stream_s, 4) if self.stream_s > 0 else None,
        }

    def summary(self) -> dict:
        out = {
            "frames": self.frames,
            "references": self.references,
            "cuts": self.cuts,
            "refreshes": self.refreshes,
            "reuse_rate": round(self.reuse_rate, 4),
            "gate_reuse": {k: round(v, 4) for k, v in self.gate_reuse().items()},
            "block_reuse": [round(v, 4) for v in self.block_reuse()],
        }
        audit = self.audit_summary()
        if audit is not None:
            out["audit"] = audit
        return out


# ---------------------------------------------------------------------------- model families
class _Family:
    """The pieces of one ViT that the reuse forward calls (open_clip or timm)."""

    def __init__(self, root):
        self.root = root
        self.prop_attn = True  # proportional attention in a pooler over merged tokens (the merge config's)

    # implemented per family: patches, tokens, blocks, ln1, qkv, attend, proj, ln2, mlp, pool, heads


class _OpenClip(_Family):
    protected = 1

    def __init__(self, root):
        super().__init__(root)
        from open_clip.transformer import ResidualAttentionBlock

        if getattr(root, "attn_pool", None) is None and root.pool_type not in ("tok", "avg"):
            raise UnsupportedModelError(f"reuse supports pool_type tok and avg or an attention pooler, not {root.pool_type!r}")
        self.blocks = list(root.transformer.resblocks)
        for i, b in enumerate(self.blocks):
            cls = getattr(b, "_merge_orig_class", type(b))
            if cls is not ResidualAttentionBlock or hasattr(b, "ln_1_kv"):
                raise UnsupportedModelError(f"reuse supports open_clip ResidualAttentionBlock; block {i} is {cls.__name__}")
        a = self.blocks[0].attn
        self.heads, self.width = a.num_heads, a.embed_dim
        self.hidden = self.blocks[0].mlp[0].out_features

    def patches(self, pixels):
        x = self.root.conv1(pixels)
        return x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)

    def tokens(self, patches):
        import torch

        r = self.root
        cls = r.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1) + r.positional_embedding.to(patches.dtype)
        return r.ln_pre(r.patch_dropout(x))

    def ln1(self, b, x):
        return b.ln_1(x)

    def qkv(self, b, h):
        import torch.nn.functional as F

        return F.linear(h, b.attn.in_proj_weight, b.attn.in_proj_bias)

    def qk(self, b, q, k):
        return q, k, q.shape[-1] ** -0.5

    def proj(self, b, a):
        return b.ls_1(b.attn.out_proj(a))

    def mlp(self, b, y):
        return b.ls_2(b.mlp(b.ln_2(y)))

    def pool(self, x, size):
        from mergeseek.encoders.patch.open_clip import pool_tokens

        r = self.root
        pooled = pool_tokens(r, x, size, self.prop_attn)[0]
        return pooled @ r.proj if r.proj is not None else pooled


class _Timm(_Family):
    def __init__(self, root, after=None):
        super().__init__(root)
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        from mergeseek.encoders.patch.timm import check_attn_pool

        self.after = after  # open_clip TimmModel's head (projection) after the trunk, or None
        if getattr(root, "attn_pool", None) is not None:
            check_attn_pool(root.attn_pool)  # SigLIP's MAP head (sizes as a log bias on its keys)
        elif root.global_pool not in ("token", "avg", "max", "avgmax"):
            raise UnsupportedModelError(f"reuse supports timm global_pool token, avg, max, avgmax or map, not {root.global_pool!r}")
        self.blocks = list(root.blocks)
        for i, b in enumerate(self.blocks):
            cls = getattr(b, "_merge_orig_class", type(b))
            if cls is not Block or type(b.attn) is not Attention or getattr(b.attn, "gate", None) is not None:
                raise UnsupportedModelError(f"reuse supports timm vision_transformer.Block with Attention; block {i} is {cls.__name__}")
        self.protected = int(root.num_prefix_tokens)
        self.heads, self.width = self.blocks[0].attn.num_heads, root.embed_dim
        self.hidden = self.blocks[0].mlp.fc1.out_features

    def patches(self, pixels):
        return self.root.patch_embed(pixels)  # [B, Np, C], or NHWC with dynamic_img_size

    def tokens(self, patches):
        r = self.root
        return r.norm_pre(r.patch_drop(r._pos_embed(patches)))

    def ln1(self, b, x):
        return b.norm1(x)

    def qkv(self, b, h):
        return b.attn.qkv(h)

    def qk(self, b, q, k):
        return b.attn.q_norm(q), b.attn.k_norm(k), b.attn.scale

    def proj(self, b, a):
        return b.drop_path1(b.ls1(b.attn.proj(b.attn.norm(a))))

    def mlp(self, b, y):
        return b.drop_path2(b.ls2(b.mlp(b.norm2(y))))

    def pool(self, x, size):
        from mergeseek.encoders.patch.timm import pool_head

        out = pool_head(self.root, self.root.norm(x), size)
        return out if self.after is None else self.after(out)


def family_of(model) -> _Family:
    """The reuse adapter of an open_clip CLIP model / its ``.visual``, or a timm ViT."""
    visual = getattr(model, "visual", model)
    base = getattr(visual, "_merge_orig_class", type(visual))
    try:
        from open_clip.transformer import VisionTransformer as OpenClipViT

        if issubclass(base, OpenClipViT):
            return _OpenClip(visual)
    except ImportError:  # pragma: no cover - open_clip is a dependency
        pass
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmViT

        if issubclass(base, TimmViT):
            return _Timm(visual)
        trunk = getattr(visual, "trunk", None)  # open_clip's TimmModel (SigLIP): trunk, then head
        if trunk is not None and issubclass(getattr(trunk, "_merge_orig_class", type(trunk)), TimmViT):
            return _Timm(trunk, after=visual.head)
    except ImportError:  # pragma: no cover
        pass
    raise UnsupportedModelError(f"reuse supports open_clip and timm VisionTransformers; got {type(visual).__name__} "
                                "(encode this model without --reuse)")


# ---------------------------------------------------------------------------- caches
@dataclass
class _BlockCache:
    """One block of one reference frame ([1, N, ...] tensors; ``y``/``m`` in the merged layout)."""

    x: Any
    qkv: Any
    a: Any
    p: Any
    y: Any
    m: Any
    bias: Any  # attention bias of the block's layout (None: no sizes yet)
    merge_map: Any  # [1, N_out, N_in] size-weighted merge (None: the block does not merge)


@dataclass
class _Reference:
    codes: Any  # [Np, bits] bool NumPy array: planning runs on the host
    blocks: List[_BlockCache]
    size: Any  # token sizes after the last block (None without merging)
    out: Any  # model output of the reference frame [1, D]


@dataclass
class _Stream:
    ref: Optional[_Reference] = None
    since: int = 0  # frames since the reference


# ---------------------------------------------------------------------------- the stream encoder
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
        import torch

        from mergeseek.encoders.config import MergeConfig

        self.cfg = ReuseConfig.parse(cfg)
        self.merge = MergeConfig.parse(merge)
        self.fam = family_of(model)
        self.fam.prop_attn = self.merge.prop_attn
        self.streams: "OrderedDict[Hashable, _Stream]" = OrderedDict()
        self.last_reused: List[bool] = []  # per frame of the last encode(): did it reuse work
        self.stats = ReuseStats(weights=(3.0, 1.0, 2.0 * self.fam.hidden / self.fam.width))
        ref = next(self.fam.root.parameters())
        g = torch.Generator().manual_seed(self.cfg.seed)
        self.planes = torch.randn(self.fam.width, self.cfg.bits, generator=g).to(ref.device)
        self._plan = None
        if self.merge.enabled:
            from mergeseek.encoders.merging import simhash_planes
            from mergeseek.encoders.patch.common import make_plan

            planes = getattr(self.fam.root, "_merge_planes", None)
            if planes is None and self.merge.method == "lsh":
                head_dim = self.fam.width // self.fam.heads
                planes = simhash_planes(head_dim, self.merge.lsh_bits, self.merge.lsh_tables, self.merge.seed, device=ref.device)
            self._plan = make_plan(self.merge, self.fam.protected, planes)

    def reset(self, video_id: Optional[Hashable] = None) -> None:
        """Drop the cache of one video (or of all)."""
        if video_id is None:
            self.streams.clear()
        else:
            self.streams.pop(video_id, None)

    # ------------------------------------------------------------------ public
    def encode(self, pixels, video_ids: Sequence[Hashable]):
        """Model outputs [B, D] for preprocessed frames [B,3,H,W] (same order as given)."""
        import torch

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
        outs, made = self._forward(patches[refs] if refs else None, codes[refs] if refs else None,
                                   patches[deps] if deps else None, changed, owner, kept_refs)
        # Keep the last reference of every video seen in this batch.
        for i, ref in zip(refs, made):
            self.streams[video_ids[i]].ref = ref
        while len(self.streams) > self.cfg.max_videos:
            self.streams.popitem(last=False)
        return outs.index_select(0, _on(np.argsort(refs + deps), outs.device))  # back to the given order

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

    # ------------------------------------------------------------------ full forward (references)
    def _attend(self, b, qkv, bias):
        """Attention of every query: returns (pre-projection output [F,N,C], metric, q, k)."""
        import torch.nn.functional as F

        f, n, _ = qkv.shape
        q, k, v = qkv.reshape(f, n, 3, self.fam.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k, scale = self.fam.qk(b, q, k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), scale=scale)
        return out.transpose(1, 2).reshape(f, n, -1), k, q, scale

    def _forward(self, ref_patches, ref_codes, dep_patches, changed, owner: List[int], kept: List[_Reference]):
        """One pass over the blocks for R reference frames (computed in full, caches kept) and F
        dependants, dependant ``j`` reusing reference ``owner[j]``: 0..R-1 one of the R, R.. the
        reference ``kept[owner[j] - R]`` of an earlier call. ``changed``: [F, Np] patches whose hash
        moved (NumPy). The references' rows and the dependants' recomputed rows go through each
        linear layer as one matrix product, so a reference alone in its batch does not pay for a
        one-frame product. Each gate reads the device once (its per-frame row counts); block 0's
        gate is known on the host and reads nothing. Returns (outputs [R + F, D], the R new
        references)."""
        import torch

        from mergeseek.encoders.patch.common import TokenState, attention_bias, attention_probs, merge_tokens

        fam, plan, cfg = self.fam, self._plan, self.cfg
        # contiguous: a ViT without a class token (SigLIP) keeps the patch embedding's transposed
        # strides through the position add, and the gathers below view rows flat
        xr = fam.tokens(ref_patches).contiguous() if ref_patches is not None else None
        xd = fam.tokens(dep_patches).contiguous() if dep_patches is not None else None
        R = 0 if xr is None else int(xr.shape[0])
        F = 0 if xd is None else int(xd.shape[0])
        dev = (xr if xr is not None else xd).device
        own_idx = _on(owner, dev)
        wanted = self.merge.wanted(len(fam.blocks))
        state = TokenState()
        caches: List[list] = [[] for _ in range(R)]
        touched = [False] * F  # frames where some gate opened (the others equal their reference)

        def sources(cur, get):
            return ([cur] if R else []) + [get(k) for k in kept]

        def pick(parts):
            """Each dependant's row of its reference's tensor: ([F, ...] or None, freshly made)."""
            if all(p is None for p in parts):
                return None, False
            if any(p is None for p in parts):
                raise RuntimeError("reuse: the references of one pass have different token layouts")
            src = parts[0] if len(parts) == 1 else torch.cat(parts)
            if src.shape[0] == 1:
                return src.expand(F, *src.shape[1:]), False
            return src.index_select(0, own_idx), True

        def own(cur, name, bi):
            return pick(sources(cur, lambda k: getattr(k.blocks[bi], name)))

        def own_rows(cur, name, bi, idx, n):
            """Rows ``idx`` (flat over [F, n]) of each dependant's reference tensor, without
            expanding it to every dependant."""
            parts = sources(cur, lambda k: getattr(k.blocks[bi], name))
            src = parts[0] if len(parts) == 1 else torch.cat(parts)
            flat = src.reshape(-1, src.shape[-1])
            if src.shape[0] == 1:
                return flat.index_select(0, idx % n)
            return flat.index_select(0, own_idx[idx // n] * n + idx % n)

        def linear(fn, ref_in, dep_in, idx, rows):
            """``fn`` on every row of ``ref_in`` [R, n, w] and rows ``idx`` of ``dep_in``, in one call."""
            parts = [ref_in.reshape(-1, ref_in.shape[-1])] if R else []
            if rows:
                flat = dep_in.reshape(-1, dep_in.shape[-1])
                parts.append(flat if rows == flat.shape[0] else flat.index_select(0, idx))
            if not parts:
                return None, None
            res = fn(parts[0] if len(parts) == 1 else torch.cat(parts))
            nr = R * int(ref_in.shape[1]) if R else 0
            return (res[:nr].reshape(R, int(ref_in.shape[1]), -1) if R else None), res[nr:]

        def written(cur, name, bi, idx, rows, vals, shape):
            """The dependants' [F, n, w] values: their reference's, with rows ``idx`` = ``vals``."""
            if rows == shape[0] * shape[1]:
                return vals.reshape(*shape[:2], -1)
            base, fresh = own(cur, name, bi)
            if not rows:
                return base
            res = base if fresh else base.clone()
            res.view(-1, res.shape[-1]).index_copy_(0, idx, vals.to(res.dtype))
            return res

        def gate_rows(active):
            """(flat indices of the active rows of an [F, n] mask, their count, rows per frame)."""
            if isinstance(active, np.ndarray):  # known on the host: no read of the device
                counts = active.sum(axis=1).tolist()
                idx = _on(np.flatnonzero(active), dev)
            else:
                counts = active.sum(dim=1).tolist()  # the gate's one read of the device
                idx = torch.nonzero_static(active.reshape(-1), size=sum(counts)).squeeze(1)
            for j, c in enumerate(counts):
                touched[j] = touched[j] or c > 0
            return idx, int(sum(counts)), counts

        for bi, b in enumerate(fam.blocks):
            bias_r = attention_bias(state, plan.prop_attn, xr.dtype) if (plan is not None and R) else None
            n = int((xr if R else xd).shape[1])
            idx = rows = idx2 = rows2 = idx3 = rows3 = None
            # q/k/v: block 0 recomputes the patches whose hash moved, later blocks the moved inputs
            if F:
                if bi == 0:
                    act = np.zeros((F, n), dtype=bool)
                    act[:, fam.protected :] = changed
                    if fam.protected:
                        act[:, : fam.protected] = act[:, fam.protected :].any(axis=1, keepdims=True)
                else:
                    act = self._gate(xd, own(xr, "x", bi)[0], True)
                idx, rows, counts = gate_rows(act)
            qkv_r, vals = linear(lambda t: fam.qkv(b, fam.ln1(b, t)), xr, xd, idx, rows)
            qkv_d = written(qkv_r, "qkv", bi, idx, rows, vals, (F, n)) if F else None
            # attention: every query of a reference and of a dependant where anything was recomputed
            a_r = k_r = q_r = scale = None
            if R:
                a_r, k_r, q_r, scale = self._attend(b, qkv_r, bias_r)
            if F:
                moved = [j for j, c in enumerate(counts) if c]
                bias_d = own(bias_r, "bias", bi)[0]
                if len(moved) == F:
                    a_d = self._attend(b, qkv_d, bias_d)[0]
                else:
                    a_d, fresh = own(a_r, "a", bi)
                    if moved:
                        mv = _on(moved, dev)
                        a_d = a_d if fresh else a_d.clone()
                        sub = self._attend(b, qkv_d.index_select(0, mv), None if bias_d is None else bias_d.index_select(0, mv))[0]
                        a_d.index_copy_(0, mv, sub.to(a_d.dtype))
                if cfg.attn > 0:
                    idx2, rows2, _ = gate_rows(self._gate(a_d, own(a_r, "a", bi)[0], True, cfg.attn))
                else:  # every token of a frame whose attention was recomputed: known on the host
                    idx2, rows2 = _on((np.asarray(moved, dtype=np.int64)[:, None] * n + np.arange(n)).reshape(-1), dev), len(moved) * n
            p_r, vals = linear(lambda t: fam.proj(b, t), a_r, a_d if F else None, idx2, rows2)
            y_r = xr + p_r if R else None
            y_d = xd + written(p_r, "p", bi, idx2, rows2, vals, (F, n)) if F else None
            # merging: the references run the matcher; dependants replay their reference's merge
            merge_map_r = None
            if R and plan is not None:
                r = self.merge.layer_r(wanted[bi], n, fam.protected)
                if r > 0:
                    probs = attention_probs(q_r, k_r, bias_r, scale, plan.needs)
                    eye = torch.eye(n, dtype=y_r.dtype, device=dev).expand(R, n, n)
                    merged, state2, _ = merge_tokens(torch.cat([y_r, eye], dim=-1), state, k_r.mean(dim=1), probs, r, plan)
                    if state2 is not state:  # the matcher found something to merge
                        width = y_r.shape[-1]
                        y_r, merge_map_r, state = merged[..., :width], merged[..., width:], state2
            if F:
                mm = own(merge_map_r, "merge_map", bi)[0]
                if mm is not None:
                    y_d = torch.bmm(mm, y_d)
                idx3, rows3, _ = gate_rows(self._gate(y_d, own(y_r, "y", bi)[0], True))
            m_r, vals = linear(lambda t: fam.mlp(b, t), y_r, y_d, idx3, rows3)
            if F:
                m = int(y_d.shape[1])
                if rows3 == F * m:
                    x_next = y_d + vals.reshape(y_d.shape).to(y_d.dtype)
                else:
                    x_next = y_d + own(m_r, "m", bi)[0]  # broadcast add, no copy of the cache
                    if rows3:
                        old = own_rows(m_r, "m", bi, idx3, m)
                        x_next.view(F * m, -1).index_add_(0, idx3, vals.to(x_next.dtype) - old.to(x_next.dtype))
                self._count(bi, F * n, F * n, F * m, rows, rows2, rows3)
                xd = x_next
            if R:
                for j in range(R):
                    s = slice(j, j + 1)
                    caches[j].append(_BlockCache(xr[s], qkv_r[s], a_r[s], p_r[s], y_r[s], m_r[s],
                                                 None if bias_r is None else bias_r[s],
                                                 None if merge_map_r is None else merge_map_r[s]))
                nr, mr = R * n, R * int(y_r.shape[1])
                self._count(bi, nr, nr, mr, nr, nr, mr)
                xr = y_r + m_r
        outs, made = [], []
        if R:
            out_r = fam.pool(xr, state.size)
            size = state.size
            made = [_Reference(ref_codes[j], caches[j], None if size is None else size[j : j + 1], out_r[j : j + 1])
                    for j in range(R)]
            outs.append(out_r)
        if F:
            size_d = pick(sources(state.size, lambda k: k.size))[0]
            out_d, fresh = pick(sources(out_r if R else None, lambda k: k.out))
            out_d = out_d if fresh else out_d.clone()
            hit = [j for j, t in enumerate(touched) if t]
            if hit:  # a frame where no gate opened is its reference, exactly
                hi = _on(hit, dev)
                pooled = fam.pool(xd.index_select(0, hi), None if size_d is None else size_d.index_select(0, hi))
                out_d.index_copy_(0, hi, pooled.to(out_d.dtype))
            outs.append(out_d)
        return torch.cat(outs), made

    def _count(self, block, qkv_rows, proj_rows, mlp_rows, qkv_done, proj_done, mlp_done) -> None:
        self.stats.add(block, 0, qkv_rows, qkv_done)
        self.stats.add(block, 1, proj_rows, proj_done)
        self.stats.add(block, 2, mlp_rows, mlp_done)

    # ------------------------------------------------------------------ gated forward (dependants)
    def _gate(self, new, old, forced: bool, threshold: Optional[float] = None):
        """[F, N] bool: rows whose relative L2 change is >= ``threshold`` (default: the config's)
        (+ prefix tokens of active frames)."""
        num = (new - old).float().norm(dim=-1)
        den = old.float().norm(dim=-1).clamp_min(1e-6)
        active = num / den >= (self.cfg.threshold if threshold is None else threshold)
        return self._force_prefix(active) if forced else active

    def _force_prefix(self, active):
        pre = self.fam.protected
        if pre:
            any_rest = active[:, pre:].any(dim=1, keepdim=True)
            active = active.clone()
            active[:, :pre] |= any_rest
        return active


def _on(values, device):
    """Host integers as a long tensor on ``device``, copied without waiting for the device."""
    import torch

    return torch.as_tensor(np.asarray(values, dtype=np.int64)).to(device, non_blocking=True)


class ReuseEncoder:
    """An ``Encoder``'s image tower run as a :class:`ReuseStream` (same autocast, normalised
    float32 vectors, like ``Encoder.encode_image_tensor``).

    Args:
        encoder: an ``encoders.Encoder`` (merging already applied as its config says).
        reuse: reuse config.
    """

    def __init__(self, encoder, reuse: Union[ReuseConfig, str, None]):
        self.encoder = encoder
        self.stream = ReuseStream(encoder.model, reuse, encoder.merge)
        self._since_audit = 0
        self._pending: list = []  # (pixels [1,3,H,W], reuse output [1,D]) waiting for a full audit batch

    @property
    def cfg(self) -> ReuseConfig:
        return self.stream.cfg

    @property
    def stats(self) -> ReuseStats:
        return self.stream.stats

    def _sync(self) -> None:
        import torch

        if str(self.encoder.device).startswith("cuda"):
            torch.cuda.synchronize()

    def encode_image_tensor(self, pixels, video_ids: Sequence[Hashable]):
        """Normalised float32 [B, dim] for preprocessed frames of the given videos (in order)."""
        import time

        import torch

        enc = self.encoder
        t0 = time.perf_counter()
        with torch.inference_mode(), enc._autocast():
            feats = self.stream.encode(pixels.to(enc.device, non_blocking=True), video_ids)
        out = torch.nn.functional.normalize(feats.float(), dim=-1)
        if self.cfg.audit:
            self._sync()
        self.stats.stream_s += time.perf_counter() - t0
        if self.cfg.audit:
            for i, reused in enumerate(self.stream.last_reused):
                if reused:
                    self._since_audit += 1
                    if self._since_audit >= self.cfg.audit:
                        self._since_audit = 0
                        # copies: a view would keep this whole batch alive until the flush
                        self._pending.append((pixels[i : i + 1].clone(), out[i : i + 1].clone()))
            if len(self._pending) >= enc.batch_size:
                self.flush_audit()
        return out

    def flush_audit(self) -> None:
        """Encode the frames waiting for the audit per-frame and record their error and time
        (called when a batch is full and by ``finish``)."""
        import time

        import torch

        if not self._pending:
            return
        pixels = torch.cat([p for p, _ in self._pending])
        mine = torch.cat([o for _, o in self._pending]).to(self.encoder.device)
        self._pending = []
        t0 = time.perf_counter()
        ref = self.encoder.encode_image_tensor(pixels)
        self._sync()
        st = self.stats
        st.audit_s += time.perf_counter() - t0
        cos = (ref * mine).sum(dim=-1).clamp(-1.0, 1.0).double().cpu()
        st.audited += int(cos.numel())
        st.audit_cos_sum += float(cos.sum())
        st.audit_cos_min = min(st.audit_cos_min, float(cos.min()))

    def finish(self) -> ReuseStats:
        """Audit what is still waiting; returns the stats of the run."""
        self.flush_audit()
        return self.stats

    def take_stats(self) -> ReuseStats:
        """The stats since the last call (what is waiting for the audit is audited first), and a
        fresh count from here on; the caches and the audit's frame counter carry on. A worker that
        encodes many sources sends each source's share this way (``ReuseStats.merge`` adds them)."""
        self.flush_audit()
        done = self.stream.stats
        self.stream.stats = ReuseStats(weights=done.weights)
        return done

    def end(self, video_id: Hashable) -> None:
        """The video is finished: drop its cache."""
        self.stream.reset(video_id)
