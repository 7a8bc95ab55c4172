"""The UMT student: a sparse video ViT that runs on the visible tokens only.

Parameter names follow the reference's stage-1 checkpoints (``encoder.*``,
``clip_decoder.{k}.*``), so its files load with no renaming.

Shape legend: B clips, C=3 colours, T frames, H/W pixels, p patch, P = (H/p)*(W/p)
patches per frame, N visible tokens per clip, D width, L aligned layers, Ct teacher dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from torch.utils.checkpoint import checkpoint

import umt_kernels
from umt_fast.models.attention import multi_head_attention
from umt_kernels.rng import uniform_noise

LN_EPS = 1e-6


def sincos_table(num_positions: int, dim: int) -> torch.Tensor:
    """The fixed 1-D Transformer sin-cos table [num_positions, dim], float32.

    Interleaved like the reference: column 2i is sin(pos / 10000^(2i/dim)), column 2i+1
    the matching cos. Computed in float64 and rounded once, as the reference does.
    """
    pos = np.arange(num_positions, dtype=np.float64)[:, None]
    hid = np.arange(dim)
    angles = pos / np.power(10000, 2 * (hid // 2) / dim)
    table = np.empty_like(angles)
    table[:, 0::2] = np.sin(angles[:, 0::2])
    table[:, 1::2] = np.cos(angles[:, 1::2])
    return torch.from_numpy(table).float()


@dataclass(frozen=True)
class StudentArch:
    """Everything that fixes the student's parameter shapes and token grid."""

    width: int
    depth: int
    heads: int
    teacher_dim: int
    return_layers: int = 6
    num_frames: int = 8
    img_size: int = 224
    patch_size: int = 16
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    head_norm_eps: float = LN_EPS
    """LayerNorm eps of the alignment heads: 1e-6 in stage 1, torch's default 1e-5 in the
    reference's stage-2 model (its ``Linear_Decoder`` there uses a plain ``nn.LayerNorm``)."""
    extra_heads: tuple[tuple[int, int], ...] = ()
    """(K, Ct) of every further teacher: K heads onto the last K blocks, of width Ct."""

    @property
    def tapped_layers(self) -> int:
        """How many of the last blocks some teacher's heads read: the largest K."""
        return max([self.return_layers, *(k for k, _ in self.extra_heads)])

    @property
    def patches_per_frame(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_frames * self.patches_per_frame


class Attention(nn.Module):
    """MHSA with a bias-free fused qkv plus learnable q_bias / v_bias (k bias is zero)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        B, N, D = x_BND.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x_BND, self.qkv.weight, qkv_bias)
        q, k, v = qkv.view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out_BHND = multi_head_attention(q, k, v)
        return self.proj(out_BHND.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(attn(LN(x))), then x + DropPath(mlp(LN(x)))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.drop_prob = drop_path
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x_BND: torch.Tensor, branch_scale_B2: torch.Tensor | None = None) -> torch.Tensor:
        """``branch_scale_B2``: the per-clip drop-path factors of the attention and MLP branches
        (0 or 1 / keep probability, see :func:`drop_path_scales`); None draws them from
        torch's generator (timm's DropPath)."""
        if branch_scale_B2 is None:
            x_BND = x_BND + self.drop_path(self.attn(self.norm1(x_BND)))
            return x_BND + self.drop_path(self.mlp(self.norm2(x_BND)))
        scale = branch_scale_B2.to(x_BND.dtype)[:, :, None, None]
        x_BND = x_BND + self.attn(self.norm1(x_BND)) * scale[:, 0]
        return x_BND + self.mlp(self.norm2(x_BND)) * scale[:, 1]


# The drop-path and head-dropout draws use keys of their own, apart from the masks' (same seed
# and step) and from each other.
DROP_PATH_SEED_OFFSET = 1 << 32
HEAD_DROPOUT_SEED_OFFSET = 2 << 32


def keep_probabilities(drop_probs: list[float], device: torch.device) -> torch.Tensor | None:
    """[depth] float32 on ``device``: 1 - each block's drop probability, for
    :func:`drop_path_scales` (made once, outside the step); None when no block drops."""
    if not any(drop_probs):
        return None
    return torch.tensor([1.0 - p for p in drop_probs], dtype=torch.float32, device=device)


def drop_path_scales(
    keep_prob_L: torch.Tensor, batch_size: int, *, seed: int, offset: int | torch.Tensor, first_clip: int
) -> torch.Tensor:
    """Per-clip drop-path factors of every block's two branches, from counter-based noise.

    Clip b of the batch, block i, branch j (attention, MLP) keeps its branch when
    u < keep_prob_L[i], with u the uniform of counter (first_clip + b, 2 i + j) under the key
    (seed + 2**32, offset): a function of the clip's global index in the step's batch, so
    the draws do not depend on how the batch is split over ranks or micro-batches, and need
    no generator state (CUDA graphs, activation checkpointing).

    Args:
        keep_prob_L: [depth] float32, 1 - each block's drop probability, on the device
            (made once: building it from Python values here would copy from the host).

    Returns:
        [depth, B, 2] float32 on keep_prob_L's device: 0 for a dropped branch, 1 / keep_prob
        for a kept one.
    """
    depth = keep_prob_L.numel()
    u_BJ = uniform_noise(
        (batch_size, 2 * depth), seed=seed + DROP_PATH_SEED_OFFSET, offset=offset, row_offset=first_clip,
        device=keep_prob_L.device,
    )
    keep_J = keep_prob_L.repeat_interleave(2)
    scales_BJ = (u_BJ < keep_J).float() / keep_J
    return scales_BJ.view(batch_size, depth, 2).transpose(0, 1)


class PatchEmbed(nn.Module):
    """Tubelet-1 patch embedding. Kept as a Conv3d for the checkpoint layout, but applied
    as a matmul on the gathered visible patches only."""

    def __init__(self, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(3, dim, kernel_size=(1, patch_size, patch_size), stride=(1, patch_size, patch_size))

    def forward(self, video_BCTHW: torch.Tensor, visible_idx_BN: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W], [B, N] -> [B, N, D]."""
        patches_BNK = umt_kernels.gather_patches(video_BCTHW, visible_idx_BN, self.patch_size)
        weight = self.proj.weight.flatten(1)
        return F.linear(patches_BNK.to(weight.dtype), weight, self.proj.bias)


