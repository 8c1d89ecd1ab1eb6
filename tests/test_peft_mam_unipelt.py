"""MAM adapter and UniPELT (no HF PEFT reference exists): each equals a hand-written evaluation of its paper's
equations on transformers' own llama (the prefix as a `DynamicCache` at positions n.., the adapters and gates as
forward hooks written from the equations), logits and every gradient <= 1e-6 in float64, in one subprocess; the
identity where the paper's init gives it; training through train.py on the default dataset; save/reload; counts."""
import copy
import json

import pytest
import torch

import model as nt
import peft
import train
from tests import peft_cases as pc
from tests.reference import run_reference
from tests.tiny import make_model, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {"mam": lambda: peft.MamConfig(num_virtual_tokens=3, adapter_size=8),
         "unipelt": lambda: peft.UniPeltConfig(num_virtual_tokens=3, r=4, alpha=8, reduction_factor=4)}
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 100, 17], [3, 44, 8, 12, 120, 7, 6, 90]])


def key(name: str) -> str:
    """A trainable parameter's name in the wrapper -> its adapter-file key."""
    if name.startswith("base."):
        return peft.core.PEFT_PREFIX + name[len("base."):]
    return {"encoder.embedding.weight": "prompt_embeddings"}.get(name, name)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    path = make_model(tmp / "m", seed=3)
    out = {"path": path, "tmp": tmp}
    inputs = {"ids": IDS}
    for case, make in CASES.items():
        torch.manual_seed(0)
        m = peft.apply(nt.load_pretrained(path, dtype=torch.float64), make())
        with torch.no_grad():
            out[case + ".init"] = m(IDS)
            pc.randomize(m, seed=1)  # non-zero W_up / B, so every term is tested
            if hasattr(m, "prefix_gate"):
                m.prefix_gate.normal_()
        logits = m(IDS)
        pc.lm_loss(logits, IDS).backward()
        out[case] = {"model": m, "logits": logits.detach(),
                     "grads": {key(n): p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}}
        inputs.update({f"{case}/{k}": v for k, v in peft.mam.export_state(m).items()})
        if case == "unipelt":
            inputs["unipelt/prefix_gate"] = m.prefix_gate.detach()
    c = tiny_config()
    out["ref"] = run_reference(f"""
        from transformers import AutoModelForCausalLM, DynamicCache
        F = torch.nn.functional
        inp = load_file("in.safetensors")
        ids = inp["ids"]
        L, nkv, hd = {c["num_hidden_layers"]}, {c["num_key_value_heads"]}, {c["hidden_size"] // c["num_attention_heads"]}
        out = {{}}

        def hook(module, f):  # output -> f(input, output)
            return module.register_forward_hook(lambda mod, i, o: f(i[0], o))

        for case in ("mam", "unipelt"):
            w = {{k.split("/", 1)[1]: v.clone().requires_grad_(True) for k, v in inp.items() if k.startswith(case + "/")}}
            P = lambda path, name: w["base_model.model." + path + "." + name]
            model = AutoModelForCausalLM.from_pretrained("{path}", dtype=torch.float64)
            hooks = []
            for l, layer in enumerate(model.model.layers):
                mp = f"model.layers.{{l}}.mlp"
                if case == "mam":  # He et al. Eq. (10), scaled: h <- FFN(x) + s * (relu(x Wd^T + bd) Wu^T + bu)
                    a = lambda x, mp=mp: F.linear(F.relu(F.linear(x, P(mp, "adapter_down.weight"),
                        P(mp, "adapter_down.bias"))), P(mp, "adapter_up.weight"), P(mp, "adapter_up.bias"))
                    hooks.append(hook(layer.mlp, lambda x, o, a=a: o + 4.0 * a(x)))
                else:  # Mao et al. sec. 3.2: gated LoRA on q/v, gated adapter after the FFN
                    for proj in ("q_proj", "v_proj"):
                        pp = f"model.layers.{{l}}.self_attn.{{proj}}"
                        lo = lambda x, pp=pp: torch.sigmoid(F.linear(x, P(pp, "lora_gate.weight"),
                            P(pp, "lora_gate.bias"))) * (8 / 4) * (x @ P(pp, "lora_A.weight").T @ P(pp, "lora_B.weight").T)
                        hooks.append(hook(getattr(layer.self_attn, proj), lambda x, o, lo=lo: o + lo(x)))
                    dp = mp + ".down_proj"
                    ad = lambda h, dp=dp: torch.sigmoid(F.linear(h, P(dp, "adapter_gate.weight"),
                        P(dp, "adapter_gate.bias"))) * F.linear(F.relu(F.linear(h, P(dp, "adapter_down.weight"),
                        P(dp, "adapter_down.bias"))), P(dp, "adapter_up.weight"), P(dp, "adapter_up.bias"))
                    hooks.append(hook(layer.mlp.down_proj, lambda x, o, ad=ad: o + ad(o)))
            E = w["prompt_embeddings"]                                   # (n, L*2*n_kv*hd)
            n, B, T = E.shape[0], ids.shape[0], ids.shape[1]
            kv = E.view(n, L, 2, nkv, hd).permute(1, 2, 3, 0, 4)         # (L, 2, n_kv, n, hd)
            cache = DynamicCache()
            for l in range(L):
                gk, gv = (torch.sigmoid(w["prefix_gate"][l]) if case == "unipelt" else (1.0, 1.0))
                cache.update((gk * kv[l, 0]).expand(B, -1, -1, -1), (gv * kv[l, 1]).expand(B, -1, -1, -1), l)
            logits = model(ids, past_key_values=cache, attention_mask=torch.ones(B, n + T, dtype=torch.long),
                           position_ids=torch.arange(n, n + T)[None].expand(B, T)).logits
            F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
            out[case + ".logits"] = logits.detach()
            for k, v in w.items():
                out[case + ".grad." + k] = v.grad
        save_file({{k: v.contiguous() for k, v in out.items()}}, "out.safetensors")
    """, tmp / "ref", inputs)
    return out


