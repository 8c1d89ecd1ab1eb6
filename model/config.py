"""ModelConfig: the architecture switches of the decoder, read from an HF config.json (`ModelConfig.from_hf`).

Every supported model_type is a set of switches on one decoder (model.py): no registry, no per-family class.
  llama, mistral (sliding window), qwen2 (q/k/v biases), qwen3 (q/k norms)
  gemma, gemma2, gemma3_text (gemma.py: scaled embeddings, (1 + w) norms, GeGLU; 2/3: sandwich norms, alternating
      sliding/global layers, query_pre_attn_scalar; 2: soft-capping; 3: q/k norms and a local rope base)
  phi3 (fused qkv_proj / gate_up_proj, partial rotary, LongRoPE)
  mixtral, qwen2_moe, qwen3_moe (moe.py: top-k routed experts, Qwen2-MoE's gated shared expert)
Each failure is a one-line ValueError naming the file and the key, raised before anything is built.
"""
from dataclasses import dataclass, field, fields

import torch.nn.functional as F

from . import checks
from .rope import rope_scaling

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral",
                         "qwen2_moe", "qwen3_moe")
GEMMA = ("gemma", "gemma2", "gemma3_text")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
# config.json sizes the model is built from: each a positive integer of at most checks.MAX_SIZE
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim")
LAYER_TYPES = ("full_attention", "sliding_attention")
# fields set per architecture below, not read from config.json under their own name
DERIVED = {"hf", "rope_scaling", "attention_bias", "o_bias", "qk_norm", "sliding_window", "norm_offset", "embed_scale",
           "sandwich_norms", "attn_softcap", "final_softcap", "attn_scale", "layer_types", "rope_local_theta",
           "partial_rotary_factor", "fused_qkv", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
           "shared_expert_intermediate_size", "norm_topk_prob", "router_aux_loss_coef", "moe_layers",
           "output_router_logits"}


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 0                    # 0: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None     # {"rope_type": "llama3" | "linear" | "dynamic" | "yarn" | "longrope", ...}
    max_position_embeddings: int = 4096
    attention_bias: bool = False         # q/k/v biases (Qwen2 always has them)
    o_bias: bool = False                 # o_proj bias (llama's attention_bias also covers o_proj)
    mlp_bias: bool = False
    qk_norm: bool = False                # Qwen3, Gemma 3: RMSNorm over head_dim on q and k
    sliding_window: int | None = None    # attend to at most this many previous tokens (on sliding layers)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    # Gemma
    norm_offset: float = 0.0             # RMSNorm gain (offset + w): 1 for Gemma
    embed_scale: float | None = None     # embeddings times this (sqrt(hidden_size) for Gemma)
    sandwich_norms: bool = False         # Gemma 2/3: norms after attention and before/after the MLP
    attn_softcap: float | None = None    # Gemma 2: c tanh(logits / c) on the attention logits
    final_softcap: float | None = None   # ... and on the LM head's logits
    attn_scale: float | None = None      # softmax scale; None: head_dim^-1/2 (Gemma 2/3: query_pre_attn_scalar^-1/2)
    layer_types: list | None = None      # per layer "full_attention" | "sliding_attention"; None: all one kind
    rope_local_theta: float | None = None  # Gemma 3: the sliding layers' rope base (no scaling there)
    # Phi-3
    partial_rotary_factor: float = 1.0   # the fraction of head_dim that rotates
    fused_qkv: bool = False              # one qkv_proj and one gate_up_proj (Phi-3's checkpoint layout)
    # mixture of experts (moe.py)
    num_experts: int = 0                 # 0: a dense MLP in every layer
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's gated shared expert (0: none)
    norm_topk_prob: bool = False         # renormalise the top-k router weights (always, for Mixtral)
    router_aux_loss_coef: float = 0.0
    output_router_logits: bool = False   # config.json's switch: train with the aux loss (as HF's forward does)
    moe_layers: list | None = None       # the layer indices with a sparse MoE block
    hf: dict = field(default_factory=dict, repr=False)  # the original config.json, written back on save

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window is not None else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        if self.moe_layers is None:
            self.moe_layers = list(range(self.num_hidden_layers)) if self.num_experts else []

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Build from an HF config.json dict. An unsupported architecture, a value of the wrong type, a size that is
        not a positive integer, heads that don't divide, incomplete rope scaling: a one-line error naming `source`
        and the key, raised before anything is built."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: model_type {mt!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        types = {f.name: f.type for f in fields(cls)}
        kw = {k: checks.expect(d[k], types[k], source, k) for k in sorted(set(types) - DERIVED)
              if d.get(k) is not None}
        if mt in GEMMA:
            kw.setdefault("head_dim", 256)  # HF's Gemma defaults, when config.json leaves them out
            kw.setdefault("tie_word_embeddings", True)
            if mt != "gemma":  # Gemma 2/3 read hidden_activation; Gemma 1's legacy "gelu" means the tanh one
                kw["hidden_act"] = checks.expect(d.get("hidden_activation") or "gelu_pytorch_tanh", str, source,
                                                 "hidden_activation")
            elif kw.get("hidden_act", "gelu") == "gelu":
                kw["hidden_act"] = "gelu_pytorch_tanh"
        if kw.get("hidden_act", "silu") not in ACTIVATIONS:
            raise ValueError(f"{source}: hidden_act {kw['hidden_act']!r} is not supported "
                             f"(supported: {', '.join(ACTIVATIONS)})")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in kw]
        if missing:
            raise ValueError(f"{source}: missing key(s) {', '.join(missing)}")
        kw.setdefault("num_key_value_heads", kw["num_attention_heads"])
        check_values(kw, source)
        for k in ("attention_bias", "use_sliding_window", "qkv_bias", "norm_topk_prob", "output_router_logits",
                  "use_bidirectional_attention"):
            checks.expect(d.get(k, False), bool | None, source, k)
        if d.get("use_bidirectional_attention"):
            raise ValueError(f"{source}: use_bidirectional_attention=true (an encoder) is not supported")
        _rope(kw, d, mt, source)
        _attention(kw, d, mt, source)
        if mt in MOE:
            _moe(kw, d, mt, source)
        return cls(**kw, hf=dict(d))

    def to_hf(self) -> dict:
        """The config.json to save: the original dict when there is one, else one built from our fields."""
        if self.hf:
            return dict(self.hf)
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(self.model_type)
        if arch is None:
            raise ValueError(f"model_type {self.model_type}: saving needs the config.json it was built from")
        d = {k: getattr(self, k) for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                           "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                           "head_dim", "hidden_act", "rms_norm_eps", "rope_theta",
                                           "rope_scaling", "max_position_embeddings", "tie_word_embeddings",
                                           "bos_token_id", "eos_token_id", "pad_token_id")}
        d["architectures"] = [arch]
        if self.model_type in ("llama", "qwen3"):
            d["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        return d


def _number(d, key, source, default=None, positive=True):
    v = d.get(key, default)
    if v is None:
        return None
    return checks.positive(v, source, key) if positive else checks.expect(v, float, source, key)


def _rope(kw, d, mt, source):
    """rope_theta / rope_scaling from transformers 4's keys or 5's rope_parameters (nested per layer type for
    Gemma 3, whose rope_scaling applies to the global layers only), and Phi-3's partial_rotary_factor."""
    rope = checks.expect(d.get("rope_parameters") or {}, dict, source, "rope_parameters")
    checks.expect(d.get("rope_scaling"), dict | None, source, "rope_scaling")
    local = None
    if mt == "gemma3_text":
        if "full_attention" in rope or "sliding_attention" in rope:
            local = checks.expect(rope.get("sliding_attention") or {}, dict, source, "rope_parameters.sliding_attention")
            rope = checks.expect(rope.get("full_attention") or {}, dict, source, "rope_parameters.full_attention")
        kw["rope_local_theta"] = checks.positive((local or {}).get("rope_theta", d.get("rope_local_base_freq", 1e4)),
                                                 source, "rope_local_base_freq")
        kw.setdefault("rope_theta", 1e6)
        if local and local.get("rope_type", "default") != "default":
            raise ValueError(f"{source}: rope_parameters.sliding_attention of type {local['rope_type']} is not "
                             f"supported (Gemma 3's sliding layers use the default rope)")
    if "rope_theta" in rope:
        kw["rope_theta"] = checks.positive(rope["rope_theta"], source, "rope_parameters.rope_theta")
    prf = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    kw["partial_rotary_factor"] = checks.positive(prf, source, "partial_rotary_factor")
    if prf > 1:
        raise ValueError(f"{source}: partial_rotary_factor={prf} must be at most 1")
    rotary = int(kw.get("head_dim", kw["hidden_size"] // kw["num_attention_heads"]) * prf)
    if rotary % 2:
        raise ValueError(f"{source}: the rotary dimension head_dim * partial_rotary_factor = {rotary} is odd")
    scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", rope.get("type", "default")) != "default"
                                        else None)
    if scaling:
        kw["rope_scaling"] = rope_scaling(scaling, source, d, rotary)


def _attention(kw, d, mt, source):
    """Biases, q/k norms, sliding windows and their layer pattern, Gemma's switches, Phi-3's fused projections."""
    if mt in ("qwen2", "qwen2_moe"):  # Qwen2 has q/k/v biases (qkv_bias in Qwen2-MoE) and no o_proj bias
        kw["attention_bias"] = bool(d.get("qkv_bias", True))
    elif mt in ("qwen3", "qwen3_moe"):
        kw["attention_bias"], kw["qk_norm"] = bool(d.get("attention_bias", False)), True
        kw["o_bias"] = kw["attention_bias"]
    elif mt in ("phi3", "mixtral"):  # no biases whatever config.json says
        pass
    else:
        kw["attention_bias"] = kw["o_bias"] = bool(d.get("attention_bias", False))
    window = None
    if mt in ("mistral", "phi3", "mixtral") or mt in GEMMA[1:]:
        window = d.get("sliding_window", 4096 if mt in GEMMA else None)
        window = None if window is None else checks.size(window, source, "sliding_window", None)
    elif d.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window=true is not supported for {mt}")
    kw["sliding_window"] = window
    kw["fused_qkv"] = mt == "phi3"
    if mt not in GEMMA:
        return
    kw["norm_offset"], kw["embed_scale"] = 1.0, kw["hidden_size"] ** 0.5
    if mt == "gemma":
        return
    kw["sandwich_norms"], kw["qk_norm"] = True, mt == "gemma3_text"
    kw["attn_scale"] = _number(d, "query_pre_attn_scalar", source, 256) ** -0.5
    caps = (50.0, 30.0) if mt == "gemma2" else (None, None)
    if mt == "gemma2":  # Gemma 3 has attn_logit_softcapping in its config but never applies it (as in HF)
        kw["attn_softcap"] = _number(d, "attn_logit_softcapping", source, caps[0])
    kw["final_softcap"] = _number(d, "final_logit_softcapping", source, caps[1])
    n = kw["num_hidden_layers"]
    types = d.get("layer_types")
    if types is None:  # Gemma 2: every other layer sliding; Gemma 3: 5 sliding then 1 global
        every = 2 if mt == "gemma2" else checks.size(d.get("sliding_window_pattern", 6), source,
                                                     "sliding_window_pattern")
        types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    if not (isinstance(types, list) and len(types) == n and all(t in LAYER_TYPES for t in types)):
        raise ValueError(f"{source}: layer_types must list {n} of {', '.join(LAYER_TYPES)}, got {types!r}"[:200])
    kw["layer_types"] = types


def _moe(kw, d, mt, source):
    """Expert counts and sizes, the router's options, and which layers are sparse (Qwen: decoder_sparse_step and
    mlp_only_layers)."""
    # Mixtral's key is num_local_experts; Qwen's num_experts (transformers 5 writes Qwen3-MoE's under both names)
    n_key = "num_local_experts" if mt == "mixtral" or d.get("num_experts") is None else "num_experts"
    for k in (n_key, "num_experts_per_tok") + (() if mt == "mixtral" else ("moe_intermediate_size",)):
        if d.get(k) is None:
            raise ValueError(f"{source}: missing key {k}")
    kw["num_experts"] = checks.size(d[n_key], source, n_key)
    kw["num_experts_per_tok"] = checks.size(d["num_experts_per_tok"], source, "num_experts_per_tok")
    if kw["num_experts_per_tok"] > kw["num_experts"]:
        raise ValueError(f"{source}: num_experts_per_tok={kw['num_experts_per_tok']} exceeds {n_key}="
                         f"{kw['num_experts']}")
    kw["moe_intermediate_size"] = kw["intermediate_size"] if mt == "mixtral" else \
        checks.size(d["moe_intermediate_size"], source, "moe_intermediate_size")
    if mt == "qwen2_moe":
        kw["shared_expert_intermediate_size"] = checks.size(d.get("shared_expert_intermediate_size"), source,
                                                            "shared_expert_intermediate_size")
    kw["norm_topk_prob"] = bool(d.get("norm_topk_prob", False))
    kw["router_aux_loss_coef"] = _number(d, "router_aux_loss_coef", source, 0.001, positive=False)
    kw["output_router_logits"] = bool(d.get("output_router_logits", False))
    if d.get("router_jitter_noise"):
        raise ValueError(f"{source}: router_jitter_noise={d['router_jitter_noise']} is not supported (set it to 0)")
    n = kw["num_hidden_layers"]
    if mt == "mixtral":
        kw["moe_layers"] = list(range(n))
        return
    step = checks.size(d.get("decoder_sparse_step", 1), source, "decoder_sparse_step")
    dense = checks.expect(d.get("mlp_only_layers") or [], list[int], source, "mlp_only_layers")
    kw["moe_layers"] = [i for i in range(n) if i not in dense and (i + 1) % step == 0]


def check_values(kw: dict, source):
    """The sizes, numbers and token ids among config.json's values for ModelConfig's fields (`kw`, of the right
    types already): positive sizes, heads that divide, an even head_dim, token ids >= 0."""
    for k in SIZES:
        if k in kw:
            checks.size(kw[k], source, k)
    checks.size(kw.get("max_position_embeddings", 1), source, "max_position_embeddings", limit=None)
    for k in ("rms_norm_eps", "rope_theta"):
        if k in kw:
            checks.positive(kw[k], source, k)
    for k in ("bos_token_id", "pad_token_id", "eos_token_id"):
        ids = kw.get(k)
        if not all(checks.matches(i, int) and i >= 0 for i in (ids if isinstance(ids, list) else [ids or 0])):
            raise ValueError(f"{source}: {k} must be a token id (an integer >= 0) or a list of them, got {ids!r}")
    hidden, nh, nkv = kw["hidden_size"], kw["num_attention_heads"], kw["num_key_value_heads"]
    if "head_dim" not in kw and hidden % nh:
        raise ValueError(f"{source}: hidden_size={hidden} is not a multiple of num_attention_heads={nh} (and "
                         f"there is no head_dim)")
    if nh % nkv:
        raise ValueError(f"{source}: num_attention_heads={nh} is not a multiple of num_key_value_heads={nkv}")
    if kw.get("head_dim", hidden // nh) % 2:
        raise ValueError(f"{source}: head_dim={kw.get('head_dim', hidden // nh)} is odd (RoPE rotates pairs of "
                         f"dimensions)")
