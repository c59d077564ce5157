"""Shared fixtures: offline mode, deterministic seeds, tiny real images."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Test modules import decord at collection; decord2 3.4.0 then preloads NVIDIA's NVBLAS, and a FAISS
# (or torch) loaded after it sends its matrix products there and dies (a k-means large enough to
# use BLAS: IVF training). Loaded here first, in every worker, they keep their own BLAS.
# indexing/decoders.py does the same for users who decode through mergeseek.
for _first in ("torch", "faiss"):
    try:
        __import__(_first)
    except ImportError:  # the suite still runs where one is missing; its tests skip
        pass


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA exists (MERGESEEK_TEST_DEVICE=cuda forces them to be tried)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    skip = pytest.mark.skip(reason="no CUDA device present")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def photos() -> list:
    """Real photos from scikit-image (bundled with the package, no network)."""
    from skimage import data

    imgs = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    return [np.ascontiguousarray(im[..., :3]) for im in imgs]


@pytest.fixture(scope="session")
def photo_batch(photos):
    """The photos resized to 224x224, normalised like CLIP, as a [4,3,224,224] float tensor."""
    import torch
    import torch.nn.functional as F

    t = torch.stack(
        [
            F.interpolate(torch.from_numpy(p).permute(2, 0, 1)[None].float() / 255, size=(224, 224), mode="bilinear")[0]
            for p in photos
        ]
    )
    mean = torch.tensor([0.481, 0.458, 0.408])[:, None, None]
    std = torch.tensor([0.269, 0.261, 0.276])[:, None, None]
    return (t - mean) / std


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: on a 2-core machine shared with other jobs, two spinning
    OpenMP threads per process made model-heavy tests ~5x slower; one thread keeps them steady."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_torchcodec(monkeypatch):
    """As on a machine without torchcodec: ``indexing.decoders`` cannot load it (decord2 and FFmpeg's
    command stay as they are)."""
    from mergeseek.errors import InputError
    from mergeseek.indexing import decoders

    real = decoders._import

    def load(backend):
        if backend == "torchcodec":
            raise InputError("video decoder 'torchcodec' cannot be loaded (No module named 'torchcodec')")
        return real(backend)

    monkeypatch.setattr(decoders, "_import", load)
