"""An independent, literal re-statement of the reference UMT stage-1 forward.

Written the way the reference code computes it (full Conv3d patch embedding, boolean
masks, ``nn.MultiheadAttention(need_weights=True)`` in the teacher, explicit softmax in the
student), in float64 where tests ask for it. Our engine must match these outputs.
It reads the same state dicts (reference key names), so tests can compare
weight-for-weight.
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F


def sinusoid_table(n_position: int, d_hid: int) -> torch.Tensor:
    def angle_vec(position):
        return [position / np.power(10000, 2 * (hid_j // 2) / d_hid) for hid_j in range(d_hid)]

    table = np.array([angle_vec(p) for p in range(n_position)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.tensor(table, dtype=torch.float).unsqueeze(0)


def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def student_forward(sd: dict, video_BCTHW: torch.Tensor, mask_BN: torch.Tensor, heads: int) -> torch.Tensor:
    """mask_BN: bool, True = masked. Returns [K, B, N_vis, Ct]."""
    dtype = video_BCTHW.dtype
    sd = {k: v.to(dtype) for k, v in sd.items()}
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.blocks\.(\d+)\.", k))})
    K = len({int(m.group(1)) for k in sd if (m := re.match(r"clip_decoder\.(\d+)\.", k))})
    w = sd["encoder.patch_embed.proj.weight"]
    x = F.conv3d(video_BCTHW, w, sd["encoder.patch_embed.proj.bias"], stride=w.shape[2:])
    x = x.flatten(2).transpose(1, 2)
    B, N, C = x.shape
    x = x + sinusoid_table(N, C).to(dtype)
    x_vis = x[~mask_BN].reshape(B, -1, C)
    return_index = [depth - i - 1 for i in range(K)]
    taps = []
    for i in range(depth):
        p = f"encoder.blocks.{i}"
        h = _ln(x_vis, sd, p + ".norm1", 1e-6)
        qkv_bias = torch.cat([sd[p + ".attn.q_bias"], torch.zeros_like(sd[p + ".attn.v_bias"]), sd[p + ".attn.v_bias"]])
        qkv = F.linear(h, sd[p + ".attn.qkv.weight"], qkv_bias)
        Bq, Nq, _ = qkv.shape
        qkv = qkv.reshape(Bq, Nq, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * (C // heads) ** -0.5
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(Bq, Nq, -1)
        x_vis = x_vis + F.linear(h, sd[p + ".attn.proj.weight"], sd[p + ".attn.proj.bias"])
        h = _ln(x_vis, sd, p + ".norm2", 1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[p + ".mlp.fc1.weight"], sd[p + ".mlp.fc1.bias"])),
                     sd[p + ".mlp.fc2.weight"], sd[p + ".mlp.fc2.bias"])
        x_vis = x_vis + h
        if i in return_index:
            taps.append(x_vis)
    x_clip_vis = _ln(torch.stack(taps), sd, "encoder.norm", 1e-6)
    clip_pos = sinusoid_table(N, C).to(dtype).repeat(B, 1, 1)
    x_clip = x_clip_vis + clip_pos[~mask_BN].view(B, -1, C).unsqueeze(0)
    outs = []
    for k in range(K):
        y = F.linear(x_clip[k], sd[f"clip_decoder.{k}.head.weight"], sd[f"clip_decoder.{k}.head.bias"])
        y = _ln(y, sd, f"clip_decoder.{k}.norm", 1e-6)
        outs.append(y / y.norm(dim=-1, keepdim=True))
    return torch.stack(outs)


def teacher_forward(sd: dict, video_BCTHW: torch.Tensor, input_resolution: int, return_layers: int):
    """CLIP visual state dict (no ``visual.``), pos embedding already at the right grid.

    Returns (targets_full [K, B, T*P, Ct] L2-normalised, attn [B*T, P] heads-averaged CLS row).
    """
    dtype = video_BCTHW.dtype
    sd = {k: v.to(dtype) for k, v in sd.items()}
    B, C, T, H, W = video_BCTHW.shape
    if H != input_resolution:
        video_BCTHW = F.interpolate(video_BCTHW.view(B, C * T, H, W), size=(input_resolution, input_resolution),
                                    mode="bicubic", align_corners=False).view(B, C, T, input_resolution, input_resolution)
    width = sd["conv1.weight"].shape[0]
    heads = width // 64
    layers = len({int(m.group(1)) for k in sd if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    x = video_BCTHW.permute(0, 2, 1, 3, 4).reshape(B * T, C, input_resolution, input_resolution)
    x = F.conv2d(x, sd["conv1.weight"], stride=sd["conv1.weight"].shape[-1])
    x = x.reshape(B * T, width, -1).permute(0, 2, 1)
    x = torch.cat([sd["class_embedding"] + torch.zeros(x.shape[0], 1, width, dtype=dtype), x], dim=1)
    x = x + sd["positional_embedding"]
    x = _ln(x, sd, "ln_pre", 1e-5)
    x = x.permute(1, 0, 2)  # LND, as CLIP does
    mha = torch.nn.MultiheadAttention(width, heads).to(dtype)
    taps = []
    attn = None
    for i in range(layers):
        p = f"transformer.resblocks.{i}"
        mha.load_state_dict({
            "in_proj_weight": sd[p + ".attn.in_proj_weight"], "in_proj_bias": sd[p + ".attn.in_proj_bias"],
            "out_proj.weight": sd[p + ".attn.out_proj.weight"], "out_proj.bias": sd[p + ".attn.out_proj.bias"],
        })
        h = _ln(x, sd, p + ".ln_1", 1e-5)
        if i == layers - 1:
            h, attn = mha(h, h, h, need_weights=True, average_attn_weights=True)
        else:
            h = mha(h, h, h, need_weights=False)[0]
        x = x + h
        h = _ln(x, sd, p + ".ln_2", 1e-5)
        h = F.linear(h, sd[p + ".mlp.c_fc.weight"], sd[p + ".mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)
        x = x + F.linear(h, sd[p + ".mlp.c_proj.weight"], sd[p + ".mlp.c_proj.bias"])
        if i >= layers - return_layers:
            taps.append(x)
    z = torch.stack(taps)  # [K, L, BT, W]
    z = _ln(z[:, 1:], sd, "ln_post", 1e-5) @ sd["proj"]
    K, HW, BT, Ct = z.shape
    z = z.reshape(K, HW, B, T, Ct).permute(0, 2, 3, 1, 4).reshape(K, B, T * HW, Ct)
    z = z / z.norm(dim=-1, keepdim=True)
    return z, attn[:, 0, 1:]


def random_student_state_dict(width, depth, heads, K, teacher_dim, patch=16, seed=0, mlp_ratio=4):
    """Random weights in the reference's stage-1 naming (biases non-zero, so bugs show)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.05):
        return torch.randn(*shape, generator=g) * s

    sd = {"encoder.patch_embed.proj.weight": r(width, 3, 1, patch, patch), "encoder.patch_embed.proj.bias": r(width)}
    hidden = int(width * mlp_ratio)
    for i in range(depth):
        p = f"encoder.blocks.{i}"
        sd.update({
            p + ".norm1.weight": 1 + r(width), p + ".norm1.bias": r(width),
            p + ".attn.qkv.weight": r(3 * width, width), p + ".attn.q_bias": r(width), p + ".attn.v_bias": r(width),
            p + ".attn.proj.weight": r(width, width), p + ".attn.proj.bias": r(width),
            p + ".norm2.weight": 1 + r(width), p + ".norm2.bias": r(width),
            p + ".mlp.fc1.weight": r(hidden, width), p + ".mlp.fc1.bias": r(hidden),
            p + ".mlp.fc2.weight": r(width, hidden), p + ".mlp.fc2.bias": r(width),
        })
    sd.update({"encoder.norm.weight": 1 + r(width), "encoder.norm.bias": r(width)})
    for k in range(K):
        sd.update({
            f"clip_decoder.{k}.head.weight": r(teacher_dim, width), f"clip_decoder.{k}.head.bias": r(teacher_dim),
            f"clip_decoder.{k}.norm.weight": 1 + r(teacher_dim), f"clip_decoder.{k}.norm.bias": r(teacher_dim),
        })
    return sd


