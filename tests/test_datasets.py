"""Each dataset adapter reads a small fixture written in the set's real on-disk format."""

from __future__ import annotations

import csv
import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from mergeseek.errors import ConfigError, InputError
from mergeseek.eval.datasets import DatasetSpec, balanced_indices, load_dataset


def _img(color, size=(12, 10)) -> Image.Image:
    return Image.new("RGB", size, tuple(int(c) for c in color))


def _save(path, color, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    _img(color, size).save(path)
    return path


# ---------------------------------------------------------------------------- classification
def test_imagefolder(tmp_path):
    for cls, n in (("golden_retriever", 2), ("tabby_cat", 3)):
        for i in range(n):
            _save(tmp_path / cls / f"{i}.png", (10 * i, 50, 100))
    (tmp_path / "tabby_cat" / "notes.txt").write_text("not an image")
    ds = load_dataset(f"imagefolder:{tmp_path}")
    assert ds.classes == ("golden retriever", "tabby cat")
    assert ds.labels.tolist() == [0, 0, 1, 1, 1]
    assert ds.images.load(3).getpixel((0, 0)) == (10, 50, 100)


def _cifar_rows(colors):
    """CIFAR row layout: 1024 R, 1024 G, 1024 B values per image."""
    return np.stack([np.repeat(np.asarray(c, dtype=np.uint8), 1024) for c in colors])


def test_cifar100_python_pickles(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    test = {b"data": _cifar_rows(colors), b"fine_labels": [2, 0, 1], b"coarse_labels": [0, 0, 0],
            b"filenames": [b"a.png", b"b.png", b"c.png"]}
    meta = {b"fine_label_names": [b"apple", b"aquarium_fish", b"baby"], b"coarse_label_names": [b"x"]}
    for name, obj in (("test", test), ("meta", meta)):
        with open(root / name, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)
    ds = load_dataset(f"cifar100:{tmp_path}")
    assert ds.name == "cifar100" and len(ds) == 3
    assert ds.classes == ("apple", "aquarium fish", "baby")
    assert ds.labels.tolist() == [2, 0, 1]
    im = ds.images.load(1)
    assert im.size == (32, 32) and im.getpixel((5, 7)) == (0, 255, 0)


def test_cifar_pickle_refuses_foreign_objects(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(root / "test", "wb") as fh:
        pickle.dump({b"data": Evil()}, fh)
    with pytest.raises(InputError, match="not CIFAR"):
        load_dataset(f"cifar100:{tmp_path}")


def test_cifar10_python_pickles(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    with open(root / "test_batch", "wb") as fh:
        pickle.dump({b"data": _cifar_rows([(1, 2, 3), (4, 5, 6)]), b"labels": [9, 3]}, fh, protocol=2)
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog",
                                      b"horse", b"ship", b"truck"]}, fh, protocol=2)
    ds = load_dataset(f"cifar10:{tmp_path}")
    assert ds.labels.tolist() == [9, 3] and ds.classes[9] == "truck"
    assert ds.images.load(0).getpixel((0, 0)) == (1, 2, 3)


def write_cifar10_pack(path, labels, classes=("airplane", "automobile", "bird")):
    """The offline pack: concatenated JPEGs + offsets + labels + names + classes (np.load, no pickle)."""
    blobs, names = [], []
    for i, lab in enumerate(labels):
        buf = io.BytesIO()
        _img((40 * lab, 255 - 40 * lab, 128), (32, 32)).save(buf, format="JPEG", quality=95)
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
        names.append(f"{classes[lab]}/{i:04d}.jpg")
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    np.savez(path, jpeg=np.concatenate(blobs), offsets=offsets, labels=np.asarray(labels, dtype=np.int64),
             names=np.asarray(names), classes=np.asarray(classes))


def test_cifar10_jpeg_pack_and_balanced_limit(tmp_path):
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    write_cifar10_pack(tmp_path / "test_jpeg.npz", labels)
    ds = load_dataset(f"cifar10:{tmp_path}")
    assert len(ds) == 9 and ds.classes == ("airplane", "automobile", "bird")
    assert ds.images.label(4) == "automobile/0004.jpg"
    r, g, _ = ds.images.load(6).getpixel((16, 16))
    assert abs(r - 80) < 8 and abs(g - 175) < 8  # JPEG is lossy
    sub = load_dataset(f"cifar10:{tmp_path}", limit=6)
    # balanced: the first two of each class, in file order
    assert sub.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert [sub.images.label(i) for i in range(6)] == [ds.images.label(i) for i in (0, 1, 3, 4, 6, 7)]


def test_balanced_limit_below_class_count_samples_classes_at_random():
    labels = np.arange(100)  # one image per class, like the ImageNet sample
    a = balanced_indices(labels, 10, seed=0)
    assert len(set(labels[a].tolist())) == 10 and a.tolist() != list(range(10))
    assert balanced_indices(labels, 10, seed=0).tolist() == a.tolist()  # fixed
    assert balanced_indices(labels, 10, seed=1).tolist() != a.tolist()


def test_pets_official_annotations_layout(tmp_path):
    ann = tmp_path / "annotations"
    ann.mkdir()
    lines = ["#Image CLASS-ID SPECIES BREED ID", "Abyssinian_1 1 1 1", "american_bulldog_10 2 2 1",
             "Abyssinian_5 1 1 1"]
    (ann / "test.txt").write_text("\n".join(lines[1:]) + "\n")
    (ann / "list.txt").write_text("\n".join(lines) + "\n")
    for name, c in (("Abyssinian_1", 10), ("american_bulldog_10", 20), ("Abyssinian_5", 30)):
        _save(tmp_path / "images" / f"{name}.jpg", (c, c, c))
    ds = load_dataset(f"pets:{tmp_path}")
    assert ds.classes == ("Abyssinian", "american bulldog")
    assert ds.labels.tolist() == [0, 1, 0]
    assert ds.templates[0].format(ds.classes[1]) == "a photo of a american bulldog, a type of pet."
    assert len(load_dataset(f"pets:{tmp_path},split=list")) == 3
    with pytest.raises(ConfigError):
        load_dataset(f"pets:{tmp_path},split=val")


def test_pets_offline_subset_layout(tmp_path):
    rows = [("trainval/Bengal/Bengal_1.jpg", 1, "Bengal"), ("trainval/Abyssinian/Abyssinian_2.jpg", 0, "Abyssinian")]
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "breed", "species", "source_split"])
        for f, lab, breed in rows:
            w.writerow([f, lab, breed, "cat", "train"])
            _save(tmp_path / f, (lab * 100, 0, 0))
    (tmp_path / "classes.txt").write_text("Abyssinian\nBengal\n")
    ds = load_dataset(f"pets:{tmp_path}")
    assert ds.classes == ("Abyssinian", "Bengal") and ds.labels.tolist() == [1, 0]
    assert ds.images.load(0).getpixel((1, 1))[0] == 100


