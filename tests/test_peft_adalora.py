"""AdaLoRA (peft/adalora.py) against HF PEFT 0.21.2's AdaLoRA: 20 optimizer steps through train.py's own
train_step (the budget step and the orthogonality term run inside it) and the same 20 steps in PEFT from the same
init and batches, with `update_and_allocate` called as PEFT documents (after optimizer.step, before zero_grad).
All reference numbers come from one subprocess."""
import json

import pytest
import torch

import model as nt
import peft
import train
from tests.reference import make_hf_model, run_reference, tiny_hf_config
from tests.tiny import run_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SCHEDULE = dict(init_r=6, target_r=3, tinit=4, tfinal=6, deltaT=2, alpha=8.0, targets=TARGETS)
STEPS, LR = 20, 1e-2
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 100, 17], [3, 44, 8, 12, 120, 7, 6, 90]])


def batches(n: int, seed: int = 0) -> list[dict]:
    """n micro-batches in train.py's layout: (2, 12) random ids, the first 3 positions of each row untrained."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 128, (2, 12), generator=g)
        mask = torch.rand(2, 12, generator=g) < 0.8
        mask[:, :3] = False
        out.append({"input_ids": ids, "attention_mask": None, "position_ids": None, "train_mask": mask})
    return out


def train_ours(m, steps: int, data: list[dict], total: int | None = None) -> list[float]:
    """`steps` of train.py's own step, optimizer and scheduler on an AdaLoRA model; returns the losses."""
    assert peft.start_run(m, total or steps, 0) is None
    tc = train.TrainConfig(lr=LR, schedule="constant", max_grad_norm=1.0)
    opt = train.make_optimizer(m, tc)
    sched = train.make_scheduler(opt.optimizer, tc, total or steps)
    return [train.train_step(m, [b], opt, sched, tc, torch.device("cpu"))["loss"] for b in data[:steps]]


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """Ours trained 20 steps and saved; then PEFT from the same init on the same batches, in one subprocess that
    also loads our export (and saves its own adapter for us to load)."""
    tmp = tmp_path_factory.mktemp("adalora")
    hf = make_hf_model(tmp, tiny_hf_config("llama"))
    data = batches(STEPS)
    torch.manual_seed(0)
    m = peft.apply(nt.load_pretrained(hf), peft.AdaLoraConfig(**SCHEDULE))
    init = {k: v.clone() for k, v in peft.adalora.export_state(m).items()}
    losses = train_ours(m, STEPS, data)
    peft.save_adapter(m, tmp / "ours", base_model_path=hf)
    inputs = {"ids": IDS, **{f"ids{i}": b["input_ids"] for i, b in enumerate(data)},
              **{f"mask{i}": b["train_mask"].to(torch.uint8) for i, b in enumerate(data)}, **init}
    kw = {k: SCHEDULE[k] for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT")}
    kw.update(lora_alpha=SCHEDULE["alpha"], target_modules=TARGETS, total_step=STEPS, task_type="CAUSAL_LM")
    out = run_reference(f"""
        import copy
        from transformers import AutoModelForCausalLM
        from peft import AdaLoraConfig, PeftModel, get_peft_model
        inp = load_file("in.safetensors")
        base = AutoModelForCausalLM.from_pretrained("{hf}", dtype=torch.float32)
        pm = get_peft_model(copy.deepcopy(base), AdaLoraConfig(**json.loads({json.dumps(json.dumps(kw))})))
        with torch.no_grad():  # our init, copied
            for n, p in pm.named_parameters():
                if n.replace(".default", "") in inp:
                    p.copy_(inp[n.replace(".default", "")])
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr={LR}, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
        pm.train()
        out, losses = {{}}, []
        for i in range({STEPS}):
            ids, mask = inp[f"ids{{i}}"], inp[f"mask{{i}}"].bool()
            labels = torch.where(mask, ids, torch.full_like(ids, -100))
            o = pm(input_ids=ids, labels=labels)      # PEFT adds the orthogonality term to o.loss
            o.loss.backward()
            losses.append(torch.nn.functional.cross_entropy(o.logits[:, :-1].reshape(-1, o.logits.shape[-1]),
                                                            labels[:, 1:].reshape(-1)).item())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            pm.base_model.update_and_allocate(i + 1)  # optimizer steps done, 1 .. total_step
            opt.zero_grad()
        out["losses"] = torch.tensor(losses, dtype=torch.float64)
        for n, p in pm.named_parameters():
            if p.requires_grad:
                out["w." + n.replace(".default", "")] = p.detach()
        pm.eval()
        pm.save_pretrained("{tmp}/peft")
        with torch.no_grad():
            out["peft_logits"] = pm(input_ids=inp["ids"]).logits
            ours = PeftModel.from_pretrained(copy.deepcopy(base), "{tmp}/ours").eval()
            out["ours_in_peft"] = ours(input_ids=inp["ids"]).logits
            out["ours_in_peft_rank"] = torch.tensor(sum(m.lora_A["default"].shape[0] for m in ours.modules()
                                                        if hasattr(m, "lora_E") and "default" in m.lora_A))
        save_file({{k: v.contiguous() for k, v in out.items()}}, "out.safetensors")
    """, tmp / "ref", inputs)
    return {"tmp": tmp, "hf": hf, "ours": m, "losses": losses, "peft": out}


def test_loss_curve_equals_peft(ref):
    theirs = ref["peft"]["losses"].tolist()
    assert len(ref["losses"]) == STEPS and ref["losses"][-1] < ref["losses"][0]
    for a, b in zip(ref["losses"], theirs):
        assert abs(a - b) <= 1e-4 * abs(b), (ref["losses"], theirs)


def test_rank_pattern_after_the_schedule_equals_peft(ref):
    ours = ref["ours"].peft_config.rank_pattern
    theirs = json.loads((ref["tmp"] / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    assert ours == theirs
    kept = sum(sum(v) for v in ours.values())
    assert kept == SCHEDULE["target_r"] * len(ours) == 2 * len(TARGETS) * SCHEDULE["target_r"]
    assert len({sum(v) for v in ours.values()}) > 1  # the budget moved between matrices, not r=3 everywhere
    saved = json.loads((ref["tmp"] / "ours" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == ours and saved["total_step"] == STEPS


def test_final_weights_equal_peft(ref):
    ours = peft.core.export_state(ref["ours"])  # the full (init_r) tensors, masked triplets at zero
    theirs = {k[2:]: v for k, v in ref["peft"].items() if k.startswith("w.")}
    assert set(ours) == set(theirs) and len(ours) == 3 * 2 * len(TARGETS)
    worst = max(rel(ours[k], theirs[k]) for k in ours)
    assert worst <= 1e-4, worst
    for k in ours:  # the same triplets are masked
        if k.endswith("lora_E"):
            assert torch.equal(ours[k] == 0, theirs[k] == 0), k


def test_export_loads_in_peft_and_peft_adapter_loads_in_ours(ref):
    with torch.no_grad():
        ours = ref["ours"].eval()(IDS)
    assert (ref["peft"]["ours_in_peft"] - ours).abs().max().item() <= 1e-5
    assert ref["peft"]["ours_in_peft_rank"].item() == SCHEDULE["target_r"] * 2 * len(TARGETS)  # pruned tensors
    m = peft.load_adapter(nt.load_pretrained(ref["hf"]), ref["tmp"] / "peft")
    assert isinstance(m.peft_config, peft.AdaLoraConfig)
    assert sum(x.lora_A.shape[0] for x in m.modules() if isinstance(x, peft.adalora.SVDLinear)) == 3 * 2 * len(TARGETS)
    with torch.no_grad():
        assert (m(IDS) - ref["peft"]["peft_logits"]).abs().max().item() <= 1e-5
        # and it merges: merged == unmerged, unmerge restores
        y = m(IDS)
        w0 = m.model.layers[0].self_attn.q_proj.weight.clone()
        peft.merge(m)
        assert (m(IDS) - y).abs().max().item() <= 1e-5
        peft.unmerge(m)
        assert (m.model.layers[0].self_attn.q_proj.weight - w0).abs().max().item() <= 1e-6
        plain = peft.merge_and_unload(m)
        assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
        assert (plain(IDS) - y).abs().max().item() <= 1e-5


def test_before_tinit_it_is_plain_svd_lora(ref, monkeypatch):
    """A run that never reaches tinit: the budget step only updates its averages, nothing is masked, and the
    weights are bit-identical to the same run with the budget step switched off (SVD-LoRA + the regulariser)."""
    data = batches(5, seed=1)
    cfg = dict(SCHEDULE, tinit=10, tfinal=0)
    runs = []
    for hooks in (True, False):
        torch.manual_seed(0)
        m = peft.apply(nt.load_pretrained(ref["hf"]), peft.AdaLoraConfig(**cfg))
        if not hooks:  # the budget step switched off: what a PEFT user who forgets update_and_allocate trains
            monkeypatch.setattr(peft.adalora, "after_step", lambda model, step: None)
        train_ours(m, 5, data, total=20)
        runs.append(peft.core.export_state(m))
    assert m.peft_config.rank_pattern is None
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert all((v != 0).all() for k, v in runs[0].items() if k.endswith("lora_E"))


def test_orthogonality_term_is_papers_eq2():
    base = nt.Transformer(nt.ModelConfig.from_hf(tiny_hf_config("llama"))).init_weights(seed=0)
    m = peft.apply(base, peft.AdaLoraConfig(init_r=4, target_r=2, targets=["q_proj", "v_proj"],
                                                orth_reg_weight=0.3))
    layers = [x for x in m.modules() if isinstance(x, peft.adalora.SVDLinear)]
    eye = torch.eye(4)
    want = sum(torch.sqrt(((x.lora_A @ x.lora_A.T - eye) ** 2).sum()) + torch.sqrt(((x.lora_B.T @ x.lora_B - eye) ** 2).sum())
               for x in layers) / (2 * len(layers))
    assert torch.allclose(peft.loss_term(m), 0.3 * want, rtol=1e-6)


@pytest.mark.parametrize("flags,message", [
    (["--adalora-init-r", "4", "--adalora-target-r", "6"], "error: AdaLoraConfig.target_r=6 is above init_r=4"),
    (["--adalora-tfinal", "12"], "error: AdaLoraConfig.tfinal=12 is not below the run's 8 steps"),
    (["--adalora-tinit", "5", "--adalora-tfinal", "3"], "error: AdaLoraConfig: tinit=5 and tfinal=3 leave no budget "
                                                        "step in 8 steps"),
    (["--zero", "1"], "error: --method adalora: the budget step reads every gradient"),
])
def test_bad_schedules_are_one_line_errors(tmp_path, flags, message):
    s = run_inputs(tmp_path, 8)
    with pytest.raises(SystemExit) as e:
        train.main(["--model", s["model"], "--data", s["data"], "--out", str(tmp_path / "o"), "--method", "adalora",
                    "--max-steps", "8", "--batch-size", "2", "--seq-len", "256", *flags])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_parity_figures(ref, capsys):
    """Not a check of its own: prints the measured gaps (README quotes them)."""
    ours = peft.core.export_state(ref["ours"])
    theirs = {k[2:]: v for k, v in ref["peft"].items() if k.startswith("w.")}
    loss = max(abs(a - b) / abs(b) for a, b in zip(ref["losses"], ref["peft"]["losses"].tolist()))
    with capsys.disabled():
        print(f"\nAdaLoRA vs PEFT: losses {ref['losses'][0]:.4f} -> {ref['losses'][-1]:.4f}, max rel loss gap "
              f"{loss:.2e}, max rel weight gap {max(rel(ours[k], theirs[k]) for k in ours):.2e}")
    assert loss <= 1e-4


RUN = ["--method", "adalora", "--batch-size", "4", "--seq-len", "256", "--lr", "1e-2", "--max-steps", "8",
       "--adalora-init-r", "4", "--adalora-target-r", "2", "--adalora-tinit", "1", "--adalora-tfinal", "4",
       "--adalora-delta-t", "1", "--seed", "3"]


def adapter(out):
    from safetensors.torch import load_file
    return (load_file(str(out / "adapter" / "adapter_model.safetensors")),
            json.loads((out / "adapter" / "adapter_config.json").read_text())["rank_pattern"])


@pytest.mark.slow  # subprocess runs (torchrun / SIGKILL): ~15-30 s
def test_regulariser_and_budget_same_for_one_or_two_ranks_and_micro_batches(tmp_path):
    """The orthogonality term enters once per optimizer step whatever the split of the global batch: 2 gloo ranks
    x 2 rows, and 1 process x 2 micro-batches of 2, give the 1 x 4 run's losses, rank pattern and weights."""
    from tests.tiny import run_train
    s = run_inputs(tmp_path, 24)
    base = ["--model", s["model"], "--data", s["data"], *RUN]
    train.main(base + ["--out", str(tmp_path / "one")])
    run_train(base + ["--out", str(tmp_path / "two"), "--batch-size", "2"], ranks=2)
    train.main(base + ["--out", str(tmp_path / "acc"), "--batch-size", "2", "--grad-accum", "2"])
    (w1, p1) = adapter(tmp_path / "one")
    assert sum(map(sum, p1.values())) == 2 * len(p1)
    for other in ("two", "acc"):
        w, p = adapter(tmp_path / other)
        assert p == p1 and w.keys() == w1.keys()
        for k in w1:
            torch.testing.assert_close(w[k], w1[k], rtol=0, atol=1e-6)


@pytest.mark.slow  # subprocess runs (torchrun / SIGKILL): ~15-30 s
def test_resume_in_the_final_phase_is_exact(tmp_path):
    """Killed after the step-5 checkpoint (the budget is final after step 4), resumed: the same losses and adapter as
    the uninterrupted run (the pattern is read back from the zeroed λ)."""
    from tests.test_train import KILL_AFTER_SAVE_5
    from tests.tiny import run_train
    s = run_inputs(tmp_path, 24)
    base = ["--model", s["model"], "--data", s["data"], *RUN, "--save-every", "5"]
    run_train(base + ["--out", str(tmp_path / "a")])
    r = run_train(base + ["--out", str(tmp_path / "b")], patch=KILL_AFTER_SAVE_5, check=False)
    assert r.returncode == -9
    run_train(base + ["--out", str(tmp_path / "b"), "--resume"])
    (wa, pa), (wb, pb) = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    metrics = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
               for d in "ab"]
    assert metrics[0] == metrics[1] and pa == pb
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
