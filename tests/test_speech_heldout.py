"""Audio: the larger held-out split of ``speech-words`` (``split=test-xK``).

The tiny spec of test_speech_reference (3 words, one unseen voice and variant, one render) keeps
generation to a few espeak-ng calls."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from mergeseek.errors import ConfigError
from mergeseek.eval.datasets import load_dataset
from mergeseek.eval.datasets.speech import (SpeechWordsSpec, check_split, generate_split, large_test_multiple,
                                            load_split, split_path)

from test_speech_reference import TINY

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (Debian package espeak-ng)")


@pytest.mark.parametrize("name, k", [("train", 0), ("test", 0), ("test-x1", 1), ("test-x20", 20), ("test-x999", 999)])
def test_split_names_and_their_multiple(name, k):
    assert check_split(name) == name
    assert large_test_multiple(name) == k


@pytest.mark.parametrize("name", ["test-x0", "test-x1000", "test-x", "test-x02", "test-x2 ", "val", "Test", "train-x2"])
def test_a_bad_split_name_is_refused_in_one_line_listing_the_valid_ones(name):
    with pytest.raises(ConfigError) as info:
        check_split(name)
    text = str(info.value)
    assert "\n" not in text and repr(name) in text and "train, test or test-xK" in text
    with pytest.raises(ConfigError):
        TINY.combos(name)


def test_test_xk_has_k_times_the_test_renders_of_the_test_voices_only():
    spec = SpeechWordsSpec(renders=(2, 3), copies=(2, 1))
    test, big = spec.combos("test"), spec.combos("test-x4")
    assert len(big) == 4 * len(test) == 20 * 3 * 4 * 3 * 4
    assert {(v, var) for _, v, var, _ in big} == {(v, var) for _, v, var, _ in test}
    assert max(k for *_, k in big) == 11
    assert spec.copies_of("test-x4") == spec.copies_of("test") == 1 and spec.copies_of("train") == 2


@needs_espeak
def test_test_xk_is_deterministic_nested_in_larger_k_and_disjoint_from_test(tmp_path):
    x1 = load_split(tmp_path, "test-x1", TINY)
    x2 = load_split(tmp_path, "test-x2", TINY)
    assert split_path(tmp_path, TINY, "test-x2").name == "test-x2.npz"
    assert x2.features.shape == (6, 16, 32) and x2.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert set(x2.voices) == {"en-gb-x-rp+m5"}
    # each render's draws depend on (word, voice, variant, render) only: test-x1's clips are test-x2's renders 0
    assert np.array_equal(x1.features, x2.features[0::2]) and np.array_equal(x1.labels, x2.labels[0::2])
    assert not np.array_equal(x2.features[0::2], x2.features[1::2])
    again = generate_split(TINY, "test-x2")
    assert np.array_equal(again.features, x2.features)
    test = load_split(tmp_path, "test", TINY)
    flat = {bytes(f.tobytes()) for f in test.features}
    assert not any(bytes(f.tobytes()) in flat for f in x2.features)  # independent draws, not copies of test
    # the test split's own bytes do not move: its generator stream is the one it had before test-xK
    assert np.array_equal(generate_split(TINY, "test").features, test.features)


@needs_espeak
def test_eval_dataset_option_split_reads_the_cached_large_split(tmp_path):
    """``--dataset speech-words:PATH,split=test-x3`` reads ``<key>/test-x3.npz`` of the default spec
    (a real cache file written here, so nothing is generated)."""
    path = split_path(tmp_path, SpeechWordsSpec(), "test-x3")
    path.parent.mkdir(parents=True)
    feats = np.random.default_rng(0).standard_normal((5, 64, 128)).astype(np.float16)
    np.savez(path, features=feats, labels=np.array([3, 1, 4, 1, 5]), voices=np.array(["en-us-nyc+m5"] * 5))
    ds = load_dataset(f"speech-words:{tmp_path},split=test-x3")
    assert len(ds.images) == 5 and ds.labels.tolist() == [3, 1, 4, 1, 5]
    assert np.array_equal(ds.images.load(2).numpy()[0], feats[2].astype(np.float32))
    with pytest.raises(ConfigError, match="test-xK"):
        load_dataset(f"speech-words:{tmp_path},split=test-x0")
