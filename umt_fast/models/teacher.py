"""The frozen UMT teacher: OpenAI CLIP's image ViT, run on every frame of a clip.

Parameter names are OpenAI CLIP's visual-tower names (``conv1.weight``,
``transformer.resblocks.{i}.attn.in_proj_weight``, ``ln_post.*``, ``proj`` ...), so CLIP
state dicts load as they are.

Shape legend: B clips, T frames, R teacher resolution, g = R / patch, P = g*g patches per
frame, W width, Ct output dim, L aligned layers, N visible tokens per clip.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import umt_kernels
from umt_fast.models.attention import multi_head_attention

CLIP_LN_EPS = 1e-5


@dataclass(frozen=True)
class TeacherArch:
    width: int
    layers: int
    heads: int
    patch_size: int
    output_dim: int
    input_resolution: int = 224
    return_layers: int = 6

    @property
    def grid(self) -> int:
        return self.input_resolution // self.patch_size


class LayerNormFP32(nn.LayerNorm):
    """CLIP's LayerNorm: statistics and affine in fp32 whatever the input dtype, output in the
    input's dtype.

    For a bf16/fp16 input with weights of the same dtype (the frozen teacher in low precision)
    PyTorch's own kernel does exactly that in one pass (fp32 statistics and affine, one
    rounding of the output), reading and writing 16-bit values; casting to fp32 around it
    would triple the memory traffic, and autocast would add the casts back, so it is off here.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16) and self.weight.dtype == x.dtype:
            with torch.autocast(device_type=x.device.type, enabled=False):
                return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


QUICK_GELU_SCALE = 1.702
"""CLIP's QuickGELU is x * sigmoid(1.702 x) = silu(1.702 x) / 1.702: the teacher keeps c_fc
multiplied by 1.702 and c_proj's weight divided by it, so that its MLP is c_proj(silu(c_fc(x)))."""


class CLIPAttention(nn.Module):
    """nn.MultiheadAttention's parameters (in_proj_*, out_proj), computed through SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        self.in_proj: nn.Module | None = None
        """Replaces in_proj_* when set: the FP8 teacher's quantised layer (umt_fast.models.fp8)."""

    def _qkv(self, x_BSW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, S, W = x_BSW.shape
        if self.in_proj is not None:
            qkv = self.in_proj(x_BSW)
        else:
            qkv = F.linear(x_BSW, self.in_proj_weight, self.in_proj_bias)
        return qkv.view(B, S, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x_BSW: torch.Tensor, return_cls_attn: bool = False):
        """[B, S, W] -> [B, S, W]; with ``return_cls_attn`` also the heads-averaged
        attention of the first (CLS) query over all S keys, [B, S] float32."""
        B, S, W = x_BSW.shape
        q, k, v = self._qkv(x_BSW)
        out = self.out_proj(multi_head_attention(q, k, v).transpose(1, 2).reshape(B, S, W))
        if not return_cls_attn:
            return out
        cls_attn_BS = umt_kernels.cls_attention(q[:, :, 0], k, scale=q.shape[-1] ** -0.5)
        return out, cls_attn_BS


class ResidualAttentionBlock(nn.Module):
    """CLIP's block, with QuickGELU's 1.702 folded into the MLP weights once (`QUICK_GELU_SCALE`):
    folded when built, when weights are loaded, and unfolded again in state_dict(), which holds
    CLIP's own values."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = CLIPAttention(width, heads)
        self.ln_1 = LayerNormFP32(width, eps=CLIP_LN_EPS)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("silu", nn.SiLU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_2 = LayerNormFP32(width, eps=CLIP_LN_EPS)
        with torch.no_grad():
            for name, param in self.mlp.named_parameters():
                param.mul_(self._fold_factor(name))
        self.register_load_state_dict_pre_hook(self._fold_loaded)
        self.register_state_dict_post_hook(self._unfold_saved)

    @staticmethod
    def _fold_factor(name: str) -> float:
        """What CLIP's value of mlp parameter `name` is multiplied by here."""
        return {"c_fc.weight": QUICK_GELU_SCALE, "c_fc.bias": QUICK_GELU_SCALE, "c_proj.weight": 1.0 / QUICK_GELU_SCALE}.get(name, 1.0)

    @staticmethod
    def _fold_loaded(module, state_dict, prefix, *args) -> None:
        for name in ("c_fc.weight", "c_fc.bias", "c_proj.weight"):
            key = f"{prefix}mlp.{name}"
            if key in state_dict:
                state_dict[key] = state_dict[key] * module._fold_factor(name)

    @staticmethod
    def _unfold_saved(module, state_dict, prefix, local_metadata) -> None:
        for name in ("c_fc.weight", "c_fc.bias", "c_proj.weight"):
            key = f"{prefix}mlp.{name}"
            if key in state_dict:
                state_dict[key] = state_dict[key] / module._fold_factor(name)

    def forward(self, x: torch.Tensor, return_cls_attn: bool = False):
        if return_cls_attn:
            attn_out, cls_attn = self.attn(self.ln_1(x), return_cls_attn=True)
        else:
            attn_out, cls_attn = self.attn(self.ln_1(x)), None
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, cls_attn


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))


