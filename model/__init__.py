"""nanotune's model: a hand-written LLaMA/Mistral/Qwen/Gemma/Phi-3/MoE decoder with HF checkpoint I/O."""
from .io import load_pretrained, save_pretrained
from .model import KVCache, ModelConfig, Transformer, lean_mask
from .moe import aux_loss, router_loss
from .tokenizer import Tokenizer, load_tokenizer
from .weights import CheckpointError

__all__ = ["CheckpointError", "KVCache", "ModelConfig", "Tokenizer", "Transformer", "load_pretrained",
           "lean_mask", "load_tokenizer", "router_loss", "aux_loss", "save_pretrained"]
