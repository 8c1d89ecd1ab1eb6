"""Process-group setup from the torchrun environment, rank-aware logging, cleanup.

torchrun exports RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT to every process.
We use gloo on CPU and NCCL on GPU. The timeout matters: a rank that dies or stops issuing collectives makes the
others raise after `timeout_s` instead of hanging forever. torchrun also sets OMP_NUM_THREADS=1, which would leave
a CPU run on one core per process: we set the thread count explicitly.
"""
import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float = 600.0, backend: str | None = None, threads: int | None = None) -> DistEnv:
    """Join the process group described by torchrun's environment; a plain `python train.py` gets world size 1
    and no process group (ZeroOptimizer then runs its collectives as local copies), unless NANOTUNE_PG=1 asks for
    a one-rank group (on a GPU: NCCL's real collectives, e.g. ZeRO's, on one card). On CUDA, fp32 matrix products
    use TF32 tensor cores (10-bit mantissa products, fp32 accumulation: torch's "high" matmul precision)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")
    elif threads or "LOCAL_WORLD_SIZE" in os.environ:  # under torchrun, OMP_NUM_THREADS=1 is too few:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # share the cores between local ranks
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
    one = world == 1 and os.environ.get("NANOTUNE_PG") == "1"
    if (world > 1 or one) and not dist.is_initialized():
        if one:  # a one-rank group needs a rendezvous address too: this machine, a free port
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world} but {key} is not set: launch with torchrun")
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(rank, world, local_rank, device)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def log(*args, **kwargs):
    """print on rank 0 only (every rank computes the same thing; one copy in the log is enough)."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_sum(x, device):
    """Sum of a number over ranks (in fp64: token counts stay exact); x itself in one process. A tensor x gives a
    device tensor (the step's losses: no host sync), a number a number."""
    if not dist.is_initialized():
        return x
    t = torch.as_tensor(x).detach().to(device=device, dtype=torch.float64).reshape(1).clone()
    dist.all_reduce(t)
    return t[0] if isinstance(x, torch.Tensor) else t.item()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (e.g. the loss to log); a copy, the input is untouched."""
    x = x.detach().clone().float().contiguous()
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()
