"""Image classification sets in their real on-disk formats.

* ImageFolder: ``<root>/<class>/<image>``.
* CIFAR-10 / CIFAR-100 python pickles (``cifar-10-batches-py`` / ``cifar-100-python``) and the
  offline CIFAR-10 JPEG pack (``{train,test}_jpeg.npz``).
* Oxford-IIIT Pet: the official ``annotations/{list,trainval,test}.txt`` + ``images/`` layout,
  or the offline subset's ``labels.csv`` + ``trainval/<breed>/``.
* ImageNet val: synset folders ``val/<wnid>/*.JPEG`` with a class-name map
  (``LOC_synset_mapping.txt`` lines ``n01440764 tench, Tinca tinca``, or a ``classes.tsv``),
  or the offline sample's flat ``classes.tsv`` (idx, wnid, name, file).
"""

from __future__ import annotations

import csv
import logging
import pickle
from pathlib import Path
from typing import Any, Optional

import numpy as np

from mergeseek.errors import ConfigError, InputError
from mergeseek.eval.zeroshot import CIFAR10_CLASSNAMES, PETS_TEMPLATES, with_published_names
from mergeseek.eval.datasets.base import (
    ArrayImages,
    ClassificationSet,
    FileImages,
    JpegPackImages,
    list_images,
    pretty_class,
)

log = logging.getLogger(__name__)

# Whole standard sets get the published class names and prompts (eval.zeroshot): comparable figures.
PET_TEMPLATES = PETS_TEMPLATES
CIFAR10_CLASSES = CIFAR10_CLASSNAMES


def _need_dir(path: Path, what: str, hint: str) -> Path:
    if not path.is_dir():
        raise InputError(f"{what} folder {path} does not exist; {hint}")
    return path


