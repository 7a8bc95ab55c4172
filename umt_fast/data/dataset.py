"""The pre-training clip stream: a deterministic function of (seed, sample position).

Sample position p = 0, 1, 2, ... runs across epochs: it belongs to epoch p // n and reads record
perm_e[p % n] of that epoch's permutation. All of its augmentation randomness is seeded by
(seed, p, attempt), so a clip does not depend on the worker count or on the order in which
workers run, and resuming at position s * B replays exactly what an uninterrupted run reads.

What a sample reads is decided before anything is decoded, by `PretrainClipDataset.sample_plan`:
the record, the TSN frame indices, the multi-scale crop box and the flip (a `ClipPlan`). Both
decoders follow the plan: the PyAV path here (`__getitem__`, in loader worker processes) and
the DALI path (umt_fast.data.dali), so the two read the same frames with the same crop.

Undecodable videos (missing, empty, truncated, not a video, an unsupported codec, fewer frames
than a clip needs) are skipped and replaced by a deterministic substitute: attempt k of position
p reads record (perm_e[p % n] + k) % n. `BadSampleBudget` warns once per skipped video and
stops a run whose data is mostly unreadable.
"""
from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing
import multiprocessing.util  # noqa: F401 (its exit handler registered first, so ours runs before it)
import signal
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .annotations import VideoRecord
from .decoding import VideoDecodeError, VideoInfo, decode_frames, probe_video
from .order import EpochPermutations, sample_rng
from .transforms import crop_resize_flip, multiscale_crop_box, tsn_frame_indices

__all__ = [
    "BadSampleBudget",
    "ClipPlan",
    "PositionSampler",
    "PretrainClipDataset",
    "SkippedVideo",
    "build_pretrain_loader",
    "collate_clips",
]

logger = logging.getLogger(__name__)

_NUM_EXAMPLES = 5


