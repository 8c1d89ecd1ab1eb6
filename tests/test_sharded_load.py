"""ZeRO-3 sharded loading (dist/sharded_load.py): on 1, 2 and 4 gloo ranks, each rank of a meta-device model
reads from the safetensors files only its own shards (dense: full fine-tuning, LoRA's base; NF4: QLoRA, quantized
block by block while loading), for single-file and index-sharded HF dirs. Proofs: the bytes each rank reads are
<= 1/N of the file + one unit + a fixed overhead; its shards (trainable fp32 masters and compute weights, frozen
dense / NF4 codes / scales / nested state) equal bit for bit those of a whole-model load on that rank, and so do
the logits; a missing or truncated shard file gives load_pretrained's one-line error on every rank."""
import os

import pytest
import torch

import dist
import dist_worker as W
import model as M
import peft
from dist import sharded_load
from dist.save import save_streamed
from dist.zero3 import unit_modules
from model import save_pretrained

CASES = [("full", True, False), ("lora", False, True), ("qlora", True, False), ("qlora", False, True)]


def lora_cfg():
    return peft.LoraConfig(r=4, alpha=8, targets="all-linear")


def write_model(d, tied: bool, index: bool) -> str:
    torch.manual_seed(0)
    m = W.make_model(tied=tied)
    save_pretrained(m, d, max_shard_bytes=20_000 if index else 5 * 2**30)
    return str(d)


def whole(path, method):
    """What train.py builds without sharded loading (the same seed before LoRA's init)."""
    torch.manual_seed(0)
    if method == "qlora":
        from quant import qlora
        return qlora.load_qlora(path, lora_cfg())
    base = M.load_pretrained(path)
    return base if method == "full" else peft.apply(base, lora_cfg())


def load_job(path, method):
    """Sharded and whole load on this rank -> are the shards and logits bit-equal, and the bytes read."""
    torch.manual_seed(0)
    model = sharded_load.build(path, method, None if method == "full" else lora_cfg())
    opt = dist.ZeroOptimizer(model, 3)
    ref = whole(path, method)
    ropt = dist.ZeroOptimizer(ref, 3)
    same = [torch.equal(b.master, r.master) and torch.equal(b.shard_param, r.shard_param)
            for b, r in zip(opt.buckets, ropt.buckets)] + [len(opt.buckets) == len(ropt.buckets)]
    same += [b.shard_param.dtype == r.shard_param.dtype and torch.equal(b.shard_param, r.shard_param)
             for b, r in zip(opt.frozen, ropt.frozen)] + [len(opt.frozen) == len(ropt.frozen)]
    ids = W.batches()[0][:2, :-1]
    with torch.no_grad():
        same.append(torch.equal(model(ids), ref(ids)))
    if method == "full":  # the streamed consolidated save (4 shard files) == save_pretrained of the gathered model
        out = os.path.join(os.path.dirname(path), f"saved{opt.world}")
        save_streamed(opt, model, out + "-streamed", max_shard_bytes=50_000)
        with dist.gathered_params(ropt):
            if opt.rank == 0:
                save_pretrained(ref, out + "-whole")
        if opt.rank == 0:
            got, want = (M.load_pretrained(out + s).state_dict() for s in ("-streamed", "-whole"))
            shards = [f for f in os.listdir(out + "-streamed") if f.startswith("model-")]
            same += [len(shards) == 4, got.keys() == want.keys()]
            same += [torch.equal(got[k], want[k]) for k in want]
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    units = [sum(p.numel() * 4 for p in m.parameters()) for m in peft.unwrap(ref).model.layers]
    return {"same": same, "read": model.sharded_source.bytes_read, "n_frozen": len(opt.frozen),
            "total": sum(os.path.getsize(os.path.join(path, f)) for f in files), "layer": max(units)}


def error_job(path, method):
    try:
        sharded_load.build(path, method, None if method == "full" else lora_cfg())
    except M.CheckpointError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded")
    out = {(t, i): write_model(d / f"m{t}{i}", t, i) for t in (True, False) for i in (True, False)}
    missing = write_model(d / "missing", True, True)  # an index naming a shard that is not there
    second = sorted(f for f in os.listdir(missing) if f.startswith("model-"))[1]
    os.remove(os.path.join(missing, second))
    trunc = write_model(d / "trunc", True, True)
    f = os.path.join(trunc, second)
    os.truncate(f, os.path.getsize(f) - 100)
    return out, {"missing": missing, "truncated": trunc}


