"""nanotune's fine-tuning script: one file, read top to bottom. Single process or `torchrun` data-parallel.

    python train.py --model DIR|FILE.gguf --data FILE[,FILE...] --method full|lora|qlora|prefix|... --out DIR [flags]
    torchrun --nproc_per_node=N train.py ... [--zero 1|2|3 [--offload]]

Loss: the mean cross-entropy over ALL trained tokens of the global batch (every micro-batch of every rank), not a
mean of per-batch means: each micro-batch backpropagates sum(token losses) / N_global, where N_global (the global
count of label tokens) is all-reduced before the forward passes; data-parallel ranks then SUM their gradients.
Logits are computed only at trained positions, in chunks, with the cross-entropy gradient formed on the fly
(`ChunkedCE`), so no (tokens x vocab) fp32 tensor is ever kept.
"""
import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist  # torch's collectives; our ZeRO package `dist/` is imported by name below
import torch.nn as nn
from safetensors.torch import load_file, save_file

import data
import model as M
from model.ops import gemm_operand
from dist import ZeroOptimizer, gathered_params, init_distributed
from dist import load_checkpoint as zload, save_checkpoint as zsave

METHODS = ("full", "lora", "dora", "qlora", "adapter", "prefix", "prompt", "ptuning", "bitfit", "ia3",
           "llama_adapter")


@dataclass
class TrainConfig:
    model: str = ""                       # HF model directory or .gguf file
    data: str = ""                        # training file(s), comma-separated
    out: str = "runs/train"
    method: str = "lora"
    max_steps: int = 0                    # optimizer steps; 0: use --epochs
    epochs: float = 1.0
    batch_size: int = 4                   # micro-batch per rank
    grad_accum: int = 1
    seq_len: int = 512
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 0                       # warmup steps (linear from 0)
    schedule: str = "cosine"              # cosine | linear | constant (after warmup)
    max_grad_norm: float = 1.0            # 0: no clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    seed: int = 0
    precision: str = "fp32"               # fp32 | bf16 | fp16 (autocast; weights stay fp32)
    grad_checkpointing: bool = False
    pack: bool = False
    eval_data: str = ""
    eval_split: float = 0.0
    eval_every: int = 0
    eval_samples: int = 2                 # greedy generations printed at each eval
    save_every: int = 0
    keep: int = 2
    resume: bool = False
    merge: bool = False
    train_on_prompt: bool = False
    template: str = ""                    # built-in chat template (chatml, llama3, llama2, alpaca); "": the model's
    skip_bad_records: bool = False
    log_every: int = 1
    # LoRA / DoRA (Hu et al. 2021; Liu et al. 2024)
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"      # comma-separated module names, a regex, or all-linear
    lora_rslora: bool = False
    # IA3 (Liu et al. 2022), BitFit (Ben Zaken et al. 2022), bottleneck adapters (Houlsby 2019 / Pfeiffer 2020)
    ia3_targets: str = ""                 # "": PEFT's default for the model type
    ia3_feedforward: str = ""             # "": down_proj
    bitfit_targets: str = ""              # linears that get a new zero bias; "": only existing biases
    adapter_kind: str = "houlsby"         # houlsby | pfeiffer
    adapter_reduction: int = 16           # bottleneck width = hidden / reduction
    # prompt methods: prefix tuning (Li & Liang 2021), prompt tuning (Lester et al. 2021), P-tuning (Liu et al.
    # 2021), LLaMA-Adapter (Zhang et al. 2023)
    num_virtual_tokens: int = 20          # prefix / prompt / ptuning
    prompt_init: str = "random"           # prompt: random | sample_vocab | text
    prompt_init_text: str = ""            # prompt: the text whose token embeddings initialise the prompt
    ptuning_encoder: str = "mlp"          # ptuning: mlp | lstm
    encoder_hidden_size: int = 0          # ptuning encoder / prefix projection width; 0: the method's default
    prefix_projection: bool = False       # prefix: train the prefix through an MLP (exported projected)
    adapter_len: int = 10                 # llama_adapter: prompt slots per adapted layer
    adapter_layers: int = 8               # llama_adapter: adapt the top N layers
    # ZeRO (Rajbhandari et al. 2020) and ZeRO-Offload (Ren et al. 2021), dist/
    zero: int = 0                         # 0: plain data parallel (all-reduce); 1 | 2 | 3: ZeRO stage
    offload: bool = False                 # ZeRO: fp32 master weights, gradients shard, AdamW state + step on CPU
    config: str = field(default="", metadata={"help": "TOML file setting any of these keys"})


