"""A synthetic HCMC AI Challenge release, laid out with the organisers' folder and file names.

::

    release/
      Keyframes_L21/keyframes/L21_V001/001.jpg ... 004.jpg, L21_V002/001.jpg ... 003.jpg
      Keyframes_L22/keyframes/L22_V001/001.jpg ... 003.jpg, L22_V002/1.jpg 2.jpg   (no map: warns)
      Videos_L21_a/L21_V001.mp4, L21_V002.mp4                (never decoded: not real videos)
      map-keyframes-aic25-b1/map-keyframes/L21_V001.csv, L21_V002.csv, L22_V001.csv
      media-info-aic25-b1/media-info/L21_V001.json, L22_V001.json
      objects-aic25-b1/objects/L21_V001/001.json ...
      clip-features-32-aic25-b1/clip-features-32/L21_V001.npy ...   float16 [n, 512]

Real frame numbers differ from n (``FRAMES``), as in the real maps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# video id -> real frame_idx of keyframes n = 1, 2, ...; fps per video
FRAMES = {
    "L21_V001": [0, 137, 290, 1034],
    "L21_V002": [12, 400, 401],
    "L22_V001": [5, 75, 2999],
}
FPS = {"L21_V001": 25.0, "L21_V002": 30.0, "L22_V001": 25.0}
UNMAPPED = {"L22_V002": 2}  # keyframes without a map
DIM = 512
MEDIA = {
    "L21_V001": {"author": "60 Giây Official", "channel_id": "UC1", "title": "60 Giây Sáng - Ngày 01/08/2024",
                 "description": "Bản tin sáng", "keywords": ["news", "HTV"], "publish_date": "01/08/2024",
                 "watch_url": "https://youtube.com/watch?v=abc123", "length": 1200, "extra_key": 1},
    "L22_V001": {"title": "Thời sự 19h", "watch_url": "https://youtube.com/watch?v=def456", "keywords": "a, b"},
}


def colour(vid: str, n: int) -> tuple:
    h = sum(map(ord, vid)) * 7 + n * 53
    return (h % 256, (h * 3) % 256, (h * 11) % 256)


def pts(vid: str, n: int) -> float:
    return round(FRAMES[vid][n - 1] / FPS[vid], 3)


def make_release(root: Path, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    kf = {"L21": root / "Keyframes_L21" / "keyframes", "L22": root / "Keyframes_L22" / "keyframes"}
    maps = root / "map-keyframes-aic25-b1" / "map-keyframes"
    info = root / "media-info-aic25-b1" / "media-info"
    objs = root / "objects-aic25-b1" / "objects"
    feats = root / "clip-features-32-aic25-b1" / "clip-features-32"
    videos = root / "Videos_L21_a"
    for d in (maps, info, objs, feats, videos):
        d.mkdir(parents=True, exist_ok=True)
    for vid, frames in FRAMES.items():
        vdir = kf[vid[:3]] / vid
        vdir.mkdir(parents=True, exist_ok=True)
        lines = ["n,pts_time,fps,frame_idx"]
        for n, f in enumerate(frames, start=1):
            Image.fromarray(np.full((24, 32, 3), colour(vid, n), np.uint8)).save(vdir / f"{n:03d}.jpg")
            lines.append(f"{n},{pts(vid, n)},{FPS[vid]},{f}")
        (maps / f"{vid}.csv").write_text("\n".join(lines) + "\n")
        np.save(feats / f"{vid}.npy", rng.standard_normal((len(frames), DIM)).astype(np.float16))
    for vid, count in UNMAPPED.items():
        vdir = kf[vid[:3]] / vid
        vdir.mkdir(parents=True, exist_ok=True)
        for n in range(1, count + 1):
            Image.fromarray(np.full((24, 32, 3), colour(vid, n), np.uint8)).save(vdir / f"{n}.jpg")
    for vid, meta in MEDIA.items():
        (info / f"{vid}.json").write_text(json.dumps(meta, ensure_ascii=False))
    for vid in ("L21_V001", "L21_V002"):
        (videos / f"{vid}.mp4").write_bytes(b"not decoded: the release's videos are for playback")
    (objs / "L21_V001").mkdir()
    for n, (names, scores) in {1: (["Person", "Car"], [0.91, 0.2]), 3: (["Dog"], [0.66])}.items():
        boxes = [[0.1, 0.2, 0.5, 0.6]] * len(names)
        (objs / "L21_V001" / f"{n:03d}.json").write_text(json.dumps(
            {"detection_class_entities": names, "detection_scores": [str(s) for s in scores],
             "detection_boxes": [[str(x) for x in b] for b in boxes]}))
    return root
