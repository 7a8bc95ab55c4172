"""Weighted mixes of several annotation lists or shard sets (``--data.mix``), e.g. K400 + K600 +
K700 as K710, or a V-JEPA-style mix of datasets by weight.

Each source is a list (or a shard manifest) with a weight, its own root, and a label offset or a
label-map file. The mix decides, for every global sample position, which source it reads and
which of that source's records, as a function of (seed, position) alone, so the same on every
rank and worker and after a resume:

* positions come in blocks of `BLOCK`; in each block every source gets its share of the slots
  (weight / total weight, the remainders going to the largest fractions), in an order shuffled
  per block. The proportions are exact per block, not only on average.
* the k-th slot of a source overall reads the k-th record of that source's own epoch
  permutations (`EpochPermutations`), so every source cycles through all of its records before
  repeating any, at its own rate.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

from umt_fast.data.annotations import VideoRecord, read_annotation_list
from umt_fast.data.order import EpochPermutations, derive_seed

BLOCK = 1024
"""Positions per block of the schedule."""


@dataclass(frozen=True)
class MixSource:
    """One source of a mix: an annotation list or shard manifest and how it enters the mix."""

    list: str
    weight: float
    root: str = ""
    label_offset: int = 0
    label_map: str = ""
    """A file of 'source_label new_label' (or 'a,b') lines; labels it does not map are refused."""


def read_label_map(path: str) -> dict[int, int]:
    """{source label: new label} from 'a b' / 'a,b' lines; ValueError naming FILE:LINE."""
    mapping: dict[int, int] = {}
    with open(path, encoding="utf-8-sig") as f:
        for line_no, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.replace(",", " ").split()
            try:
                old, new = (int(p) for p in parts)
            except ValueError:
                raise ValueError(f"{path}:{line_no}: {line!r} is not 'source_label new_label' (two integers)") from None
            if old in mapping:
                raise ValueError(f"{path}:{line_no}: label {old} is mapped twice")
            mapping[old] = new
    return mapping


def _relabel(records: list[VideoRecord], source: MixSource) -> list[VideoRecord]:
    mapping = read_label_map(source.label_map) if source.label_map else None
    out = []
    for r in records:
        label = r.label
        if label is not None and mapping is not None:
            if label not in mapping:
                raise ValueError(f"{source.list}:{r.line}: label {label} is not in the label map {source.label_map}")
            label = mapping[label]
        if label is not None:
            label += source.label_offset
        out.append(replace(r, label=label) if label != r.label else r)
    return out


class SourceMix:
    """Global sample position -> index into the concatenated records of the sources.

    Args:
        sizes: records per source.
        weights: one per source (> 0; normalised here).
        seed: the run seed.
    """

    STREAM = "mix"

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        if not sizes or len(sizes) != len(weights) or min(sizes) < 1 or min(weights) <= 0:
            raise ValueError(f"a mix needs one weight > 0 per non-empty source, got sizes {sizes} and weights {weights}")
        self.sizes, self.seed = list(sizes), seed
        self.offsets = [0]
        for n in sizes[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        total = sum(weights)
        shares = [BLOCK * w / total for w in weights]
        counts = [math.floor(x) for x in shares]
        by_remainder = sorted(range(len(shares)), key=lambda s: (counts[s] - shares[s], s))
        for s in by_remainder[: BLOCK - sum(counts)]:
            counts[s] += 1
        self.counts = counts  # slots per block, per source
        self._permutations = [EpochPermutations(n, seed, f"{self.STREAM}{s}") for s, n in enumerate(sizes)]
        self._blocks: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def _block(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(source of each slot [BLOCK], its ordinal among the block's slots of that source [BLOCK])."""
        cached = self._blocks.get(block)
        if cached is None:
            sources = torch.repeat_interleave(torch.arange(len(self.counts)), torch.tensor(self.counts))
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.STREAM, "block", block))
            sources = sources[torch.randperm(BLOCK, generator=g)]
            seen_BS = torch.nn.functional.one_hot(sources, len(self.counts)).cumsum(0)  # slots of each source so far
            ordinals = seen_BS.gather(1, sources[:, None]).squeeze(1) - 1
            cached = self._blocks[block] = (sources, ordinals)
            if len(self._blocks) > 4:
                self._blocks.popitem(last=False)
        return cached

    def source_of(self, position: int) -> int:
        block, slot = divmod(position, BLOCK)
        return int(self._block(block)[0][slot])

    def record_index(self, position: int, attempt: int = 0) -> int:
        """The record read at ``position`` (``attempt`` k: its k-th substitute, from the same source)."""
        block, slot = divmod(position, BLOCK)
        sources, ordinals = self._block(block)
        s = int(sources[slot])
        ordinal = block * self.counts[s] + int(ordinals[slot])
        epoch, k = divmod(ordinal, self.sizes[s])
        return self.offsets[s] + (int(self._permutations[s][epoch][k]) + attempt) % self.sizes[s]


def read_mix(sources: list[MixSource], seed: int) -> tuple[list[VideoRecord], SourceMix]:
    """The sources' records, concatenated and relabelled, and the mix over them."""
    records, sizes = [], []
    for source in sources:
        part = _relabel(read_annotation_list(source.list, root=source.root), source)
        records += part
        sizes.append(len(part))
    return records, SourceMix(sizes, [s.weight for s in sources], seed)
