"""nanotune's distributed training: process-group setup and the ZeRO-1/2/3 sharded AdamW (with CPU offload)."""
from .checkpoint import consolidated_params, load_checkpoint, save_checkpoint
from .setup import DistEnv, all_reduce_mean, cleanup, get_rank, get_world_size, init_distributed, log
from .zero import ZeroOptimizer, predicted_bytes
from .zero3 import gathered_params

__all__ = ["DistEnv", "ZeroOptimizer", "all_reduce_mean", "cleanup", "consolidated_params", "gathered_params",
           "get_rank", "get_world_size", "init_distributed", "load_checkpoint", "log", "predicted_bytes",
           "save_checkpoint"]
