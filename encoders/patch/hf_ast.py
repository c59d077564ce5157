"""Token merging for Hugging Face ``transformers``' Audio Spectrogram Transformer (``ASTModel``,
also inside ``ASTForAudioClassification``): its ``ASTLayer`` (pre-norm attention and MLP) through
the shared merged block (``common.MergingBlock``), the class and distillation tokens protected.

The classifier pools ``(token 0 + token 1) / 2``; both are protected, stay first and keep size 1,
so the pooled output needs no sizes. The attention follows the model's implementation: the eager
one (``attn_implementation="eager"``) written as ``transformers`` writes it (r=0 then gives the same
bits), any other through the fused kernel. Which models qualify is the family adapter's answer
(``encoders.family.HfAstFamily``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from mergeseek.encoders.patch.common import MergingBlock, attention_probs, key_metric, layer_norm, run_blocks, sdpa
from mergeseek.errors import UnsupportedModelError

Tensor = torch.Tensor


def ast_attention(attn, x: Tensor, bias: Optional[Tensor], needs: str, mode: str = "auto", metric: bool = True):
    """``ASTAttention`` (separate q/k/v projections) with an additive key bias [B, 1, 1, N].

    Returns (output, ``key_metric(keys, metric)``, attention probabilities if ``needs`` them).
    """
    batch, n, _ = x.shape
    shape = (batch, n, -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    dropout = attn.attention_dropout if attn.training else 0.0
    if attn.config._attn_implementation == "eager":
        logits = torch.matmul(q, k.transpose(2, 3)) * attn.scaling
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        weights = F.dropout(F.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype), p=dropout, training=attn.training)
        out = torch.matmul(weights, v)
    else:
        out = sdpa(q, k, v, bias, dropout, scale=attn.scaling, mode=mode)
    out = attn.o_proj(out.transpose(1, 2).reshape(batch, n, -1))
    return out, key_metric(k, metric), attention_probs(q, k, bias, attn.scaling, needs)


class MergingASTLayer(MergingBlock):
    """Mixin for ``ASTLayer``."""

    def _merge_attend(self, x: Tensor, bias: Optional[Tensor], needs: str, mode: str, metric: bool):
        h, metric, probs = ast_attention(self.attention, layer_norm(self.layernorm_before, x), bias, needs, mode, metric=metric)
        return self.dropout(h), metric, probs

    def _merge_mlp(self, x: Tensor) -> Tensor:
        return self.dropout(self.mlp(layer_norm(self.layernorm_after, x)))


class MergingASTModel:
    """Mixin for ``ASTModel``: embeddings, merged layers, final norm and the two-token pooling.

    ``last_hidden_state`` holds the merged tokens (fewer than the patches); hidden states and
    attention maps per layer are not recorded (their widths change from layer to layer).
    """

    def forward(self, input_values: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if attention_mask is not None:
            raise UnsupportedModelError("token merging cannot honour a caller attention mask; call the model without one")
        for flag in ("output_hidden_states", "output_attentions"):
            if kwargs.get(flag, getattr(self.config, flag, False)):
                raise UnsupportedModelError(f"{flag}=True is not available with token merging (the token count changes "
                                            "from layer to layer); call the merged model without it")
        x = self.embeddings(input_values)
        x, _, stats = run_blocks(self.layers, x, self._merge_cfg, self._merge_plan())
        self._merge_last = stats
        x = self.layernorm(x)
        out = BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=(x[:, 0] + x[:, 1]) / 2)
        return out if kwargs.get("return_dict", True) else out.to_tuple()
