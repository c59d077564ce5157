"""Typed evaluation sets and the image sources behind them.

A set never holds decoded images: an :class:`ImageSource` decodes image ``i`` on demand, so a
``--limit`` subset of a large set only ever decodes what it keeps.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from mergeseek.errors import ConfigError, InputError
from mergeseek.indexing.formats import IMAGE_EXTS, list_images, natural_key  # noqa: F401  (one reader, shared with indexing/)

log = logging.getLogger(__name__)

# Prompt templates for zero-shot classification. One template is the cheap default (text
# encoding costs as much as a batch of images on CPU); the ensemble is the usual CLIP-style mix.
DEFAULT_TEMPLATES = ("a photo of a {}.",)
ENSEMBLE_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a cropped photo of a {}.",
    "itap of a {}.",
    "art of the {}.",
)


# ---------------------------------------------------------------------------- image sources
class ImageSource:
    """Indexable collection of images; ``load(i)`` returns an RGB ``PIL.Image``."""

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def load(self, i: int):  # pragma: no cover - interface
        raise NotImplementedError

    def label(self, i: int) -> str:
        """A human-readable reference to image ``i`` (path or archive name)."""
        return str(i)

    def subset(self, idx: Sequence[int]) -> "ImageSource":  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class FileImages(ImageSource):
    """Images stored as files."""

    paths: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int):
        from PIL import Image

        from mergeseek.indexing.formats import read_rgb

        path = self.paths[i]
        try:
            return Image.fromarray(read_rgb(path))  # 16-bit files scaled to 8 bits, not clipped
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read image {path}: {exc}; remove or replace the file") from exc

    def label(self, i: int) -> str:
        return str(self.paths[i])

    def subset(self, idx: Sequence[int]) -> "FileImages":
        return FileImages(tuple(self.paths[i] for i in idx))


@dataclass(frozen=True)
class ArrayImages(ImageSource):
    """Decoded uint8 images [N, H, W, 3] (CIFAR pickles)."""

    arrays: np.ndarray
    names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.arrays.shape[0])

    def load(self, i: int):
        from PIL import Image

        return Image.fromarray(self.arrays[i]).convert("RGB")

    def label(self, i: int) -> str:
        return self.names[i] if self.names else str(i)

    def subset(self, idx: Sequence[int]) -> "ArrayImages":
        idx = list(idx)
        return ArrayImages(self.arrays[idx], tuple(self.names[i] for i in idx) if self.names else ())


@dataclass(frozen=True)
class JpegPackImages(ImageSource):
    """JPEG files concatenated in one array with offsets (the offline CIFAR-10 ``*_jpeg.npz``)."""

    blob: np.ndarray = field(repr=False)
    offsets: np.ndarray = field(repr=False)
    index: np.ndarray = field(repr=False)  # which packed images, in order
    names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(len(self.index))

    def load(self, i: int):
        from PIL import Image

        j = int(self.index[i])
        data = self.blob[self.offsets[j] : self.offsets[j + 1]].tobytes()
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")

    def label(self, i: int) -> str:
        return self.names[int(self.index[i])] if self.names else str(int(self.index[i]))

    def subset(self, idx: Sequence[int]) -> "JpegPackImages":
        return replace(self, index=self.index[np.asarray(list(idx), dtype=np.int64)])


# ---------------------------------------------------------------------------- sets
@dataclass(frozen=True)
class ClassificationSet:
    """Labelled images for zero-shot CLIP (class names + templates) or a classifier's own head.

    Args:
        name: short name used in reports (``cifar10``, ``pets``...).
        images: the images.
        labels: int64 [N] class index per image.
        classes: class names in label order (as used in prompts: spaces, not underscores).
        templates: prompt templates with one ``{}``.
        source: where it was read from.
        label_space: what the labels index (``imagenet1k`` lets ImageNet-head classifiers score it).
    """

    name: str
    images: ImageSource
    labels: np.ndarray
    classes: tuple[str, ...]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    source: str = ""
    label_space: str = ""

    kind = "classification"

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise InputError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels ({self.source})")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise InputError(
                f"{self.name}: labels span {self.labels.min()}..{self.labels.max()} but there are "
                f"{len(self.classes)} classes ({self.source})"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: Sequence[int]) -> "ClassificationSet":
        idx = list(idx)
        return replace(self, images=self.images.subset(idx), labels=self.labels[idx])

    def limited(self, limit: Optional[int], seed: int = 0) -> "ClassificationSet":
        """A fixed, class-balanced subset of ``limit`` images (see :func:`balanced_indices`)."""
        if limit is None or limit >= len(self):
            return self
        return self.subset(balanced_indices(self.labels, limit, seed))


@dataclass(frozen=True)
class Query:
    """One text query and the gallery items that count as a hit.

    Args:
        qid: query id (from the file, or its line number).
        text: the query text.
        relevant: gallery item indices accepted as the answer (frame level).
        video_id: the target video (video level); None for image–caption sets.
        aic: the AI Challenge ground truth (``eval.aic_score.AicQuery``: task, raw frame ranges,
            answer, TRAKE events) when the query file gives it; scored by the official rule.
        channels: the text channels of a keyframe query given with ``ocr:`` / ``asr:`` parts, as
            ``(("asr", words), ("ocr", words))``; ``text`` is then its visual part ("" when none).
            Scored on the fused ranking (``eval.channels``).
    """

    qid: str
    text: str
    relevant: tuple[int, ...]
    video_id: Optional[str] = None
    aic: Optional[Any] = None
    channels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RetrievalSet:
    """A gallery of images and text queries against it (keyframes or image–caption pairs).

    Args:
        name: short name used in reports.
        images: the gallery.
        queries: text queries with their relevant gallery items.
        video_ids: per gallery item, its video (keyframe sets: enables video-level metrics).
        frame_idx: per gallery item, its frame index in the video.
        pts_time: per gallery item, seconds from the video's start (keyframe maps; TRAKE windows).
        source: where it was read from.
        notes: facts a reader of the report should know (snapped targets, dropped queries).
        text: the frames' on-screen text and speech (``eval.channels.SetText``) when queries have
            ``ocr:`` / ``asr:`` parts; attached by the runner before any model loads.
    """

    name: str
    images: ImageSource
    queries: tuple[Query, ...]
    video_ids: tuple[str, ...] = ()
    frame_idx: tuple[int, ...] = ()
    source: str = ""
    notes: tuple[str, ...] = ()
    pts_time: tuple[float, ...] = ()
    text: Optional[Any] = None

    kind = "retrieval"

    def __post_init__(self) -> None:
        n = len(self.images)
        for q in self.queries:
            if not q.relevant:
                raise InputError(f"{self.name}: query {q.qid!r} has no relevant gallery item ({self.source})")
            if min(q.relevant) < 0 or max(q.relevant) >= n:
                raise InputError(f"{self.name}: query {q.qid!r} points outside the gallery of {n} images")
        if self.video_ids and len(self.video_ids) != n:
            raise InputError(f"{self.name}: {len(self.video_ids)} video ids for {n} gallery images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def has_videos(self) -> bool:
        return bool(self.video_ids)


# ---------------------------------------------------------------------------- subsets
def interleaved_order(labels: np.ndarray, class_key: Optional[np.ndarray] = None) -> np.ndarray:
    """All indices, dealt out class by class: the 1st image of every class, then the 2nd, ...

    Within a round, classes come in the order of ``class_key[label]`` (default: the label), and
    images of one class keep their file order. Every prefix is as class-balanced as it can be:
    the first 1,000 of the CIFAR-10 test pack are 100 per class. The one rule behind
    :func:`balanced_indices` and ``eval.reference.load_cifar10_npz``.
    """
    labels = np.asarray(labels)
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    key = labels if class_key is None else np.asarray(class_key)[labels]
    return np.lexsort((key, rank))


def balanced_indices(labels: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """``limit`` indices, class-balanced and fixed: the k-th image of every class (file order)
    comes before any class's (k+1)-th, and the order of classes within each round is a seeded
    shuffle (so a limit smaller than the class count still samples classes at random).

    For the CIFAR-10 test pack this gives the same images as ``eval.reference.load_cifar10_npz``
    with the same limit (the first limit/10 of each class). Returned sorted (file order).
    """
    if limit < 1:
        raise ConfigError(f"limit={limit} is not valid; give a positive number of images")
    labels = np.asarray(labels)
    perm = np.random.default_rng(seed).permutation(int(labels.max()) + 1 if len(labels) else 0)
    return np.sort(interleaved_order(labels, perm)[:limit])


def random_indices(n: int, limit: Optional[int], seed: int = 0) -> np.ndarray:
    """A fixed (seeded) random subset of ``range(n)`` of size ``limit``, sorted; all when None."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise ConfigError(f"limit={limit} is not valid; give a positive number")
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def pretty_class(name: str) -> str:
    """Folder / file class names as words for prompts: ``american_pit_bull_terrier`` -> spaces."""
    return name.replace("_", " ").strip()
