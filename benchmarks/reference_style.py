"""The same stage-1 step computed the way the reference system computes it: the baseline row
of the throughput suite.

Same weights and the same function as umt_fast's step, but: fp16 autocast with a GradScaler;
``nn.MultiheadAttention``-style attention in the teacher with the full attention matrix
materialised (``need_weights=True``) in the last block to read the CLS row; masks drawn with
``torch.multinomial`` and built as a boolean mask on the host; ``ln_post``/``proj`` on every
teacher token before the boolean gather; the student's patch embedding on every patch, then
boolean indexing; hand-written softmax attention in the student; no compile; unfused AdamW.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from umt_fast.data.transforms import normalize_video
from umt_fast.models.student import SparseVideoStudent
from umt_fast.models.teacher import CLIPVisionTeacher


def _clip_layer_norm(ln: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """CLIP's LayerNorm as the reference runs it: cast to fp32, normalise, cast back."""
    return F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps).to(x.dtype)


_CLIP_MLP_WEIGHTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[torch.Tensor, ...]]" = weakref.WeakKeyDictionary()


def clip_mlp(block, x: torch.Tensor) -> torch.Tensor:
    """CLIP's MLP as the reference writes it: c_fc, the literal QuickGELU x * sigmoid(1.702 x)
    (three elementwise passes), c_proj; on CLIP's own weights (the block's, unfolded once)."""
    if block not in _CLIP_MLP_WEIGHTS:
        sd = block.state_dict()
        _CLIP_MLP_WEIGHTS[block] = tuple(sd[f"mlp.{k}"] for k in ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"))
    w1, b1, w2, b2 = (t.to(x.dtype) for t in _CLIP_MLP_WEIGHTS[block])
    h = F.linear(x, w1, b1)
    return F.linear(h * torch.sigmoid(1.702 * h), w2, b2)


def teacher_block_forward(block, x: torch.Tensor) -> torch.Tensor:
    """One teacher block as the reference writes it: fp32-upcast LayerNorms and the literal
    QuickGELU MLP (three elementwise passes) around the same attention. [B, S, W] -> [B, S, W]."""
    x = x + block.attn(_clip_layer_norm(block.ln_1, x))
    return x + clip_mlp(block, _clip_layer_norm(block.ln_2, x))


def _teacher_forward(teacher: CLIPVisionTeacher, video: torch.Tensor):
    """-> (targets of every token [L, B, T*P, Ct], CLS attention [B*T, P])."""
    B, C, T, H, W = video.shape
    R = teacher.arch.input_resolution
    if H != R:
        video = F.interpolate(video.reshape(B, C * T, H, W), size=(R, R), mode="bicubic", align_corners=False).view(B, C, T, R, R)
    x = teacher.conv1(video.transpose(1, 2).reshape(B * T, C, R, R)).flatten(2).transpose(1, 2)
    x = torch.cat([teacher.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
    x = _clip_layer_norm(teacher.ln_pre, x + teacher.positional_embedding.to(x.dtype))
    blocks = teacher.transformer.resblocks
    taps, attn_row = [], None
    for i, block in enumerate(blocks):
        h = _clip_layer_norm(block.ln_1, x)
        if i == len(blocks) - 1:  # need_weights=True: the whole [S, S] matrix, averaged over heads
            q, k, v = block.attn._qkv(h)
            weights = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), dim=-1)
            out = (weights @ v).transpose(1, 2).reshape(h.shape)
            attn_row = weights.mean(dim=1)[:, 0, 1:]
            x = x + block.attn.out_proj(out)
        else:
            x = x + block.attn(h)
        x = x + clip_mlp(block, _clip_layer_norm(block.ln_2, x))
        if i >= len(blocks) - teacher.arch.return_layers:
            taps.append(x[:, 1:])
    z = torch.stack(taps)  # ln_post and proj on every token
    z = _clip_layer_norm(teacher.ln_post, z) @ teacher.proj.to(z.dtype)
    z = z / z.norm(dim=-1, keepdim=True)
    L, BT, P, Ct = z.shape
    return z.reshape(L, B, T * P, Ct), attn_row


def _host_mask(attn_GP: torch.Tensor, num_visible: int, batch: int) -> torch.Tensor:
    """torch.multinomial on the device, the boolean mask assembled on the host (a round trip)."""
    G, P = attn_GP.shape
    importance = torch.multinomial(attn_GP.float(), P)
    mask = torch.ones(G, P)
    rows = torch.arange(G).view(-1, 1).repeat(1, num_visible)
    mask[rows, importance[:, :num_visible].cpu()] = 0
    return mask.view(batch, -1).to(torch.bool).to(attn_GP.device)


def _student_forward(student: SparseVideoStudent, video: torch.Tensor, mask_BN: torch.Tensor) -> torch.Tensor:
    enc = student.encoder
    x = enc.patch_embed.proj(video).flatten(2).transpose(1, 2)  # every patch
    x = x + enc.pos_embed.to(x.dtype)
    B, _, C = x.shape
    x = x[~mask_BN].reshape(B, -1, C)
    taps = []
    for i, block in enumerate(enc.blocks):
        h = block.norm1(x)
        attn = block.attn
        qkv_bias = torch.cat([attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias])
        qkv = F.linear(h, attn.qkv.weight, qkv_bias).reshape(B, -1, 3, attn.heads, C // attn.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (C // attn.heads) ** -0.5, qkv[1], qkv[2]
        h = (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        x = x + block.drop_path(attn.proj(h.transpose(1, 2).reshape(B, -1, C)))
        x = x + block.drop_path(block.mlp(block.norm2(x)))
        if i >= enc.arch.depth - enc.arch.return_layers:
            taps.append(x)
    taps = enc.norm(torch.stack(taps))
    clip_pos = student.clip_pos_embed.to(taps.dtype).expand(B, -1, -1)[~mask_BN].view(B, -1, C)
    taps = taps + clip_pos
    return torch.stack([head(taps[i]) for i, head in enumerate(student.clip_decoder)])


class ReferenceStyleStep:
    """``(video uint8 [B, T, H, W, 3], step) -> loss``, computed the reference's way."""

    def __init__(self, student: SparseVideoStudent, teacher: CLIPVisionTeacher, mask_ratio: float, device: torch.device):
        self.student, self.teacher, self.device = student, teacher, device
        self.on_gpu = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        self.scaler = torch.amp.GradScaler("cuda") if self.on_gpu else None
        P = student.arch.patches_per_frame
        self.num_visible = P - int(P * mask_ratio)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.on_gpu)

    def __call__(self, video_BTHWC: torch.Tensor, step: int) -> torch.Tensor:
        video = normalize_video(video_BTHWC.to(self.device))
        B = video.shape[0]
        with torch.no_grad(), self._autocast():
            targets_full, attn = _teacher_forward(self.teacher, video)
            mask = _host_mask(attn, self.num_visible, B)
            L, _, _, Ct = targets_full.shape
            targets = targets_full[:, ~mask].reshape(L, B, -1, Ct)
        with self._autocast():
            out = _student_forward(self.student, video, mask)
            loss = (2 - 2 * (out.float() * targets.float()).sum(dim=-1)).mean()
        self.optimizer.zero_grad()
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return loss.detach()
