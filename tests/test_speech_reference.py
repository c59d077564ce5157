"""Audio: the espeak-ng ``speech-words`` generator and the AST-style speech reference under merging.

A tiny generated set (3 words, one voice per split, 16 mel x 32 frames) keeps these fast; the
matchers are checked against the naive loops of test_merging / test_lsh / test_seed_methods on
tokens and attention computed from real spectrograms."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from mergeseek.encoders import apply_merging, remove_merging, token_counts
from mergeseek.encoders.merging import (MATCHERS, bipartite_soft_matching, importance_merging, lsh_partners,
                                        merge_wavg, simhash_planes, zerotprune_merging)
from mergeseek.errors import ConfigError, MissingDependencyError, UnsupportedModelError
from mergeseek.eval.datasets.speech import SpeechWordsSpec, generate_split, load_split, log_mel, mel_filterbank
from mergeseek.eval.speech_reference import build_speech_model, get_speech_config

from test_lsh import naive_lsh_partners
from test_merging import naive_bipartite
from test_seed_methods import naive_importance, naive_zerotprune

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (Debian package espeak-ng)")

TINY = SpeechWordsSpec(words=("yes", "no", "stop"), train_voices=("en-us",), train_variants=("m1", "f2"),
                       test_voices=("en-gb-x-rp",), test_variants=("m5",), renders=(1, 1), copies=(1, 1),
                       n_mels=16, frames=32, clip_s=0.5)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (Debian package espeak-ng)")
    root = tmp_path_factory.mktemp("speech")
    load_split(root, "train", TINY)
    return root


@pytest.fixture(scope="module")
def spectrograms(tiny_root):
    """The 6 tiny training clips scaled as the model takes them: float32 [6, 1, 16, 32]."""
    cfg = get_speech_config("reference-speech-tiny")
    feats = load_split(tiny_root, "train", TINY).features.astype(np.float32)
    return (torch.from_numpy(feats)[:, None] - cfg.mean) / cfg.std


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return build_speech_model(get_speech_config("reference-speech-tiny")).eval()


# ----------------------------------------------------------------------------- the data set
@needs_espeak
def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tiny_root, tmp_path):
    again = load_split(tmp_path / "a", "train", TINY)
    assert (tmp_path / "a" / TINY.key() / "train.npz").read_bytes() == (tiny_root / TINY.key() / "train.npz").read_bytes()
    other = generate_split(SpeechWordsSpec(**{**TINY.__dict__, "seed": 1}), "train")
    assert again.features.shape == other.features.shape == (6, 16, 32)
    assert not np.array_equal(again.features, other.features)  # the seed reaches speed, pitch and noise
    assert again.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert set(again.voices) == {"en-us+m1", "en-us+f2"}


@needs_espeak
def test_test_split_hears_only_unseen_voices(tiny_root):
    test = load_split(tiny_root, "test", TINY)
    assert set(test.voices) == {"en-gb-x-rp+m5"}
    with pytest.raises(ConfigError, match="must not share"):
        SpeechWordsSpec(train_voices=("en-us",), test_voices=("en-us",))


def test_missing_espeak_is_refused_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no espeak-ng on it
    with pytest.raises(MissingDependencyError) as info:
        generate_split(TINY, "train")
    text = str(info.value)
    assert "\n" not in text and "espeak-ng" in text and "apt-get install espeak-ng" in text


def test_log_mel_puts_a_tone_in_the_band_around_its_frequency():
    spec = SpeechWordsSpec()
    t = np.arange(int(spec.clip_s * spec.sample_rate)) / spec.sample_rate
    fb = mel_filterbank(spec.n_fft, spec.n_mels, spec.sample_rate)
    bin_hz = spec.sample_rate / spec.n_fft
    for hz in (300.0, 1000.0, 4000.0):
        tone = 0.5 * np.sin(2 * np.pi * hz * t).astype(np.float32)
        band = int(log_mel(tone[None], spec)[0].mean(axis=1).argmax())
        assert fb[band, int(round(hz / bin_hz))] > 0.5  # the loudest band's triangle covers the tone
    assert log_mel(np.zeros((1, len(t)), np.float32), spec).max() == pytest.approx(np.log(1e-6))


# ----------------------------------------------------------------------------- merging on spectrograms
def test_speech_model_has_the_ast_token_grid():
    cfg = get_speech_config("reference-speech")
    model = build_speech_model(cfg)
    assert cfg.num_tokens == 128 and model.patch_embed.grid_size == (8, 16) and model.num_prefix_tokens == 0
    assert model(torch.zeros(1, 1, 64, 128)).shape == (1, 20)


@needs_espeak
def test_r0_equals_unmerged(tiny_model, spectrograms):
    with torch.inference_mode():
        ref = tiny_model(spectrograms)
        apply_merging(tiny_model, "r=0")
        out = tiny_model(spectrograms)
    assert type(tiny_model).__name__.startswith("Merging")
    assert (out - ref).abs().max().item() <= 1e-5


@needs_espeak
@pytest.mark.parametrize("method", list(MATCHERS))
def test_batch_of_four_equals_four_batches_of_one(tiny_model, spectrograms, method):
    x = spectrograms[:4]
    from mergeseek.encoders.merging import get_spec

    if get_spec(method).needs_prefix:  # scores tokens by class-token attention: refused on an avg-pooled model
        with pytest.raises(UnsupportedModelError, match="no class token"):
            apply_merging(tiny_model, f"r=6,method={method}")
        return
    apply_merging(tiny_model, f"r=6,method={method}")
    with torch.inference_mode():
        together = tiny_model(x)
        alone = torch.cat([tiny_model(x[i:i + 1]) for i in range(4)])
    counts = token_counts(tiny_model)
    remove_merging(tiny_model)
    assert (together - alone).abs().max().item() <= 1e-4
    assert counts == [26, 20]  # the merge really ran: 32 tokens (4 x 8 patches, no class token) less 6 per block


def _first_block_inputs(model, x):
    """Tokens entering block 0, its head-averaged keys (the merge metric) and attention probabilities."""
    with torch.inference_mode():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x))).double()
        blk = model.blocks[0]
        h = blk.norm1(tokens.float())
        b, n, _ = h.shape
        q, k, _ = blk.attn.qkv(h).reshape(b, n, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * blk.attn.scale).softmax(-1)
    return tokens, k.mean(1).double(), attn.double()


@needs_espeak
def test_matchers_agree_with_naive_loops_on_spectrogram_tokens(tiny_model, spectrograms):
    x, metric, attn = _first_block_inputs(tiny_model, spectrograms[:3])
    size = torch.ones(*x.shape[:2], 1, dtype=torch.float64)
    n, r = x.shape[1], 8
    planes = simhash_planes(metric.shape[-1], 2, 2, seed=3)
    best, partner, _ = lsh_partners(metric, size=size, lsh_bits=2, lsh_tables=2, lsh_window=8, planes=planes)
    outs = {"bipartite": merge_wavg(bipartite_soft_matching(metric, r, size=size)[0], x, size),
            "importance": merge_wavg(importance_merging(metric, r, size=size, attn=attn[:, :, :1]), x, size),
            "zerotprune": merge_wavg(zerotprune_merging(metric, r, size=size, attn=attn, iters=3)[0], x, size)}
    found = 0
    for b in range(3):
        for name, want in (("bipartite", naive_bipartite(metric[b], x[b], size[b], r)[:2]),
                           ("importance", naive_importance(metric[b], x[b], size[b], attn[b, :, 0].mean(0), r)),
                           ("zerotprune", naive_zerotprune(metric[b], x[b], size[b], attn[b], r, 3))):
            torch.testing.assert_close(outs[name][0][b], want[0], msg=name)
            torch.testing.assert_close(outs[name][1][b], want[1], msg=name)
        for p, (score, q) in naive_lsh_partners(metric[b], planes, 2, 2, 8).items():
            if q is not None:
                found += 1
                assert float(best[b, p // 2]) == pytest.approx(score, abs=1e-9)
                assert int(partner[b, p // 2]) * 2 + 1 == q
    assert found > n  # most A tokens of the 3 clips found a hashed partner: not vacuous


@needs_espeak
def test_energy_methods_agree_with_naive_loops_on_spectrogram_tokens(tiny_model, spectrograms):
    """PiToMe's energy rule, exact and hashed, on the tokens of a real spectrogram (no class token)."""
    from mergeseek.encoders.merging.energy import energy_lsh_merging, energy_merging

    from test_energy import naive_buckets, naive_energy, naive_merge

    x, metric, _ = _first_block_inputs(tiny_model, spectrograms[:3])
    size = torch.ones(*x.shape[:2], 1, dtype=torch.float64)
    n, r, bits, tables = x.shape[1], 6, 2, 2
    exact = merge_wavg(energy_merging(metric, r, protected=0, size=size, padded=False, margin=0.3, alpha=1.0), x, size)
    planes = simhash_planes(metric.shape[-1], bits, tables, seed=2)
    hashed = merge_wavg(energy_lsh_merging(metric.float(), r, protected=0, planes=planes, lsh_bits=bits,
                                           lsh_tables=tables, padded=False), x, size)
    assert exact[0].shape == hashed[0].shape == (3, n - r, x.shape[2])
    for b in range(3):
        want = naive_merge(metric[b], x[b], size[b], r, naive_energy(metric[b], 0.3, 1.0), protected=0)
        torch.testing.assert_close(exact[0][b], want[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(exact[1][b], want[1], rtol=0, atol=0)
        energy, codes = naive_buckets(metric[b].float(), planes, bits, tables)
        mates = lambda a, c: any(codes[a][t] == codes[c][t] for t in range(tables))  # noqa: E731
        want = naive_merge(metric[b], x[b], size[b], r, energy, 0, mates)
        torch.testing.assert_close(hashed[0][b], want[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(hashed[1][b], want[1], rtol=0, atol=0)


@needs_espeak
def test_pair_methods_agree_with_naive_loops_on_spectrogram_tokens(tiny_model, spectrograms):
    """One-to-one greedy pairs, exact and hashed, on the tokens of a real spectrogram (no class token)."""
    from mergeseek.encoders.merging import pairs
    from mergeseek.encoders.merging.pairs import pairs_lsh_merging, pairs_merging

    from test_pairs import _check, naive_exact_edges, naive_window_edges

    x, metric, _ = _first_block_inputs(tiny_model, spectrograms[:3])
    size = torch.ones(*x.shape[:2], 1, dtype=torch.float64)
    r, bits, tables, window = 6, 2, 2, 8
    _check(pairs_merging(metric, r, protected=0, size=size, padded=False), metric, x, size, r,
           lambda m: naive_exact_edges(m, 0, pairs.PAIR_CANDIDATES), 0, 1e-12)
    planes = simhash_planes(metric.shape[-1], bits, tables, seed=2, dtype=torch.float64)
    hashed = pairs_lsh_merging(metric, r, protected=0, planes=planes, lsh_bits=bits, lsh_tables=tables,
                               lsh_window=window, size=size, padded=False)
    _check(hashed, metric, x, size, r, lambda m: naive_window_edges(m, planes, bits, tables, window, 0), 0, 1e-12)


# ----------------------------------------------------------------------------- training and export
@needs_espeak
def test_train_resume_export_and_load_round_trip(tiny_root, tmp_path, spectrograms):
    from mergeseek.eval.speech_reference import export_speech, load_speech_reference, train_speech

    cfg = get_speech_config("reference-speech-tiny")
    first = train_speech(tiny_root, tmp_path / "run", cfg, spec=TINY, time_budget_s=0.0)  # stops after epoch 1
    assert (first.epochs_done, first.complete) == (1, False)
    done = train_speech(tiny_root, tmp_path / "run", cfg, spec=TINY)  # resumes: epoch 2 of 2
    assert (done.epochs_done, done.complete) == (2, True) and [h["epoch"] for h in done.history] == [1, 2]
    exported = export_speech(done.checkpoint, tmp_path / "ref")
    from mergeseek.eval.train_reference import describe

    assert describe(exported).endswith("on the whole test split)") and "1000" not in describe(exported)
    model, loaded_cfg = load_speech_reference(exported.weights)
    trained, _ = load_speech_reference(done.checkpoint)
    assert loaded_cfg == cfg
    with torch.inference_mode():  # fp16 export of fp32 weights: close, not equal
        torch.testing.assert_close(model(spectrograms), trained(spectrograms), atol=2e-2, rtol=0)
    with pytest.raises(ConfigError, match="another config"):
        train_speech(tiny_root, tmp_path / "run", cfg.__class__(**{**cfg.to_dict(), "lr": cfg.lr * 2}), spec=TINY)


@needs_espeak
@pytest.mark.gpu
def test_speech_trains_on_cuda_and_resumes_on_the_cpu(tiny_root, tmp_path, spectrograms):
    """An epoch on the GPU, the next on the CPU from its checkpoint; the batches and masks are drawn
    on the CPU, so the first epoch's loss is the CPU's within float tolerance."""
    import json
    import math

    from mergeseek.eval.speech_reference import load_speech_reference, train_speech

    cfg = get_speech_config("reference-speech-tiny")
    gpu = train_speech(tiny_root, tmp_path / "run", cfg, spec=TINY, time_budget_s=0.0, device="cuda")
    cpu = train_speech(tiny_root, tmp_path / "cpu", cfg, spec=TINY, time_budget_s=0.0, device="cpu")
    assert math.isfinite(gpu.history[0]["loss"]) and abs(gpu.history[0]["loss"] - cpu.history[0]["loss"]) < 0.05 * cpu.history[0]["loss"]
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["device"] == torch.cuda.get_device_name(0)
    done = train_speech(tiny_root, tmp_path / "run", cfg, spec=TINY, device="cpu")
    assert (done.epochs_done, done.complete) == (2, True)
    model, _ = load_speech_reference(done.checkpoint)  # saved from both devices, loads on the CPU
    with torch.inference_mode():
        assert torch.isfinite(model(spectrograms)).all()
