"""Agreement of LSH-merged and bipartite-merged features on the trained CIFAR-10 reference ViT.

    python -m bench.reference_agreement --data $MERGESEEK_DATA/cifar10 --limit 1000

Cosine between the pre-logit features (the class token after the final norm) of LSH-merged and
bipartite-merged models at the same r, and between each and the unmerged model, plus how often
LSH and bipartite predict the same class. Random-weight CLIP models are useless for this (their
embeddings barely depend on the input); the trained reference is not.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def features(model, x):
    """(unit pre-logit features [B, D], predicted classes [B]) of a reference ViT, merged or not."""
    import torch

    with torch.inference_mode():
        if hasattr(model, "_merged_features"):  # patched: sizes travel from the blocks to the pooling
            tokens, size = model._merged_features(x)
            h = model._merged_head(tokens, size, pre_logits=True)
        else:
            h = model.forward_head(model.forward_features(x), pre_logits=True)
        return torch.nn.functional.normalize(h.float(), dim=-1).numpy(), model.head(h).argmax(-1).numpy()


def main(argv=None) -> int:
    from mergeseek.eval.candidates import merged_models
    from mergeseek.eval.reference import load_cifar10_npz, load_reference, preprocess_uint8

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="CIFAR-10 pack folder (default: cifar10 under the data root)")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--rs", default="4,8,12,16")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    model, info = load_reference()
    if a.data is None:
        from mergeseek.eval.config import default_data_root

        a.data = default_data_root() / "cifar10"
    split = load_cifar10_npz(a.data, "test", a.limit)
    configs = ["none"] + [f"r={r}{m}" for r in a.rs.split(",") for m in ("", ",method=lsh")]
    models = merged_models(model, configs)
    feats, preds = {}, {}
    for name, m in models.items():
        parts = [features(m, preprocess_uint8(split.images[s : s + 250], info)) for s in range(0, len(split.labels), 250)]
        feats[name], preds[name] = np.concatenate([f for f, _ in parts]), np.concatenate([c for _, c in parts])
    rows = []
    names = list(models)
    for r in a.rs.split(","):
        bip, lsh = next(n for n in names if n.endswith(f"r={r}") and "bipartite" in n), next(
            n for n in names if f"r={r}" in n and "lsh" in n
        )
        cos = lambda u, v: float(np.mean(np.sum(feats[u] * feats[v], axis=1)))  # noqa: E731
        rows.append(
            {
                "r": int(r),
                "images": len(split.labels),
                "cos_lsh_bipartite": cos(lsh, bip),
                "cos_bipartite_none": cos(bip, "none"),
                "cos_lsh_none": cos(lsh, "none"),
                "same_class_lsh_bipartite": float(np.mean(preds[lsh] == preds[bip])),
            }
        )
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        print("| r | images | cos(LSH, bipartite) | cos(bipartite, unmerged) | cos(LSH, unmerged) | same class LSH vs bipartite |")
        print("|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            print(f"| {row['r']} | {row['images']} | {row['cos_lsh_bipartite']:.4f} | {row['cos_bipartite_none']:.4f} | "
                  f"{row['cos_lsh_none']:.4f} | {row['same_class_lsh_bipartite']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