def parse_args(argv=None) -> TrainConfig:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool" or isinstance(f.default, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            ap.add_argument(flag, type=type(f.default), default=None)
    a = vars(ap.parse_args(argv))
    cfg = TrainConfig()
    if a["config"]:  # TOML first, then explicit flags win
        toml = tomllib.loads(Path(a["config"]).read_text())
        for k, v in toml.items():
            k = k.replace("-", "_")
            if not hasattr(cfg, k):
                sys.exit(f"error: {a['config']}: unknown key {k!r}")
            setattr(cfg, k, v)
    for k, v in a.items():
        if v is not None:
            setattr(cfg, k, v)
    for k, v in (("method", METHODS), ("schedule", ("cosine", "linear", "constant")),
                 ("precision", ("fp32", "bf16", "fp16"))):
        if getattr(cfg, k) not in v:
            sys.exit(f"error: --{k} {getattr(cfg, k)!r}: expected one of {', '.join(v)}")
    if not cfg.model or not cfg.data:
        sys.exit("error: --model and --data are required")
    if cfg.zero not in (0, 1, 2, 3):
        sys.exit(f"error: --zero {cfg.zero}: expected 0 (plain data parallel), 1, 2 or 3")
    if cfg.offload and not cfg.zero:
        sys.exit("error: --offload needs --zero 1, 2 or 3 (it offloads the ZeRO optimizer's state)")
    if cfg.zero and cfg.precision == "fp16":
        sys.exit("error: --zero: use --precision bf16 or fp32 (ZeRO has no fp16 loss scaling)")
    if cfg.zero == 3 and cfg.method in ("prefix", "prompt", "ptuning"):
        sys.exit(f"error: --zero 3 shards the decoder's blocks, but --method {cfg.method} trains only its small "
                 "prompt encoder (the base is frozen): use --zero 1 or 2")
    return cfg


# ----------------------------------------------------------------------------------------------- model + method
def build_model(cfg: TrainConfig, device):
    """Load the base, attach the PEFT method (the one block that knows about methods), freeze what is frozen."""
    if cfg.method == "full":
        model = M.load_pretrained(cfg.model, dtype=torch.float32, device=device)
        model.gradient_checkpointing = cfg.grad_checkpointing
        return model
    import peft  # imported here: full fine-tuning needs no peft/
    if cfg.method in ("lora", "dora", "qlora"):
        pcfg = peft.LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                               targets=_targets(cfg.lora_targets), rslora=cfg.lora_rslora, dora=cfg.method == "dora")
    elif cfg.method == "ia3":
        pcfg = peft.IA3Config(targets=_targets(cfg.ia3_targets), feedforward=_targets(cfg.ia3_feedforward))
    elif cfg.method == "bitfit":
        pcfg = peft.BitFitConfig(targets=_targets(cfg.bitfit_targets))
    elif cfg.method == "adapter":
        pcfg = peft.AdapterConfig(kind=cfg.adapter_kind, reduction_factor=cfg.adapter_reduction)
    elif cfg.method == "prefix":
        pcfg = peft.PrefixConfig(num_virtual_tokens=cfg.num_virtual_tokens, prefix_projection=cfg.prefix_projection,
                                 encoder_hidden_size=cfg.encoder_hidden_size or None)
    elif cfg.method == "prompt":
        pcfg = peft.PromptConfig(num_virtual_tokens=cfg.num_virtual_tokens, init=cfg.prompt_init,
                                 init_text=cfg.prompt_init_text or None,
                                 tokenizer_name_or_path=cfg.model if cfg.prompt_init == "text" else None)
    elif cfg.method == "ptuning":
        pcfg = peft.PTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, encoder=cfg.ptuning_encoder,
                                  encoder_hidden_size=cfg.encoder_hidden_size or None)
    else:  # llama_adapter
        pcfg = peft.LlamaAdapterConfig(adapter_len=cfg.adapter_len, adapter_layers=cfg.adapter_layers)
    if cfg.method == "qlora":  # the base's linears are quantized to NF4 while loading (quant/), then LoRA
        from quant import qlora
        model = qlora.load_qlora(cfg.model, pcfg, dtype=torch.float32, device=device)
    else:  # prompt methods return a wrapper holding the base as .base; the others modify the base in place
        model = peft.apply(M.load_pretrained(cfg.model, dtype=torch.float32, device=device), pcfg)
    unwrap(model).gradient_checkpointing = cfg.grad_checkpointing
    if cfg.precision == "bf16" and cfg.method in ("lora", "dora"):
        # frozen base matrices stored in bf16: no per-step weight casts under autocast, half the memory
        for name, p in model.named_parameters():
            if not p.requires_grad and p.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name:
                p.data = p.data.to(torch.bfloat16)
    return model


