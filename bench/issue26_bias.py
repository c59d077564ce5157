"""Issue #26, sixth round: the size bias, the averaging weights and the similarity metric, screened
on top of ``pairs`` and dropped (no registered method).

Three knobs every merge method shares, each changed alone while the rule that picks the pairs
(and so r, the schedule, the token counts and the block FLOPs) stays the same:

- ``alpha=A``: proportional attention with ``A * log(size)`` instead of ``log(size)``
  (A = 1 is ToMe; A = 0 is proportional attention off);
- ``gamma=G``: merged tokens averaged with weights ``size ** G`` instead of ``size``
  (G = 1 is ToMe; sizes still add up);
- ``xmetric``: similarity measured on the block's hidden states (after the attention branch) instead
  of ToMe's head-averaged keys; ``kxmetric``: the mean of the two cosines.

Screened on half A of the CIFAR-10 test set with the fourth round's harness and paired with its
saved ``pairs`` / ``bipartite`` predictions (docs/BENCHMARKS.md, issue #26, sixth round):

    python -m mergeseek.bench.issue26_bias score --half A --variant alpha=1.1 "method=pairs,r=16"
    python -m mergeseek.bench.issue26_bias table --half A
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch



def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Patch the merged forward (``encoders.patch.common``) for one variant while in the block."""
    from mergeseek.encoders.patch import common

    saved = {k: getattr(common, k) for k in ("attention_bias", "merge_tokens", "merge_wavg")}
    kind, _, value = name.partition("=")
    if kind == "alpha":
        a = float(value)

        def attention_bias(state, prop_attn, dtype):
            bias = saved["attention_bias"](state, prop_attn, dtype)
            return None if bias is None or not prop_attn else bias * a
        common.attention_bias = attention_bias
    elif kind == "gamma":
        g = float(value)

        def merge_wavg(result, x, size, mlerp=False):
            w = torch.ones_like(x[..., :1]) if size is None else size ** g
            return saved["merge_wavg"](result, x, size, weight=w, mlerp=mlerp)
        common.merge_wavg = merge_wavg
    elif kind in ("xmetric", "kxmetric"):
        def merge_tokens(x, state, metric, attn, r, plan):
            if r > 0:
                metric = x if kind == "xmetric" else torch.cat([_unit(metric), _unit(x)], dim=-1)
            return saved["merge_tokens"](x, state, metric, attn, r, plan)
        common.merge_tokens = merge_tokens
    elif kind != "base":
        raise ValueError(f"unknown variant {name!r}; choose alpha=A, gamma=G, xmetric, kxmetric or base")
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(common, k, v)


def main() -> None:
    from mergeseek.bench.issue26_schedule import screening_main

    screening_main(__doc__, variant, "alpha=A, gamma=G, xmetric, kxmetric or base", "method=pairs,r=16")


if __name__ == "__main__":
    main()
