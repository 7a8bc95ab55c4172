"""One stage-1 optimizer step, as data (DESIGN.md "One stage-1 step").

    uint8 clips [m, T, H, W, 3] -> normalise on the device -> x [m, 3, T, H, W]
    teacher(x)  -> CLS attention [m, T, P] + last-L residual streams
    mask policy -> visible token indices [m, N] (sorted, on the device); for the attention
                   policy, sampling and the gather of the teacher's rows are one fused launch
    teacher targets on those rows only [L, m, N, Ct];  student(x, idx) [L, m, N, Ct]
    loss = mean(2 - 2 cos) -> backward      (once per micro-batch of m clips)
    -> AdamW step                           (once per optimizer step)

The step never reads a value back to the host: the loss is returned as a device tensor and
read only when logging. Every shape depends on the config alone. The masks and the drop-path
draws are functions of (seed, step) and of each clip's index in the global batch, so a step is
reproducible on resume and does not depend on how the batch is split over ranks and
micro-batches.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from umt_fast.data.transforms import normalize_video
from umt_fast.engine.distributed import set_gradient_sync, unwrap
from umt_fast.losses import alignment_loss
from umt_fast.masking import mask_and_targets
from umt_fast.models.student import drop_path_scales, keep_probabilities
from umt_fast.models.teacher import CLIPVisionTeacher
from umt_kernels.rng import mix_seed


class PretrainStep:
    """Callable ``(micro_batches, step) -> loss``.

    Args:
        student: the student, possibly wrapped in DDP or sharded with FSDP2.
        teacher: the frozen teacher (replicated).
        optimizer: over the student's parameters.
        mask_policy, mask_ratio: see umt_fast.masking.
        seed: the run seed (masks, drop path).
        device: where the step runs.
        autocast_dtype: bf16 / fp16 autocast on the GPU, None for fp32.
        grad_scaler: a GradScaler for fp16, else None.
        rank: this process's rank (seeds torch's generators per rank, for anything else random).
        first_clip: global index, within every global batch, of this rank's first clip.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: CLIPVisionTeacher,
        optimizer: torch.optim.Optimizer,
        *,
        mask_policy: str,
        mask_ratio: float,
        seed: int,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        grad_scaler: torch.amp.GradScaler | None = None,
        rank: int = 0,
        first_clip: int = 0,
    ):
        self.student = student
        self.teacher = teacher
        self.optimizer = optimizer
        self.mask_policy = mask_policy
        self.mask_ratio = mask_ratio
        self.seed = seed
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.grad_scaler = grad_scaler
        self.rank = rank
        self.first_clip = first_clip
        self.keep_prob = keep_probabilities(unwrap(student).encoder.drop_probs, device)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def micro_batch_loss(self, video_BTHWC: torch.Tensor, step: int | torch.Tensor, first_clip: int) -> torch.Tensor:
        """Forward of one micro-batch: uint8 [m, T, H, W, 3] -> 0-dim fp32 loss (with graph).

        ``step`` keys the masks: a Python int, or a 0-dim int64 tensor on the device (read
        there, so that a captured CUDA graph draws new masks on every replay).
        """
        video = normalize_video(video_BTHWC.to(self.device, non_blocking=True))
        with torch.no_grad(), self._autocast():
            teacher_out = self.teacher(video)
            visible_idx_BN, targets_LBNC = mask_and_targets(
                teacher_out, self.mask_policy, ratio=self.mask_ratio, seed=self.seed, offset=step, first_clip=first_clip
            )
        del teacher_out  # frees the residual streams before the student's forward
        drop_scales = None
        if self.keep_prob is not None:
            drop_scales = drop_path_scales(self.keep_prob, video.shape[0], seed=self.seed, offset=step, first_clip=first_clip)
        with self._autocast():
            student_LBNC = self.student(video, visible_idx_BN, drop_scales)
        return alignment_loss(student_LBNC, targets_LBNC)

    def __call__(self, micro_batches: list[torch.Tensor] | torch.Tensor, step: int) -> torch.Tensor:
        """One optimizer step over this rank's clips (one uint8 tensor, or a list of micro-batches).

        Returns:
            0-dim fp32 on the device: this rank's mean loss over its micro-batches.
        """
        if isinstance(micro_batches, torch.Tensor):
            micro_batches = [micro_batches]
        self.seed_random_streams(step)
        return self.run(micro_batches, step)

    def seed_random_streams(self, step: int) -> None:
        """Seeds torch's generators from (seed, step, rank): reproducible on resume. (Masks and
        drop path do not use them: both are counter-based functions of the seed, the step and
        each clip's global index.)"""
        torch.manual_seed(mix_seed(self.seed, step) + self.rank)

    def run(self, micro_batches: list[torch.Tensor], step: int | torch.Tensor) -> torch.Tensor:
        """The step's device work, without seeding: zero the gradients, forward and backward
        every micro-batch, step the optimizer. Capturable in a CUDA graph when ``step`` is a
        device tensor and there is no GradScaler (see umt_fast.engine.cuda_graph)."""
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        first_clip, count = self.first_clip, len(micro_batches)
        for i, video in enumerate(micro_batches):
            with set_gradient_sync(self.student, i == count - 1):
                loss = self.micro_batch_loss(video, step, first_clip)
                scaled = loss / count
                (self.grad_scaler.scale(scaled) if self.grad_scaler else scaled).backward()
            total += loss.detach()
            first_clip += video.shape[0]
        if self.grad_scaler:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        return total / count
