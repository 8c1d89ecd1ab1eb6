"""nanotune's model: a hand-written LLaMA/Mistral/Qwen2/Qwen3 decoder with HF checkpoint I/O."""
from .io import load_pretrained, save_pretrained
from .model import KVCache, ModelConfig, Transformer
from .tokenizer import Tokenizer, load_tokenizer
from .weights import CheckpointError

__all__ = ["CheckpointError", "KVCache", "ModelConfig", "Tokenizer", "Transformer", "load_pretrained",
           "load_tokenizer", "save_pretrained"]
