"""``synth-detection``: CIFAR-10 objects pasted onto real photos, with their boxes and labels.

No detection annotations can be downloaded here, so the detector (``reference-detector``) learns
from pictures this module composes out of real images that are here. How one picture is made (all
randomness from ``numpy.random.default_rng([seed, split code, picture])``, so the set is a pure
function of its spec and its source images):

1. Background: one photo of the split's background pool, a random square crop whose side is
   50-100% of the photo's shorter side, resized (bilinear) to ``size`` x ``size``, flipped
   left-right with probability 1/2.
2. Objects: ``k`` uniform in ``objects`` (1-6). Each is one CIFAR-10 image of the split (the
   32 x 32 picture, its own background included) drawn uniformly, resized to a box whose side
   ``s`` is uniform in ``side`` (pixels) and whose aspect ``w / h`` is log-uniform in ``aspect``
   (``w = s * sqrt(a)``, ``h = s / sqrt(a)``, rounded, at most ``size``), flipped with probability
   1/2, placed at a uniform position inside the picture. A placement that would overlap an
   earlier box is redrawn (up to 50 tries; then the picture keeps fewer objects), so boxes never
   overlap and every object is fully visible. The box is the pasted rectangle, in pixels,
   ``(x0, y0, x1, y1)`` with ``x1``, ``y1`` exclusive.

Splits: ``train`` uses CIFAR-10's training images and the training background pool, ``test``
CIFAR-10's test images and the test pool. The pools split the photos of ``coco_captions`` and
``imagenet_sample`` (sorted by file name; every 5th photo, positions 4, 9, 14, ..., is a test
background): no test background and no test object was ever seen in training.

The test split (``test_pictures`` pictures) is cached as ``<cache>/<key>/test.npz`` (``<cache>``:
``$MERGESEEK_DATA/synth_detection``, else ``~/.cache/mergeseek/data/synth_detection``, or the PATH
of ``--dataset synth-detection:PATH``) where ``key`` hashes the spec and the names and sizes of the source
files; a second call reads the cache. Same spec and sources, same bytes. Training draws its
pictures on the fly (:func:`picture`, picture index = step * batch + i), so it never repeats one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from mergeseek.errors import ConfigError, InputError

log = logging.getLogger(__name__)

FORMAT = "mergeseek-synth-detection/1"
SPLITS = ("train", "test")
SPLIT_CODE = {"train": 0, "test": 1}
BACKGROUND_FOLDERS = ("coco_captions", "imagenet_sample")
TEST_EVERY = 5  # every 5th background photo (sorted) belongs to the test pool
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
# boxes by sqrt(area) in pixels of the picture: (name, lo, hi), lo inclusive, hi exclusive (the
# metric's area ranges are lo**2 .. hi**2, as COCO's small / medium / large are 32**2 and 96**2)
SIZE_BUCKETS = (("small", 0, 32), ("medium", 32, 48), ("large", 48, 1 << 30))


@dataclass(frozen=True)
class DetectionSpec:
    """Everything that decides the pictures.

    Args:
        size: picture side in pixels.
        objects: (fewest, most) objects per picture.
        side: (smallest, largest) object side in pixels (before the aspect change).
        aspect: (lowest, highest) width / height, drawn log-uniformly.
        test_pictures: pictures of the cached test split.
        background_side: photos are decoded once with their shorter side at most this (memory).
        seed: seeds every draw.
    """

    size: int = 112
    objects: Tuple[int, int] = (1, 6)
    side: Tuple[int, int] = (20, 64)
    aspect: Tuple[float, float] = (0.75, 1.333)
    test_pictures: int = 500
    background_side: int = 224
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size < 8 or not 1 <= self.objects[0] <= self.objects[1]:
            raise ConfigError(f"synth-detection size={self.size} / objects={self.objects} are not valid")
        if not 4 <= self.side[0] <= self.side[1] <= self.size:
            raise ConfigError(f"synth-detection side={self.side} must satisfy 4 <= lo <= hi <= size={self.size}")
        if not 0 < self.aspect[0] <= self.aspect[1] or self.test_pictures < 1:
            raise ConfigError(f"synth-detection aspect={self.aspect} / test_pictures={self.test_pictures} are not valid")

    def key(self, sources: Union["DetectionSources", str]) -> str:
        """Cache key: this spec and the sources' fingerprint (``DetectionSources`` or the string)."""
        fingerprint = sources if isinstance(sources, str) else sources.fingerprint
        text = json.dumps({"format": FORMAT, "spec": dataclasses.asdict(self), "sources": fingerprint},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class DetectionSources(NamedTuple):
    """Decoded source images of both splits.

    ``backgrounds[split]``: uint8 photos [H, W, 3] (any size); ``objects[split]``: uint8 [N, h, w, 3];
    ``labels[split]``: int64 [N]; ``classes``: class names; ``fingerprint``: what identifies the
    sources (file names and sizes) in the cache key.
    """

    backgrounds: dict
    objects: dict
    labels: dict
    classes: Tuple[str, ...]
    fingerprint: str


class Pictures:
    """uint8 pictures [N, S, S, 3] as an image source: ``load(i)`` gives a PIL image (what the
    evaluator's timing batch reads), slicing and ``shape`` the array."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i):
        return self.array[i]

    @property
    def shape(self):
        return self.array.shape

    def load(self, i: int):
        from PIL import Image

        return Image.fromarray(self.array[int(i)])

    def label(self, i: int) -> str:
        return f"picture {i}"

    def subset(self, idx) -> "Pictures":
        return Pictures(self.array[np.asarray(idx, dtype=np.int64)])


@dataclass(frozen=True)
class DetectionSet:
    """Pictures with their boxes: ``images`` uint8 [N, S, S, 3] (:class:`Pictures`); picture i's boxes
    are ``boxes[offsets[i]:offsets[i+1]]`` (float32 (x0, y0, x1, y1) pixels) with ``labels`` (int64)."""

    images: Pictures
    boxes: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    classes: Tuple[str, ...]
    name: str = "synth-detection"
    source: str = ""

    kind = "detection"

    def __post_init__(self) -> None:
        if not isinstance(self.images, Pictures):
            object.__setattr__(self, "images", Pictures(np.asarray(self.images)))
        if len(self.offsets) != len(self.images) + 1 or int(self.offsets[-1]) != len(self.labels):
            raise InputError(f"{self.name}: {len(self.images)} pictures, {len(self.offsets)} offsets and "
                             f"{len(self.labels)} labels do not fit together ({self.source})")

    def __len__(self) -> int:
        return len(self.images)

    def targets(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """(boxes [k, 4], labels [k]) of picture ``i``."""
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.boxes[lo:hi], self.labels[lo:hi]

    def limited(self, limit: Optional[int], seed: int = 0) -> "DetectionSet":
        """The first ``limit`` pictures (a fixed subset; the pictures are already in random order)."""
        if limit is None or limit >= len(self):
            return self
        if limit < 1:
            raise ConfigError(f"limit={limit} is not valid; give a positive number of pictures")
        end = int(self.offsets[limit])
        return dataclasses.replace(self, images=Pictures(self.images.array[:limit]), boxes=self.boxes[:end],
                                   labels=self.labels[:end], offsets=self.offsets[: limit + 1])


# ---------------------------------------------------------------------------- composing
def _resize(arr: np.ndarray, w: int, h: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(arr).resize((w, h), Image.BILINEAR), dtype=np.uint8)


def _overlaps(box: Tuple[int, int, int, int], boxes: List[Tuple[int, int, int, int]]) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in boxes)


def picture(spec: DetectionSpec, sources: DetectionSources, split: str, index: int):
    """Picture ``index`` of ``split``: (uint8 [S, S, 3], boxes float32 [k, 4], labels int64 [k])."""
    rng = np.random.default_rng([spec.seed, SPLIT_CODE[split], index])
    pool = sources.backgrounds[split]
    photo = pool[int(rng.integers(len(pool)))]
    h, w = photo.shape[:2]
    crop = int(round(min(h, w) * rng.uniform(0.5, 1.0)))
    y, x = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
    canvas = _resize(np.ascontiguousarray(photo[y:y + crop, x:x + crop]), spec.size, spec.size).copy()
    if rng.random() < 0.5:
        canvas = canvas[:, ::-1].copy()
    objects, labels = sources.objects[split], sources.labels[split]
    boxes: List[Tuple[int, int, int, int]] = []
    classes: List[int] = []
    for _ in range(int(rng.integers(spec.objects[0], spec.objects[1] + 1))):
        j = int(rng.integers(len(labels)))
        s = rng.uniform(spec.side[0], spec.side[1])
        a = float(np.exp(rng.uniform(np.log(spec.aspect[0]), np.log(spec.aspect[1]))))
        bw = int(min(spec.size, max(4, round(s * np.sqrt(a)))))
        bh = int(min(spec.size, max(4, round(s / np.sqrt(a)))))
        flip = rng.random() < 0.5
        for _try in range(50):
            bx, by = int(rng.integers(spec.size - bw + 1)), int(rng.integers(spec.size - bh + 1))
            box = (bx, by, bx + bw, by + bh)
            if not _overlaps(box, boxes):
                break
        else:
            continue
        obj = _resize(objects[j], bw, bh)
        canvas[by:by + bh, bx:bx + bw] = obj[:, ::-1] if flip else obj
        boxes.append(box)
        classes.append(int(labels[j]))
    return (canvas, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(classes, dtype=np.int64))


def generate(spec: DetectionSpec, sources: DetectionSources, split: str, count: int, start: int = 0,
             name: str = "synth-detection") -> DetectionSet:
    """Pictures ``start .. start + count - 1`` of ``split`` as one :class:`DetectionSet`."""
    if split not in SPLITS:
        raise ConfigError(f"synth-detection split={split!r} is not valid; choose one of: {', '.join(SPLITS)}")
    images = np.empty((count, spec.size, spec.size, 3), dtype=np.uint8)
    boxes, labels, offsets = [], [], [0]
    for i in range(count):
        images[i], b, lab = picture(spec, sources, split, start + i)
        boxes.append(b)
        labels.append(lab)
        offsets.append(offsets[-1] + len(lab))
    return DetectionSet(Pictures(images), np.concatenate(boxes).astype(np.float32).reshape(-1, 4),
                        np.concatenate(labels).astype(np.int64), np.asarray(offsets, dtype=np.int64),
                        sources.classes, name)


# ---------------------------------------------------------------------------- sources
def _photo(path: Path, side: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = side / min(img.size)
        if scale < 1:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def background_paths(root: Union[str, Path]) -> List[Path]:
    """The background photos under ``root``'s ``coco_captions`` / ``imagenet_sample`` folders, sorted."""
    found: List[Path] = []
    for folder in BACKGROUND_FOLDERS:
        base = Path(root) / folder
        if base.is_dir():
            found += sorted(p for p in base.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
    return found


def load_sources(root: Union[str, Path], spec: DetectionSpec = DetectionSpec(), objects_limit: Optional[int] = None
                 ) -> DetectionSources:
    """Backgrounds and CIFAR-10 objects from the data folder ``root`` (holding ``cifar10/``,
    ``coco_captions/`` and/or ``imagenet_sample/``); ``objects_limit`` keeps the first N CIFAR
    images of each split (class-interleaved)."""
    from mergeseek.eval.reference import CIFAR10_CLASSES, load_cifar10_npz

    root = Path(root).expanduser()
    paths = background_paths(root)
    if len(paths) < 2 * TEST_EVERY:
        raise InputError(f"synth-detection needs background photos under {root}/coco_captions or "
                         f"{root}/imagenet_sample; found {len(paths)}")
    pools = {"train": [p for i, p in enumerate(paths) if i % TEST_EVERY != TEST_EVERY - 1],
             "test": [p for i, p in enumerate(paths) if i % TEST_EVERY == TEST_EVERY - 1]}
    backgrounds = {s: [_photo(p, spec.background_side) for p in ps] for s, ps in pools.items()}
    objects, labels = {}, {}
    for split in SPLITS:
        cifar = load_cifar10_npz(root / "cifar10", split, objects_limit)
        objects[split], labels[split] = cifar.images, cifar.labels
    fingerprint = source_fingerprint(root, paths, objects_limit)
    return DetectionSources(backgrounds, objects, labels, tuple(CIFAR10_CLASSES), fingerprint)


def source_fingerprint(root: Path, paths: Optional[List[Path]] = None, objects_limit: Optional[int] = None) -> str:
    """What identifies the sources under ``root`` in the cache key (file names and sizes; nothing decoded)."""
    paths = background_paths(root) if paths is None else paths
    return hashlib.sha256(json.dumps(
        [[str(p.relative_to(root)), p.stat().st_size] for p in paths]
        + [[f"cifar10/{s}_jpeg.npz", (root / "cifar10" / f"{s}_jpeg.npz").stat().st_size] for s in SPLITS]
        + [objects_limit]).encode()).hexdigest()[:16]


def sources_from_arrays(train_backgrounds: Sequence[np.ndarray], test_backgrounds: Sequence[np.ndarray],
                        train_objects: np.ndarray, train_labels: np.ndarray, test_objects: np.ndarray,
                        test_labels: np.ndarray, classes: Sequence[str], fingerprint: str = "arrays"
                        ) -> DetectionSources:
    """Sources from arrays in memory (tests compose tiny sets from scikit-image's photos this way)."""
    return DetectionSources({"train": list(train_backgrounds), "test": list(test_backgrounds)},
                            {"train": np.asarray(train_objects, np.uint8), "test": np.asarray(test_objects, np.uint8)},
                            {"train": np.asarray(train_labels, np.int64), "test": np.asarray(test_labels, np.int64)},
                            tuple(classes), fingerprint)


# ---------------------------------------------------------------------------- cache
def save_set(ds: DetectionSet, path: Path, spec: DetectionSpec) -> None:
    from mergeseek.runtime import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, images=ds.images.array, boxes=ds.boxes, labels=ds.labels, offsets=ds.offsets,
                     classes=np.asarray(ds.classes), spec=np.asarray(json.dumps(dataclasses.asdict(spec))),
                     format=np.asarray(FORMAT))

    atomic_write(path, write)


def read_set(path: Path, name: str = "synth-detection") -> DetectionSet:
    with np.load(path, allow_pickle=False) as d:
        if "format" not in d.files or str(d["format"]) != FORMAT:
            raise InputError(f"{path} is not a synth-detection file (format {FORMAT}); delete it to regenerate")
        return DetectionSet(Pictures(d["images"]), d["boxes"], d["labels"], d["offsets"],
                            tuple(str(c) for c in d["classes"]), name, str(path))


def cache_folder(path: Optional[Union[str, Path]], data_root: Union[str, Path, None] = None) -> Path:
    """Where the cache lives: ``path`` when given, else ``synth_detection`` under the user's data
    cache (``$MERGESEEK_DATA`` or ``~/.cache/mergeseek/data``, ``eval.config.default_data_root``),
    never inside the (possibly shared, read-only) folder the sources are read from."""
    if path:
        return Path(path).expanduser()
    from mergeseek.eval.config import default_data_root

    return default_data_root() / "synth_detection"


def load_synth_detection(cache: Path, sources_root: Union[str, Path], split: str = "test",
                         spec: DetectionSpec = DetectionSpec(), sources: Optional[DetectionSources] = None
                         ) -> DetectionSet:
    """The cached ``test`` split (generated on first use from the sources under ``sources_root``)."""
    if split != "test":
        raise ConfigError(f"synth-detection split={split!r}: only the test split is stored (training draws "
                          f"its pictures on the fly: eval.datasets.detection.picture)")
    root = Path(sources_root).expanduser()
    if sources is None and not (root / "cifar10").is_dir():
        raise InputError(f"synth-detection is made from {root}/cifar10 and the photos of {root}/coco_captions and "
                         f"{root}/imagenet_sample; pass --data-root with those folders")
    path = Path(cache) / spec.key(sources or source_fingerprint(root)) / f"{split}.npz"
    if path.is_file():
        return read_set(path)
    sources = sources or load_sources(root, spec)
    log.info("generating synth-detection %s (%d pictures) into %s", split, spec.test_pictures, path)
    ds = generate(spec, sources, split, spec.test_pictures)
    save_set(ds, path, spec)
    return read_set(path)


def size_bucket(boxes: np.ndarray) -> np.ndarray:
    """Index into :data:`SIZE_BUCKETS` of each box (by sqrt of its area)."""
    side = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) if len(boxes) else np.zeros(0)
    out = np.zeros(len(side), dtype=np.int64)
    for i, (_, lo, hi) in enumerate(SIZE_BUCKETS):
        out[(side >= lo) & (side < hi)] = i
    return out


def load_detection_spec(path: Optional[str], data_root: Union[str, Path], split: Optional[str] = None,
                        limit: Optional[int] = None) -> DetectionSet:
    """``--dataset synth-detection[:CACHE]``: the cached test split (sources under ``data_root``)."""
    return load_synth_detection(cache_folder(path, data_root), data_root, split or "test").limited(limit)