def _targets(s: str):
    """--*-targets: "" -> None (the method's default), "all-linear", a regex, or comma-separated module names."""
    if not s or s == "all-linear" or ("," not in s and any(c in s for c in "^$.*+?[]()|\\")):
        return s or None
    return s.split(",")


def unwrap(model) -> M.Transformer:
    """The plain Transformer (what checkpoints are saved from) under any PEFT wrapper."""
    if isinstance(model, M.Transformer):
        return model
    import peft
    return peft.unwrap(model)


def trainable(model) -> dict[str, nn.Parameter]:
    """Trainable parameters by name: the base's names, or `encoder.*` of a prompt-method wrapper (its virtual
    tokens live in the wrapper, not in the base)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------------- loss
class ChunkedCE(torch.autograd.Function):
    """sum_i CE(W h_i, y_i) over N selected positions, in chunks. The gradient of each chunk,
    dL/dlogits = softmax(logits) - onehot(y), is turned into dL/dh (and dL/dW) right away, so only (N, D) and
    (V, D) tensors are kept for backward, never (N, V) logits. Operands are rounded to `dtype` (the autocast dtype)
    and multiplied where model.ops.gemm_dtype says (fp32 on a CPU without bf16 units); logits are fp32."""

    @staticmethod
    def forward(ctx, h, w, y, chunk: int, dtype):
        with torch.autocast(h.device.type, enabled=False):
            wc = gemm_operand(w, dtype)                                # rounded to dtype, see model.ops
            gh = torch.empty_like(h)                                   # (N, D)
            gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            for i in range(0, h.shape[0], chunk):
                hc, yc = gemm_operand(h[i:i + chunk], dtype), y[i:i + chunk]
                logits = (hc @ wc.T).float()                            # (n, V)
                lse = torch.logsumexp(logits, -1)                       # (n,)
                loss += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
                g = logits.sub_(lse[:, None]).exp_()                    # softmax, in place
                g[torch.arange(len(yc), device=g.device), yc] -= 1.0
                g = gemm_operand(g, dtype)
                gh[i:i + chunk] = (g @ wc).to(h.dtype)
                if gw is not None:
                    gw += (g.T @ hc).float()
        ctx.save_for_backward(gh, gw)
        ctx.w_dtype = w.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw = ctx.saved_tensors
        return gh * grad_out, None if gw is None else (gw * grad_out).to(ctx.w_dtype), None, None, None


def loss_sum(model, batch, device, chunk: int = 256):
    """Sum of next-token cross-entropies over the trained positions of one micro-batch (fp32 scalar).
    chunk: positions per (chunk, vocab) logits block. 256 (50 MB for a 49k vocab): the block is the forward's
    peak-memory transient (SmolLM2 B8xT128 packed, peak RSS 2.47 GB with 1024, 2.24 GB with 256), at ~2% of step
    time on a CPU."""
    labels = batch["labels"].to(device)
    hidden = model(batch["input_ids"].to(device), attention_mask=_to(batch["attention_mask"], device),
                   position_ids=_to(batch["position_ids"], device), hidden_only=True)   # (B, T, D)
    sel = labels[:, 1:] != -100                                                          # (B, T-1)
    h, y = hidden[:, :-1][sel], labels[:, 1:][sel]                                       # (N, D), (N,)
    head = model.lm_head
    if type(head) is nn.Linear and head.bias is None:
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else h.dtype
        return ChunkedCE.apply(h, head.weight, y, chunk, dtype)
    total = 0.0  # a wrapped lm_head (e.g. LoRA on lm_head): plain chunks
    for i in range(0, h.shape[0], chunk):
        total = total + nn.functional.cross_entropy(head(h[i:i + chunk]).float(), y[i:i + chunk], reduction="sum")
    return total


def _to(x, device):
    return None if x is None else x.to(device)


# ------------------------------------------------------------------------------------------ distributed helpers
def all_sum(x: float | int, device) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def sync_grads(params: list[nn.Parameter]):
    """Plain data parallelism: SUM the (already 1/N_global-weighted) gradients of all ranks, one flat buffer."""
    if not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    assert flat.is_contiguous()  # gloo returns wrong data for non-contiguous views
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).to(p.dtype)
        offset += g.numel()


# ------------------------------------------------------------------------------------------------ the step
def train_step(model, micro_batches, optimizer, scheduler, cfg: TrainConfig, device, scaler=None) -> dict:
    """One optimizer step over this rank's micro-batches. The same function for 1 or N processes, plain data
    parallel or ZeRO (whose optimizer reduces the gradients itself: in backward for stages 2/3, at clip for 1)."""
    zero = isinstance(optimizer, ZeroOptimizer)
    params = list(trainable(model).values())
    n_global = all_sum(sum(data.count_targets(b) for b in micro_batches), device)
    total = 0.0
    for b in micro_batches:
        with autocast(cfg, device):
            s = loss_sum(model, b, device)
        loss = s / max(n_global, 1)
        if zero:
            optimizer.backward(loss)  # stage 2/3: reduce-scatters gradient buckets while backward runs
        else:
            (scaler.scale(loss) if scaler else loss).backward()
        total += s.item()
    if not zero:
        sync_grads(params)
    loss = all_sum(total, device) / max(n_global, 1)
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "finite": False}
    if scaler:
        scaler.unscale_(optimizer)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    if zero:  # the global norm over all ranks' gradient shards
        norm = optimizer.clip_grad_norm_(max_norm)
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "finite": True, "grad_norm": norm.item(), "trained_tokens": int(n_global)}


def autocast(cfg: TrainConfig, device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def make_optimizer(model, cfg: TrainConfig, device):
    """AdamW over the trainable parameters; with --zero, the ZeRO-sharded AdamW of dist/ (same update)."""
    if cfg.zero:
        names = trainable(model)
        groups = [{"params": [n for n, p in names.items() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [n for n, p in names.items() if p.dim() < 2], "weight_decay": 0.0}]
        # average_grads=False: each rank's loss is already divided by the GLOBAL token count, so the sum of the
        # ranks' gradients is the gradient of the global mean (as sync_grads does)
        return ZeroOptimizer(model, cfg.zero, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             groups=[g for g in groups if g["params"]], offload=cfg.offload, average_grads=False)
    params = list(trainable(model).values())
    decay = [p for p in params if p.dim() >= 2]  # no weight decay on norms, biases, vectors
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    fused = all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps, fused=fused)


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    """Linear warmup from 0, then cosine / linear decay to 0 or constant (HF's get_*_schedule_with_warmup)."""
    def factor(step):
        if step < cfg.warmup:
            return step / max(1, cfg.warmup)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup) / max(1, total_steps - cfg.warmup)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------------- data
