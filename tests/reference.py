"""Run HF transformers / PEFT / bitsandbytes reference code in a subprocess outside the repo.

Our `peft/` package shadows HF's `peft` inside the repo, so references never import in-process: each runs as
`python -P` (no script dir on sys.path) in a temporary cwd, with PYTHONPATH cleared. Inputs and outputs travel
as files (safetensors / JSON) in that directory.
"""
import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file, save_file

PRELUDE = """
import json, os, sys, torch
from safetensors.torch import load_file, save_file
torch.manual_seed(0)
torch.set_num_threads(2)


def bnb_generic_cpu(model):
    # bitsandbytes' Linear4bit, on a CPU with AVX512-BF16 in no-grad eval, repacks its weight and computes in bf16
    # (and asserts shapes our tiny configs don't have): keep the generic fp32 dequantize path the tests compare with
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model
"""


def run_reference(code: str, workdir, inputs: dict | None = None, timeout: int = 600) -> dict:
    """Run `code` in a clean subprocess with cwd=workdir. `inputs` (name -> tensor) is saved to in.safetensors
    before; whatever the code saves to out.safetensors is returned (name -> tensor)."""
    workdir = str(workdir)
    os.makedirs(workdir, exist_ok=True)
    if inputs:
        save_file({k: v.contiguous() for k, v in inputs.items()}, os.path.join(workdir, "in.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    script = os.path.join(workdir, "reference.py")
    with open(script, "w") as f:
        f.write(PRELUDE + textwrap.dedent(code))
    r = subprocess.run([sys.executable, "-P", script], cwd=workdir, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"reference script failed:\n{r.stderr[-4000:]}")
    out = os.path.join(workdir, "out.safetensors")
    return load_file(out) if os.path.exists(out) else {}


def tiny_hf_config(model_type: str = "llama", **over) -> dict:
    """A tiny random config.json dict (2 layers, GQA) for each supported architecture."""
    d = {"model_type": model_type, "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
         "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": False,
         "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if model_type == "qwen2":
        d.update(use_sliding_window=False)
    if model_type == "qwen3":
        d.update(head_dim=24, attention_bias=False)
    if model_type == "mistral":
        d.update(sliding_window=None)
    d.update(over)
    return d


def make_hf_model(workdir, config: dict, dtype: str = "float32", seed: int = 0, name: str = "hf",
                  norm_gain: float = 1.0) -> str:
    """Create a random HF model from `config` with transformers (no download) and save it to workdir/name.
    norm_gain multiplies the (jittered) norm weights: large activations, so LLM.int8's outlier columns occur."""
    import json
    out = os.path.join(str(workdir), name)
    run_reference(f"""
        from transformers import AutoConfig, AutoModelForCausalLM
        cfg = json.loads({json.dumps(json.dumps(config))})
        config = AutoConfig.for_model(**cfg)
        torch.manual_seed({seed})
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise them so they are tested
            for n, p in model.named_parameters():
                if n.endswith("norm.weight") or n.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.1)
                if n.endswith("norm.weight"):
                    p.mul_({norm_gain})
        model.to(getattr(torch, "{dtype}")).save_pretrained("{out}")
    """, workdir)
    return out



def padded_batch(T: int = 12, vocab: int = 128):
    """Token ids (3, T) and a padding mask: row 0 full, row 1 left-padded by 4, row 2 right-padded by 5."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :4] = 0   # left padding
    mask[2, -5:] = 0  # right padding
    return ids, mask


def kv_cache_logits(model, ids, prefill: int = 6) -> torch.Tensor:
    """(B, T, V) logits of KV-cache decoding: a prefill of `prefill` tokens, then one token at a time."""
    from model import KVCache
    with torch.no_grad():
        cache = KVCache(model.cfg.num_hidden_layers)
        steps = [model(ids[:, :prefill], cache=cache)]
        for t in range(prefill, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], cache=cache))
    return torch.cat(steps, 1)


def kv_cache_error(model, T: int = 10, prefill: int = 6) -> float:
    """Max-abs difference between the logits of KV-cache decoding (a prefill, then one token at a time) and of one
    full forward, on padded_batch's ids."""
    ids, _ = padded_batch(T)
    with torch.no_grad():
        full = model(ids)
    return (kv_cache_logits(model, ids, prefill) - full).abs().max().item()


LM_EVAL_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
num_fewshot: {shots}
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def run_lm_eval(workdir, model_dir: str, tasks: dict, batch_size: int = 8, threads: int = 1,
                timeout: int = 900) -> dict:
    """lm-eval-harness (HF backend, fp32, CPU) on local task YAMLs: tasks maps a name to (test JSONL, k shots),
    the dev split beside it as eval.py reads it. Returns name -> {"acc", "acc_norm", "logliks" (per question,
    per choice, in doc order), "contexts" (the prompt of each question)}; "seconds" the evaluation's wall time.
    threads: torch's (one is several times faster for tiny models on a shared 2-core machine: no spin-waiting)."""
    import json
    from pathlib import Path
    tdir = Path(workdir) / "lm_eval_tasks"
    tdir.mkdir(parents=True, exist_ok=True)
    for name, (test, shots) in tasks.items():
        test = Path(test).resolve()
        dev = test.with_name(test.name.removesuffix(".jsonl") + ".dev.jsonl")
        (tdir / f"{name}.yaml").write_text(LM_EVAL_TASK.format(name=name, test=test, dev=dev, shots=shots))
    run_reference(f"""
        import time
        import lm_eval
        from lm_eval.tasks import TaskManager
        torch.set_num_threads({threads})
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model="hf", model_args="pretrained={model_dir},dtype=float32",
                                      tasks={list(tasks)!r},
                                      task_manager=TaskManager(include_path="{tdir}", include_defaults=False),
                                      device="cpu", batch_size={batch_size}, log_samples=True)
        out = {{"seconds": time.perf_counter() - t0}}
        for name, samples in res["samples"].items():
            samples = sorted(samples, key=lambda s: s["doc_id"])
            out[name] = {{"acc": res["results"][name]["acc,none"], "acc_norm": res["results"][name]["acc_norm,none"],
                         "logliks": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
                         "contexts": [s["arguments"][0][0] for s in samples]}}
        json.dump(out, open("lm_eval.json", "w"))
    """, workdir, timeout=timeout)
    return json.loads((Path(workdir) / "lm_eval.json").read_text())