def test_imagenet_synset_folders_with_class_map(tmp_path):
    wnids = ["n01440764", "n01443537", "n01484850"]
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn01484850 great white shark, white shark\n"
    )
    for w in (wnids[2], wnids[0]):  # a partial val folder keeps the standard indices
        _save(tmp_path / "val" / w / f"ILSVRC2012_val_{w}.JPEG", (1, 2, 3))
    ds = load_dataset(f"imagenet:{tmp_path}")
    assert ds.classes == ("tench", "goldfish", "great white shark")
    assert ds.labels.tolist() == [0, 2]


def test_imagenet_offline_sample_layout(tmp_path):
    with open(tmp_path / "classes.tsv", "w") as fh:
        fh.write("idx\twnid\tname\tfile\n")
        for i, (w, n) in enumerate((("n01440764", "tench"), ("n01443537", "goldfish"), ("n01484850", "great_white_shark"))):
            fh.write(f"{i}\t{w}\t{n}\tval/{i:03d}_{w}.JPEG\n")
            _save(tmp_path / "val" / f"{i:03d}_{w}.JPEG", (i, i, i), size=(20, 8))
    ds = load_dataset(f"imagenet:{tmp_path}")
    assert ds.classes[2] == "great white shark" and ds.labels.tolist() == [0, 1, 2]
    assert ds.images.load(2).size == (20, 8)


# ---------------------------------------------------------------------------- captions
def test_captions_jsonl_and_split_and_limit(tmp_path):
    objs = []
    for i, split in enumerate(["val2017", "train2017", "val2017"]):
        f = f"images/{split}/{i:012d}.jpg"
        _save(tmp_path / f, (i, i, i))
        objs.append({"file": f, "split": split, "image_id": i, "captions": [f"cap {i} a", f"cap {i} b"]})
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(o) for o in objs) + "\n")
    ds = load_dataset(f"coco:{tmp_path}")
    assert len(ds) == 3 and len(ds.queries) == 6
    assert ds.queries[3].text == "cap 1 b" and ds.queries[3].relevant == (1,)
    val = load_dataset(f"coco:{tmp_path},split=val2017")
    assert len(val) == 2 and [q.relevant for q in val.queries] == [(0,), (0,), (1,), (1,)]
    assert val.queries[2].text == "cap 2 a"
    sub = load_dataset(f"coco:{tmp_path}", limit=2)
    assert len(sub) == 2 and len(sub.queries) == 4