def load_data(cfg: TrainConfig, tok, rank: int):
    """Train / eval examples (validated, tokenised, optionally packed). DataError ends the run in main()."""
    kw = dict(seq_len=cfg.seq_len, template=cfg.template or None, train_on_prompt=cfg.train_on_prompt,
              skip_bad=cfg.skip_bad_records)
    train, st = data.load_examples(tok, cfg.data.split(","), **kw)
    ev, est = (data.load_examples(tok, cfg.eval_data.split(","), **kw) if cfg.eval_data else ([], None))
    if cfg.eval_split and not cfg.eval_data:
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        n = max(1, int(len(train) * cfg.eval_split))
        ev, train = [train[i] for i in order[:n]], [train[i] for i in sorted(order[n:])]
    if rank == 0:
        print(f"data: {st['records']} records -> {len(train)} train / {len(ev)} eval examples; "
              f"{st['truncated']} truncated to {cfg.seq_len} tokens; {st['no_target']} without trained tokens "
              f"dropped" + (f"; {st['bad'] + (est or {}).get('bad', 0)} bad records skipped"
                            if cfg.skip_bad_records else ""), flush=True)
    if cfg.pack:
        train, ev = data.pack(train, cfg.seq_len), data.pack(ev, cfg.seq_len)
    if not train:
        raise data.DataError(f"{cfg.data}: no usable training examples")
    return train, ev, st


