"""The stage-2 model: the stage-1 student (encoder + alignment heads) with ``pool_norm``, the
text tower, the VTC projections and temperature, and the VTM head; and the mapping between its
state dict and the reference's stage-2 checkpoint keys (UMT_SPEC.md section 4).

Vision features, for one clip of N visible tokens:
    tokens [B, N, D] = the student's last block, through its final LayerNorm (``encoder.norm``);
    pooled = pool_norm(mean over tokens); vision_feat = L2(vision_proj(pooled))  (VTC);
    the tokens are what the fusion layers cross-attend to (VTM, MLM);
    the alignment heads (``clip_decoder``) on the last K blocks give the UTA outputs.
Images are 1-frame clips of the same student: the first P rows of its 1-D sin-cos table (t = 0)
are exactly a 1-frame table at the image grid, so no separate table is needed.

Shape legend: B pairs, T frames, P patches per frame, N visible tokens, D vision width,
H text width, S text tokens, E embedding dim, L aligned layers, Ct teacher dim.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from umt_fast.losses import alignment_loss
from umt_fast.models.student import LN_EPS, SparseVideoStudent
from umt_fast.losses import vl as L
from umt_fast.models.text import TextArch, TextEncoder, from_reference_keys, to_reference_keys

TEMP_INIT = 0.07
HEAD_NORM_EPS = 1e-5
"""The alignment heads' LayerNorm eps in stage 2 (the reference's stage-2 ``Linear_Decoder`` uses
``nn.LayerNorm``'s default; stage 1's heads use 1e-6)."""


@dataclass
class VLBatch:
    """One step's inputs on the device (everything the forward needs besides the teacher)."""

    video: torch.Tensor  # [B, 3, T, H, W] normalised
    visible_idx: torch.Tensor  # [B, N] int64 ascending
    targets: torch.Tensor  # [L, B, N, Ct] the teacher's unit targets
    text_ids: torch.Tensor  # [B, S]
    text_mask: torch.Tensor  # [B, S] 0/1
    mlm_ids: torch.Tensor  # [B, S] masked copy of text_ids
    mlm_labels: torch.Tensor  # [B, S] original id where masked, -100 elsewhere
    ids: torch.Tensor  # [B] int64 media ids (same id = same video or image)
    # [depth, B, 2] the student's drop-path factors (umt_fast.models.student.drop_path_scales);
    # None = drawn from torch's generator
    drop_scales: torch.Tensor | None = None
    # [2, B, K] the hard-negative uniforms (losses.hard_negative_noise), K the group size;
    # None = one group of the B pairs, drawn from torch's generator
    negative_noise: torch.Tensor | None = None


