"""Where merging pays on audio: which spectrogram patches the trained speech reference merges.

    python -m bench.merge_map --merge r=8 --merge r=16 --png docs/img/speech-merges.png \
        --out docs/eval/reference-speech/merge-reading.json

Two outputs, both from the trained ``reference-speech`` weights on the ``speech-words`` test split:

* ``--png``: a few test clips (``--words``), one row each: the log-mel with its "word" patches
  outlined, then one panel per ``--merge`` config where every patch is coloured by the merged
  token it ended in after the last block (patches left alone stay grey; lines part the groups),
  like ToMe's merge visualisations.
* ``--out`` (JSON) and the printed table, over every test clip: per config and block, the
  fraction of word patches and of background (silence / stationary noise) patches that sit in a
  merged token (one standing for 2 or more patches), the mean size of the token a patch of each
  kind ends in, and how many word patches end in a token whose patches are mostly background.

Which patch is "word": its mean log-mel is more than ``--margin`` nats (default 1.0) above the
median of its frequency row over the clip (the row's 16 time positions). The noise of the set is
stationary (white or a steady hum) and a word fills less than half of a clip, so a row's median is
its background level; the rest is silence or stationary noise. Groups are found by running the
patched model and merging a one-hot column per patch with each block's own merge (``mode="sum"``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)


def merge_groups(model, x, cfg) -> Tuple["object", List["object"]]:
    """Run ``model`` (a timm ViT or any model ``apply_merging`` takes) merged with ``cfg`` on ``x``.

    Returns (output, memberships): one [B, tokens, N] tensor per block, row t = which of the N
    input tokens token t stands for (0/1 entries; each column sums to 1).
    """
    import torch

    from mergeseek.encoders import apply_merging, merge_stats, remove_merging
    from mergeseek.encoders.family import vit_family

    apply_merging(model, cfg)
    root = vit_family(model).root
    results = []
    plan = root._merge_plan
    matcher = plan().matcher

    def recording(*args, **kwargs):
        result = matcher(*args, **kwargs)
        results.append(result)
        return result

    root._merge_plan = lambda: dataclasses.replace(plan(), matcher=recording)
    try:
        with torch.inference_mode():
            out = model(x)
        requested = merge_stats(model)["requested"]
    finally:
        del root._merge_plan
        remove_merging(model)
    n = vit_family(model).tokens_in()
    member = torch.eye(n, dtype=torch.float64).expand(x.shape[0], n, n)
    steps, pending = [], iter(results)
    for r in requested:  # a block runs its matcher only when its r > 0
        result = next(pending) if r > 0 else None
        if result is not None and not result.identity:
            member = result.merge(member, mode="sum")
        steps.append(member)
    return out, steps


def word_patches(features: np.ndarray, patch: int, margin: float = 1.0) -> np.ndarray:
    """bool [B, (F / patch) * (T / patch)] in token order: patches louder than ``margin`` nats over
    the median of their frequency row (see the module text)."""
    b, f, t = features.shape
    means = features.astype(np.float64).reshape(b, f // patch, patch, t // patch, patch).mean(axis=(2, 4))
    return (means - np.median(means, axis=2, keepdims=True) > margin).reshape(b, -1)


def groups_of(member) -> np.ndarray:
    """int [B, N]: the token each input patch ended in."""
    return member.argmax(dim=1).numpy()


def reading(steps: Sequence, word: np.ndarray) -> List[Dict[str, float]]:
    """Per block: merged fractions and mean token sizes of word vs background patches (see module text)."""
    rows = []
    background = ~word
    for i, member in enumerate(steps):
        m = member.numpy()
        group = m.argmax(axis=1)  # [B, N]
        sizes = m.sum(axis=2)  # [B, tokens]
        own = np.take_along_axis(sizes, group, axis=1)  # size of each patch's token
        words_in = np.einsum("btn,bn->bt", m, word.astype(np.float64))
        word_share = np.take_along_axis(words_in / np.maximum(sizes, 1), group, axis=1)
        rows.append({
            "block": i,
            "tokens": int(m.shape[1]),
            "word_merged": float((own[word] > 1).mean()),
            "background_merged": float((own[background] > 1).mean()),
            "word_token_size": float(own[word].mean()),
            "background_token_size": float(own[background].mean()),
            "word_in_mostly_background": float((word_share[word] < 0.5).mean()),
        })
    return rows


def _load(model_name: str, data_root: str):
    from mergeseek.eval.config import default_data_root
    from mergeseek.eval.datasets.speech import WORDS, load_split
    from mergeseek.eval.speech_reference import load_speech_reference

    model, cfg = load_speech_reference(model_name)
    root = Path(data_root) if data_root else default_data_root() / "speech_words"
    split = load_split(root, "test")
    return model, cfg, split, WORDS


def run(merges: Sequence[str], model_name: str = "reference-speech", data_root: str = "", margin: float = 1.0,
        batch_size: int = 96) -> Dict:
    """The reading over the whole test split, per config."""
    import torch

    from mergeseek.eval.speech_reference import scale

    model, cfg, split, _ = _load(model_name, data_root)
    word = word_patches(split.features, cfg.patch_size, margin)
    report = {"model": model_name, "clips": int(len(split.labels)), "patches": int(word.shape[1]), "margin_nats": margin,
              "word_patch_share": float(word.mean()), "configs": {}}
    for spec in merges:
        blocks, correct = None, 0
        for s in range(0, len(split.labels), batch_size):
            x = scale(torch.from_numpy(split.features[s:s + batch_size].astype(np.float32))[:, None], cfg)
            out, steps = merge_groups(model, x, spec)
            correct += int((out.argmax(-1).numpy() == split.labels[s:s + batch_size]).sum())
            rows = reading(steps, word[s:s + batch_size])
            n = len(x)
            blocks = [{k: v * n for k, v in r.items()} for r in rows] if blocks is None else [
                {k: a[k] + v * n for k, v in r.items()} for a, r in zip(blocks, rows)]
        total = len(split.labels)
        report["configs"][spec] = {"top1": correct / total,
                                   "blocks": [{k: (round(v / total) if k in ("block", "tokens") else v / total)
                                               for k, v in b.items()} for b in blocks]}
    return report


def picture(merges: Sequence[str], png: Path, words: Sequence[str], model_name: str = "reference-speech",
            data_root: str = "", margin: float = 1.0, pick: int = 0) -> None:
    """The PNG: one row per word (row i: its test clip ``pick + 5 i``, so the rows hear different
    voices), the spectrogram then one panel per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from mergeseek.eval.speech_reference import scale
    from mergeseek.runtime import atomic_write

    model, cfg, split, names = _load(model_name, data_root)
    idx = []
    for row, w in enumerate(words):  # the rows rotate through the voices: clip pick + 5 * row of each word
        of_word = np.flatnonzero(split.labels == names.index(w))
        idx.append(int(of_word[(pick + 5 * row) % len(of_word)]))
    feats = split.features[idx].astype(np.float32)
    word = word_patches(feats, cfg.patch_size, margin)
    x = scale(torch.from_numpy(feats)[:, None], cfg)
    p, fp, tp = cfg.patch_size, cfg.n_mels // cfg.patch_size, cfg.frames // cfg.patch_size
    cols = 1 + len(merges)
    fig, axes = plt.subplots(len(idx), cols, figsize=(4.2 * cols, 2.1 * len(idx)), squeeze=False)
    palette = plt.get_cmap("tab20")
    for c, spec in enumerate([None, *merges]):
        if spec is not None:
            out, steps = merge_groups(model, x, spec)
            member = steps[-1].numpy()
            pred = out.argmax(-1).numpy()
        for row, i in enumerate(idx):
            ax = axes[row, c]
            ax.imshow(feats[row], origin="lower", aspect="auto", cmap="gray", extent=(0, cfg.frames, 0, cfg.n_mels))
            if spec is None:
                _outline(ax, word[row].reshape(fp, tp), p, "#ffcc00")
                ax.set_title(f"'{words[row]}' ({split.voices[i]}): {int(word[row].sum())} word patches", fontsize=8)
            else:
                group = member[row].argmax(axis=0).reshape(fp, tp)
                size = member[row].sum(axis=1)[group]
                overlay = np.zeros((fp, tp, 4))
                for g in np.unique(group):
                    if member[row, g].sum() > 1:
                        overlay[group == g] = (*palette(int(g) % 20)[:3], 0.6)
                ax.imshow(overlay, origin="lower", aspect="auto", extent=(0, cfg.frames, 0, cfg.n_mels), interpolation="nearest")
                _boundaries(ax, group, p)
                w = word[row].reshape(fp, tp)
                ax.set_title(f"{spec}: {int(member.shape[1])} tokens; merged: word {np.mean(size[w] > 1):.0%}, "
                             f"background {np.mean(size[~w] > 1):.0%}; says '{names[pred[row]]}'", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[-1, c].set_xlabel("time (10 ms frames)" if spec is None else "patches coloured by merged token", fontsize=8)
    axes[0, 0].set_ylabel("mel band", fontsize=8)
    fig.suptitle(f"{model_name}: which 8x8 log-mel patches merge after the last block (test clips, unseen voices; "
                 f"yellow = word patches, > {margin:g} nat over their band's median)", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def _outline(ax, mask: np.ndarray, p: int, colour: str) -> None:
    from matplotlib.patches import Rectangle

    for fi, ti in zip(*np.nonzero(mask)):
        ax.add_patch(Rectangle((ti * p, fi * p), p, p, fill=False, edgecolor=colour, linewidth=0.8))


def _boundaries(ax, group: np.ndarray, p: int) -> None:
    fp, tp = group.shape
    for fi in range(fp):
        for ti in range(tp):
            if ti + 1 < tp and group[fi, ti] != group[fi, ti + 1]:
                ax.plot([(ti + 1) * p] * 2, [fi * p, (fi + 1) * p], color="black", linewidth=0.5)
            if fi + 1 < fp and group[fi, ti] != group[fi + 1, ti]:
                ax.plot([ti * p, (ti + 1) * p], [(fi + 1) * p] * 2, color="black", linewidth=0.5)


def format_reading(report: Dict) -> str:
    lines = [f"{report['model']} on {report['clips']} test clips, {report['patches']} patches each; word patches "
             f"{report['word_patch_share']:.1%} (> {report['margin_nats']:g} nat over their band's median)", "",
             "| config | block | tokens | word merged | background merged | word token size | background token size | "
             "word in mostly-background token |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for spec, res in report["configs"].items():
        for b in res["blocks"]:
            lines.append(f"| `{spec}` (top-1 {res['top1']:.1%}) | {b['block']} | {b['tokens']} | {b['word_merged']:.1%} | "
                         f"{b['background_merged']:.1%} | {b['word_token_size']:.2f} | {b['background_token_size']:.2f} | "
                         f"{b['word_in_mostly_background']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--merge", action="append", help="merge config (repeat); default r=8 and r=16")
    ap.add_argument("--model", default="reference-speech", help="speech reference name or weights file")
    ap.add_argument("--data-root", default="", help="the speech_words folder (default: under $MERGESEEK_DATA)")
    ap.add_argument("--margin", type=float, default=1.0, help="nats over the band's median that make a word patch")
    ap.add_argument("--words", default="yes,stop,seven,off", help="words of the clips drawn in the PNG")
    ap.add_argument("--pick", type=int, default=0, help="which test clip of each word: row i draws clip pick + 5 i")
    ap.add_argument("--png", type=Path, help="write the merge picture here")
    ap.add_argument("--out", type=Path, help="write the whole-split reading here (JSON)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    merges = args.merge or ["r=8", "r=16"]
    if args.png:
        picture(merges, args.png, args.words.split(","), args.model, args.data_root, args.margin, args.pick)
        print(f"wrote {args.png}")
    report = run(merges, args.model, args.data_root, args.margin)
    print(format_reading(report))
    if args.out:
        from mergeseek.runtime import atomic_write

        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
