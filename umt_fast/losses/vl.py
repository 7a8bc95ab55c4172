"""Stage-2 losses: video-text contrastive (VTC), matching (VTM) hard negatives, masked language
modelling (MLM) masking. The unmasked-token alignment (UTA) is `umt_fast.losses.alignment_loss`.

No host syncs: no boolean indexing, no torch.multinomial (its argument checks read back);
the hard negatives are drawn with the Gumbel-max trick on the device.

World-size invariance: the random draws (MLM masking, hard negatives) take their uniforms from
`umt_kernels.rng.uniform_noise`, keyed by (seed, step) and each pair's index in the global batch
(`mlm_noise`, `hard_negative_noise`); the hard negatives are drawn within fixed groups of
consecutive pairs of the global batch (`hard_negatives`); the MLM and VTM means divide by the
count over all ranks (`mean_over_ranks`). So one step gives the same losses and gradients on any
number of ranks that keeps whole groups on a rank.

Shape legend: B local batch, G = B * world size gathered batch, K hard-negative group, E embedding
dim, S tokens.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from umt_kernels.rng import uniform_noise

TEMP_MIN, TEMP_MAX = 0.001, 0.5
# Keys of the stage-2 draws at (seed, step), apart from the masks' (seed) and the drop path's
# (seed + 2**32, umt_fast.models.student).
MLM_SEED_OFFSET = 3 << 32
HARD_NEGATIVE_SEED_OFFSET = 4 << 32


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [B, ...] of every rank along dim 0 (rank order), keeping the autograd
    graph: the backward sums every rank's gradient of its slice (a reduce-scatter), as
    torch.distributed.nn.functional.all_gather does (deprecated in recent torch in favour of the
    functional collective used here); ``x`` itself in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_tensor_autograd

    return all_gather_tensor_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def mean_over_ranks(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """This rank's share of a mean over the global batch: ``total * W / sum over ranks of count``
    (``total / count`` in a single process), so that the mean over the W ranks (the logged loss,
    and DDP / FSDP2's gradient average) is the global ``sum total / sum count``, however the items
    counted fall on the ranks. 0-dim ``total`` (with graph) and ``count`` (no graph); the count is
    summed with an all-reduce on the device (no host sync). At least 1 in the denominator."""
    count = count.detach().to(total.dtype)
    world = 1
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        count = count.clone()
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return total * world / count.clamp_min(1)


def clamp_temperature(temp: torch.Tensor) -> torch.Tensor:
    """The learnable temperature, clamped to [0.001, 0.5] (differentiable inside the range)."""
    return temp.clamp(TEMP_MIN, TEMP_MAX)


def similarity(vision_feat: torch.Tensor, text_feat_HE: torch.Tensor) -> torch.Tensor:
    """Video-text similarities: [G, E] vision and [H, E] text embeddings -> [G, H] dot products;
    per-frame vision embeddings [G, F, E] -> the mean over the F frames of the per-frame dot
    products (the reference's ``get_sim``, as retrieval scores at test time). Leading dims of
    groups are kept: [n, K, E] or [n, K, F, E] with [n, K, E] text -> [n, K, K]."""
    if vision_feat.dim() == text_feat_HE.dim():
        return vision_feat @ text_feat_HE.transpose(-1, -2)
    return torch.einsum("...gfe,...he->...gh", vision_feat, text_feat_HE) / vision_feat.shape[-2]


def vtc_loss(
    vision_feat_BE: torch.Tensor, text_feat_BE: torch.Tensor, ids_B: torch.Tensor, temp: torch.Tensor
) -> torch.Tensor:
    """Video-text contrastive loss over the batch gathered from every rank (with gradients).

    Args:
        vision_feat_BE, text_feat_BE: L2-normalised embeddings of this rank's pairs; the vision
            side may also be per frame, [B, F, E] unit vectors (`similarity`).
        ids_B: int64 media ids; pairs with the same id (captions of one video) are all positives.
        temp: the learnable temperature, 0-dim or [1] (clamped to [0.001, 0.5] here).

    Returns:
        0-dim: (loss_v2t + loss_t2v) / 2, each the cross-entropy against the uniform distribution
        over a row's positives, averaged over the G gathered rows.
    """
    v = gather_with_grad(vision_feat_BE)
    t = gather_with_grad(text_feat_BE)
    ids = gather_no_grad(ids_B)
    logits_GG = similarity(v, t) / clamp_temperature(temp)
    pos_GG = (ids[:, None] == ids[None, :]).to(logits_GG.dtype)
    target_GG = pos_GG / pos_GG.sum(1, keepdim=True)
    loss_v2t = -(F.log_softmax(logits_GG, dim=1) * target_GG).sum(1).mean()
    loss_t2v = -(F.log_softmax(logits_GG.t(), dim=1) * target_GG).sum(1).mean()
    return (loss_v2t + loss_t2v) / 2


def sample_hard_negatives(
    sim_XKK: torch.Tensor,
    ids_XK: torch.Tensor,
    generator: torch.Generator | None = None,
    uniform_XKK: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One negative per row, drawn with probability softmax(sim) over the columns whose id differs
    from the row's (never the positive, never a same-id item), by the Gumbel-max trick.

    Args:
        sim_XKK: [..., K, K] similarity logits (row i: query i against every candidate), for any
            leading dims (independent groups).
        ids_XK: [..., K] int64 ids of the pairs.
        generator: for ``torch.rand`` when ``uniform_XKK`` is None.
        uniform_XKK: [..., K, K] uniforms in [0, 1) to draw with (e.g. counter-based noise).

    Returns:
        (index_XK int64 in [0, K), valid_XK bool): the sampled column per row, and whether the
        row had any candidate of another id (where it had none the index is meaningless and the
        caller must not train on it).
    """
    same = ids_XK[..., :, None] == ids_XK[..., None, :]
    logits = sim_XKK.detach().float().masked_fill(same, float("-inf"))
    u = uniform_XKK if uniform_XKK is not None else torch.rand(logits.shape, device=logits.device, generator=generator)
    gumbel = -torch.log(-torch.log(u.float().clamp(1e-20, 1.0)))
    index = (logits + gumbel).argmax(dim=-1)
    valid = (~same).any(dim=-1)
    return index, valid


def hard_negative_noise(batch_size: int, group: int, *, seed: int, offset: int, first_clip: int,
                        device: torch.device) -> torch.Tensor:  # fmt: skip
    """The uniforms of the hard-negative draws of ``batch_size`` pairs, global indices
    ``first_clip ..``: [2, B, K] float32, [0, b] for the negative text of video b, [1, b] for the
    negative video of text b, element (j, b, k) the counter (first_clip + b, j * K + k) of
    `uniform_noise` under the key (seed + HARD_NEGATIVE_SEED_OFFSET, offset)."""
    u = uniform_noise((batch_size, 2 * group), seed=seed + HARD_NEGATIVE_SEED_OFFSET, offset=offset,
                      row_offset=first_clip, device=device)  # fmt: skip
    return u.view(batch_size, 2, group).transpose(0, 1)


def hard_negatives(
    vision_feat_BE: torch.Tensor,
    text_feat_BE: torch.Tensor,
    ids_B: torch.Tensor,
    temp: torch.Tensor,
    uniform_2BK: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """VTM's hard negatives: for every video a text and for every text a video, drawn from the
    similarity softmax ``v @ t.T / temp`` WITHIN its group of K consecutive pairs.

    The reference draws them from the similarity softmax of its per-GPU batch (128 pairs), so its
    draws change with the number of GPUs. Here the groups are fixed slices of the global batch
    (K = ``train.vtm_group_size``, 128 by default: the reference's per-GPU batch) and the
    Gumbel noise is keyed by (seed, step, global pair index) (`hard_negative_noise`): any world
    size that keeps whole groups on a rank draws the same negatives, without exchanging features
    between ranks. (Drawing over the whole global batch would need every rank's vision tokens and
    text features, with their gradients: an all-gather of [G, N, D] and [G, S, H] per step.)

    Args:
        vision_feat_BE, text_feat_BE: this rank's unit embeddings (B a multiple of K; this rank's
            first pair starts a group); the vision side may be per frame, [B, F, E]
            (`similarity`).
        ids_B: int64 media ids (same id: never a negative).
        temp: the temperature (clamped as in VTC).
        uniform_2BK: `hard_negative_noise` of this rank's pairs; None = one group of all B pairs,
            with uniforms from torch's generator.

    Returns:
        (neg_text_B, valid_v_B, neg_video_B, valid_t_B): int64 indices into this rank's batch, and
        whether the row had a candidate of another id in its group.
    """
    B, E = text_feat_BE.shape
    if uniform_2BK is None:
        uniform_2BK = torch.rand((2, B, B), device=vision_feat_BE.device)
    K = uniform_2BK.shape[-1]
    n = B // K
    with torch.no_grad():
        v = vision_feat_BE.detach().float().view(n, K, *vision_feat_BE.shape[1:])
        t = text_feat_BE.detach().float().view(n, K, E)
        sim_nKK = similarity(v, t) / clamp_temperature(temp.detach().float())
        ids_nK = ids_B.view(n, K)
        neg_text, valid_v = sample_hard_negatives(sim_nKK, ids_nK, uniform_XKK=uniform_2BK[0].reshape(n, K, K))
        neg_video, valid_t = sample_hard_negatives(sim_nKK.transpose(1, 2), ids_nK,
                                                   uniform_XKK=uniform_2BK[1].reshape(n, K, K))  # fmt: skip
        start = torch.arange(0, B, K, device=ids_B.device)[:, None]
    return (neg_text + start).flatten(), valid_v.flatten(), (neg_video + start).flatten(), valid_t.flatten()


def mlm_noise(batch_size: int, seq_len: int, *, seed: int, offset: int, first_clip: int,
              device: torch.device) -> torch.Tensor:  # fmt: skip
    """The uniforms of `mask_tokens` for ``batch_size`` captions, global indices ``first_clip ..``:
    [3, B, S] float32 (chosen, 80/10/10 split, random token), element (j, b, s) the counter
    (first_clip + b, j * S + s) of `uniform_noise` under the key (seed + MLM_SEED_OFFSET, offset)."""
    u = uniform_noise((batch_size, 3 * seq_len), seed=seed + MLM_SEED_OFFSET, offset=offset, row_offset=first_clip,
                      device=device)  # fmt: skip
    return u.view(batch_size, 3, seq_len).transpose(0, 1)


def mask_tokens(
    input_ids_BS: torch.Tensor,
    special_mask_BS: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    prob: float = 0.5,
    generator: torch.Generator | None = None,
    uniform_3BS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking for MLM: each non-special token is chosen with probability `prob`; a chosen one
    becomes [MASK] (80%), a random token (10%) or stays (10%).

    Args:
        input_ids_BS: int64 token ids.
        special_mask_BS: bool, True for special tokens and padding (never chosen).
        generator: for torch's draws when ``uniform_3BS`` is None.
        uniform_3BS: [3, B, S] uniforms in [0, 1) to draw with (`mlm_noise`): whether a token
            is chosen, how it is replaced, and the random token (floor(u * vocab_size)).

    Returns:
        (masked ids [B, S], labels [B, S]: the original id where chosen, -100 elsewhere).
    """
    device = input_ids_BS.device
    shape = input_ids_BS.shape
    if uniform_3BS is None:
        u_chosen = torch.rand(shape, device=device, generator=generator)
        r = torch.rand(shape, device=device, generator=generator)
        random_ids = torch.randint(vocab_size, shape, device=device, generator=generator)
    else:
        u_chosen, r, u_token = uniform_3BS.unbind(0)
        random_ids = (u_token * vocab_size).long().clamp_max(vocab_size - 1)
    chosen = (u_chosen < prob) & ~special_mask_BS
    labels = torch.where(chosen, input_ids_BS, torch.full_like(input_ids_BS, -100))
    ids = torch.where(chosen & (r < 0.8), torch.full_like(input_ids_BS, mask_token_id), input_ids_BS)
    ids = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, ids)
    return ids, labels


def mlm_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the chosen tokens (labels != -100) of the global batch (`mean_over_ranks`:
    this rank's share); 0 when none was chosen."""
    losses = F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=-100, reduction="sum")
    return mean_over_ranks(losses, (labels_BS != -100).sum())


def vtm_loss(logits_X2: torch.Tensor, labels_X: torch.Tensor, weights_X: torch.Tensor) -> torch.Tensor:
    """Weighted mean cross-entropy of the VTM head over the global batch (`mean_over_ranks`: this
    rank's share; weights 0 drop pairs without a valid negative)."""
    per = F.cross_entropy(logits_X2.float(), labels_X, reduction="none")
    return mean_over_ranks((per * weights_X).sum(), weights_X.sum())
