"""ZeRO-3 sharded loading: no rank ever holds the whole model (as FSDP's meta-device init + sharded state dicts).

`build` makes the model on the meta device on every rank (the base's names and shapes, checked against the
safetensors headers exactly as model.io.load_pretrained checks them, so a bad checkpoint gives the same one-line
error on every rank), attaches LoRA (its A/B are created for real, with the same RNG draws as on a loaded model)
and records where each base tensor lives. The base's parameters become zero-stride stand-ins (one element of
storage) and its NF4 buffers stay meta until ZeroOptimizer (stage 3) lays out its buckets; it then asks the
`ShardSource` for this rank's slice of each bucket, which reads from the memory-mapped files (`safe_open`,
`get_slice`) only the rows that overlap the slice:
  dense (full fine-tuning's weights, LoRA's frozen base): the overlapping rows, cast to the bucket's dtype;
  NF4 (QLoRA, Dettmers et al. 2023, eq. 1 and 6): the rank's slice of the codes bucket is whole quantization
    blocks (zero3.plan_frozen aligns it), so each rank quantizes only its own blocks; the blocks' fp32 absmax
    constants (4 bytes per 64 weights) are all-gathered per unit, because double quantization subtracts their
    mean over the whole matrix and scales them in groups of 256, and every rank then double-quantizes exactly
    as quant.nf4.quantize_nf4 does on the whole matrix: bit-identical codes, scales and nested state.
Bytes read per rank: 1/N of the model + at most two partial rows per tensor per unit (`bytes_read` counts them).
"""
import math
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from torch.overrides import TorchFunctionMode

from model.io import _corrupt, _weight_files, read_config, stored_shapes
from model.weights import CheckpointError, check_layers, check_shapes, meta_model

from .bucket import Bucket, collective

METHODS = ("full", "lora", "qlora")


