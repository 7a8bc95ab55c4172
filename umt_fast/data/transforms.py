"""The reference's pre-training augmentation, with all randomness from a passed `random.Random`.

TSN frame sampling -> multi-scale crop on the fixed 13-offset grid (GroupMultiScaleCrop with
fix_crop and more_fix_crop) -> bilinear resize -> horizontal flip -> [0, 1] -> ImageNet
normalisation. The crop and resize run per clip in the loader workers (uint8, channels-last);
`normalize_video` runs on the batch on the GPU.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MULTISCALE_CROP_SCALES",
    "crop_resize_flip",
    "fixed_crop_offsets",
    "multiscale_crop_box",
    "normalize_video",
    "segment_middle_indices",
    "segment_random_indices",
    "sparse_random_indices",
    "tsn_frame_indices",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MULTISCALE_CROP_SCALES = (1, 0.875, 0.75, 0.66)

# The 13 crop positions, as multiples of (w_step, h_step): corners, centre, edge midpoints,
# quarter points.
_FIXED_CROP_GRID = (
    (0, 0), (4, 0), (0, 4), (4, 4), (2, 2),
    (0, 2), (4, 2), (2, 4), (2, 0),
    (1, 1), (3, 1), (1, 3), (3, 3),
)  # fmt: skip


def _check_counts(num_video_frames: int, count: int, name: str) -> None:
    if num_video_frames < 1:
        raise ValueError(f"num_video_frames must be >= 1, got {num_video_frames}")
    if count < 1:
        raise ValueError(f"{name} must be >= 1, got {count}")


def _segments(num_video_frames: int, num_segments: int) -> list[tuple[int, int]]:
    """The reference's vision-language segments: [b[i], b[i+1]) for b = linspace(0,
    num_video_frames, min(num_segments, num_video_frames) + 1) truncated to int."""
    bounds = np.linspace(0, num_video_frames, min(num_segments, num_video_frames) + 1).astype(int).tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def segment_middle_indices(num_video_frames: int, num_segments: int) -> list[int]:
    """The test-time frames of the reference's vision-language code (multi_modality's
    ``get_frame_indices(sample="middle")``): ``min(num_segments, num_video_frames)`` segments
    [b[i], b[i+1]) with b = linspace(0, num_video_frames, segments + 1) truncated to int, the
    frame (b[i] + b[i+1] - 1) // 2 of each, the last one repeated up to ``num_segments`` for a
    shorter video. (`tsn_frame_indices` takes (b[i] + b[i+1]) // 2, a frame later in an even
    segment.)"""
    _check_counts(num_video_frames, num_segments, "num_segments")
    indices = [(a + b - 1) // 2 for a, b in _segments(num_video_frames, num_segments)]
    return indices + indices[-1:] * (num_segments - len(indices))


def segment_random_indices(num_video_frames: int, num_segments: int, rng: random.Random) -> list[int]:
    """The training frames of the reference's vision-language code (multi_modality's
    ``get_frame_indices(sample="rand")``), drawn from ``rng``.

    The segments are `segment_middle_indices`'s. Each gives a uniformly random frame of [b[i],
    b[i+1] - 1), so never its own last frame (``rng.randrange``, the draw the reference's
    ``random.choice`` over that range makes). Where a segment is a single frame, that range is
    empty and the reference falls back to ``min(num_segments, num_video_frames)`` distinct frames
    uniformly at random, sorted; so does this. A shorter video repeats its last frame up to
    ``num_segments``. (`tsn_frame_indices` draws from [b[i], b[i+1]), last frame included.)"""
    _check_counts(num_video_frames, num_segments, "num_segments")
    segments = _segments(num_video_frames, num_segments)
    if all(b - a >= 2 for a, b in segments):
        indices = [rng.randrange(a, b - 1) for a, b in segments]
    else:
        indices = sorted(rng.sample(range(num_video_frames), len(segments)))
    return indices + indices[-1:] * (num_segments - len(segments))


def sparse_random_indices(num_video_frames: int, num_frames: int, rng: random.Random) -> list[int]:
    """The training frames of the reference's fine-tuning data (the sparse Kinetics dataset's
    ``_get_seq_frames`` with clip_idx -1), drawn from ``rng``.

    The span [0, num_video_frames - 1] is cut into ``num_frames`` segments of s =
    (num_video_frames - 1) / num_frames frames; segment i gives a uniformly random frame of
    [round(s * i), round(s * (i + 1))], both ends included (``rng.randint``, the reference's draw),
    so neighbouring segments share their boundary frame. `labelled.multi_view_frame_indices` is
    its test-time counterpart."""
    _check_counts(num_video_frames, num_frames, "num_frames")
    step = (num_video_frames - 1) / num_frames
    return [min(rng.randint(round(step * i), round(step * (i + 1))), num_video_frames - 1) for i in range(num_frames)]


def tsn_frame_indices(num_video_frames: int, num_segments: int, rng: random.Random | None) -> list[int]:
    """TSN sampling: one frame from each of `num_segments` equal segments of the video.

    Segment i covers [b[i], b[i+1]) with b = linspace(0, num_video_frames, num_segments + 1)
    truncated to int. With `rng` (training), a uniformly random frame of each segment; with
    None, the middle one, (b[i] + b[i+1]) // 2. An empty segment (a video shorter than
    num_segments) gives its start, at most num_video_frames - 1.

    Returns:
        num_segments sorted frame indices in [0, num_video_frames).
    """
    _check_counts(num_video_frames, num_segments, "num_segments")
    bounds = np.linspace(0, num_video_frames, num_segments + 1).astype(int).tolist()
    indices = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b <= a:
            index = a
        elif rng is None:
            index = (a + b) // 2
        else:
            index = rng.randrange(a, b)
        indices.append(min(index, num_video_frames - 1))
    return sorted(indices)


def fixed_crop_offsets(img_w: int, img_h: int, crop_w: int, crop_h: int) -> list[tuple[int, int]]:
    """The 13 (x0, y0) positions of a crop_w x crop_h crop in an img_w x img_h frame.

    In the reference's order: 4 corners, centre, 4 edge midpoints, 4 quarter points, on a
    grid of steps w_step = (img_w - crop_w) // 4, h_step = (img_h - crop_h) // 4.
    """
    w_step, h_step = (img_w - crop_w) // 4, (img_h - crop_h) // 4
    return [(i * w_step, j * h_step) for i, j in _FIXED_CROP_GRID]


def multiscale_crop_box(
    img_w: int,
    img_h: int,
    out_size: int,
    rng: random.Random,
    scales: tuple[float, ...] = MULTISCALE_CROP_SCALES,
    max_distort: int = 1,
) -> tuple[int, int, int, int]:
    """A random crop box, as the reference's GroupMultiScaleCrop (fix_crop, more_fix_crop).

    Side lengths are int(min(img_w, img_h) * scale), snapped to out_size when within 2 px;
    width and height take scales at most `max_distort` apart; the position is one of
    `fixed_crop_offsets`. Draws rng.choice twice (size pair, then offset), as the reference.

    Returns:
        (x0, y0, crop_w, crop_h) in pixels.
    """
    base = min(img_w, img_h)
    sizes = [int(base * s) for s in scales]
    crop_sizes = [out_size if abs(x - out_size) < 3 else x for x in sizes]
    pairs = [
        (w, h)
        for i, h in enumerate(crop_sizes)
        for j, w in enumerate(crop_sizes)
        if abs(i - j) <= max_distort
    ]
    crop_w, crop_h = rng.choice(pairs)
    x0, y0 = rng.choice(fixed_crop_offsets(img_w, img_h, crop_w, crop_h))
    return x0, y0, crop_w, crop_h


def crop_resize_flip(
    frames_THWC: torch.Tensor, box: tuple[int, int, int, int], out_size: int, flip: bool, bicubic: bool = False
) -> torch.Tensor:
    """Crop every frame to `box`, resize to out_size x out_size, optionally mirror.

    Args:
        frames_THWC: uint8 [T, H, W, 3].
        box: (x0, y0, crop_w, crop_h), e.g. from `multiscale_crop_box`; parts outside the
            frame read as zeros.
        out_size: output side length.
        flip: mirror horizontally after resizing.
        bicubic: resize bicubically without antialiasing, rounded back to uint8: what the
            reference's vision-language transforms do (torchvision 0.13's Resize and
            RandomResizedCrop on uint8 tensors). False: bilinear with antialiasing, like PIL's
            resize in stage 1's reference pipeline.

    Returns:
        uint8 [T, out_size, out_size, 3], contiguous.
    """
    if frames_THWC.dtype != torch.uint8 or frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
        raise ValueError(f"expected uint8 [T, H, W, 3], got {frames_THWC.dtype} {list(frames_THWC.shape)}")
    x0, y0, crop_w, crop_h = box
    # A channels-last [T, 3, H, W] view: torchvision's fast uint8 antialiased bilinear path.
    x_TCHW = frames_THWC.permute(0, 3, 1, 2)
    if bicubic:
        # In float and rounded to nearest, as torchvision 0.13 did: today's uint8 bicubic kernel
        # rounds differently (1 level off in about 1% of the values).
        # One frame at a time, so the float copy is one frame's (25 MB at 1080p), not the clip's.
        x_TCHW = torch.cat([
            torch.nn.functional.interpolate(frame.float(), size=(out_size, out_size), mode="bicubic",
                                            align_corners=False).clamp_(0, 255).round_().to(torch.uint8)
            for frame in F.crop(x_TCHW, top=y0, left=x0, height=crop_h, width=crop_w).split(1)
        ])  # fmt: skip
    else:
        x_TCHW = F.resized_crop(
            x_TCHW, top=y0, left=x0, height=crop_h, width=crop_w, size=[out_size, out_size],
            interpolation=InterpolationMode.BILINEAR, antialias=True,
        )  # fmt: skip
    if flip:
        x_TCHW = x_TCHW.flip(-1)
    return x_TCHW.permute(0, 2, 3, 1).contiguous()


def normalize_video(video_BTHWC: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 clips -> normalised model input: /255, minus ImageNet mean, over ImageNet std.

    Runs on `video_BTHWC`'s device with Python-scalar constants, so no host<->device
    transfer or sync (CUDA-graph and torch.compile friendly). Computes in float32 and
    casts to `dtype` once.

    Args:
        video_BTHWC: uint8 [B, T, H, W, 3].

    Returns:
        `dtype` [B, 3, T, H, W], contiguous.
    """
    if video_BTHWC.dtype != torch.uint8 or video_BTHWC.ndim != 5 or video_BTHWC.shape[-1] != 3:
        raise ValueError(f"expected uint8 [B, T, H, W, 3], got {video_BTHWC.dtype} {list(video_BTHWC.shape)}")
    B, T, H, W, _ = video_BTHWC.shape
    out_BCTHW = torch.empty((B, 3, T, H, W), dtype=dtype, device=video_BTHWC.device)
    for c, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD)):
        out_BCTHW[:, c] = video_BTHWC[..., c].float().div_(255.0).sub_(mean).div_(std)
    return out_BCTHW


def random_resized_crop_box(
    width: int, height: int, rng: random.Random, scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (10 tries, then a centre crop), drawn from ``rng``.

    Returns:
        (x0, y0, crop_w, crop_h) in pixels.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h
