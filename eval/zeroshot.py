"""Zero-shot class names and prompt templates as the field publishes them.

So that our zero-shot figures can be compared with open_clip's results table and with
clip_benchmark, the standard sets use *their* names and prompts, not ours:

* ImageNet-1k: ``open_clip.IMAGENET_CLASSNAMES`` (the cleaned 1000 names; no two "crane"
  classes) with ``open_clip.OPENAI_IMAGENET_TEMPLATES`` (80 prompts) or
  ``open_clip.SIMPLE_IMAGENET_TEMPLATES`` (7), read from the installed open_clip.
* CIFAR-10, CIFAR-100, Oxford-IIIT Pet: the class names and templates of clip_benchmark
  (``clip_benchmark/datasets/en_classnames.json`` and ``en_zeroshot_classification_templates.json``;
  CIFAR names are torchvision's with spaces for underscores), written out below.

``--templates`` chooses the prompts (:func:`choose_templates`):

* ``openai`` (default): the prompts published for the set (ImageNet 80, CIFAR 18, Pets 1); a set
  with no published prompts (an image folder of your own classes) keeps its own
  (``a photo of a {}.``).
* ``simple``: open_clip's 7 ``SIMPLE_IMAGENET_TEMPLATES`` for every set (cheaper text encoding).
* a file: one template per line (``{}`` or ``{c}`` marks the class name, ``#`` starts a comment),
  or a JSON list, or a JSON object keyed by dataset name (clip_benchmark's own templates file).

The class names are replaced only when a set holds the whole label space (all 10 / 100 / 37 /
1000 classes), so the label indices are the standard ones.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from mergeseek.errors import ConfigError, InputError

TEMPLATE_CHOICES = ("openai", "simple")
DEFAULT_TEMPLATES_CHOICE = "openai"

CIFAR10_CLASSNAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

CIFAR100_CLASSNAMES = (
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn mower", "leopard", "lion", "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak tree", "orange", "orchid", "otter", "palm tree", "pear", "pickup truck", "pine tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow tree", "wolf", "woman", "worm",
)

PETS_CLASSNAMES = (
    "Abyssinian", "American Bulldog", "American Pit Bull Terrier", "Basset Hound", "Beagle", "Bengal", "Birman",
    "Bombay", "Boxer", "British Shorthair", "Chihuahua", "Egyptian Mau", "English Cocker Spaniel", "English Setter",
    "German Shorthaired", "Great Pyrenees", "Havanese", "Japanese Chin", "Keeshond", "Leonberger", "Maine Coon",
    "Miniature Pinscher", "Newfoundland", "Persian", "Pomeranian", "Pug", "Ragdoll", "Russian Blue",
    "Saint Bernard", "Samoyed", "Scottish Terrier", "Shiba Inu", "Siamese", "Sphynx", "Staffordshire Bull Terrier",
    "Wheaten Terrier", "Yorkshire Terrier",
)

# The 18 CIFAR prompts (OpenAI's, as clip_benchmark uses them for CIFAR-10 and CIFAR-100).
CIFAR_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)
PETS_TEMPLATES = ("a photo of a {}, a type of pet.",)


def _open_clip_templates(name: str) -> tuple[str, ...]:
    """open_clip keeps templates as ``lambda c: f"...{c}..."``; as format strings with ``{}``."""
    import open_clip

    return tuple(t("{}") if callable(t) else str(t).replace("{c}", "{}") for t in getattr(open_clip, name))


def imagenet_classnames() -> tuple[str, ...]:
    import open_clip

    return tuple(open_clip.IMAGENET_CLASSNAMES)


def openai_imagenet_templates() -> tuple[str, ...]:
    return _open_clip_templates("OPENAI_IMAGENET_TEMPLATES")


def simple_imagenet_templates() -> tuple[str, ...]:
    return _open_clip_templates("SIMPLE_IMAGENET_TEMPLATES")


def published_prompts(label_space: str, num_classes: int) -> Optional[tuple[tuple[str, ...], tuple[str, ...], str]]:
    """(class names, templates, where they come from) for a standard label space held whole, else None."""
    if label_space == "cifar10" and num_classes == len(CIFAR10_CLASSNAMES):
        return CIFAR10_CLASSNAMES, CIFAR_TEMPLATES, "clip_benchmark cifar10"
    if label_space == "cifar100" and num_classes == len(CIFAR100_CLASSNAMES):
        return CIFAR100_CLASSNAMES, CIFAR_TEMPLATES, "clip_benchmark cifar100"
    if label_space == "pets" and num_classes == len(PETS_CLASSNAMES):
        return PETS_CLASSNAMES, PETS_TEMPLATES, "clip_benchmark pets"
    if label_space == "imagenet1k" and num_classes == 1000:
        return imagenet_classnames(), openai_imagenet_templates(), "open_clip imagenet"
    return None


def with_published_names(ds):
    """``ds`` (a ``ClassificationSet``) with the published class names and templates when it holds a
    whole standard label space; unchanged otherwise."""
    found = published_prompts(ds.label_space, len(ds.classes))
    if found is None:
        return ds
    classes, templates, _ = found
    return replace(ds, classes=classes, templates=templates)


def _normalise(templates: Sequence[str], origin: str) -> tuple[str, ...]:
    out = []
    for t in templates:
        t = str(t).replace("{c}", "{}")
        if t.count("{}") != 1 or t.replace("{}", "").count("{") or t.replace("{}", "").count("}"):
            raise ConfigError(f"template {t!r} in {origin} must hold the class name once, as {{}} or {{c}}")
        out.append(t)
    if not out:
        raise ConfigError(f"{origin} holds no templates; give one per line, e.g. 'a photo of a {{}}.'")
    return tuple(out)


def read_templates(path: Path, dataset: str = "") -> tuple[str, ...]:
    """Templates from a text file (one per line), a JSON list, or a JSON object keyed by dataset name."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"--templates {path}: no such file; choose {' or '.join(TEMPLATE_CHOICES)} or a file of templates"
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"templates file {path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if isinstance(data, dict):
            if dataset not in data:
                raise ConfigError(f"templates file {path} has no entry for dataset {dataset!r}; it has: "
                                  f"{', '.join(sorted(data))}")
            data = data[dataset]
        if not isinstance(data, list):
            raise InputError(f"templates file {path} must hold a list of templates (or an object of lists)")
        return _normalise(data, str(path))
    lines = [ln.strip() for ln in text.splitlines()]
    return _normalise([ln for ln in lines if ln and not ln.startswith("#")], str(path))