@dataclass(frozen=True)
class SkippedVideo:
    """A video passed over for a sample, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class ClipPlan:
    """Everything that sample `position` reads, decided before decoding.

    Attributes:
        position: the global sample position.
        attempt: 0 for the epoch's own record, k for its k-th substitute.
        record_index: index into the dataset's records of the video read.
        path: that video.
        frame_indices: `num_frames` sorted TSN frame indices (0-based, may repeat).
        crop_box: (x0, y0, crop_w, crop_h) in pixels of the full frame, from `multiscale_crop_box`.
        flip: mirror horizontally after the crop and resize.
        skipped: the videos tried and passed over before this one, in order.
        video: the probe of the video (frame count, size, codec, and its bytes when asked).
    """

    position: int
    attempt: int
    record_index: int
    path: str
    frame_indices: tuple[int, ...]
    crop_box: tuple[int, int, int, int]
    flip: bool
    skipped: tuple[SkippedVideo, ...] = ()
    video: VideoInfo | None = field(default=None, repr=False, compare=False)


class PretrainClipDataset(Dataset):
    """Augmented pre-training clips, indexed by global sample position (not by record).

    Args:
        records: the videos (labels and captions are ignored; image entries are refused).
        num_frames: frames per clip (TSN segments); a video with fewer frames is skipped.
        img_size: output side length of the square crop.
        seed: base seed of the epoch permutations and the augmentation.
        flip: random horizontal flip (probability 0.5).
        max_substitutes: how many substitute records to try for an undecodable one.
        mix: which record each position reads when the records are several sources mixed by
            weight (`umt_fast.data.mix.SourceMix`); None: epoch permutations of all records.
    """

    STREAM = "pretrain_clips"

    def __init__(
        self,
        records: list[VideoRecord],
        num_frames: int,
        img_size: int,
        seed: int,
        flip: bool = True,
        max_substitutes: int = 16,
        mix=None,
    ):
        if not records:
            raise ValueError("records is empty")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if img_size < 1:
            raise ValueError(f"img_size must be >= 1, got {img_size}")
        if max_substitutes < 0:
            raise ValueError(f"max_substitutes must be >= 0, got {max_substitutes}")
        images = [r.path for r in records if r.media != "video"]
        if images:
            raise ValueError(
                f"stage-1 pre-training reads videos only, but {len(images)} of {len(records)} entries of the "
                f"list are images (first: {images[0]!r}); give a list of videos"
            )
        self.records = list(records)
        self.num_frames = num_frames
        self.img_size = img_size
        self.seed = seed
        self.flip = flip
        self.max_substitutes = max_substitutes
        self._permutations = EpochPermutations(len(self.records), seed, self.STREAM)
        self.mix = mix

    def __len__(self) -> int:
        """Records per epoch; positions themselves are unbounded."""
        return len(self.records)

    def record_index(self, position: int, attempt: int = 0) -> int:
        """Index into `records` of the video read at sample `position` by `attempt`
        (0 = the epoch's own record, k = its k-th substitute)."""
        if position < 0:
            raise ValueError(f"sample position must be >= 0, got {position}")
        if self.mix is not None:
            return self.mix.record_index(position, attempt)
        epoch, offset = divmod(position, len(self.records))
        return (int(self._permutations[epoch][offset]) + attempt) % len(self.records)

    def plan_clip(self, position: int, attempt: int, video: VideoInfo) -> ClipPlan:
        """The plan of `attempt` at `position` for the probed `video`; no I/O.

        Draws from `sample_rng(seed, STREAM, position, attempt)` in the reference's order:
        TSN frames, crop size and offset, flip.

        Raises:
            VideoDecodeError: the video has fewer than `num_frames` frames.
        """
        if video.num_frames < self.num_frames:
            raise VideoDecodeError(video.path, f"has {video.num_frames} frames, needs {self.num_frames}")
        rng = sample_rng(self.seed, self.STREAM, position, attempt)
        indices = tsn_frame_indices(video.num_frames, self.num_frames, rng)
        box = multiscale_crop_box(video.width, video.height, self.img_size, rng)
        flip = self.flip and rng.random() < 0.5
        return ClipPlan(
            position, attempt, self.record_index(position, attempt), video.path, tuple(indices), box, flip,
            video=video,
        )  # fmt: skip

    def sample_plan(
        self,
        position: int,
        first_attempt: int = 0,
        skipped: Sequence[SkippedVideo] = (),
        *,
        keep_bytes: bool = False,
        codecs: Collection[str] | None = None,
    ) -> ClipPlan:
        """What sample `position` reads: the first record from `first_attempt` on whose probe
        succeeds, with its frame indices, crop box and flip.

        Args:
            position: the global sample position.
            first_attempt: where to start (after a decode failure of attempt k, k + 1).
            skipped: videos already passed over for this sample (kept in the plan, and
                listed in the error when every substitute fails).
            keep_bytes: keep each probed file's bytes in the plan (for DALI).
            codecs: when given, a video whose codec is not in it is skipped ("h264" ...).

        Returns:
            a ClipPlan whose `skipped` holds `skipped` plus the videos passed over here.

        Raises:
            RuntimeError: the record and all `max_substitutes` substitutes are unreadable.
        """
        passed_over = list(skipped)
        for attempt in range(first_attempt, self.max_substitutes + 1):
            path = self.records[self.record_index(position, attempt)].path
            try:
                video = probe_video(path, keep_bytes=keep_bytes)
                if codecs is not None and video.codec not in codecs:
                    raise VideoDecodeError(
                        path, f"unsupported codec {video.codec} (this decoder reads {', '.join(sorted(codecs))})"
                    )
                plan = self.plan_clip(position, attempt, video)
            except VideoDecodeError as e:
                logger.debug("sample %d passes over %s: %s", position, e.path, e.reason)
                passed_over.append(SkippedVideo(e.path, e.reason))
                continue
            return replace(plan, skipped=tuple(passed_over))
        raise self._exhausted(position, passed_over)

    def _exhausted(self, position: int, skipped: Sequence[SkippedVideo]) -> RuntimeError:
        reasons: dict[str, str] = {}
        for s in skipped:
            reasons.setdefault(s.path, s.reason)
        examples = "\n".join(f"  {p}: {r}" for p, r in itertools.islice(reasons.items(), _NUM_EXAMPLES))
        return UnreadableDataError(
            f"sample position {position}: {len(skipped)} videos in a row could not be decoded "
            f"(the record and {self.max_substitutes} substitutes); most of the data looks "
            f"unreadable. Examples:\n{examples}"
        )

    def load_clip(self, plan: ClipPlan) -> tuple[torch.Tensor, ClipPlan]:
        """Decode and augment what `plan` says, with PyAV.

        Returns:
            (uint8 [num_frames, img_size, img_size, 3], the plan followed). The plan differs
            from `plan` only when the video turns out to hold fewer decodable frames than its
            packets promised: then it is made again from the true count.

        Raises:
            VideoDecodeError: the video cannot be decoded (or not enough of it).
        """
        keyframes = plan.video.keyframes if plan.video is not None else None
        data = plan.video.data if plan.video is not None else None
        try:
            frames_THWC = decode_frames(plan.path, plan.frame_indices, keyframes, data)
        except VideoDecodeError as e:
            true_count = e.num_decodable_frames
            if plan.video is None or not true_count or true_count >= plan.video.num_frames:
                raise
            plan = replace(
                self.plan_clip(plan.position, plan.attempt, replace(plan.video, num_frames=true_count)),
                skipped=plan.skipped,
            )
            frames_THWC = decode_frames(plan.path, plan.frame_indices, keyframes, data)
        return crop_resize_flip(frames_THWC, plan.crop_box, self.img_size, plan.flip), plan

    def __getitem__(self, position: int) -> dict[str, Any]:
        """The clip at sample `position`, decoded with PyAV.

        Returns:
            {"video": uint8 [num_frames, img_size, img_size, 3], "position": position,
             "record_index": the record read, "skipped": paths of the videos passed over for
             this sample, "skip_reasons": why, one per skipped path}

        Raises:
            RuntimeError: the record and all `max_substitutes` substitutes are undecodable.
        """
        attempt, skipped = 0, ()
        while True:
            plan = self.sample_plan(position, attempt, skipped)
            try:
                video, plan = self.load_clip(plan)
            except VideoDecodeError as e:
                logger.debug("sample %d passes over %s: %s", position, e.path, e.reason)
                attempt, skipped = plan.attempt + 1, (*plan.skipped, SkippedVideo(e.path, e.reason))
                continue
            return clip_sample(video, plan)


def clip_sample(video_THWC: torch.Tensor, plan: ClipPlan) -> dict[str, Any]:
    """One sample as the loaders hand it over: the clip plus what was read and skipped."""
    return {
        "video": video_THWC,
        "position": plan.position,
        "record_index": plan.record_index,
        "skipped": [s.path for s in plan.skipped],
        "skip_reasons": [s.reason for s in plan.skipped],
    }


def collate_clips(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch `PretrainClipDataset` samples.

    Returns:
        {"video": uint8 [B, T, S, S, 3], "positions": int64 [B], "record_indices": int64 [B]
         (the records read, after substitution), "skipped": list[str], the skipped paths of all
         samples, "skip_reasons": list[str], one per skipped path}
    """
    return {
        "video": torch.stack([s["video"] for s in samples]),
        "positions": torch.tensor([s["position"] for s in samples], dtype=torch.long),
        "record_indices": torch.tensor([s.get("record_index", -1) for s in samples], dtype=torch.long),
        "skipped": [path for s in samples for path in s["skipped"]],
        "skip_reasons": [r for s in samples for r in s.get("skip_reasons", ["?"] * len(s["skipped"]))],
    }


class UnreadableDataError(RuntimeError):
    """Too much of the data cannot be read: every substitute of a sample failed, or the bad videos
    passed ``data.max_bad_fraction``. The message names examples and why."""


class BadSampleBudget:
    """Stops training when too many videos turn out undecodable.

    Counts every video read (good clips plus skipped videos) and every skipped one; raises once
    at least `min_samples` were seen and the skipped fraction exceeds `max_bad_fraction`. Given
    the reasons, it also logs one warning per skipped video (in the training process, so a
    video is named once however many loader workers meet it).
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
        self._warned_paths: set[str] = set()

    def update(self, num_good: int, skipped_paths: list[str], reasons: list[str] | None = None) -> None:
        """Record one batch: `num_good` clips delivered, `skipped_paths` passed over.

        Args:
            reasons: why each of `skipped_paths` was skipped; when given, the first skip of
                each path is logged as a warning and the examples carry the reason.

        Raises:
            RuntimeError: the skipped fraction is over budget.
        """
        self.num_seen += num_good + len(skipped_paths)
        self.num_skipped += len(skipped_paths)
        if reasons is not None:
            for path, reason in zip(skipped_paths, reasons):
                if path not in self._warned_paths:
                    self._warned_paths.add(path)
                    logger.warning("skipping undecodable video %s: %s", path, reason)
        for i, path in enumerate(skipped_paths):
            if len(self.examples) >= _NUM_EXAMPLES:
                break
            if not any(e == path or e.startswith(f"{path}: ") for e in self.examples):
                self.examples.append(f"{path}: {reasons[i]}" if reasons is not None else path)
        if self.num_seen < self.min_samples:
            return
        fraction = self.num_skipped / self.num_seen
        if fraction > self.max_bad_fraction:
            examples = "\n".join(f"  {path}" for path in self.examples)
            raise UnreadableDataError(
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


def init_worker(worker_id: int) -> None:
    """A decoding worker's setup: one intra-op thread (parallelism comes from the workers, more
    threads would oversubscribe the cores), and SIGTERM / SIGUSR1 / SIGINT ignored: a scheduler
    that signals the whole process group, or a Ctrl-C in the terminal, asks the training process
    to stop after a checkpoint (umt_fast.engine.stopping), which then shuts its workers down."""
    torch.set_num_threads(1)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


@atexit.register
def _stop_workers_left_at_exit() -> None:
    """Stop the daemonic children still alive when the interpreter exits (loader workers of a
    loader left open by an uncaught exception) as multiprocessing's exit handler would, with
    SIGTERM, but then kill those that ignore it (`init_worker`'s workers do) after a second,
    where that handler would wait for them forever. Runs before it (registered after it)."""
    children = [child for child in multiprocessing.active_children() if child.daemon]
    for child in children:
        child.terminate()
    deadline = time.monotonic() + 1.0
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join()


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
        worker_init_fn=init_worker if num_workers > 0 else None,
    )
