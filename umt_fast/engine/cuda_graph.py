"""The stage-1 step replayed from one captured CUDA graph (``--train.cuda_graphs``).

Every shape of the step is fixed by the config and the step never reads back to the host, so
the whole optimizer step (teacher forward, mask sampling and target gather, student forward
and backward over every micro-batch, AdamW) is captured once and then replayed: one launch
instead of thousands, and no Python or dispatcher time on the critical path. What changes
from step to step lives in device memory and is updated in place before each replay:

    clips            copied into static input buffers [m, T, H, W, 3] uint8, one per micro-batch
    step number      ``step_counter.fill_(step)``; the umt_kernels samplers read it on the
                     device to key the masks (umt_kernels.sample_without_replacement), and
                     the drop-path factors (models.student.drop_path_scales) likewise
    learning rate    one 0-dim fp32 tensor in every param group (fused, capturable AdamW),
                     filled by WarmupCosineSchedule.set_lr
    gradients        allocated once during capture and rewritten in place by every replay

torch's generators are still re-seeded on the host per step, as in the eager step (a replay
reads the CUDA generator's seed and offset when it is launched), for anything else random.

The first ``warmup_steps`` steps run eagerly on a side stream (cuBLAS/cuDNN plans, Triton
autotuning, the optimizer's lazy state, DDP's buckets: DDP needs 11), then the step is
captured and replayed from there on. Eager and replayed steps compute the same function with
the same kernels, so a run's losses do not depend on when the capture happened, and a resumed
run (which warms up again) continues as the uninterrupted one.

Works in one process and under DDP (NCCL >= 2.9.6 captures all-reduces). Not with FSDP2 (its
per-block all-gathers and frees synchronise across streams outside the graph) and not with
fp16 loss scaling (GradScaler reads back whether gradients overflowed); the config refuses both.
"""
from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from umt_fast.engine.optim import use_lr_tensor

DDP_WARMUP_STEPS = 11  # DDP must see this many eager iterations before its backward is captured


class CUDAGraphStep:
    """Callable ``(micro_batches, step) -> loss`` like the eager step, replaying a captured graph.

    Args:
        step_fn: the eager step (`umt_fast.recipes.pretrain.PretrainStep`: ``run(inputs, step_counter)``,
            ``seed_random_streams(step)``, ``device``, ``optimizer``, ``grad_scaler``, ``student``). Its optimizer must be fused AdamW built with ``capturable=True``
            (build_optimizer(..., capturable=True)); it must have no GradScaler.
        warmup_steps: eager steps before the capture (at least DDP_WARMUP_STEPS under DDP).
        capture: False runs every step eagerly through the same static buffers and device
            counter (for checking the bookkeeping where no GPU is present).
    """

    def __init__(self, step_fn, warmup_steps: int = 3, capture: bool = True):
        if step_fn.grad_scaler is not None:
            raise ValueError("CUDA graphs cannot capture fp16 loss scaling (GradScaler reads back to the host); use bf16")
        if capture and step_fn.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the step runs on {step_fn.device}")
        if not all(group.get("capturable") for group in step_fn.optimizer.param_groups):
            raise ValueError("CUDA graphs need an optimizer built with capturable=True")
        if isinstance(step_fn.student, DistributedDataParallel):
            warmup_steps = max(warmup_steps, DDP_WARMUP_STEPS)
        self.step_fn = step_fn
        self.warmup_steps = warmup_steps
        self.capture = capture
        self.step_counter = torch.zeros((), dtype=torch.int64, device=step_fn.device)
        self.lr = use_lr_tensor(step_fn.optimizer, step_fn.device)
        self.static_inputs: list[torch.Tensor] | None = None
        self.static_loss: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, micro_batches: list[torch.Tensor] | torch.Tensor, step: int) -> torch.Tensor:
        """One optimizer step; returns this rank's mean loss, 0-dim fp32 on the device."""
        if isinstance(micro_batches, torch.Tensor):
            micro_batches = [micro_batches]
        self._load_inputs(micro_batches)
        self.step_fn.seed_random_streams(step)
        self.step_counter.fill_(step)
        if self.graph is None and (not self.capture or self.eager_steps < self.warmup_steps):
            self.eager_steps += 1
            return self._eager()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.static_loss.clone()

    def _load_inputs(self, micro_batches: list[torch.Tensor]) -> None:
        device = self.step_fn.device
        if self.static_inputs is None:
            self.static_inputs = [torch.empty(mb.shape, dtype=mb.dtype, device=device) for mb in micro_batches]
        shapes = [tuple(s.shape) for s in self.static_inputs]
        if [tuple(mb.shape) for mb in micro_batches] != shapes:
            raise ValueError(
                f"a CUDA-graph step needs the same micro-batch shapes every step: captured {shapes}, "
                f"got {[tuple(mb.shape) for mb in micro_batches]}"
            )
        for static, new in zip(self.static_inputs, micro_batches):
            static.copy_(new, non_blocking=True)

    def _eager(self) -> torch.Tensor:
        if not self.capture:
            return self.step_fn.run(self.static_inputs, self.step_counter)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self.step_fn.run(self.static_inputs, self.step_counter)
        torch.cuda.current_stream().wait_stream(side)
        return loss

    def _capture(self) -> None:
        # The warm-up's gradients and cached activations would otherwise sit beside the graph's
        # own memory pool for the rest of the run.
        self.step_fn.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's pin-memory thread may allocate pinned memory meanwhile,
        # which the default (global) mode would turn into a capture error.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_loss = self.step_fn.run(self.static_inputs, self.step_counter)
