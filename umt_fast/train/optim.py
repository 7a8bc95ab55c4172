"""AdamW with the reference's weight-decay groups, and its per-step warm-up + cosine schedule."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decay for weight matrices, none for 1-D parameters and biases (as the reference)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CUDA and CPU): one launch for all parameters, and no
    read-back of the step counter to the host."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=True)


class WarmupCosineSchedule:
    """The reference's ``cosine_scheduler``, evaluated per optimizer step.

    Linear from ``warmup_lr`` to ``peak_lr`` over ``warmup_steps`` (both ends included, as
    np.linspace does), then ``min_lr + (peak - min) * (1 + cos(pi * i / n)) / 2`` for the
    remaining n = total - warmup steps, i = 0..n-1. Steps past the end stay at the last value.
    """

    def __init__(self, peak_lr: float, min_lr: float, total_steps: int, warmup_steps: int, warmup_lr: float = 0.0):
        if not 0 <= warmup_steps <= total_steps or total_steps < 1:
            raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}), total >= 1")
        self.peak_lr, self.min_lr, self.warmup_lr = peak_lr, min_lr, warmup_lr
        self.total_steps, self.warmup_steps = total_steps, warmup_steps

    def __call__(self, step: int) -> float:
        step = min(step, self.total_steps - 1)
        if step < self.warmup_steps:
            if self.warmup_steps == 1:
                return self.warmup_lr
            return self.warmup_lr + (self.peak_lr - self.warmup_lr) * step / (self.warmup_steps - 1)
        n = self.total_steps - self.warmup_steps
        i = step - self.warmup_steps
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1 + math.cos(math.pi * i / n))

    def set_lr(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