class VisionLanguageModel(nn.Module):
    """UMT stage 2: ``student`` (stage-1 SparseVideoStudent), ``pool_norm``, ``text_encoder``,
    ``vision_proj``, ``text_proj``, ``itm_head`` and the temperature ``temp``."""

    def __init__(self, student: SparseVideoStudent, text_encoder: TextEncoder, embed_dim: int):
        super().__init__()
        width, hidden = student.arch.width, text_encoder.arch.hidden
        assert student.arch.head_norm_eps == HEAD_NORM_EPS, "build the stage-2 student with head_norm_eps=HEAD_NORM_EPS"
        if text_encoder.arch.vision_width != width:
            raise ValueError(f"text tower built for vision width {text_encoder.arch.vision_width}, student is {width}")
        self.student = student
        self.pool_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.text_encoder = text_encoder
        self.vision_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        # [1], not 0-dim (FSDP2 cannot shard a scalar); the reference's 0-dim `temp` is reshaped on
        # the way in and out.
        self.temp = nn.Parameter(torch.full((1,), TEMP_INIT))
        for m in (self.vision_proj, self.text_proj, self.itm_head):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    @property
    def embed_dim(self) -> int:
        return self.vision_proj.out_features

    # ---------------------------------------------------------------- vision
    def encode_vision(self, video_BCTHW: torch.Tensor, visible_idx_BN: torch.Tensor,
                      drop_scales_LB2: torch.Tensor | None = None):  # fmt: skip
        """-> (tokens [B, N, D], aligned [L, B, N, Ct] unit vectors, vision_feat [B, E] unit).

        ``drop_scales_LB2``: [depth, B, 2] drop-path factors (training mode); None draws drop path
        from torch's generator."""
        student = self.student
        taps_LBND = student.forward_features(video_BCTHW, visible_idx_BN, drop_scales_LB2)
        tokens_BND = taps_LBND[-1]
        heads_in = taps_LBND + student.clip_pos_embed.to(taps_LBND.dtype)[visible_idx_BN]
        aligned = torch.stack([head(heads_in[i]) for i, head in enumerate(student.clip_decoder)])
        pooled = self.pool_norm(tokens_BND.mean(1))
        return tokens_BND, aligned, F.normalize(self.vision_proj(pooled), dim=-1)

    def encode_vision_test(self, video_BCTHW: torch.Tensor):
        """Every token of every frame (no masking), as at test time.

        Returns:
            (tokens [B, T*P, D], frame_feat [B, T, E]: per frame, the unit projection of pool_norm
            of the mean of that frame's tokens).
        """
        B, _, T = video_BCTHW.shape[:3]
        P = self.student.arch.patches_per_frame
        idx = torch.arange(T * P, device=video_BCTHW.device).expand(B, -1)
        tokens = self.student.forward_features(video_BCTHW, idx)[-1]
        pooled_BTD = self.pool_norm(tokens.view(B, T, P, -1).mean(2))
        return tokens, F.normalize(self.vision_proj(pooled_BTD), dim=-1)

    # ---------------------------------------------------------------- text
    def encode_text(self, ids_BS: torch.Tensor, mask_BS: torch.Tensor):
        """-> (text-only features [B, S, H], text_feat [B, E] unit, from the CLS token)."""
        x = self.text_encoder.forward_text(ids_BS, mask_BS)
        return x, F.normalize(self.text_proj(x[:, 0]), dim=-1)

    def match_logits(self, text_BSH, mask_BS, vision_BND) -> torch.Tensor:
        """VTM head on the fused CLS token: -> [B, 2] (index 1 = match)."""
        fused = self.text_encoder.forward_fusion(text_BSH, mask_BS, vision_BND)
        return self.itm_head(fused[:, 0])

    # ---------------------------------------------------------------- training
    def forward(self, batch: VLBatch) -> dict[str, torch.Tensor]:
        """The four stage-2 losses on one masked vision forward: {uta, vtc, vtm, mlm} (0-dim).

        Under torchrun each is this rank's share of the global-batch loss (VTC over the gathered
        batch; VTM and MLM divided by their global counts): the mean over ranks is the loss of the
        whole batch."""
        tokens, aligned, vision_feat = self.encode_vision(batch.video, batch.visible_idx, batch.drop_scales)
        uta = alignment_loss(aligned.float(), batch.targets.float())
        return self.caption_losses(batch, tokens, vision_feat, uta)

    def caption_losses(self, batch: VLBatch, tokens: torch.Tensor, vision_feat: torch.Tensor, uta: torch.Tensor,
                       mlm: bool = True) -> dict[str, torch.Tensor]:
        """{uta, vtc, vtm, mlm}: VTC, VTM and (with ``mlm``; else 0) MLM of the vision tokens [B, N, D]
        and unit embeddings ``vision_feat`` ([B, E], or [B, T, E] one per frame) against the batch's
        captions, beside the given ``uta``."""
        text, text_feat = self.encode_text(batch.text_ids, batch.text_mask)
        vtc = L.vtc_loss(vision_feat.float(), text_feat.float(), batch.ids, self.temp)

        # VTM: the positives, then one hard negative text per video and one hard negative video
        # per text, drawn from the similarity softmax within its group, never of the same id.
        B = tokens.shape[0]
        neg_text, valid_v, neg_video, valid_t = L.hard_negatives(vision_feat, text_feat, batch.ids, self.temp,
                                                                 batch.negative_noise)  # fmt: skip
        text_all = torch.cat([text, text[neg_text], text])
        mask_all = torch.cat([batch.text_mask, batch.text_mask[neg_text], batch.text_mask])
        vision_all = torch.cat([tokens, tokens, tokens[neg_video]])
        logits = self.match_logits(text_all, mask_all, vision_all)
        labels = torch.cat([torch.ones(B, dtype=torch.long, device=tokens.device),
                            torch.zeros(2 * B, dtype=torch.long, device=tokens.device)])  # fmt: skip
        weights = torch.cat([torch.ones(B, device=tokens.device), valid_v.float(), valid_t.float()])
        vtm = L.vtm_loss(logits, labels, weights)

        mlm_loss = tokens.new_zeros((), dtype=torch.float32)
        if mlm:
            masked_text = self.text_encoder.forward_text(batch.mlm_ids, batch.text_mask)
            fused = self.text_encoder.forward_fusion(masked_text, batch.text_mask, tokens)
            mlm_loss = L.mlm_loss(self.text_encoder.mlm_logits(fused), batch.mlm_labels)
        return {"uta": uta, "vtc": vtc, "vtm": vtm, "mlm": mlm_loss}


