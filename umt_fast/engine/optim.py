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
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    capturable: bool = False,
) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CUDA and CPU): one launch for all parameters, and no
    read-back of the step counter to the host. ``capturable`` makes it safe to capture in a
    CUDA graph; the graph step then installs its lr tensor (:func:`use_lr_tensor`).
    """
    return torch.optim.AdamW(
        param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=True, capturable=capturable
    )


def use_lr_tensor(optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    """Makes every param group's lr one shared 0-dim fp32 tensor on ``device`` (its current value
    kept) and returns it. A restored optimizer state can bring the lr back as a float or a
    tensor of its own; a captured graph needs the one tensor that set_lr updates."""
    first = optimizer.param_groups[0]["lr"]
    value = float(first) if not isinstance(first, torch.Tensor) else first.detach()
    lr = torch.empty((), dtype=torch.float32, device=device)
    lr.copy_(torch.as_tensor(value, dtype=torch.float32))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


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
        """Sets every group's lr for ``step``, times the group's ``lr_scale`` when it has one
        (layer-wise decay), in place and with no host sync when the lr is a tensor. Returns the
        unscaled lr."""
        lr = self(step)
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr * group.get("lr_scale", 1.0))
            else:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr
