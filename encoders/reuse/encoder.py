"""``ReuseEncoder``: an ``Encoder``'s image tower run as a :class:`ReuseStream`, with the audit
against per-frame encoding."""

from __future__ import annotations

from typing import Hashable, Sequence, Union

from mergeseek.encoders.reuse.config import ReuseConfig
from mergeseek.encoders.reuse.stats import ReuseStats
from mergeseek.encoders.reuse.stream import ReuseStream


class ReuseEncoder:
    """An ``Encoder``'s image tower run as a :class:`ReuseStream` (same autocast, normalised
    float32 vectors, like ``Encoder.encode_image_tensor``).

    Args:
        encoder: an ``encoders.Encoder`` (merging already applied as its config says).
        reuse: reuse config.
    """

    def __init__(self, encoder, reuse: Union[ReuseConfig, str, None]):
        self.encoder = encoder
        self.stream = ReuseStream(encoder.model, reuse, encoder.merge)
        self._since_audit = 0
        self._pending: list = []  # (pixels [1,3,H,W], reuse output [1,D], video id) waiting for a full audit batch

    @property
    def cfg(self) -> ReuseConfig:
        return self.stream.cfg

    @property
    def stats(self) -> ReuseStats:
        return self.stream.stats

    def _sync(self) -> None:
        import torch

        if str(self.encoder.device).startswith("cuda"):
            torch.cuda.synchronize()

    def encode_image_tensor(self, pixels, video_ids: Sequence[Hashable]):
        """Normalised float32 [B, dim] for preprocessed frames of the given videos (in order)."""
        import time

        import torch

        enc = self.encoder
        t0 = time.perf_counter()
        with torch.inference_mode(), enc._autocast():
            feats = self.stream.encode(pixels.to(enc.device, non_blocking=True), video_ids)
        out = torch.nn.functional.normalize(feats.float(), dim=-1)
        if self.cfg.audit:
            self._sync()
        self.stats.stream_s += time.perf_counter() - t0
        if self.cfg.audit:
            for i, reused in enumerate(self.stream.last_reused):
                if reused:
                    self._since_audit += 1
                    if self._since_audit >= self.cfg.audit:
                        self._since_audit = 0
                        # copies: a view would keep this whole batch alive until the flush
                        self._pending.append((pixels[i : i + 1].clone(), out[i : i + 1].clone(), str(video_ids[i])))
            if len(self._pending) >= enc.batch_size:
                self.flush_audit()
        return out

    def flush_audit(self) -> None:
        """Encode the frames waiting for the audit per-frame and record their error and time
        (called when a batch is full and by ``finish``)."""
        import time

        import torch

        if not self._pending:
            return
        pixels = torch.cat([p for p, _, _ in self._pending])
        mine = torch.cat([o for _, o, _ in self._pending]).to(self.encoder.device)
        videos = [v for _, _, v in self._pending]
        self._pending = []
        t0 = time.perf_counter()
        ref = self.encoder.encode_image_tensor(pixels)
        self._sync()
        st = self.stats
        st.audit_s += time.perf_counter() - t0
        cos = (ref * mine).sum(dim=-1).clamp(-1.0, 1.0).double().cpu()
        st.audited += int(cos.numel())
        st.audit_cos_sum += float(cos.sum())
        st.audit_cos_min = min(st.audit_cos_min, float(cos.min()))
        for vid, c in zip(videos, cos.tolist()):
            st.audit_video(vid, 1, c, c)

    def finish(self) -> ReuseStats:
        """Audit what is still waiting; returns the stats of the run."""
        self.flush_audit()
        return self.stats

    def take_stats(self) -> ReuseStats:
        """The stats since the last call (what is waiting for the audit is audited first), and a
        fresh count from here on; the caches and the audit's frame counter carry on. A worker that
        encodes many sources sends each source's share this way (``ReuseStats.merge`` adds them)."""
        self.flush_audit()
        done = self.stream.stats
        self.stream.stats = ReuseStats(weights=done.weights)
        return done

    def end(self, video_id: Hashable) -> None:
        """The video is finished: drop its cache."""
        self.stream.reset(video_id)
