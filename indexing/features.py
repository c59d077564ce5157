"""``cli.py import-features``: an index from the AI Challenge's released CLIP features.

The organisers ship ``clip-features-32/<video_id>.npy`` per video (row i = keyframe n = i + 1).
Nothing is encoded: each file's rows become the rows of one source, with frame_idx and pts_time
from the video's keyframe map, written through the one ingest writer (``indexing.writer``). The
release layout itself (finding the parts, per-video metadata) is ``indexing.aic``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from mergeseek.errors import InputError
from mergeseek.indexing.aic import ReleaseParts, find_release, unmapped_warning, write_sidecars
from mergeseek.indexing.formats import read_keyframe_map
from mergeseek.indexing.sources import BadInput, MediaSource, _images_in
from mergeseek.indexing.store import EncodedSource
from mergeseek.indexing.writer import IndexWriter

log = logging.getLogger(__name__)

COMMIT_ROWS = 65536  # import-features commits a shard every this many rows

def import_features(paths: Sequence[Path], index_dir: Path, model: str = "ViT-B-32", pretrained: str = "openai",
                    overrides: dict | None = None, force: bool = False, index_type: str | None = None,
                    ngpu: int = -1):
    """Build (or extend) an index from the organisers' ``clip-features-32/<video_id>.npy`` files.

    Nothing is encoded: row i of a file is keyframe n = i + 1, whose frame_idx and pts_time come
    from the video's map and whose path is its keyframe image (when the keyframes are there). The
    vectors are the file's, L2-normalised, as float32. The index records ``model``/``pretrained``
    so that text queries use the matching text tower.

    Returns: an ``indexing.pipeline.IndexReport``.
    """
    import time

    from mergeseek.indexing.pipeline import IndexReport

    t0 = time.perf_counter()
    videos = _feature_videos(paths, overrides)
    report = IndexReport(str(index_dir), sources_found=len(videos))
    if not videos:
        where = ", ".join(str(p) for p in paths)
        raise InputError(f"no clip-features .npy files found under {where}; expected "
                         "clip-features-32*/clip-features-32/<video_id>.npy, or pass --features DIR")
    dim = _model_dim(model) or _first_good_dim(videos)
    identity = {"model": model, "pretrained": pretrained, "merge": "none", "precision": "fp32", "dim": dim}
    recipe = "clip-features;dedup=off"
    with IndexWriter(Path(index_dir), identity, index_type=index_type, force=force, ngpu=ngpu,
                     settings={"sampling": "all", "dedup": "off"}, shard_rows=COMMIT_ROWS) as writer:
        for vid, parts, npy in videos:
            source = MediaSource.features(npy, vid, parts.keyframe_dir_for(vid), parts.map_for(vid))
            key, fingerprint = source.key, source.fingerprint
            if writer.is_current(key, fingerprint, recipe):
                report.up_to_date += 1
                continue
            try:
                writer.add(_feature_source(vid, parts, npy, key, fingerprint, recipe, identity["dim"], report))
            except InputError as exc:
                log.warning("skip %s", exc)
                report.failed.append(BadInput(str(npy), str(exc)))
                continue
            writer.commit_if_due()  # COMMIT_ROWS rows per shard bounds memory on a whole release
        writer.finish()
        report.indexed = list(writer.stats.video_ids)
        report.frames_sampled = report.frames_encoded = writer.stats.rows
        report.times.write_s, report.times.faiss_s = writer.stats.write_s, writer.stats.faiss_s
        report.vectors_total = writer.manifest.counts()["vectors"]
        by_video = {vid: parts for vid, parts, _ in videos if vid in set(report.indexed)}
        report.metadata = write_sidecars(Path(index_dir), by_video) if by_video else {}
    report.times.wall_s = time.perf_counter() - t0
    if not report.indexed and not report.up_to_date:
        raise InputError(f"nothing could be imported: {len(report.failed)} feature file(s) failed "
                         f"({'; '.join(b.reason for b in report.failed[:3])})")
    return report


MAX_FEATURE_ROWS = 1_000_000  # keyframes of one video: a header claiming more is refused before loading


def _model_dim(model: str) -> int | None:
    """The embedding width of an open_clip model from its config (no weights loaded); None if unknown."""
    try:
        import open_clip

        cfg = open_clip.get_model_config(model)
    except Exception:  # open_clip missing or an odd name: the files decide
        return None
    dim = (cfg or {}).get("embed_dim")
    return int(dim) if isinstance(dim, int) and dim > 0 else None


def _first_good_dim(videos: list) -> int:
    """The width of the first feature file whose header is valid (a model open_clip does not know)."""
    problems = []
    for _, _, npy in videos:
        try:
            return int(_npy_header(npy, None)[0][1])
        except InputError as exc:
            problems.append(str(exc))
    raise InputError(f"no feature file could be read ({'; '.join(problems[:3])})")


def _npy_header(npy: Path, dim: int | None) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, data offset) from a .npy header, checked before any row is read: a 2-D float
    array of ``dim`` columns whose rows fit the file and are at most ``MAX_FEATURE_ROWS``."""
    try:
        with open(npy, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh, max_header_size=10000)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh, max_header_size=10000)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            offset = fh.tell()
        size = os.path.getsize(npy)
    except (OSError, ValueError, SyntaxError) as exc:
        reason = (exc.strerror if isinstance(exc, OSError) else str(exc).splitlines()[0]) or type(exc).__name__
        raise InputError(f"{npy}: not a readable .npy file ({reason[:120]})") from None
    if dtype.hasobject or dtype.kind != "f":
        raise InputError(f"{npy}: holds {dtype} values (pickled objects are never loaded); expected float features")
    if len(shape) != 2 or (dim is not None and shape[1] != dim) or shape[1] < 1:
        want = f"[keyframes, {dim}]" if dim is not None else "[keyframes, dim]"
        raise InputError(f"{npy}: shape {tuple(shape)}, expected {want} (the model's embedding width)")
    if shape[0] > MAX_FEATURE_ROWS:
        raise InputError(f"{npy}: claims {shape[0]} rows; one video has at most {MAX_FEATURE_ROWS} keyframes")
    need = offset + int(shape[0]) * int(shape[1]) * dtype.itemsize
    if size != need:
        raise InputError(f"{npy}: {size} bytes but its header needs {need} ({'truncated' if size < need else 'extra bytes'}); "
                         "re-download it")
    return tuple(shape), dtype, offset


