"""One model per merge config, all sharing one set of weights, for timing in one process.

The merge patch swaps the classes of live module instances in place, so two configs cannot share
one module tree. We deep-copy the module tree but hand ``copy.deepcopy`` a memo that maps every
parameter and buffer to itself: the copies get their own module objects (which the patch may
re-class) while pointing at the *same* weight tensors, so N candidates cost one model's memory
and are guaranteed to hold identical weights.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Iterable, Sequence, Union

from mergeseek.encoders.config import MergeConfig

log = logging.getLogger(__name__)

ConfigLike = Union[MergeConfig, str, None]


def shared_copy(model: Any) -> Any:
    """A new module tree over the same parameter and buffer tensors as ``model``."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = p
    for b in model.buffers():
        memo[id(b)] = b
    return copy.deepcopy(model, memo)


def _cfgs(configs: Iterable[ConfigLike]) -> list[MergeConfig]:
    return [MergeConfig.parse(c) for c in configs]


def merged_models(model: Any, configs: Sequence[ConfigLike]) -> dict[str, Any]:
    """``str(cfg)`` -> a copy of ``model`` (an open_clip CLIP, its ``visual`` or a timm ViT) patched with cfg.

    The ``none`` config gets an unpatched copy, so ``model`` itself is never modified. Duplicate
    configs are kept once.
    """
    from mergeseek.encoders import apply_merging

    out: dict[str, Any] = {}
    for cfg in _cfgs(configs):
        name = str(cfg)
        if name in out:
            continue
        m = shared_copy(model)
        if cfg.enabled:
            apply_merging(m, cfg)
        m.eval()
        out[name] = m
    return out


def merged_encoders(base: Any, configs: Sequence[ConfigLike], batch_size: int | None = None) -> dict[str, Any]:
    """``str(cfg)`` -> an ``encoders.Encoder`` per config, sharing ``base``'s weights.

    Args:
        base: an ``encoders.Encoder``; its model must be unmerged (``base.merge`` is ``none``).
        configs: merge configs (strings or ``MergeConfig``).
        batch_size: images per forward; defaults to ``base.batch_size``.
    """
    from mergeseek.encoders import Encoder
    from mergeseek.errors import ConfigError

    if base.merge.enabled:
        raise ConfigError(
            f"merged_encoders needs an unmerged base encoder; got merge={base.merge}. Build it with merge='none'"
        )
    models = merged_models(base.model, configs)
    out = {}
    for name, model in models.items():
        out[name] = Encoder(
            model_name=base.model_name,
            pretrained=base.pretrained,
            device=base.device,
            precision=base.precision,
            merge="none",  # the copy is already patched; do not patch twice
            batch_size=batch_size or base.batch_size,
            model=model,
            preprocess=base.preprocess,
            tokenizer=base.tokenizer,
        )
        # Record the real config on the encoder so describe() and reports name it.
        out[name].merge = MergeConfig.parse(name)
    return out
