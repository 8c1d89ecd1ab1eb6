"""The pieces Gemma (Gemma Team 2024, "Gemma: Open Models Based on Gemini Research and Technology"; Gemma 2 and
Gemma 3 technical reports) adds to the LLaMA decoder, with HF's module names:
  embeddings scaled by sqrt(hidden_size)              (ScaledEmbedding, still `model.embed_tokens.weight`)
  RMSNorm with a (1 + w) gain, weights stored around 0 (model.RMSNorm's `offset`)
  GeGLU MLP: gelu_tanh(W_gate x) * (W_up x)            (model.MLP with hidden_activation)
  Gemma 2/3: a norm after attention and around the MLP ("sandwich", Block), sliding-window layers alternating
  with global ones (layer_types), attention scale query_pre_attn_scalar^-1/2, and soft-capping (Gemma 2):
      softcap(z) = c * tanh(z / c)
  on the attention logits (ops.attention) and on the final logits (SoftcapLinear, the `lm_head`).
  Gemma 3: (1 + w) q/k norms, and its own rope base for the sliding layers (rope.rope_inv_freq).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def softcap(z, cap: float):
    """c * tanh(z / c): smooth, ~identity for |z| << c, bounded by c (Gemma 2, sec. 2)."""
    return torch.tanh(z / cap) * cap


class ScaledEmbedding(nn.Embedding):
    """Token embeddings times sqrt(hidden_size), the scale rounded to the weights' dtype first as HF does (in bf16,
    sqrt(3072) = 55.43 becomes 55.5)."""

    def __init__(self, num: int, dim: int, scale: float, **kw):
        super().__init__(num, dim, **kw)
        self.scale = scale

    def forward(self, ids):
        return super().forward(ids) * torch.tensor(self.scale, device=self.weight.device).to(self.weight.dtype)


class SoftcapLinear(nn.Linear):
    """The LM head with Gemma 2's final logit soft-capping: logits = softcap(W h, cap). An nn.Linear subclass, so
    the key stays `lm_head.weight`; train.py's fused loss sees it is not a plain Linear and takes the plain path,
    which calls this forward (the soft-cap and its gradient included)."""

    def __init__(self, d: int, vocab: int, cap: float):
        super().__init__(d, vocab, bias=False)
        self.cap = cap

    def forward(self, h):
        return softcap(F.linear(h, self.weight), self.cap)
