"""``ReuseStats``: what a reuse stream computed and reused, per block and gate, and the audit's
error and measured gain against per-frame encoding."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


@dataclass
class ReuseStats:
    """Counters over every frame a stream encoded.

    Per block and gate (``qkv``, ``proj``, ``mlp``) the token rows that were computed, out of
    ``rows`` (rows of reference frames count as computed); ``reuse_rate`` weights the three gates
    by their multiply-adds (3 C^2, C^2, 2 C H per row).
    """

    frames: int = 0
    references: int = 0
    cuts: int = 0
    refreshes: int = 0
    rows: List[List[int]] = field(default_factory=list)  # per block [qkv, proj, mlp] rows seen
    computed: List[List[int]] = field(default_factory=list)  # per block [qkv, proj, mlp] rows computed
    weights: Tuple[float, float, float] = (3.0, 1.0, 8.0)
    # audit (ReuseConfig.audit): frames also encoded per-frame, their cosines, and the seconds of
    # the reuse path (all frames) and of the per-frame encoding of the audited frames
    audited: int = 0
    audit_cos_sum: float = 0.0
    audit_cos_min: float = 1.0
    audit_s: float = 0.0
    stream_s: float = 0.0
    # the audit per video: str(video id) -> [frames audited, sum of their cosines, the smallest]
    audit_videos: Dict[str, list] = field(default_factory=dict)

    def add(self, block: int, gate: int, rows: int, computed: int) -> None:
        while len(self.rows) <= block:
            self.rows.append([0, 0, 0])
            self.computed.append([0, 0, 0])
        self.rows[block][gate] += rows
        self.computed[block][gate] += computed

    def audit_video(self, video: str, frames: int, cos_sum: float, cos_min: float) -> None:
        """Add audited frames of one video to its row of the per-video audit."""
        row = self.audit_videos.setdefault(video, [0, 0.0, 1.0])
        row[0] += frames
        row[1] += cos_sum
        row[2] = min(row[2], cos_min)

    def merge(self, other: "ReuseStats") -> None:
        self.frames += other.frames
        self.references += other.references
        self.cuts += other.cuts
        self.refreshes += other.refreshes
        self.audited += other.audited
        self.audit_cos_sum += other.audit_cos_sum
        self.audit_cos_min = min(self.audit_cos_min, other.audit_cos_min)
        self.audit_s += other.audit_s
        self.stream_s += other.stream_s
        for vid, (n, total, low) in other.audit_videos.items():
            self.audit_video(vid, n, total, low)
        for b, (rows, comp) in enumerate(zip(other.rows, other.computed)):
            for g in range(3):
                self.add(b, g, rows[g], comp[g])

    def block_reuse(self) -> List[float]:
        """Share of linear-layer work reused per block (multiply-add weighted)."""
        out = []
        for rows, comp in zip(self.rows, self.computed):
            total = sum(w * r for w, r in zip(self.weights, rows))
            done = sum(w * c for w, c in zip(self.weights, comp))
            out.append(1.0 - done / total if total else 0.0)
        return out

    def gate_reuse(self) -> dict:
        out = {}
        for g, name in enumerate(("qkv", "proj", "mlp")):
            rows = sum(r[g] for r in self.rows)
            comp = sum(c[g] for c in self.computed)
            out[name] = 1.0 - comp / rows if rows else 0.0
        return out

    @property
    def reuse_rate(self) -> float:
        total = sum(w * r for rows in self.rows for w, r in zip(self.weights, rows))
        done = sum(w * c for comp in self.computed for w, c in zip(self.weights, comp))
        return 1.0 - done / total if total else 0.0

    def audit_summary(self) -> Optional[dict]:
        """Error and measured gain against per-frame encoding on the audited frames (None: none).

        ``gain`` = (per-frame seconds per audited frame) / (reuse seconds per frame of the run):
        frames/s of the reuse path over per-frame encoding of the same kind of frames, measured in
        the same process. The audited frames reused work, so their error is the worst case; frames
        computed in full are per-frame encoding already."""
        if not self.audited:
            return None
        reuse_per_frame = self.stream_s / max(1, self.frames)
        per_frame = self.audit_s / self.audited
        return {
            "frames": self.audited,
            "cos_min": round(self.audit_cos_min, 6),
            "cos_mean": round(self.audit_cos_sum / self.audited, 6),
            "per_frame_s": round(per_frame, 6),
            "reuse_s": round(reuse_per_frame, 6),
            "gain": round(per_frame / reuse_per_frame, 3) if reuse_per_frame > 0 else None,
            "cost": round(self.audit_s / self.stream_s, 4) if self.stream_s > 0 else None,
            "videos": {vid: {"frames": n, "cos_min": round(low, 6), "cos_mean": round(total / n, 6)}
                       for vid, (n, total, low) in self.audit_videos.items()},
        }

    def summary(self) -> dict:
        out = {
            "frames": self.frames,
            "references": self.references,
            "cuts": self.cuts,
            "refreshes": self.refreshes,
            "reuse_rate": round(self.reuse_rate, 4),
            "gate_reuse": {k: round(v, 4) for k, v in self.gate_reuse().items()},
            "block_reuse": [round(v, 4) for v in self.block_reuse()],
        }
        audit = self.audit_summary()
        if audit is not None:
            out["audit"] = audit
        return out

