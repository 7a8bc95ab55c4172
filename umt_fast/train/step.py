"""One stage-1 optimizer step, as data (DESIGN.md "One stage-1 step").

    uint8 clip [B, T, H, W, 3] -> normalise on the device  -> x [B, 3, T, H, W]
    teacher(x)  -> CLS attention [B, T, P] + last-L residual streams
    mask policy -> visible token indices [B, N] (sorted, on the device); for the attention
                   policy, sampling and the gather of the teacher's rows are one fused launch
    teacher targets on those rows only [L, B, N, Ct];  student(x, idx) [L, B, N, Ct]
    loss = mean(2 - 2 cos) -> backward -> AdamW

The step never reads a value back to the host: the loss is returned as a device tensor and
read only when logging. Every shape depends on the config alone.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from umt_fast.data.transforms import normalize_video
from umt_fast.losses import alignment_loss
from umt_fast.masking import num_visible, sample_visible_tokens
from umt_fast.models.teacher import CLIPVisionTeacher


class PretrainStep:
    """Callable ``(video_BTHWC_uint8, step) -> loss`` (0-dim float32 on the device)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: CLIPVisionTeacher,
        optimizer: torch.optim.Optimizer,
        *,
        mask_policy: str,
        mask_ratio: float,
        mask_seed: int,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
    ):
        self.student = student
        self.teacher = teacher
        self.optimizer = optimizer
        self.mask_policy = mask_policy
        self.mask_ratio = mask_ratio
        self.mask_seed = mask_seed
        self.device = device
        self.autocast_dtype = autocast_dtype
        arch = student.arch
        self.num_frames = arch.num_frames
        self.patches_per_frame = arch.patches_per_frame

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def __call__(self, video_BTHWC: torch.Tensor, step: int) -> torch.Tensor:
        video = normalize_video(video_BTHWC.to(self.device, non_blocking=True))
        with torch.no_grad(), self._autocast():
            teacher_out = self.teacher(video)
            if self.mask_policy == "attention":
                visible_idx_BN, targets_LBNC = teacher_out.sample_visible(
                    num_visible(self.patches_per_frame, self.mask_ratio), seed=self.mask_seed, offset=step
                )
            else:
                visible_idx_BN = sample_visible_tokens(
                    self.mask_policy,
                    batch_size=video.shape[0],
                    num_frames=self.num_frames,
                    patches_per_frame=self.patches_per_frame,
                    ratio=self.mask_ratio,
                    seed=self.mask_seed,
                    offset=step,
                    device=self.device,
                )
                targets_LBNC = teacher_out.targets(visible_idx_BN)
        del teacher_out  # frees the residual streams before the student's forward
        with self._autocast():
            student_LBNC = self.student(video, visible_idx_BN)
        loss = alignment_loss(student_LBNC, targets_LBNC)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()
