"""Labelled clips for fine-tuning and evaluation: the reference's augmentation and test views.

Training (per video, `FinetuneClipDataset`): the reference's sparse sampling (one random frame
per segment, `sparse_random_indices`) -> decoded once -> ``repeated_aug`` independent
augmentations, each: RandomResizedCrop (area ``min_scale``..1, aspect 3/4..4/3) resized to
``img_size`` (bilinear, without antialiasing, as the reference) -> horizontal flip -> RandAugment
(torchvision.transforms.v2, one draw of operations and magnitudes for all frames of the clip).
All randomness of a sample comes from (seed, position, attempt, repeat), so the stream does not
depend on the worker count and resumes exactly. Normalisation, random erasing and
mixup / cutmix run on the batch on the training device (`umt_fast.finetune`).

One difference from the reference, for speed: RandAugment runs on the crop (img_size x
img_size) instead of the full decoded frame before the crop.

Evaluation (`multi_view_clip`): ``num_clips`` temporal clips x ``num_crops`` spatial crops per
video, as the reference's test: temporal clip k takes, in each of the num_frames segments of the
span [0, last frame], the frame at (k + 1) / (num_clips + 1) of the segment; the short side is
resized to img_size (bilinear without antialiasing, the long side truncated, as the reference's
cv2 resize) and the crops sit at the start, centre and end of the long side.
"""
from __future__ import annotations

import logging
import random
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .annotations import VideoRecord
from .dataset import PositionSampler, init_worker
from .decoding import VideoDecodeError, count_frames, decode_frames
from .order import EpochPermutations, sample_rng
from .transforms import random_resized_crop_box, sparse_random_indices

__all__ = [
    "FinetuneClipDataset",
    "build_finetune_loader",
    "collate_labelled",
    "multi_view_clip",
    "multi_view_frame_indices",
    "random_resized_crop_box",
    "read_class_names",
]

logger = logging.getLogger(__name__)

RAND_AUGMENT_LEVELS = 11
"""Magnitude bins of torchvision's RandAugment: 11 bins make magnitude m mean m/10 of each
operation's range, timm's (and the reference's) 0..10 scale."""




