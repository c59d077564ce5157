"""``MergeConfig``: one frozen value that says how (and how much) an encoder merges tokens.

Parsed from strings such as ``r=8``, ``r=8,method=lsh,lsh_bits=6``, ``r=[16,16,8,8,0,0]`` or
``r=8,schedule=decreasing``; ``str(cfg)`` round-trips through :meth:`MergeConfig.parse` so every
report can record the exact setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

from mergeseek.encoders.merging.registry import REGISTRY, get_spec
from mergeseek.errors import ConfigError
from mergeseek.options import parse_options

METHODS = ("none", *REGISTRY)  # every registered method (encoders/merging/registry.py)
SCHEDULES = ("constant", "decreasing")
MERGES = ("mean", "mlerp")  # how merged tokens are averaged (merge=)
METRICS = ("keys", "heads")  # what similarity is measured on (metric=)
_BOOL_TRUE = ("1", "true", "on", "yes")
_BOOL_FALSE = ("0", "false", "off", "no")


@dataclass(frozen=True)
class MergeConfig:
    """How an encoder merges tokens.

    Args:
        method: ``none`` (no patch), ``bipartite`` (ToMe), ``lsh`` (hashed partner search),
            ``energy`` / ``energy_lsh`` (PiToMe's energy rule, exact or hashed), ``pairs`` /
            ``pairs_lsh`` (one-to-one greedy pairs, exact or hashed), ``importance`` (class-attention guided, arXiv 2306.04897) or ``zerotprune``
            (PageRank importance, arXiv 2305.17328).
        r: tokens removed per layer (int) or an explicit per-layer list.
        schedule: ``constant`` (r every layer) or ``decreasing`` (same total, front-loaded).
        prop_attn: proportional attention (add log(size) to the attention logits).
        lsh_bits: SimHash bits per table (``lsh``).
        lsh_tables: number of hash tables (``lsh``).
        lsh_window: B candidates scored per A token per table: the B tokens nearest in the
            table's sort order, bucket-mates only (``lsh``; >= N/2 means an exhaustive bucket search).
        lsh_chunk: A tokens sharing one window (``lsh``; 0 = ``lsh_window``): smaller chunks centre
            each window closer to its tokens, at the price of smaller, slower matrix blocks.
        seed: seed of the random hyperplanes (``lsh``).
        keep: instead of r, the fraction of unprotected tokens kept at each acting layer
            (``importance``, ``zerotprune``).
        iters: PageRank iterations (``zerotprune``).
        prune: drop the selected tokens instead of merging them (``zerotprune``).
        layers: block indices where the method acts (empty = every block).
        merge: how a merged token is formed: ``mean`` (ToMe's size-weighted average) or ``mlerp``
            (ToFu's norm-preserving merge: the average's direction, rescaled to the size-weighted
            mean of its members' norms; any method).
        metric: what the methods measure similarity on: ``keys`` (ToMe's head-averaged keys) or
            ``heads`` (each head's keys unit-normalised and concatenated: the cosine of two tokens
            is the mean over heads of their per-head cosines); any method.
        unmerge: give back the full token grid (every input position carries the value of the
            merged token it lives in) at the output and at every requested intermediate block,
            for dense heads (detection); any method (``encoders/merging/unmerge.py``).
    """

    method: str = "bipartite"
    r: Union[int, Tuple[int, ...]] = 0
    schedule: str = "constant"
    prop_attn: bool = True
    lsh_bits: int = 4
    lsh_tables: int = 4
    lsh_window: int = 16
    lsh_chunk: int = 0
    seed: int = 0
    keep: Optional[float] = None
    iters: int = 5
    prune: bool = False
    layers: Tuple[int, ...] = ()
    merge: str = "mean"
    metric: str = "keys"
    unmerge: bool = False

    def __post_init__(self) -> None:
        if self.method != "none" and self.method not in REGISTRY:
            raise ConfigError(f"merge method={self.method!r} is not valid; choose one of: none, {', '.join(REGISTRY)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"merge schedule={self.schedule!r} is not valid; choose one of: {', '.join(SCHEDULES)}")
        if self.merge not in MERGES:
            raise ConfigError(f"merge merge={self.merge!r} is not valid; choose one of: {', '.join(MERGES)}")
        if self.metric not in METRICS:
            raise ConfigError(f"merge metric={self.metric!r} is not valid; choose one of: {', '.join(METRICS)}")
        rs = self.r if isinstance(self.r, tuple) else (self.r,)
        if any((not isinstance(v, int)) or v < 0 for v in rs):
            raise ConfigError(f"merge r={self.r!r} is not valid; give a non-negative integer or a list of them")
        if isinstance(self.r, tuple) and self.schedule != "constant":
            raise ConfigError("merge schedule applies to a single r; an explicit list r=[...] is already a schedule")
        for key, lo in (("lsh_bits", 1), ("lsh_tables", 1), ("lsh_window", 1), ("iters", 1)):
            if getattr(self, key) < lo:
                raise ConfigError(f"merge {key}={getattr(self, key)} is not valid; it must be >= {lo}")
        if self.lsh_chunk < 0:
            raise ConfigError(f"merge lsh_chunk={self.lsh_chunk} is not valid; it must be >= 0 (0: lsh_window)")
        if self.lsh_bits > 30:
            raise ConfigError(f"merge lsh_bits={self.lsh_bits} is not valid; it must be <= 30")
        if self.lsh_tables > 64:  # each table is a sort and a scoring pass over every token
            raise ConfigError(f"merge lsh_tables={self.lsh_tables} is not valid; it must be <= 64")
        if self.seed < 0:
            raise ConfigError(f"merge seed={self.seed} is not valid; it must be >= 0")
        if self.keep is not None and not (0.0 < self.keep <= 1.0):
            raise ConfigError(f"merge keep={self.keep} is not valid; give a fraction in (0, 1]")
        if self.prune and (not self.enabled or "prune" not in self.spec.config_keys):
            users = [s.name for s in REGISTRY.values() if "prune" in s.config_keys]
            raise ConfigError(f"merge prune=on applies to method={'|'.join(users)}, not method={self.method}")
        if self.keep is not None and self.enabled and self.spec.bipartite_bounded:
            users = [s.name for s in REGISTRY.values() if not s.bipartite_bounded]
            raise ConfigError(f"merge keep= applies to {' and '.join(users)}, not method={self.method}; use r=")

    # ------------------------------------------------------------------ parsing / printing
    @classmethod
    def parse(cls, spec: Union[str, "MergeConfig", None]) -> "MergeConfig":
        """Parse ``key=value`` pairs separated by commas (``none`` or empty: no merging)."""
        if spec is None:
            return cls(method="none")
        if isinstance(spec, MergeConfig):
            return spec
        text = spec.strip()
        if text.lower() in ("", "none", "off", "method=none"):
            return cls(method="none")
        keys = [f.name for f in dataclasses.fields(cls)]
        return cls(**{key: _convert(key, value) for key, value in parse_options(text, "merge", keys).pairs})

    def __str__(self) -> str:
        if self.method == "none":
            return "none"
        parts = [f"method={self.method}"]
        for f in dataclasses.fields(self):
            if f.name == "method":
                continue
            value = getattr(self, f.name)
            if f.name == "r" or value != f.default:
                parts.append(f"{f.name}={_format(value)}")
        return ",".join(parts)

    def lsh_options(self) -> dict[str, Any]:
        """The hashing keyword options of ``lsh_soft_matching`` / ``lsh_partners``."""
        return dict(
            lsh_bits=self.lsh_bits, lsh_tables=self.lsh_tables, lsh_window=self.lsh_window,
            lsh_chunk=self.lsh_chunk or None, seed=self.seed,
        )

    def matcher_options(self) -> dict[str, Any]:
        """The keyword options this config gives its method's matcher (from its ``MatcherSpec``)."""
        return self.spec.options(self) if self.enabled else {}

    def matcher_state(self, dim: int, device: Any = None) -> dict[str, Any]:
        """The tensors this config's method keeps per model (its ``MatcherSpec.state``; ``dim``:
        the metric's width), passed to the matcher with its options; empty for most methods."""
        return self.spec.state(self, dim, device) if self.enabled and self.spec.state else {}

    @property
    def spec(self):
        """The method's ``MatcherSpec`` (``encoders.merging.registry``)."""
        return get_spec(self.method)

    # ------------------------------------------------------------------ schedule
    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def schedule_for(self, num_layers: int, num_tokens: int, protected: int = 1) -> list[int]:
        """Per-layer tokens to remove when every requested merge succeeds (clamped per layer).

        Args:
            num_layers: blocks in the encoder.
            num_tokens: tokens entering the first block (patches + class token).
            protected: tokens never merged (the class token).
        """
        wanted = self.wanted(num_layers)
        out, n = [], num_tokens
        for i in range(num_layers):
            r = self.layer_r(wanted[i], n, protected)
            out.append(r)
            n -= r
        return out

    def wanted(self, num_layers: int) -> list[Optional[int]]:
        """Requested r per block before clamping (None: derived from ``keep`` at run time)."""
        if not self.enabled:
            return [0] * num_layers
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(f"merge layers={list(self.layers)} names blocks {bad}; the model has {num_layers} (0..{num_layers - 1})")
        if isinstance(self.r, tuple):
            if len(self.r) != num_layers:
                raise ConfigError(
                    f"merge r has {len(self.r)} entries but the model has {num_layers} blocks; give one per block"
                )
            wanted: list[Optional[int]] = list(self.r)
        elif self.keep is not None:
            wanted = [None] * num_layers
        elif self.schedule == "decreasing":
            wanted = list(_decreasing(self.r, num_layers))
        else:
            wanted = [self.r] * num_layers
        if self.layers:
            acting = set(self.layers)
            wanted = [w if i in acting else 0 for i, w in enumerate(wanted)]
        return wanted

    def layer_r(self, wanted: Optional[int], num_tokens: int, protected: int = 1) -> int:
        """Tokens one block removes given its current token count (at most half of the unprotected
        tokens for bipartite-like methods; the importance methods keep at least one)."""
        free = num_tokens - protected
        r = free - max(1, int(round(free * self.keep))) if wanted is None else wanted
        limit = free // 2 if (not self.enabled or self.spec.bipartite_bounded) else max(free - 1, 0)
        return max(0, min(r, limit))


def _decreasing(r: int, num_layers: int) -> list[int]:
    """Linearly decreasing per-layer r with the same total as a constant r (exact, by carrying)."""
    weights = [num_layers - i for i in range(num_layers)]
    total = r * num_layers
    scale = total / sum(weights)
    out, carry = [], 0.0
    for w in weights:
        exact = w * scale + carry
        val = int(round(exact))
        carry = exact - val
        out.append(val)
    out[-1] += total - sum(out)
    return out





INT_LIMIT = 1_000_000  # no merge option needs more (r, tables, window, chunk, iters); seed: below 2**63
MAX_LIST = 1024  # entries of an r=[...] / layers=[...] list (one per block)


def _int(key: str, value: str) -> int:
    text = value.strip()
    limit = 2**63 - 1 if key == "seed" else INT_LIMIT
    if len(text) > 20:  # refused before it is converted: no option takes a number that long
        raise ConfigError(f"merge {key}={text[:24]}... is not valid; give an integer up to {limit}")
    try:
        out = int(text)
    except ValueError:
        raise ConfigError(f"merge {key}={value[:40]!r} is not valid; give an integer") from None
    if out > limit:
        raise ConfigError(f"merge {key}={out} is not valid; it must be <= {limit}")
    return out


def _int_list(key: str, value: str) -> Tuple[int, ...]:
    text = value.strip()
    close = {"[": "]", "(": ")"}[text[0]]
    if not text.endswith(close):
        raise ConfigError(f"merge {key}={text[:40]!r} is missing its closing {close!r}; e.g. {key}=[16,16,8,8]")
    items = text[1:-1].split(",")
    if len(items) > MAX_LIST:
        raise ConfigError(f"merge {key} has {len(items)} entries; at most {MAX_LIST} (one per block)")
    return tuple(_int(key, v.strip()) for v in items if v.strip())


def _convert(key: str, value: str) -> Any:
    if key in ("method", "schedule", "merge", "metric"):
        return value.lower()
    if key == "r":
        return _int_list(key, value) if value.startswith(("[", "(")) else _int(key, value)
    if key == "layers":
        return _int_list(key, value) if value.startswith(("[", "(")) else (_int(key, value),)
    if key in ("prop_attn", "prune", "unmerge"):
        low = value.lower()
        if low in _BOOL_TRUE:
            return True
        if low in _BOOL_FALSE:
            return False
        raise ConfigError(f"merge {key}={value!r} is not valid; choose one of: on, off")
    if key == "keep":
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"merge keep={value!r} is not valid; give a fraction such as 0.7") from None
    return _int(key, value)


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def parse_merges(specs: Optional[Sequence[str]]) -> list[MergeConfig]:
    """Parse repeated ``--merge`` options; an empty list means just the unmerged baseline."""
    return [MergeConfig.parse(s) for s in (specs or ["none"])]
