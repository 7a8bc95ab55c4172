"""Stage-2 data: JSON caption lists, one loader per media type, and their interleaving.

A caption list is a JSON list of ``{"video": path, "caption": str | [str]}`` or
``{"image": path, "caption": ...}`` (the reference's format; an MSRVTT-style test file is the
same). In training every caption is one sample; all captions of one video share its id (they
are positives of one another in VTC and never each other's VTM negatives).

Videos: ``num_frames`` frames, one random frame per segment (training) or the middle one
(test). Images: 1-frame clips. Both: RandomResizedCrop to ``img_size`` with scale (0.5, 1),
ratio (3/4, 4/3), and a horizontal flip (training); a plain resize (test).

Every step is all-video or all-image. The order of media types within an epoch is a shuffle of
[media m repeated steps_m times], seeded by (seed, epoch) only, where steps_m = (samples of m) //
global batch; each rank reads its own slice of each global batch. Which (media, caption) sample
fills a position of a global batch, and all randomness of the sample (frames, crop, flip), is
seeded by (seed, media type, sample position) only. So the data of a step is the same at any
number of ranks with the same global batch, and a resumed run reads what an uninterrupted one
would.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import re
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from umt_fast.data.annotations import read_annotation_list
from umt_fast.data.dataset import init_worker
from umt_fast.data.decoding import VideoDecodeError, count_frames, decode_frames, remote_bytes
from umt_fast.data.order import EpochPermutations, sample_rng
from umt_fast.data.transforms import (crop_resize_flip, random_resized_crop_box, segment_middle_indices,
                                      segment_random_indices)
from umt_kernels.rng import derive_seed

log = logging.getLogger(__name__)

def clean_caption(text: str) -> str:
    """The reference's caption clean-up, applied to every training and test caption before it is
    tokenized: lower-case; drop , . ' ! ? " ( ) * # : ; ~; '-' and '/' become spaces; '<person>'
    becomes 'person'; runs of two or more whitespace characters become one space; strip."""
    text = re.sub(r"([,.'!?\"()*#:;~])", "", text.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = re.sub(r"\s{2,}", " ", text)
    return text.rstrip("\n").strip(" ")


def tokenize_captions(
    tokenizer, captions: list[str], max_len: int, *, clean: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> the reference's text input: ``[CLS] w_1 .. w_n`` with NO trailing [SEP], the
    wordpieces cut to ``max_len - 1``, right-padded with [PAD] to `max_len`.

    The reference's BERT tokenizer builds a single sequence as ``[CLS] X`` and is called with
    ``padding="max_length", truncation=True, max_length=max_len``; since it adds one special
    token, truncation keeps ``max_len - 1`` wordpieces. This gives the same ids from any Hugging
    Face BERT tokenizer (fast or slow), whose own single-sequence template appends [SEP].

    Args:
        tokenizer: a Hugging Face BERT tokenizer (`load_tokenizer`).
        captions: B strings.
        max_len: S >= 1, tokens per caption ([CLS] included).
        clean: apply `clean_caption` first, as the reference's datasets do.

    Returns:
        (ids [B, S] int64, attention mask [B, S] int64: 1 on [CLS] and the wordpieces, 0 on padding).
    """
    if max_len < 1:
        raise ValueError(f"max_len={max_len} must be >= 1 (room for [CLS])")
    texts = [clean_caption(c) if clean else c for c in captions]
    keep = max_len - 1
    pieces = tokenizer(texts, add_special_tokens=False, truncation=keep > 0, max_length=keep or None,
                       return_attention_mask=False, return_token_type_ids=False)["input_ids"] if texts else []  # fmt: skip
    rows = [[tokenizer.cls_token_id, *p[:keep]] for p in pieces]
    pad = [tokenizer.pad_token_id]
    ids = torch.tensor([r + pad * (max_len - len(r)) for r in rows], dtype=torch.long)
    mask = torch.tensor([[1] * len(r) + [0] * (max_len - len(r)) for r in rows], dtype=torch.long)
    return ids.reshape(len(rows), max_len), mask.reshape(len(rows), max_len)



