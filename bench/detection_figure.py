"""Detections of the reference detector, unmerged vs merged, on a few synth-detection test pictures.

One row per picture, one column per merge config (the first is ``none``); ground-truth boxes in
white, detections (score >= ``--min-score``) in colour with their label and score::

    python -m bench.detection_figure --data-root ../shared/data --merge none --merge r=8 \
        --merge r=8,method=lsh --pictures 4 --out docs/eval/detection/detections.png

The merged columns run the backbone with ``unmerge=true`` (``detector_reference.merge_backbone``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional


def detection_figure(out: str, merges: List[str], data_root: Optional[str] = None, pictures: int = 4,
                     start: int = 0, min_score: float = 0.3, weights: Optional[str] = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from mergeseek.eval.datasets import load_dataset
    from mergeseek.eval.detector_reference import load_reference_detector
    from mergeseek.runtime import atomic_write

    ds = load_dataset("synth-detection", data_root, limit=start + pictures)
    dets = {m: load_reference_detector(weights, merge=None if m == "none" else m) for m in merges}
    fig, axes = plt.subplots(pictures, len(merges), figsize=(2.6 * len(merges), 2.6 * pictures), squeeze=False)
    for row in range(pictures):
        i = start + row
        img = Image.fromarray(ds.images[i])
        boxes, labels = ds.targets(i)
        for col, (name, det) in enumerate(dets.items()):
            ax = axes[row][col]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            for (x0, y0, x1, y1), lab in zip(boxes, labels):
                ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="white", lw=1.5, ls="--"))
            for label, score, (x0, y0, x1, y1) in det.detect([img], min_score=min_score)[0]:
                colour = plt.cm.tab10(det.labels.index(label))
                ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colour, lw=1.5))
                ax.text(x0, y0, f"{label} {score:.2f}", fontsize=6, color="black", va="bottom",
                        bbox=dict(facecolor=colour, alpha=0.7, pad=0.5, lw=0))
            if row == 0:
                ax.set_title(name, fontsize=8)
    fig.suptitle(f"synth-detection test pictures {start}-{start + pictures - 1}: ground truth dashed white, "
                 f"detections >= {min_score}", fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--merge", action="append", help="merge config per column (repeat); default: none, r=8")
    p.add_argument("--data-root", help="folder with cifar10/, coco_captions/, imagenet_sample/")
    p.add_argument("--pictures", type=int, default=4, help="rows (test pictures)")
    p.add_argument("--start", type=int, default=0, help="first test picture")
    p.add_argument("--min-score", type=float, default=0.3, help="detections below this are not drawn")
    p.add_argument("--weights", help="detector weights (default: eval/reference/reference-detector.pt)")
    p.add_argument("--out", default="docs/eval/detection/detections.png", help="PNG to write")
    a = p.parse_args(argv)
    print(detection_figure(a.out, a.merge or ["none", "r=8"], a.data_root, a.pictures, a.start, a.min_score,
                           a.weights))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