def _feature_videos(paths: Sequence[Path], overrides: dict | None) -> list[tuple[str, ReleaseParts, Path]]:
    out, seen = [], set()
    for raw in paths:
        root = Path(raw).expanduser().resolve()
        if not root.exists():
            raise InputError(f"{raw} does not exist; pass the root of the extracted release")
        parts = find_release(root, overrides)
        feature_dirs = parts.features or ((root,) if root.is_dir() and any(root.glob("*.npy")) else ())
        if not parts.features and feature_dirs:
            parts = replace(parts, features=feature_dirs, _cache={})
        for d in feature_dirs:
            for npy in sorted(d.glob("*.npy")):
                if npy.stem not in seen:
                    seen.add(npy.stem)
                    out.append((npy.stem, parts, npy))
    return out


def _feature_source(vid: str, parts: ReleaseParts, npy: Path, key: str, fingerprint: str, recipe: str, dim: int,
                    report):
    _npy_header(npy, dim)  # shape, type and size checked before a row is read
    try:
        arr = np.load(npy, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{npy}: not a readable .npy file ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from None
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise InputError(f"{npy}: shape {arr.shape}, but the index has dim {dim}; all feature files must be [n, {dim}]")
    vecs = arr.astype(np.float32)
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    if not np.all(np.isfinite(vecs)) or np.any(norms == 0):
        raise InputError(f"{npy}: has rows that are zero or not finite; re-download the features")
    vecs /= norms
    n_rows = len(vecs)
    mp = parts.map_for(vid)
    kmap = read_keyframe_map(mp) if mp is not None else None
    if kmap is None:
        log.warning("%s", unmapped_warning(vid, npy))
        report.unmapped.append(vid)
    elif len(kmap) != n_rows:
        raise InputError(f"{npy} has {n_rows} rows but {mp} has {len(kmap)} keyframes; they must match (row i = n i+1)")
    kf = parts.keyframe_dir_for(vid)
    images = {int(p.stem): p for p in _images_in(kf) if p.stem.isdigit()} if kf is not None else {}
    frame_idx, pts, paths = [], [], []
    for i in range(n_rows):
        n = i + 1
        if kmap is not None:
            if n not in kmap:
                raise InputError(f"{mp} has no row n={n} but {npy} has {n_rows} rows; the map is incomplete")
            frame_idx.append(kmap[n].frame_idx)
            pts.append(kmap[n].pts_time)
        else:
            frame_idx.append(n)
            pts.append(math.nan)
        paths.append(str(images[n]) if n in images else "")
    return EncodedSource(key=key, video_id=vid, kind="keyframes", fingerprint=fingerprint, recipe=recipe,
                         frame_idx=np.asarray(frame_idx, np.int64), pts_time=np.asarray(pts, np.float64),
                         paths=paths, hashes=np.zeros(n_rows, np.int64), vectors=vecs)
