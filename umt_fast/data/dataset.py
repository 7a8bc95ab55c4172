"""The pre-training clip stream: a deterministic function of (seed, sample position).

Sample position p = 0, 1, 2, ... runs across epochs: it belongs to epoch p // n and reads record
perm_e[p % n] of that epoch's permutation. All of its augmentation randomness is seeded by
(seed, p, attempt), so a clip does not depend on the worker count or on the order in which
workers run, and resuming at position s * B replays exactly what an uninterrupted run reads.
Undecodable videos are skipped and replaced by a deterministic substitute; `BadSampleBudget`
stops a run whose data is mostly unreadable.
"""
from __future__ import annotations

import itertools
import logging
import random
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .annotations import VideoRecord
from .decoding import VideoDecodeError, count_frames, decode_frames
from .transforms import crop_resize_flip, multiscale_crop_box, tsn_frame_indices

__all__ = [
    "BadSampleBudget",
    "PositionSampler",
    "PretrainClipDataset",
    "build_pretrain_loader",
    "collate_clips",
]

logger = logging.getLogger(__name__)

_NUM_EXAMPLES = 5


class PretrainClipDataset(Dataset):
    """Augmented pre-training clips, indexed by global sample position (not by record).

    Args:
        records: the videos (labels are ignored).
        num_frames: frames per clip (TSN segments).
        img_size: output side length of the square crop.
        seed: base seed of the epoch permutations and the augmentation.
        flip: random horizontal flip (probability 0.5).
        max_substitutes: how many substitute records to try for an undecodable one.
    """

    _NUM_CACHED_PERMUTATIONS = 3

    def __init__(
        self,
        records: list[VideoRecord],
        num_frames: int,
        img_size: int,
        seed: int,
        flip: bool = True,
        max_substitutes: int = 16,
    ):
        if not records:
            raise ValueError("records is empty")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if img_size < 1:
            raise ValueError(f"img_size must be >= 1, got {img_size}")
        if max_substitutes < 0:
            raise ValueError(f"max_substitutes must be >= 0, got {max_substitutes}")
        self.records = list(records)
        self.num_frames = num_frames
        self.img_size = img_size
        self.seed = seed
        self.flip = flip
        self.max_substitutes = max_substitutes
        self._permutations: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._warned_paths: set[str] = set()

    def __len__(self) -> int:
        """Records per epoch; positions themselves are unbounded."""
        return len(self.records)

    def _permutation(self, epoch: int) -> torch.Tensor:
        perm = self._permutations.get(epoch)
        if perm is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.records), generator=generator)
            self._permutations[epoch] = perm
            if len(self._permutations) > self._NUM_CACHED_PERMUTATIONS:
                self._permutations.popitem(last=False)
        return perm

    def record_index(self, position: int) -> int:
        """Index into `records` of the video read at sample `position` (before substitution)."""
        if position < 0:
            raise ValueError(f"sample position must be >= 0, got {position}")
        epoch, offset = divmod(position, len(self.records))
        return int(self._permutation(epoch)[offset])

    def load_clip(self, path: str, rng: random.Random) -> torch.Tensor:
        """Decode and augment one clip of `path`: uint8 [num_frames, img_size, img_size, 3].

        Draws from `rng` in the reference's order: TSN frames, crop size and offset, flip.
        """
        num_video_frames = count_frames(path)
        indices = tsn_frame_indices(num_video_frames, self.num_frames, rng)
        try:
            frames_THWC = decode_frames(path, indices)
        except VideoDecodeError as e:
            # The metadata overstated the frame count: sample again from the true one.
            true_count = e.num_decodable_frames
            if not true_count or true_count >= num_video_frames:
                raise
            indices = tsn_frame_indices(true_count, self.num_frames, rng)
            frames_THWC = decode_frames(path, indices)
        _, height, width, _ = frames_THWC.shape
        box = multiscale_crop_box(width, height, self.img_size, rng)
        flip = self.flip and rng.random() < 0.5
        return crop_resize_flip(frames_THWC, box, self.img_size, flip)

    def __getitem__(self, position: int) -> dict[str, Any]:
        """The clip at sample `position`.

        Returns:
            {"video": uint8 [num_frames, img_size, img_size, 3], "position": position,
             "skipped": paths of undecodable videos passed over for this sample}

        Raises:
            RuntimeError: the record and all `max_substitutes` substitutes are undecodable.
        """
        n = len(self.records)
        index = self.record_index(position)
        skipped: list[str] = []
        failures: list[VideoDecodeError] = []
        for attempt in range(self.max_substitutes + 1):
            path = self.records[(index + attempt) % n].path
            rng = random.Random(f"{self.seed}:{position}:{attempt}")
            try:
                video = self.load_clip(path, rng)
            except VideoDecodeError as e:
                self._warn_once(e)
                skipped.append(path)
                failures.append(e)
                continue
            return {"video": video, "position": position, "skipped": skipped}
        reasons: dict[str, str] = {}
        for e in failures:
            reasons.setdefault(e.path, e.reason)
        examples = "\n".join(f"  {p}: {r}" for p, r in itertools.islice(reasons.items(), _NUM_EXAMPLES))
        raise RuntimeError(
            f"sample position {position}: {len(failures)} videos in a row could not be decoded "
            f"(the record and {self.max_substitutes} substitutes); most of the data looks "
            f"unreadable. Examples:\n{examples}"
        )

    def _warn_once(self, error: VideoDecodeError) -> None:
        if error.path not in self._warned_paths:
            self._warned_paths.add(error.path)
            logger.warning("skipping undecodable video %s: %s", error.path, error.reason)


