"""torchrun + DistributedDataParallel helpers (used by the ImageNet scripts).

    torchrun --nproc_per_node 8 imagenet.py ...

init_distributed() reads RANK / WORLD_SIZE / LOCAL_RANK set by torchrun; without them it returns a single-process
context, so the same script runs with plain `python`. NCCL on GPUs, gloo on the CPU.
"""
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device="cuda"):
    """Initialise the process group from torchrun's environment; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    if use_cuda:  # one GPU per process under torchrun; the asked one (cuda:N) otherwise
        index = local_rank if world_size > 1 else (torch.device(device).index or 0)
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank, world_size, local_rank, dev)


def per_process_batch(global_batch, ctx):
    """Keep the published global batch whatever the number of processes."""
    if global_batch % ctx.world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by {ctx.world_size} processes")
    return global_batch // ctx.world_size


def train_sampler(dataset, ctx, shuffle=True, seed=0, drop_last=False):
    """A DistributedSampler when distributed (call set_epoch(epoch) each epoch for a new order), else None."""
    if not ctx.distributed:
        return None
    return DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed,
                              drop_last=drop_last)


def wrap_ddp(model, ctx, sync_bn=False, find_unused_parameters=False):
    """DDP-wrap MODEL (already on ctx.device) when distributed; optional SyncBatchNorm conversion."""
    if not ctx.distributed:
        return model
    if sync_bn and ctx.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif sync_bn:
        warnings.warn("SyncBatchNorm runs only on GPUs; on the CPU each process keeps its own BN statistics")
    ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                     find_unused_parameters=find_unused_parameters)


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(tensor, ctx):
    """Sum a tensor over processes (in place on a copy); identity when not distributed."""
    tensor = tensor.detach().clone()
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_int(value, ctx):
    """Rank 0's VALUE on every process (identity when not distributed)."""
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.long, device=ctx.device)
    dist.broadcast(t, src=0)
    return int(t.item())


def barrier(ctx):
    if ctx.distributed:
        dist.barrier()


def cleanup(ctx):
    """Wait for every process (rank 0 may still be writing logs and checkpoints), then leave the group: a process
    that tears its group down while another still uses it can abort the whole launch."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