class Encoder(nn.Module):
    def __init__(self, arch: StudentArch):
        super().__init__()
        self.arch = arch
        self.patch_embed = PatchEmbed(arch.width, arch.patch_size)
        drop_rates = np.linspace(0, arch.drop_path, arch.depth).tolist()
        self.blocks = nn.ModuleList(Block(arch.width, arch.heads, arch.mlp_ratio, r) for r in drop_rates)
        self.norm = nn.LayerNorm(arch.width, eps=LN_EPS)
        self.register_buffer("pos_embed", sincos_table(arch.num_tokens, arch.width), persistent=False)
        self.checkpointed_blocks = 0

    @property
    def drop_probs(self) -> list[float]:
        return [block.drop_prob for block in self.blocks]

    def forward(
        self, video_BCTHW: torch.Tensor, visible_idx_BN: torch.Tensor, drop_scales_LB2: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Returns the final-normed outputs of the last L = arch.tapped_layers blocks, [L, B, N, D],
        ascending depth.

        ``drop_scales_LB2``: [depth, B, 2] drop-path factors (:func:`drop_path_scales`), used in
        training mode; None draws drop path from torch's generator.
        """
        x = self.patch_embed(video_BCTHW, visible_idx_BN)
        x = x + self.pos_embed.to(x.dtype)[visible_idx_BN]
        first_tap = self.arch.depth - self.arch.tapped_layers
        taps = []
        for i, block in enumerate(self.blocks):
            scales = drop_scales_LB2[i] if drop_scales_LB2 is not None and self.training and block.drop_prob > 0 else None
            if i < self.checkpointed_blocks and torch.is_grad_enabled():
                # Given factors, the block draws nothing: no generator state to save and
                # restore (which CUDA-graph capture would also have to record).
                x = checkpoint(block, x, scales, use_reentrant=False, preserve_rng_state=drop_scales_LB2 is None)
            else:
                x = block(x, scales)
            if i >= first_tap:
                taps.append(x)
        return self.norm(torch.stack(taps))


class AlignmentHead(nn.Module):
    """Linear(D -> Ct) -> LayerNorm(Ct) -> L2 normalise (the reference's ``Linear_Decoder``)."""

    def __init__(self, dim: int, teacher_dim: int, eps: float = LN_EPS):
        super().__init__()
        self.head = nn.Linear(dim, teacher_dim)
        self.norm = nn.LayerNorm(teacher_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.norm(self.head(x)), dim=-1)


class SparseVideoStudent(nn.Module):
    """UMT stage-1 student: encoder on visible tokens + one alignment head per aligned layer
    (``clip_decoder``, the reference's naming), and as many per further teacher
    (``extra_decoders.{j}``)."""

    def __init__(self, arch: StudentArch):
        super().__init__()
        if arch.tapped_layers > arch.depth:
            raise ValueError(f"return_layers={arch.tapped_layers} exceeds depth={arch.depth}")
        self.arch = arch
        self.encoder = Encoder(arch)
        self.clip_decoder = self._heads(arch.return_layers, arch.teacher_dim)
        if arch.extra_heads:
            self.extra_decoders = nn.ModuleList(self._heads(k, dim) for k, dim in arch.extra_heads)
        self.register_buffer("clip_pos_embed", sincos_table(arch.num_tokens, arch.width), persistent=False)
        self.apply(_init_weights)

    def _heads(self, count: int, dim: int) -> nn.ModuleList:
        return nn.ModuleList(AlignmentHead(self.arch.width, dim, self.arch.head_norm_eps) for _ in range(count))

    def forward(
        self, video_BCTHW: torch.Tensor, visible_idx_BN: torch.Tensor, drop_scales_LB2: torch.Tensor | None = None,
        *, all_teachers: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:  # fmt: skip
        """
        Args:
            video_BCTHW: [B, 3, T, H, W] normalised pixels.
            visible_idx_BN: [B, N] int64 sorted token indices t * P + p (same N for all clips).
            drop_scales_LB2: [depth, B, 2] drop-path factors from :func:`drop_path_scales`
                (training mode only); None draws drop path from torch's generator.
            all_teachers: return every teacher's heads' outputs, not only the first teacher's.

        Returns:
            [K, B, N, Ct] unit vectors, index 0 the shallowest aligned block; with
            ``all_teachers``, a list of them, one per teacher (K and Ct its own).
        """
        taps_LBND = self.forward_features(video_BCTHW, visible_idx_BN, drop_scales_LB2)
        taps_LBND = taps_LBND + self.clip_pos_embed.to(taps_LBND.dtype)[visible_idx_BN]
        groups = [self.clip_decoder, *(self.extra_decoders if self.arch.extra_heads else [])]
        L = taps_LBND.shape[0]
        # A teacher's K heads read the last K tapped blocks.
        outs = [torch.stack([head(taps_LBND[L - len(heads) + i]) for i, head in enumerate(heads)]) for heads in groups]
        return outs if all_teachers else outs[0]

    def forward_features(
        self, video_BCTHW: torch.Tensor, visible_idx_BN: torch.Tensor, drop_scales_LB2: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The encoder alone: [L, B, N, W], the visible tokens after each of the last L =
        arch.tapped_layers blocks, final-normed, shallowest first; arguments as for `forward`."""
        return self.encoder(video_BCTHW, visible_idx_BN, drop_scales_LB2)

    def set_grad_checkpointing(self, enable: bool = True, num_blocks: int | None = None) -> None:
        """Recompute the first ``num_blocks`` blocks (all when None; none when not ``enable``) in
        the backward instead of storing their activations. Drop-path draws are replayed exactly
        (given as factors, or from torch's generator state, which checkpoint saves)."""
        num_blocks = (self.arch.depth if num_blocks is None else num_blocks) if enable else 0
        if not 0 <= num_blocks <= self.arch.depth:
            raise ValueError(f"activation checkpointing: num_blocks must be in [0, {self.arch.depth}], got {num_blocks}")
        self.encoder.checkpointed_blocks = num_blocks

    def set_activation_checkpointing(self, num_blocks: int) -> None:
        """The older name: ``set_grad_checkpointing(num_blocks=num_blocks)``."""
        self.set_grad_checkpointing(num_blocks=num_blocks)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
