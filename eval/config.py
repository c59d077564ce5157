"""``EvalConfig``: everything one ``cli.py eval`` run does, as one frozen value (stored in
``report.json``), and the expansion of ``--merge`` / ``--sweep`` into the merge configs compared."""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from mergeseek.encoders.config import MergeConfig
from mergeseek.errors import ConfigError
from mergeseek.options import parse_options

BASELINE = "none"


def default_data_root() -> Path:
    """Where the named datasets are read when ``--data-root`` is not given.

    ``$MERGESEEK_DATA`` when set, else the user's cache folder: ``$XDG_CACHE_HOME/mergeseek/data``
    (``~/.cache/mergeseek/data`` when ``XDG_CACHE_HOME`` is unset).
    """
    env = os.environ.get("MERGESEEK_DATA", "").strip()
    if env:
        return Path(env).expanduser()
    from mergeseek.runtime import xdg_cache_home

    return xdg_cache_home() / "mergeseek" / "data"


def resolve_data_root(data_root: Optional[str | os.PathLike] = None) -> Path:
    """``--data-root`` when given, else :func:`default_data_root`."""
    return Path(data_root).expanduser() if data_root not in (None, "") else default_data_root()


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run.

    Args:
        models: ``--model`` values (open_clip names, ``NAME@tag``, ``timm:<name>``, ``reference-cifar10``).
        pretrained: weights for models given without ``@tag``; None = random weights.
        datasets: dataset specs (see :mod:`eval.datasets`).
        merges: ``--merge`` values; the unmerged baseline is always added first.
        sweep: ``--sweep`` spec, e.g. ``r=0:16:4`` or ``r=4|8|16,method=bipartite|lsh``.
        data_root: folder of the named datasets (default: :func:`default_data_root`).
        templates: zero-shot prompts: ``openai`` (the published ones per set), ``simple`` (open_clip's
            7) or a templates file; see :mod:`eval.zeroshot`. A dataset's own ``templates=`` option wins.
        limit: images (classification, captions) or queries (keyframes) kept per set; None = all.
        seed: seed of the ``limit`` subset.
        batch_size: images per forward, for accuracy passes and timing.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        precision: ``fp32``, ``fp16``, ``bf16``.
        warmup: untimed batches per candidate before timing.
        iters: timed batches per candidate (alternating).
        topk: k of the top-k agreement between merged and unmerged retrieval results.
        plots: write PNG plots.
        threads: torch CPU threads (None = torch's default); fewer threads than cores gives steadier
            CPU timings on a shared machine.
        cpu_time: time by CPU time of one thread (``clock=cpu``, forces one torch thread) instead
            of wall-clock; robust on a machine shared with other jobs. CPU only.
        reuse: reuse configs evaluated on the video sets (``--dataset video``, ``cifar10-video``;
            see :mod:`encoders.reuse`); empty: ``threshold=0.05,refresh=16``.
        compile: time every candidate (the baseline too) torch.compiled with a fixed batch (CUDA
            graphs on CUDA; ``encoders.compile``); compile time is logged and not timed. The
            accuracy passes run eager.
        ocr: OCR engine (``--ocr`` of ``cli.py index``) reading the keyframes of sets whose queries
            have ``ocr:`` parts; cached by file content and engine (``eval.channels``).
        asr: speech engine (``--asr``) transcribing the videos of sets whose queries have ``asr:`` parts.
        text_from: an index folder of the same media built with ``--ocr`` / ``--asr`` whose stored
            text is used instead (matched by video id and frame index); not with ``ocr`` / ``asr``.
        videos: where an AI Challenge release's videos are when not in its ``Videos_*`` folders
            (``--videos``, as for ``index``): what ``asr`` transcribes.
    """

    models: tuple[str, ...] = ("ViT-B-32",)
    pretrained: Optional[str] = "openai"
    datasets: tuple[str, ...] = ("cifar10",)
    merges: tuple[str, ...] = ("r=8",)
    sweep: Optional[str] = None
    data_root: str = field(default_factory=lambda: str(default_data_root()))
    templates: str = "openai"
    limit: Optional[int] = None
    seed: int = 0
    batch_size: int = 32
    device: str = "auto"
    precision: str = "fp32"
    warmup: int = 2
    iters: int = 10
    topk: int = 10
    plots: bool = True
    threads: Optional[int] = None
    cpu_time: bool = False
    reuse: tuple[str, ...] = ()
    compile: Union[bool, str] = False  # True / "model": one graph; "blocks": each block alone
    ocr: Optional[str] = None
    asr: Optional[str] = None
    text_from: Optional[str] = None
    videos: Optional[str] = None  # --videos DIR: an AI Challenge release's videos, when not in its Videos_* folders

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("no model given; pass --model ViT-B-32 (repeatable)")
        if not self.datasets:
            raise ConfigError("no dataset given; pass --dataset cifar10 (repeatable)")
        if self.cpu_time and self.threads not in (None, 1):
            raise ConfigError(f"cpu_time times one thread; threads={self.threads} conflicts with it (leave threads out)")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"eval threads={self.threads} is not valid; it must be >= 1")
        for key, lo in (("batch_size", 1), ("iters", 1), ("warmup", 0), ("topk", 1)):
            if getattr(self, key) < lo:
                raise ConfigError(f"eval {key}={getattr(self, key)} is not valid; it must be >= {lo}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"eval limit={self.limit} is not valid; give a positive number or leave it out")
        from mergeseek.eval.zeroshot import TEMPLATE_CHOICES

        if self.templates not in TEMPLATE_CHOICES and not Path(self.templates).expanduser().is_file():
            raise ConfigError(f"eval templates={self.templates!r} is not valid; choose {' or '.join(TEMPLATE_CHOICES)} "
                              "or the path of a templates file (one template per line, {} for the class name)")
        if self.text_from and (self.ocr or self.asr):
            raise ConfigError("give the frames' text one way: --text-from INDEX (text stored in an index) or --ocr / --asr "
                              "(read by an engine), not both")
        self.merge_configs()  # fail early on a bad --merge / --sweep
        self.reuse_configs()  # ... and on a bad --reuse

    @classmethod
    def from_options(cls, *, models: Optional[Sequence[str]] = None, pretrained: Optional[str] = None,
                     datasets: Optional[Sequence[str]] = None, merges: Optional[Sequence[str]] = None,
                     data_root: Optional[str | os.PathLike] = None, **options) -> "EvalConfig":
        """The config of ``cli.py eval``: options left out (None) take the defaults.

        No ``--model`` means ViT-B-32, no ``--dataset`` cifar10, no ``--merge`` r=8 (none when a
        ``--sweep`` is given: the sweep then runs over method=bipartite); no ``--pretrained`` means
        openai, ``none`` (or empty) random weights; no ``--data-root`` means :func:`default_data_root`.
        """
        defaults = cls.__dataclass_fields__
        if merges:
            merges = tuple(merges)
        else:
            merges = () if options.get("sweep") else defaults["merges"].default
        kept = {k: v for k, v in options.items() if v is not None}
        unknown = set(kept) - set(defaults)
        if unknown:
            raise ConfigError(f"unknown eval option(s) {sorted(unknown)}; valid: {', '.join(defaults)}")
        return cls(
            models=tuple(models) if models else defaults["models"].default,
            pretrained=defaults["pretrained"].default if pretrained is None
            else None if pretrained.strip().lower() in ("none", "") else pretrained,
            datasets=tuple(datasets) if datasets else defaults["datasets"].default,
            merges=merges,
            data_root=str(resolve_data_root(data_root)),
            **kept,
        )

    def text_channels(self) -> frozenset:
        """The text channels this run has for keyframe queries with ``ocr:`` / ``asr:`` parts: those
        ``--ocr`` / ``--asr`` read, or those the ``--text-from`` index holds (an engine or an index
        that cannot be used fails here, before any model loads)."""
        if self.text_from:
            from mergeseek.eval.channels import index_channels

            return frozenset(index_channels(Path(self.text_from)))
        from mergeseek.eval.channels import text_engine

        for channel, spec in (("ocr", self.ocr), ("asr", self.asr)):
            if spec:
                text_engine(channel, spec)  # a missing package: one line naming it; built once, reused to read
        return frozenset(c for c, spec in (("ocr", self.ocr), ("asr", self.asr)) if spec)

    def reuse_configs(self) -> list[str]:
        """The ``--reuse`` configs (normalised) that the video sets are evaluated with."""
        from mergeseek.encoders.reuse import ReuseConfig

        return [str(ReuseConfig.parse(r)) for r in (self.reuse or ("threshold=0.05,refresh=16",))]

    def merge_configs(self) -> list[MergeConfig]:
        """Baseline first, then each ``--merge`` and each swept config, duplicates dropped."""
        return expand_merges(self.merges, self.sweep)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["merge_configs"] = [str(c) for c in self.merge_configs()]
        return d


def expand_merges(merges: Sequence[str], sweep: Optional[str] = None) -> list[MergeConfig]:
    """``--merge`` values plus the ``--sweep`` grid, with the unmerged baseline first.

    The sweep applies to every enabled ``--merge`` config (its other options kept); with none it
    applies to ``method=bipartite``. Sweep values: ``a:b:step`` (inclusive) or ``v1|v2|v3``;
    several keys (``r=4|8,method=bipartite|lsh``) form a grid.
    """
    cfgs = [MergeConfig.parse(BASELINE)] + [MergeConfig.parse(m) for m in merges]
    if sweep:
        grid = parse_sweep(sweep)
        templates = [c for c in cfgs if c.enabled] or [MergeConfig.parse("method=bipartite")]
        keys = [k for k, _ in grid]
        fields = [f.name for f in dataclasses.fields(MergeConfig)]
        for tpl in templates:
            for values in itertools.product(*[v for _, v in grid]):
                pairs = dict(parse_options(str(tpl), "merge", fields).pairs)  # the template's options, then the swept ones
                pairs.update(zip(keys, values))
                cfgs.append(MergeConfig.parse(",".join(f"{k}={v}" for k, v in pairs.items())))
    out, seen = [], set()
    for c in cfgs:
        if str(c) not in seen:
            seen.add(str(c))
            out.append(c)
    return out


MAX_SWEEP = 256  # configs one --sweep may expand to (each is a model timed and evaluated)


def parse_sweep(spec: str) -> list[tuple[str, list[str]]]:
    """``r=0:16:4,method=bipartite|lsh`` -> [("r", ["0","4","8","12","16"]), ("method", ["bipartite","lsh"])]."""
    fields = [f.name for f in dataclasses.fields(MergeConfig)]
    grid = []
    for key, value in parse_options(spec, "sweep", fields, need_value=True, brackets=False).pairs:
        if key == "method" and "none" in value.split("|"):
            raise ConfigError("sweep method=none is always included as the baseline; leave it out of the sweep")
        if ":" in value:
            parts = value.split(":")
            try:
                nums = [int(p) for p in parts]
            except ValueError:
                raise ConfigError(f"sweep range {value!r} for {key} must be integers start:stop[:step]") from None
            if len(nums) not in (2, 3) or (len(nums) == 3 and nums[2] <= 0) or nums[1] < nums[0]:
                raise ConfigError(f"sweep range {value!r} for {key} is not start:stop[:step] with stop >= start, step > 0")
            step = nums[2] if len(nums) == 3 else 1
            count = (nums[1] - nums[0]) // step + 1  # counted, not built: a huge range is refused here
            if count > MAX_SWEEP:
                raise ConfigError(f"sweep range {value[:60]!r} for {key} has {count} values; at most {MAX_SWEEP} "
                                  "configs are evaluated, widen the step")
            values = [str(v) for v in range(nums[0], nums[1] + 1, step)]
        else:
            values = [v.strip() for v in value.split("|") if v.strip()]
        grid.append((key, values))
    if not grid:
        raise ConfigError(f"sweep {spec!r} is empty; e.g. --sweep r=0:16:4")
    total = 1
    for _, values in grid:
        total *= max(1, len(values))
    if total > MAX_SWEEP:
        raise ConfigError(f"sweep {spec[:80]!r} makes {total} configs; at most {MAX_SWEEP} are evaluated in one run, "
                          "split it or widen the steps")
    return grid


def group_label(cfg: MergeConfig) -> str:
    """A config without its r: the line a swept config belongs to in plots (``method=lsh,lsh_bits=6``)."""
    if not cfg.enabled:
        return BASELINE
    return ",".join(p for p in str(dataclasses.replace(cfg, r=0)).split(",") if p != "r=0")
