"""The dense video ViT of fine-tuning, evaluation and feature extraction.

Unlike the sparse stage-1 student, it runs on ALL tokens of a clip (no masking). Parameter
names follow the reference's fine-tuning model (``patch_embed.proj.*``, ``blocks.{i}.*``,
``fc_norm.*``, ``head.*``, ``pos_embed``), so its fine-tuned files load with no renaming and
our files load in the reference code. The blocks are the student's, so a stage-1 encoder's
weights drop in one for one.

Two heads on top of the same backbone (UMT_SPEC.md section 3):

* classifier (``num_classes > 0``): mean pool over tokens -> ``fc_norm`` LayerNorm ->
  dropout -> Linear, as the reference's ``use_mean_pooling`` model (whose final ``norm`` is
  then an identity);
* encoder (``num_classes == 0``, ``final_norm=True``): the stage-1 encoder's final ``norm``
  on every token; ``pooled`` is the mean of those tokens.

and two frozen-feature probes (``probe``), whose backbone (patch embedding, blocks, ``norm``)
is frozen (``requires_grad`` False, no drop path) and whose head alone trains:

* ``linear``: mean pool of the backbone's tokens -> dropout -> Linear (``head.*``);
* ``attentive``: `AttentivePooler` (``probe.*``: learned queries cross-attending to the tokens,
  then an MLP, as V-JEPA's attentive probe) -> the mean over its queries -> dropout -> Linear.

Shape legend: B clips, T frames, H = W = img_size, p patch, P = (H/p)^2 patches per frame,
N = T*P tokens, D width, K classes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from umt_fast.models.attention import multi_head_attention
from umt_fast.models.student import HEAD_DROPOUT_SEED_OFFSET, LN_EPS, Block, Mlp, sincos_table
from umt_kernels.rng import uniform_noise

PRETRAIN_FRAMES = 8
"""Frames (= token frames, tubelet 1) of the reference's pre-training clips: the temporal size
of the fixed table its fine-tuning model starts from."""


def pretrain_grid(patch_size: int) -> int:
    """Side of the patch grid of the reference's pre-training clips, for which its fine-tuning
    model builds the fixed table: 14 (224 px / 16, the table's 1568 = 8 x 14 x 14 rows), or 16
    for patch 14 (its ``pre_n_position`` 2048 = 8 x 16 x 16)."""
    return 16 if patch_size == 14 else 14


def resize_pos_time(table_1NC: torch.Tensor, frames: int, new_frames: int) -> torch.Tensor:
    """[1, frames * P, C] -> [1, new_frames * P, C]: every (position, channel) row resized
    linearly over time, align_corners=False, in the table's dtype (the reference's ops)."""
    C = table_1NC.shape[-1]
    x_PCT = table_1NC.reshape(1, frames, -1, C).permute(0, 2, 3, 1).reshape(-1, C, frames)
    x_PCT = F.interpolate(x_PCT, size=new_frames, mode="linear", align_corners=False)
    return x_PCT.reshape(1, -1, C, new_frames).permute(0, 3, 1, 2).reshape(1, -1, C)


def resize_pos_space(table_1NC: torch.Tensor, grid: int, new_grid: int) -> torch.Tensor:
    """[1, T * grid^2, C] -> [1, T * new_grid^2, C]: every frame's grid x grid table resized
    bicubically, align_corners=False, in the table's dtype (the reference's ops)."""
    C = table_1NC.shape[-1]
    x_TCgg = table_1NC.contiguous().reshape(-1, grid, grid, C).permute(0, 3, 1, 2)
    x_TCgg = F.interpolate(x_TCgg, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return x_TCgg.permute(0, 2, 3, 1).reshape(1, -1, C)


def finetune_pos_table(num_frames: int, grid: int, width: int, patch_size: int = 16) -> torch.Tensor:
    """The reference fine-tuning model's fixed position table [1, num_frames * grid^2, width], float32.

    The 1-D sin-cos table of the pre-training clip's length (8 x 14 x 14 = 1568 rows; see
    `pretrain_grid`), rounded to float32, then, in float32, resized bicubically in space when
    ``grid`` differs from the pre-training grid and after that linearly in time when
    ``num_frames`` is not 8. At the pre-training size it is the plain 1568-row table.
    """
    grid0 = pretrain_grid(patch_size)
    table_1NC = sincos_table(PRETRAIN_FRAMES * grid0**2, width)[None]
    if grid != grid0:
        table_1NC = resize_pos_space(table_1NC, grid0, grid)
    if num_frames != PRETRAIN_FRAMES:
        table_1NC = resize_pos_time(table_1NC, PRETRAIN_FRAMES, num_frames)
    return table_1NC.contiguous()


HEAD_INIT_SCALE = 0.001
"""The reference's ``init_scale``: the head's trunc-normal(std .02) weights and bias are
multiplied by it, so fine-tuning starts from near-uniform predictions."""


def head_dropout_scales(
    drop_prob: float, batch_size: int, width: int, *, seed: int, offset: int | torch.Tensor, first_clip: int,
    device: torch.device,
) -> torch.Tensor:
    """Dropout factors before the classification head, from counter-based noise.

    Feature d of clip b is kept when u >= ``drop_prob``, with u the uniform of counter
    (first_clip + b, d) under the key (seed + 2 * 2**32, offset): a function of the clip's
    global index in the step's batch, so the draws do not depend on the number of ranks.

    Returns:
        [B, D] float32: 0 for a dropped feature, 1 / (1 - drop_prob) for a kept one.
    """
    u_BD = uniform_noise((batch_size, width), seed=seed + HEAD_DROPOUT_SEED_OFFSET, offset=offset,
                         row_offset=first_clip, device=device)
    return (u_BD >= drop_prob).float() / (1.0 - drop_prob)


@dataclass(frozen=True)
class VideoViTArch:
    """Everything that fixes the dense ViT's parameter shapes and token grid."""

    width: int
    depth: int
    heads: int
    num_frames: int = 8
    img_size: int = 224
    patch_size: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 0
    """0 = no classification head (an encoder)."""
    final_norm: bool = False
    """Apply the encoder's final LayerNorm (``norm``) to every token (encoder use)."""
    drop_path: float = 0.0
    """Stochastic depth of the last block, linear from 0 over the blocks."""
    head_dropout: float = 0.0
    """Dropout before the classification head (the reference's ``fc_drop_rate``)."""
    probe: str = "none"
    """``none`` (the classifier above), or a frozen backbone under a ``linear`` or ``attentive``
    probe head (see the module's docstring); a probe needs ``num_classes > 0`` and no drop path."""
    probe_queries: int = 1
    """Learned queries of the attentive probe."""
    probe_heads: int = 0
    """Attention heads of the attentive probe (0 = the backbone's ``heads``)."""

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.num_frames * self.grid**2

    def to_dict(self) -> dict:
        return asdict(self)


