"""Reuse work across the frames of a shot (training-free, after Eventful Transformers).

A video is encoded in order. The first frame of a shot is computed in full and becomes the
*reference*: for every block the stream keeps the block input, the packed q/k/v projection, the
attention output, the attention branch (out-projection with LayerScale), the post-attention
tokens and the MLP branch. A later frame of the same shot is compared with that reference and
only what changed is recomputed:

* which patches changed is found by hashing: a ``bits``-bit SimHash of each patch embedding
  (random hyperplanes, seeded) is compared with the reference's code at the same position. The
  Hamming distance estimates the angle between the two embeddings (``pi * h / bits``); a patch
  whose estimated angle is at least ``threshold`` is *changed*. No N x N comparison is made.
* a frame where more than ``cut`` of the patches changed starts a new shot (scene change), and
  every ``refresh``-th frame of a shot is a new reference, so error cannot build up;
* inside each block three gates decide per token: the q/k/v projection is recomputed for tokens
  whose input moved (block 0: the hash; later blocks: relative L2 change of the block input
  against the reference's, ``||x - x_ref|| / ||x_ref|| >= threshold``), attention is recomputed
  for every query of a frame in which any token was recomputed (cheap: N^2 C against the N C^2 of
  the linear layers; ``query=T``: only for the queries whose q/k/v row was recomputed or whose
  input moved by ``T``, the others keep their cached attention and out-projection rows), the
  out-projection for every token whose attention was recomputed (``attn=0``, the default:
  stale out-projection rows were the largest error; ``attn=T`` gates them by the relative change of
  the attention output), the MLP for tokens whose post-attention input moved. Unchanged tokens take the reference's outputs of those
  linear layers; the residual stream always carries the frame's own input. Class / prefix tokens
  are recomputed at every gate where any token of the frame is, since the pooled output reads them.

The linear layers run only on the gathered changed rows (flattened across the frames of a batch),
in the same matrix product as the rows of the batch's reference frames (a reference alone in a
batch would otherwise pay for a one-frame product), and are written into copies of the cached
outputs, so the saving is real compute.

Token merging composes by *replaying the reference's merges*: the reference runs the configured
matcher (``encoders.patch`` machinery) and records, per merging block, the linear map from the
block's tokens to the merged slots (each token's slot and weight in a size-weighted average)
and the slot sizes. Frames that reuse the reference merge with the same map, so every block sees the same token layout as its
reference and cached values line up position by position; the matcher itself is skipped for them.

``threshold=0`` computes every frame in full (each frame is its own reference), which equals
per-frame encoding. See docs/REUSE.md.

Modules: ``config`` (:class:`ReuseConfig`), ``stats`` (:class:`ReuseStats`), ``stream``
(:class:`ReuseStream`: planning from the hashes), ``forward`` (:class:`~encoders.reuse.forward.BlockPass`:
one pass over the blocks, one method per gate), ``encoder`` (:class:`ReuseEncoder`: an
``Encoder``'s tower as a stream, with the audit). The model's parts come from its family adapter
(``encoders.family``), the same one merging asks.
"""

from mergeseek.encoders.reuse.config import ReuseConfig
from mergeseek.encoders.reuse.encoder import ReuseEncoder
from mergeseek.encoders.reuse.stats import ReuseStats
from mergeseek.encoders.reuse.stream import ReuseStream, family_of

__all__ = ["ReuseConfig", "ReuseEncoder", "ReuseStats", "ReuseStream", "family_of"]
