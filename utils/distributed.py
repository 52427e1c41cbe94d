"""Several processes under torchrun: ranks, the process group, collectives and DDP.

With one process (plain `python`) every helper here is a no-op that returns the local value.
"""
import os
import sys

import torch
import torch.distributed as dist

from .device import resolve_device
from .errors import UserError


def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main():
    """True in the process that prints, logs and writes files (rank 0, or the only process)."""
    return get_rank() == 0


def launched_processes():
    """How many processes torchrun started for this run (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def global_batch(batch_size):
    """(images per step over all processes, how to say it): --batch_size is per process."""
    world = get_world_size()
    return batch_size * world, f"{batch_size} x {world} processes" if world > 1 else str(batch_size)


def init_distributed(device_name):
    """Join the process group that torchrun describes in the environment and return this
    process's device; without torchrun (or with one process) just resolve --device.

    CUDA processes use cuda:LOCAL_RANK and NCCL, CPU processes gloo. Processes other than rank 0
    print nothing (their errors still reach stderr).
    """
    if launched_processes() <= 1:
        return resolve_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        if device_name not in ("auto", "cuda"):
            raise UserError(f"under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda, "
                            f"not {device_name}")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU: this node has "
                            f"{torch.cuda.device_count()}; lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    return device


def barrier():
    if get_world_size() > 1:
        dist.barrier()


def mean_over_ranks(values):
    """The mean over all processes of a tensor (detached); the tensor itself with one process."""
    values = values.detach()
    if get_world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / get_world_size()


def gather_objects(obj):
    """A list with every process's obj, in rank order (just [obj] with one process)."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def distribute(model, device, sync_bn=False):
    """Wrap model in DistributedDataParallel under torchrun (optionally with SyncBatchNorm);
    return it unchanged in a single process. Build the optimiser on model before calling:
    the conversion to SyncBatchNorm keeps the same parameter tensors."""
    if get_world_size() == 1:
        return model
    if sync_bn:
        if device.type != "cuda":
            raise UserError("--sync_bn needs CUDA: PyTorch's SyncBatchNorm does not run on CPU. "
                            "Without it each process normalises over its own --batch_size images")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