MEDIA_TYPES = ("video", "image")
RRC_SCALE = (0.5, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class CaptionRecord:
    """One (media, caption) pair; `media_id` is the index of its media in the list."""

    path: str
    caption: str
    media_id: int
    media: str  # "video" or "image"


def read_caption_json(path: str, root: str = "") -> list[dict[str, Any]]:
    """A JSON caption list (read by umt_fast.data.read_annotation_list) as
    [{"media": "video"|"image", "path": ..., "captions": [str, ...]}], in file order.

    FileNotFoundError if missing; ValueError naming the entry for a malformed one."""
    if not path.lower().endswith(".json"):
        raise ValueError(f"{path}: a caption list must be a .json file (a list of {{\"video\" or \"image\": path, "
                         "\"caption\": str or [str]}})")  # fmt: skip
    records = read_annotation_list(path, root)
    if not any(r.captions for r in records):  # only a shard manifest of a text list can come back without captions
        raise ValueError(f"{path}: a shard set of a list without captions (prepare shard of a 'path,label' list); "
                         "stage 2 needs one made from a JSON caption list")  # fmt: skip
    return [{"media": r.media, "path": r.path, "captions": list(r.captions)} for r in records]


def join_paragraphs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paragraph retrieval (DiDeMo, ActivityNet Captions): each entry of `read_caption_json`'s
    output with its captions joined into one, as the reference's ``is_paragraph_retrieval``
    does: ``" ".join(captions)`` in list order, nothing dropped or cut here (the joined text is
    cleaned and cut to the token limit when tokenized, like any caption); an entry without
    captions keeps none. New dicts; the input is left as it is."""
    return [{**e, "captions": [" ".join(e["captions"])] if e["captions"] else []} for e in entries]


def caption_records(entries: list[dict[str, Any]], media: str) -> list[CaptionRecord]:
    """Training samples of one media type: one record per caption."""
    records = [
        CaptionRecord(e["path"], c, i, media)
        for i, e in enumerate(entries) if e["media"] == media
        for c in e["captions"]
    ]  # fmt: skip
    return records


def load_image(path: str) -> torch.Tensor:
    """uint8 [1, H, W, 3] (a 1-frame clip); VideoDecodeError if unreadable."""
    from PIL import Image

    try:
        data = remote_bytes(path)  # a shard member or a URL: read into memory
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            array = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
            w, h = im.size
    except (OSError, ValueError) as e:
        raise VideoDecodeError(path, f"cannot read image: {e}") from e
    return array.view(1, h, w, 3)


def load_media(path: str, media: str, num_frames: int, img_size: int, rng: random.Random | None, flip: bool = True,
               max_seconds: float = 0.0) -> torch.Tensor:  # fmt: skip
    """Decode and augment one item: uint8 [T, img_size, img_size, 3] (T = 1 for an image).

    Training (``rng`` given): the reference's random frames (`segment_random_indices`), a random
    resized crop and a flip. ``rng`` None = test: the middle frame of each segment as the
    reference's vision-language code picks it (`segment_middle_indices`), a plain resize, no flip.
    Both resize as the reference does: bicubic, without antialiasing.
    ``max_seconds`` > 0: the segments span only the video's first ``max_seconds``
    (`count_frames`)."""
    if media == "image":
        frames = load_image(path)
    else:
        n = count_frames(path, max_seconds)
        frames = decode_frames(path, segment_middle_indices(n, num_frames) if rng is None else
                               segment_random_indices(n, num_frames, rng))  # fmt: skip
    _, h, w, _ = frames.shape
    if rng is None:
        return crop_resize_flip(frames, (0, 0, w, h), img_size, False, bicubic=True)
    box = random_resized_crop_box(w, h, rng, scale=RRC_SCALE, ratio=RRC_RATIO)
    return crop_resize_flip(frames, box, img_size, flip and rng.random() < 0.5, bicubic=True)


class CaptionDataset(Dataset):
    """Augmented (media, caption) samples of one media type, indexed by sample position
    (epoch * len + offset into that epoch's permutation), like the stage-1 clip stream."""

    def __init__(self, records: list[CaptionRecord], media: str, num_frames: int, img_size: int, seed: int,
                 flip: bool = True, max_substitutes: int = 16, max_seconds: float = 0.0, stream: str = ""):  # fmt: skip
        if not records:
            raise ValueError(f"no {media} records")
        self.records, self.media, self.max_seconds = records, media, max_seconds
        self.num_frames = num_frames if media == "video" else 1
        self.img_size, self.seed, self.flip, self.max_substitutes = img_size, seed, flip, max_substitutes
        self.stream = stream or f"{media}_captions"  # names the order's and the augmentations' random stream
        self._permutations = EpochPermutations(len(records), seed, self.stream)

    def __len__(self) -> int:
        return len(self.records)

    def record_index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.records))
        return int(self._permutations[epoch][offset])

    def load(self, position: int) -> tuple[Any, torch.Tensor, list[str]]:
        """(record, media uint8 [T, S, S, 3], skipped paths) at sample ``position``: an undecodable
        item is replaced by the next record's (a new draw each attempt) and named in skipped."""
        index = self.record_index(position)
        skipped = []
        for attempt in range(self.max_substitutes + 1):
            record = self.records[(index + attempt) % len(self.records)]
            rng = sample_rng(self.seed, self.stream, position, attempt)
            try:
                media = load_media(record.path, self.media, self.num_frames, self.img_size, rng, self.flip,
                                   self.max_seconds)  # fmt: skip
            except VideoDecodeError as e:
                log.warning("skipping undecodable %s %s: %s", self.media, record.path, e.reason)
                skipped.append(record.path)
                continue
            return record, media, skipped
        raise RuntimeError(f"{self.media} sample {position}: {len(skipped)} items in a row could not be decoded "
                           f"(first: {skipped[0]})")  # fmt: skip

    def __getitem__(self, position: int) -> dict[str, Any]:
        record, media, skipped = self.load(position)
        return {"media": media, "caption": record.caption, "id": record.media_id, "skipped": skipped}