@dataclass
class TeacherOutput:
    """What one teacher forward produces.

    Attributes:
        cls_attn: [B, T, P] float32, the last block's heads-averaged CLS-to-patch attention
            (softmax over all prefix + P keys, then the P patch columns; rows are not
            renormalised); None for a teacher with neither a CLS token nor an attention pool.
        streams: [B, T*P, L, W] the residual stream after each of the last L blocks, prefix
            tokens removed, tokens in t * P + p order, layers in ascending depth. Token-major,
            so that one row gather serves all L layers.
        num_frames: T.
    """

    cls_attn: torch.Tensor | None
    streams: torch.Tensor
    _teacher: nn.Module
    """The teacher: its ``project(rows [..., W]) -> [..., Ct]`` makes the targets."""
    num_frames: int = 0

    def targets(self, visible_idx_BN: torch.Tensor) -> torch.Tensor:
        """[B, N] int64 -> [L, B, N, Ct] L2-normalised targets, computed on those rows only."""
        B, TP, L, W = self.streams.shape
        rows_BNX = umt_kernels.gather_rows(self.streams.view(B, TP, L * W), visible_idx_BN)
        return self.project_rows(rows_BNX.view(B, -1, L, W))

    def project_rows(self, rows_BNLW: torch.Tensor) -> torch.Tensor:
        """Gathered residual-stream rows [B, N, L, W] -> [L, B, N, Ct] L2-normalised targets
        (``ln_post``, ``proj``, normalise: on those rows only)."""
        return self._teacher.project(rows_BNLW.permute(2, 0, 1, 3))


def frames_at(video_BCTHW: torch.Tensor, resolution: int) -> torch.Tensor:
    """[B, 3, T, H, W] -> [B*T, 3, R, R] frames, resized bicubically when H or W differ from R."""
    B, C, T, H, W = video_BCTHW.shape
    R = resolution
    if (H, W) != (R, R):
        video_BCTHW = F.interpolate(
            video_BCTHW.reshape(B, C * T, H, W), size=(R, R), mode="bicubic", align_corners=False
        ).view(B, C, T, R, R)
    return video_BCTHW.transpose(1, 2).reshape(B * T, C, R, R)


class CLIPVisionTeacher(nn.Module):
    """OpenAI CLIP visual tower as a per-frame video teacher (frozen, eval mode)."""

    def __init__(self, arch: TeacherArch):
        super().__init__()
        if arch.input_resolution % arch.patch_size:
            raise ValueError(
                f"teacher input_resolution {arch.input_resolution} is not divisible by patch size {arch.patch_size}"
            )
        if not 1 <= arch.return_layers <= arch.layers:
            raise ValueError(f"teacher return_layers={arch.return_layers} must be in [1, {arch.layers}]")
        self.arch = arch
        width, scale = arch.width, arch.width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=arch.patch_size, stride=arch.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(1 + arch.grid**2, width))
        self.ln_pre = LayerNormFP32(width, eps=CLIP_LN_EPS)
        self.transformer = Transformer(width, arch.layers, arch.heads)
        self.ln_post = LayerNormFP32(width, eps=CLIP_LN_EPS)
        self.proj = nn.Parameter(scale * torch.randn(width, arch.output_dim))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "CLIPVisionTeacher":
        return super().train(False)  # frozen: always in eval mode

    @property
    def compilable_blocks(self) -> list[nn.Module]:
        """The blocks `--train.compile blocks` compiles one by one."""
        return list(self.transformer.resblocks)

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """ln_post -> proj -> L2 on any [..., W] rows -> [..., Ct]."""
        x = self.ln_post(rows) @ self.proj.to(rows.dtype)
        return F.normalize(x, dim=-1)

    @torch.no_grad()
    def forward(self, video_BCTHW: torch.Tensor) -> TeacherOutput:
        """
        Args:
            video_BCTHW: [B, 3, T, H, W] the student's (ImageNet-normalised) clip; resized
                bicubically to the teacher's resolution here when H or W differ from it.
        """
        B, C, T = video_BCTHW.shape[:3]
        frames = frames_at(video_BCTHW, self.arch.input_resolution).to(self.conv1.weight.dtype)
        x = self.conv1(frames).flatten(2).transpose(1, 2)  # [B*T, P, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)

        blocks = self.transformer.resblocks
        first_tap = len(blocks) - self.arch.return_layers
        taps, cls_attn = [], None
        for i, block in enumerate(blocks):
            x, cls_attn = block(x, return_cls_attn=(i == len(blocks) - 1))
            if i >= first_tap:
                taps.append(x[:, 1:])
        P = x.shape[1] - 1
        streams = torch.stack(taps, dim=2).view(B, T * P, len(taps), -1)
        return TeacherOutput(cls_attn=cls_attn[:, 1:].reshape(B, T, P), streams=streams, _teacher=self, num_frames=T)


def resize_clip_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Bicubically resizes CLIP's [1 + g0*g0, W] position embedding to [1 + grid*grid, W].

    The CLS row is kept; the patch rows are viewed as a [1, W, g0, g0] image, resized with
    bicubic interpolation (align_corners=False) and flattened row-major behind it.
    """
    num_patches = pos_embed.shape[0] - 1
    old_grid = int(round(num_patches**0.5))
    if old_grid * old_grid != num_patches:
        raise ValueError(f"positional_embedding has {num_patches} patch rows, not a square grid")
    if old_grid == grid:
        return pos_embed
    cls_row, patch_rows = pos_embed[:1], pos_embed[1:]
    dtype = pos_embed.dtype
    work_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    img = patch_rows.to(work_dtype).reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False)
    patch_rows = img.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(dtype)
    return torch.cat([cls_row, patch_rows], dim=0)
