"""``cli.py bench --model hf-ast``: transformers' ``ASTForAudioClassification`` at its default size
(``ASTConfig()``: ViT-B, 12 layers, 1024 frames x 128 mel bins, 16 x 16 patches at stride 10 ->
12 x 101 patches + class + distillation = 1214 tokens) with random weights: no download, timing
does not depend on the weights.

The input is real spectrogram-shaped sound made here (``eval.datasets.speech.voiced_syllables``:
voiced syllables in noise, 10.24 s), as a log-mel of the same layout and scale as transformers'
``ASTFeatureExtractor`` gives ([batch, frames, mel bins], (log-mel - mean) / (2 * std) with AST's
AudioSet mean and std).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

NAME = "hf-ast"
# ASTFeatureExtractor's AudioSet normalisation (its defaults)
AST_MEAN, AST_STD = -4.2677393, 4.5689974


def random_ast(device: str = "cpu", **config) -> Any:
    """``ASTForAudioClassification`` from ``ASTConfig(**config)`` with seeded random weights, in eval mode."""
    import torch

    from mergeseek.errors import MissingDependencyError

    try:
        from transformers import ASTConfig, ASTForAudioClassification
    except ImportError:
        raise MissingDependencyError("--model hf-ast needs Hugging Face transformers: pip install 'transformers>=5' "
                                     "(or the audio extra: pip install 'mergeseek[audio]')") from None
    torch.manual_seed(0)
    return ASTForAudioClassification(ASTConfig(**config)).to(device).eval()


def ast_spectrograms(batch_size: int, frames: int = 1024, n_mels: int = 128, seed: int = 0):
    """float32 [batch_size, frames, n_mels]: :func:`voiced_syllables` clips (several syllables each)
    as AST's feature extractor lays out and scales its log-mels."""
    import torch

    from mergeseek.eval.datasets.speech import SpeechWordsSpec, log_mel, voiced_syllables

    spec = SpeechWordsSpec(n_mels=n_mels, frames=frames, clip_s=frames * 160 / 16000)
    clips = voiced_syllables(batch_size, spec, seed=seed, per_clip=max(1, frames // 100))
    mel = torch.from_numpy(log_mel(clips, spec)).transpose(1, 2).contiguous()
    return (mel - AST_MEAN) / (2 * AST_STD)


@dataclass
class AstBench:
    """What ``bench.throughput.run_throughput`` asks of its ``base`` (an ``Encoder`` for open_clip
    models): the model (``model.visual``), device, input description and a batch of inputs."""

    visual: Any
    device: str
    image_size: str
    pretrained: Optional[str] = None

    @property
    def model(self) -> "AstBench":
        return self

    def sample(self, batch_size: int):
        cfg = self.visual.config
        return ast_spectrograms(batch_size, cfg.max_length, cfg.num_mel_bins).to(self.device)


def ast_bench(device: str = "auto", image_size: Optional[int] = None) -> AstBench:
    """The ``base`` of ``cli.py bench --model hf-ast``."""
    from mergeseek.errors import ConfigError
    from mergeseek.runtime import resolve_device

    if image_size is not None:
        raise ConfigError("--image-size does not apply to --model hf-ast (its input is 1024 frames x 128 mel bins)")
    device = resolve_device(device)
    model = random_ast(device)
    return AstBench(model, device, f"{model.config.max_length} frames x {model.config.num_mel_bins} mel bins")
