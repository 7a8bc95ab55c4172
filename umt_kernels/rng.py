"""Counter-based randomness: the one source of random numbers for the kernels, the engine and the data.

Everything random in umt_fast is a pure function of integers (the run seed, a stream, a step,
a global index), so a draw needs no generator state, is the same on resume and at any number of
ranks, and can be computed on the device inside a captured CUDA graph.

* :func:`mix_seed` / :func:`mix_seed_on_device`: splitmix64 of (seed, offset) into a 63-bit key.
* :func:`uniform_noise`: [G, N] uniforms, element (g, n) a function of the key and the global
  counter (row_offset + g) * N + n; the Triton samplers compute exactly the same values.
* :func:`derive_seed`: a 63-bit seed for a host-side generator (``random.Random``,
  ``torch.Generator``, numpy), from the run seed and any number of integer or string parts,
  e.g. ``derive_seed(seed, "train_clips", epoch)``.
"""
from __future__ import annotations

import zlib

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def mix_seed(seed: int, offset: int) -> int:
    """Mixes (seed, offset) into one 63-bit key (splitmix64), on the host: no device work."""
    z = (seed * _GOLDEN + offset + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _as_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def mix_seed_on_device(seed: int, offset: torch.Tensor) -> torch.Tensor:
    """:func:`mix_seed` with the offset read from a 0-dim int64 tensor, computed on its device.

    Equals ``mix_seed(seed, int(offset))`` bit for bit (as int64). With the offset in device
    memory (e.g. a step counter), a captured CUDA graph draws new masks on every replay.
    """
    if offset.dim() != 0 or offset.dtype != torch.int64:
        raise ValueError(f"a tensor offset must be a 0-dim int64 tensor, got {offset.dtype} of shape {tuple(offset.shape)}")
    z = offset + _as_int64((seed * _GOLDEN + 0x632BE59BD9B4E019) & _MASK64)
    z = (z ^ _shr(z, 30)) * _as_int64(_MIX1)
    z = (z ^ _shr(z, 27)) * _as_int64(_MIX2)
    return _shr(z ^ _shr(z, 31), 1)


def sampling_key(seed: int, offset: int | torch.Tensor) -> int | torch.Tensor:
    """The 63-bit key of (seed, offset): a Python int, or a 0-dim device tensor for a tensor offset."""
    if isinstance(offset, torch.Tensor):
        return mix_seed_on_device(seed, offset)
    return mix_seed(seed, offset)


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def uniform_noise(
    shape: tuple[int, int], *, seed: int, offset: int | torch.Tensor, row_offset: int = 0, device: torch.device
) -> torch.Tensor:
    """Counter-based uniform noise in [0, 1): element (g, n) is a pure function of
    (seed, offset, (row_offset + g) * N + n).

    The splitmix64 finaliser of the counter plus the mixed key, top 24 bits. The Triton
    kernels compute exactly the same values, so the reference and the kernels draw the same
    samples. A function of the row's global index: a batch split over ranks or micro-batches
    (each with its ``row_offset``) draws what the whole batch draws. No generator state, no
    host sync, capturable in a CUDA graph. ``offset`` may be a 0-dim int64 tensor on ``device``
    (see :func:`mix_seed_on_device`).

    Returns:
        [G, N] float32, multiples of 2**-24.
    """
    G, N = shape
    key = sampling_key(seed, offset)
    rows = torch.arange(row_offset, row_offset + G, device=device, dtype=torch.int64)
    counter = rows[:, None] * N + torch.arange(N, device=device, dtype=torch.int64)
    z = counter * _as_int64(_GOLDEN) + key
    z = (z ^ _shr(z, 30)) * _as_int64(_MIX1)
    z = (z ^ _shr(z, 27)) * _as_int64(_MIX2)
    z = z ^ _shr(z, 31)
    return _shr(z, 40).to(torch.float32) * 2.0**-24



def derive_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed from the run seed and ``parts`` (ints, or strings naming a stream), by
    chaining :func:`mix_seed`. Distinct parts give unrelated seeds; the same parts, the same seed."""
    key = seed
    for part in parts:
        key = mix_seed(key, zlib.crc32(part.encode()) if isinstance(part, str) else part)
    return key