def collate_clips(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch `PretrainClipDataset` samples.

    Returns:
        {"video": uint8 [B, T, S, S, 3], "positions": int64 [B],
         "skipped": list[str], the skipped paths of all samples}
    """
    return {
        "video": torch.stack([s["video"] for s in samples]),
        "positions": torch.tensor([s["position"] for s in samples], dtype=torch.long),
        "skipped": [path for s in samples for path in s["skipped"]],
    }


class BadSampleBudget:
    """Stops training when too many videos turn out undecodable.

    Counts every video read (good clips plus skipped videos) and every skipped one; raises once
    at least `min_samples` were seen and the skipped fraction exceeds `max_bad_fraction`.
    """

    def __init__(self, max_bad_fraction: float, min_samples: int = 32):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {min_samples}")
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.num_seen = 0
        self.num_skipped = 0
        self.examples: list[str] = []

    def update(self, num_good: int, skipped_paths: list[str]) -> None:
        """Record one batch: `num_good` clips delivered, `skipped_paths` passed over.

        Raises:
            RuntimeError: the skipped fraction is over budget.
        """
        self.num_seen += num_good + len(skipped_paths)
        self.num_skipped += len(skipped_paths)
        for path in skipped_paths:
            if len(self.examples) >= _NUM_EXAMPLES:
                break
            if path not in self.examples:
                self.examples.append(path)
        if self.num_seen < self.min_samples:
            return
        fraction = self.num_skipped / self.num_seen
        if fraction > self.max_bad_fraction:
            examples = "\n".join(f"  {path}" for path in self.examples)
            raise RuntimeError(
                f"{self.num_skipped} of {self.num_seen} videos read so far ({fraction:.1%}) could not be "
                f"decoded, over the budget of {self.max_bad_fraction:.1%}. Check --data.train_list "
                f"and --data.root. Examples:\n{examples}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"num_seen": self.num_seen, "num_skipped": self.num_skipped, "examples": list(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_seen = int(state["num_seen"])
        self.num_skipped = int(state["num_skipped"])
        self.examples = list(state["examples"])


class PositionSampler(Sampler[int]):
    """Yields one rank's sample positions, forever.

    With ``world_size`` ranks sharing global batches of ``global_batch_size`` clips, rank r
    reads positions [s*G + r*b, s*G + r*b + b) of global step s (b = G / world_size), so the
    clips of a global step do not depend on the number of ranks. A single rank reads
    start, start + 1, ... .
    """

    def __init__(self, start: int, global_batch_size: int | None = None, rank: int = 0, world_size: int = 1):
        if start < 0:
            raise ValueError(f"start position must be >= 0, got {start}")
        if world_size > 1:
            if global_batch_size is None or global_batch_size % world_size:
                raise ValueError(f"global batch {global_batch_size} is not divisible by {world_size} ranks")
            if start % global_batch_size:
                raise ValueError(f"start position {start} is not a multiple of the global batch {global_batch_size}")
        self.start, self.global_batch_size, self.rank, self.world_size = start, global_batch_size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        if self.world_size == 1:
            return itertools.count(self.start)
        G, per_rank = self.global_batch_size, self.global_batch_size // self.world_size
        return (
            s * G + self.rank * per_rank + j
            for s in itertools.count(self.start // G)
            for j in range(per_rank)
        )


def _init_worker(worker_id: int) -> None:
    # Parallelism comes from the workers; intra-op threads would oversubscribe the cores.
    torch.set_num_threads(1)


def build_pretrain_loader(
    dataset: PretrainClipDataset,
    batch_size: int,
    start_position: int,
    num_workers: int,
    pin_memory: bool,
    *,
    global_batch_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """An endless loader of batches of ``batch_size`` consecutive positions of this rank.

    A single rank's batch j holds positions [start + j*B, start + (j+1)*B). Resuming with
    start_position = step * global batch yields exactly the batches that an uninterrupted run
    yields from ``step`` on. With several ranks see :class:`PositionSampler`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=PositionSampler(start_position, global_batch_size, rank, world_size),
        drop_last=True,
        collate_fn=collate_clips,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_init_worker if num_workers > 0 else None,
    )
