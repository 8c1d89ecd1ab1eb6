"""ZeRO-1/2/3 (+ CPU offload) on 1, 2 and 4 gloo processes equals single-process torch.optim.AdamW.

All multi-process checks run in a few launches (module fixtures); see tests/dist_worker.py for the loop.
"""
import pytest
import torch

import dist
import dist_worker as W
from model import load_pretrained

TOL = 1e-6  # max-abs on fp32 parameters after 20 steps (the bar)
CONFIGS = [(s, o) for s in (1, 2, 3) for o in (False, True)]


def assert_same(res, ref, start=0):
    """Parameters equal the reference after the last step; losses equal step for step (fp32: a few ulps)."""
    assert res["params"].keys() == ref["params"].keys()
    diff = max((res["params"][n] - ref["params"][n]).abs().max().item() for n in ref["params"])
    assert diff <= TOL, diff
    print(f"max |param - reference| = {diff:.2e}")
    assert torch.allclose(torch.tensor(res["losses"]), torch.tensor(ref["losses"][start:]), rtol=1e-6, atol=0)
    assert torch.allclose(torch.tensor(res["norms"]), torch.tensor(ref["norms"][start:]), rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def ref():
    torch.set_num_threads(1)  # tiny model: threads only add contention on a shared 2-core machine
    r = W.reference()
    assert max(r["norms"]) > W.MAX_NORM > min(r["norms"]), "clipping should be active on some steps only"
    return r


@pytest.fixture(scope="module")
def ckpt1(ref, tmp_path_factory):
    """A world-size-1 run (no process group) saved after 10 steps."""
    path = tmp_path_factory.mktemp("ckpt") / "w1.safetensors"
    res = W.train_zero(2, stop=10, save_at=10, save=path)
    assert torch.allclose(torch.tensor(res["losses"]), torch.tensor(ref["losses"][:10]), rtol=1e-6, atol=0)
    return path


@pytest.fixture(scope="module")
def world2(ckpt1, tmp_path_factory):
    out = tmp_path_factory.mktemp("w2")
    jobs = [(f"s{s}o{int(o)}", W.train_zero, dict(stage=s, offload=o)) for s, o in CONFIGS]
    jobs[1][2].update(sum_grads=True)                                  # train.py's loss / global tokens
    jobs[4][2].update(perturb=True)                                    # rank 1 starts from other weights
    jobs[2][2].update(save_at=10, save=out / "w2.safetensors")        # stage 2 also saves at step 10
    jobs.append(("resume_1to2", W.train_zero, dict(stage=2, start=10, load=ckpt1)))
    jobs.append(("untied_s3", W.train_zero, dict(stage=3, tied=False, head_matmul=True,
                                                   export=out / "export")))
    jobs.append(("frozen_ckpt_s3", W.train_zero, dict(stage=3, frozen=True, checkpointing=True)))
    jobs.append(("bf16_s2", W.train_zero, dict(stage=2, compute_dtype=torch.bfloat16, stop=3)))
    codes, _ = W.launch(2, jobs, str(out))
    assert codes == [0, 0]
    return {name: [torch.load(out / f"{name}.rank{r}.pt") for r in range(2)] for name, _, _ in jobs} | {
        "ckpt": out / "w2.safetensors", "export": out / "export"}


@pytest.fixture(scope="module")
def world4(world2, tmp_path_factory):
    out = tmp_path_factory.mktemp("w4")
    jobs = [("s2o1", W.train_zero, dict(stage=2, offload=True, sum_grads=True)), ("s3o0", W.train_zero, dict(stage=3)),
            ("resume_2to4", W.train_zero, dict(stage=3, offload=True, start=10, load=world2["ckpt"]))]
    codes, _ = W.launch(4, jobs, str(out))
    assert codes == [0] * 4
    return {name: [torch.load(out / f"{name}.rank{r}.pt") for r in range(4)] for name, _, _ in jobs}


@pytest.mark.parametrize("stage,offload", CONFIGS)
def test_two_ranks_equal_adamw(world2, ref, stage, offload):
    assert_same(world2[f"s{stage}o{int(offload)}"][0], ref)


def test_four_ranks_equal_adamw(world4, ref):
    assert_same(world4["s2o1"][0], ref)
    assert_same(world4["s3o0"][0], ref)


def test_untied_frozen_checkpointed_bf16(world2, ref):
    untied = W.reference(tied=False)
    assert_same(world2["untied_s3"][0], untied)
    exported = load_pretrained(world2["export"]).state_dict()  # stage 3 weights gathered and saved on rank 0
    assert max((exported[n] - p).abs().max().item() for n, p in untied["params"].items()) <= TOL
    # LoRA-like: frozen weights sharded too (tests/test_zero3_frozen.py); with gradient checkpointing
    assert_same(world2["frozen_ckpt_s3"][0], W.reference(frozen=True))
    # bf16 compute weights are the bf16 rounding of the fp32 masters, on every rank
    for r in world2["bf16_s2"]:
        master = world2["bf16_s2"][0]["params"]
        for n, w in r["compute"].items():
            assert w.dtype == torch.bfloat16 and torch.equal(w, master[n].to(torch.bfloat16)), n


def test_resume_changes_world_size(world2, world4, ref):
    assert_same(world2["resume_1to2"][0], ref, start=10)                 # 1 -> 2
    assert_same(world4["resume_2to4"][0], ref, start=10)                 # 2 -> 4 (and stage 2 -> 3)
    assert_same(W.train_zero(1, start=10, load=world2["ckpt"]), ref, start=10)  # 2 -> 1 (and stage 2 -> 1)


@pytest.mark.parametrize("world", [2, 4])
def test_memory_per_rank(world2, world4, world):
    runs = world2 if world == 2 else world4
    for name, ranks in runs.items():
        if name.startswith("resume") or name in ("bf16_s2", "ckpt", "export"):
            continue
        stage = 3 if "s3" in name else int(name[1])
        psi = sum(ranks[0]["mem"]["numels"])
        assert sum(r["mem"]["owned"] for r in ranks) == psi  # every element's AdamW state on exactly one rank
        for r in ranks:
            m = r["mem"]
            pred = dist.predicted_bytes(stage, m["padded"], world, compute_bytes=4)
            assert m["padded"] == world * sum(m["shards"]) and m["padded"] - psi < world * len(m["shards"])
            assert m["final"]["optim"] == 8 * m["owned"] <= pred["optim"], name
            for kind in ("params", "grads", "master"):
                assert m["final"][kind] == pred[kind], (name, kind)
            full, biggest = 4 * m["padded"], 4 * world * max(m["shards"])  # bytes: all params, largest bucket
            if stage >= 2:  # backward holds: the bucket being filled, one in flight (+ its shard), one .grad
                assert 0 < m["peak"]["grads"] <= 3 * biggest + 4 * max(m["shards"]), name
                assert m["peak"]["grads"] < full, name
            if stage == 3:  # at most two units (the tied embedding + one block) gathered at once
                assert 0 < m["peak"]["params"] <= 2 * biggest < full, name


def test_stage3_single_process_and_bad_input(ref, ckpt1, tmp_path):
    assert_same(W.train_zero(3, export=tmp_path / "m"), ref)  # stage 3 with world size 1 is allowed (and works)
    exported = load_pretrained(tmp_path / "m").state_dict()
    assert max((exported[n] - p).abs().max().item() for n, p in ref["params"].items()) <= TOL
    assert_same(W.train_zero(3, tied=False, stop=3), W.reference(tied=False, steps=3))  # untied, lm_head called
    model = W.make_model()
    with pytest.raises(ValueError, match="stage must be 1, 2 or 3"):
        dist.ZeroOptimizer(model, 4)
    with pytest.raises(ValueError, match="stage must be 1, 2 or 3"):
        dist.ZeroOptimizer(model, 0)
    other = W.make_model()
    other.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # one fewer trainable parameter
    opt = dist.ZeroOptimizer(other, 2)
    with pytest.raises(ValueError, match=r"w1.safetensors: parameter names do not match the model: missing \[\], "
                                         r"unexpected \['model.layers.0.mlp.up_proj.weight'\]"):
        dist.load_checkpoint(opt, ckpt1)
    for stage in (1, 2):  # the silent misuses become errors
        model = W.make_model()
        opt = dist.ZeroOptimizer(model, stage)
        if stage == 1:
            model.zero_grad(set_to_none=True)
            opt.backward(W.loss_fn(model, W.batches()[0]))
        else:
            W.loss_fn(model, W.batches()[0]).backward()
        with pytest.raises(RuntimeError, match="use opt.zero_grad" if stage == 1 else "call opt.backward"):
            opt.step()
    with pytest.raises(ValueError, match="in optimizer groups 0 and 1"):
        dist.ZeroOptimizer(W.make_model(), 1, groups=[{"params": ["lm_head.weight"]}, {"params": ["lm_head.weight"]}])


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_dead_or_hung_rank_fails_fast(tmp_path, mode):
    """Rank 1 exits (or stops issuing collectives); rank 0 must exit non-zero within the timeout, not hang."""
    timeout = 3.0
    codes, seconds = W.launch(2, [("x", W.die_or_hang, dict(mode=mode))], str(tmp_path), timeout_s=timeout,
                              deadline_s=60)
    assert codes[0] not in (0, None), codes
    assert codes[1] not in (0, None), codes
    assert seconds < 60


def test_checkpoint_is_streamed_plain_safetensors(ckpt1, tmp_path):
    """zero.safetensors is written streamed (header first, then one all-gathered bucket and kind at a time):
    an ordinary safetensors file (safetensors' own loader reads it), holding exactly the consolidated state;
    saved again after loading it (same bucket layout) is byte-identical; a file written whole by safetensors' save_file (the earlier
    writer) loads to the same state; a failed write raises and leaves no file."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from dist.checkpoint import FORMAT, full_state
    opt = dist.ZeroOptimizer(W.make_model(), 2, weight_decay=W.WD, groups=W.groups(W.make_model()),
                             bucket_numel=4000, **W.HYPER)  # the layout ckpt1 was saved from
    dist.load_checkpoint(opt, ckpt1)
    saved, state = load_file(str(ckpt1)), full_state(opt)
    assert saved.keys() == state.keys() and len(saved) == 3 * len(opt.names)
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    dist.save_checkpoint(opt, tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == ckpt1.read_bytes()
    with safe_open(str(ckpt1), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == FORMAT and meta["step"] == "10"
    save_file(state, str(tmp_path / "whole.safetensors"), metadata=meta)
    other = dist.ZeroOptimizer(W.make_model(), 3, weight_decay=W.WD, groups=W.groups(W.make_model()), **W.HYPER)
    dist.load_checkpoint(other, tmp_path / "whole.safetensors")
    assert all(torch.equal(v, full_state(other)[k]) for k, v in state.items())
    with pytest.raises(FileNotFoundError):
        dist.save_checkpoint(opt, tmp_path / "no-such-dir" / "z.safetensors")
    assert not (tmp_path / "no-such-dir").exists()
