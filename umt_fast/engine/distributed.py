"""torchrun initialisation, DDP / FSDP2 wrapping and the few collectives the loop needs.

A single process (no torchrun) runs with world size 1 and no process group; every helper here
is then a no-op, so the same loop serves one CPU and many GPUs.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> DistInfo:
    """Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and starts the process group (NCCL on GPUs,
    gloo on CPUs). ``device_name`` is train.device: auto, cpu or cuda."""
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available; use --train.device auto or cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30),
            device_id=device if use_cuda else None,
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over ranks, in place (identity in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def wrap_model(
    model: nn.Module, blocks, strategy: str, info: DistInfo, param_dtype: torch.dtype | None
) -> nn.Module:
    """DDP or FSDP2 around any model; the module itself in a single process.

    FSDP2 shards each module of ``blocks`` (the transformer blocks) and then the root, in place,
    with a mixed-precision policy that computes in ``param_dtype`` (None: the parameters' own
    dtype) and reduces gradients in fp32. Every rank must hold the same initial weights (FSDP2
    does not broadcast them; DDP does).
    """
    if not info.distributed:
        return model
    if strategy == "ddp":
        device_ids = [info.local_rank] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    check_fsdp_supported(info.device)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


# Before torch 2.9, FSDP2 over gloo (CPU ranks) sums the gradients over ranks instead of averaging
# them: training still matches under Adam (the scale cancels) but the optimizer state is off by
# the world size, so gradient clipping and resuming at another world size go wrong. (2.6 cannot
# run FSDP2 on CPU at all.) NCCL is not affected.
FSDP_ON_CPU_MIN_TORCH = (2, 9)


def check_fsdp_supported(device: torch.device) -> None:
    """Refuses FSDP2 on CPU ranks with a torch whose gloo path is wrong (see above)."""
    from torch.torch_version import TorchVersion

    if device.type == "cpu" and TorchVersion(torch.__version__) < FSDP_ON_CPU_MIN_TORCH:
        need = ".".join(map(str, FSDP_ON_CPU_MIN_TORCH))
        raise ValueError(
            f"--dist.strategy fsdp on CPU ranks needs torch >= {need} (this is {torch.__version__}): before it, "
            "FSDP2 over gloo sums gradients over ranks instead of averaging them. Use --dist.strategy ddp on CPU."
        )


def wrap_student(student: nn.Module, strategy: str, info: DistInfo, param_dtype: torch.dtype | None) -> nn.Module:
    """:func:`wrap_model` for the UMT student, sharding its encoder blocks under FSDP2."""
    return wrap_model(student, student.encoder.blocks, strategy, info, param_dtype)


def set_gradient_sync(model: nn.Module, enabled: bool):
    """Context for one micro-batch: skip the gradient all-reduce except on the last one."""
    import contextlib

    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_gather_stacked(tensor: torch.Tensor) -> torch.Tensor:
    """[*S] (the same shape on every rank) -> [world_size, *S], rank r's tensor at row r
    (``tensor[None]`` in a single process)."""
    if not dist.is_initialized():
        return tensor[None]
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def all_gather_objects(obj) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def my_share(n: int, info: DistInfo) -> list[int]:
    """The indices of ``n`` items that rank ``info.rank`` handles: rank, rank + W, rank + 2W, ..."""
    return list(range(info.rank, n, info.world_size))


def gather_by_index(results: dict[int, object], info: DistInfo) -> dict[int, object]:
    """Every rank's ``{item index: result}`` (picklable, on the CPU) merged, in index order, on
    every rank; the ranks' indices must not overlap (each handled `my_share`). Collective when
    ``info`` is distributed; a rank working alone (``DistInfo()``) keeps its own."""
    merged = {}
    for part in all_gather_objects(results) if info.distributed else [results]:
        merged.update(part)
    return dict(sorted(merged.items()))


def exchange_with(peer: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sends ``tensors`` to rank ``peer`` and returns that rank's tensors of the same shapes
    (both ranks call it naming each other; a rank naming itself gets its own tensors back)."""
    if not dist.is_initialized() or peer == dist.get_rank():
        return tensors
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, peer) for r in received]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received
