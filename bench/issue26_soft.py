"""Issue #26, fifth round: soft merging ("merging the partner's attention-weighted neighbours"),
screened and dropped -- the matcher and its screening harness (no registered method).

A removed token is spread over several kept tokens, its partner and the partner's neighbours,
instead of being added into one. The tokens a block removes are chosen as by a hard rule
(``choice``): ``pairs`` (one-to-one greedy pairs, :mod:`encoders.merging.pairs`), ``bipartite``
(ToMe's alternate split, top-r edges) or ``pairs_lsh`` (the hashed pairs). Each removed token i
then goes to ``k`` receivers: its hard partner first, then the ``k - 1`` kept tokens most similar
to it (cosine of the metric, ToMe's head-averaged keys; protected tokens never receive), with
weights w_i1..w_ik summing to 1:

- ``weights="attn"``: the head-averaged attention probabilities of i (as a query) to its
  receivers, renormalised over them (the block's own attention, proportional bias included;
  the matcher asks the patch for the full attention, ``needs="attn"``);
- ``weights="attn_unsized"``: the same with the proportional-attention bias taken back out
  (each receiver's probability divided by its size before renormalising);
- ``weights="cos"``: a softmax of the cosines over the receivers at temperature ``tau``.

Token j of the output (a kept token) is then

    x'_j = (s_j x_j + sum_i w_ij s_i x_i) / (s_j + sum_i w_ij s_i),   s'_j = s_j + sum_i w_ij s_i

(s: token sizes), so every removed token's mass sums to 1 over its receivers, sizes stay a
partition of the patches (fractional now) and proportional attention (log s) stays consistent
with the size-weighted average. With ``k = 1`` the receiver is the hard partner with weight 1:
exactly the hard rule (``pairs``: the same floating-point operations). The output keeps every
kept token in position order (the class token first), the layout of ``energy.pair_merge``;
``unmerge`` / ``slot`` send a removed token to its largest-weight receiver. r tokens leave per
call, so the output width is ``N - r`` without a device read.

On the CIFAR-10 reference at r=16 every variant screened lost to ``pairs`` on half A of the test
set (docs/BENCHMARKS.md, issue #26, fifth round), so none is registered. To screen (predictions
under ``runs/i26r5/pred``, paired with the fourth round's ``pairs`` / ``bipartite`` ones):

    python -m mergeseek.bench.issue26_soft score --half A "method=soft_p2a,r=16" "method=soft_p2c,r=16"
    python -m mergeseek.bench.issue26_soft table --half A

Variant names: ``soft_<choice><k><weights>``, choice ``p`` (pairs), ``b`` (bipartite), ``l``
(pairs_lsh); weights ``a`` (attn), ``u`` (attn_unsized), ``c`` (cos, tau 0.1), ``c02`` (cos, tau
0.02); e.g. ``soft_p2a``: pairs' choice, 2 receivers, attention weights.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from mergeseek.encoders.merging.core import NEG_INF, identity_merge, matcher
from mergeseek.encoders.merging.energy import pair_merge
from mergeseek.encoders.merging.registry import MergeResult
from mergeseek.errors import InputError

SOFT_K = 3  # receivers per removed token (its partner and k - 1 nearest kept tokens)
SOFT_TAU = 0.1  # temperature of weights="cos"
CHOICES = ("pairs", "bipartite", "pairs_lsh")
WEIGHTS = ("attn", "attn_unsized", "cos")


def bipartite_choice(unit: torch.Tensor, r: int, keep_first: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """ToMe's choice as positions: (src, dst) [B, r], the r A tokens (even positions) with the most
    similar B partner (odd positions), ties to the earlier A token; protected tokens excluded."""
    scores = unit[:, 0::2] @ unit[:, 1::2].transpose(-1, -2)
    scores[:, : (keep_first + 1) // 2] = NEG_INF
    scores[:, :, : keep_first // 2] = NEG_INF
    best, partner = scores.max(dim=-1)
    src_a = best.argsort(dim=-1, descending=True, stable=True)[:, :r]
    return 2 * src_a, 2 * partner.gather(1, src_a) + 1


def receivers(unit: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, k: int,
              keep_first: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(recv [B, r, k] positions, cos [B, r, k]): each removed token's partner first, then its
    k - 1 most similar kept, unprotected tokens (ties to the earlier position)."""
    batch, n, dim = unit.shape
    sim = unit.gather(1, src[..., None].expand(-1, -1, dim)) @ unit.transpose(-1, -2)  # [B, r, N]
    rank = sim.clone()
    rank[:, :, :keep_first] = NEG_INF
    r = src.shape[1]
    rank.scatter_(2, src[:, None, :].expand(batch, r, r), NEG_INF)  # removed tokens never receive
    rank.scatter_(2, dst[..., None], float("inf"))  # the partner comes first
    recv = rank.topk(k, dim=-1).indices
    return recv, sim.gather(2, recv)


