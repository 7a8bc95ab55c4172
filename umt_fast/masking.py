"""Which tokens the student sees: attention (semantic), tube and random policies.

`mask_and_targets` is the one entry point of the training steps: the teacher's output and a
policy give the visible tokens and the teacher's targets on them. Every policy returns sorted
visible token indices [B, N_vis] (int64, on the device), with token index t * P + p. No
boolean masks, no host syncs: shapes depend only on (T, P, ratio), so they are static for a
given config.
"""
from __future__ import annotations

import torch

import umt_kernels

POLICIES = ("attention", "tube", "random")


def num_visible(num_tokens: int, ratio: float) -> int:
    """The reference's count: N - int(N * ratio)."""
    return num_tokens - int(num_tokens * ratio)


def visible_tokens_per_clip(policy: str, num_frames: int, patches_per_frame: int, ratio: float) -> int:
    if policy == "random":
        return num_visible(num_frames * patches_per_frame, ratio)
    return num_frames * num_visible(patches_per_frame, ratio)


def frame_to_clip_indices(idx_BTK: torch.Tensor, patches_per_frame: int) -> torch.Tensor:
    """[B, T, K] per-frame patch indices -> [B, T*K] clip token indices (still sorted)."""
    B, T, K = idx_BTK.shape
    frame_offset = torch.arange(T, device=idx_BTK.device).view(1, T, 1) * patches_per_frame
    return (idx_BTK + frame_offset).reshape(B, T * K)


def sample_visible_tokens(
    policy: str,
    *,
    batch_size: int,
    num_frames: int,
    patches_per_frame: int,
    ratio: float,
    seed: int,
    offset: int | torch.Tensor,
    device: torch.device,
    cls_attn_BTP: torch.Tensor | None = None,
    first_clip: int = 0,
) -> torch.Tensor:
    """Samples the visible set of every clip.

    Args:
        policy: ``attention``: per frame, draw N_vis = P - int(P * ratio) patches without
            replacement with probability proportional to the teacher's CLS attention
            (``cls_attn_BTP`` [B, T, P] required). ``tube``: one uniform per-frame draw of
            the same size, repeated over all frames. ``random``: uniform over all T * P
            tokens, T*P - int(T*P*ratio) kept.
        seed, offset: randomness; the training loop passes (train seed, step). ``offset`` may
            be a 0-dim int64 tensor on ``device`` (a device-side step counter).
        first_clip: the global index (within the step's global batch) of clip 0 of this batch.
            A clip's mask depends on (seed, offset, its global index) only, so the masks do
            not change with the number of ranks or micro-batches.

    Returns:
        visible_idx_BN: [B, N_vis] int64, ascending.
    """
    B, T, P = batch_size, num_frames, patches_per_frame
    if policy == "attention":
        if cls_attn_BTP is None:
            raise ValueError("the attention mask policy needs the teacher's cls_attn [B, T, P]")
        idx = umt_kernels.sample_without_replacement(
            cls_attn_BTP.reshape(B * T, P), num_visible(P, ratio), seed=seed, offset=offset, row_offset=first_clip * T
        )
        return frame_to_clip_indices(idx.view(B, T, -1), P)
    if policy == "tube":
        weights = torch.empty(B, P, device=device)
        idx = umt_kernels.sample_without_replacement(
            weights, num_visible(P, ratio), seed=seed, offset=offset, row_offset=first_clip, mode="uniform"
        )
        return frame_to_clip_indices(idx.unsqueeze(1).expand(B, T, -1), P)
    if policy == "random":
        weights = torch.empty(B, T * P, device=device)
        return umt_kernels.sample_without_replacement(
            weights, num_visible(T * P, ratio), seed=seed, offset=offset, row_offset=first_clip, mode="uniform"
        )
    raise ValueError(f"mask policy must be one of {POLICIES}, got {policy!r}")


def mask_and_targets(
    teacher_out, policy: str, *, ratio: float, seed: int, offset: int | torch.Tensor, first_clip: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The visible tokens of every clip and the teacher's targets on exactly those tokens.

    Args:
        teacher_out: the teacher's output (``cls_attn`` [B, T, P] fp32, ``streams``
            [B, T*P, L, W], and ``targets(idx)`` / ``project_rows(rows)``; see
            `umt_fast.models.teacher.TeacherOutput`).
        policy, ratio, seed, offset, first_clip: as in `sample_visible_tokens`.

    For ``attention``, sampling and the gather of the streams' rows are one fused launch
    (`umt_kernels.select_and_gather`); the indices equal ``sample_visible_tokens("attention",
    ...)``'s for the same arguments. The other policies sample, then gather.

    Returns:
        (visible_idx_BN [B, N_vis] int64 ascending, targets_LBNC [L, B, N_vis, Ct] L2-normalised).
    """
    if teacher_out.cls_attn is None:  # a teacher with neither a CLS token nor an attention-pool probe
        if policy == "attention":
            raise ValueError("--mask.policy attention needs the teacher's CLS (or attention-pool) attention, and this "
                             "teacher has neither; use --mask.policy tube or random")  # fmt: skip
        B, TP = teacher_out.streams.shape[:2]
        T = teacher_out.num_frames
        P = TP // T
    else:
        B, T, P = teacher_out.cls_attn.shape
    if policy == "attention":
        L, W = teacher_out.streams.shape[2:]
        idx_GK, rows_GKX = umt_kernels.select_and_gather(
            teacher_out.cls_attn.reshape(B * T, P), teacher_out.streams.view(B * T, P, L * W), num_visible(P, ratio),
            seed=seed, offset=offset, row_offset=first_clip * T,
        )  # fmt: skip
        visible_idx_BN = frame_to_clip_indices(idx_GK.view(B, T, -1), P)
        return visible_idx_BN, teacher_out.project_rows(rows_GKX.view(B, -1, L, W))
    visible_idx_BN = sample_visible_tokens(
        policy, batch_size=B, num_frames=T, patches_per_frame=P, ratio=ratio, seed=seed, offset=offset,
        device=teacher_out.streams.device, first_clip=first_clip,
    )  # fmt: skip
    return visible_idx_BN, teacher_out.targets(visible_idx_BN)