def test_captions_official_coco_json(tmp_path):
    (tmp_path / "annotations").mkdir()
    _save(tmp_path / "val2017" / "000000000139.jpg", (5, 5, 5))
    _save(tmp_path / "val2017" / "000000000285.jpg", (6, 6, 6))
    coco = {
        "images": [{"id": 285, "file_name": "000000000285.jpg"}, {"id": 139, "file_name": "000000000139.jpg"}],
        "annotations": [{"image_id": 139, "id": 1, "caption": "a woman in a kitchen "},
                        {"image_id": 285, "id": 2, "caption": "a big bear"},
                        {"image_id": 139, "id": 3, "caption": "a room with chairs"}],
    }
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(coco))
    ds = load_dataset(f"captions:{tmp_path}")
    assert [q.text for q in ds.queries] == ["a woman in a kitchen", "a room with chairs", "a big bear"]
    assert [q.relevant for q in ds.queries] == [(0,), (0,), (1,)]
    assert ds.images.load(1).getpixel((0, 0)) == (6, 6, 6)


# ---------------------------------------------------------------------------- keyframes
def write_aic(root, videos: dict[str, list[int]]):
    """AI Challenge layout: keyframes/<vid>/<n>.jpg (n = 1, 2, ...) + map-keyframes/<vid>.csv."""
    (root / "map-keyframes").mkdir(parents=True, exist_ok=True)
    for v, frames in videos.items():
        with open(root / "map-keyframes" / f"{v}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["n", "pts_time", "fps", "frame_idx"])
            for n, f in enumerate(frames, start=1):
                w.writerow([n, f / 25.0, 25.0, f])
                _save(root / "keyframes" / v / f"{n:03d}.jpg", (n * 20, len(v), 0))


def test_keyframes_aic_layout_with_jsonl_targets(tmp_path):
    write_aic(tmp_path, {"L01_V001": [0, 50, 100], "L01_V002": [10, 200]})
    queries = [
        {"id": "a", "query": "exact keyframe", "video_id": "L01_V001", "frame_idx": 50},
        {"id": "b", "query": "a range", "video_id": "L01_V001", "frame_start": 40, "frame_end": 120},
        {"id": "c", "query": "a list", "video_id": "L01_V002", "frames": [10, 200]},
        {"id": "d", "query": "between keyframes", "video_id": "L01_V002", "frame_idx": 180},
        {"id": "e", "query": "unknown video", "video_id": "L09_V009", "frame_idx": 1},
    ]
    (tmp_path / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries))
    ds = load_dataset(f"keyframes:{tmp_path}")
    assert ds.video_ids == ("L01_V001",) * 3 + ("L01_V002",) * 2
    assert ds.frame_idx == (0, 50, 100, 10, 200)
    rel = {q.qid: q.relevant for q in ds.queries}
    assert rel == {"a": (1,), "b": (1, 2), "c": (3, 4), "d": (4,)}  # d snapped to frame 200
    assert ds.queries[0].video_id == "L01_V001"
    assert any("snapped" in n for n in ds.notes) and any("dropped" in n for n in ds.notes)


def test_keyframes_plain_layout_with_csv_queries(tmp_path):
    for v, frames in (("vidA", [0, 30]), ("vidB", [5])):
        for f in frames:
            _save(tmp_path / "gallery" / v / f"{f}.jpg", (f, 0, 0))
    qfile = tmp_path / "q.csv"
    with open(qfile, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["query", "video_id", "frame_idx", "frame_start", "frame_end", "frames"])
        w.writerow(["first", "vidA", "30", "", "", ""])
        w.writerow(["second", "vidB", "", "", "", "5;6"])
    ds = load_dataset(f"keyframes:{tmp_path / 'gallery'},queries={qfile}")
    assert ds.video_ids == ("vidA", "vidA", "vidB") and ds.frame_idx == (0, 30, 5)
    assert [q.relevant for q in ds.queries] == [(1,), (2,)]
    with pytest.raises(InputError):
        load_dataset(f"keyframes:{tmp_path / 'gallery'}")  # no queries file there


# ---------------------------------------------------------------------------- specs
def test_dataset_spec_round_trip_and_errors(tmp_path):
    s = DatasetSpec.parse("keyframes:/data/aic,queries=/data/q.jsonl")
    assert (s.name, s.path, s.option("queries")) == ("keyframes", "/data/aic", "/data/q.jsonl")
    assert str(DatasetSpec.parse(str(s))) == str(s)
    assert DatasetSpec.parse("cifar10").resolve_path("/root/data").as_posix() == "/root/data/cifar10"
    with pytest.raises(ConfigError, match="choose one of"):
        DatasetSpec.parse("mnist")
    with pytest.raises(ConfigError, match="valid keys"):
        DatasetSpec.parse("cifar10,colour=red")
    with pytest.raises(ConfigError, match="needs a path"):
        DatasetSpec.parse("imagefolder")
    with pytest.raises(InputError, match="not available offline"):
        load_dataset("cifar100", data_root=tmp_path)
