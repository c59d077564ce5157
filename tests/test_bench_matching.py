"""The LSH benches run end to end on real inputs (the figures themselves live in docs/BENCHMARKS.md)."""

from __future__ import annotations

import pytest

from mergeseek.eval.reference import reference_available


@pytest.mark.skipif(not reference_available(), reason="reference weights not present")
def test_reference_agreement_on_photos_and_frames():
    from bench.matching import agreement_reference

    rows = agreement_reference(sizes=(48,))
    assert [(r["images"], r["n"], r["N"]) for r in rows] == [("scikit-image photos", 6, 145), ("bikes.mp4 frames", 8, 145)]
    for row in rows:
        # merging changed the features (not a no-op) but kept them close to the unmerged model's
        assert 0.9 < row["cos_bipartite_none"] < 1.0 and 0.9 < row["cos_lsh_none"] < 1.0
        assert 0.9 < row["cos_lsh_bipartite"] <= 1.0 + 1e-6


def test_matching_step_rows_name_the_lsh_implementation():
    from bench.matching import matching_step

    rows = matching_step(ns=(65,), batches=(2,), dim=16, iters=2)
    assert rows[0]["N"] == 65 and rows[0]["bipartite_ms"] > 0 and rows[0]["lsh_ms"] > 0
    assert rows[0]["lsh_backend"].split()[0] in ("native", "torch")