class FinetuneClipDataset(Dataset):
    """Augmented labelled clips, indexed by global sample position (epoch-wise permutations).

    Args:
        records: videos with integer labels.
        num_frames, img_size: clip shape.
        seed: base seed of the permutations and the augmentation.
        repeated_aug: augmented clips per decoded video.
        min_scale, flip, rand_augment_ops, rand_augment_magnitude: see `AugmentConfig`.
        max_substitutes: substitute records tried for an undecodable one.
        mix: which record each position reads when the records are several sources mixed by
            weight (`umt_fast.data.mix.SourceMix`); None: epoch permutations of all records.
    """

    STREAM = "labelled_clips"

    def __init__(
        self, records: list[VideoRecord], num_frames: int, img_size: int, seed: int, repeated_aug: int = 1,
        min_scale: float = 0.08, flip: bool = True, rand_augment_ops: int = 0, rand_augment_magnitude: int = 7,
        max_substitutes: int = 16, mix=None,
    ):
        if not records:
            raise ValueError("records is empty")
        unlabelled = [r.path for r in records if r.label is None]
        if unlabelled:
            raise ValueError(f"fine-tuning needs a label on every line; {len(unlabelled)} have none, e.g. {unlabelled[0]}")
        self.records = list(records)
        self.num_frames, self.img_size, self.seed = num_frames, img_size, seed
        self.repeated_aug, self.min_scale, self.flip = repeated_aug, min_scale, flip
        self.rand_augment = (
            v2.RandAugment(num_ops=rand_augment_ops, magnitude=rand_augment_magnitude,
                           num_magnitude_bins=RAND_AUGMENT_LEVELS, interpolation=InterpolationMode.BILINEAR)
            if rand_augment_ops > 0 else None
        )  # fmt: skip
        self.max_substitutes, self.mix = max_substitutes, mix
        self._permutations = EpochPermutations(len(self.records), seed, self.STREAM)
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def record_index(self, position: int, attempt: int = 0) -> int:
        """The record read at ``position`` by ``attempt`` (k > 0: its k-th substitute, from the
        same source of a mix)."""
        if self.mix is not None:
            return self.mix.record_index(position, attempt)
        epoch, offset = divmod(position, len(self.records))
        return (int(self._permutations[epoch][offset]) + attempt) % len(self.records)

    def augment(self, frames_THWC: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """One augmented clip of decoded frames: uint8 [T, H, W, 3] -> uint8 [T, S, S, 3]."""
        _, height, width, _ = frames_THWC.shape
        x0, y0, w, h = random_resized_crop_box(width, height, rng, scale=(self.min_scale, 1.0))
        x_TCHW = TF.resized_crop(
            frames_THWC.permute(0, 3, 1, 2), top=y0, left=x0, height=h, width=w, size=[self.img_size] * 2,
            interpolation=InterpolationMode.BILINEAR, antialias=False,  # as the reference's interpolate
        )  # fmt: skip
        if self.flip and rng.random() < 0.5:
            x_TCHW = x_TCHW.flip(-1)
        if self.rand_augment is not None:
            # torchvision draws from torch's global generator: fork it, seeded from this clip's rng.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(rng.getrandbits(63))
                x_TCHW = self.rand_augment(x_TCHW)  # [T, C, H, W]: one draw for all T frames
        return x_TCHW.permute(0, 2, 3, 1).contiguous()

    def __getitem__(self, position: int) -> dict[str, Any]:
        """{"video": uint8 [R, T, S, S, 3], "label": int, "position": int, "skipped": [paths]}."""
        skipped: list[str] = []
        for attempt in range(self.max_substitutes + 1):
            record = self.records[self.record_index(position, attempt)]
            rng = sample_rng(self.seed, self.STREAM, position, attempt)
            try:
                indices = sparse_random_indices(count_frames(record.path), self.num_frames, rng)
                frames = decode_frames(record.path, indices)
            except VideoDecodeError as e:
                if e.path not in self._warned:
                    self._warned.add(e.path)
                    logger.warning("skipping undecodable video %s: %s", e.path, e.reason)
                skipped.append(record.path)
                continue
            clips = torch.stack([self.augment(frames, rng) for _ in range(self.repeated_aug)])
            return {"video": clips, "label": record.label, "position": position, "skipped": skipped}
        raise RuntimeError(
            f"sample position {position}: {len(skipped)} videos in a row could not be decoded; most of the data looks "
            f"unreadable (e.g. {skipped[0]})"
        )


def collate_labelled(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """-> {"video": uint8 [B*R, T, S, S, 3] (the R clips of a video side by side),
    "label": int64 [B*R], "skipped": [paths]}."""
    videos = torch.cat([s["video"] for s in samples])
    repeats = samples[0]["video"].shape[0]
    labels = torch.tensor([s["label"] for s in samples for _ in range(repeats)], dtype=torch.long)
    return {"video": videos, "label": labels, "skipped": [p for s in samples for p in s["skipped"]]}


def build_finetune_loader(
    dataset: FinetuneClipDataset, batch_size: int, start_position: int, num_workers: int, pin_memory: bool,
    global_batch_size: int | None = None, rank: int = 0, world_size: int = 1,
) -> DataLoader:
    """Endless loader: batch j holds the videos at positions [start + j*B, start + (j+1)*B).

    With ``world_size`` ranks, ``batch_size`` is the per-rank batch b = global_batch_size /
    world_size and rank r's batch j holds positions [start + j*G + r*b, start + j*G + (r+1)*b):
    the videos of a global step do not depend on the number of ranks.
    """
    sampler = PositionSampler(start_position, global_batch_size, rank, world_size)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
        collate_fn=collate_labelled, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=num_workers > 0, worker_init_fn=init_worker if num_workers > 0 else None,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Evaluation views
# --------------------------------------------------------------------------------------------


def multi_view_frame_indices(num_video_frames: int, num_frames: int, num_clips: int) -> list[list[int]]:
    """[num_clips][num_frames] frame indices, as the reference's sparse test sampling
    (``_get_seq_frames`` with clip_idx k): segments of s = (num_video_frames - 1) / num_frames
    frames, and clip k takes frame round(s * i) + int(s / (num_clips + 1) * (k + 1)) of segment
    i, at most the last frame."""
    step = max(0.0, (num_video_frames - 1) / num_frames)
    offset_unit = step / (num_clips + 1)
    return [
        [min(round(step * i) + int(offset_unit * (k + 1)), num_video_frames - 1) for i in range(num_frames)]
        for k in range(num_clips)
    ]


def spatial_crop_offsets(long_side: int, crop: int, num_crops: int) -> list[int]:
    """Start offsets along the long side: 3 crops at start / centre / end, or 1 at the centre."""
    if num_crops == 1:
        return [(long_side - crop) // 2]
    step = max(long_side - crop, 0) / (num_crops - 1)
    return [int(step * i) for i in range(num_crops)]


def multi_view_clip(path: str, num_frames: int, img_size: int, num_clips: int, num_crops: int) -> torch.Tensor:
    """The evaluation views of one video: uint8 [num_clips * num_crops, T, S, S, 3], clip-major
    (view v = clip v // num_crops, crop v % num_crops). Decodes every needed frame once.

    Raises:
        VideoDecodeError: the video cannot be decoded.
    """
    clip_indices = multi_view_frame_indices(count_frames(path), num_frames, num_clips)
    wanted = sorted({i for clip in clip_indices for i in clip})
    try:
        frames = decode_frames(path, wanted)
    except VideoDecodeError as e:
        if not e.num_decodable_frames:
            raise
        clip_indices = multi_view_frame_indices(e.num_decodable_frames, num_frames, num_clips)
        wanted = sorted({i for clip in clip_indices for i in clip})
        frames = decode_frames(path, wanted)
    row = {index: r for r, index in enumerate(wanted)}
    _, height, width, _ = frames.shape
    # Short side -> img_size (the long side truncated, aspect kept), bilinear without antialiasing
    # as the reference's cv2.INTER_LINEAR; then crops along the long side.
    if height <= width:
        new_h, new_w = img_size, int(img_size * width / height)
    else:
        new_w, new_h = img_size, int(img_size * height / width)
    resized = TF.resize(frames.permute(0, 3, 1, 2), [new_h, new_w], interpolation=InterpolationMode.BILINEAR,
                        antialias=False)  # fmt: skip
    views = []
    for clip in clip_indices:
        clip_TCHW = resized[[row[i] for i in clip]]
        for offset in spatial_crop_offsets(max(new_h, new_w), img_size, num_crops):
            if new_h <= new_w:
                crop = clip_TCHW[:, :, :img_size, offset:offset + img_size]
            else:
                crop = clip_TCHW[:, :, offset:offset + img_size, :img_size]
            views.append(crop.permute(0, 2, 3, 1))
    return torch.stack(views).contiguous()


def read_class_names(path: str) -> list[str]:
    """One class name per line (line i = label i); blank lines are an error."""
    with open(path, encoding="utf-8-sig") as f:
        names = [line.strip() for line in f.read().splitlines()]
    while names and not names[-1]:
        names.pop()
    blank = [i + 1 for i, name in enumerate(names) if not name]
    if blank:
        raise ValueError(f"{path}: class-name file has blank line(s) {blank[:5]}; line i must name label i - 1")
    if not names:
        raise ValueError(f"{path}: class-name file is empty")
    return names
