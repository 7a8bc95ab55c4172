"""Any timm ViT as the frozen image teacher, with the interface of the CLIP teacher.

timm implements the architecture; this module only runs it per frame and reads out what UMT
needs (`TeacherOutput`):

- ``cls_attn`` [B, T, P] from the LAST block, as the reference defines it for CLIP: the CLS
  query's softmax over all keys (CLS, registers and patches), averaged over heads, the P patch
  columns kept, not renormalised (`umt_kernels.cls_attention`, never a full attention matrix).
  A model without a CLS token but with an attention-pool head (SigLIP) uses the pool's probe
  query over the patch tokens after the final norm. A model with neither has no ``cls_attn``.
- ``targets(idx)`` [K, B, N, Ct]: each of the last K blocks' output at the given patch tokens,
  then the model's final norm, then its token projection where the family has one (CLIP's
  ``head``, timm's name for CLIP's ``proj``), then L2 normalisation; on those rows only.
- Pixels: CLIP-family teachers get the student's ImageNet-normalised clip as the reference feeds
  CLIP; every other family gets it re-normalised to the mean and std of its timm pretrained_cfg.

Supported: timm's ``VisionTransformer`` class (OpenAI / OpenCLIP CLIP, SigLIP and SigLIP2, DINOv2
with and without registers, InternViT, the other plain ViTs) and its ``Eva`` class (EVA02 /
EVA-CLIP, PE-core, DINOv3), whose rotary embedding timm applies itself: the CLS row is read from
the query and keys timm hands to scaled_dot_product_attention in the last block.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import umt_kernels
from umt_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from umt_fast.models.teacher import TeacherArch, TeacherOutput, frames_at


class _LastAttention(torch.overrides.TorchFunctionMode):
    """Records the query, keys and scale of the scaled_dot_product_attention calls made inside it
    (timm's attention after its q/k norms and rotary embedding), and runs them unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.q, self.k = args[0], args[1]
            self.scale = kwargs.get("scale") or args[0].shape[-1] ** -0.5
        return func(*args, **kwargs)

TIMM_PREFIX = "timm:"


def is_timm_arch(arch: str) -> bool:
    return arch.startswith(TIMM_PREFIX)


def create_timm_vit(arch: str, input_resolution: int, **timm_kwargs) -> nn.Module:
    """``timm:MODEL_NAME`` as a randomly initialised timm model at ``input_resolution`` (nothing is
    downloaded; ``timm_kwargs`` go to timm.create_model, e.g. a smaller depth); ValueError for an
    unknown name or an unsupported family."""
    import timm
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    name = arch[len(TIMM_PREFIX):]
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0].split('_')[0]}*")[:5]
        raise ValueError(f"teacher.arch={arch!r}: timm has no model {name!r}" + (f" (e.g. {', '.join(close)})" if close else ""))
    try:
        model = timm.create_model(name, pretrained=False, img_size=input_resolution, **timm_kwargs)
    except TypeError:  # not a ViT: no img_size
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
    if not isinstance(model, (VisionTransformer, Eva)):
        raise ValueError(f"teacher.arch={arch!r} is a timm {type(model).__name__}; timm teachers are ViTs of timm's "
                         "VisionTransformer (CLIP, SigLIP, DINOv2, InternViT) or Eva (EVA02, PE-core, DINOv3) classes")  # fmt: skip
    return model