# -------------------------------------------------------------------------------------------------
# The reference's stage-2 checkpoint keys
# -------------------------------------------------------------------------------------------------

_VISION_PREFIXES = (("student.encoder.", "vision_encoder.encoder."),
                    ("student.clip_decoder.", "vision_encoder.clip_decoder."),
                    ("pool_norm.", "vision_encoder.pool_norm."))  # fmt: skip
_IGNORED_PREFIXES = ("clip_teacher.", "vision_encoder.clip_teacher.")
STAGE2_SENTINEL = "vision_encoder.encoder.patch_embed.proj.weight"


def is_stage2_state_dict(state_dict: dict) -> bool:
    return STAGE2_SENTINEL in state_dict


def to_reference_state_dict(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """Our state dict in the reference's stage-2 naming (``vision_encoder.*``, ``text_encoder.bert.*``,
    ``text_encoder.cls.predictions.*``, ``vision_proj.*``, ``text_proj.*``, ``itm_head.*``, ``temp``)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return state_dict_to_reference(sd, model.text_encoder.arch)


def state_dict_to_reference(sd: dict[str, torch.Tensor], text_arch: TextArch) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    text = {}
    for k, v in sd.items():
        if k.startswith("text_encoder."):
            text[k[len("text_encoder."):]] = v
            continue
        for ours, ref in _VISION_PREFIXES:
            if k.startswith(ours):
                k = ref + k[len(ours):]
                break
        out[k] = v
    out.update({"text_encoder." + k: v for k, v in to_reference_keys(text, text_arch).items()})
    if "temp" in out:
        out["temp"] = out["temp"].reshape(())
    return out


def from_reference_state_dict(sd: dict[str, torch.Tensor], text_arch: TextArch) -> dict[str, torch.Tensor]:
    """The reference's stage-2 keys -> ours; ``clip_teacher.*`` (the teacher) is dropped."""
    out: dict[str, torch.Tensor] = {}
    text = {}
    for k, v in sd.items():
        if k.startswith(_IGNORED_PREFIXES):
            continue
        if k.startswith("text_encoder."):
            text[k[len("text_encoder."):]] = v
            continue
        for ours, ref in _VISION_PREFIXES:
            if k.startswith(ref):
                k = ours + k[len(ref):]
                break
        out[k] = v
    if "temp" in out:
        out["temp"] = out["temp"].reshape(1)
    out.update({"text_encoder." + k: v for k, v in from_reference_keys(text, text_arch).items()})
    return out


def stage2_shapes(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """What a reference stage-2 state dict says about the model: embed_dim, text layers and how many
    of them have cross-attention, text width."""
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"text_encoder\.bert\.encoder\.layer\.(\d+)\.", k))}
    fusion = {int(m.group(1)) for k in sd
              if (m := re.match(r"text_encoder\.bert\.encoder\.layer\.(\d+)\.crossattention\.", k))}  # fmt: skip
    if "vision_proj.weight" not in sd or not layers:
        raise ValueError("not a UMT stage-2 state dict: no vision_proj.weight / text_encoder.bert.encoder.layer.*")
    return {
        "embed_dim": sd["vision_proj.weight"].shape[0],
        "text_layers": len(layers),
        "fusion_layers": len(fusion),
        "text_width": sd["text_proj.weight"].shape[1],
    }


def load_reference_state_dict(model: VisionLanguageModel, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load a reference-format stage-2 state dict into `model`, strictly (every key must match)."""
    from umt_fast.safe_load import load_state_dict_checked

    ours = from_reference_state_dict(sd, model.text_encoder.arch)
    load_state_dict_checked(model, ours, source, strict=True)