@pytest.fixture(scope="module")
def runs(dirs, tmp_path_factory):
    torch.set_num_threads(1)
    models, bad = dirs
    res = {}
    for world in (2, 4):
        cases = CASES if world == 2 else CASES[::2]
        jobs = [(f"{m}{t}{i}", load_job, dict(path=models[t, i], method=m)) for m, t, i in cases]
        jobs += [(f"err_{k}", error_job, dict(path=p, method="qlora" if k == "missing" else "lora"))
                 for k, p in bad.items()] if world == 2 else []
        out = tmp_path_factory.mktemp(f"w{world}")
        codes, _ = W.launch(world, jobs, str(out))
        assert codes == [0] * world
        for name, _, _ in jobs:
            res[name, world] = [torch.load(out / f"{name}.rank{r}.pt") for r in range(world)]
    return res


def check_load(recs, world):
    for r in recs:
        assert all(r["same"]), r["same"]
        # 1/N of the file + one decoder block + a fixed overhead (headers are not counted: they are not
        # tensor bytes; partial rows at the slices' ends: at most 2 rows of 32 fp32 per tensor per unit)
        assert r["read"] <= r["total"] / world + r["layer"] + 16 * 1024, (r["read"], r["total"], world)
    print(f"world {world}: bytes read per rank {[r['read'] for r in recs]} of a {recs[0]['total']} B file")


@pytest.mark.parametrize("world,method,tied,index", [(2, *c) for c in CASES] + [(4, *c) for c in CASES[::2]])
def test_sharded_load_equals_whole_load(runs, world, method, tied, index):
    check_load(runs[f"{method}{tied}{index}", world], world)


def test_one_process(dirs):
    """World size 1 (no process group): the same load, every byte read once."""
    for m, t, i in CASES:
        r = load_job(dirs[0][t, i], m)
        assert all(r["same"])
        assert r["read"] <= r["total"]


def test_bad_files_same_error_every_rank(runs, dirs):
    """A shard missing from the index and a truncated shard: load_pretrained's one-line error, on every rank."""
    for kind, path in dirs[1].items():
        with pytest.raises(M.CheckpointError) as e:
            M.load_pretrained(path)
        msgs = [r for r in runs[f"err_{kind}", 2]]
        assert msgs == [str(e.value)] * 2 and "\n" not in msgs[0] and path in msgs[0], (kind, msgs)


def _vm(key: str) -> int:
    """This process's /proc/self/status field `key` (VmRSS: resident now, VmHWM: its peak) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def rss_load_job(path):
    """Sharded LoRA load on this rank -> the growth of its peak RSS during the load (VmHWM after - VmRSS
    before; the peak is reset first where the kernel allows it, else the fresh process's earlier peak counts,
    which can only make the growth look larger) and the frozen shard bytes it ends up holding."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        pass
    before = _vm("VmRSS")
    torch.manual_seed(0)
    model = sharded_load.build(path, "lora", lora_cfg())
    opt = dist.ZeroOptimizer(model, 3)
    units = [sum(p.numel() * 4 for p in m.parameters()) for m in unit_modules(peft.unwrap(model))]
    return {"growth": _vm("VmHWM") - before, "frozen": sum(b.shard_param.nbytes for b in opt.frozen),
            "unit": max(units)}


def test_peak_rss_during_sharded_load(tmp_path):
    """Each of 2 ranks loading a 168 MiB fp32 llama (LoRA, frozen base sharded) grows its peak RSS by at most
    1/2 of the model + one unit (the largest: a block or the embedding) + 32 MiB, and by at least its frozen
    shard (the measurement sees the load): no rank ever holds the whole model."""
    cfg = dict(W.TINY, vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=6,
               num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=256)
    model = M.Transformer(M.ModelConfig(**cfg)).init_weights(seed=0)
    save_pretrained(model, tmp_path / "m")
    total = os.path.getsize(tmp_path / "m" / "model.safetensors")
    del model
    codes, _ = W.launch(2, [("rss", rss_load_job, dict(path=str(tmp_path / "m")))], str(tmp_path))
    assert codes == [0, 0]
    for r in range(2):
        rec = torch.load(tmp_path / f"rss.rank{r}.pt")
        bound = total / 2 + rec["unit"] + 32 * 2**20
        print(f"rank {r}: peak RSS +{rec['growth'] / 2**20:.1f} MiB during the load of a {total / 2**20:.1f} MiB "
              f"model (bound {bound / 2**20:.1f}: half {total / 2**21:.1f} + unit {rec['unit'] / 2**20:.1f} + 32); "
              f"frozen shard {rec['frozen'] / 2**20:.1f} MiB")
        assert rec["frozen"] <= rec["growth"] <= bound, rec
