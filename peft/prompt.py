"""Prompt tuning and P-tuning: n trainable virtual tokens prepended to the input embeddings of a frozen model.

Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning":
    h_0 = [P ; E(x)],   P in R^{n x D} trained, the base model (and its embedding E) frozen.
Liu et al. 2021, "GPT Understands, Too" (P-tuning): P = f(P_e), a reparameterisation of the virtual-token
embeddings P_e by a prompt encoder f, exactly PEFT's `PromptEncoder`:
    MLP:   f(e) = W3 relu(W2 relu(W1 e + b1) + b2) + b3
    LSTM:  f(e) = W2 relu(W1 [h_fwd ; h_bwd] + b1) + b2,   (h_fwd, h_bwd) = BiLSTM(P_e)

PEFT's conventions (docs/peft_prompt.md): positions 0 .. n+T-1 over [virtual ; real], the attention mask gets n ones in
front, labels n -100s (`pad_labels`). The HF PEFT file holds only `prompt_embeddings` (n, D) = f(P_e). To let
P-tuning resume training, `save_extra` also writes the encoder itself to `prompt_encoder.safetensors` (keys =
PEFT's `PromptEncoder` state dict). Prefix tuning (peft/prefix.py) reuses `VirtualTokenWrapper` and that file.
"""
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from safetensors.torch import save_file

from model import checks
from model.io import read_safetensors, stored_shapes
from model.ops import Segments
from model.weights import meta_device

from .core import build_config, forwards_replaced

ENCODER_FILE = "prompt_encoder.safetensors"


def check_positive(owner: str, **values):
    """One-line ValueError for a config value that must be a positive int."""
    for k, v in values.items():
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ValueError(f"{owner}: {k} must be a positive integer, got {v!r}")


@dataclass
class PromptConfig:
    """Prompt tuning. init: "random" (N(0,1), PEFT's RANDOM), "sample_vocab" (rows of n random vocabulary
    tokens), "text" (the embeddings of `init_text`'s tokens, repeated or cut to n, PEFT's TEXT)."""
    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    token_dim: int | None = None                # filled by apply() from the model, like PEFT
    num_layers: int | None = None
    num_attention_heads: int | None = None
    base_model_name_or_path: str | None = None
    peft_type = "PROMPT_TUNING"
    methods = {"prompt": {}}                      # train.py --method name -> preset fields (see LoraConfig)
    flags = {"num_virtual_tokens": "num_virtual_tokens", "prompt_init": "init", "prompt_init_text": "init_text"}

    def __post_init__(self):
        check_positive(type(self).__name__, num_virtual_tokens=self.num_virtual_tokens)
        if self.init not in ("random", "sample_vocab", "text"):
            raise ValueError(f"PromptConfig: init must be random | sample_vocab | text, got {self.init!r}")
        if self.init == "text" and self.tokenizer_name_or_path is None:  # the base model's own tokenizer
            self.tokenizer_name_or_path = self.base_model_name_or_path
        if self.init == "text" and not (self.init_text and self.tokenizer_name_or_path):
            raise ValueError("PromptConfig: init='text' needs init_text and tokenizer_name_or_path")

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("init", "init_text")}
        return {**d, "peft_type": self.peft_type, "task_type": "CAUSAL_LM", "num_transformer_submodules": 1,
                "inference_mode": True, "prompt_tuning_init": self.init.upper(),
                "prompt_tuning_init_text": self.init_text}

    @classmethod
    def from_json(cls, d: dict, source: str = "adapter_config.json"):
        return build_config(cls, d, source, {"prompt_tuning_init_text": "init_text"},
                                init=str(d.get("prompt_tuning_init", "RANDOM")).lower())


@dataclass
class PTuningConfig:
    """P-tuning: virtual tokens produced by an MLP or bi-LSTM prompt encoder (PEFT's PromptEncoderConfig)."""
    num_virtual_tokens: int = 20
    encoder: str = "mlp"                         # "mlp" | "lstm"
    encoder_hidden_size: int | None = None       # default: token_dim (PEFT's default)
    encoder_num_layers: int = 2                  # LSTM layers (the MLP always has 3 linears, as in PEFT)
    encoder_dropout: float = 0.0                 # LSTM dropout between layers
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    base_model_name_or_path: str | None = None
    peft_type = "P_TUNING"
    methods = {"ptuning": {}}
    flags = {"num_virtual_tokens": "num_virtual_tokens", "ptuning_encoder": "encoder",
             "encoder_hidden_size": "encoder_hidden_size", "ptuning_encoder_layers": "encoder_num_layers",
             "ptuning_encoder_dropout": "encoder_dropout"}

    def __post_init__(self):
        check_positive("PTuningConfig", num_virtual_tokens=self.num_virtual_tokens,
                       encoder_hidden_size=self.encoder_hidden_size, encoder_num_layers=self.encoder_num_layers)
        if (self.encoder_num_layers or 0) > checks.MAX_LAYERS:  # an LSTM of 10**4 layers takes minutes just to build
            raise ValueError(f"PTuningConfig: encoder_num_layers must be at most {checks.MAX_LAYERS}, "
                             f"got {self.encoder_num_layers}")
        if self.encoder not in ("mlp", "lstm"):
            raise ValueError(f"PTuningConfig: encoder must be mlp | lstm, got {self.encoder!r}")

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "encoder"}
        return {**d, "peft_type": self.peft_type, "task_type": "CAUSAL_LM", "num_transformer_submodules": 1,
                "inference_mode": True, "encoder_reparameterization_type": self.encoder.upper()}

    @classmethod
    def from_json(cls, d: dict, source: str = "adapter_config.json"):
        return build_config(cls, d, source, encoder=str(d.get("encoder_reparameterization_type", "MLP")).lower())


