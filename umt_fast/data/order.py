"""Where the data's randomness comes from: one scheme for every dataset.

A dataset's epoch order and each sample's augmentation are functions of the run seed, the
dataset's stream name, the epoch or sample position and the attempt, through
`umt_kernels.rng.derive_seed`. Nothing depends on worker processes, ranks or how far a run got
before it was resumed.
"""
from __future__ import annotations

import random
from collections import OrderedDict

import torch

from umt_kernels.rng import derive_seed


class EpochPermutations:
    """``perms[epoch]``: a permutation of ``n`` records, [n] int64, one per epoch, a function of
    (seed, stream, epoch). The last few epochs' permutations are cached."""

    _CACHED = 3

    def __init__(self, n: int, seed: int, stream: str):
        self.n, self.seed, self.stream = n, seed, stream
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __getitem__(self, epoch: int) -> torch.Tensor:
        perm = self._cache.get(epoch)
        if perm is None:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.stream, "order", epoch))
            perm = self._cache[epoch] = torch.randperm(self.n, generator=generator)
            if len(self._cache) > self._CACHED:
                self._cache.popitem(last=False)
        return perm


def sample_rng(seed: int, stream: str, position: int, attempt: int = 0) -> random.Random:
    """The generator of one sample's augmentation: a function of (seed, stream, position, attempt)."""
    return random.Random(derive_seed(seed, stream, position, attempt))