def choose_templates(ds, choice: Optional[str]):
    """``ds`` with the prompt templates ``--templates`` asks for (see the module docstring)."""
    choice = (choice or DEFAULT_TEMPLATES_CHOICE).strip()
    if choice == "openai":
        found = published_prompts(ds.label_space, len(ds.classes))
        return replace(ds, templates=found[1]) if found else ds
    if choice == "simple":
        return replace(ds, templates=simple_imagenet_templates())
    return replace(ds, templates=read_templates(Path(choice), ds.label_space or ds.name))


def describe_prompts(classes: Sequence[str], templates: Sequence[str], label_space: str = "") -> str:
    """Where a set's class names and templates come from, for the report."""
    classes, templates = tuple(classes), tuple(templates)
    found = published_prompts(label_space, len(classes)) if label_space else None
    names = f"{found[2]} class names" if found and found[0] == classes else "the set's own class names"
    if found and templates == found[1]:
        tpl = f"{found[2]} templates"
    elif templates == simple_imagenet_templates():
        tpl = "open_clip SIMPLE_IMAGENET_TEMPLATES"
    elif templates == openai_imagenet_templates():
        tpl = "open_clip OPENAI_IMAGENET_TEMPLATES"
    elif templates == CIFAR_TEMPLATES:
        tpl = "clip_benchmark CIFAR templates"
    else:
        tpl = f"own templates, first {templates[0]!r}" if templates else "no templates"
    return f"{len(templates)} template(s): {tpl}; {names}"


__all__ = [
    "CIFAR100_CLASSNAMES",
    "CIFAR10_CLASSNAMES",
    "CIFAR_TEMPLATES",
    "PETS_CLASSNAMES",
    "PETS_TEMPLATES",
    "TEMPLATE_CHOICES",
    "choose_templates",
    "describe_prompts",
    "imagenet_classnames",
    "openai_imagenet_templates",
    "published_prompts",
    "read_templates",
    "simple_imagenet_templates",
    "with_published_names",
]
