"""Choosing the data path: DALI (GPU decoding) or PyAV (CPU decoding in worker processes).

Both yield the same batches, {"video": uint8 [B, T, S, S, 3], "positions", "record_indices",
"skipped", "skip_reasons"}, from the same `ClipPlan`s (umt_fast.data.dataset); the DALI batches
are already on the training device, the PyAV batches arrive in pinned host memory on a GPU
machine and are copied asynchronously by the step.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from .dali import DALI_CPU_CODECS, DaliClipLoader, dali_available
from .dataset import PretrainClipDataset, build_pretrain_loader

__all__ = ["DECODERS", "build_clip_loader", "resolve_decoder"]

log = logging.getLogger(__name__)

DECODERS = ("auto", "dali", "pyav")


def resolve_decoder(choice: str, device: torch.device) -> str:
    """The decoder that `--data.decoder choice` means on `device`: "dali" or "pyav".

    "auto" is DALI when it is importable and the device is a GPU, else PyAV.

    Raises:
        ValueError: an unknown choice, or "dali" without DALI installed.
    """
    if choice not in DECODERS:
        raise ValueError(f"data.decoder must be one of {', '.join(DECODERS)}, got {choice!r}")
    if choice == "pyav":
        return "pyav"
    if choice == "dali":
        if not dali_available():
            raise ValueError(
                "data.decoder=dali needs NVIDIA DALI, which is not importable: install it with "
                "`pip install 'umt_fast[gpu]'` (CUDA 12; `nvidia-dali-cuda130` for CUDA 13), or use "
                "--data.decoder pyav"
            )
        return "dali"
    return "dali" if device.type == "cuda" and dali_available() else "pyav"


def build_clip_loader(
    decoder: str,
    dataset: PretrainClipDataset,
    batch_size: int,
    start_position: int,
    num_workers: int,
    device: torch.device,
    *,
    global_batch_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterable[dict[str, Any]]:
    """An endless iterable of batches of this rank's positions, decoded by `decoder`.

    Args:
        decoder: "auto", "dali" or "pyav" (see `resolve_decoder`).
        num_workers: PyAV: loader worker processes; DALI: its CPU threads (at least 1).
        device: the training device (DALI: where the batches are made).
    """
    chosen = resolve_decoder(decoder, device)
    if chosen == "pyav":
        log.info("data: PyAV decoding in %d worker processes", num_workers)
        return build_pretrain_loader(
            dataset, batch_size, start_position, num_workers, pin_memory=device.type == "cuda",
            global_batch_size=global_batch_size, rank=rank, world_size=world_size,
        )  # fmt: skip
    if device.type == "cuda":
        log.info("data: DALI decoding on %s (NVDEC)", device)
    else:
        log.warning(
            "data: DALI on the CPU decodes only %s videos; others are skipped. Use --data.decoder pyav "
            "for CPU training on other codecs", "/".join(sorted(DALI_CPU_CODECS)).upper(),
        )  # fmt: skip
    return DaliClipLoader(
        dataset, batch_size, start_position, device=device, num_threads=max(1, num_workers),
        global_batch_size=global_batch_size, rank=rank, world_size=world_size,
    )  # fmt: skip