def micro_batches(examples, cfg: TrainConfig, step: int, rank: int, world: int, pad_id: int):
    """This rank's micro-batches for optimizer step `step` (0-based): a pure function of (seed, step), which is
    what makes resume exact. Global batch = batch_size x grad_accum x world; micro-batch j of rank r holds
    examples [(j * world + r) * B, ...) of it."""
    B, G = cfg.batch_size, cfg.batch_size * cfg.grad_accum * world
    per_epoch = steps_per_epoch(examples, cfg, world)
    epoch, i = divmod(step, per_epoch)
    batch = data.batch_order([len(e.ids) for e in examples], G, cfg.seed, epoch, bucket=not cfg.pack)[i]
    out = []
    for j in range(cfg.grad_accum):
        part = batch[(j * world + rank) * B:(j * world + rank + 1) * B]
        if part:
            out.append(data.collate([examples[k] for k in part], pad_id))
    return out


def steps_per_epoch(examples, cfg: TrainConfig, world: int) -> int:
    return max(1, len(examples) // (cfg.batch_size * cfg.grad_accum * world))


@torch.no_grad()
def evaluate(model, examples, cfg: TrainConfig, device, pad_id) -> float:
    """Token-weighted mean loss over the whole eval set."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(examples), cfg.batch_size):
        b = data.collate(examples[i:i + cfg.batch_size], pad_id)
        with autocast(cfg, device):
            total += float(loss_sum(model, b, device))
        n += data.count_targets(b)
    model.train()
    return total / max(n, 1)


@torch.no_grad()
def generate(model, tok, messages, device, max_new: int = 48, template=None, cfg: TrainConfig | None = None) -> str:
    """Greedy answer to a conversation (everything up to its last assistant turn), with a KV cache."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, template=template)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)], device=device)
    was_training = model.training
    model.eval()
    cache, out = M.KVCache(unwrap(model).cfg.num_hidden_layers), []
    with autocast(cfg or TrainConfig(), device):
        for _ in range(max_new):
            logits = model(ids, cache=cache)
            nxt = int(logits[0, -1].argmax())
            if nxt in tok.stop_ids:
                break
            out.append(nxt)
            ids = torch.tensor([[nxt]], device=device)
    model.train(was_training)
    return tok.decode(out).strip()


# ----------------------------------------------------------------------------------------------- checkpoints
def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, keep: int, rank: int = 0):
    """checkpoints/step-N/: trainable weights, optimizer, scheduler, RNG states, step (= data position).
    Written into a temporary dir, fsynced, then renamed: a step-N dir is always complete. Every rank calls it:
    with ZeRO, `zero.safetensors` (fp32 master weights + AdamW moments, world-size independent) is gathered by a
    collective and replaces trainable.safetensors and the optimizer state; rank 0 writes all the files."""
    zero = isinstance(optimizer, ZeroOptimizer)
    root = out / "checkpoints"
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if zero:
        zsave(optimizer, tmp / "zero.safetensors")  # collective (ends with a barrier): after rank 0's mkdir
    if rank != 0:
        return
    if not zero:
        save_file({n: p.detach().contiguous() for n, p in trainable(model).items()},
                  str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": None if zero else optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python_rng": random.getstate()}, tmp / "state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}) + "\n")
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    for old in sorted(complete_checkpoints(out))[:-keep] if keep > 0 else []:
        shutil.rmtree(root / f"step-{old}")


def complete_checkpoints(out: Path) -> list[int]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(d.name[5:]) for d in root.iterdir()
                  if d.name.startswith("step-") and (d / "trainer_state.json").is_file())


