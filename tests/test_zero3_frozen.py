"""ZeRO-3 partitions the frozen base too (dist/zero3.py shard_frozen): LoRA over a dense fp32 base and QLoRA over
an NF4 + double-quant base, on 2 and 4 gloo ranks, equal the single-process torch.optim.AdamW run (losses and
adapter weights <= 1e-6 after 10 steps), and each rank holds 1/N of the frozen base's bytes (+ padding to whole
shards; NF4 codes and scales cut on quantization-block boundaries), measured on the tensors it holds."""
import pytest
import torch

import dist_worker as W
from test_dist import assert_same

STEPS = 10
METHODS = ("lora", "qlora")
LEDGER = (None, "lora", "qlora")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    out, res = tmp_path_factory.mktemp("frozen"), {}
    for world in (2, 4):
        jobs = [(m, W.train_zero, dict(stage=3, stop=STEPS, method=m)) for m in METHODS]
        if world == 2:  # untied LM head read by the chunked loss + gradient checkpointing, over the NF4 base
            jobs.append(("qlora_untied_ckpt", W.train_zero, dict(stage=3, stop=STEPS, method="qlora", tied=False,
                                                                 head_matmul=True, checkpointing=True)))
            # a tiny Mixtral: a block's router and all its experts are one unit (model/moe.py runs every expert)
            jobs.append(("moe_lora", W.train_zero, dict(stage=3, stop=STEPS, method="lora", moe=True)))
        (out / str(world)).mkdir()
        if world == 2:  # the memory ledger: every stage, full fine-tuning / LoRA / QLoRA, tied and untied
            jobs += [(f"ledger{s}{m}{t}", W.ledger_step, dict(stage=s, method=m, tied=t))
                     for s in range(4) for m in LEDGER for t in (True, False)]
        codes, _ = W.launch(world, jobs, str(out / str(world)))
        assert codes == [0] * world
        for name, _, _ in jobs:
            res[name, world] = [torch.load(out / str(world) / f"{name}.rank{r}.pt") for r in range(world)]
    return res


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("method", METHODS)
def test_frozen_base_sharded_equals_one_process(runs, method, world):
    ref = W.reference(method=method, steps=STEPS)
    assert_same(runs[method, world][0], ref)
    if world == 2 and method == "qlora":
        untied = W.reference(method="qlora", tied=False, steps=STEPS)
        assert_same(runs["qlora_untied_ckpt", 2][0], untied)
    total = W.frozen_bytes(W.make_model(method=method))  # the whole frozen base, 1 process
    ranks = runs[method, world]
    flats = ranks[0]["mem"]["frozen_flats"]
    assert sum(n * size for _, n, _, _, size in flats) == total  # every frozen byte is in exactly one bucket
    slack = 0
    for name, numel, padded, shard_bytes, size in flats:
        align = 32 if name.endswith(".weight") and size == 1 else 1  # NF4 codes: whole 64-value blocks
        assert padded % (world * align) == 0 and 0 <= padded - numel < world * align, name
        assert shard_bytes * world == padded * size, name
        slack += (padded - numel) * size
    if method == "qlora":  # per unit, the rank's codes and absmax scales cover the same blocks
        by = {name: shard for name, _, _, shard, _ in flats}
        for name, shard in by.items():
            if name.endswith(".absmax"):
                assert by[name[:-len("absmax")] + "weight"] == 32 * shard, name
    for r in ranks:
        m = r["mem"]
        assert m["frozen_live"] == 0  # between steps no rank holds a gathered frozen tensor
        assert m["final"]["frozen"] == sum(s for _, _, _, s, _ in flats) == (total + slack) // world
        assert 0 < m["peak"]["frozen"] < total  # gathered per unit, never the whole base
    print(f"{method} world {world}: frozen base {total} B, per rank {(total + slack) // world} B")


@pytest.mark.parametrize("world", [1, 2])
def test_ledger_prediction_equals_measured_bytes(runs, world):
    """dist/ledger.py's formulas == the bytes of the tensors each rank holds after a step, every kind, for
    stages 0-3 (0: plain data parallel), full fine-tuning, LoRA and QLoRA, tied and untied embeddings."""
    for stage in range(4):
        for method in LEDGER:
            for tied in (True, False):
                got = [runs[f"ledger{stage}{method}{tied}", 2][r] for r in range(2)] if world == 2 else \
                    [W.ledger_step(stage, method, tied)]
                for r in got:
                    assert r["predicted"] == r["measured"], (stage, method, tied, r)
                    assert r["measured"]["optim"] > 0 and (r["measured"]["frozen"] > 0) == (method is not None)


