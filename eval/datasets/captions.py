"""Image–caption sets for text→image recall (each caption is a query; its image is the answer).

Formats:

* ``captions.jsonl``: one JSON object per image with ``file`` (relative to the folder),
  ``captions`` (list of strings) and optionally ``split`` and ``image_id`` (the offline COCO set).
* The official COCO annotation file (``captions_val2017.json``: ``images`` with ``id`` and
  ``file_name``, ``annotations`` with ``image_id`` and ``caption``) with the images in
  ``<root>/<split>/`` or ``<root>/images/<split>/`` or ``<root>/``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from mergeseek.errors import InputError
from mergeseek.eval.datasets.base import FileImages, Query, RetrievalSet, random_indices

log = logging.getLogger(__name__)


def load_captions(
    root: Path, split: Optional[str] = None, limit: Optional[int] = None, seed: int = 0, name: str = "coco"
) -> RetrievalSet:
    """Read an image–caption set; ``limit`` keeps a fixed random subset of *images* (with all their captions).

    Args:
        root: folder with ``captions.jsonl`` or a COCO ``captions_*.json``; or that file itself.
        split: keep only images of this split (``val2017``); None keeps all.
        limit: number of images to keep.
        seed: seed of the subset.
        name: name in reports.
    """
    root = Path(root)
    if root.is_file():
        path, root = root, root.parent
    elif (root / "captions.jsonl").is_file():
        path = root / "captions.jsonl"
    else:
        found = sorted((root / "annotations").glob("captions_*.json")) + sorted(root.glob("captions_*.json"))
        if not found:
            raise InputError(
                f"no captions.jsonl or COCO captions_*.json in {root}; pass a folder holding one "
                f"(e.g. $MERGESEEK_DATA/coco_captions)"
            )
        path = found[0]
    items = _read_jsonl(path, root) if path.suffix == ".jsonl" else _read_coco_json(path, root)
    if split:
        items = [it for it in items if it[2] in (split, None)]
    if not items:
        raise InputError(f"{path} has no images{f' in split {split!r}' if split else ''}")
    keep = random_indices(len(items), limit, seed)
    items = [items[i] for i in keep]
    queries = []
    for i, (file, caps, _split, image_id) in enumerate(items):
        for j, cap in enumerate(caps):
            queries.append(Query(qid=f"{image_id}#{j}", text=cap, relevant=(i,)))
    missing = [str(f) for f, *_ in items if not f.is_file()]
    if missing:
        raise InputError(f"{len(missing)} caption images are missing, e.g. {missing[0]}; check the folder layout")
    return RetrievalSet(
        name=name,
        images=FileImages(tuple(f for f, *_ in items)),
        queries=tuple(queries),
        source=str(path) + (f" (split {split})" if split else ""),
    )


def _read_jsonl(path: Path, root: Path) -> list[tuple[Path, list[str], Optional[str], str]]:
    from mergeseek.retrieval.records import read_records

    items = []
    for rec in read_records(path, "captions file"):
        obj, n = rec.value, rec.line
        if not isinstance(obj, dict) or "file" not in obj or not obj.get("captions"):
            raise InputError(f"{path}:{n} needs 'file' and a non-empty 'captions' list")
        caps = obj["captions"] if isinstance(obj["captions"], list) else [obj["captions"]]
        items.append((root / obj["file"], [str(c) for c in caps], obj.get("split"), str(obj.get("image_id", n))))
    return items


def _read_coco_json(path: Path, root: Path) -> list[tuple[Path, list[str], Optional[str], str]]:
    from mergeseek.retrieval.records import read_records

    records = read_records(path, "COCO captions file", single_object=True)
    data = records[0].value if len(records) == 1 else None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise InputError(f"{path} is not a COCO captions file (needs 'images' and 'annotations')")
    split = path.stem.replace("captions_", "")  # captions_val2017 -> val2017
    folders = [root / split, root / "images" / split, root.parent / split, root.parent / "images" / split, root]
    caps: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        caps.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]).strip())
    items = []
    for im in sorted(data["images"], key=lambda m: int(m["id"])):
        if int(im["id"]) not in caps:
            continue
        file = next((d / im["file_name"] for d in folders if (d / im["file_name"]).is_file()), folders[0] / im["file_name"])
        items.append((file, caps[int(im["id"])], split, str(im["id"])))
    return items