def load_checkpoint(out: Path, step: int, model, optimizer, scheduler, device):
    """Every rank loads the same checkpoint (ZeRO: each takes its own shard of zero.safetensors)."""
    d = out / "checkpoints" / f"step-{step}"
    zero = isinstance(optimizer, ZeroOptimizer)
    if zero != (d / "zero.safetensors").is_file():
        raise ValueError(f"{d}: written {'without' if zero else 'with'} --zero; resume it "
                         f"{'without' if zero else 'with'} --zero too")
    if zero:
        zload(optimizer, d / "zero.safetensors")
    else:
        sd = load_file(str(d / "trainable.safetensors"), device=str(device))
        with torch.no_grad():
            for n, p in trainable(model).items():
                p.copy_(sd[n])
    st = torch.load(d / "state.pt", map_location="cpu", weights_only=True)
    if not zero:
        optimizer.load_state_dict(st["optimizer"])
    scheduler.load_state_dict(st["scheduler"])
    torch.set_rng_state(st["torch_rng"])
    if st["cuda_rng"]:
        torch.cuda.set_rng_state_all(st["cuda_rng"])
    random.setstate(_tuples(st["python_rng"]))


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_final(out: Path, model, cfg: TrainConfig, tok):
    if cfg.method == "full":
        M.save_pretrained(unwrap(model), out / "model")
        tok.save(out / "model")
        return out / "model"
    import peft
    peft.save_adapter(model, out / "adapter", base_model_path=cfg.model)
    if cfg.merge and cfg.method == "qlora":  # merge into the DEQUANTIZED base: 4-bit codes would lose the delta
        from quant import qlora
        M.save_pretrained(qlora.merge_dequantized(model, torch.float32), out / "model")
        tok.save(out / "model")
    elif cfg.merge:  # fold the adapter into fp32 base weights, drop the wrappers, write an HF model
        try:
            M.save_pretrained(peft.merge_and_unload(model.float()), out / "model")
            tok.save(out / "model")
        except ValueError as e:  # a method that can't be merged (bottleneck adapters, prompt methods)
            print(f"warning: --merge: {e}; only the adapter was saved", file=sys.stderr)
    return out / "adapter"


