"""nanotune's fine-tuning script: one file, read top to bottom. Single process or `torchrun` data-parallel.

    python train.py --model DIR|FILE.gguf --data FILE[,FILE...] --method full|lora|qlora|prefix|... --out DIR [flags]
    torchrun --nproc_per_node=N train.py ... [--zero 1|2|3 [--offload]]

Loss: the mean cross-entropy over ALL trained tokens of the global batch (every micro-batch of every rank), not a
mean of per-batch means: each micro-batch backpropagates sum(token losses) / N_global, where N_global (the global
count of trained tokens) is all-reduced before the forward passes; data-parallel ranks then SUM their gradients.
Logits are computed only at trained positions, in chunks, with the cross-entropy gradient formed on the fly
(`model.ops.ChunkedCE`), so no (tokens x vocab) fp32 tensor is ever kept.

Methods come from peft's method table (peft/__init__.py `MODULES`): each method's config dataclass names its
--method names and its flags, so this file has no per-method code; `full` and `qlora` (LoRA over a base whose
linears are quantized to NF4 while loading, quant/) are the two it knows itself.
"""
import argparse
import json
import math
import random
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn

import data
import eval as benchmark  # eval.py (the name `eval` would hide the builtin)
import model as M
import peft
from dist import AllReduceAdamW, ZeroOptimizer, all_sum, init_distributed, ledger, sharded_load
from dist.run import (MARKER, Logger, StopSignal, check_out, claim_out, complete_checkpoints,
                      make_scheduler, remove_partial, resume, same_on_all_ranks, save_checkpoint, trajectory)
from model import classify, preference
from model.ops import ChunkedCE, ce_chunk, resolve_precision
from model.progress import progress, quiet, stage, write
from model.sampling import generate


@dataclass
class TrainConfig:
    model: str = ""                       # HF model directory or .gguf file; "": the embedded SmolLM2
    data: str = ""                        # training file(s), comma-separated
    out: str = "runs/train"
    method: str = "lora"                  # full | qlora | lora8 (LLM.int8 base) | a name from peft's method table
    stage: str = "sft"                    # sft (chats, raw text) | dpo (chosen/rejected pairs) | kto (labelled)
    task: str = "causal_lm"               # causal_lm | classify (text -> label) | reward (scores chosen > rejected)
    labels: str = ""                      # --task classify: the label set, comma-separated ("": from the data)
    pref_loss: str = "sigmoid"            # --stage dpo: sigmoid (DPO) | robust | ipo | simpo | orpo
    beta: float = 0.1                     # DPO / IPO / KTO / SimPO beta; ORPO's lambda
    label_smoothing: float = 0.0          # eps: cDPO (sigmoid), robust DPO (< 0.5), SimPO
    simpo_gamma: float = 0.5              # SimPO's target margin
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    precompute_ref: bool = False          # reference log-probs in one pass before training (full FT: no copy kept)
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
    precision: str = "default"            # default (CUDA bf16, else fp32) | fp32 | bf16 | fp16 | auto (autocast)
    grad_checkpointing: bool = False
    pack: bool = False
    eval_data: str = ""
    eval_split: float = 0.0
    eval_every: int = 0
    eval_samples: int = 2                 # greedy generations printed at each eval
    eval_tasks: str = ""                  # multiple-choice task JSONL(s), comma-separated: acc/acc_norm at the end
    eval_shots: int = 0                   # k-shot examples for --eval-tasks, from each task's .dev.jsonl (eval.py)
    save_every: int = 0
    keep: int = 2
    resume: bool = False
    resume_override: str = ""             # comma-separated keys --resume may see changed (e.g. lr,schedule)
    merge: bool = False
    train_on_prompt: bool = False
    template: str = ""                    # built-in chat template (chatml, llama3, llama2, alpaca); "": the model's
    skip_bad_records: bool = False
    strict_data: bool = False             # data warnings (ignored fields, placeholders, <image> tags) are errors
    dataset_dir: str = ""                 # a LLaMA-Factory dataset_info.json dir: --data names its datasets
    columns: str = ""                     # OURS=THEIRS,...: rename a file's fields (e.g. instruction=question)
    max_samples: int = 0                  # records read per file (0: all)
    mix: str = "concat"                   # several --data: concat | interleave (seeded, by --mix-probs)
    mix_probs: str = ""                   # interleave: one probability per --data item, e.g. 0.7,0.3
    truncation: str = "auto"              # long chats: auto (the final answer kept) | keep-start | keep-end | drop
    text_split: str = "blank"             # .txt documents: blank (blank-line separated) | lines | file
    system: str = ""                      # system message for chats without one (overrides the template's default)
    stream: bool = False                  # tokenise as training goes (bounded memory, needs --max-steps)
    log_every: int = 1
    quiet: bool = False                   # no progress bars / rate lines (tokenising, training, eval, saving)
    # ZeRO (Rajbhandari et al. 2020) and ZeRO-Offload (Ren et al. 2021), dist/
    zero: int = 0                         # 0: plain data parallel (all-reduce); 1 | 2 | 3: ZeRO stage
    offload: bool = False                 # ZeRO: fp32 master weights, gradients shard, AdamW state + step on CPU
    collective_timeout: float = 600.0     # seconds a rank waits in a collective before the run fails
    config: str = ""                      # TOML file setting any of these keys, method flags or [method] tables
    # the method's options: its flags (e.g. lora_r -> 16) and [method] TOML tables (e.g. lora -> {"r": 16})
    method_args: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ command line + TOML
