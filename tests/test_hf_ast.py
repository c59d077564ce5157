"""Token merging in Hugging Face's ``ASTForAudioClassification`` / ``ASTModel`` (random weights from a
small ``ASTConfig``: no download) on real log-mel spectrograms of word-like sound made here.

r=0 is the unpatched model bit for bit (eager and sdpa attention); every method keeps the class and
distillation tokens first; a batch of four equals four batches of one; bipartite and lsh give static
widths; every matcher agrees with the naive loops of test_merging / test_lsh / test_energy /
test_seed_methods / test_pairs on the tokens of the first layer.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face transformers is not installed: pip install 'transformers>=5' (the audio extra)")

from transformers import ASTConfig, ASTForAudioClassification, ASTModel  # noqa: E402

from mergeseek.encoders import apply_merging, merge_stats, remove_merging, token_counts  # noqa: E402
from mergeseek.encoders.merging import (MATCHERS, bipartite_soft_matching, lsh_partners, merge_wavg,  # noqa: E402
                                        simhash_planes)
from mergeseek.encoders.merging.energy import energy_merging  # noqa: E402
from mergeseek.encoders.patch import vit_shape  # noqa: E402
from mergeseek.errors import UnsupportedModelError  # noqa: E402

from test_energy import naive_energy, naive_merge  # noqa: E402
from test_lsh import naive_lsh_partners  # noqa: E402
from test_merging import naive_bipartite  # noqa: E402

FRAMES, MELS = 128, 64  # 16 x 16 patches at stride 10: 5 x 12 = 60 patches + class + distillation = 62 tokens
TOKENS = 62


def small_config(**kw) -> ASTConfig:
    return ASTConfig(**{"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 128,
                        "max_length": FRAMES, "num_mel_bins": MELS, "num_labels": 7, **kw})


def small_ast(attn: str = "sdpa", **kw) -> ASTForAudioClassification:
    torch.manual_seed(0)
    model = ASTForAudioClassification(small_config(**kw)).eval()
    model.set_attn_implementation(attn)
    # random init leaves the class/distillation tokens and positions at zero: give them values,
    # so that a bug that mixed them up or moved them would show
    with torch.no_grad():
        emb = model.audio_spectrogram_transformer.embeddings
        for p in (emb.cls_token, emb.distillation_token, emb.position_embeddings):
            p.normal_(std=0.5)
    return model


@pytest.fixture(scope="module")
def spectrograms():
    """Six word-like clips as AST takes them: float32 [6, 128 frames, 64 mel bins]."""
    from bench.hf_ast import ast_spectrograms

    return ast_spectrograms(6, FRAMES, MELS, seed=3)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("spec", ["r=0", "r=0,method=lsh", "r=0,method=energy", "r=0,prop_attn=off"])
def test_r0_is_the_unpatched_model_bit_for_bit(attn, spec, spectrograms):
    model = small_ast(attn)
    assert model.config._attn_implementation == attn
    with torch.inference_mode():
        ref = model(spectrograms)
        base = model.audio_spectrogram_transformer(spectrograms)
        apply_merging(model, spec)
        out = model(spectrograms)
        base_out = model.audio_spectrogram_transformer(spectrograms)
    assert type(model.audio_spectrogram_transformer).__name__ == "MergingASTModel"
    assert type(model.audio_spectrogram_transformer.layers[0]).__name__ == "MergingASTLayer"
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(base_out.last_hidden_state, base.last_hidden_state)
    assert torch.equal(base_out.pooler_output, base.pooler_output)
    assert token_counts(model) == [TOKENS] * 3
    with torch.inference_mode():
        remove_merging(model)
        assert type(model.audio_spectrogram_transformer) is ASTModel
        assert torch.equal(model(spectrograms).logits, ref.logits)


def test_the_bare_model_and_the_classifier_are_one_family(spectrograms):
    model = small_ast()
    assert token_counts(model) == [TOKENS] * 3 and vit_shape(model) == (64, 2.0)
    bare = model.audio_spectrogram_transformer
    apply_merging(bare, "r=8")
    with torch.inference_mode():
        out = bare(spectrograms[:2])
    assert out.last_hidden_state.shape == (2, TOKENS - 24, 64) and token_counts(bare) == [54, 46, 38]
    with torch.inference_mode():
        as_tuple = bare(spectrograms[:2], return_dict=False)
    assert torch.equal(as_tuple[0], out.last_hidden_state)


@pytest.mark.parametrize("method", list(MATCHERS))
def test_prefix_tokens_stay_first_with_size_one_and_a_batch_of_four_equals_four_of_one(method, spectrograms):
    model = small_ast("sdpa")
    apply_merging(model, f"r=8,method={method}")
    x = spectrograms[:4]
    seen = []
    hook = model.audio_spectrogram_transformer.layernorm.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    with torch.inference_mode():
        together = model(x).logits
        alone = torch.cat([model(x[i:i + 1]).logits for i in range(4)])
        unmerged = small_ast("sdpa")(x).logits
    hook.remove()
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-4)
    assert seen[0].shape[1] == TOKENS - 24  # the merge ran: 8 tokens fewer after each of 3 layers
    # and changed the output, well above float noise (the random small AST's logits move by ~1e-3 at
    # r=8 for every method: ward merges the closest tokens, 1.0e-3 here, at the old 1e-3 threshold)
    assert float((together - unmerged).abs().max()) > 1e-5


@pytest.mark.parametrize("spec", ["r=8", "r=8,method=lsh", "r=12,method=lsh,lsh_bits=10,lsh_tables=1", "r=8,prop_attn=off"])
def test_bipartite_and_lsh_widths_are_static_and_every_clip_merges_r(spec, spectrograms):
    model = small_ast()
    apply_merging(model, spec)
    r = int(spec.split(",")[0][2:])
    want, n = [], TOKENS
    for _ in range(3):
        n -= min(r, (n - 2) // 2)
        want.append(n)
    for batch in (spectrograms[:1], spectrograms, torch.zeros(3, FRAMES, MELS)):  # silence too: all tokens alike
        with torch.inference_mode():
            out = model(batch)
        stats = merge_stats(model)
        assert token_counts(model) == want and out.logits.shape == (batch.shape[0], 7)
        assert stats["merged_min"] == stats["requested"] and stats["shortfall"] == 0


def test_caller_masks_and_per_layer_outputs_are_refused_in_one_line(spectrograms):
    model = small_ast()
    apply_merging(model, "r=4")
    for kwargs, says in (({"attention_mask": torch.ones(1, TOKENS)}, "attention mask"),
                         ({"output_hidden_states": True}, "output_hidden_states"),
                         ({"output_attentions": True}, "output_attentions")):
        with pytest.raises(UnsupportedModelError, match=says) as err:
            model(spectrograms[:1], **kwargs)
        assert "\n" not in str(err.value)


def test_reuse_is_refused_and_unknown_layers_are_named():
    from mergeseek.encoders.family import vit_family

    model = small_ast()
    with pytest.raises(UnsupportedModelError, match="not transformers' AST"):
        vit_family(model).check_reuse()
    model.audio_spectrogram_transformer.layers[1] = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError, match="AST layer 1 is Identity"):
        apply_merging(model, "r=4")


# ----------------------------------------------------------------------------- matchers on AST tokens
def _first_layer_inputs(model, x):
    """Tokens entering layer 0 (float64), its head-averaged keys (the merge metric) and its
    attention probabilities [B, H, N, N]."""
    ast = model.audio_spectrogram_transformer
    with torch.inference_mode():
        tokens = ast.embeddings(x)
        attn = ast.layers[0].attention
        h = ast.layers[0].layernorm_before(tokens)
        b, n, _ = h.shape
        q, k = (proj(h).view(b, n, -1, attn.head_dim).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj))
        probs = ((q @ k.transpose(2, 3)) * attn.scaling).softmax(-1)
    return tokens.double(), k.mean(1).double(), probs.double()


def test_matchers_agree_with_naive_loops_on_ast_tokens(spectrograms):
    x, metric, _ = _first_layer_inputs(small_ast(), spectrograms[:3])
    size = torch.ones(*x.shape[:2], 1, dtype=torch.float64)
    n, r = x.shape[1], 12
    got_b = merge_wavg(bipartite_soft_matching(metric, r, size=size, protected=2)[0], x, size)
    got_e = merge_wavg(energy_merging(metric, r, protected=2, size=size, padded=False, margin=0.3, alpha=1.0), x, size)
    planes = simhash_planes(metric.shape[-1], 2, 2, seed=3)
    best, partner, _ = lsh_partners(metric, size=size, lsh_bits=2, lsh_tables=2, lsh_window=8, planes=planes, protected=2)
    found = 0
    for b in range(3):
        want_x, want_s, pairs = naive_bipartite(metric[b], x[b], size[b], r, protected=2)
        assert all(p >= 2 and q >= 2 for p, q in pairs) and len(pairs) == r
        torch.testing.assert_close(got_b[0][b], want_x)
        torch.testing.assert_close(got_b[1][b], want_s)
        want_x, want_s = naive_merge(metric[b], x[b], size[b], r, naive_energy(metric[b], 0.3, 1.0), protected=2)
        torch.testing.assert_close(got_e[0][b], want_x, rtol=0, atol=1e-12)
        torch.testing.assert_close(got_e[1][b], want_s, rtol=0, atol=0)
        torch.testing.assert_close(got_b[0][b, :2], x[b, :2], rtol=0, atol=0)  # class and distillation untouched
        for p, (score, q) in naive_lsh_partners(metric[b], planes, 2, 2, 8, protected=2).items():
            if q is None:
                continue
            found += 1
            assert float(best[b, p // 2]) == pytest.approx(score, abs=1e-9)
            assert int(partner[b, p // 2]) * 2 + 1 == q
    assert found > n  # most A tokens of the 3 clips found a hashed partner: not vacuous


def test_attention_and_hashed_energy_matchers_agree_with_naive_loops_on_ast_tokens(spectrograms):
    """importance / zerotprune (written for one class token: called with protected=1 here) and the
    hashed energy rule (both AST prefix tokens protected) on the first layer's tokens and attention."""
    from mergeseek.encoders.merging import importance_merging, zerotprune_merging
    from mergeseek.encoders.merging.energy import energy_lsh_merging

    from test_energy import naive_buckets
    from test_seed_methods import naive_importance, naive_zerotprune

    x, metric, probs = _first_layer_inputs(small_ast(), spectrograms[:3])
    size = torch.ones(*x.shape[:2], 1, dtype=torch.float64)
    r, bits, tables = 12, 2, 2
    planes = simhash_planes(metric.shape[-1], bits, tables, seed=4)
    outs = {"importance": merge_wavg(importance_merging(metric, r, protected=1, size=size, attn=probs[:, :, :1]), x, size),
            "zerotprune": merge_wavg(zerotprune_merging(metric, r, protected=1, size=size, attn=probs, iters=3)[0], x, size),
            "energy_lsh": merge_wavg(energy_lsh_merging(metric.float(), r, protected=2, planes=planes, lsh_bits=bits,
                                                        lsh_tables=tables, padded=False), x, size)}
    for b in range(3):
        energy, codes = naive_buckets(metric[b].float(), planes, bits, tables)
        mates = lambda a, c: any(codes[a][t] == codes[c][t] for t in range(tables))  # noqa: E731
        wants = {"importance": (naive_importance(metric[b], x[b], size[b], probs[b, :, 0].mean(0), r), 1e-7),
                 "zerotprune": (naive_zerotprune(metric[b], x[b], size[b], probs[b], r, 3), 1e-7),
                 "energy_lsh": (naive_merge(metric[b], x[b], size[b], r, energy, 2, mates), 1e-6)}
        for name, (want, tol) in wants.items():
            torch.testing.assert_close(outs[name][0][b], want[0], rtol=0, atol=tol, msg=name)
            torch.testing.assert_close(outs[name][1][b], want[1], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("protected", [2, 0])
def test_pair_matchers_agree_with_naive_loops_on_ast_tokens(spectrograms, protected):
    """One-to-one greedy pairs, exact and hashed, on the first layer's tokens (AST's two prefix
    tokens protected, and none, as on the speech reference)."""
    from mergeseek.encoders.merging import pairs
    from mergeseek.encoders.merging.pairs import pairs_lsh_merging, pairs_merging

    from test_pairs import _check, naive_exact_edges, naive_window_edges

    x, metric, _ = _first_layer_inputs(small_ast(), spectrograms[:3])
    size = torch.ones(*x.shape[:2], 1, dtype=torch.float64)
    r, bits, tables, window = 12, 3, 2, 8
    _check(pairs_merging(metric, r, protected=protected, size=size, padded=False), metric, x, size, r,
           lambda m: naive_exact_edges(m, protected, pairs.PAIR_CANDIDATES), protected, 1e-12)
    planes = simhash_planes(metric.shape[-1], bits, tables, seed=1, dtype=torch.float64)
    hashed = pairs_lsh_merging(metric, r, protected=protected, planes=planes, lsh_bits=bits, lsh_tables=tables,
                               lsh_window=window, size=size, padded=False)
    _check(hashed, metric, x, size, r, lambda m: naive_window_edges(m, planes, bits, tables, window, protected),
           protected, 1e-12)


def test_bench_runs_hf_ast_with_cpu_time(monkeypatch):
    """``cli.py bench --model hf-ast``: the AST path of the throughput bench, on a small config."""
    import bench.hf_ast as hf
    from bench.throughput import run_throughput

    monkeypatch.setattr(hf, "random_ast", lambda device="cpu", **c: small_ast().to(device))
    report = run_throughput("hf-ast", None, ["r=8", "r=8,method=lsh"], batch_size=2, iters=1, warmup=0,
                            device="cpu", clock="cpu", profile=False)
    rows = {r["merge"]: r for r in report["rows"]}
    assert report["tokens_in"] == TOKENS and report["image_size"] == f"{FRAMES} frames x {MELS} mel bins"
    assert rows["method=bipartite,r=8"]["tokens"] == [54, 46, 38] == rows["method=lsh,r=8"]["tokens"]
    assert rows["none"]["flop_ratio"] == 1.0 and rows["method=bipartite,r=8"]["flop_ratio"] > 1.2
