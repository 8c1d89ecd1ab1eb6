"""train.py's step reads nothing back from the device except when it checks (the logging / saving steps): no
.item() / .tolist() / float() / bool() of a floating-point tensor, no boolean-mask indexing of one (each a host
sync on a GPU). A device-sync count needs a GPU (bench/gpu_check.sh counts them under
torch.cuda.set_sync_debug_mode); here the structure is tested by running steps with those calls raising. The
host-side counts of the CPU batch (integer / bool tensors) stay allowed."""
import numpy as np
import pytest
import torch

import data
import model as M
import train
from data.encode import Example
from tests.reference import tiny_hf_config


class Synced(Exception):
    pass


@pytest.fixture
def no_float_reads(monkeypatch):
    """Make every read-back of a floating-point tensor, and boolean-mask indexing of one, raise."""
    def guard(name):
        orig = getattr(torch.Tensor, name)

        def f(self, *a, **k):
            if self.is_floating_point():
                raise Synced(f"Tensor.{name} of a {self.dtype} tensor")
            return orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, f)
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        guard(name)
    getitem = torch.Tensor.__getitem__

    def index(self, i):
        parts = i if isinstance(i, tuple) else (i,)
        if self.is_floating_point() and any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            raise Synced("boolean-mask indexing")
        return getitem(self, i)
    monkeypatch.setattr(torch.Tensor, "__getitem__", index)


def batches(pack: bool):
    g = np.random.default_rng(0)
    rows = []
    for lens in ((6, 9), (4, 5, 2), (12,)):
        ids = np.concatenate([g.integers(3, 128, n) for n in lens]).astype(np.int32)
        train_mask = np.concatenate([np.r_[False, np.ones(n - 1, bool)] for n in lens])
        if pack:
            rows.append(Example(ids, train_mask, seg=np.concatenate([np.full(n, i, np.int32)
                                                                   for i, n in enumerate(lens)])))
        else:
            rows.append(Example(ids[:lens[0] + 3], train_mask[:lens[0] + 3]))  # uneven: right padding
    return [data.collate(rows[:2], 0), data.collate(rows[2:], 0)]


def setup(method: str):
    torch.manual_seed(0)
    model = M.Transformer(M.ModelConfig.from_hf(tiny_hf_config("llama"))).init_weights(0.1, 0)
    cfg = train.TrainConfig(data="x", method=method, max_steps=4, grad_accum=2)
    if method != "full":
        import peft
        model = peft.apply(model, peft.method_config(method, {}, ""))
    opt = train.make_optimizer(model, cfg)
    return model, opt, train.make_scheduler(opt.optimizer, cfg, 4), cfg


@pytest.mark.parametrize("method,pack", [("full", False), ("lora", True)])
def test_unchecked_steps_do_not_read_the_device(no_float_reads, method, pack):
    mbs, dev = batches(pack), torch.device("cpu")
    a, b = setup(method), setup(method)
    m = train.train_step(a[0], mbs, a[1], a[2], a[3], dev, check=False)        # under the guard: no read-back
    assert isinstance(m["loss"], torch.Tensor) and isinstance(m["grad_norm"], torch.Tensor)
    with pytest.raises(Synced):  # the guard bites: a checked step reads the loss
        train.train_step(b[0], mbs, b[1], b[2], b[3], dev, check=True)


@pytest.mark.parametrize("pack", [False, True])
def test_unchecked_and_checked_steps_agree(pack):
    mbs, dev = batches(pack), torch.device("cpu")
    a, b = setup("lora"), setup("lora")
    ma = train.train_step(a[0], mbs, a[1], a[2], a[3], dev, check=False)
    mb = train.train_step(b[0], mbs, b[1], b[2], b[3], dev, check=True)
    assert isinstance(mb["loss"], float) and mb["trained_tokens"] == sum(data.count_targets(x) for x in mbs)
    assert float(ma["loss"]) == mb["loss"] and float(ma["grad_norm"]) == mb["grad_norm"]
    for (n, p), q in zip(a[0].named_parameters(), b[0].parameters()):
        assert torch.equal(p, q), n


def test_one_rank_process_group(tmp_path):
    """NANOTUNE_PG=1: a one-process run gets a real one-rank group (gloo here, NCCL on a GPU), and all_sum keeps
    a tensor on the device (the step's losses) while a number stays a number."""
    import os
    import subprocess
    import sys
    code = ("import torch, torch.distributed as d\nfrom dist import init_distributed, all_sum\n"
            "env = init_distributed()\nassert d.is_initialized() and d.get_world_size() == 1 and env.world_size == 1\n"
            "t = all_sum(torch.tensor(2.5), env.device)\nassert isinstance(t, torch.Tensor) and t.item() == 2.5\n"
            "assert all_sum(3, env.device) == 3.0\nd.destroy_process_group()\nprint('ok')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")}
    r = subprocess.run([sys.executable, "-c", code], env={**env, "NANOTUNE_PG": "1"}, capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