def plot_loss(out: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    tr = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    plt.figure(figsize=(6, 4))
    plt.plot(*zip(*tr), label="train")
    if ev:
        plt.plot(*zip(*ev), "o-", label="eval")
    plt.xlabel("step"), plt.ylabel("loss"), plt.legend(), plt.tight_layout()
    plt.savefig(out / "loss.png")


class Logger:
    """metrics.jsonl (+ TensorBoard if installed), rank 0 only."""

    def __init__(self, out: Path, resume_step: int, on: bool):
        self.on, self.f, self.tb = on, None, None
        if not on:
            return
        path = out / "metrics.jsonl"
        old = path.read_text().splitlines() if resume_step and path.exists() else []
        keep = [l for l in old if json.loads(l).get("step", 0) <= resume_step]  # drop steps redone after resume
        self.f = open(path, "w")
        self.f.write("".join(l + "\n" for l in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            pass

    def log(self, rec: dict):
        if not self.on:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self):
        if self.f:
            self.f.close()
        if self.tb:
            self.tb.close()


# ------------------------------------------------------------------------------------------------------ main
def main(argv=None):
    cfg = parse_args(argv)
    # torchrun's environment -> process group (gloo on CPU, nccl on GPU) with a timeout, so a dead rank makes the
    # others fail instead of hanging; torchrun sets OMP_NUM_THREADS=1, so the cores are shared out explicitly
    env = init_distributed(timeout_s=600)
    world, rank, device = env.world_size, env.rank, env.device
    out = Path(cfg.out)
    try:
        tok = M.load_tokenizer(cfg.model)
        train_ex, eval_ex, stats = load_data(cfg, tok, rank)  # validated before anything is written in --out
        if not cfg.resume and complete_checkpoints(out):
            raise data.DataError(f"{out}: holds checkpoints from an earlier run; pass --resume or another --out")
    except (data.DataError, M.CheckpointError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    pad_id = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch(train_ex, cfg, world)))

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    try:
        model = build_model(cfg, device)
    except ValueError as e:  # bad method options (unknown target module, r <= 0, ...)
        sys.exit(f"error: {e}")
    model.train()
    optimizer = make_optimizer(model, cfg, device)
    zero = isinstance(optimizer, ZeroOptimizer)
    scheduler = make_scheduler(optimizer.optimizer if zero else optimizer, cfg, total)  # ZeRO: its inner AdamW
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    start = 0
    if cfg.resume and complete_checkpoints(out):
        start = complete_checkpoints(out)[-1]
        try:
            load_checkpoint(out, start, model, optimizer, scheduler, device)
        except ValueError as e:  # written with/without --zero, or parameter names that don't match
            sys.exit(f"error: {e}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for d in (out / "checkpoints").glob(".tmp-*"):  # a save killed half-way
            shutil.rmtree(d)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        n_train = sum(p.numel() for p in trainable(model).values())
        n_all = sum(p.numel() for p in model.parameters())  # a prompt wrapper: base + encoder
        print(f"model: {cfg.model} | method {cfg.method} | trainable params: {n_train:,} || all params: "
              f"{n_all:,} || trainable%: {100 * n_train / n_all:.4f} | steps {start}->{total} | world {world}",
              flush=True)
        if start:
            print(f"resumed from {out / 'checkpoints' / f'step-{start}'}", flush=True)
    log = Logger(out, start, rank == 0)
    # ZeRO-3 gathers each block's weights from all ranks in forward: eval and samples then run on every rank
    evaluator = rank == 0 or cfg.zero == 3
    prompts = [p for _, kind, p in data.read_records((cfg.eval_data or cfg.data).split(","), True)
               if kind == "chat"][:cfg.eval_samples] if cfg.eval_every and evaluator else []

    from tqdm import tqdm
    bar = tqdm(range(start, total), initial=start, total=total, disable=rank != 0, dynamic_ncols=True)
    seen = 0
    for step in bar:
        t0 = time.perf_counter()
        mbs = micro_batches(train_ex, cfg, step, rank, world, pad_id)
        ntok = all_sum(sum(int((b["input_ids"] != pad_id).sum()) if b["attention_mask"] is not None
                           else b["input_ids"].numel() for b in mbs), device)
        lr = scheduler.get_last_lr()[0]
        m = train_step(model, mbs, optimizer, scheduler, cfg, device, scaler)
        if not m["finite"]:
            last = complete_checkpoints(out)
            log.close()
            sys.exit(f"error: step {step + 1}: loss is {m['loss']} (not finite); stopped without updating the "
                     f"weights. Last good checkpoint: "
                     + (str(out / "checkpoints" / f"step-{last[-1]}") if last else "none")
                     + ". Try a lower --lr, --precision fp32/bf16 or --max-grad-norm 1.")
        dt = time.perf_counter() - t0
        seen += ntok
        rec = {"step": step + 1, "loss": m["loss"], "lr": lr, "grad_norm": m["grad_norm"], "tokens": int(seen),
               "trained_tokens": m["trained_tokens"], "tokens_per_s": ntok / dt}
        bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{ntok / dt:.0f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            log.log(rec)
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == total) and evaluator and eval_ex:
            ev = evaluate(model, eval_ex, cfg, device, pad_id)
            samples = [generate(model, tok, p, device, template=cfg.template or None, cfg=cfg) for p in prompts]
            log.log({"step": step + 1, "eval_loss": ev, "eval_ppl": math.exp(min(ev, 50)), "samples": samples})
            if rank == 0:
                tqdm.write(f"step {step + 1}: eval loss {ev:.4f} ppl {math.exp(min(ev, 50)):.2f}")
                for p, s in zip(prompts, samples):
                    q = next((m["content"] for m in reversed(p[:-1]) if m["role"] == "user"), "")
                    tqdm.write(f"  Q: {q[:80]!r}\n  A: {s[:200]!r}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_checkpoint(out, step + 1, model, optimizer, scheduler, cfg.keep, rank)
        if world > 1:
            dist.barrier()
    log.close()
    # ZeRO-3: every rank enters (the gather is a collective) so that rank 0 saves whole weights; else a no-op
    with gathered_params(optimizer) if cfg.zero == 3 else contextlib.nullcontext():
        if rank == 0:
            where = save_final(out, model, cfg, tok)
            plot_loss(out)
            print(f"saved {where}", flush=True)
    if world > 1:
        dist.destroy_process_group()
    return out


if __name__ == "__main__":
    main()
