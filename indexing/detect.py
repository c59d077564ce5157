"""Detected objects of indexed frames: ``cli.py index --detect SPEC`` (issue #31).

A detector is any object with::

    detect(images: list[PIL.Image.Image], min_score: float) -> list[list[(label, score, (x0, y0, x1, y1))]]

one list per image, boxes in that image's pixels, labels as the words a user types after
``search --object``. It may be called from several threads at once (``--detect-workers``).
``--detect`` specs:

* ``reference`` (``reference,merge=r=8``, ``reference,weights=PATH,device=cuda``): the detector
  trained here (``eval.detector_reference``; CIFAR-10 class names);
* ``torchvision:MODEL:WEIGHTS_PATH`` (``,min_size=320,device=cuda``): a torchvision detection model
  (``fasterrcnn_mobilenet_v3_large_fpn``, ``retinanet_resnet50_fpn``, ...) with a weights file the user
  has, COCO category names as labels; ``torchvision:MODEL:random`` builds it with seeded random
  weights (plumbing and tests only: its boxes mean nothing);
* ``package.module:factory`` or ``path/to/file.py:factory``: a user's own factory returning a detector.

Detection runs beside encoding on the kept frames (the OCR stage's pool, ``indexing.ocr.OcrStage``),
and the writer stores each shard's objects right after its commit as ``text/<shard>.objects.parquet``
(``id, entity, score, ymin, xmin, ymax, xmax, width, height, error``; boxes as fractions of the frame,
one row per object, a row with an ``error`` for a frame the detector failed on, no row for a frame
without objects: the file's presence says the shard was read). Files follow their shard like the text
channels (removed with it, carried by ``compact`` and ``merge-index``); shards a killed run (or an
index built without ``--detect``) lacks are detected again from their decoded frames by the next
``index --detect`` run. The index-level ``objects.parquet`` (``indexing.aic``, the AI Challenge form
that ``search --object`` and the web app read) is then brought in line: its rows whose ``detector``
column is empty are the release's (organiser files) and are kept; the detector rows are exactly those
of the live rows' files, nothing twice (:func:`sync_objects`).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np

from mergeseek.errors import ConfigError, InputError, MergeseekError, MissingDependencyError
from mergeseek.indexing.aic import OBJECT_MIN_SCORE, OBJECTS_FILE, _merge_objects
from mergeseek.indexing.text import TextChannel, text_path

log = logging.getLogger(__name__)

CHANNEL = "objects"  # text/<shard>.objects.parquet
Detection = tuple  # (label: str, score: float, (x0, y0, x1, y1) in the image's pixels)


class Detector(Protocol):
    """What ``--detect`` runs (see the module docstring)."""

    def detect(self, images: list, min_score: float = 0.3) -> list[list[Detection]]: ...


@dataclass(frozen=True)
class FrameObjects:
    """What the detector found in one frame: boxes as (x0, y0, x1, y1) pixels of a ``size`` (w, h) frame."""

    objects: tuple = ()
    size: tuple = (0, 0)
    error: str = ""  # why detection failed on this frame ("" when it did not)


class DetectEngine:
    """A detector as an engine of the OCR stage's pool: ``shrink`` (a frame as a PIL RGB image, scale 1)
    and ``read`` (a batch; a failed batch is tried again frame by frame, so one bad frame is reported
    and the others kept). Outputs are checked: a label, a score and four finite numbers per object."""

    def __init__(self, detector: Detector, spec: str, min_score: float = OBJECT_MIN_SCORE):
        if not hasattr(detector, "detect"):
            raise ConfigError(f"--detect {spec!r} gave a {type(detector).__name__}, which has no detect(images, "
                              "min_score) method; see docs/INDEXING.md (Detected objects)")
        if not 0.0 <= float(min_score) <= 1.0:
            raise ConfigError(f"--detect-min-score {min_score} is not in [0, 1]")
        self.detector, self.spec, self.min_score = detector, spec, float(min_score)

    def __str__(self) -> str:
        return self.spec

    def shrink(self, image) -> tuple:
        from PIL import Image

        im = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image))
        return im.convert("RGB"), 1.0

    def read(self, images: Sequence, prescale: Optional[Sequence[float]] = None) -> list[FrameObjects]:
        images = [self.shrink(im)[0] for im in images]
        if not images:
            return []
        try:
            got = self.detector.detect(images, self.min_score)
            if len(got) != len(images):
                raise ValueError(f"{len(got)} results for {len(images)} images")
            return [_checked(per, im.size, self.min_score) for per, im in zip(got, images)]
        except Exception as exc:  # the detector's fault on some frame: find which, keep the rest
            if len(images) == 1:
                return [FrameObjects(size=images[0].size, error=f"detection failed ({_short(exc)})")]
            return [f for im in images for f in self.read([im])]


def _checked(per: Sequence, size: tuple, min_score: float) -> FrameObjects:
    out = []
    w, h = size
    for label, score, box in per:
        x0, y0, x1, y1 = (float(v) for v in box)
        score = float(score)
        if not np.isfinite([score, x0, y0, x1, y1]).all():
            raise ValueError(f"a non-finite score or box for {label!r}")
        if score >= min_score:
            out.append((str(label), score, (min(max(x0, 0.0), w), min(max(y0, 0.0), h),
                                            min(max(x1, 0.0), w), min(max(y1, 0.0), h))))
    return FrameObjects(tuple(out), (int(w), int(h)))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:160]


# ---------------------------------------------------------------------------- specs
def get_detector(spec: Optional[str], min_score: float = OBJECT_MIN_SCORE) -> Optional[DetectEngine]:
    """``--detect`` value -> a ``DetectEngine`` (None for None / ``none``). Everything a run needs is
    checked here, before any work: a missing package (``MissingDependencyError``), a missing weights file
    or plug-in file (``InputError``), an unknown model or a bad option (``ConfigError``), one line each."""
    from mergeseek.options import parse_options

    if spec is None or spec.strip().lower() in ("", "none", "off"):
        return None
    spec = spec.strip()
    parsed = parse_options(spec, "detect", ("merge", "weights", "device", *TORCHVISION_KEYS), head="always", brackets=True)
    head, opts = (parsed.head or ""), {k: v.strip("()[]") for k, v in parsed.pairs}
    _check_device(spec, opts.get("device", "cpu"))
    if head == "reference":
        detector = _reference(opts)
    elif head.startswith("torchvision:"):
        detector = _torchvision(head[len("torchvision:"):], opts)
    elif ":" in head:
        if opts:
            raise ConfigError(f"--detect {spec!r}: a plug-in takes no options ({', '.join(opts)}); read them in its factory")
        detector = _plugin(head)
    else:
        raise ConfigError(f"--detect {spec!r}: unknown detector; give reference, torchvision:MODEL:WEIGHTS_PATH, "
                          "package.module:factory or path/to/file.py:factory")
    return DetectEngine(detector, spec, min_score)


def _check_device(spec: str, device: str) -> None:
    if device == "cpu":
        return
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise ConfigError(f"--detect {spec!r}: device={device} is not available here; give device=cpu"
                          + (" (this machine has no CUDA device)" if device.startswith("cuda") else " or device=cuda"))


def _reference(opts: dict) -> Detector:
    extra = set(opts) - {"merge", "weights", "device"}
    if extra:  # (the torchvision options)
        raise ConfigError(f"--detect reference takes merge=, weights=, device=; not {', '.join(sorted(extra))}")
    try:
        from mergeseek.eval.detector_reference import load_reference_detector
    except ImportError as exc:
        raise MissingDependencyError(f"--detect reference needs mergeseek.eval.detector_reference ({exc}); "
                                     "update mergeseek, or use torchvision:MODEL:WEIGHTS_PATH") from None
    merge = opts.get("merge") or None  # missing weights: WeightsUnavailableError, saying how to train them
    return load_reference_detector(opts.get("weights") or None, merge=None if merge in (None, "none") else merge,
                                   device=opts.get("device", "cpu"))


def _plugin(target: str) -> Detector:
    where, _, name = target.rpartition(":")
    if not where or not name.isidentifier():
        raise ConfigError(f"--detect {target!r}: write package.module:factory or path/to/file.py:factory")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise InputError(f"--detect {target!r}: {path} does not exist; give the file that defines {name}()")
        mod_name = f"mergeseek_detect_plugin_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except ImportError as exc:
            raise MissingDependencyError(f"--detect {target!r}: {path} needs a package that is missing ({exc}); "
                                         f"pip install {exc.name or 'it'}") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            missing = getattr(exc, "name", None) or where
            raise MissingDependencyError(f"--detect {target!r}: cannot import {missing} ({_short(exc)}); pip install "
                                         f"the package that provides it, or give path/to/file.py:{name}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConfigError(f"--detect {target!r}: {where} has no callable {name!r}")
    try:
        return factory()
    except MergeseekError:
        raise
    except Exception as exc:  # the user's code: one line saying where, not a traceback
        raise ConfigError(f"--detect {target!r}: {name}() failed ({_short(exc)})") from None


# ---------------------------------------------------------------------------- torchvision
TORCHVISION_KEYS = ("min_size", "max_size", "box_score_thresh", "score_thresh")  # passed to the model's builder


def _torchvision(rest: str, opts: dict) -> Detector:
    model, _, weights = rest.partition(":")
    extra = set(opts) - {"device", *TORCHVISION_KEYS}
    if extra:
        raise ConfigError(f"--detect torchvision:... takes device= and {'=, '.join(TORCHVISION_KEYS)}= (builder options); "
                          f"not {', '.join(sorted(extra))}")
    try:
        import torchvision.models.detection as tvd
        from torchvision.models import get_model_builder, get_model_weights, list_models
    except ImportError:
        raise MissingDependencyError("--detect torchvision:... needs torchvision: pip install torchvision") from None
    names = list_models(module=tvd)
    if model not in names:
        raise ConfigError(f"--detect torchvision:{model!r}: not a torchvision detection model; choose one of "
                          f"{', '.join(sorted(n for n in names if 'keypoint' not in n and 'mask' not in n))}")
    if not weights:
        raise ConfigError(f"--detect torchvision:{model}: give the weights file, torchvision:{model}:PATH (a state dict "
                          f"saved from torchvision, e.g. {get_model_weights(model).DEFAULT.url.rsplit('/', 1)[-1]}), "
                          "or :random for seeded random weights (tests only)")
    if weights != "random" and not Path(weights).expanduser().is_file():
        raise InputError(f"--detect torchvision:{model}:{weights}: no such weights file; download "
                         f"{get_model_weights(model).DEFAULT.url} once and give its path")
    try:
        kw = {k: (int(v) if k.endswith("size") else float(v)) for k, v in opts.items() if k in TORCHVISION_KEYS}
    except ValueError:
        raise ConfigError(f"--detect torchvision:{model}: {', '.join(TORCHVISION_KEYS)} take numbers") from None
    try:
        return TorchvisionDetector(get_model_builder(model), get_model_weights(model).DEFAULT.meta["categories"],
                                   None if weights == "random" else Path(weights).expanduser(), opts.get("device", "cpu"), kw)
    except TypeError as exc:  # an option this model's builder does not take
        raise ConfigError(f"--detect torchvision:{model}: {_short(exc)}; drop that option") from None


class TorchvisionDetector:
    """A torchvision detection model (Faster R-CNN, RetinaNet, FCOS, SSD...) behind ``detect``.

    Args:
        builder: the model's builder (``torchvision.models.get_model_builder(name)``).
        categories: label of each class index (COCO's 91, with ``__background__`` and ``N/A``).
        weights: a state dict file; None: random weights from seed 0 (its boxes mean nothing).
        device: where it runs.
        kwargs: builder options such as ``min_size`` / ``max_size`` (the input scale).
    """

    def __init__(self, builder: Callable, categories: Sequence[str], weights: Optional[Path], device: str = "cpu",
                 kwargs: Optional[dict] = None):
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = builder(weights=None, weights_backbone=None, num_classes=len(categories), **(kwargs or {}))
        if weights is not None:
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True)
                self.model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
            except (RuntimeError, OSError, ValueError, KeyError) as exc:
                raise InputError(f"--detect: {weights} is not a state dict of this model ({_short(exc)})") from None
        self.model.eval().to(device)
        self.labels, self.device = tuple(categories), device

    def detect(self, images: list, min_score: float = 0.3) -> list[list[Detection]]:
        import torch
        from torchvision.transforms.functional import pil_to_tensor

        with torch.inference_mode():
            outs = self.model([pil_to_tensor(im).to(self.device, torch.float32) / 255.0 for im in images])
        return [[(self.labels[int(c)], float(s), tuple(float(v) for v in b))
                 for b, s, c in zip(o["boxes"].cpu(), o["scores"].cpu(), o["labels"].cpu()) if float(s) >= min_score]
                for o in outs]


# ---------------------------------------------------------------------------- per-shard files
def write_objects(root: Path, shard: str, ids: np.ndarray, frames: Sequence[FrameObjects], detector: str = "") -> Path:
    """Write one shard's objects (``frames[i]``: the ``FrameObjects`` of row ``ids[i]``; ``detector``: the
    spec that found them, kept in the file's metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mergeseek.runtime import atomic_write

    rows = []
    for i, f in zip(ids, frames):
        w, h = (max(1, int(v)) for v in f.size)
        if f.error:
            rows.append((int(i), "", float("nan"), *[float("nan")] * 4, w, h, f.error))
        for label, score, (x0, y0, x1, y1) in f.objects:
            rows.append((int(i), label, score, y0 / h, x0 / w, y1 / h, x1 / w, w, h, ""))
    cols = list(zip(*rows)) if rows else [[]] * 10
    table = pa.table({name: pa.array(list(c), t) for name, c, t in zip(
        ("id", "entity", "score", "ymin", "xmin", "ymax", "xmax", "width", "height", "error"), cols,
        (pa.int64(), pa.string(), *[pa.float64()] * 5, pa.int32(), pa.int32(), pa.string()))})
    table = table.replace_schema_metadata({"detector": detector})
    path = text_path(root, shard, CHANNEL)
    path.parent.mkdir(exist_ok=True)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return path


def read_objects_file(root: Path, shard: str):
    """The objects table of ``shard`` (None when it has none or it is unreadable: detected again)."""
    import pyarrow.parquet as pq

    path = text_path(root, shard, CHANNEL)
    if not path.is_file():
        return None
    try:
        return pq.read_table(path)
    except Exception as exc:  # derived from the frames: the next --detect run makes it again
        log.warning("%s is unreadable (%s); the next `index --detect` run detects that shard again", path, exc)
        return None


def stored_objects(store) -> dict:
    """id -> ``FrameObjects`` of every live row of the shards of ``store`` that have an objects file
    (frames without objects included), for ``merge-index``."""
    out: dict = {}
    for shard in store.shard_names():
        t = read_objects_file(store.root, shard)
        if t is None:
            continue
        out.update({i: FrameObjects() for i in store.read_shard(shard, columns=["id"]).column("id").to_pylist()})
        for r in t.to_pylist():
            f = out.get(r["id"])
            if f is None:
                continue  # a dead row
            w, h = r["width"], r["height"]
            if r["error"]:
                out[r["id"]] = FrameObjects(f.objects, (w, h), r["error"])
            else:
                box = (r["xmin"] * w, r["ymin"] * h, r["xmax"] * w, r["ymax"] * h)
                out[r["id"]] = FrameObjects(f.objects + ((r["entity"], r["score"], box),), (w, h), f.error)
    return out


def merge_channel(stores: Sequence) -> Optional["ObjectChannel"]:
    """``merge-index``: a channel carrying the inputs' objects (None when no input has any), named after
    the detector of the first input file found."""
    for st in stores:
        for shard in st.shard_names():
            if text_path(st.root, shard, CHANNEL).is_file():
                import pyarrow.parquet as pq

                meta = pq.read_schema(text_path(st.root, shard, CHANNEL)).metadata or {}
                return ObjectChannel(meta.get(b"detector", b"").decode())
    return None


def export_columns(root: Path, meta) -> dict:
    """``export``: an ``objects`` column (entity, score, box of each object of the row's frame, from
    ``objects.parquet``: the release's and the detector's) when the index has objects; else {}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(root) / OBJECTS_FILE
    if not path.is_file():
        return {}
    by_frame: dict = {}
    for r in pq.read_table(path).to_pylist():
        by_frame.setdefault((r["video_id"], r["frame_idx"]), []).append(
            {k: r[k] for k in ("entity", "score", "ymin", "xmin", "ymax", "xmax")})
    keys = zip(meta.column("video_id").to_pylist(), meta.column("frame_idx").to_pylist())
    kind = pa.list_(pa.struct([("entity", pa.string()), *[(k, pa.float64()) for k in ("score", "ymin", "xmin", "ymax", "xmax")]]))
    return {"objects": pa.array([by_frame.get(k, []) for k in keys], kind)}


class ObjectChannel(TextChannel):
    """The writer's side channel of ``--detect``: per source, the frames' ``FrameObjects`` (or futures of
    them) in row order, written as ``text/<shard>.objects.parquet`` right after the shard's commit."""

    def __init__(self, engine=None):
        super().__init__(CHANNEL, engine)

    def store(self, root: Path, shard: str, ids: np.ndarray, frames: Sequence) -> None:
        write_objects(root, shard, ids, frames, str(self.engine or ""))


# ---------------------------------------------------------------------------- after a run
def ensure_objects(store, engine: DetectEngine) -> tuple[int, list]:
    """Detect the live rows of every shard that has no objects file (a run killed between a commit and
    its objects, an index built without ``--detect``), decoding their frames again. Returns (frames
    detected, [(source key, reason)])."""
    from mergeseek.indexing.thumbs import iter_decoded

    kinds = {k: e.kind for k, e in store.manifest.sources.items()}
    done, failed = 0, []
    for shard in store.shard_names():
        if text_path(store.root, shard, CHANNEL).is_file():
            continue
        rows = store.read_shard(shard, columns=["id", "frame_idx", "path", "source"]).to_pylist()
        rows.sort(key=lambda r: (r["source"], r["frame_idx"]))
        ids, frames = [], []
        for key in dict.fromkeys(r["source"] for r in rows):
            mine = [r for r in rows if r["source"] == key]
            got: list = []
            try:
                for chunk in iter_decoded(kinds.get(key, "video"), key, np.asarray([r["frame_idx"] for r in mine]),
                                          [r["path"] for r in mine], lambda im: engine.shrink(im)[0]):
                    got += engine.read(chunk)
            except Exception as exc:  # a moved or broken source: its rows get an error, the others objects
                failed.append((key, f"cannot be decoded again for --detect ({_short(exc)})"))
                got += [FrameObjects(error=_short(exc))] * (len(mine) - len(got))
            failed += [(key, f"frame {r['frame_idx']}: {f.error}") for r, f in zip(mine, got) if f.error]
            ids += [r["id"] for r in mine]
            frames += got
        write_objects(store.root, shard, np.asarray(ids, np.int64), frames, str(engine))
        done += len(frames)
    return done, failed


def drop_foreign_objects(store) -> int:
    """Remove objects files holding ids that are not rows of their shard (left by a killed run under a
    name a later shard took); they are detected again. Returns how many."""
    removed = 0
    for shard in store.shard_names():
        t = read_objects_file(store.root, shard)
        if t is None:
            continue
        rows = set(store.read_shard(shard, columns=["id"], live=False).column("id").to_pylist())
        if not set(t.column("id").to_pylist()) <= rows:
            text_path(store.root, shard, CHANNEL).unlink(missing_ok=True)
            removed += 1
    return removed


def carry_objects(root: Path, old: str, new: str, ids: np.ndarray) -> int:
    """Copy the objects rows of ``ids`` from shard ``old``'s file to shard ``new``'s (``compact``)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from mergeseek.runtime import atomic_write

    t = read_objects_file(root, old)
    if t is None:
        return 0
    kept = t.filter(pc.is_in(t.column("id"), value_set=pa.array(np.asarray(ids, np.int64))))
    atomic_write(text_path(root, new, CHANNEL), lambda tmp: pq.write_table(kept, tmp))
    return kept.num_rows


def sync_objects(store, detector: str = "") -> dict:
    """Bring ``objects.parquet`` in line with the objects files of the live rows: the release's rows
    (empty ``detector``) are kept, the detector's are replaced by exactly those of the files (rows of
    keyframe folders take their keyframe number as ``n``, others -1). ``detector``: the spec recorded
    for rows of this run's files (earlier rows keep theirs)."""
    import pyarrow.parquet as pq

    root = Path(store.root)
    path = root / OBJECTS_FILE
    rows, kinds, detected = [], {k: e.kind for k, e in store.manifest.sources.items()}, False
    for shard in store.shard_names():
        t = read_objects_file(root, shard)
        if t is None:
            continue
        detected = True
        meta = {r["id"]: r for r in store.read_shard(shard, columns=["id", "video_id", "frame_idx", "path", "source"]).to_pylist()}
        spec = (t.schema.metadata or {}).get(b"detector", detector.encode()).decode()
        for r in t.to_pylist():
            m = meta.get(r["id"])
            if m is None or r["error"]:
                continue  # a dead row (its source was indexed again elsewhere) or a failed frame
            stem = Path(m["path"] or "").stem
            n = int(stem) if kinds.get(m["source"]) == "keyframes" and stem.isdigit() else -1
            rows.append((m["video_id"], n, m["frame_idx"], r["entity"], r["score"], r["ymin"], r["xmin"], r["ymax"],
                         r["xmax"], spec))
    had = path.is_file() and "detector" in pq.read_schema(path).names and any(
        pq.read_table(path, columns=["detector"]).column("detector").to_pylist())  # detector rows to replace
    if not rows and not had and (path.is_file() or not detected):
        return {"objects": 0}  # (a detector that found nothing still leaves an objects.parquet: search says so)
    return {"objects": len(rows), "objects_total": _merge_objects(root, rows, set(), replace_detector=True)}