def random_clip_visual_state_dict(width, layers, patch, output_dim, grid, seed=0):
    """Random weights in OpenAI CLIP's visual naming (no ``visual.`` prefix)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.05):
        return torch.randn(*shape, generator=g) * s

    sd = {
        "conv1.weight": r(width, 3, patch, patch),
        "class_embedding": r(width, s=0.5),
        "positional_embedding": r(1 + grid * grid, width, s=0.5),
        "ln_pre.weight": 1 + r(width), "ln_pre.bias": r(width),
        "ln_post.weight": 1 + r(width), "ln_post.bias": r(width),
        "proj": r(width, output_dim, s=width**-0.5),
    }
    for i in range(layers):
        p = f"transformer.resblocks.{i}"
        sd.update({
            p + ".ln_1.weight": 1 + r(width), p + ".ln_1.bias": r(width),
            p + ".attn.in_proj_weight": r(3 * width, width, s=0.15), p + ".attn.in_proj_bias": r(3 * width),
            p + ".attn.out_proj.weight": r(width, width), p + ".attn.out_proj.bias": r(width),
            p + ".ln_2.weight": 1 + r(width), p + ".ln_2.bias": r(width),
            p + ".mlp.c_fc.weight": r(4 * width, width), p + ".mlp.c_fc.bias": r(4 * width),
            p + ".mlp.c_proj.weight": r(width, 4 * width), p + ".mlp.c_proj.bias": r(width),
        })
    return sd


def bool_mask_from_indices(visible_idx_BN: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """True = masked, as the reference's masks are."""
    mask = torch.ones(visible_idx_BN.shape[0], num_tokens, dtype=torch.bool)
    mask.scatter_(1, visible_idx_BN, False)
    return mask
