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
