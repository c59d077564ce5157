"""One pass of the reuse stream over the blocks: :class:`BlockPass`, one method per gate.

R reference frames are computed in full and their caches kept; F dependants, dependant ``j``
reusing reference ``owner[j]`` (0..R-1: one of the R, R..: the reference ``kept[owner[j] - R]``
of an earlier call), recompute what each gate lets through. The references' rows and the
dependants' recomputed rows go through each linear layer as one matrix product, so a reference
alone in its batch does not pay for a one-frame product. Each gate reads the device once (its
per-frame row counts); block 0's q/k/v gate is known on the host and reads nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import numpy as np
import torch
from torch.nn.functional import scaled_dot_product_attention

from mergeseek.encoders.patch.common import TokenState, attention_bias, attention_probs, merge_tokens


@dataclass
class BlockCache:
    """One block of one reference frame ([1, N, ...] tensors; ``y``/``m`` in the merged layout)."""

    x: Any
    qkv: Any
    a: Any
    p: Any
    y: Any
    m: Any
    bias: Any  # attention bias of the block's layout (None: no sizes yet)
    merge_map: Any  # [1, N_in, 2]: per token its merged slot and weight (None: the block does not merge)


@dataclass
class Reference:
    codes: Any  # [Np, bits] bool NumPy array: planning runs on the host
    blocks: List[BlockCache]
    size: Any  # token sizes after the last block (None without merging)
    out: Any  # model output of the reference frame [1, D]


def on_device(values, device) -> torch.Tensor:
    """Host integers as a long tensor on ``device``, copied without waiting for the device."""
    return torch.as_tensor(np.asarray(values, dtype=np.int64)).to(device, non_blocking=True)


class BlockPass:
    """One pass over the blocks for R references and F dependants (module doc).

    Args:
        stream: the ``ReuseStream`` (family adapter, config, merge config and plan, stats).
        ref_patches, dep_patches: patch embeddings of the references / dependants (None: none).
        owner: per dependant, the index of its reference (module doc).
        kept: references of earlier calls that dependants of this pass reuse.
    """

    def __init__(self, stream, ref_patches, dep_patches, owner: List[int], kept: List[Reference]) -> None:
        self.fam, self.cfg, self.merge, self.plan, self.stats = stream.fam, stream.cfg, stream.merge, stream.plan, stream.stats
        # contiguous: a ViT without a class token (SigLIP) keeps the patch embedding's transposed
        # strides through the position add, and the gathers below view rows flat
        self.xr = self.fam.tokens(ref_patches).contiguous() if ref_patches is not None else None
        self.xd = self.fam.tokens(dep_patches).contiguous() if dep_patches is not None else None
        self.R = 0 if self.xr is None else int(self.xr.shape[0])
        self.F = 0 if self.xd is None else int(self.xd.shape[0])
        self.dev = (self.xr if self.xr is not None else self.xd).device
        self.own_idx = on_device(owner, self.dev)
        self.kept = kept
        self.state = TokenState()
        self.caches: List[list] = [[] for _ in range(self.R)]
        self.touched = [False] * self.F  # frames where some gate opened (the others equal their reference)
        # rolling caches: per dependant, the caches it leaves for its video's next frame
        self.rolled: Optional[List[list]] = [[] for _ in range(self.F)] if self.cfg.roll else None

    def run(self, codes, changed):
        """Every block, then the pooled outputs: (outputs [R + F, D], per frame the caches it
        leaves: a ``Reference`` for each reference, and with rolling caches for each dependant,
        else None). ``codes``: per frame (references, then dependants) the hash codes its caches
        stand for; ``changed``: [F, Np] patches whose hash moved (NumPy)."""
        wanted = self.merge.wanted(len(self.fam.blocks))
        for bi, b in enumerate(self.fam.blocks):
            self.block(bi, b, wanted[bi], changed)
        return self.outputs(codes)

    # ------------------------------------------------------------------ one block, gate by gate
    def block(self, bi: int, b, want: Optional[int], changed) -> None:
        R, F, xr = self.R, self.F, self.xr
        bias_r = attention_bias(self.state, self.plan.prop_attn, xr.dtype) if (self.plan is not None and R) else None
        n = int((xr if R else self.xd).shape[1])
        qkv_r, qkv_d, rows, counts, x_buf, queries = self.qkv_gate(bi, b, n, changed)
        a_r, a_d, q_r, k_r, scale, moved = self.attention(bi, b, n, qkv_r, qkv_d, bias_r, counts, queries)
        p_r, p_d, y_r, y_d, rows2 = self.proj_gate(bi, b, n, a_r, a_d, moved, queries)
        y_r, y_d, merge_map_r = self.merge_step(bi, n, want, y_r, y_d, q_r, k_r, bias_r, scale)
        m_r, x_next, rows3, y_buf, m_buf = self.mlp_gate(bi, b, y_r, y_d)
        if F:
            self.count(bi, F * n, F * n, F * int(y_d.shape[1]), rows, rows2, rows3)
            if self.rolled is not None:
                bias_d = self.own(bias_r, "bias", bi)[0]
                map_d = self.own(merge_map_r, "merge_map", bi)[0]
                for j in range(F):
                    s = slice(j, j + 1)
                    self.rolled[j].append(BlockCache(x_buf[s], qkv_d[s], a_d[s], p_d[s], y_buf[s], m_buf[s],
                                                     None if bias_d is None else bias_d[s],
                                                     None if map_d is None else map_d[s]))
            self.xd = x_next
        if R:
            for j in range(R):
                s = slice(j, j + 1)
                self.caches[j].append(BlockCache(xr[s], qkv_r[s], a_r[s], p_r[s], y_r[s], m_r[s],
                                                 None if bias_r is None else bias_r[s],
                                                 None if merge_map_r is None else merge_map_r[s]))
            nr, mr = R * n, R * int(y_r.shape[1])
            self.count(bi, nr, nr, mr, nr, nr, mr)
            self.xr = y_r + m_r

    def qkv_gate(self, bi: int, b, n: int, changed):
        """q/k/v: block 0 recomputes the patches whose hash moved, later blocks the moved inputs.
        Returns (references' qkv, dependants' qkv, rows recomputed, per-frame row counts, the
        rolling cache of the block input, and with ``query`` > 0 the queries whose attention is
        recomputed: (flat indices, count, per-frame counts))."""
        fam, F, cfg = self.fam, self.F, self.cfg
        idx = rows = counts = queries = None
        if F:
            x_old = None
            if bi == 0:
                act = np.zeros((F, n), dtype=bool)
                act[:, fam.protected :] = changed
                if fam.protected:
                    act[:, : fam.protected] = act[:, fam.protected :].any(axis=1, keepdims=True)
            else:
                x_old = self.own(self.xr, "x", bi)[0]
                act = self.gate(self.xd, x_old)
            idx, rows, counts = self.gate_rows(act)
            if cfg.query > 0:
                queries = (idx, rows, counts)
                if cfg.query < cfg.threshold:  # a wider set: the inputs that moved by ``query``
                    x_old = self.own(self.xr, "x", bi)[0] if x_old is None else x_old
                    wide = self.gate(self.xd, x_old, cfg.query)
                    wide |= torch.as_tensor(act, device=self.dev) if isinstance(act, np.ndarray) else act
                    queries = self.gate_rows(wide)
        qkv_r, vals = self.linear(lambda t: fam.qkv(b, fam.ln1(b, t)), self.xr, self.xd, idx, rows)
        qkv_d = self.written(qkv_r, "qkv", bi, idx, rows, vals, (F, n)) if F else None
        x_buf = self.rolled_rows(self.xr, "x", bi, idx, rows, self.xd) if F and self.rolled is not None else None
        return qkv_r, qkv_d, rows, counts, x_buf, queries

    def attention(self, bi: int, b, n: int, qkv_r, qkv_d, bias_r, counts, queries):
        """Every query of a reference and of a dependant where any q/k/v row was recomputed (with
        ``query`` > 0: the dependants' ``queries`` only, the other rows cached).
        Returns (a_r, a_d, q_r, k_r, scale, the dependants that moved)."""
        a_r = k_r = q_r = scale = a_d = moved = None
        if self.R:
            a_r, k_r, q_r, scale = self.attend(b, qkv_r, bias_r)
        if self.F:
            moved = [j for j, c in enumerate(counts) if c]
            bias_d = self.own(bias_r, "bias", bi)[0]
            if queries is not None:
                q_idx, q_rows, q_counts = queries
                vals = self.attend_rows(b, qkv_d, bias_d, q_idx, q_counts) if q_rows else None
                a_d = self.written(a_r, "a", bi, q_idx, q_rows, vals, (self.F, n))
            elif len(moved) == self.F:
                a_d = self.attend(b, qkv_d, bias_d)[0]
            else:
                a_d, fresh = self.own(a_r, "a", bi)
                if moved:
                    mv = on_device(moved, self.dev)
                    a_d = a_d if fresh else a_d.clone()
                    sub = self.attend(b, qkv_d.index_select(0, mv), None if bias_d is None else bias_d.index_select(0, mv))[0]
                    a_d.index_copy_(0, mv, sub.to(a_d.dtype))
        return a_r, a_d, q_r, k_r, scale, moved

    def proj_gate(self, bi: int, b, n: int, a_r, a_d, moved, queries):
        """Out-projection: every token whose attention was recomputed (``attn=0``), else the tokens
        whose attention output moved by ``attn``. Returns (p_r, p_d, y_r, y_d, rows)."""
        idx = rows = None
        if self.F:
            if self.cfg.attn > 0:
                idx, rows, _ = self.gate_rows(self.gate(a_d, self.own(a_r, "a", bi)[0], self.cfg.attn))
            elif queries is not None:  # the other rows kept their attention output, so their projection
                idx, rows = queries[0], queries[1]
            else:  # known on the host
                idx = on_device((np.asarray(moved, dtype=np.int64)[:, None] * n + np.arange(n)).reshape(-1), self.dev)
                rows = len(moved) * n
        p_r, vals = self.linear(lambda t: self.fam.proj(b, t), a_r, a_d, idx, rows)
        y_r = self.xr + p_r if self.R else None
        p_d = self.written(p_r, "p", bi, idx, rows, vals, (self.F, n)) if self.F else None
        y_d = self.xd + p_d if self.F else None
        return p_r, p_d, y_r, y_d, rows

    def merge_step(self, bi: int, n: int, want: Optional[int], y_r, y_d, q_r, k_r, bias_r, scale):
        """The references run the matcher, recording the merge as a map from the block's tokens to
        the merged slots; dependants replay their reference's map. Returns (y_r, y_d, map)."""
        merge_map_r, plan = None, self.plan
        if self.R and plan is not None:
            r = self.merge.layer_r(want, n, self.fam.protected)
            if r > 0:
                probs = attention_probs(q_r, k_r, bias_r, scale, plan.needs)
                eye = torch.eye(n, dtype=y_r.dtype, device=self.dev).expand(self.R, n, n)
                merged, state, _ = merge_tokens(torch.cat([y_r, eye], dim=-1), self.state, k_r.mean(dim=1), probs, r, plan,
                                                scored=y_r)
                if state is not self.state:  # the matcher found something to merge
                    width = y_r.shape[-1]
                    y_r, dense, self.state = merged[..., :width], merged[..., width:], state
                    # every token goes to one slot (the merge is a scatter-sum): keep that slot
                    # and its weight, so a dependant merges in O(N C), not O(N^2 C)
                    slot = dense.argmax(dim=1, keepdim=True)  # [R, 1, N_in]
                    merge_map_r = torch.stack([slot.squeeze(1).to(dense.dtype), dense.gather(1, slot).squeeze(1)], dim=-1)
        if self.F:
            mm = self.own(merge_map_r, "merge_map", bi)[0]
            if mm is not None:
                y_d = self.replay(mm, y_d, int(self.sources(y_r, lambda k: k.blocks[bi].y)[0].shape[1]))
        return y_r, y_d, merge_map_r

    @staticmethod
    def replay(mm, y, n_out: int):
        """The merge ``mm`` [F, N_in, 2] (slot, weight per token) applied to ``y`` [F, N_in, C]."""
        f, n_in, width = y.shape
        slot = mm[..., 0].long() + torch.arange(f, device=y.device).unsqueeze(1) * n_out
        out = y.new_zeros(f * n_out, width)
        out.index_add_(0, slot.reshape(-1), (y * mm[..., 1:].to(y.dtype)).reshape(-1, width))
        return out.view(f, n_out, width)

    def mlp_gate(self, bi: int, b, y_r, y_d):
        """MLP: the tokens whose post-attention input moved. Returns (m_r, the dependants' block
        outputs, rows recomputed, and with rolling caches the dependants' y and MLP caches)."""
        F = self.F
        idx = rows = x_next = y_buf = m_buf = None
        if F:
            idx, rows, _ = self.gate_rows(self.gate(y_d, self.own(y_r, "y", bi)[0]))
        m_r, vals = self.linear(lambda t: self.fam.mlp(b, t), y_r, y_d, idx, rows)
        if F:
            m = int(y_d.shape[1])
            if self.rolled is not None:  # the caches are made anyway: the block output is one add
                y_buf = self.rolled_rows(y_r, "y", bi, idx, rows, y_d)
                m_buf = self.written(m_r, "m", bi, idx, rows, vals, (F, m))
                x_next = y_d + m_buf.to(y_d.dtype)
            elif rows == F * m:
                x_next = y_d + vals.reshape(y_d.shape).to(y_d.dtype)
            else:
                x_next = y_d + self.own(m_r, "m", bi)[0]  # broadcast add, no copy of the cache
                if rows:
                    old = self.own_rows(m_r, "m", bi, idx, m)
                    x_next.view(F * m, -1).index_add_(0, idx, vals.to(x_next.dtype) - old.to(x_next.dtype))
        return m_r, x_next, rows, y_buf, m_buf

    def outputs(self, codes):
        """Pooled outputs of the references and the dependants, and the caches each leaves."""
        fam, R, F, prop_attn = self.fam, self.R, self.F, self.merge.prop_attn
        outs, made, out_r = [], [], None
        if R:
            out_r = fam.pool(self.xr, self.state.size, prop_attn)
            size = self.state.size
            made = [Reference(codes[j], self.caches[j], None if size is None else size[j : j + 1], out_r[j : j + 1])
                    for j in range(R)]
            outs.append(out_r)
        if F:
            size_d = self.pick(self.sources(self.state.size, lambda k: k.size))[0]
            out_d, fresh = self.pick(self.sources(out_r, lambda k: k.out))
            out_d = out_d if fresh else out_d.clone()
            hit = [j for j, t in enumerate(self.touched) if t]
            if hit:  # a frame where no gate opened is its reference, exactly
                hi = on_device(hit, self.dev)
                pooled = fam.pool(self.xd.index_select(0, hi), None if size_d is None else size_d.index_select(0, hi), prop_attn)
                out_d.index_copy_(0, hi, pooled.to(out_d.dtype))
            outs.append(out_d)
            if self.rolled is None:
                made += [None] * F
            else:
                made += [Reference(codes[R + j], self.rolled[j], None if size_d is None else size_d[j : j + 1],
                                   out_d[j : j + 1]) for j in range(F)]
        return torch.cat(outs), made

    # ------------------------------------------------------------------ the references' tensors
    def sources(self, cur, get) -> list:
        """This pass's references' tensor ``cur`` (when there are any), then the kept references'."""
        return ([cur] if self.R else []) + [get(k) for k in self.kept]

    def pick(self, parts):
        """Each dependant's row of its reference's tensor: ([F, ...] or None, freshly made)."""
        if all(p is None for p in parts):
            return None, False
        if any(p is None for p in parts):
            raise RuntimeError("reuse: the references of one pass have different token layouts")
        src = parts[0] if len(parts) == 1 else torch.cat(parts)
        if src.shape[0] == 1:
            return src.expand(self.F, *src.shape[1:]), False
        return src.index_select(0, self.own_idx), True

    def own(self, cur, name: str, bi: int):
        return self.pick(self.sources(cur, lambda k: getattr(k.blocks[bi], name)))

    def own_rows(self, cur, name: str, bi: int, idx, n: int):
        """Rows ``idx`` (flat over [F, n]) of each dependant's reference tensor, without expanding
        it to every dependant."""
        parts = self.sources(cur, lambda k: getattr(k.blocks[bi], name))
        src = parts[0] if len(parts) == 1 else torch.cat(parts)
        flat = src.reshape(-1, src.shape[-1])
        if src.shape[0] == 1:
            return flat.index_select(0, idx % n)
        return flat.index_select(0, self.own_idx[idx // n] * n + idx % n)

    def linear(self, fn, ref_in, dep_in, idx, rows):
        """``fn`` on every row of ``ref_in`` [R, n, w] and rows ``idx`` of ``dep_in``, in one call."""
        R = self.R
        parts = [ref_in.reshape(-1, ref_in.shape[-1])] if R else []
        if rows:
            flat = dep_in.reshape(-1, dep_in.shape[-1])
            parts.append(flat if rows == flat.shape[0] else flat.index_select(0, idx))
        if not parts:
            return None, None
        res = fn(parts[0] if len(parts) == 1 else torch.cat(parts))
        nr = R * int(ref_in.shape[1]) if R else 0
        return (res[:nr].reshape(R, int(ref_in.shape[1]), -1) if R else None), res[nr:]

    def written(self, cur, name: str, bi: int, idx, rows, vals, shape):
        """The dependants' [F, n, w] values: their reference's, with rows ``idx`` = ``vals``."""
        if rows == shape[0] * shape[1]:
            return vals.reshape(*shape[:2], -1)
        base, fresh = self.own(cur, name, bi)
        if not rows:
            return base
        res = base if fresh else base.clone()
        res.view(-1, res.shape[-1]).index_copy_(0, idx, vals.to(res.dtype))
        return res

    def rolled_rows(self, cur, name: str, bi: int, idx, rows: int, new):
        """The dependants' rolling cache of the gate input ``name``: their reference's values, with
        the rows ``idx`` that were recomputed taken from ``new`` [F, n, w]."""
        flat = new.reshape(-1, new.shape[-1])
        picked = flat if rows == flat.shape[0] else (flat.index_select(0, idx) if rows else None)
        return self.written(cur, name, bi, idx, rows, picked, tuple(new.shape[:2]))

    # ------------------------------------------------------------------ gates
    def gate(self, new, old, threshold: Optional[float] = None):
        """[F, N] bool: rows whose relative L2 change is >= ``threshold`` (default: the config's),
        and the prefix tokens of every frame with such a row."""
        num = (new - old).float().norm(dim=-1)
        den = old.float().norm(dim=-1).clamp_min(1e-6)
        active = num / den >= (self.cfg.threshold if threshold is None else threshold)
        pre = self.fam.protected
        if pre:
            any_rest = active[:, pre:].any(dim=1, keepdim=True)
            active = active.clone()
            active[:, :pre] |= any_rest
        return active

    def gate_rows(self, active):
        """(flat indices of the active rows of an [F, n] mask, their count, rows per frame)."""
        if isinstance(active, np.ndarray):  # known on the host: no read of the device
            counts = active.sum(axis=1).tolist()
            idx = on_device(np.flatnonzero(active), self.dev)
        else:
            counts = active.sum(dim=1).tolist()  # the gate's one read of the device
            idx = torch.nonzero_static(active.reshape(-1), size=sum(counts)).squeeze(1)
        for j, c in enumerate(counts):
            self.touched[j] = self.touched[j] or c > 0
        return idx, int(sum(counts)), counts

    def attend(self, b, qkv, bias):
        """Attention of every query: (pre-projection output [f, N, C], k, q, scale)."""
        f, n, _ = qkv.shape
        q, k, v = qkv.reshape(f, n, 3, self.fam.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k, scale = self.fam.qk(b, q, k)
        out = scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), scale=scale)
        return out.transpose(1, 2).reshape(f, n, -1), k, q, scale

    def attend_rows(self, b, qkv, bias, idx, counts):
        """Attention of the queries ``idx`` (flat over [F, N], frame by frame) against every key of
        their frame: [rows, C] in the order of ``idx``."""
        f, n, _ = qkv.shape
        q, k, v = qkv.reshape(f, n, 3, self.fam.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        pos = idx % n
        outs, start = [], 0
        for j, c in enumerate(counts):
            if not c:
                continue
            qj = q[j : j + 1] if c == n else q[j : j + 1].index_select(2, pos[start : start + c])
            start += c
            qj, kj, scale = self.fam.qk(b, qj, k[j : j + 1])
            mask = None if bias is None else bias[j : j + 1].to(qj.dtype)
            out = scaled_dot_product_attention(qj, kj, v[j : j + 1], attn_mask=mask, scale=scale)
            outs.append(out.transpose(1, 2).reshape(c, -1))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def count(self, block: int, qkv_rows, proj_rows, mlp_rows, qkv_done, proj_done, mlp_done) -> None:
        self.stats.add(block, 0, qkv_rows, qkv_done)
        self.stats.add(block, 1, proj_rows, proj_done)
        self.stats.add(block, 2, mlp_rows, mlp_done)
