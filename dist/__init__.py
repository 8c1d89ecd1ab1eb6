"""nanotune's distributed training: process-group setup, plain data parallel AdamW and the ZeRO-1/2/3 sharded
AdamW (with CPU offload), both behind one interface, and a training run's checkpoints (run.py)."""
from .checkpoint import consolidated_params, load_checkpoint, save_checkpoint
from .ddp import AllReduceAdamW
from .setup import DistEnv, all_reduce_mean, all_sum, cleanup, get_rank, get_world_size, init_distributed, log
from .zero import ZeroOptimizer, predicted_bytes
from .zero3 import gathered_params

__all__ = ["AllReduceAdamW", "DistEnv", "ZeroOptimizer", "all_reduce_mean", "all_sum", "cleanup",
           "consolidated_params", "gathered_params", "get_rank", "get_world_size", "init_distributed",
           "load_checkpoint", "log", "predicted_bytes", "save_checkpoint"]
