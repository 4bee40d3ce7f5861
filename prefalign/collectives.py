"""Collectives over the default process group that need no accelerate object: usable from `models/` (the chunked
log-probs' agreement on a chunk count under ZeRO-3 or for an FSDP2 head unit) as from the trainers. With no
process group (one process) each is the local value."""

from __future__ import annotations

import torch


def process_max(value: int, device: torch.device | str) -> int:
    """The largest ``value`` of any process: a MAX all-reduce of one integer on ``device`` (the backend's device:
    gloo reduces CPU tensors, NCCL CUDA ones). A collective: every process must call it, in the same order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    count = torch.tensor([value], device=device, dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def broadcast_object(obj):
    """The main process's ``obj`` (picklable) on every process. A collective, as `process_max`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every process's ``obj`` (picklable), in process order, on every process. A collective, as `process_max`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