@pytest.mark.parametrize("case", CASES)
def test_equals_the_papers_equations(ref, case):
    ours, theirs = ref[case], ref["ref"]
    assert (ours["logits"] - theirs[case + ".logits"]).abs().max().item() <= 1e-6
    want = {k[len(case) + 6:]: v for k, v in theirs.items() if k.startswith(case + ".grad.")}
    assert set(want) == set(ours["grads"])
    for k, g in ours["grads"].items():
        assert g.abs().max() > 0, k
        assert (g - want[k]).abs().max().item() <= 1e-6, k


@pytest.mark.parametrize("case", CASES)
def test_at_init_only_the_prefix_acts(ref, case):
    """The adapters' W_up and LoRA's B start at zero (both papers): at init the model is its prefix alone (for
    UniPELT the prefix gated by sigmoid(0) = 1/2); the prefix itself is not the identity (it is attended to)."""
    torch.manual_seed(0)
    m = peft.apply(nt.load_pretrained(ref["path"], dtype=torch.float64), CASES[case]())
    alone = peft.apply(nt.load_pretrained(ref["path"], dtype=torch.float64),
                       peft.PrefixConfig(num_virtual_tokens=m.n_virtual))
    with torch.no_grad():
        alone.encoder.embedding.weight.copy_(m.encoder.embedding.weight * (0.5 if case == "unipelt" else 1.0))
        assert torch.equal(m(IDS), alone(IDS))
        assert torch.equal(m(IDS), ref[case + ".init"])
        assert not torch.allclose(m(IDS), nt.load_pretrained(ref["path"], dtype=torch.float64)(IDS))


