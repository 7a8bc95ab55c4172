"""Shapes, inputs and baselines shared by the kernel benchmarks and the GPU suite.

UMT-L shapes (the issue of record): B = 64 clips, T = 8 frames, N = 196 patches per frame,
k = 40 kept per frame, C = 1024 channels, 16 heads x 64 for the CLS attention, 6 aligned
layers of teacher dim 768 for the loss. On a CPU the same kernels run at 1/8 of the batch so
the suite stays quick.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import umt_kernels

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


@dataclass(frozen=True)
class Shapes:
    B: int = 64
    T: int = 8
    N: int = 196
    k: int = 40
    C: int = 1024
    heads: int = 16
    head_dim: int = 64
    layers: int = 6
    teacher_dim: int = 768
    img: int = 224
    patch: int = 16

    @property
    def G(self) -> int:  # one group per frame
        return self.B * self.T


UMT_L = Shapes()
SHAPES = UMT_L if ON_GPU else Shapes(B=8)


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def make_inputs(s: Shapes = SHAPES, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    dt = dtype if ON_GPU else torch.float32
    P_tokens = s.N + 1
    return {
        "scores": torch.rand(s.G, s.N, device=DEVICE, generator=g),
        "rows": torch.randn(s.G, s.N, s.C, device=DEVICE, dtype=dt, generator=g),
        "q": torch.randn(s.G, s.heads, P_tokens, s.head_dim, device=DEVICE, dtype=dt, generator=g),
        "k": torch.randn(s.G, s.heads, P_tokens, s.head_dim, device=DEVICE, dtype=dt, generator=g),
        "video": torch.randn(s.B, 3, s.T, s.img, s.img, device=DEVICE, dtype=dt, generator=g),
        "visible": torch.stack([torch.randperm(s.T * s.N, device=DEVICE, generator=g)[: s.T * s.k].sort().values
                                for _ in range(s.B)]),
        "student": torch.randn(s.layers, s.B, s.T * s.k, s.teacher_dim, device=DEVICE, dtype=dt, generator=g),
        "teacher": torch.randn(s.layers, s.B, s.T * s.k, s.teacher_dim, device=DEVICE, dtype=dt, generator=g),
    }


# ----------------------------------------------------------------- the reference system's path


def reference_system_cls_attention(q_GHND: torch.Tensor, k_GHND: torch.Tensor) -> torch.Tensor:
    """What ``nn.MultiheadAttention(need_weights=True)`` does to read one row: the full
    [G, H, N, N] attention matrix, averaged over heads, then the CLS row's patch columns."""
    scale = q_GHND.shape[-1] ** -0.5
    attn = torch.softmax((q_GHND * scale) @ k_GHND.transpose(-1, -2), dim=-1).mean(dim=1)
    return attn[:, 0, 1:]


def reference_system_select_and_gather(scores_GN: torch.Tensor, x_GNC: torch.Tensor, k: int) -> torch.Tensor:
    """The reference loop's masking: torch.multinomial over all N per frame, a boolean mask
    built by index assignment, and boolean indexing (which syncs with the host)."""
    G, N, C = x_GNC.shape
    importance = torch.multinomial(scores_GN, N)
    mask = torch.ones(G, N, device=x_GNC.device)
    rows = torch.arange(G, device=x_GNC.device).view(-1, 1).repeat(1, k)
    mask[rows, importance[:, :k]] = 0
    return x_GNC[~mask.bool()].reshape(G, k, C)


# ---------------------------------------------------------------------- the ops, by name


def run_op(name: str, impl: str, inputs: dict[str, torch.Tensor], s: Shapes = SHAPES, offset: int = 0):
    """Runs one op with ``impl`` in {"triton", "reference", "reference_system"}."""
    if impl == "reference_system":
        if name == "select_and_gather":
            return reference_system_select_and_gather(inputs["scores"], inputs["rows"], s.k)
        if name == "cls_attention":
            return reference_system_cls_attention(inputs["q"], inputs["k"])
        raise KeyError(f"no reference-system baseline for {name}")
    with umt_kernels.backend(impl):
        if name == "sample_without_replacement":
            return umt_kernels.sample_without_replacement(inputs["scores"], s.k, seed=0, offset=offset)
        if name == "select_and_gather":
            return umt_kernels.select_and_gather(inputs["scores"], inputs["rows"], s.k, seed=0, offset=offset)
        if name == "cls_attention":
            return umt_kernels.cls_attention(inputs["q"][:, :, 0], inputs["k"], s.head_dim**-0.5)
        if name == "gather_rows":
            idx = inputs["visible"].view(s.B, s.T, s.k)[:, :, :].reshape(s.G, -1) % s.N
            return umt_kernels.gather_rows(inputs["rows"], idx)
        if name == "gather_patches":
            return umt_kernels.gather_patches(inputs["video"], inputs["visible"], s.patch)
        if name == "alignment_loss":
            return umt_kernels.alignment_loss(inputs["student"], inputs["teacher"])
    raise KeyError(name)


def bytes_moved(name: str, inputs: dict[str, torch.Tensor], s: Shapes = SHAPES) -> int:
    """The bytes an op must read and write at least (the denominator of its GB/s)."""
    e = inputs["rows"].element_size()
    if name == "sample_without_replacement":
        return s.G * s.N * 4 + s.G * s.k * 8
    if name == "select_and_gather":
        return s.G * s.N * 4 + 2 * s.G * s.k * s.C * e + s.G * s.k * 8
    if name == "cls_attention":
        return s.G * s.heads * (s.N + 1) * s.head_dim * e + s.G * (s.N + 1) * 4
    if name == "gather_rows":
        return 2 * s.G * s.k * s.C * e + s.G * s.k * 8
    if name == "gather_patches":
        return 2 * s.B * s.T * s.k * 3 * s.patch**2 * e + s.B * s.T * s.k * 8
    if name == "alignment_loss":
        return 2 * inputs["student"].numel() * e
    raise KeyError(name)


OPS = ("sample_without_replacement", "select_and_gather", "cls_attention", "gather_rows", "gather_patches", "alignment_loss")
BASELINES = {"select_and_gather", "cls_attention"}
