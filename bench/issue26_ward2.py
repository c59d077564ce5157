"""Issue #26, tenth round: variations of ``method=ward`` screened on both CIFAR-10 references (the
screening method ``w10`` is registered only by this harness).

``method=ward`` (encoders/merging/ward.py) scores an edge by Ward's cost
``-(s_a s_b / (s_a + s_b)) ||x_a - x_b||^2`` on the block's tokens and sizes, lists each free
token's 16 cheapest partners and takes r times the cheapest edge with two unused ends. Each
variant changes one thing, and keeps r per block (so the token counts and block FLOPs of
``ward`` and ``bipartite``):

- ``base``: ``ward`` exactly (the cost written out here, the same float operations);
- ``bip``: ToMe's alternate split instead of the greedy pairs: A = even positions (the class token
  left out), B = odd; each A token's cheapest B partner by Ward's cost, the r A tokens with the
  cheapest edges merged into their partner (several A into one B allowed, as ToMe; as cheap);
- ``k=K``: ``K`` candidate partners per token instead of 16 (at r=16 of 145 tokens the greedy step
  can run out of candidates and fall back to position order);
- ``ln``: the cost on the layer-normed tokens (``F.layer_norm`` without affine), sizes as they are;
- ``two``: two greedy rounds inside the block, r // 2 then r - r // 2, the second scored on the
  merged tokens and sizes (clusters of up to 4 tokens; the block removes the same r tokens). The
  harness patches ``encoders.patch.common.merge_tokens`` to call the original twice;
  ``rounds=R``: ``R`` such rounds (r split as evenly as possible, the larger parts last;
  ``rounds=2`` is ``two``; clusters of up to 2^R tokens);
- ``imp=A``: importance-weighted sizes in the cost, ``s' = s (1 + A N c)``, ``c`` the class
  token's attention to each token averaged over heads (the block's own softmax, proportional
  bias included; N c averages 1); the merged rows are still averaged by the true sizes;
- ``kc=K``: each token's ``K`` candidate partners are its most similar by key cosine (``pairs``'
  candidates), the edges scored by Ward's cost (``ward_lsh``, whose candidates come from the keys'
  hash buckets, was 0.12 above ``ward`` on the second reference: is it the key neighbourhood?).

``w10`` asks for the class token's attention row (``needs="cls_attn"``) and the block's tokens
(``MatcherSpec.tokens``); the forward itself is unchanged. Screened on half A of each reference
with the fourth round's harness, paired with the saved ``ward`` predictions
(docs/BENCHMARKS.md, issue #26, tenth round):

    python -m mergeseek.bench.issue26_ward2 score --variant bip "method=w10,r=16"
    python -m mergeseek.bench.issue26_ward2 score --model reference-cifar10-56 --variant bip "method=w10,r=20"
    python -m mergeseek.bench.issue26_ward2 table --ref "method=ward,r=16|base"
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, List, Optional

import torch
import torch.nn.functional as F

from mergeseek.encoders.merging.core import NEG_INF, identity_merge, matcher, top_r_merge
from mergeseek.encoders.merging.energy import pair_merge
from mergeseek.encoders.merging.pairs import (PAIR_CANDIDATES, candidate_edges, greedy_pairs, matrix_edges,
                                             prepare_pairs)
from mergeseek.encoders.merging.registry import MergeResult
from mergeseek.encoders.merging.ward import ward_scores

VARIANTS = ("base", "bip", "k", "ln", "two", "imp", "kc", "rounds")
PATCHING = ("two", "rounds")  # variants that patch common.merge_tokens

_variant = {"kind": "base", "value": 0.0}


def edge_scores(kind: str, value: float, tokens: torch.Tensor, size: Optional[torch.Tensor],
                cls_attn: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, N, N] the variant's edge score (higher merges first; the diagonal and the protected
    tokens are masked by the caller): ``tokens`` [B, N, C], ``size`` [B, N, 1] or None,
    ``cls_attn`` [B, H, 1, N] the class token's attention (``imp``)."""
    if kind in ("base", "bip", "k", "two", "kc", "rounds"):
        return ward_scores(tokens, size)
    if kind == "ln":
        x = tokens.float()
        return ward_scores(F.layer_norm(x, x.shape[-1:]), size)
    if kind == "imp":
        if cls_attn is None:
            raise ValueError("imp needs the class token's attention row (needs='cls_attn')")
        batch, n = tokens.shape[:2]
        c = cls_attn.float().mean(dim=1)[:, 0]  # [B, N]
        s = torch.ones(batch, n, device=tokens.device) if size is None else size[..., 0].float()
        return ward_scores(tokens, (s * (1 + value * n * c))[..., None])
    raise ValueError(f"unknown variant {kind!r}")


