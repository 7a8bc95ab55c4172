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


def vit_block(x_BNC: torch.Tensor, sd: dict, p: str, heads: int) -> torch.Tensor:
    """One block of the reference's video ViT (``Block`` in modeling_pretrain / modeling_finetune):
    pre-norm (eps 1e-6) attention with qkv bias (q_bias, 0, v_bias) and an explicit softmax, then
    the GELU MLP."""
    B, N, C = x_BNC.shape
    h = _ln(x_BNC, sd, p + ".norm1", 1e-6)
    qkv_bias = torch.cat([sd[p + ".attn.q_bias"], torch.zeros_like(sd[p + ".attn.v_bias"]), sd[p + ".attn.v_bias"]])
    qkv = F.linear(h, sd[p + ".attn.qkv.weight"], qkv_bias)
    qkv = qkv.reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * (C // heads) ** -0.5
    attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    h = (attn @ v).transpose(1, 2).reshape(B, N, -1)
    x_BNC = x_BNC + F.linear(h, sd[p + ".attn.proj.weight"], sd[p + ".attn.proj.bias"])
    h = _ln(x_BNC, sd, p + ".norm2", 1e-6)
    h = F.linear(F.gelu(F.linear(h, sd[p + ".mlp.fc1.weight"], sd[p + ".mlp.fc1.bias"])),
                 sd[p + ".mlp.fc2.weight"], sd[p + ".mlp.fc2.bias"])
    return x_BNC + h


def student_forward(sd: dict, video_BCTHW: torch.Tensor, mask_BN: torch.Tensor, heads: int, head_eps: float = 1e-6) -> torch.Tensor:
    """mask_BN: bool, True = masked. Returns [K, B, N_vis, Ct].

    ``head_eps``: the alignment heads' LayerNorm eps, 1e-6 in stage 1 (single_modality's
    ``Linear_Decoder`` gets ``partial(nn.LayerNorm, eps=1e-6)``); the stage-2 vision encoder's
    ``Linear_Decoder`` (multi_modality/models/backbones/vit/vit.py) builds ``nn.LayerNorm(output_dim)``,
    eps 1e-5."""
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
        x_vis = vit_block(x_vis, sd, f"encoder.blocks.{i}", heads)
        if i in return_index:
            taps.append(x_vis)
    x_clip_vis = _ln(torch.stack(taps), sd, "encoder.norm", 1e-6)
    clip_pos = sinusoid_table(N, C).to(dtype).repeat(B, 1, 1)
    x_clip = x_clip_vis + clip_pos[~mask_BN].view(B, -1, C).unsqueeze(0)
    outs = []
    for k in range(K):
        y = F.linear(x_clip[k], sd[f"clip_decoder.{k}.head.weight"], sd[f"clip_decoder.{k}.head.bias"])
        y = _ln(y, sd, f"clip_decoder.{k}.norm", head_eps)
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


# ---- stage 2 (multi_modality) ----


def reference_pre_text(text, max_l=None):
    """multi_modality/dataset/utils.py ``pre_text``: applied to every caption of the reference's
    training and test datasets (dataset/caption_dataset.py) before tokenizing."""
    text = re.sub(r"([,.'!?\"()*#:;~])", '', text.lower())
    text = text.replace('-', ' ').replace('/', ' ').replace('<person>', 'person')

    text = re.sub(r"\s{2,}", ' ', text)
    text = text.rstrip('\n').strip(' ')

    if max_l:  # truncate
        words = text.split(' ')
        if len(words) > max_l:
            text = ' '.join(words[:max_l])
    return text


def reference_bert_tokenizer(vocab_file: str, do_lower_case: bool = True):
    """The reference's tokenizer (multi_modality/models/backbones/bert/tokenization_bert.py): the
    slow, pure-Python transformers BERT tokenizer whose ``build_inputs_with_special_tokens`` makes a
    single sequence ``[CLS] X`` (no [SEP]). Call it as the reference does (tasks/pretrain.py,
    tasks/retrieval_utils.py): ``tok(text, padding="max_length", truncation=True,
    max_length=max_txt_l, return_tensors="pt")``."""
    try:
        from transformers import BertTokenizerLegacy as SlowBertTokenizer  # transformers >= 5
    except ImportError:
        from transformers import BertTokenizer as SlowBertTokenizer  # transformers 4: the slow one

    class ReferenceBertTokenizer(SlowBertTokenizer):
        def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
            if token_ids_1 is None:
                return [self.cls_token_id] + token_ids_0
            cls = [self.cls_token_id]
            sep = [self.sep_token_id]
            return cls + token_ids_0 + sep + token_ids_1 + sep

    return ReferenceBertTokenizer(vocab_file, do_lower_case=do_lower_case)


def reference_rerank_scores(i2t_scores_VT, itm_score, k_test):
    """multi_modality/tasks/retrieval_utils.py ``evaluation`` (one clip per video, one process):
    each video's top-k texts and each text's top-k videos by the ITC scores, re-scored with the
    raw ITM logit ``itm_score(text_idx, video_idx) -> [k]``; -100 elsewhere.

    Returns (i2t_scores_x [Nv, Nt], t2i_scores_x [Nt, Nv]) float32, as the reference returns them."""
    num_images, num_text = i2t_scores_VT.shape
    t2i_scores_TV = i2t_scores_VT.T
    i2t_scores_x = torch.full((num_images, num_text), -100.0).to(torch.float)
    for i, sims in enumerate(i2t_scores_VT):
        k = min(len(sims), k_test)
        topk_sim, topk_idx = sims.topk(k=k, dim=0)
        score = itm_score(topk_idx, torch.full_like(topk_idx, i))
        i2t_scores_x[i, topk_idx] = score.to(i2t_scores_x.dtype)
    t2i_scores_x = torch.full((num_text, num_images), -100.0).to(torch.float)
    for i, sims in enumerate(t2i_scores_TV):
        k = min(len(sims), k_test)
        topk_sim, topk_idx = sims.topk(k=k, dim=0)
        score = itm_score(torch.full_like(topk_idx, i), topk_idx)
        t2i_scores_x[i, topk_idx] = score.to(t2i_scores_x.dtype)
    return i2t_scores_x.cpu().numpy(), t2i_scores_x.cpu().numpy()


def reference_itm_ranks(scores_i2t, scores_t2i, txt2img, img2txt):
    """multi_modality/tasks/retrieval_utils.py ``itm_eval``'s ranks: (image->text [Nv], text->image
    [Nt]), 0-based."""
    # Images->Text
    ranks_i2t = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        # Score
        gt_txt_ids = img2txt[index]
        if isinstance(gt_txt_ids, int):
            ranks_i2t[index] = np.where(inds == gt_txt_ids)[0][0]
        else:
            rank = 1e20
            for i in gt_txt_ids:
                tmp = np.where(inds == i)[0][0]
                if tmp < rank:
                    rank = tmp
            ranks_i2t[index] = rank

    # Text->Images
    ranks_t2i = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        gt_img_ids = txt2img[index]
        if isinstance(gt_img_ids, int):
            ranks_t2i[index] = np.where(inds == gt_img_ids)[0][0]
        else:  # list, used in the case each caption has multiple GT images
            # Score
            rank = 1e20
            for i in gt_img_ids:
                tmp = np.where(inds == i)[0][0]
                if tmp < rank:
                    rank = tmp
            ranks_t2i[index] = rank
    return ranks_i2t, ranks_t2i


def reference_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """multi_modality/tasks/retrieval_utils.py ``itm_eval`` (without its final rounding to 2
    decimals): txt_r* = image->text, img_r* = text->image, in percent."""
    ranks, ranks_t2i = reference_itm_ranks(scores_i2t, scores_t2i, txt2img, img2txt)
    tr1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    tr5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    tr10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    ranks = ranks_t2i
    ir1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    ir5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    ir10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    tr_mean = (tr1 + tr5 + tr10) / 3
    ir_mean = (ir1 + ir5 + ir10) / 3
    return {
        "txt_r1": tr1, "txt_r5": tr5, "txt_r10": tr10, "txt_r_mean": tr_mean,
        "img_r1": ir1, "img_r5": ir5, "img_r10": ir10, "img_r_mean": ir_mean,
        "r_mean": (tr_mean + ir_mean) / 2,
    }


def reference_mc_answers(vision_proj, text_proj, temp, pooled_image_feat, pooled_text_feat, itm_logits,
                         num_options_per_q):
    """multi_modality/tasks/retrieval_mc.py ``main_with_ensemble`` (one clip per video, the default
    "concat" frame ensemble): ``get_sim_for_each_question``'s softmax over each question's options of
    the mean over frames of the projected, normalised cosine divided by ``temp``, mixed with the ITM
    head's match probability as ``0.7 * itm + 0.3 * sim``; the answer is ``.max(1)[1]`` per question.

    Args:
        vision_proj, text_proj: the model's projections (callables).
        temp: the model's temperature, as stored.
        pooled_image_feat: [b, t, c] pooled per-frame vision features (before vision_proj).
        pooled_text_feat: [b * n, c] the options' CLS features (before text_proj), question-major.
        itm_logits: [b * n, 2] the ITM head's logits of (question's video, option), same order.

    Returns:
        (ensemble scores [b, n], predicted option [b])."""
    pooled_text_feat = pooled_text_feat.reshape(-1, num_options_per_q, pooled_text_feat.shape[-1])  # (b n) c -> b n c
    image_feat = F.normalize(vision_proj(pooled_image_feat), dim=-1)
    text_feat = F.normalize(text_proj(pooled_text_feat), dim=-1)
    sim = torch.matmul(image_feat, text_feat.transpose(1, 2))  # [b, t, n]
    sim = sim.mean(1) / temp  # [b,n]
    sim = F.softmax(sim, dim=1)  # [b, n]
    sim = sim.flatten()  # [b*n,]
    score = F.softmax(itm_logits, dim=1)[:, 1]  # [bs*5]
    score = score * 0.7 + sim * 0.3
    pred_ans = score.view(-1, num_options_per_q).max(1)[1]
    return score.view(-1, num_options_per_q), pred_ans


# ---- fine-tuning ViT (single_modality/models/modeling_finetune.py) ----


def finetune_sinusoid_table(n_position: int, d_hid: int, cur_frame: int = -1, pre_n_position: int = 1568):
    """``get_sinusoid_encoding_table`` of the fine-tuning model: [1, n_position, d_hid] float32.

    The table of the pre-training length (8 frames x 14 x 14), resized bicubically in space to
    the current grid, then linearly in time to ``cur_frame`` frames, in float32.
    """
    table = sinusoid_table(pre_n_position, d_hid)
    if n_position // cur_frame * 8 != pre_n_position and cur_frame != -1:
        T, P, C = 8, 14, d_hid
        new_P = int((n_position // cur_frame) ** 0.5)
        table = table.reshape(-1, T, P, P, C)
        table = table.reshape(-1, P, P, C).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(new_P, new_P), mode="bicubic", align_corners=False)
        table = table.permute(0, 2, 3, 1).reshape(-1, T, new_P, new_P, C)
        table = table.flatten(1, 3)
    if cur_frame != -1 and cur_frame != 8:
        T, new_T, C = 8, cur_frame, d_hid
        P = int((n_position // cur_frame) ** 0.5)
        table = table.reshape(-1, T, P, P, C)
        table = table.permute(0, 2, 3, 4, 1).reshape(-1, C, T)
        table = F.interpolate(table, size=new_T, mode="linear")
        table = table.reshape(1, P, P, C, new_T).permute(0, 4, 1, 2, 3)
        table = table.flatten(1, 3)
    return table


def finetune_checkpoint_pos_embed(pos_embed_checkpoint: torch.Tensor, num_patches: int, num_frames: int,
                                  tubelet_size: int = 1) -> torch.Tensor:
    """run_class_finetuning.py's resizing of a checkpoint's ``pos_embed`` (no extra tokens):
    the file's table taken as 8 frames, linear in time first, then bicubic in space."""
    embedding_size = pos_embed_checkpoint.shape[-1]
    num_extra_tokens = 0
    orig_t_size = 8 // tubelet_size
    new_t_size = num_frames // tubelet_size
    orig_size = int(((pos_embed_checkpoint.shape[-2] - num_extra_tokens) // (orig_t_size)) ** 0.5)
    new_size = int((num_patches // (new_t_size)) ** 0.5)
    if orig_t_size != new_t_size:
        tmp = pos_embed_checkpoint.view(1, orig_t_size, -1, embedding_size)
        tmp = tmp.permute(0, 2, 3, 1).reshape(-1, embedding_size, orig_t_size)
        tmp = F.interpolate(tmp, size=new_t_size, mode="linear")
        tmp = tmp.view(1, -1, embedding_size, new_t_size)
        tmp = tmp.permute(0, 3, 1, 2).reshape(1, -1, embedding_size)
        pos_embed_checkpoint = tmp
    if orig_size != new_size:
        extra_tokens = pos_embed_checkpoint[:, :num_extra_tokens]
        pos_tokens = pos_embed_checkpoint[:, num_extra_tokens:]
        pos_tokens = pos_tokens.reshape(-1, new_t_size, orig_size, orig_size, embedding_size)
        pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, embedding_size).permute(0, 3, 1, 2)
        pos_tokens = F.interpolate(pos_tokens, size=(new_size, new_size), mode="bicubic", align_corners=False)
        pos_tokens = pos_tokens.permute(0, 2, 3, 1).reshape(-1, new_t_size, new_size, new_size, embedding_size)
        pos_tokens = pos_tokens.flatten(1, 3)
        pos_embed_checkpoint = torch.cat((extra_tokens, pos_tokens), dim=1)
    return pos_embed_checkpoint


def finetune_vit_forward(sd: dict, video_BCTHW: torch.Tensor, heads: int, tubelet_size: int = 1,
                         pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """``VisionTransformer.forward`` in eval mode (use_mean_pooling, sin-cos table, no layer
    scale): conv3d patches + pos table -> blocks -> mean over tokens -> fc_norm -> head.

    ``sd`` in the fine-tuning naming (``patch_embed.*``, ``blocks.*``, ``fc_norm.*``, ``head.*``).
    ``pos_embed``: the model's table when it was loaded from a checkpoint; None = the table the
    model builds (`finetune_sinusoid_table` for ``all_frames // tubelet_size`` frames).
    Returns logits [B, K].
    """
    dtype = video_BCTHW.dtype
    sd = {k: v.to(dtype) for k, v in sd.items()}
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    w = sd["patch_embed.proj.weight"]
    all_frames = video_BCTHW.shape[2]
    x = F.conv3d(video_BCTHW, w, sd["patch_embed.proj.bias"], stride=(tubelet_size, w.shape[3], w.shape[4]))
    x = x.flatten(2).transpose(1, 2)
    B, N, C = x.shape
    if pos_embed is None:
        pos_embed = finetune_sinusoid_table(N, C, all_frames // tubelet_size, pre_n_position=1568)
    x = x + pos_embed.expand(B, -1, -1).type_as(x).clone().detach()
    for i in range(depth):  # the reference's fine-tuning ViT uses the pre-training Block
        x = vit_block(x, sd, f"blocks.{i}", heads)
    x = _ln(x.mean(1), sd, "fc_norm", 1e-6)
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def finetuned_state_dict(stage1_sd: dict, num_classes: int, seed: int = 0) -> dict:
    """A fine-tuned-style file (no ``pos_embed``) from a stage-1 state dict: the reference's
    ``encoder.`` prefix stripped, alignment heads and the final norm dropped, a random fc_norm
    and head added."""
    sd = {k[len("encoder."):]: v for k, v in stage1_sd.items() if k.startswith("encoder.") and not k.startswith("encoder.norm.")}
    width = sd["patch_embed.proj.weight"].shape[0]
    g = torch.Generator().manual_seed(seed)
    sd.update({
        "fc_norm.weight": 1 + 0.1 * torch.randn(width, generator=g), "fc_norm.bias": 0.1 * torch.randn(width, generator=g),
        "head.weight": 0.2 * torch.randn(num_classes, width, generator=g), "head.bias": 0.2 * torch.randn(num_classes, generator=g),
    })
    return sd


# ---- video question answering (multi_modality/models/umt_qa.py, tasks/vqa.py, tasks/vqa_utils.py) ----


def random_bert_state_dict(prefix, layers, hidden, heads, intermediate, vocab, max_positions, cross_layers=(),
                           encoder_width=None, lm_head=False, seed=0):
    """Random weights in the reference's xbert naming under ``prefix`` (e.g. ``text_encoder.`` for a
    BertModel, ``text_decoder.bert.`` for the BertModel of a BertLMHeadModel): ``embeddings.*``,
    ``encoder.layer.{i}.{attention,crossattention,intermediate,output}.*`` (crossattention on the
    layers in ``cross_layers``, its key / value from ``encoder_width``). ``lm_head``: also
    ``cls.predictions.*`` beside the BertModel (the prefix without its last ``bert.``), the decoder
    weight tied (the same tensor as the word embeddings)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.05):
        return torch.randn(*shape, generator=g) * s

    def ln(p, n):
        return {p + ".weight": 1 + r(n), p + ".bias": r(n)}

    def lin(p, o, i):
        return {p + ".weight": r(o, i, s=0.2), p + ".bias": r(o)}

    def attention(p, kv):
        return {**lin(p + ".self.query", hidden, hidden), **lin(p + ".self.key", hidden, kv),
                **lin(p + ".self.value", hidden, kv), **lin(p + ".output.dense", hidden, hidden),
                **ln(p + ".output.LayerNorm", hidden)}

    sd = {prefix + "embeddings.word_embeddings.weight": r(vocab, hidden, s=0.5),
          prefix + "embeddings.position_embeddings.weight": r(max_positions, hidden, s=0.5),
          prefix + "embeddings.token_type_embeddings.weight": r(2, hidden, s=0.5),
          **ln(prefix + "embeddings.LayerNorm", hidden)}
    for i in range(layers):
        p = f"{prefix}encoder.layer.{i}"
        sd.update(attention(p + ".attention", hidden))
        if i in cross_layers:
            sd.update(attention(p + ".crossattention", encoder_width or hidden))
        sd.update({**lin(p + ".intermediate.dense", intermediate, hidden), **lin(p + ".output.dense", hidden, intermediate),
                   **ln(p + ".output.LayerNorm", hidden)})
    if lm_head:
        head = prefix[:-len("bert.")] + "cls.predictions."
        sd.update({**lin(head + "transform.dense", hidden, hidden), **ln(head + "transform.LayerNorm", hidden),
                   head + "bias": r(vocab), head + "decoder.weight": sd[prefix + "embeddings.word_embeddings.weight"]})
    return sd


def _xbert_attention(x, kv, sd, p, heads, additive_mask, eps=1e-12):
    """xbert ``BertAttention``: scores / sqrt(d) + the additive mask (0 or -10000), softmax,
    context, then dense -> LayerNorm(. + x)."""
    B, S, H = x.shape
    d = H // heads

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, d).permute(0, 2, 1, 3)

    q = split(F.linear(x, sd[p + ".self.query.weight"], sd[p + ".self.query.bias"]))
    k = split(F.linear(kv, sd[p + ".self.key.weight"], sd[p + ".self.key.bias"]))
    v = split(F.linear(kv, sd[p + ".self.value.weight"], sd[p + ".self.value.bias"]))
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d) + additive_mask
    context = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3).reshape(B, S, H)
    h = F.linear(context, sd[p + ".output.dense.weight"], sd[p + ".output.dense.bias"])
    return F.layer_norm(h + x, (H,), sd[p + ".output.LayerNorm.weight"], sd[p + ".output.LayerNorm.bias"], eps)


def reference_xbert(sd, prefix, input_ids, attention_mask, heads, is_decoder=False, encoder_hidden_states=None,
                    encoder_attention_mask=None, eps=1e-12):
    """xbert ``BertModel.forward`` (mode "multi_modal": every layer; a layer with crossattention
    weights cross-attends): embeddings (word + position + token type 0, LayerNorm), the extended
    masks ``(1 - m) * -10000`` (a decoder's: causal AND padding), post-norm layers with exact GELU.
    ``attention_mask`` None = all ones. Returns the last hidden state [B, S, H]."""
    dtype = sd[prefix + "embeddings.word_embeddings.weight"].dtype
    B, S = input_ids.shape
    x = (sd[prefix + "embeddings.word_embeddings.weight"][input_ids]
         + sd[prefix + "embeddings.position_embeddings.weight"][:S][None]
         + sd[prefix + "embeddings.token_type_embeddings.weight"][0])
    x = F.layer_norm(x, (x.shape[-1],), sd[prefix + "embeddings.LayerNorm.weight"], sd[prefix + "embeddings.LayerNorm.bias"], eps)
    if attention_mask is None:
        attention_mask = torch.ones(B, S)
    m = attention_mask.to(dtype)
    if is_decoder:
        seq = torch.arange(S)
        causal = (seq[None, None, :].repeat(B, S, 1) <= seq[None, :, None]).to(dtype)
        ext = causal[:, None, :, :] * m[:, None, None, :]
    else:
        ext = m[:, None, None, :]
    ext = (1.0 - ext) * -10000.0
    enc_ext = None
    if encoder_hidden_states is not None:
        em = torch.ones(encoder_hidden_states.shape[:2]) if encoder_attention_mask is None else encoder_attention_mask
        enc_ext = (1.0 - em.to(dtype)[:, None, None, :]) * -10000.0
    layers = len({int(mm.group(1)) for k in sd if (mm := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.", k))})
    for i in range(layers):
        p = f"{prefix}encoder.layer.{i}"
        x = _xbert_attention(x, x, sd, p + ".attention", heads, ext, eps)
        if p + ".crossattention.self.query.weight" in sd:
            x = _xbert_attention(x, encoder_hidden_states, sd, p + ".crossattention", heads, enc_ext, eps)
        h = F.gelu(F.linear(x, sd[p + ".intermediate.dense.weight"], sd[p + ".intermediate.dense.bias"]))
        h = F.linear(h, sd[p + ".output.dense.weight"], sd[p + ".output.dense.bias"])
        x = F.layer_norm(h + x, (x.shape[-1],), sd[p + ".output.LayerNorm.weight"], sd[p + ".output.LayerNorm.bias"], eps)
    return x


def reference_lm_head_model(sd, input_ids, attention_mask, heads, encoder_hidden_states, encoder_attention_mask,
                            labels=None, eps=1e-12):
    """xbert ``BertLMHeadModel.forward`` of ``text_decoder`` (is_decoder=True, reduction "none"):
    (logits [B, S, V], loss [B] or None): cls.predictions (dense, GELU, LayerNorm, decoder + bias)
    on the last hidden state; the loss is CrossEntropyLoss(reduction="none") of logits[:, :-1]
    against labels[:, 1:] (-100 ignored), ``.view(B, -1).sum(1)``."""
    x = reference_xbert(sd, "text_decoder.bert.", input_ids, attention_mask, heads, True, encoder_hidden_states,
                        encoder_attention_mask, eps)
    p = "text_decoder.cls.predictions."
    h = F.gelu(F.linear(x, sd[p + "transform.dense.weight"], sd[p + "transform.dense.bias"]))
    h = F.layer_norm(h, (h.shape[-1],), sd[p + "transform.LayerNorm.weight"], sd[p + "transform.LayerNorm.bias"], eps)
    logits = F.linear(h, sd[p + "decoder.weight"]) + sd[p + "bias"]
    if labels is None:
        return logits, None
    V = logits.shape[-1]
    loss = torch.nn.CrossEntropyLoss(reduction="none")(logits[:, :-1, :].contiguous().view(-1, V),
                                                       labels[:, 1:].contiguous().view(-1))
    return logits, loss.view(logits.shape[0], -1).sum(1)


def reference_qa_vision(sd, video_BCTHW, heads):
    """The QA vision encoder (``PretrainVisionTransformer`` with mask None, no pool_norm): Conv3d
    patches + the sin-cos table, every block, the final LayerNorm (eps 1e-6) -> [B, N, C]."""
    dtype = video_BCTHW.dtype
    sd = {k[len("vision_encoder."):]: v.to(dtype) for k, v in sd.items() if k.startswith("vision_encoder.encoder.")}
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.blocks\.(\d+)\.", k))})
    w = sd["encoder.patch_embed.proj.weight"]
    x = F.conv3d(video_BCTHW, w, sd["encoder.patch_embed.proj.bias"], stride=w.shape[2:]).flatten(2).transpose(1, 2)
    x = x + sinusoid_table(x.shape[1], x.shape[2]).to(dtype)
    for i in range(depth):
        x = vit_block(x, sd, f"encoder.blocks.{i}", heads)
    return _ln(x, sd, "encoder.norm", 1e-6)


def reference_qa_question_states(sd, video_BCTHW, question_ids, question_mask, vision_heads, text_heads):
    """``UMT_QA.forward``'s question encoding: image_embeds = the vision encoder, image_atts all ones;
    ``text_encoder(question, attention_mask, encoder_hidden_states=image_embeds)`` -> [B, Sq, H]."""
    image_embeds = reference_qa_vision(sd, video_BCTHW, vision_heads)
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    return reference_xbert(sd, "text_encoder.", question_ids, question_mask, text_heads, False, image_embeds, image_atts)


def reference_qa_train_loss(sd, video_BCTHW, question_ids, question_mask, answer_ids, answer_mask, k, weights,
                            vision_heads, text_heads, pad_token_id=0):
    """``UMT_QA.forward(train=True)``: the question states tiled per answer (question b's row
    ``k[b]`` times, in order), answer targets = ids with pads -> -100, the decoder's per-answer
    loss (reduction "none"), ``(weights * loss).sum() / B``."""
    states = reference_qa_question_states(sd, video_BCTHW, question_ids, question_mask, vision_heads, text_heads)
    answer_targets = answer_ids.masked_fill(answer_ids == pad_token_id, -100)
    question_states, question_atts = [], []
    for b, n in enumerate(k):
        question_states += [states[b]] * n
        question_atts += [question_mask[b]] * n
    question_states, question_atts = torch.stack(question_states, 0), torch.stack(question_atts, 0)
    _, loss = reference_lm_head_model(sd, answer_ids, answer_mask, text_heads, question_states, question_atts,
                                      labels=answer_targets)
    return (weights * loss).sum() / video_BCTHW.shape[0]


def reference_tile(x, dim, n_tile):
    """multi_modality/models/utils.py ``tile``."""
    init_dim = x.size(dim)
    repeat_idx = [1] * x.dim()
    repeat_idx[dim] = n_tile
    x = x.repeat(*repeat_idx)
    order_index = torch.LongTensor(np.concatenate([init_dim * np.arange(n_tile) + i for i in range(init_dim)]))
    return torch.index_select(x, dim, order_index)


def reference_rank_answer(sd, question_states, question_atts, answer_ids, answer_atts, k, text_heads, pad_token_id=0):
    """``UMT_QA.rank_answer``, line for line: [CLS] -> first-token softmax, the probabilities at
    every answer's first token, top k; those k answers decoded whole (targets pads -> -100);
    log_probs = cat([log p_first, -answer_loss]) summed; softmax over the k; top k again.
    Returns (topk_ids [Nq, k], topk_probs [Nq, k])."""
    num_ques = question_states.size(0)
    start_ids = answer_ids[0, 0].repeat(num_ques, 1)
    logits, _ = reference_lm_head_model(sd, start_ids, None, text_heads, question_states, question_atts)
    logits = logits[:, 0, :]
    answer_first_token = answer_ids[:, 1]
    prob_first_token = F.softmax(logits, dim=1).index_select(dim=1, index=answer_first_token)
    topk_probs, topk_ids = prob_first_token.topk(k, dim=1)
    input_ids, input_atts = [], []
    for b, topk_id in enumerate(topk_ids):
        input_ids.append(answer_ids.index_select(dim=0, index=topk_id))
        input_atts.append(answer_atts.index_select(dim=0, index=topk_id))
    input_ids, input_atts = torch.cat(input_ids, dim=0), torch.cat(input_atts, dim=0)
    targets_ids = input_ids.masked_fill(input_ids == pad_token_id, -100)
    question_states = reference_tile(question_states, 0, k)
    question_atts = reference_tile(question_atts, 0, k)
    _, answer_loss = reference_lm_head_model(sd, input_ids, input_atts, text_heads, question_states, question_atts,
                                             labels=targets_ids)
    answer_loss = answer_loss.view(input_ids.size(0), -1)
    topk_probs = topk_probs.view(-1, 1)
    log_probs = torch.cat([topk_probs.log(), -answer_loss], dim=1)
    log_probs_sum = log_probs.sum(1).view(num_ques, k)
    topk_probs = F.softmax(log_probs_sum, dim=-1)
    topk_probs, rerank_id = topk_probs.topk(k, dim=1)
    topk_ids = torch.gather(topk_ids, 1, rerank_id)
    return topk_ids, topk_probs


def reference_qa_from_stage2(state_dict, fusion_layer):
    """tasks/shared_utils.py ``setup_model`` (not resuming, ``has_decoder=True``): the key loop that
    turns a stage-2 state dict into UMT_QA's, on a copy; ``fusion_layer`` is the index of the first
    fused BERT layer (9 for BERT-base). The reference then loads it with strict=False; the keys
    UMT_QA does not have (the teacher, the projections, the VTM head, ...) are returned apart."""
    state_dict = dict(state_dict)
    for key in list(state_dict.keys()):
        if "bert" in key:
            encoder_key = key.replace("bert.", "")
            state_dict[encoder_key] = state_dict[key]
        if "text_encoder" in key:
            if "layer" in key:
                encoder_keys = key.split(".")
                layer_num = int(encoder_keys[4])
                if layer_num < fusion_layer:
                    del state_dict[key]
                    continue
                else:
                    decoder_layer_num = layer_num - fusion_layer
                    encoder_keys[4] = str(decoder_layer_num)
                    encoder_key = ".".join(encoder_keys)
            else:
                encoder_key = key
            decoder_key = encoder_key.replace("text_encoder", "text_decoder")
            state_dict[decoder_key] = state_dict[key]
            del state_dict[key]
    return state_dict


class ReferenceVQANormaliser:
    """tasks/vqa_utils.py ``VQAEval``'s answer normalisation, restated: the contraction table (the
    entries a test uses), the number words, the articles, the punctuation rules and the period
    regex exactly as written there (including its ``sub(..., re.UNICODE)``, which passes 32 as
    ``count``)."""

    contractions = {"dont": "don't", "isnt": "isn't", "cant": "can't", "whats": "what's", "Im": "I'm",
                    "wont": "won't", "youre": "you're", "thats": "that's"}
    manualMap = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
    articles = ["a", "an", "the"]
    periodStrip = re.compile(r"(?!<=\d)(\.)(?!\d)")
    commaStrip = re.compile(r"(\d)(,)(\d)")
    punct = [';', r"/", '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',', '?', '!']

    def processPunctuation(self, inText):
        outText = inText
        for p in self.punct:
            if (p + ' ' in inText or ' ' + p in inText) or (re.search(self.commaStrip, inText) is not None):
                outText = outText.replace(p, '')
            else:
                outText = outText.replace(p, ' ')
        return self.periodStrip.sub("", outText, re.UNICODE)

    def processDigitArticle(self, inText):
        outText = []
        for word in inText.lower().split():
            word = self.manualMap.setdefault(word, word)
            if word not in self.articles:
                outText.append(word)
        for wordId, word in enumerate(outText):
            if word in self.contractions:
                outText[wordId] = self.contractions[word]
        return ' '.join(outText)

    def question_accuracy(self, pred, gt_answers):
        """``VQAEval.evaluate`` for one question: the prediction (whitespace, punctuation, digits and
        articles normalised) against the annotators' answers (punctuation only, and only when
        they disagree), min(1, matches / 3) averaged over the leave-one-out subsets."""
        if len(set(gt_answers)) > 1:
            gt_answers = [self.processPunctuation(e) for e in gt_answers]
        res = pred.replace('\n', ' ').replace('\t', ' ').strip()
        res = self.processDigitArticle(self.processPunctuation(res))
        accs = []
        for idx in range(len(gt_answers)):
            others = gt_answers[:idx] + gt_answers[idx + 1:]
            accs.append(min(1, float(len([e for e in others if e == res])) / 3))
        return float(sum(accs)) / len(accs)


def reference_simple_qa_acc(gt, pred):
    """tasks/vqa_utils.py ``eval_simple_qa_acc`` (what the reference reports for MSRVTT-QA, MSVD-QA
    and ActivityNet-QA): exact string match by question_id, a missing prediction wrong,
    ``round(100 * correct / total, 2)``."""
    gt_qid2answer = {d["question_id"]: d["answer"] for d in gt}
    pred_qid2answer = {d["question_id"]: d["answer"] for d in pred}
    hits = [int(pred_qid2answer[q] == a) if q in pred_qid2answer else 0 for q, a in gt_qid2answer.items()]
    return round(100. * sum(hits) / len(hits), 2)


def reference_test_frame_indices(vlen: int, fps: float, num_frames: int, trimmed30: bool = False,
                                 seconds: float = 30.0) -> list[int]:  # fmt: skip
    """The reference's test-time frames of a video (dataset/video_utils.py ``read_frames_decord``
    with ``get_frame_indices(sample="middle")``): with ``trimmed30`` and a video longer than 30 s,
    only its first ``int(30 * fps)`` frames count; ``num_frames`` equal segments of them, the
    middle of each."""
    import numpy as np

    if trimmed30 and vlen / float(fps) > seconds:
        vlen = int(seconds * float(fps))
    acc_samples = min(num_frames, vlen)
    intervals = np.linspace(start=0, stop=vlen, num=acc_samples + 1).astype(int)
    ranges = [(intervals[i], intervals[i + 1] - 1) for i in range(len(intervals) - 1)]
    frame_indices = [int((x[0] + x[1]) // 2) for x in ranges]
    if len(frame_indices) < num_frames:  # padded with the last frame
        frame_indices = frame_indices + [frame_indices[-1]] * (num_frames - len(frame_indices))
    return frame_indices


def reference_train_frame_indices(vlen: int, num_frames: int, py_random, np_random) -> list[int]:
    """The reference's training frames of a video (dataset/video_utils.py
    ``get_frame_indices(sample="rand")``), with its global ``random`` and ``np.random`` passed in
    (a ``random.Random`` and a ``np.random.RandomState``)."""
    import numpy as np

    acc_samples = min(num_frames, vlen)
    intervals = np.linspace(start=0, stop=vlen, num=acc_samples + 1).astype(int)
    ranges = [(intervals[i], intervals[i + 1] - 1) for i in range(len(intervals) - 1)]
    try:
        frame_indices = [int(py_random.choice(range(x[0], x[1]))) for x in ranges]
    except IndexError:  # an empty range: a segment of one frame
        frame_indices = sorted(int(i) for i in np_random.permutation(vlen)[:acc_samples])
    if len(frame_indices) < num_frames:  # padded with the last frame
        frame_indices = frame_indices + [frame_indices[-1]] * (num_frames - len(frame_indices))
    return frame_indices


def reference_sparse_frame_indices(video_size: int, num_frames: int, clip_idx: int = -1, test_num_segment: int = 1,
                                   py_random=None) -> list[int]:  # fmt: skip
    """The reference's fine-tuning frames (the sparse Kinetics dataset's ``_get_seq_frames``):
    ``clip_idx`` -1 draws a training clip with ``py_random`` (its global ``random``); clip k of
    ``test_num_segment`` temporal test clips otherwise."""
    import numpy as np

    seg_size = max(0., float(video_size - 1) / num_frames)
    max_frame = int(video_size) - 1
    seq = []
    for i in range(num_frames):
        start = int(np.round(seg_size * i))
        if clip_idx == -1:
            end = int(np.round(seg_size * (i + 1)))
            seq.append(min(py_random.randint(start, end), max_frame))
        else:
            duration = seg_size / (test_num_segment + 1)
            seq.append(min(start + int(duration * (clip_idx + 1)), max_frame))
    return seq


def reference_vl_resize(frames_TCHW, size: int, box=None):
    """The reference's vision-language resize (dataset/__init__.py: ``Resize((size, size))`` at
    test, ``RandomResizedCrop(size, scale=(0.5, 1))`` in training, both BICUBIC) as torchvision
    0.13, the version it ran on, applies it to uint8 tensors: crop to ``box`` (x0, y0, w, h),
    bicubic interpolation in float without antialiasing, clamp to [0, 255], round to uint8."""
    import torch
    import torch.nn.functional as F

    if box is not None:
        x0, y0, w, h = box
        frames_TCHW = frames_TCHW[:, :, y0:y0 + h, x0:x0 + w]
    out = F.interpolate(frames_TCHW.float(), size=(size, size), mode="bicubic", align_corners=False)
    return out.clamp(0, 255).round().to(torch.uint8)


def reference_short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """video_transforms.py ``get_resize_sizes``: the short side to ``size``, the long side
    truncated -> (new height, new width)."""
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def reference_bilinear_resize(frames_THWC, out_h: int, out_w: int):
    """cv2.resize(..., INTER_LINEAR), what the reference's test ``Resize`` calls on each decoded
    frame, computed exactly in float64: half-pixel centres, no antialiasing, edge samples clamped.
    (cv2 itself rounds its fixed-point sums, so it may differ from this by one level.)
    uint8 [T, H, W, C] -> float64 [T, out_h, out_w, C]."""
    import numpy as np

    x = np.asarray(frames_THWC, dtype=np.float64)
    _, h, w, _ = x.shape

    def taps(out_n, in_n):
        src = (np.arange(out_n) + 0.5) * (in_n / out_n) - 0.5
        i0 = np.floor(src).astype(int)
        frac = src - i0
        frac[i0 < 0], i0[i0 < 0] = 0.0, 0
        frac[i0 >= in_n - 1], i0[i0 >= in_n - 1] = 0.0, in_n - 1
        return i0, np.minimum(i0 + 1, in_n - 1), frac

    y0, y1, fy = taps(out_h, h)
    x0, x1, fx = taps(out_w, w)
    rows = x[:, y0] * (1 - fy)[None, :, None, None] + x[:, y1] * fy[None, :, None, None]
    return rows[:, :, x0] * (1 - fx)[None, None, :, None] + rows[:, :, x1] * fx[None, None, :, None]