def collate_captions(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """{"media": uint8 [B, T, S, S, 3], "captions": [str] * B, "ids": int64 [B], "skipped": [str]}."""
    return {
        "media": torch.stack([s["media"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "ids": torch.tensor([s["id"] for s in samples], dtype=torch.long),
        "skipped": [p for s in samples for p in s["skipped"]],
    }


class CaptionCollate:
    """`collate_captions`, plus the captions' ids and attention masks as the reference builds them
    (`tokenize_captions`) when given a tokenizer, so that tokenizing runs in the
    loader workers: "text_ids", "text_mask" int64 [B, S]."""

    def __init__(self, tokenizer=None, max_len: int = 32):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        out = collate_captions(samples)
        if self.tokenizer is not None:
            out["text_ids"], out["text_mask"] = tokenize_captions(self.tokenizer, out["captions"], self.max_len)
        return out


class MediaBatchSampler:
    """Endless lists of one rank's sample positions: global batch j of G = per_rank * world_size
    samples covers positions [j*G, (j+1)*G) within its epoch (the tail of an epoch that does not fill
    a global batch is dropped); rank r reads [r*b, (r+1)*b) of it."""

    def __init__(self, num_samples: int, per_rank: int, rank: int, world_size: int, start_batch: int = 0):
        G = per_rank * world_size
        if num_samples < G:
            raise ValueError(f"{num_samples} samples cannot fill one global batch of {G}")
        self.n, self.per_rank, self.rank, self.G, self.start = num_samples, per_rank, rank, G, start_batch

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.G

    def __iter__(self) -> Iterator[list[int]]:
        for j in itertools.count(self.start):
            epoch, k = divmod(j, self.batches_per_epoch)
            first = epoch * self.n + k * self.G + self.rank * self.per_rank
            yield list(range(first, first + self.per_rank))


def interleave_order(steps_per_media: list[int], seed: int, epoch: int) -> list[int]:
    """Which media type each step of `epoch` reads: a shuffle of [m] * steps_per_media[m], seeded by
    (seed, epoch) only, so it is the same on every rank."""
    order = [m for m, count in enumerate(steps_per_media) for _ in range(count)]
    random.Random(derive_seed(seed, "interleave", epoch)).shuffle(order)
    return order


class InterleavedStream:
    """Iterates (media type, batch) from one DataLoader per media type in the interleaved order,
    starting at global step `start_step` (exactly where an uninterrupted run would be)."""

    def __init__(self, datasets: list[CaptionDataset], per_rank: int, seed: int, start_step: int = 0, *,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, pin_memory: bool = False,
                 collate_fn=collate_captions):  # fmt: skip
        self.datasets = datasets
        self.seed = seed
        counts = [MediaBatchSampler(len(d), per_rank, rank, world_size).batches_per_epoch for d in datasets]
        self.steps_per_media = counts
        self.steps_per_epoch = sum(counts)
        self.step = start_step
        epoch, offset = divmod(start_step, self.steps_per_epoch)
        before = interleave_order(counts, seed, epoch)[:offset]
        self.loaders = []
        for m, d in enumerate(datasets):
            start_batch = epoch * counts[m] + before.count(m)
            sampler = MediaBatchSampler(len(d), per_rank, rank, world_size, start_batch)
            self.loaders.append(iter(DataLoader(
                d, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
                pin_memory=pin_memory, persistent_workers=num_workers > 0,
                worker_init_fn=init_worker if num_workers > 0 else None,
            )))  # fmt: skip
        self._order: tuple[int, list[int]] | None = None

    def media_at(self, step: int) -> int:
        epoch, offset = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, interleave_order(self.steps_per_media, self.seed, epoch))
        return self._order[1][offset]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[str, dict[str, Any]]:
        m = self.media_at(self.step)
        self.step += 1
        return self.datasets[m].media, next(self.loaders[m])


# --------------------------------------------------------------------------------------------------
# Demo data: the sample clips and scikit-image's photographs, with built-in captions
# --------------------------------------------------------------------------------------------------

DEMO_VIDEO_CAPTIONS = {
    "bigbuckbunny.mp4": ["a cartoon rabbit in a green meadow", "an animated bunny walks out of its burrow"],
    "bikes.mp4": ["people ride bicycles down a street", "cyclists pass by on a road"],
    "carphone_distorted.mp4": ["a blurry video of a man talking on a phone in a car"],
    "carphone_pristine.mp4": ["a man talks on a phone while sitting in a car"],
}
DEMO_IMAGE_CAPTIONS = {
    "astronaut.png": ["an astronaut in a white space suit with a flag"],
    "coffee.png": ["a cup of coffee on a saucer"],
    "chelsea.png": ["a tabby cat looking to the side"],
    "rocket.jpg": ["a rocket on the launch pad"],
    "motorcycle_left.png": ["a red motorcycle parked in a garage"],
    "hubble_deep_field.jpg": ["galaxies in the deep night sky"],
}


def skimage_data_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the demo photographs come with scikit-image: pip install scikit-image")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def demo_video_entries() -> list[dict]:
    """The sample clips with their built-in captions: ``[{"video": path, "caption": [str]}]``."""
    from umt_fast.data.sample_clips import sample_clip_paths

    return [{"video": p, "caption": DEMO_VIDEO_CAPTIONS[os.path.basename(p)]} for p in sample_clip_paths()]


def write_demo_caption_lists(directory: str) -> tuple[str, str]:
    """Write ``demo_videos.json`` (the sample clips) and ``demo_images.json`` (scikit-image's photographs)
    with built-in captions into `directory`; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    videos = demo_video_entries()
    data_dir = skimage_data_dir()
    images = [{"image": os.path.join(data_dir, name), "caption": caps} for name, caps in DEMO_IMAGE_CAPTIONS.items()]
    missing = [e["image"] for e in images if not os.path.isfile(e["image"])]
    if missing:
        raise FileNotFoundError(f"scikit-image's sample photographs are missing: {missing}")
    paths = (os.path.join(directory, "demo_videos.json"), os.path.join(directory, "demo_images.json"))
    for path, entries in zip(paths, (videos, images)):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=1)
    return paths
