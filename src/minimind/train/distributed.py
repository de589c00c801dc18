"""DDP under ``torchrun`` (NCCL on CUDA, gloo on CPU); a no-op for single-process runs."""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (``RANK`` / ``WORLD_SIZE`` set)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return DistInfo()
    if not dist.is_initialized():
        # Generous timeout: ranks > 0 wait at a barrier while rank 0 tokenizes a large corpus.
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device, bf16_grads: bool = False) -> nn.Module:
    """DDP with gradients as views into the all-reduce buckets (``gradient_as_bucket_view``: no
    copy between ``.grad`` and the bucket, one gradient-sized buffer less).

    ``bf16_grads`` (``--ddp_bf16_grads``): each bucket is averaged in bf16 (:func:`bf16_allreduce_hook`):
    half the traffic, with bf16's 8-bit mantissa on the averaged gradient (the optimizer and its
    fp32 master weights are unchanged)."""
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False,
                                              gradient_as_bucket_view=True)
    if bf16_grads:
        ddp.register_comm_hook(None, bf16_allreduce_hook)
    return ddp


def bf16_allreduce_hook(group, bucket):  # no annotations: DDP rejects string (postponed) ones
    """DDP communication hook ``(process group, dist.GradBucket) -> Future[Tensor]``:
    ``bucket <- sum_ranks(bf16(bucket) / world)``, cast back to the bucket's dtype.  torch's own
    ``bf16_compress_hook`` refuses anything but NCCL/XCCL; this one also runs on gloo (CPU)."""
    group = group if group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(dist.get_world_size(group))
    work = dist.all_reduce(compressed, group=group, async_op=True)

    def decompress(fut):
        buffer.copy_(fut.value()[0])
        return buffer

    return work.get_future().then(decompress)


def no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on accumulation micro-steps."""
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world_size
    return values


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over ranks (a copy; the input is left alone)."""
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def local_rank_zero_first(info: DistInfo) -> Iterator[None]:
    """Run the body on local rank 0 first, then on the other ranks of the node.

    For work that writes a shared cache (token shards, the tokenizer copy): rank 0 builds it while the
    others wait at a barrier, then they find it built and only read it.  Without this every rank
    tokenizes into the same folder at once.
    """
    first = info.local_rank == 0
    if info.enabled and not first:
        dist.barrier()
    try:
        yield
    finally:
        if info.enabled and first:
            dist.barrier()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo, *, finished: bool = False) -> None:
    """Tear the process group down.  Call it after dropping every DDP wrapper of this process.

    DDP's reducer holds the process group; if the wrapper outlives ``destroy_process_group`` the gloo
    group is destroyed later, during interpreter finalisation, where it sometimes aborts the process
    (SIGABRT, "terminate called without an active exception") after a run that saved everything.  So
    the wrappers are collected here first, and a run that ``finished`` on every rank meets at a barrier
    so that no rank closes its connections while a peer still uses them.  After an error there is no
    barrier (the other ranks may never arrive)."""
    if not (info.enabled and dist.is_initialized()):
        return
    gc.collect()  # wrappers caught in reference cycles
    if finished:
        dist.barrier()
    dist.destroy_process_group()
