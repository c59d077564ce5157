"""Evaluation sets: parse a dataset spec and read the set in its real on-disk format.

Spec syntax (``--dataset``, repeatable): ``NAME[:PATH][,key=value...]``::

    cifar10                          # <data-root>/cifar10 (offline JPEG pack or python pickles)
    cifar100:/data/cifar-100-python  # python pickles
    pets                             # <data-root>/oxford_pets (or the official layout)
    imagenet,class_map=/data/LOC_synset_mapping.txt
    coco,split=val2017               # <data-root>/coco_captions
    keyframes:/data/aic,queries=/data/aic/queries.jsonl
    imagefolder:/data/my_classes,templates=ensemble
    speech-words                     # espeak-ng spoken words as log-mel (generated, cached)
    synth-detection                  # CIFAR-10 objects pasted onto photos, with boxes (generated, cached)

Keys: ``split``, ``queries``, ``class_map``, ``templates`` (``single`` or ``ensemble``),
``name`` (name in reports).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Collection, Optional, Union

from mergeseek.errors import ConfigError
from mergeseek.options import parse_options
from mergeseek.eval.datasets.base import (
    DEFAULT_TEMPLATES,
    ENSEMBLE_TEMPLATES,
    ClassificationSet,
    Query,
    RetrievalSet,
    balanced_indices,
    random_indices,
)

EvalSet = Union[ClassificationSet, RetrievalSet]

# name -> (kind, default folder under the data root or None when a path is required)
DATASETS = {
    "cifar10": ("classification", "cifar10"),
    "cifar100": ("classification", "cifar100"),
    "pets": ("classification", "oxford_pets"),
    "imagenet": ("classification", "imagenet_sample"),
    "imagefolder": ("classification", None),
    "coco": ("retrieval", "coco_captions"),
    "captions": ("retrieval", None),
    "keyframes": ("retrieval", None),
    "speech-words": ("classification", "speech_words"),
    "synth-detection": ("detection", "synth_detection"),
}
OPTION_KEYS = ("split", "queries", "class_map", "templates", "name")


@dataclass(frozen=True)
class DatasetSpec:
    """One ``--dataset`` value: adapter name, optional path and options; ``str()`` round-trips."""

    name: str
    path: Optional[str] = None
    options: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def parse(cls, text: str) -> "DatasetSpec":
        parsed = parse_options(text, "dataset", OPTION_KEYS, head="always", brackets=False)
        name, _, path = (parsed.head or "").partition(":")
        name = name.strip().lower()
        if name not in DATASETS:
            raise ConfigError(f"dataset {name!r} is not known; choose one of: {', '.join(DATASETS)}")
        opts = list(parsed.pairs)
        if path == "" and DATASETS[name][1] is None:
            raise ConfigError(f"dataset {name} needs a path: --dataset {name}:/path/to/folder")
        return cls(name, path or None, tuple(opts))

    def option(self, key: str, default: Optional[str] = None) -> Optional[str]:
        return dict(self.options).get(key, default)

    def resolve_path(self, data_root: Union[str, Path]) -> Path:
        if self.path:
            return Path(self.path).expanduser()
        return Path(data_root).expanduser() / DATASETS[self.name][1]

    @property
    def kind(self) -> str:
        return DATASETS[self.name][0]

    def __str__(self) -> str:
        head = self.name + (f":{self.path}" if self.path else "")
        return ",".join([head] + [f"{k}={v}" for k, v in self.options])


def load_dataset(spec: Union[str, DatasetSpec], data_root: Union[str, Path, None] = None,
                 limit: Optional[int] = None, seed: int = 0, channels: Collection[str] = ()) -> EvalSet:
    """Read one evaluation set; ``limit`` keeps a fixed subset (images for classification and
    caption sets, queries for keyframe sets). ``data_root`` None: ``$MERGESEEK_DATA`` or the
    user's cache folder (:func:`eval.config.default_data_root`). ``channels``: the text channels
    the run has for keyframe sets (queries with ``ocr:`` / ``asr:`` parts, ``eval.channels``)."""
    from mergeseek.eval.datasets.captions import load_captions
    from mergeseek.eval.datasets.classification import load_cifar10, load_cifar100, load_imagefolder, load_imagenet, load_pets
    from mergeseek.eval.datasets.keyframes import load_keyframes

    from mergeseek.eval.config import resolve_data_root

    spec = DatasetSpec.parse(spec) if isinstance(spec, str) else spec
    path = spec.resolve_path(resolve_data_root(data_root))
    split = spec.option("split")
    if spec.name == "cifar10":
        ds = load_cifar10(path, split or "test")
    elif spec.name == "cifar100":
        ds = load_cifar100(path, split or "test")
    elif spec.name == "pets":
        ds = load_pets(path, split or "test")
    elif spec.name == "imagenet":
        cm = spec.option("class_map")
        ds = load_imagenet(path, Path(cm) if cm else None)
    elif spec.name == "imagefolder":
        ds = load_imagefolder(path)
    elif spec.name == "speech-words":
        from mergeseek.eval.datasets.speech import load_speech_words

        ds = load_speech_words(path, split or "test")
    elif spec.name == "synth-detection":  # sources under the data root, cache at PATH (eval/datasets/detection.py)
        from mergeseek.eval.datasets.detection import load_detection_spec

        ds = load_detection_spec(spec.path, resolve_data_root(data_root), split, limit)
    elif spec.name in ("coco", "captions"):
        ds = load_captions(path, split, limit, seed, name=spec.name)
    else:  # keyframes
        q = spec.option("queries")
        ds = load_keyframes(path, Path(q) if q else None, limit, seed, channels=channels)
    if isinstance(ds, ClassificationSet):
        ds = ds.limited(limit, seed)
        templates = spec.option("templates")
        if templates == "ensemble":
            ds = replace(ds, templates=ENSEMBLE_TEMPLATES)
        elif templates not in (None, "single"):
            raise ConfigError(f"dataset option templates={templates!r} is not valid; choose single or ensemble")
    if spec.option("name"):
        ds = replace(ds, name=spec.option("name"))
    return ds


__all__ = [
    "DATASETS",
    "DEFAULT_TEMPLATES",
    "ENSEMBLE_TEMPLATES",
    "ClassificationSet",
    "DatasetSpec",
    "EvalSet",
    "Query",
    "RetrievalSet",
    "balanced_indices",
    "load_dataset",
    "random_indices",
]
