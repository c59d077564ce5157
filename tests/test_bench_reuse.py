"""bench/reuse.py end to end on a tiny set: the rows it reports are the stream's own counts."""

from __future__ import annotations

import json

import pytest


def test_reuse_bench_reports_the_stream_counts_and_writes_its_rows(tmp_path, one_torch_thread):
    import torch

    from bench.reuse import main

    out = tmp_path / "rows.json"
    threads = torch.get_num_threads()
    try:
        rows = main(["--model", "ViT-B-32", "--fps", "2", "--seconds", "2", "--sets", "synthetic", "--kinds", "static",
                     "--rounds", "1", "--batch-size", "3", "--profile", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    (row,) = rows
    # two static clips of 4 frames at 2 fps, one reference each (refresh 16, no cut), batches of 3
    # spanning both clips
    assert row["frames"] == 8 and row["references"] == 2 and row["cuts"] == 0 and row["kinds"] == "static"
    assert row["gain"] > 0 and row["per_frame_fps"] > 0 and 0.0 < row["reuse_rate"] < 1.0
    assert 0.99 < row["cos_min"] <= row["cos_mean"] <= 1.0 + 1e-6 and 0.0 <= row["top10_overlap"] <= 1.0
    assert json.loads(out.read_text())["rows"] == rows
    per_frame, reuse = row["profile"]  # shares of each pass's time per op group
    for shares in (per_frame, reuse):
        assert shares["linear"] > 0.3 and abs(sum(v for k, v in shares.items() if k != "total_s") - 1.0) < 0.01
    assert reuse["total_s"] > 0 and per_frame["total_s"] > 0  # times are the benchmark's to compare, not a test's
    with pytest.raises(SystemExit):
        main(["--threads", "2"])  # the CPU clock times one thread
    with pytest.raises(SystemExit):
        main(["--device", "cuda"])  # nor does it time a GPU


@pytest.mark.slow  # the reuse A/B bench end to end
def test_reuse_ab_of_a_module_against_itself_gives_identical_outputs(one_torch_thread):
    import torch

    from bench.reuse_ab import main
    from mergeseek.encoders import reuse

    threads = torch.get_num_threads()
    try:
        row = main(["--old", reuse.__file__, "--rounds", "1", "--kind", "panzoom"])
    finally:
        torch.set_num_threads(threads)
    assert row["max_abs_diff"] == 0.0 and row["gain_old"] > 0 and row["gain_new"] > 0


def test_neighbour_overlap_is_the_share_of_each_frames_k_nearest_frames_kept():
    """Against a hand count: 4 frames on a line; the other encoding swaps which of frame 0's
    neighbours is nearest-but-one (k=2 keeps {1, 2} -> {1, 3}: half of frame 0's list)."""
    import numpy as np

    from bench.reuse import neighbour_overlap

    def unit(angles):
        a = np.radians(np.asarray(angles, dtype=float))
        return np.stack([np.cos(a), np.sin(a)], axis=1)

    base = unit([0, 10, 20, 30])  # neighbours: 0 -> 1, 2; 1 -> 0, 2; 2 -> 1, 3; 3 -> 2, 1
    assert neighbour_overlap(base, base, k=2) == 1.0
    other = unit([0, 10, 40, 25])  # 0 -> 1, 3; 1 -> 0, 3; 2 -> 3, 1; 3 -> 2, 1
    # frame 0: {1,2} vs {1,3} 1/2; frame 1: {0,2} vs {0,3} 1/2; frame 2: {1,3} vs {3,1} 1; frame 3: {2,1} vs {2,1} 1
    assert neighbour_overlap(base, other, k=2) == (0.5 + 0.5 + 1 + 1) / 4
    assert neighbour_overlap(base, other, k=10) == 1.0  # k is cut to the 3 other frames


def test_clips_mode_times_every_merge_and_reuse_config_against_one_per_frame_pass(monkeypatch, one_torch_thread):
    """--sets clips with two --merge and two --reuse configs: one row per clip, merge and reuse
    config, all against the same unmerged per-frame pass (its frames/s is shared); the reuse
    counts are each stream's own (threshold=0 computes every frame in full)."""
    import torch
    from skimage import data

    import bench.reuse as br
    from mergeseek.eval.datasets.video import static_clip

    clip = static_clip(data.coffee(), 5, fps=5.0, size=224, noise=1.0, name="still")
    monkeypatch.setattr(br, "every_frame_clips", lambda names, size, max_frames: [clip])
    threads = torch.get_num_threads()
    try:
        rows = br.main(["--model", "ViT-B-32", "--sets", "clips", "--rounds", "1", "--batch-size", "4",
                        "--merge", "none", "--merge", "r=8", "--base-merge", "none",
                        "--reuse", "threshold=0", "--reuse", "threshold=0.05,refresh=16,roll=2"])
    finally:
        torch.set_num_threads(threads)
    assert [(r["merge"], r["reuse"]) for r in rows] == [("none", "threshold=0"), ("none", "threshold=0.05,refresh=16,roll=2"),
                                                         ("r=8", "threshold=0"), ("r=8", "threshold=0.05,refresh=16,roll=2")]
    assert len({r["per_frame_fps"] for r in rows}) == 1 and all(r["base_merge"] == "none" for r in rows)
    exact = rows[0]
    assert exact["references"] == 5 and exact["reuse_rate"] == 0.0 and exact["cos_min"] >= 0.9999
    assert rows[1]["references"] == 1 and rows[1]["reuse_rate"] > 0
    with pytest.raises(SystemExit):
        br.main(["--merge", "none", "--merge", "r=8"])  # several merges only with --sets clips
