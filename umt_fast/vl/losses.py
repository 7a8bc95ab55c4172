"""Stage-2 losses: video-text contrastive (VTC), matching (VTM) hard negatives, masked language
modelling (MLM) masking. The unmasked-token alignment (UTA) is `umt_fast.losses.alignment_loss`.

No host syncs: no boolean indexing, no torch.multinomial (its argument checks read back);
the hard negatives are drawn with the Gumbel-max trick on the device.

Shape legend: B local batch, G = B * world size gathered batch, E embedding dim, S tokens.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

TEMP_MIN, TEMP_MAX = 0.001, 0.5


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


def clamp_temperature(temp: torch.Tensor) -> torch.Tensor:
    """The learnable temperature, clamped to [0.001, 0.5] (differentiable inside the range)."""
    return temp.clamp(TEMP_MIN, TEMP_MAX)


def vtc_loss(
    vision_feat_BE: torch.Tensor, text_feat_BE: torch.Tensor, ids_B: torch.Tensor, temp: torch.Tensor
) -> torch.Tensor:
    """Video-text contrastive loss over the batch gathered from every rank (with gradients).

    Args:
        vision_feat_BE, text_feat_BE: L2-normalised embeddings of this rank's pairs.
        ids_B: int64 media ids; pairs with the same id (captions of one video) are all positives.
        temp: the learnable temperature, 0-dim or [1] (clamped to [0.001, 0.5] here).

    Returns:
        0-dim: (loss_v2t + loss_t2v) / 2, each the cross-entropy against the uniform distribution
        over a row's positives, averaged over the G gathered rows.
    """
    v = gather_with_grad(vision_feat_BE)
    t = gather_with_grad(text_feat_BE)
    ids = gather_no_grad(ids_B)
    logits_GG = v @ t.t() / clamp_temperature(temp)
    pos_GG = (ids[:, None] == ids[None, :]).to(logits_GG.dtype)
    target_GG = pos_GG / pos_GG.sum(1, keepdim=True)
    loss_v2t = -(F.log_softmax(logits_GG, dim=1) * target_GG).sum(1).mean()
    loss_t2v = -(F.log_softmax(logits_GG.t(), dim=1) * target_GG).sum(1).mean()
    return (loss_v2t + loss_t2v) / 2


def sample_hard_negatives(
    sim_BB: torch.Tensor, ids_B: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One negative per row, drawn with probability softmax(sim) over the columns whose id differs
    from the row's (never the positive, never a same-id item).

    Args:
        sim_BB: [B, B] similarity logits (row i: query i against every candidate).
        ids_B: int64 ids of the pairs.

    Returns:
        (index_B int64, valid_B bool): the sampled column per row, and whether the row had any
        candidate of another id (where it had none the index is meaningless and the caller
        must not train on it).
    """
    same_BB = ids_B[:, None] == ids_B[None, :]
    logits = sim_BB.detach().float().masked_fill(same_BB, float("-inf"))
    u = torch.rand(logits.shape, device=logits.device, generator=generator).clamp_(1e-20, 1.0)
    gumbel = -torch.log(-torch.log(u))
    index_B = (logits + gumbel).argmax(dim=1)
    valid_B = (~same_BB).any(dim=1)
    return index_B, valid_B


def mask_tokens(
    input_ids_BS: torch.Tensor,
    special_mask_BS: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking for MLM: each non-special token is chosen with probability `prob`; a chosen one
    becomes [MASK] (80%), a random token (10%) or stays (10%).

    Args:
        input_ids_BS: int64 token ids.
        special_mask_BS: bool, True for special tokens and padding (never chosen).

    Returns:
        (masked ids [B, S], labels [B, S]: the original id where chosen, -100 elsewhere).
    """
    device = input_ids_BS.device
    shape = input_ids_BS.shape
    chosen = (torch.rand(shape, device=device, generator=generator) < prob) & ~special_mask_BS
    labels = torch.where(chosen, input_ids_BS, torch.full_like(input_ids_BS, -100))
    r = torch.rand(shape, device=device, generator=generator)
    random_ids = torch.randint(vocab_size, shape, device=device, generator=generator)
    ids = torch.where(chosen & (r < 0.8), torch.full_like(input_ids_BS, mask_token_id), input_ids_BS)
    ids = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, ids)
    return ids, labels


def mlm_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the chosen tokens (labels != -100); 0 when none was chosen."""
    losses = F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=-100, reduction="sum")
    count = (labels_BS != -100).sum().clamp_min(1)
    return losses / count


def vtm_loss(logits_X2: torch.Tensor, labels_X: torch.Tensor, weights_X: torch.Tensor) -> torch.Tensor:
    """Weighted mean cross-entropy of the VTM head (weights 0 drop pairs without a valid negative)."""
    per = F.cross_entropy(logits_X2.float(), labels_X, reduction="none")
    return (per * weights_X).sum() / weights_X.sum().clamp_min(1)