class TimmVisionTeacher(nn.Module):
    """A timm VisionTransformer run per frame as a frozen video teacher (eval mode, no gradients).

    Args:
        model: the timm model (weights loaded), built at ``input_resolution``.
        name: its timm name (without ``timm:``), which decides the family's pixels and projection.
        input_resolution: the side its frames are resized to.
        return_layers: K, how many of its last blocks give targets.
    """

    def __init__(self, model: nn.Module, name: str, input_resolution: int, return_layers: int):
        super().__init__()
        self.model, self.name = model, name
        patch = model.patch_embed.patch_size[0]
        self.clip_family = "_clip_" in name
        # CLIP's head is its token projection (the reference's proj); other families' heads are
        # classifiers or Identity and are not used.
        self.proj = model.head if self.clip_family and isinstance(model.head, nn.Linear) else None
        width = model.embed_dim
        self.arch = TeacherArch(
            width=width, layers=len(model.blocks), heads=model.blocks[-1].attn.num_heads, patch_size=patch,
            output_dim=self.proj.out_features if self.proj is not None else width,
            input_resolution=input_resolution, return_layers=return_layers,
        )  # fmt: skip
        if not 1 <= return_layers <= self.arch.layers:
            raise ValueError(f"teacher return_layers={return_layers} must be in [1, {self.arch.layers}]")
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if not self.clip_family:
            cfg = model.pretrained_cfg
            mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
        # x_model = (x_imagenet * std_in + mean_in - mean) / std, per channel: one scale and shift
        scale = torch.tensor(IMAGENET_STD) / torch.tensor(std)
        shift = (torch.tensor(IMAGENET_MEAN) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("pixel_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_shift", shift.view(1, 3, 1, 1), persistent=False)
        self.has_cls_attn = model.cls_token is not None or getattr(model, "attn_pool", None) is not None
        self.rope = hasattr(model, "rope") or hasattr(model, "rope_mixed")  # timm's Eva class
        if hasattr(model.blocks[-1].attn, "fused_attn"):
            model.blocks[-1].attn.fused_attn = True  # the SDPA path, whose q and k are read for the CLS row
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "TimmVisionTeacher":
        return super().train(False)  # frozen: always in eval mode

    @property
    def compilable_blocks(self) -> list[nn.Module]:
        """The blocks `--train.compile blocks` compiles one by one: all but the last, which runs eagerly
        so that its attention's query and keys can be read."""
        return list(self.model.blocks[:-1])

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """final norm -> token projection (CLIP) -> L2 on any [..., W] rows -> [..., Ct]."""
        x = self.model.norm(rows)
        if self.proj is not None:
            x = self.proj(x)
        return F.normalize(x, dim=-1)

    def _probe_attention(self, x_NSW: torch.Tensor) -> torch.Tensor:
        """[N, P] the attention pool's probe query over the patch tokens (after the final norm)."""
        pool = self.model.attn_pool
        x = self.model.norm(x_NSW)
        if pool.pos_embed is not None:
            x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
        N, S, C = x.shape
        k = pool.kv(x).reshape(N, S, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4)[0]
        q = pool.q(pool.latent[:, :1]).reshape(1, 1, pool.num_heads, pool.head_dim).transpose(1, 2)
        q, k = pool.q_norm(q), pool.k_norm(k)
        return umt_kernels.cls_attention(q[:, :, 0].expand(N, -1, -1).contiguous(), k, scale=pool.scale)

    @torch.no_grad()
    def forward(self, video_BCTHW: torch.Tensor) -> TeacherOutput:
        """
        Args:
            video_BCTHW: [B, 3, T, H, W] the student's (ImageNet-normalised) clip; resized
                bicubically to the teacher's resolution here when H or W differ from it.
        """
        B, C, T = video_BCTHW.shape[:3]
        dtype = self.model.patch_embed.proj.weight.dtype
        frames = (frames_at(video_BCTHW, self.arch.input_resolution) * self.pixel_scale + self.pixel_shift).to(dtype)
        m = self.model
        rope = None
        if self.rope:  # Eva: the rotary embedding comes with the position embedding
            x, rope = m._pos_embed(m.patch_embed(frames))
            x = m.norm_pre(x)
        else:
            x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(frames))))
        prefix = m.num_prefix_tokens
        first_tap = len(m.blocks) - self.arch.return_layers
        taps, cls_attn = [], None
        for i, block in enumerate(m.blocks):
            kwargs = {} if rope is None else {"rope": rope[i] if getattr(m, "rope_mixed", False) else rope}
            if i == len(m.blocks) - 1 and m.cls_token is not None:
                with _LastAttention() as last:
                    x = block(x, **kwargs)
                cls_attn = umt_kernels.cls_attention(last.q[:, :, 0], last.k, scale=last.scale)[:, prefix:]
            else:
                x = block(x, **kwargs)
            if i >= first_tap:
                taps.append(x[:, prefix:])
        if cls_attn is None and getattr(m, "attn_pool", None) is not None:
            cls_attn = self._probe_attention(x[:, prefix:])
        P = x.shape[1] - prefix
        streams = torch.stack(taps, dim=2).view(B, T * P, len(taps), -1)
        cls_attn = None if cls_attn is None else cls_attn.float().reshape(B, T, P)
        return TeacherOutput(cls_attn=cls_attn, streams=streams, _teacher=self, num_frames=T)