# ---------------------------------------------------------------------------- ImageFolder
def load_imagefolder(root: Path, name: str = "imagefolder") -> ClassificationSet:
    """``<root>/<class>/<image>``; classes are the sorted folder names (torchvision's rule)."""
    root = _need_dir(Path(root), "ImageFolder", "pass a folder with one sub-folder of images per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels = [], []
    for ci, cname in enumerate(classes):
        files = list_images(root / cname)
        paths += files
        labels += [ci] * len(files)
    if not paths:
        raise InputError(f"ImageFolder {root} has no images in class sub-folders; expected <root>/<class>/<image>.jpg")
    return ClassificationSet(
        name=name,
        images=FileImages(tuple(paths)),
        labels=np.asarray(labels, dtype=np.int64),
        classes=tuple(pretty_class(c) for c in classes),
        source=str(root),
    )


# ---------------------------------------------------------------------------- CIFAR
class _ArrayUnpickler(pickle.Unpickler):
    """The CIFAR pickles hold only dicts, lists, bytes and numpy arrays: refuse anything else,
    so a tampered file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise InputError(f"CIFAR pickle refers to {module}.{name}, which a CIFAR file never does; the file is not CIFAR")


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"CIFAR file {path} does not exist; pass the extracted cifar-*-python folder")
    with open(path, "rb") as fh:
        data = _ArrayUnpickler(fh, encoding="bytes").load()
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _cifar_images(rows: Any) -> np.ndarray:
    """[N, 3072] rows (1024 R, 1024 G, 1024 B, each row-major 32x32) -> uint8 [N, 32, 32, 3]."""
    arr = np.asarray(rows, dtype=np.uint8)
    if arr.ndim != 2 or arr.shape[1] != 3072:
        raise InputError(f"CIFAR data has shape {arr.shape}; expected [N, 3072]")
    return arr.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def _names(values) -> tuple[str, ...]:
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in values)


def load_cifar100(root: Path, split: str = "test") -> ClassificationSet:
    """CIFAR-100 python pickles: ``<root>/{train,test,meta}`` (or ``<root>/cifar-100-python/``)."""
    root = Path(root)
    if (root / "cifar-100-python").is_dir():
        root = root / "cifar-100-python"
    if split not in ("train", "test"):
        raise ConfigError(f"CIFAR-100 split={split!r} is not valid; choose train or test")
    _need_dir(root, "CIFAR-100", "download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
              "and extract it (it is not available offline; use cifar10 instead)")
    data = _unpickle(root / split)
    meta = _unpickle(root / "meta")
    classes = _names(meta["fine_label_names"])
    names = _names(data.get("filenames", []))
    return with_published_names(ClassificationSet(
        name="cifar100",
        images=ArrayImages(_cifar_images(data["data"]), names),
        labels=np.asarray(data["fine_labels"], dtype=np.int64),
        classes=tuple(pretty_class(c) for c in classes),
        source=str(root / split),
        label_space="cifar100",
    ))


def load_cifar10(root: Path, split: str = "test") -> ClassificationSet:
    """CIFAR-10 from the offline JPEG pack (``<split>_jpeg.npz``) or the python pickles."""
    root = Path(root)
    if split not in ("train", "test"):
        raise ConfigError(f"CIFAR-10 split={split!r} is not valid; choose train or test")
    pack = root if root.suffix == ".npz" else root / f"{split}_jpeg.npz"
    if pack.is_file():
        return load_cifar10_pack(pack)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    if (root / "batches.meta").is_file():
        return _load_cifar10_pickles(root, split)
    raise InputError(
        f"CIFAR-10 not found at {root}: expected {split}_jpeg.npz (the offline pack) or the python pickles "
        f"(batches.meta, data_batch_1..5, test_batch); pass the folder that holds them"
    )


def cifar10_pack_path(path: Path, split: str) -> Path:
    """The JPEG pack of ``split``: ``path`` is the folder holding ``{train,test}_jpeg.npz`` or one of them."""
    if split not in ("train", "test"):
        raise ConfigError(f"CIFAR-10 split {split!r} is not valid; choose train or test")
    p = Path(path)
    if p.is_dir():
        p = p / f"{split}_jpeg.npz"
    if not p.is_file():
        raise InputError(f"CIFAR-10 {split} pack {p} does not exist; pass the folder with train_jpeg.npz and "
                         "test_jpeg.npz (e.g. $MERGESEEK_DATA/cifar10)")
    return p


def load_cifar10_pack(path: Path) -> ClassificationSet:
    """The offline CIFAR-10 JPEG pack (``jpeg`` bytes, ``offsets``, ``labels``; optional ``names``,
    ``classes``), decoded lazily. The one reader of the format (``eval.reference`` uses it too)."""
    with np.load(path, allow_pickle=False) as d:
        missing = {"jpeg", "offsets", "labels"} - set(d.files)
        if missing:
            raise InputError(f"{path} lacks arrays {sorted(missing)}; it is not a CIFAR-10 JPEG pack")
        blob, offsets, labels = d["jpeg"], d["offsets"].astype(np.int64), d["labels"].astype(np.int64)
        names = tuple(str(n) for n in d["names"]) if "names" in d.files else ()
        classes = tuple(str(c) for c in d["classes"]) if "classes" in d.files else CIFAR10_CLASSES
    if len(offsets) != len(labels) + 1:
        raise InputError(f"{path}: {len(offsets)} offsets for {len(labels)} labels; expected labels + 1")
    return with_published_names(ClassificationSet(
        name="cifar10",
        images=JpegPackImages(blob, offsets, np.arange(len(labels)), names),
        labels=labels,
        classes=classes,
        source=str(path),
        label_space="cifar10",
    ))


def _load_cifar10_pickles(root: Path, split: str) -> ClassificationSet:
    files = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    arrays, labels, names = [], [], []
    for f in files:
        d = _unpickle(root / f)
        arrays.append(_cifar_images(d["data"]))
        labels += list(d["labels"])
        names += list(_names(d.get("filenames", [])))
    meta = _unpickle(root / "batches.meta")
    return with_published_names(ClassificationSet(
        name="cifar10",
        images=ArrayImages(np.concatenate(arrays), tuple(names)),
        labels=np.asarray(labels, dtype=np.int64),
        classes=_names(meta["label_names"]),
        source=str(root),
        label_space="cifar10",
    ))


# ---------------------------------------------------------------------------- Oxford-IIIT Pet
def load_pets(root: Path, split: str = "test") -> ClassificationSet:
    """Oxford-IIIT Pet, official layout (``annotations/<split>.txt``) or the offline subset (``labels.csv``).

    ``split`` (official layout only): ``test``, ``trainval`` or ``list`` (all). The offline subset
    has trainval images only and ignores it.
    """
    root = Path(root)
    _need_dir(root, "Oxford-IIIT Pet", "pass the folder with images/ and annotations/ (or labels.csv)")
    if (root / "labels.csv").is_file():
        return _load_pets_csv(root)
    if split not in ("test", "trainval", "list"):
        raise ConfigError(f"Oxford-IIIT Pet split={split!r} is not valid; choose test, trainval or list")
    ann = root / "annotations" / f"{split}.txt"
    if not ann.is_file():
        raise InputError(f"{ann} does not exist; expected the official annotations/{split}.txt (or a labels.csv)")
    entries: list[tuple[str, int]] = []
    for line in ann.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2:
            raise InputError(f"{ann}: line {line!r} is not '<image> <class-id> <species> <breed-id>'")
        entries.append((parts[0], int(parts[1]) - 1))  # class ids are 1-based
    names: dict[int, str] = {}
    for image, cid in entries:
        names.setdefault(cid, image.rsplit("_", 1)[0])  # "american_bulldog_12" -> breed
    n_cls = max(names) + 1
    missing = [i for i in range(n_cls) if i not in names]
    if missing:
        raise InputError(f"{ann}: class ids {[i + 1 for i in missing]} have no images, so their names are unknown")
    return with_published_names(ClassificationSet(
        name="pets",
        images=FileImages(tuple(root / "images" / f"{img}.jpg" for img, _ in entries)),
        labels=np.asarray([c for _, c in entries], dtype=np.int64),
        classes=tuple(pretty_class(names[i]) for i in range(n_cls)),
        templates=PET_TEMPLATES,
        source=str(ann),
        label_space="pets",
    ))


def _load_pets_csv(root: Path) -> ClassificationSet:
    rows = list(csv.DictReader(open(root / "labels.csv", newline="")))
    if not rows or not {"file", "label"} <= set(rows[0]):
        raise InputError(f"{root / 'labels.csv'} needs columns file,label (and breed)")
    labels = np.asarray([int(r["label"]) for r in rows], dtype=np.int64)
    if (root / "classes.txt").is_file():
        classes = tuple(c.strip() for c in (root / "classes.txt").read_text().splitlines() if c.strip())
    else:
        by_label = {int(r["label"]): r.get("breed") or r["label"] for r in rows}
        classes = tuple(by_label[i] for i in range(max(by_label) + 1))
    return with_published_names(ClassificationSet(
        name="pets",
        images=FileImages(tuple(root / r["file"] for r in rows)),
        labels=labels,
        classes=tuple(pretty_class(c) for c in classes),
        templates=PET_TEMPLATES,
        source=str(root / "labels.csv"),
        label_space="pets",
    ))


# ---------------------------------------------------------------------------- ImageNet
def load_imagenet(root: Path, class_map: Optional[Path] = None) -> ClassificationSet:
    """ImageNet validation images with ILSVRC-2012 class indices (sorted wnids).

    Layouts: ``<root>/classes.tsv`` with a ``file`` column (the offline sample), or synset
    folders ``<root>/[val/]<wnid>/*`` plus a class-name map (``class_map``, or
    ``LOC_synset_mapping.txt`` / ``classes.tsv`` / ``synsets.txt`` found beside them).
    """
    root = _need_dir(Path(root), "ImageNet", "pass the folder with val/<wnid>/ synset folders and a class map")
    tsv = root / "classes.tsv"
    if tsv.is_file() and "file" in _tsv_header(tsv):
        return _load_imagenet_flat(root, tsv)
    folder = root / "val" if (root / "val").is_dir() else root
    wnids = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("n"))
    if not wnids:
        raise InputError(f"ImageNet folder {folder} has no synset folders (n01440764/...); expected val/<wnid>/*.JPEG")
    names = _read_class_map(class_map, [root, folder, root.parent])
    # Standard index: position of the wnid among all 1000 sorted wnids (from the map when it has
    # them all, so a partial val folder keeps the real indices a 1000-way head expects).
    all_wnids = sorted(names) if len(names) >= len(wnids) and set(wnids) <= set(names) else wnids
    index = {w: i for i, w in enumerate(all_wnids)}
    paths, labels = [], []
    for w in wnids:
        files = list_images(folder / w)
        paths += files
        labels += [index[w]] * len(files)
    missing = [w for w in all_wnids if w not in names]
    if missing:
        raise InputError(f"the ImageNet class map has no name for {missing[:3]}...; pass a complete map")
    return with_published_names(ClassificationSet(
        name="imagenet",
        images=FileImages(tuple(paths)),
        labels=np.asarray(labels, dtype=np.int64),
        classes=tuple(pretty_class(names[w]) for w in all_wnids),
        source=str(folder),
        label_space="imagenet1k" if len(all_wnids) == 1000 else "",
    ))


def _tsv_header(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        return next(csv.reader(fh, delimiter="\t"), [])


def _load_imagenet_flat(root: Path, tsv: Path) -> ClassificationSet:
    rows = list(csv.DictReader(open(tsv, newline=""), delimiter="\t"))
    if not rows or not {"idx", "name", "file"} <= set(rows[0]):
        raise InputError(f"{tsv} needs columns idx, wnid, name, file")
    rows.sort(key=lambda r: int(r["idx"]))
    classes = tuple(pretty_class(r["name"]) for r in rows)
    return with_published_names(ClassificationSet(
        name="imagenet",
        images=FileImages(tuple(root / r["file"] for r in rows)),
        labels=np.asarray([int(r["idx"]) for r in rows], dtype=np.int64),
        classes=classes,
        source=str(tsv),
        label_space="imagenet1k" if len(classes) == 1000 else "",
    ))


def _read_class_map(explicit: Optional[Path], search: list[Path]) -> dict[str, str]:
    """wnid -> first class name, from ``n01440764 tench, Tinca tinca`` lines or a tsv with wnid,name."""
    candidates = [Path(explicit)] if explicit else [
        d / f for d in search for f in ("LOC_synset_mapping.txt", "classes.tsv", "synsets.txt", "synset_words.txt")
    ]
    for path in candidates:
        if not path.is_file():
            continue
        out: dict[str, str] = {}
        if path.suffix == ".tsv":
            for r in csv.DictReader(open(path, newline=""), delimiter="\t"):
                out[r["wnid"]] = r["name"]
        else:
            for line in path.read_text().splitlines():
                if line.strip():
                    wnid, _, rest = line.strip().partition(" ")
                    out[wnid] = (rest.split(",")[0] or wnid).strip()
        return out
    if explicit:
        raise InputError(f"ImageNet class map {explicit} does not exist")
    raise InputError(
        "no ImageNet class-name map found (LOC_synset_mapping.txt, classes.tsv or synsets.txt beside val/); "
        "pass one with class_map=PATH"
    )


__all__ = ["cifar10_pack_path", "load_cifar10", "load_cifar10_pack", "load_cifar100", "load_imagefolder",
           "load_imagenet", "load_pets"]