def attach_channel(writer, engine: Optional[DetectEngine]) -> None:
    """Give ``writer`` (an ``IndexWriter``) the ``--detect`` side channel of ``engine`` (none for None)."""
    if engine is not None:
        writer.channels.append(ObjectChannel(engine))


def channel_of(writer) -> Optional[ObjectChannel]:
    """The ``--detect`` side channel of ``writer``, None when the run does not detect."""
    return next((c for c in writer.channels if isinstance(c, ObjectChannel)), None)


def finish_objects(writer, engine: Optional[DetectEngine], failed: Optional[list] = None) -> dict:
    """The end of an ``index`` run: drop foreign files, detect what is missing (with ``--detect``) and sync
    ``objects.parquet``. Frames that failed go to ``failed`` (``BadInput``); returns the report's counts."""
    from mergeseek.indexing.sources import BadInput

    t0, store, channel = time.perf_counter(), writer.store, channel_of(writer)
    drop_foreign_objects(store)
    again, bad = ensure_objects(store, engine) if engine is not None else (0, [])
    counts = sync_objects(store, str(engine) if engine is not None else "")
    if engine is None:
        return {}
    bad = (channel.failed if channel is not None else []) + bad
    if failed is not None:
        failed += [BadInput(key, f"--detect: {reason}") for key, reason in bad]
    return {"detector": str(engine), "frames": (channel.frames if channel is not None else 0) + again,
            "detected_again": again, "failed_frames": len(bad), "rows": counts.get("objects", 0),
            "busy_s": round((channel.busy_s if channel is not None else 0.0) + time.perf_counter() - t0, 3)}


def report_lines(objects: dict) -> list[str]:
    if not objects:
        return []
    o = objects
    return [f"objects ({o['detector']}): {o['frames']} frame(s) detected ({o['detected_again']} again for shards that "
            f"had none), {o['rows']} object(s) in objects.parquet; busy {o['busy_s']:.1f}s"]


__all__ = ["DetectEngine", "Detector", "FrameObjects", "ObjectChannel", "TorchvisionDetector", "attach_channel",
           "carry_objects", "channel_of",
           "drop_foreign_objects", "ensure_objects", "export_columns", "finish_objects", "get_detector", "merge_channel",
           "stored_objects", "sync_objects",
           "write_objects"]