def spread_weights(kind: str, recv: torch.Tensor, cos: torch.Tensor, src: torch.Tensor,
                   attn: Optional[torch.Tensor], tau: float, size: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, r, k] weights of each removed token over its receivers (rows sum to 1)."""
    if recv.shape[-1] == 1:
        return torch.ones_like(cos)
    if kind == "cos":
        return (cos / tau).softmax(dim=-1)
    if attn is None:
        raise InputError("weights=attn needs the attention probabilities (a patch hands them to needs='attn' methods)")
    probs = attn.mean(dim=1)  # [B, N, N], head-averaged (the patches hand fp32 probabilities)
    rows = probs.gather(1, src[..., None].expand(-1, -1, probs.shape[-1]))  # [B, r, N]
    w = rows.gather(2, recv)
    if kind == "attn_unsized" and size is not None:
        w = w / size[..., 0].to(w.dtype).gather(1, recv.view(recv.shape[0], -1)).view_as(w)
    return (w / w.sum(dim=-1, keepdim=True).clamp_min(1e-30)).to(cos.dtype)


def soft_merge(src: torch.Tensor, recv: torch.Tensor, w: torch.Tensor, num_tokens: int) -> MergeResult:
    """Spread token ``src[b, i]`` over ``recv[b, i, :]`` with weights ``w[b, i, :]`` (module doc).

    ``wavg`` and ``merge(x, "sum" | "mean")`` apply the soft map; ``merge(x, "amax")``,
    ``unmerge`` and ``slot`` are those of the hard merge into each removed token's largest-weight
    receiver (``energy.pair_merge``, the same layout).
    """
    batch, r, k = recv.shape
    hard = pair_merge(src, recv.gather(2, w.argmax(dim=-1, keepdim=True))[..., 0], num_tokens)
    width = num_tokens - r
    positions = torch.arange(num_tokens, device=src.device).expand(batch, num_tokens)
    gone = torch.zeros(batch, num_tokens, dtype=torch.long, device=src.device).scatter_(1, src, num_tokens)
    kept = (positions + gone).sort(dim=1).values[:, :width, None]
    src3, recv3 = src[..., None], recv.reshape(batch, r * k, 1)

    def apply(xs: torch.Tensor) -> torch.Tensor:
        c = xs.shape[-1]
        moved = xs.gather(1, src3.expand(-1, -1, c))
        if k > 1:
            moved = (moved[:, :, None, :] * w[..., None].to(xs.dtype)).reshape(batch, r * k, c)
        xs = xs.scatter_add(1, recv3.expand(-1, -1, c), moved)
        return xs.gather(1, kept.expand(-1, -1, c))

    def wavg(x: torch.Tensor, size: Optional[torch.Tensor]) -> "tuple[torch.Tensor, torch.Tensor]":
        out = apply(torch.nn.functional.pad(x, (0, 1), value=1.0) if size is None else torch.cat([x * size, size], dim=-1))
        size = out[..., -1:]
        return out[..., :-1] / size, size

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        if mode == "sum":
            return apply(x)
        if mode == "mean":
            out = apply(torch.nn.functional.pad(x, (0, 1), value=1.0))
            return out[..., :-1] / out[..., -1:]
        return hard.merge(x, mode=mode)

    return MergeResult(merge, hard.unmerge, width, hard.num_merged, wavg=wavg, slot=hard.slot)


@torch.no_grad()
@matcher
def soft_merging(metric: torch.Tensor, r: int, keep_first: int, *, size: Optional[torch.Tensor] = None,
                 padded: Optional[bool] = None, attn: Optional[torch.Tensor] = None, choice: str = "pairs",
                 k: int = SOFT_K, weights: str = "attn", tau: float = SOFT_TAU, planes: Optional[torch.Tensor] = None,
                 lsh_bits: int = 4, lsh_tables: int = 4, lsh_window: int = 16, seed: int = 0,
                 **_: object) -> MergeResult:
    """Remove r tokens chosen by ``choice`` and spread each over ``k`` receivers (module doc).

    Called as every matcher (``core.matcher``); ``attn`` [B, H, N, N] the block's attention
    probabilities (for ``weights="attn"``); ``planes`` / ``lsh_*`` as for ``method=pairs_lsh``.
    """
    from mergeseek.encoders.merging import pairs

    if choice not in CHOICES or weights not in WEIGHTS:
        raise InputError(f"soft merging: choice={choice!r} / weights={weights!r}; choose choice from "
                         f"{', '.join(CHOICES)} and weights from {', '.join(WEIGHTS)}")
    n = metric.shape[1]
    r, unit = pairs.prepare_pairs(metric, r, keep_first, size, padded, "soft")
    if r <= 0:
        return identity_merge(n)
    if choice == "bipartite":
        src, dst = bipartite_choice(unit, r, keep_first)
    else:
        if choice == "pairs":
            edges = pairs.candidate_edges(unit, keep_first, pairs.PAIR_CANDIDATES)
        else:
            if planes is None:
                from mergeseek.encoders.merging.lsh import cached_planes

                planes = cached_planes(metric.shape[2], lsh_bits, lsh_tables, seed, str(metric.device))
            edges = pairs.window_edges(unit, planes, lsh_bits, lsh_tables, lsh_window, keep_first)
        src, dst, _ = pairs.greedy_pairs(*edges, r, n, keep_first)
    k = max(1, min(k, n - r - keep_first))  # never more receivers than kept, unprotected tokens
    recv, cos = receivers(unit, src, dst, k, keep_first)
    return soft_merge(src, recv, spread_weights(weights, recv, cos, src, attn, tau, size), n)


# ---------------------------------------------------------------------------- screening
OUT = "runs/i26r5/pred"
MODEL = "reference-cifar10"
CHOICE_CODES = {"p": "pairs", "b": "bipartite", "l": "pairs_lsh"}
WEIGHT_CODES = {"a": ("attn", SOFT_TAU), "u": ("attn_unsized", SOFT_TAU), "c": ("cos", SOFT_TAU), "c02": ("cos", 0.02)}


def register_variants() -> None:
    """Screening-only methods ``soft_<choice><k><weights>`` (module doc), k = 1..4."""
    import functools

    from mergeseek.encoders.merging.registry import MatcherSpec, lsh_options, lsh_state, register

    lsh_keys = ("lsh_bits", "lsh_tables", "lsh_window", "lsh_chunk", "seed")
    for c, choice in CHOICE_CODES.items():
        hashed = choice == "pairs_lsh"
        for k in (1, 2, 3, 4):
            for w, (weights, tau) in WEIGHT_CODES.items():
                register(MatcherSpec(
                    f"soft_{c}{k}{w}", functools.partial(soft_merging, choice=choice, k=k, weights=weights, tau=tau),
                    needs="attn" if weights.startswith("attn") else "keys", config_keys=lsh_keys if hashed else (),
                    options=lsh_options if hashed else (lambda cfg: {}), state=lsh_state if hashed else None,
                ))


def table(half: str, cfgs: Sequence[str], out: str = OUT) -> None:
    """Top-1 of each screened config and its paired difference (± one standard error) to
    ``pairs`` and ``bipartite`` at the same r (their predictions from the fourth round's folders)."""
    import glob
    import os

    import numpy as np

    from mergeseek.bench.issue26_schedule import OUT as SCHEDULE_OUT
    from mergeseek.bench.issue26_schedule import load_half, pred_path

    y = load_half(MODEL, half)[1].numpy()

    def correct(cfg: str):
        for folder in (out, SCHEDULE_OUT, f"{SCHEDULE_OUT}/imp"):
            path = pred_path(folder, MODEL, half, cfg)
            if os.path.exists(path):
                return np.load(path) == y
        return None

    def fmt(d) -> str:
        return f"{100 * d.mean():+.2f} ± {100 * d.std(ddof=1) / np.sqrt(len(d)):.2f}"

    if not cfgs:
        cfgs = [open(p).read().strip() for p in sorted(glob.glob(f"{out}/pred_{MODEL}_{half}_*.cfg"))]
    for cfg in cfgs:
        ok = correct(cfg)
        if ok is None:
            print(f"{half} {cfg}: not scored")
            continue
        line = f"{half} {cfg:32s} n={len(ok)} top1={100 * ok.mean():6.2f}"
        r = cfg.split("r=", 1)[1].split(",")[0]
        for ref in ("bipartite", "pairs"):
            base = correct(f"method={ref},r={r}")
            if base is not None:
                line += f"  vs {ref} {fmt(ok.astype(float) - base)}"
        print(line)


def main() -> None:
    import argparse

    from mergeseek.bench import issue26_schedule

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("score", "table"))
    p.add_argument("configs", nargs="*")
    p.add_argument("--half", default="A", choices=("A", "B"))
    p.add_argument("--out", default=OUT)
    args = p.parse_intermixed_args()
    if args.what == "score":
        register_variants()
        issue26_schedule.score(MODEL, args.half, args.configs, args.out)
    else:
        table(args.half, args.configs, args.out)


if __name__ == "__main__":
    main()
