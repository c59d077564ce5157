"""bench/reuse.py --sets clips --profile: each row carries the profiled shares of the clip's
per-frame pass and of its own reuse pass."""

from __future__ import annotations


def test_clips_mode_profiles_the_per_frame_pass_and_each_reuse_config(monkeypatch, one_torch_thread):
    import torch
    from skimage import data

    import bench.reuse as br
    from mergeseek.eval.datasets.video import static_clip

    clip = static_clip(data.coffee(), 5, fps=5.0, size=224, noise=1.0, name="still")
    monkeypatch.setattr(br, "every_frame_clips", lambda names, size, max_frames: [clip])
    threads = torch.get_num_threads()
    try:
        rows = br.main(["--model", "ViT-B-32", "--sets", "clips", "--rounds", "1", "--batch-size", "5", "--profile",
                        "--reuse", "threshold=0", "--reuse", "threshold=0.05,refresh=16,roll=2,query=0.05"])
    finally:
        torch.set_num_threads(threads)
    assert [r["reuse"] for r in rows] == ["threshold=0", "threshold=0.05,refresh=16,roll=2,query=0.05"]
    for row in rows:
        per_frame, reuse = row["profile"]
        for shares in (per_frame, reuse):
            parts = {k: v for k, v in shares.items() if k != "total_s"}
            assert set(parts) == {"linear", "attention", "patch_embed", "gathers_copies", "norms_gelu", "other"}
            assert abs(sum(parts.values()) - 1.0) < 0.01 and parts["linear"] > 0.3
    assert rows[0]["profile"][0] == rows[1]["profile"][0]  # one per-frame profile per clip
    # each profile is its own pass (no speed is asserted here: times belong in benchmarks, and a
    # profiled 5-frame pass on a loaded machine can take longer with fewer rows computed)
    assert all(shares["total_s"] > 0 for row in rows for shares in row["profile"])
    assert rows[0]["reuse_rate"] == 0.0 and rows[1]["reuse_rate"] > 0.3
    assert min(rows[1]["gate_reuse"].values()) > 0.3 and max(rows[0]["gate_reuse"].values()) == 0.0