class PromptEncoder(nn.Module):
    """P-tuning's f(P_e); parameter names and layers are PEFT's PromptEncoder, so its weights load 1:1."""

    def __init__(self, cfg: PTuningConfig):
        super().__init__()
        n, d, h = cfg.num_virtual_tokens, cfg.token_dim, cfg.encoder_hidden_size or cfg.token_dim
        self.kind = cfg.encoder
        self.embedding = nn.Embedding(n, d)                 # P_e, N(0, 1)
        if cfg.encoder == "lstm":
            self.lstm_head = nn.LSTM(d, h, num_layers=cfg.encoder_num_layers, dropout=cfg.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def forward(self):
        e = self.embedding.weight[None]                     # (1, n, D)
        if self.kind == "lstm":
            e = self.lstm_head(e)[0]                        # (1, n, 2h): forward and backward states
        return self.mlp_head(e)[0]                          # (n, D)


class Table(nn.Module):
    """The virtual tokens as a plain trainable table (prompt tuning, or any method loaded from a PEFT file)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.embedding = nn.Embedding.from_pretrained(weight.float(), freeze=False)

    def forward(self):
        return self.embedding.weight                        # (n, D)


class VirtualTokenWrapper(nn.Module):
    """Composition over a frozen base Transformer; `encoder()` gives the learned (n, ·) tensor that is exported
    as `prompt_embeddings`. Shared by prompt tuning, P-tuning and prefix tuning."""

    def __init__(self, base, encoder: nn.Module, peft_cfg):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.encoder = encoder
        self.peft_config = peft_cfg
        self.n_virtual = peft_cfg.num_virtual_tokens

    cfg = property(lambda self: self.base.cfg)
    lm_head = property(lambda self: self.base.lm_head)
    device = property(lambda self: self.base.device)
    dtype = property(lambda self: self.base.dtype)

    def base_forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, hidden_only=False, **_):
        """The frozen base alone on the real tokens (peft.disabled): no virtual tokens, no prefix."""
        return self.base(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         hidden_only=hidden_only)

    @property
    def gradient_checkpointing(self):
        return self.base.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on):
        self.base.gradient_checkpointing = on


class PromptWrapper(VirtualTokenWrapper):
    def make_encoder(self):
        """A fresh reparameterised encoder for this config (None for plain prompt tuning)."""
        return PromptEncoder(self.peft_config) if isinstance(self.peft_config, PTuningConfig) else None

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, hidden_only=False,
                return_virtual=False):
        """Outputs for the real tokens (B, T, ·); with return_virtual, PEFT's (B, n+T, ·) incl. virtual ones.
        attention_mask and position_ids cover real tokens only; the virtual tokens go in on the first call
        (empty cache) and then live in the cache."""
        n = self.n_virtual
        x = self.base.model.embed_tokens(input_ids)                  # (B, T, D)
        B, T, _ = x.shape
        first = cache is None or cache.seq_len == 0
        if first:
            prompts = self.encoder().to(x.dtype)[None].expand(B, -1, -1)  # (B, n, D)
            x = torch.cat([prompts, x], dim=1)                        # (B, n + T, D)
        if position_ids is not None:                                  # real tokens come after the n virtual ones
            position_ids = position_ids + n
            if first:
                position_ids = torch.cat([torch.arange(n, device=x.device).expand(B, n), position_ids], dim=1)
        if isinstance(attention_mask, Segments):  # packed rows: every example sees the virtual tokens, so a mask
            attention_mask = attention_mask.dense(x.device)
        if attention_mask is not None:
            attention_mask = extend_mask(attention_mask, n, first)
        out = self.base(inputs_embeds=x, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                        hidden_only=hidden_only)
        return out if return_virtual or not first else out[:, n:]


def extend_mask(mask, n: int, first: bool):
    """Add the n virtual tokens to a (B, S) padding mask (n ones in front, as PEFT) or to a (B, 1, T, S) bool
    mask: real queries see all virtual tokens; on the first call the virtual queries are causal among themselves."""
    if mask.dim() == 2:
        return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)   # (B, n + S)
    m = mask.bool()
    B, _, T, S = m.shape
    m = torch.cat([m.new_ones(B, 1, T, n), m], dim=-1)               # (B, 1, T, n + S)
    if first:
        top = torch.ones(n, n, dtype=torch.bool, device=m.device).tril()
        top = torch.cat([top, top.new_zeros(n, S)], dim=1)            # (n, n + S)
        m = torch.cat([top.expand(B, 1, n, n + S), m], dim=2)         # (B, 1, n + T, n + S)
    return m


def pad_labels(labels: torch.Tensor, n: int) -> torch.Tensor:
    """PEFT's labels for prompt methods: n -100s in front, to pair with return_virtual=True outputs."""
    return torch.cat([labels.new_full((labels.shape[0], n), -100), labels], dim=1)


def _fill(base, cfg):
    """Write the model's dims into the config (in place, as PEFT's _prepare_prompt_learning_config does)."""
    c = base.cfg
    cfg.token_dim, cfg.num_layers, cfg.num_attention_heads = c.hidden_size, c.num_hidden_layers, c.num_attention_heads
    return cfg


def _init_prompt(base, cfg: PromptConfig) -> torch.Tensor:
    emb = base.model.embed_tokens
    table = nn.Embedding(cfg.num_virtual_tokens, cfg.token_dim).weight.data  # N(0, 1), drawn first like PEFT
    if cfg.init == "random":
        return table
    if cfg.init == "sample_vocab":
        ids = torch.randint(0, emb.num_embeddings, (cfg.num_virtual_tokens,))
    else:
        from model import load_tokenizer
        ids = load_tokenizer(cfg.tokenizer_name_or_path).encode(cfg.init_text)
        if not ids:
            raise ValueError(f"PromptConfig: init_text {cfg.init_text!r} encodes to no tokens")
        ids = torch.tensor((ids * -(-cfg.num_virtual_tokens // len(ids)))[:cfg.num_virtual_tokens])
    return emb.weight.detach()[ids.to(emb.weight.device)].float().clone()


CONFIGS = (PromptConfig, PTuningConfig)


def apply(model, cfg):
    """Freeze `model` and wrap it with trainable virtual tokens (PromptConfig or PTuningConfig)."""
    cfg = _fill(model, cfg)
    if isinstance(cfg, PTuningConfig):
        encoder = PromptEncoder(cfg)
    else:
        encoder = Table(_init_prompt(model, cfg))
    return PromptWrapper(model, encoder.to(model.device), cfg)


def disabled(model):
    """peft.disabled: the wrapper calls its base alone (prompt tuning, P-tuning; prefix tuning too)."""
    return forwards_replaced([(model, model.base_forward)])


def export_state(model) -> dict:
    """HF PEFT's adapter_model.safetensors content: the virtual tokens (n, ·), fp32, on the model's device (also
    the meta device: peft.check_adapter's dry run asks import_state, which asks this, for the shape)."""
    with torch.no_grad():
        return {"prompt_embeddings": model.encoder().detach().float().contiguous()}


def import_state(model, sd: dict, source: str = "adapter_model.safetensors"):
    """Load PEFT's `prompt_embeddings`. A reparameterised encoder can't be recovered from its output, so the
    wrapper switches to the plain table (use load_extra to restore the encoder and keep training it)."""
    if "prompt_embeddings" not in sd:
        raise ValueError(f"{source}: missing tensor prompt_embeddings (found: {', '.join(sorted(sd)) or 'none'})")
    w = sd["prompt_embeddings"]
    want = tuple(export_state(model)["prompt_embeddings"].shape)
    if tuple(w.shape) != want:
        raise ValueError(f"{source}: tensor prompt_embeddings has shape {tuple(w.shape)}, this model needs {want}")
    model.encoder = Table(w.to(model.device))
    return model


def save_extra(model, path):
    """Beside the PEFT files, keep a reparameterised encoder (P-tuning, prefix projection) for resuming."""
    if not isinstance(model.encoder, Table):
        sd = {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}
        tmp = os.path.join(path, ENCODER_FILE + ".tmp")
        save_file(sd, tmp)
        os.replace(tmp, os.path.join(path, ENCODER_FILE))


def load_extra(model, path):
    """Restore the encoder saved by save_extra (if present), after import_state; it must reproduce the
    exported prompt_embeddings, else the two files don't belong together."""
    file = os.path.join(path, ENCODER_FILE)
    if not os.path.exists(file):
        return model
    table = model.encoder().detach()
    with meta_device():  # the encoder's names and shapes against the file's header, before either is read
        expected = model.make_encoder()
    if expected is None:
        raise ValueError(f"{file}: {model.peft_config.peft_type} has no encoder to load")
    expected = {k: tuple(v.shape) for k, v in expected.state_dict().items()}
    stored = stored_shapes(file)
    missing = set(expected) ^ set(stored)
    if missing:
        raise ValueError(f"{file}: tensors do not match this method's encoder: {', '.join(sorted(missing))}")
    for k, shape in expected.items():
        if stored[k] != shape:
            raise ValueError(f"{file}: tensor {k} has shape {stored[k]}, the adapter's config gives {shape}")
    encoder = model.make_encoder()
    encoder.load_state_dict(read_safetensors(file))
    encoder.to(model.device)
    with torch.no_grad():
        if not torch.allclose(encoder().float(), table.float(), atol=1e-5, rtol=1e-4):
            raise ValueError(f"{file}: the encoder's output differs from prompt_embeddings in the adapter file")
    model.encoder = encoder
    return model
