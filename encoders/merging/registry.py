"""One entry per merge method: what it is called, which function matches, what it needs.

Everything the rest of mergeseek knows about a method lives in its :class:`MatcherSpec`:
``MergeConfig`` validates names and options against it, the patches ask it what to compute from
attention, which options to pass and which tensors to keep per model (lsh: its hyperplanes), the
schedule asks whether r is bounded by half the tokens.
A new method is one matcher function (signature ``(metric, r, class_token=True, *, size,
protected, padded, attn, **options) -> MergeResult``) and one :func:`register` call here.

This module imports no torch: ``MergeConfig`` (and so ``cli.py --help``) reads it; the matcher
function is named by ``module:function`` and imported on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

NEEDS = ("keys", "cls_attn", "attn")


@dataclass(frozen=True)
class MatcherSpec:
    """A merge method.

    Args:
        name: the ``method=`` value.
        target: ``"module:function"`` of the matcher (imported lazily), or the function itself.
        needs: what the patch hands the matcher besides the metric (the head-averaged keys):
            ``keys`` (nothing), ``cls_attn`` (the class token's attention row, [B, H, 1, N]) or
            ``attn`` (the full attention probabilities, [B, H, N, N]).
        bipartite_bounded: r is at most half of the unprotected tokens (each merge needs a partner
            from the other half); otherwise up to all but one.
        config_keys: ``MergeConfig`` fields only this method reads (others may not set them).
        options: ``MergeConfig -> dict`` of keyword options for the matcher.
        needs_prefix: the method scores by the class token and refuses models without one.
        doc: one line for help texts.
        state: ``(MergeConfig, metric dim, device) -> dict`` of tensors made once per model and
            passed to the matcher as options with the same names (kept as buffers of the patched
            module, so they follow it across devices); None: the method keeps nothing.
        tokens: the matcher also gets the block's tokens (``tokens=`` [B, N, C], the rows that
            are averaged), for methods that score pairs on them (``ward``).
    """

    name: str
    target: Any
    needs: str = "keys"
    bipartite_bounded: bool = True
    config_keys: Tuple[str, ...] = ()
    options: Callable[[Any], Dict[str, Any]] = field(default=lambda cfg: {})
    needs_prefix: bool = False
    doc: str = ""
    state: Optional[Callable[[Any, int, Any], Dict[str, Any]]] = None
    tokens: bool = False

    def __post_init__(self) -> None:
        if self.needs not in NEEDS:
            raise ValueError(f"MatcherSpec {self.name!r}: needs={self.needs!r} is not one of {', '.join(NEEDS)}")

    @property
    def fn(self) -> Callable:
        """The matcher function (imported once; later lookups are a dict read, which
        torch.compile traces without a graph break)."""
        if callable(self.target):
            return self.target
        found = _RESOLVED.get(self.target)
        if found is None:
            module, _, name = str(self.target).partition(":")
            found = _RESOLVED[self.target] = getattr(importlib.import_module(module), name)
        return found


_RESOLVED: Dict[str, Callable] = {}


REGISTRY: Dict[str, MatcherSpec] = {}


def register(spec: MatcherSpec) -> MatcherSpec:
    """Add (or replace) a method; returns the spec."""
    REGISTRY[spec.name] = spec
    return spec


def get_spec(method: str) -> MatcherSpec:
    try:
        return REGISTRY[method]
    except KeyError:
        raise KeyError(f"merge method {method!r} is not registered; registered: {', '.join(REGISTRY)}") from None


def methods() -> Tuple[str, ...]:
    return tuple(REGISTRY)


def lsh_options(cfg: Any) -> Dict[str, Any]:
    return cfg.lsh_options()


def lsh_state(cfg: Any, dim: int, device: Any) -> Dict[str, Any]:
    """The SimHash hyperplanes of ``lsh`` (seeded: made once per model, not per forward)."""
    from mergeseek.encoders.merging.lsh import simhash_planes

    return {"planes": simhash_planes(dim, cfg.lsh_bits, cfg.lsh_tables, cfg.seed, device=device)}


def _zerotprune_options(cfg: Any) -> Dict[str, Any]:
    return dict(iters=cfg.iters, prune=cfg.prune)


register(MatcherSpec(
    "bipartite", "mergeseek.encoders.merging.bipartite:bipartite_soft_matching",
    doc="ToMe's bipartite soft matching (cosine of the keys, top-r edges)",
))
register(MatcherSpec(
    "lsh", "mergeseek.encoders.merging.lsh:lsh_soft_matching",
    config_keys=("lsh_bits", "lsh_tables", "lsh_window", "lsh_chunk", "seed"), options=lsh_options, state=lsh_state,
    doc="hashed partner search (SimHash buckets, windowed scoring)",
))
register(MatcherSpec(
    "energy", "mergeseek.encoders.merging.energy:energy_merging",
    doc="energy-guided merging (PiToMe, arXiv 2405.16148): isolated tokens kept out of the merge",
))
register(MatcherSpec(
    "energy_lsh", "mergeseek.encoders.merging.energy:energy_lsh_merging",
    config_keys=("lsh_bits", "lsh_tables", "lsh_window", "lsh_chunk", "seed"), options=lsh_options, state=lsh_state,
    doc="energy-guided merging, hashed: bucket-density energy, partners among bucket-mates",
))
register(MatcherSpec(
    "pairs", "mergeseek.encoders.merging.pairs:pairs_merging",
    doc="one-to-one greedy merging: r disjoint pairs of the most similar tokens (issue #26)",
))
register(MatcherSpec(
    "pairs_lsh", "mergeseek.encoders.merging.pairs:pairs_lsh_merging",
    config_keys=("lsh_bits", "lsh_tables", "lsh_window", "seed"), options=lsh_options, state=lsh_state,
    doc="one-to-one greedy merging, hashed: candidate pairs from SimHash-sorted windows",
))
register(MatcherSpec(
    "pairs_mix", "mergeseek.encoders.merging.mixed:pairs_mix_merging",
    doc="pairs where a block removes >= 5% of its tokens, ToMe's bipartite below (issue #26)",
))
register(MatcherSpec(
    "pairs_mix_lsh", "mergeseek.encoders.merging.mixed:pairs_mix_lsh_merging",
    config_keys=("lsh_bits", "lsh_tables", "lsh_window", "lsh_chunk", "seed"), options=lsh_options, state=lsh_state,
    doc="pairs_mix, hashed: pairs_lsh above the threshold, lsh below",
))
register(MatcherSpec(
    "ward", "mergeseek.encoders.merging.ward:ward_merging", tokens=True,
    doc="one-to-one greedy merging by Ward's cost (size-weighted squared distance of the tokens; issue #26)",
))
register(MatcherSpec(
    "ward_lsh", "mergeseek.encoders.merging.ward:ward_lsh_merging", tokens=True,
    config_keys=("lsh_bits", "lsh_tables", "lsh_window", "seed"), options=lsh_options, state=lsh_state,
    doc="ward, hashed: pairs_lsh's candidate pairs from SimHash-sorted windows, scored by Ward's cost",
))
register(MatcherSpec(
    "ward_imp", "mergeseek.encoders.merging.ward:ward_imp_merging", needs="cls_attn", tokens=True, needs_prefix=True,
    doc="ward with the sizes in the cost weighted by the class token's attention (issue #26, tenth round)",
))
register(MatcherSpec(
    "ward_imp_lsh", "mergeseek.encoders.merging.ward:ward_imp_lsh_merging", needs="cls_attn", tokens=True,
    needs_prefix=True, config_keys=("lsh_bits", "lsh_tables", "lsh_window", "seed"), options=lsh_options,
    state=lsh_state, doc="ward_imp, hashed: ward_lsh's window pairs scored with the class-attention-weighted sizes",
))
register(MatcherSpec(
    "importance", "mergeseek.encoders.merging.importance:importance_merging", needs="cls_attn", bipartite_bounded=False,
    needs_prefix=True, doc="class-attention importance (arXiv 2306.04897)",
))
register(MatcherSpec(
    "zerotprune", "mergeseek.encoders.merging.zerotprune:zerotprune_merging", needs="attn", bipartite_bounded=False,
    config_keys=("iters", "prune"), options=_zerotprune_options, doc="PageRank importance (arXiv 2305.17328)",
))


@dataclass
class MergeResult:
    """What a matcher decided, for one layer of one batch.

    Args:
        merge: ``merge(x [B, N, C], mode="sum"|"mean"|"amax") -> [B, width, C]``.
        unmerge: ``unmerge(x [B, width, C]) -> [B, N, C]`` (each input position gets its slot's row).
        width: output tokens (static: known without reading the device).
        num_merged: tokens each image removed, a [B] tensor (or 0 for the identity).
        padded: the output holds size-0 padding slots (only for inputs that held padding).
        weight: [B, N, 1] averaging weights for ``merge_wavg`` (None: token sizes).
        importance: [B, N] scores the method ranked tokens by (importance methods).
        fallback: [B] merged edges that did not come from the method's own search (lsh: tokens
            without a bucket-mate that took their best partner in a fixed B subset).
        identity: nothing merged (too few tokens, or r = 0).
        wavg: ``wavg(x, size) -> (x, size)``, the size-weighted average of ``merge_wavg`` in one
            fused pass (gathers and one scatter; see ``core.top_r_merge``), when the matcher has
            one; ``merge_wavg`` uses it, and ``merge``/``unmerge`` give the same layout.
        slot: ``slot() -> [B, N] long``, the output slot each input token went to (``width``: a
            token dropped, not merged), when the matcher says so cheaply; ``unmerge`` is a gather
            by it. None: ``encoders.merging.unmerge.token_slots`` reads it off ``unmerge``.

    Unpacks as ``merge, unmerge = result`` for callers of the earlier tuple API, and calling it
    calls ``merge``.
    """

    merge: Callable
    unmerge: Callable
    width: int
    num_merged: Any = 0
    padded: bool = False
    weight: Optional[Any] = None
    importance: Optional[Any] = None
    fallback: Optional[Any] = None
    identity: bool = False
    wavg: Optional[Callable] = None
    slot: Optional[Callable] = None

    def __iter__(self):
        return iter((self.merge, self.unmerge))

    def __getitem__(self, i: int) -> Callable:
        return (self.merge, self.unmerge)[i]

    def __call__(self, x: Any, mode: str = "sum") -> Any:
        return self.merge(x, mode=mode)