def test_moe_lora_zero3_two_ranks(runs):
    """LoRA on every linear of a tiny Mixtral (experts included) with ZeRO-3 on 2 ranks == 1 process."""
    assert_same(runs["moe_lora", 2][0], W.reference(method="lora", moe=True, steps=STEPS))
    assert runs["moe_lora", 2][0]["mem"]["frozen_live"] == 0


@pytest.mark.parametrize("method", METHODS)
def test_ledger_cli_from_config_only(runs, tmp_path, capsys, method):
    """`python -m dist.ledger` on the model's config.json alone (meta device, NF4 stand-ins) prints the bytes
    that rank 0 of the 2-rank ZeRO-3 run measured on its tensors."""
    from dist import ledger
    from model import save_pretrained
    save_pretrained(W.make_model(), tmp_path / "m")
    ledger.main(["--model", str(tmp_path / "m"), "--method", method, "--zero", "3", "--world", "2", "--lora-r", "4"])
    lines = capsys.readouterr().out.splitlines()
    printed = {ln.split()[0]: int(ln.split()[1].replace(",", "")) for ln in lines[1:6]}
    assert printed == runs[f"ledger3{method}True", 2][0]["measured"]


@pytest.mark.parametrize("method,tied,checkpointing", [
    ("lora", True, False), ("lora", False, True), ("qlora", True, False), ("qlora", False, True)])
def test_one_gathered_block_at_a_time(monkeypatch, method, tied, checkpointing):
    """Stage 3 gathers one decoder block's frozen base at a time, in forward and in backward, the first block
    included (its input needs no gradient: freed with its LoRA gradients, inside backward), and the run still
    equals torch.optim.AdamW. Recorded on every gather and free of one process's frozen buckets."""
    from dist import zero3
    torch.set_num_threads(1)
    ref = W.reference(method=method, tied=tied, steps=3)
    events, gathered = [], {}  # (what, unit, gathered units, id(bucket)); id(bucket) -> (unit, bytes)
    unit_bytes, peak = {}, [0]  # a block's frozen bytes when gathered; the most block bytes gathered at once
    real_gather, real_free, real_backward = zero3.gather, zero3.free, torch.autograd.backward
    n_blocks = W.TINY["num_hidden_layers"]

    def gather(b):
        was = b.gathered
        real_gather(b)
        if hasattr(b, "unit") and not was:  # a frozen bucket, gathered now
            gathered[id(b)] = (b.unit, b.full.untyped_storage().nbytes())
            events.append(("gather", b.unit, sorted({u for u, _ in gathered.values()}), id(b)))
            unit_bytes[b.unit, id(b)] = b.full.untyped_storage().nbytes()
            blocks = {u for u, _ in gathered.values() if 1 <= u <= n_blocks}
            assert len(blocks) <= 1, events[-8:]  # units 1..L are the decoder blocks
            peak[0] = max(peak[0], sum(n for u, n in gathered.values() if 1 <= u <= n_blocks))

    def free(b):
        real_free(b)
        if gathered.pop(id(b), None) is not None:
            events.append(("free", b.unit, sorted({u for u, _ in gathered.values()}), id(b)))

    def backward(*a, **k):
        real_backward(*a, **k)
        events.append(("end of backward", None, sorted({u for u, _ in gathered.values()}), None))
    monkeypatch.setattr(zero3, "gather", gather)
    monkeypatch.setattr(zero3, "free", free)
    monkeypatch.setattr(torch.autograd, "backward", backward)
    res = W.train_zero(3, stop=3, method=method, tied=tied, checkpointing=checkpointing)
    assert_same(res, ref)
    # every block is gathered in forward and again in backward, and freed before backward ends
    ends = [i for i, e in enumerate(events) if e[0] == "end of backward"]
    assert len(ends) == 3 * W.ACCUM
    for e in ends:
        assert not [u for u in events[e][2] if 1 <= u <= n_blocks], events[e][:3]
    first = events[:ends[0]]
    for (u, b), _ in unit_bytes.items():
        if 1 <= u <= n_blocks:
            assert [w for w, _, _, i in first if i == b] == ["gather", "free", "gather", "free"], (u, first)
    # the bytes: the largest block's frozen buckets, never two blocks' (measured on the gathered storages)
    per_block = [sum(n for (v, _), n in unit_bytes.items() if v == u) for u in range(1, n_blocks + 1)]
    assert peak[0] == max(per_block) > 0, (peak, per_block)