# range checks, before anything is loaded: > 0, >= 0, and fractions in [0, 1)
POSITIVE = ("batch_size", "grad_accum", "seq_len", "lr", "adam_eps", "log_every", "collective_timeout", "beta",
            "kto_desirable_weight", "kto_undesirable_weight")
NON_NEGATIVE = ("max_steps", "epochs", "warmup", "weight_decay", "max_grad_norm", "eval_every", "eval_samples",
                "save_every", "keep", "seed", "eval_shots")
FRACTIONS = ("adam_beta1", "adam_beta2", "eval_split", "label_smoothing")


def parse_args(argv=None) -> TrainConfig:
    own = {f.name: type(f.default) for f in fields(TrainConfig) if f.name != "method_args"}
    opts, methods = peft.method_flags(), peft.method_configs()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, tp in {**own, **opts}.items():
        if tp is bool:
            ap.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=None)
        else:
            ap.add_argument("--" + name.replace("_", "-"), type=tp, default=None)
    a = vars(ap.parse_args(argv))
    cfg = TrainConfig()
    if a["config"]:  # TOML first, then explicit flags win
        try:
            toml = tomllib.loads(Path(a["config"]).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            sys.exit(f"error: {a['config']}: {e}")
        for k, v in toml.items():
            k = k.replace("-", "_")
            tp = own.get(k) or opts.get(k)
            if tp is not None and not peft.type_ok(v, tp):
                sys.exit(f"error: {a['config']}: {k} = {v!r}: expected {getattr(tp, '__name__', tp)}")
            if k in own:
                setattr(cfg, k, v)
            elif k in opts:
                cfg.method_args[k] = opts[k](v) if isinstance(v, str) else v
            elif k in methods and isinstance(v, dict):  # a [lora] table: the config's own field names
                try:
                    cfg.method_args[k] = peft.check_table(k, v, a["config"])
                except ValueError as e:
                    sys.exit(f"error: {e}")
            else:
                sys.exit(f"error: {a['config']}: unknown key {k!r}")
    for k, v in a.items():
        if v is not None:
            setattr(cfg, k, v) if k in own else cfg.method_args.__setitem__(k, v)
    for k, v in (("method", ("full", "qlora", "lora8", *methods)), ("schedule", ("cosine", "linear", "constant")),
                 ("precision", ("default", "fp32", "bf16", "fp16", "auto")), ("stage", ("sft", "dpo", "kto")),
                 ("pref_loss", ("sigmoid", "robust", "ipo", "simpo", "orpo"))):
        if getattr(cfg, k) not in v:
            sys.exit(f"error: --{k.replace('_', '-')} {getattr(cfg, k)!r}: expected one of {', '.join(v)}")
    if not cfg.data:
        sys.exit("error: --data is required")
    if bad := data.check_flags(cfg):
        sys.exit(f"error: {bad}")
    if cfg.zero not in (0, 1, 2, 3):
        sys.exit(f"error: --zero {cfg.zero}: expected 0 (plain data parallel), 1, 2 or 3")
    if cfg.offload and not cfg.zero:
        sys.exit("error: --offload needs --zero 1, 2 or 3 (it offloads the ZeRO optimizer's state)")
    if bad := classify.check_flags(cfg):  # --task, and what it doesn't combine with
        sys.exit(f"error: {bad}")
    if cfg.pack and cfg.stage != "sft":
        sys.exit(f"error: --pack: not with --stage {cfg.stage} (each pair or example is scored as its own row)")
    if cfg.precompute_ref and cfg.stage != "dpo":
        sys.exit("error: --precompute-ref: for --stage dpo (KTO's KL rows are paired within each batch)")
    if cfg.pref_loss == "robust" and cfg.label_smoothing >= 0.5:
        sys.exit(f"error: --label-smoothing {cfg.label_smoothing}: robust DPO needs a flip rate < 0.5")
    if cfg.zero and cfg.precision == "fp16":
        sys.exit("error: --zero: use --precision bf16 or fp32 (ZeRO has no fp16 loss scaling)")
    for k in POSITIVE + NON_NEGATIVE + FRACTIONS:
        v = getattr(cfg, k)
        if not math.isfinite(v) or v < 0 or (v == 0 and k in POSITIVE) or (v >= 1 and k in FRACTIONS):
            want = "> 0" if k in POSITIVE else ">= 0" if k in NON_NEGATIVE else "in [0, 1)"
            sys.exit(f"error: --{k.replace('_', '-')} {v}: expected a number {want}")
    if not cfg.max_steps and not cfg.epochs:
        sys.exit("error: --epochs 0 with --max-steps 0: nothing to train")
    cls = None if cfg.method == "full" else methods["lora" if cfg.method in ("qlora", "lora8") else cfg.method][0]
    used = {n for n, (c, _) in methods.items() if c is cls} | set(getattr(cls, "flags", ())) | {"qlora", "lora8"}
    for k in sorted(set(cfg.method_args) - used):  # another method's option: said, not silently dropped
        print(f"warning: {'[' + k + ']' if k in methods else '--' + k.replace('_', '-')} is not an option of "
              f"--method {cfg.method}: ignored", file=sys.stderr)
    return cfg


# ----------------------------------------------------------------------------------------------- model + method
def build_model(cfg: TrainConfig, device):
    """Load the base, attach the method, freeze what is frozen."""
    pcfg = None if cfg.method == "full" else peft.method_config(cfg.method, cfg.method_args, cfg.model)
    if cfg.zero == 3 and sharded_load.applies(cfg, pcfg):  # meta: ZeroOptimizer reads each rank's shards
        model = sharded_load.build(cfg.model, cfg.method, pcfg, device)
    elif cfg.method == "full":
        model = M.load_pretrained(cfg.model, dtype=torch.float32, device=device)
    elif cfg.method == "qlora":  # the base's linears are quantized to NF4 while loading, then LoRA on top
        from quant import qlora
        model = qlora.load_qlora(cfg.model, pcfg, dtype=torch.float32, device=device)
    elif cfg.method == "lora8":  # LLM.int8 base (quantized while loading, or a load_in_8bit dir), LoRA on top
        from quant import int8
        model = int8.load_lora8(cfg.model, pcfg, dtype=torch.float32, device=device)
    else:  # prompt methods return a wrapper holding the base as .base; the others modify the base in place
        model = peft.apply(M.load_pretrained(cfg.model, dtype=torch.float32, device=device), pcfg)
    peft.unwrap(model).gradient_checkpointing = cfg.grad_checkpointing
    pcfg = getattr(model, "peft_config", None)  # None for full fine-tuning
    if precision(cfg, device) == "bf16" and getattr(pcfg, "bf16_frozen_base", False):
        # frozen base matrices stored in bf16: no per-step weight casts under autocast, half the memory
        for name, p in model.named_parameters():
            if not p.requires_grad and p.dim() == 2 and p.is_floating_point() \
                    and "embed_tokens" not in name and "lm_head" not in name:
                p.data = sharded_load.cast(p.data, torch.bfloat16)  # a sharded load's stand-in stays one
    return model


def trainable(model) -> dict[str, nn.Parameter]:
    """Trainable parameters by name: the base's names, or `encoder.*` of a prompt-method wrapper."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def precision(cfg: TrainConfig, device) -> str:
    """--precision default: bf16 on CUDA, else fp32; auto: bf16 where the hardware multiplies bf16 natively."""
    return resolve_precision(cfg.precision, device)


def autocast(cfg: TrainConfig, device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision(cfg, device))
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ------------------------------------------------------------------------------------------------------- loss
def loss_sum(model, batch, device, cfg=None, reference=None, chunk: int = 0):
    """Sum of next-token cross-entropies over the trained positions of one micro-batch (fp32 scalar) and the
    metrics' sums ({} for SFT); preference batches: the sum of their pair / example losses (model/preference.py).
    chunk: positions per (chunk, vocab) logits block, the forward's largest transient (0: ops.ce_chunk's)."""
    if cfg is not None and cfg.task != "causal_lm":  # a classification / reward head (model/classify.py)
        return classify.loss_sum(model, batch, device, cfg)
    if "pairs" in batch or "examples" in batch:
        return preference.loss_sum(model, batch, device, cfg, reference)
    ids = batch["input_ids"].to(device)
    hidden = model(ids, attention_mask=_to(M.lean_mask(batch), device),  # right padding, packing: no dense mask
                   position_ids=_to(batch["position_ids"], device), hidden_only=True)   # (B, T, D)
    idx = batch["train_mask"][:, 1:].flatten().nonzero()[:, 0].to(device)            # (N,): token t+1 trained
    h, y = hidden[:, :-1].flatten(0, 1)[idx], ids[:, 1:].flatten()[idx]              # (N, D), (N,)
    aux = M.router_loss(model, batch["attention_mask"]) * len(y)  # MoE: the router's aux loss (0 if dense / off)
    head, chunk = model.lm_head, chunk or ce_chunk(device)
    if type(head) is nn.Linear and head.bias is None:
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else h.dtype
        return ChunkedCE.apply(h, head.weight, y, chunk, dtype) + aux, {}
    total = aux  # a wrapped lm_head (e.g. LoRA on lm_head): plain chunks
    for i in range(0, h.shape[0], chunk):
        total = total + nn.functional.cross_entropy(head(h[i:i + chunk]).float(), y[i:i + chunk], reduction="sum")
    return total, {}


def _to(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else x


# ------------------------------------------------------------------------------------------------ the step
def train_step(model, micro_batches, optimizer, scheduler, cfg: TrainConfig, device, reference=None, check=True):
    """One optimizer step over this rank's micro-batches, for 1 or N processes, plain data parallel or ZeRO (the
    optimizer reduces the gradients itself). Losses add up on the device: only with `check` (logging / saving
    steps) are they read (a host sync), the non-finite guard applied, the metrics returned as numbers."""
    n_global = all_sum(torch.tensor(float(sum(data.count_targets(b) for b in micro_batches))), device)
    total, sums = 0.0, {}
    for i, b in enumerate(micro_batches):
        with autocast(cfg, device):
            s, logs = loss_sum(model, b, device, cfg, reference)
        # + a method's own loss term once per step (AdaLoRA's orthogonality regulariser; 0 for most methods)
        optimizer.backward(s / n_global.clamp(min=1) + (peft.loss_term(model) if i == 0 else 0))
        total = total + s.detach().double()
        sums.update({k: sums.get(k, 0.0) + torch.as_tensor(v).detach().double() for k, v in logs.items()})
    loss = all_sum(total, device) / n_global.clamp(min=1)
    if check and not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return {"loss": float(loss), "why": f"loss is {float(loss)} (not finite)"}
    norm = optimizer.clip_grad_norm_(cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
    if check and not torch.isfinite(norm) and cfg.precision != "fp16":  # fp16: the loss scaler skips such a step itself
        optimizer.zero_grad(set_to_none=True)
        return {"loss": float(loss), "why": f"the gradient norm is {norm.item()} (not finite)"}
    if optimizer.step():  # False: fp16 loss scaling skipped a step with inf/nan gradients (the LR waits too)
        scheduler.step()
        peft.after_step(model, scheduler.last_epoch)  # a method's step on this step's gradients (AdaLoRA's budget)
    optimizer.zero_grad(set_to_none=True)
    counts = {k[3:]: all_sum(v, device) for k, v in sums.items() if k.startswith("_n/")}  # else: per pair/example
    m = {"loss": loss, "grad_norm": norm, "trained_tokens": n_global,  # pairs / examples: dpo, kto
         **{k: all_sum(v, device) / counts.get(k, n_global).clamp(min=1) for k, v in sums.items() if k[:3] != "_n/"}}
    return {k: int(v) if k == "trained_tokens" else float(v) for k, v in m.items()} if check else m


def make_optimizer(model, cfg: TrainConfig):
    """AdamW over the trainable parameters, decoupled weight decay on matrices only (not norms, biases,
    vectors); with --zero, the ZeRO-sharded AdamW of dist/ (the same update)."""
    named = trainable(model)
    groups = [{"params": [n for n, p in named.items() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [n for n, p in named.items() if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kw = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    if cfg.zero:
        # average_grads=False: each rank's loss is already divided by the GLOBAL token count, so the sum of the
        # ranks' gradients is the gradient of the global mean
        return ZeroOptimizer(model, cfg.zero, groups=groups, offload=cfg.offload, average_grads=False, **kw)
    return AllReduceAdamW(model, groups, fp16=cfg.precision == "fp16", **kw)


# --------------------------------------------------------------------------------------------------- data
@torch.no_grad()
def evaluate(model, examples, cfg: TrainConfig, device, pad_id, reference=None) -> float:
    """Token-weighted mean loss over the whole eval set (preference stages: the mean pair / example loss)."""
    model.eval()
    total, n = 0.0, 0
    for i in progress(range(0, len(examples), cfg.batch_size), "eval", unit="batch", leave=False):
        b = data.collate(examples[i:i + cfg.batch_size], pad_id)
        with autocast(cfg, device):
            total += float(loss_sum(model, b, device, cfg, reference)[0])
        n += data.count_targets(b)
    model.train()
    return total / max(n, 1)


def sample_answers(model, tok, prompts, cfg: TrainConfig, device, max_new: int = 48) -> list[str]:
    """Greedy answers (KV cache, model/sampling.py) to prompt token ids."""
    model.eval()
    with autocast(cfg, device):
        out = [tok.decode(generate(model, p, max_new, tok.stop_ids)).strip() for p in progress(prompts, "samples")]
    model.train()
    return out


@stage("saving the result (and merging, with --merge)")
def save_final(out: Path, model, cfg: TrainConfig, tok):
    """model/ (full fine-tuning) or adapter/ (PEFT format), and model/ merged with --merge where it can."""
    if cfg.method == "full":
        merged, where = peft.unwrap(model), out / "model"
    else:
        where = peft.save_adapter(model, out / "adapter", base_model_path=cfg.model)
        merged = None
        if cfg.merge and cfg.method in ("qlora", "lora8"):  # into the DEQUANTIZED base: codes would lose the delta
            from quant import int8, qlora
            merged = (qlora if cfg.method == "qlora" else int8).merge_dequantized(model, torch.float32)
        elif cfg.merge:  # fold the adapter into fp32 base weights, drop the wrappers
            try:
                merged = peft.merge_and_unload(model.float())
            except ValueError as e:  # a method that can't be merged (bottleneck adapters, prompt methods)
                print(f"warning: --merge: {e}; only the adapter was saved", file=sys.stderr)
    if merged is not None:
        classify.save_pretrained(merged, out / "model")  # M.save_pretrained; with a head: HF's classifier format
        tok.save(out / "model")
    return where


# ------------------------------------------------------------------------------------------------------ main
def main(argv=None):
    cfg = parse_args(argv)
    # torchrun's environment -> process group (gloo on CPU, nccl on GPU) with a timeout, so a dead rank makes the
    # others fail instead of hanging; torchrun sets OMP_NUM_THREADS=1, so the cores are shared out explicitly
    env = init_distributed(timeout_s=cfg.collective_timeout)
    world, rank, device = env.world_size, env.rank, env.device
    quiet(cfg.quiet or rank != 0)  # progress bars: rank 0 only
    out = Path(cfg.out)
    try:
        if not cfg.model:  # the embedded SmolLM2-135M-Instruct, converted to an HF dir once
            from model.gguf import default_model
            cfg.model = str(default_model())
        check_out(out, cfg.model)  # ours to write? (nothing is written before the data and model are good)
        lock = claim_out(out) if rank == 0 and (out / MARKER).is_file() else None  # an earlier run's dir
        tok = M.load_tokenizer(cfg.model)
        tasks = benchmark.load_tasks(cfg.eval_tasks, cfg.eval_shots) if cfg.eval_tasks else {}  # checked now
        splits = data.load_splits if cfg.task == "causal_lm" else data.classify.load_splits  # + cfg.labels
        train_ex, eval_ex, stats = splits(tok, cfg, verbose=rank == 0)
        if not cfg.resume and complete_checkpoints(out):
            sys.exit(f"error: {out}: holds checkpoints from an earlier run; pass --resume or another --out")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        model = build_model(cfg, device)  # bad method options (unknown target module, r <= 0, ...) raise here
        classify.attach_task(model, cfg, tok)  # --task classify | reward: the score head (trained by any method)
        if cfg.zero == 3 and model is not peft.unwrap(model):
            sys.exit(f"error: --zero 3 shards the decoder's blocks, but --method {cfg.method} trains only its small "
                     "prompt encoder (the base is frozen): use --zero 1 or 2")
    except (data.DataError, M.CheckpointError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    ctx = peft.unwrap(model).cfg.max_position_embeddings
    if cfg.seq_len > ctx and rank == 0:
        print(f"warning: --seq-len {cfg.seq_len} exceeds the model's context ({ctx} positions)", file=sys.stderr)
    traj = trajectory(cfg, world, model, data.fingerprint(cfg))
    same_on_all_ranks(traj)  # e.g. no rank reading another --data
    pad_id = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    order = data.make_order(train_ex, cfg.batch_size * cfg.grad_accum * world, cfg.seed, bucket=not cfg.pack)
    total = cfg.max_steps or max(1, int(cfg.epochs * order.per_epoch))
    if why := peft.start_run(model, total, cfg.zero):  # e.g. AdaLoRA's budget schedule against the run's steps
        sys.exit(f"error: {why}")
    # preference stages: the reference is the initial model; under PEFT with its adapter off (no copy)
    full = cfg.method == "full"
    reference = preference.reference(model, device, copy=full and cfg.stage != "sft" and not cfg.precompute_ref,
                                     disabled=None if full else peft.disabled)
    if cfg.precompute_ref:  # its log-probs of every pair, once, now: full fine-tuning keeps no copy
        data.precompute_reference((train_ex, eval_ex), reference, cfg.batch_size, pad_id)
    model.train()
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer.optimizer, cfg, total)
    lock = lock or (claim_out(out) if rank == 0 else None)  # creates --out, holds it until this process ends
    start = resume(out, traj, optimizer, scheduler, cfg.lr, cfg.resume_override.replace("-", "_").split(",")) \
        if cfg.resume else 0
    if rank == 0:
        remove_partial(out)  # a save killed half-way
        (out / "config.json").write_text(json.dumps({**asdict(cfg), "method_config": traj["method_config"]},
                                                    indent=2) + "\n")
        n_train = sum(p.numel() for p in trainable(model).values())
        n_all = sum(p.numel() for p in model.parameters())  # a prompt wrapper: base + encoder
        print(f"model: {cfg.model} | method {cfg.method} | trainable params: {n_train:,} || all params: "
              f"{n_all:,} || trainable%: {100 * n_train / n_all:.4f} | steps {start}->{total} | world {world}"
              + (f" | resumed from {out / 'checkpoints' / f'step-{start}'}" if start else ""), flush=True)
    log = Logger(out, start, rank == 0)
    log.begin(cfg, stats, model, world, train_ex, eval_ex, tok, start, total)  # run.json: data, model, segment
    # ZeRO-3 gathers each block's weights from all ranks in forward: eval and samples then run on every rank
    evaluator = rank == 0 or cfg.zero == 3
    stop = StopSignal()  # SIGTERM / Ctrl-C: finish the step, checkpoint, exit 128 + signal

    bar = progress(range(start, total), "train", initial=start, total=total, unit="step", delay=0)
    seen = 0
    for step in bar:
        t0 = time.perf_counter()
        mbs = order.micro_batches(train_ex, step, rank, world, cfg.batch_size, cfg.grad_accum, pad_id)
        ntok = sum(int((b["input_ids"] != pad_id).sum()) if b["attention_mask"] is not None  # this rank's: CPU
                   else b["input_ids"].numel() for b in mbs)  # batches, host counts, summed over ranks when logged
        lr = optimizer.optimizer.param_groups[0]["lr"]
        logged = (step + 1) % cfg.log_every == 0 or step + 1 == total
        saving = cfg.save_every and (step + 1) % cfg.save_every == 0
        m = train_step(model, mbs, optimizer, scheduler, cfg, device, reference, (check := logged or saving))  # syncs
        if step == start:  # bytes per rank by kind, predicted vs measured (+ peak): stdout and out/memory.json
            ledger.report(model, optimizer, cfg.zero, world, rank, device, out if rank == 0 else None, cfg.quiet)
        why = m.get("why") or (check and not optimizer.finite() and "the update made weights non-finite (nan/inf)")
        if why:  # nothing of this step is saved: the last checkpoint passed the same checks
            last = complete_checkpoints(out)
            log.close(f"stopped at step {step + 1}: {why}")  # loss.png, report.md
            stop.restore()
            sys.exit(f"error: step {step + 1}: {why}; stopped without saving this step. Last good checkpoint: "
                     + (str(out / "checkpoints" / f"step-{last[-1]}") if last else "none")
                     + ". Try a lower --lr, --precision fp32/bf16 or --max-grad-norm 1.")
        dt = time.perf_counter() - t0
        seen += ntok
        if logged:
            rec = {"step": step + 1, "loss": m["loss"], "lr": lr, "grad_norm": m["grad_norm"],  # + preference
                   "tokens": int(all_sum(seen, device)), "trained_tokens": m["trained_tokens"],  # stages: TRL's names
                   "tokens_per_s": all_sum(ntok, device) / dt, **{k: v for k, v in m.items() if "/" in k or k == "kl"}}
            bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
            log.log(rec)
        due = cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == total) and evaluator and eval_ex
        if due and cfg.task != "causal_lm":  # a head's loss, accuracy (+ macro-F1): model/classify.py
            log.log(classify.evaluate(model, data.classify.batches(eval_ex, cfg.batch_size, pad_id), cfg, device,
                                      precision(cfg, device), step + 1, rank == 0))
        elif due:
            ev = evaluate(model, eval_ex, cfg, device, pad_id, reference)
            samples = sample_answers(model, tok, stats["prompts"], cfg, device)
            log.log({"step": step + 1, "eval_loss": ev, "eval_ppl": math.exp(min(ev, 50)), "samples": samples})
            if rank == 0:
                write(f"step {step + 1}: eval loss {ev:.4f} ppl {math.exp(min(ev, 50)):.2f}")
                for p, s in zip(stats["prompts"], samples):
                    write(f"  Q: {tok.decode(p).strip()[-80:]!r}\n  A: {s[:200]!r}")
        stopping = all_sum(bool(stop.signum), device) > 0  # every rank stops at the same step
        if saving or (stopping and step + 1 < total):
            save_checkpoint(out, step + 1, optimizer, scheduler, cfg.keep, rank, config=traj)
        if stopping and step + 1 < total:
            log.close(f"stopped by signal {stop.signum or 'on another rank'} after step {step + 1} (checkpoint saved)")
            if rank == 0:
                print(f"stopped by signal {stop.signum or 'on another rank'} after step {step + 1}: checkpoint "
                      f"{out / 'checkpoints' / f'step-{step + 1}'} saved; continue with --resume", file=sys.stderr)
            sys.exit(128 + (stop.signum or 15))
        if world > 1:
            torch.distributed.barrier()
    stop.restore()
    if tasks and evaluator:  # --eval-tasks: eval.py's acc / acc_norm per task into metrics.jsonl and report.md
        log.log({"step": total, **benchmark.score_tasks(model, tok, tasks)})
    # ZeRO-3: every rank takes part in the gathers; full fine-tuning streams model/ one unit at a time (rank 0
    # writes), an adapter needs only the trainable weights, --merge the whole model; else a no-op
    stream = out / "model" if cfg.method == "full" and cfg.task == "causal_lm" else None
    with optimizer.saving(model, stream, whole=cfg.merge, extra=tok.save) as streamed:
        if rank == 0:
            where = stream if streamed else save_final(out, model, cfg, tok)
            log.close("finished")  # loss.png, report.md
            print(f"saved {where}", flush=True)
    if world > 1:  # leave together: a rank tearing gloo down while rank 0 still saves aborted (CI, once)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return out


if __name__ == "__main__":
    main()