def test_trainable_counts_equal_the_formula(ref):
    c = tiny_config()
    L, d, ff, n_kv = c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"]
    kv = n_kv * d // c["num_attention_heads"]
    count = {case: sum(p.numel() for p in ref[case]["model"].parameters() if p.requires_grad) for case in CASES}
    w = 8  # MAM: prefix n * L * 2 * kv, plus per layer an adapter d -> w -> d with biases
    assert count["mam"] == 3 * L * 2 * kv + L * (2 * d * w + w + d)
    r, wa = 4, d // 4  # UniPELT: + 2 prefix gates per layer, LoRA r(in + out) + gate (in + 1) on q and v,
    q, v = (d, d), (d, kv)  # and an adapter after down_proj d -> d/4 -> d with its gate (d + 1)
    lora = sum(r * (i + o) + i + 1 for i, o in (q, v))
    assert count["unipelt"] == 3 * L * 2 * kv + 2 * L + L * (lora + 2 * d * wa + wa + d + d + 1)


@pytest.mark.parametrize("case", CASES)
def test_save_reload_exactly_and_bad_files(ref, case, tmp_path):
    m = ref[case]["model"]
    peft.save_adapter(m, tmp_path / case)
    back = peft.load_adapter(nt.load_pretrained(ref["path"], dtype=torch.float64), tmp_path / case)
    assert type(back.peft_config) is type(m.peft_config)
    with torch.no_grad():
        assert torch.equal(back(IDS), ref[case]["logits"])
    with pytest.raises(ValueError, match="can't be merged"):
        peft.merge(back)
    cfg = json.loads((tmp_path / case / "adapter_config.json").read_text())
    (tmp_path / case / "adapter_config.json").write_text(json.dumps({**cfg, "num_virtual_tokens": 5}))
    with pytest.raises(ValueError, match="prompt_embeddings has shape"):
        peft.load_adapter(nt.load_pretrained(ref["path"]), tmp_path / case)


@pytest.mark.parametrize("method,flags", [("mam", ["--mam-adapter-size", "16"]),
                                          ("unipelt", ["--lora-r", "4"]),
                                          ("adalora", ["--adalora-init-r", "4", "--adalora-target-r", "2"]),
                                          ("ptuning_v2", [])])
def test_trains_on_the_default_dataset_through_train_py(ref, method, flags):
    """train.py on data/default/train.jsonl (tiny model): the loss falls, the adapter reloads to the eval loss
    train.py measured; AdaLoRA's budget ran (rank pattern saved) and it merges."""
    out = ref["tmp"] / ("run_" + method)
    data = str(train.Path(__file__).parent.parent / "data" / "default" / "train.jsonl")
    argv = ["--model", str(ref["path"]), "--data", data, "--out", str(out), "--method", method, "--max-steps", "6",
            "--batch-size", "4", "--seq-len", "128", "--lr", "1e-2", "--eval-split", "0.05", "--eval-every", "6",
            "--eval-samples", "0", "--merge", *flags]
    train.main(argv)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in recs if "loss" in r]
    assert len(loss) == 6 and sum(loss[-2:]) < sum(loss[:2]), loss
    acfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert acfg["peft_type"] == {"mam": "MAM", "unipelt": "UNIPELT", "adalora": "ADALORA",
                                 "ptuning_v2": "PREFIX_TUNING"}[method]
    if method == "adalora":
        assert acfg["total_step"] == 6 and sum(map(sum, acfg["rank_pattern"].values())) == 2 * len(acfg["rank_pattern"])
        assert (out / "model" / "config.json").is_file()  # --merge wrote the merged model
    if method == "ptuning_v2":
        assert acfg["prefix_projection"] is False
    cfg = train.parse_args(argv)
    tok = nt.load_tokenizer(str(ref["path"]))
    _, eval_ex, _ = train.data.load_splits(tok, cfg, verbose=False)
    got = train.evaluate(peft.load_adapter(nt.load_pretrained(ref["path"]), out / "adapter"), eval_ex, cfg,
                         torch.device("cpu"), tok.pad_id)
    assert abs(got - [r for r in recs if "eval_loss" in r][-1]["eval_loss"]) < 1e-5