def applies(cfg, pcfg) -> bool:
    """train.py --zero 3: load sharded (build) for full fine-tuning (SFT: preference stages copy the model),
    LoRA and QLoRA (no DoRA: its magnitude reads the base) of a causal LM from a safetensors HF dir that is not
    already quantized; anything else loads whole on every rank as before."""
    p = Path(cfg.model)
    if cfg.method not in METHODS or cfg.task != "causal_lm" or getattr(pcfg, "dora", False) \
            or (cfg.method == "full" and cfg.stage != "sft") or p.suffix == ".gguf":
        return False
    if not ((p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()):
        return False
    try:
        return "quantization_config" not in read_config(p).hf
    except CheckpointError:
        return True  # build raises the same one-line error


_FACTORIES = (torch.empty, torch.zeros, torch.ones, torch.full)


class _NewTensorsOn(TorchFunctionMode):
    """New tensors created for the meta device inside (LoRA's A and B, which take the base weight's device) are
    created on `device` instead, so their random init draws the same numbers as on a loaded base."""

    def __init__(self, device):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _FACTORIES and kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "meta":
            kwargs["device"] = self.device
        return func(*args, **kwargs)


def nf4_stand_ins(model, blocksize: int = 64):
    """Every nn.Linear but lm_head -> an NF4Linear (double quant) whose buffers are meta, with the real shapes
    (what quant.checkpoint.load_nf4(quantize=True) builds; also the ledger's stand-ins)."""
    from quant.linear import NF4Linear
    from quant.nf4 import NF4State
    for mod in list(model.modules()):
        for child, lin in list(mod.named_children()):
            if isinstance(lin, nn.Linear) and child != "lm_head":
                n, meta = lin.weight.numel(), dict(device="meta")
                blocks = -(-n // blocksize)
                state = NF4State(torch.empty(blocks, dtype=torch.uint8, **meta), blocksize, tuple(lin.weight.shape),
                                 lin.weight.dtype, torch.empty(-(-blocks // 256), **meta), torch.empty((), **meta))
                setattr(mod, child, NF4Linear(torch.empty((n + 1) // 2, dtype=torch.uint8, **meta), state, lin.bias))


def build(path, method: str, pcfg, device="cpu"):
    """The model of HF dir `path` with `method` attached, holding no base weights yet (see the module
    docstring); ZeroOptimizer(stage=3) fills in this rank's shards from `model.sharded_source`."""
    import peft
    path, device = Path(path), torch.device(device)
    cfg = read_config(path)
    shapes, where = {}, {}  # tensor name -> its shape (from the headers), its file
    for f in _weight_files(path):
        s = stored_shapes(f)
        shapes.update(s)
        where.update(dict.fromkeys(s, f))
    check_layers(cfg.num_hidden_layers, shapes, path / "config.json")
    model = meta_model(cfg)
    check_shapes(model, shapes, str(path))
    if method == "qlora":
        nf4_stand_ins(model)
    if method != "full":
        with _NewTensorsOn(device):
            model = peft.apply(model, pcfg)
    memo = {}  # meta parameters -> zero-stride stand-ins on `device` (tied ones stay one Parameter)
    for m in model.modules():
        for attr, p in list(m._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in memo:
                    stand_in = torch.empty(1, dtype=p.dtype, device=device).expand(p.shape)
                    memo[id(p)] = (p, nn.Parameter(stand_in, requires_grad=p.requires_grad))
                m._parameters[attr] = memo[id(p)][1]
    key_of = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()] if n in where}
    model.sharded_source = ShardSource(where, key_of, device)
    return model.eval()


def cast(t: torch.Tensor, dtype) -> torch.Tensor:
    """t.to(dtype); a zero-stride stand-in of `build` stays one (.to would allocate it whole)."""
    if t.numel() > 1 and not any(t.stride()):
        return torch.empty(1, dtype=dtype, device=t.device).expand(t.shape)
    return t.to(dtype)


class ShardSource:
    """Reads this rank's slices of a model's tensors from its safetensors files, counting the bytes read."""

    def __init__(self, where: dict, key_of: dict, device):
        self.where, self.key_of, self.device = where, key_of, device
        self.bytes_read, self.consumed, self._nf4 = 0, set(), {}

    def covers(self, tensors) -> bool:
        """Are some of `tensors` to be read (a base tensor, or NF4 state still meta)?"""
        return any(id(t) in self.key_of or t.is_meta for t in tensors)

    def read(self, key: str, a: int, e: int) -> torch.Tensor:
        """Elements [a, e) of tensor `key` flattened (row-major), in its stored dtype: only the rows holding
        them are read from the file."""
        f = self.where[key]
        try:
            with safe_open(str(f), framework="pt") as h:  # opened per read: no map's pages outlive the read
                sl = h.get_slice(key)
                shape = sl.get_shape()
                if len(shape) == 0:
                    t = h.get_tensor(key).reshape(1)
                    r0, cols = 0, 1
                else:
                    cols = math.prod(shape[1:])
                    r0, r1 = a // cols, -(-e // cols)
                    t = sl[r0:r1].reshape(-1)
        except Exception as err:  # safetensors' own error types: a truncated or damaged file
            raise _corrupt(f, err) from None
        self.bytes_read += t.nbytes
        return t[a - r0 * cols:e - r0 * cols]

    def dense(self, b: Bucket, dtype, whole: bool = False) -> torch.Tensor:
        """Bucket b's elements [lo, hi) (whole: all of it, padding zero) in `dtype`: base tensors from the files,
        the others (LoRA's) from the tensor itself."""
        lo, hi = (0, b.padded) if whole else (b.lo, b.hi)
        out = torch.zeros(hi - lo, dtype=dtype)
        for p, off in zip(b.params, b.offsets):
            self.consumed.add(id(p))
            a, e = max(off, lo), min(off + p.numel(), hi)
            if a < e:
                key = self.key_of.get(id(p))
                src = self.read(key, a - off, e - off) if key else p.detach().reshape(-1)[a - off:e - off]
                out[a - lo:e - lo] = src.to(dtype)
        return out.to(self.device)

    def frozen(self, b: Bucket, u: int, items: list, world: int, rank: int) -> torch.Tensor:
        """This rank's shard of stage 3's frozen bucket b of unit u (zero3.plan_frozen's items)."""
        if isinstance(items[0][2], nn.Parameter):
            return self.dense(b, items[0][2].dtype)
        for *_, t in items:
            self.consumed.add(id(t))
        if u not in self._nf4:  # the codes, scales and nested state of the unit's NF4 layers, computed once
            self._nf4[u] = self._quantize_unit([s for s, _, _ in items], world, rank)
        codes, values = self._nf4[u]
        if items[0][1] == "weight":
            assert codes.numel() == b.shard_numel
            return codes.to(self.device)
        ts = [values[id(s), attr] for s, attr, _ in items]
        return b.flatten(ts, ts[0].dtype, "cpu")[b.lo:b.hi].to(self.device)

    def _quantize_unit(self, subs, world: int, rank: int):
        """(this rank's packed codes of the unit's NF4 layers, {(id(layer), buffer): whole tensor} of their
        absmax codes / fp32 absmax and nested state). Codes aligned on blocks: each rank quantizes its own blocks
        and the fp32 absmax is all-gathered; else every rank quantizes whole layers, one at a time."""
        from quant.nf4 import quantize_absmax, quantize_nf4
        packed_ts = [s._buffers["weight"] for s in subs]
        bs = subs[0].blocksize
        aligned = len({s.blocksize for s in subs}) == 1 and all(
            (s.out_features * s.in_features) % s.blocksize == 0 for s in subs)
        pb = Bucket(["w"] * len(subs), packed_ts, [0] * len(subs), world, rank, True, bs // 2 if aligned else 1)
        blocks = [-(-s.out_features * s.in_features // s.blocksize) for s in subs]
        boff = [sum(blocks[:i]) for i in range(len(subs))]
        if aligned:  # rank r: blocks [rK, (r+1)K) of the unit
            k = pb.shard_numel // (bs // 2)
            codes = torch.zeros(pb.shard_numel, dtype=torch.uint8)
            local = torch.zeros(k, dtype=torch.float32)
            for s, o, nb in zip(subs, boff, blocks):
                a, e = max(o, rank * k), min(o + nb, (rank + 1) * k)
                if a < e:
                    w = self.read(self.key_of[id(s._buffers["weight"])], (a - o) * bs, (e - o) * bs)
                    p, st = quantize_nf4(w.to(torch.float32), bs)
                    codes[(a - rank * k) * bs // 2:(e - rank * k) * bs // 2] = p.view(-1)
                    local[a - rank * k:e - rank * k] = st.absmax
            absmax = torch.empty(k * world, dtype=torch.float32)
            collective("all_gather", absmax, local)
        else:
            full, absmaxes = [], []
            for s in subs:
                n = s.out_features * s.in_features
                w = self.read(self.key_of[id(s._buffers["weight"])], 0, n)
                p, st = quantize_nf4(w.to(torch.float32), s.blocksize)
                full.append(p.view(-1))
                absmaxes.append(st.absmax)
            codes = torch.cat(full + [torch.zeros(pb.padded - pb.numel, dtype=torch.uint8)])[pb.lo:pb.hi].clone()
            absmax = torch.cat(absmaxes)
        values = {}
        for s, o, nb in zip(subs, boff, blocks):
            am = absmax[o:o + nb].clone()
            if s._buffers.get("nested_absmax") is not None:  # double quantization over the whole matrix
                q, nested, offset = quantize_absmax(am)
                values[id(s), "absmax"], values[id(s), "nested_absmax"] = q, nested
                values[id(s), "nested_offset"] = torch.as_tensor(offset, dtype=torch.float32)
            else:
                values[id(s), "absmax"] = am
        return codes, values

    @torch.no_grad()
    def load_rest(self, model):
        """The base tensors outside stage 3's buckets (none in nanotune's decoder): read whole."""
        for m in model.modules():
            for store in (m._parameters, m._buffers):
                for attr, t in list(store.items()):
                    if t is None or id(t) not in self.key_of or id(t) in self.consumed:
                        continue
                    self.consumed.add(id(t))
                    full = self.read(self.key_of[id(t)], 0, t.numel()).to(self.device, t.dtype).view(t.shape)
                    if isinstance(t, nn.Parameter):
                        t.data = full
                    else:
                        store[attr] = full
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise ValueError(f"sharded loading left tensors unloaded: {', '.join(left[:3])}")