PROBES = ("none", "linear", "attentive")
"""The heads a `VideoViT` can have on its backbone: the fine-tuned classifier or a frozen probe."""

BACKBONE_PREFIXES = ("patch_embed.", "pos_embed", "blocks.", "norm.")
"""The parameter and buffer names of the backbone; a probe freezes all of it."""


class AttentivePooler(nn.Module):
    """Learned queries that read a clip's tokens by cross-attention (V-JEPA's attentive probe,
    depth 1: one cross-attention block, no self-attention blocks).

    ``q = query + attn(q_proj(query), kv_proj(LN(tokens)))``, multi-head, without an output
    projection; then ``q = q + MLP(LN(q))``. Parameters: ``query`` [1, Q, D], ``norm1`` (the
    tokens' LayerNorm), ``q`` (Linear D -> D), ``kv`` (Linear D -> 2D, keys then values),
    ``norm2`` and ``mlp`` (``fc1``, ``fc2``). Init: trunc-normal(.02) queries and weights, zero
    biases, ``mlp.fc2`` scaled by 1 / sqrt(2) (V-JEPA's).
    """

    def __init__(self, width: int, heads: int, num_queries: int = 1, mlp_ratio: float = 4.0):
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"the attentive probe's width {width} does not divide into {heads} heads")
        if num_queries < 1:
            raise ValueError(f"the attentive probe needs at least one query, got {num_queries}")
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, num_queries, width))
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.query, std=0.02)
        with torch.no_grad():
            self.mlp.fc2.weight.div_(2**0.5)

    def forward(self, tokens_BND: torch.Tensor) -> torch.Tensor:
        """[B, N, D] tokens -> [B, Q, D], one row per query."""
        B, N, D = tokens_BND.shape
        H = self.heads
        query_BQD = self.query.to(tokens_BND.dtype).expand(B, -1, -1)
        Q = query_BQD.shape[1]
        q_BHQd = self.q(query_BQD).view(B, Q, H, D // H).transpose(1, 2)
        k_BHNd, v_BHNd = self.kv(self.norm1(tokens_BND)).view(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        read_BQD = multi_head_attention(q_BHQd, k_BHNd, v_BHNd).transpose(1, 2).reshape(B, Q, D)
        out_BQD = query_BQD + read_BQD
        return out_BQD + self.mlp(self.norm2(out_BQD))


class VideoViT(nn.Module):
    """Dense video ViT with an optional mean-pool classification head.

    ``forward(video_BCTHW)`` returns logits [B, K] (or the pooled features [B, D] when
    ``num_classes == 0``). ``pos_embed`` [1, N, D] is a saved buffer: at construction the
    reference's fixed table (`finetune_pos_table`: the pre-training clip's 1568-row sin-cos
    table resized to T x g x g), or a (resized) table loaded from a file.
    """

    def __init__(self, arch: VideoViTArch):
        super().__init__()
        if arch.img_size % arch.patch_size:
            raise ValueError(f"img_size {arch.img_size} is not a multiple of patch_size {arch.patch_size}")
        if arch.probe not in PROBES:
            raise ValueError(f"probe {arch.probe!r} is not one of {', '.join(PROBES)}")
        if arch.probe != "none" and (arch.num_classes < 1 or arch.drop_path > 0):
            raise ValueError("a probe needs a head (num_classes > 0) and a backbone without drop path (it is frozen)")
        self.arch = arch
        self.patch_embed = nn.Module()
        p = arch.patch_size
        self.patch_embed.proj = nn.Conv3d(3, arch.width, kernel_size=(1, p, p), stride=(1, p, p))
        self.register_buffer("pos_embed", finetune_pos_table(arch.num_frames, arch.grid, arch.width, p))
        drop_rates = np.linspace(0, arch.drop_path, arch.depth).tolist()
        self.blocks = nn.ModuleList(Block(arch.width, arch.heads, arch.mlp_ratio, r) for r in drop_rates)
        self.norm = nn.LayerNorm(arch.width, eps=LN_EPS) if arch.final_norm else nn.Identity()
        if arch.num_classes > 0:
            if arch.probe == "none":
                self.fc_norm = nn.LayerNorm(arch.width, eps=LN_EPS)
            self.head_dropout = nn.Dropout(arch.head_dropout)
            self.head = nn.Linear(arch.width, arch.num_classes)
        self.checkpoint_blocks = 0
        self.apply(_init_weights)
        if arch.probe == "attentive":  # after the apply: the pooler's own init
            self.probe = AttentivePooler(arch.width, arch.probe_heads or arch.heads, arch.probe_queries, arch.mlp_ratio)
        if arch.num_classes > 0:
            with torch.no_grad():
                self.head.weight.mul_(HEAD_INIT_SCALE)
                self.head.bias.mul_(HEAD_INIT_SCALE)
        if arch.probe != "none":
            for param in self.backbone_parameters():
                param.requires_grad_(False)

    # -- timm-style surface ------------------------------------------------------------------

    def set_grad_checkpointing(self, enable: bool = True, num_blocks: int | None = None) -> None:
        """Recompute the first ``num_blocks`` blocks (all when None) in the backward pass
        instead of keeping their activations (torch.utils.checkpoint, one call per block)."""
        self.checkpoint_blocks = (self.arch.depth if num_blocks is None else num_blocks) if enable else 0

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The parameters of the patch embedding, the blocks and the final norm (a probe's frozen part)."""
        return [p for name, p in self.named_parameters() if name.startswith(BACKBONE_PREFIXES)]

    def no_weight_decay(self) -> set[str]:
        """Parameter names AdamW must not decay (besides every 1-D parameter and bias)."""
        return {"pos_embed"}

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay: 0 for the patch embedding, i + 1 for
        block i, depth + 1 for the norms and the head (the reference's ``get_num_layer``)."""
        if name.startswith(("patch_embed.", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.arch.depth + 1

    # -- forward -----------------------------------------------------------------------------

    @property
    def drop_probs(self) -> list[float]:
        return [block.drop_prob for block in self.blocks]

    def forward_features(self, video_BCTHW: torch.Tensor, drop_scales_LB2: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 3, T, H, W] normalised pixels -> [B, N, D] tokens (after ``norm``), N in t*P + p order.

        ``drop_scales_LB2``: [depth, B, 2] drop-path factors (umt_fast.models.student.drop_path_scales),
        used in training mode; None draws drop path from torch's generator.
        """
        _, _, T, H, W = video_BCTHW.shape
        if (T, H, W) != (self.arch.num_frames, self.arch.img_size, self.arch.img_size):
            raise ValueError(
                f"clip of {T} frames at {H}x{W} px, but the model is built for {self.arch.num_frames} frames at "
                f"{self.arch.img_size}x{self.arch.img_size}"
            )
        x = self.patch_embed.proj(video_BCTHW.to(self.patch_embed.proj.weight.dtype))  # [B, D, T, g, g]
        x = x.flatten(2).transpose(1, 2)
        x = x + self.pos_embed.to(x.dtype)
        for i, block in enumerate(self.blocks):
            scales = drop_scales_LB2[i] if drop_scales_LB2 is not None and self.training and block.drop_prob > 0 else None
            if i < self.checkpoint_blocks and torch.is_grad_enabled():  # given factors, the block draws nothing
                x = torch.utils.checkpoint.checkpoint(
                    block, x, scales, use_reentrant=False, preserve_rng_state=drop_scales_LB2 is None
                )
            else:
                x = block(x, scales)
        return self.norm(x)

    def forward_head(
        self, tokens_BND: torch.Tensor, pre_logits: bool = False, head_scales_BD: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, N, D] -> logits [B, K]; with ``pre_logits`` (or no head) the pooled [B, D].

        Pooling: the mean of the tokens, through ``fc_norm`` for the classifier; a linear probe's
        plain mean; an attentive probe's pooler, its queries averaged.

        ``head_scales_BD``: [B, D] dropout factors before the head (:func:`head_dropout_scales`),
        used in training mode; None draws the dropout from torch's generator.
        """
        if self.arch.probe == "attentive":
            pooled_BD = self.probe(tokens_BND).mean(dim=1)
        else:
            pooled_BD = tokens_BND.mean(dim=1)
        if self.arch.num_classes == 0:
            return pooled_BD
        if self.arch.probe == "none":
            pooled_BD = self.fc_norm(pooled_BD)
        if pre_logits:
            return pooled_BD
        if head_scales_BD is not None and self.training:
            return self.head(pooled_BD * head_scales_BD.to(pooled_BD.dtype))
        return self.head(self.head_dropout(pooled_BD))

    def forward(
        self, video_BCTHW: torch.Tensor, drop_scales_LB2: torch.Tensor | None = None,
        head_scales_BD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        tokens_BND = self.forward_features(video_BCTHW, drop_scales_LB2)
        return self.forward_head(tokens_BND, head_scales_BD=head_scales_BD)

    def embed(self, video_BCTHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(clip embedding [B, D], per-token features [B, N, D]).

        The embedding is the head's input: the mean of the tokens, through ``fc_norm`` for a
        classifier, a probe's pooled features; the tokens are the final-normed ones for an
        encoder (and a probe of one) and the last block's output for a classifier (whose
        ``norm`` is an identity).
        """
        tokens_BND = self.forward_features(video_BCTHW)
        return self.forward_head(tokens_BND, pre_logits=True), tokens_BND


def _init_weights(module: nn.Module) -> None:
    """The reference fine-tuning model's init (what a model without ``--init`` starts from)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