@torch.no_grad()
@matcher
def w10_merging(metric: torch.Tensor, r: int, keep_first: int, *, size: Optional[torch.Tensor] = None,
                padded: Optional[bool] = None, attn: Optional[torch.Tensor] = None,
                tokens: Optional[torch.Tensor] = None, **_: object) -> MergeResult:
    """``ward`` with the selected variant (module doc); ``tokens`` [B, N, C] the block's tokens."""
    n = metric.shape[1]
    if tokens is None or tokens.shape[:2] != metric.shape[:2]:
        raise ValueError("w10 scores the block's tokens: call it through a patched model or pass tokens=[B, N, C]")
    r, unit = prepare_pairs(metric, r, keep_first, size, padded, "w10")  # refuses padding
    if r <= 0:
        return identity_merge(n)
    kind, value = _variant["kind"], _variant["value"]
    sim = edge_scores(kind, value, tokens, size, attn)
    if kind == "bip":
        if keep_first > 1:
            raise ValueError(f"bip: at most one protected token (a class token), got {keep_first}")
        best, partner = sim[:, 2 * keep_first :: 2, 1::2].max(dim=-1)  # as bipartite.py's split
        return top_r_merge(best, partner, r, n, keep_first)
    if kind == "kc":  # the keys' candidate edges (-inf: protected or the token itself), Ward's cost on them
        cos, first, second = candidate_edges(unit, keep_first, int(value))
        cost = sim.flatten(1).gather(1, first * n + second)
        edges = (cost.masked_fill(cos == NEG_INF, NEG_INF), first, second)
    else:
        edges = matrix_edges(sim, keep_first, int(value) if kind == "k" else PAIR_CANDIDATES)
    src, dst, fallback = greedy_pairs(*edges, r, n, keep_first)
    out = pair_merge(src, dst, n)
    out.fallback = fallback
    return out


def round_sizes(r: int, rounds: int) -> List[int]:
    """r split into ``rounds`` parts as evenly as possible, the larger ones last (r // 2, r - r // 2
    for two), zero parts left out."""
    base, extra = divmod(r, rounds)
    return [p for p in [base] * (rounds - extra) + [base + 1] * extra if p > 0]


def _in_rounds(saved, rounds: int):
    """``common.merge_tokens`` that merges r tokens in ``rounds`` greedy rounds, each on the tokens
    and sizes the previous one left (the metric merged by the same size-weighted average; the
    attention only for the first round). The result returned is the last round's, with every
    round's count in ``num_merged``."""
    from mergeseek.encoders.merging import merge_wavg

    def merge_tokens(x, state, metric, attn, r, plan, scored=None):
        if scored is not None:
            raise ValueError("rounds: the reuse pass (scored tokens) is not supported by this screening variant")
        merged, last = 0, None
        for k, part in enumerate(round_sizes(r, rounds)):
            out_x, out_state, result = saved(x, state, metric, attn if k == 0 else None, part, plan)
            if not isinstance(result, MergeResult) or result.identity:
                break
            metric = merge_wavg(result, metric, state.size)[0]
            x, state, merged, last = out_x, out_state, merged + result.num_merged, result
        if last is None:
            return saved(x, state, metric, attn, 0, plan)
        return x, state, dataclasses.replace(last, num_merged=merged)

    return merge_tokens


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Select what ``method=w10`` does while in the block (``kind=value`` or ``kind``); ``two`` and
    ``rounds=R`` also patch ``encoders.patch.common.merge_tokens`` (restored on exit)."""
    from mergeseek.encoders.patch import common

    kind, _, value = name.partition("=")
    if kind not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)} (k=K, imp=A, kc=K, rounds=R)")
    if kind in ("k", "kc", "rounds") and (not value or int(float(value)) < 1):
        raise ValueError(f"variant {name!r}: {kind} needs a count >= 1, e.g. {kind}=4")
    saved_variant, saved_merge = dict(_variant), common.merge_tokens
    _variant.update(kind=kind, value=float(value or 0))
    if kind in PATCHING:
        common.merge_tokens = _in_rounds(saved_merge, 2 if kind == "two" else int(float(value)))
    try:
        yield
    finally:
        _variant.update(saved_variant)
        common.merge_tokens = saved_merge


def register() -> None:
    from mergeseek.encoders.merging.registry import MatcherSpec, register as add

    add(MatcherSpec("w10", w10_merging, needs="cls_attn", tokens=True,
                    doc="issue #26 tenth-round screening of ward variants (bench only)"))


def main() -> None:
    from mergeseek.bench.issue26_schedule import screening_main

    screening_main(__doc__, variant, "bip, k=K, ln, two, rounds=R, imp=A, kc=K or base", "method=w10,r=16", register)


if __name__ == "__main__":
    main()
