"""Plain-PyTorch reference implementations of every umt_kernels op.

Each function here has the same signature and semantics as the public op in
``umt_kernels``; the fused Triton kernels are tested against these. They run on any
device, contain no host synchronisation, and keep every shape static.

Shape legend: G groups (e.g. frames or clips), N items per group, K kept items,
H heads, D head dim, C channels, B batch, T frames, L aligned layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from umt_kernels.rng import uniform_noise

def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp32 and the 16-bit types, fp64 for fp64 (so gradcheck can run in fp64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sample_without_replacement(
    weights_GN: torch.Tensor,
    k: int,
    *,
    seed: int,
    offset: int | torch.Tensor = 0,
    row_offset: int = 0,
    mode: str = "weighted",
) -> torch.Tensor:
    """Draws k of N items per group without replacement; returns sorted indices.

    Gumbel-top-k: keeping the k largest of ``log(w) + Gumbel`` is exactly sequential
    sampling without replacement with probabilities proportional to ``w``.

    Args:
        weights_GN: [G, N] non-negative weights (any float dtype; need not sum to 1).
            Items with weight 0 are drawn only if fewer than k items have positive weight.
            In ``uniform`` mode only the shape and device are used; in ``topk`` mode any
            real values.
        k: items to keep per group, 1 <= k <= N.
        seed, offset: the randomness; the same (seed, offset, shape) gives the same draw.
            ``offset`` may be a 0-dim int64 tensor on the weights' device.
        row_offset: global index of row 0 (for a slice of a larger batch).
        mode: ``"weighted"`` (probability proportional to weights), ``"uniform"``, or
            ``"topk"`` (deterministic: the k largest weights, ties in index order; seed and
            offset unused).

    Returns:
        idx_GK: [G, k] int64, ascending within each row, no duplicates.
    """
    check_sampling_args(weights_GN, k, mode)
    if mode == "topk":
        return sample_from_noise(weights_GN, k, None, mode)
    u = uniform_noise(tuple(weights_GN.shape), seed=seed, offset=offset, row_offset=row_offset, device=weights_GN.device)
    return sample_from_noise(weights_GN, k, u, mode)


SAMPLING_MODES = ("weighted", "uniform", "topk")


def check_sampling_args(weights_GN: torch.Tensor, k: int, mode: str) -> None:
    if weights_GN.dim() != 2:
        raise ValueError(f"weights_GN must be 2-D [G, N], got shape {tuple(weights_GN.shape)}")
    num_items = weights_GN.shape[1]
    if not 1 <= k <= num_items:
        raise ValueError(f"k must be in [1, N={num_items}], got {k}")
    if mode not in SAMPLING_MODES:
        raise ValueError(f"mode must be one of {SAMPLING_MODES}, got {mode!r}")


def sample_from_noise(weights_GN: torch.Tensor, k: int, u_GN: torch.Tensor | None, mode: str) -> torch.Tensor:
    """The selection rule given uniform noise ``u_GN`` in [0, 1): the k largest Gumbel keys
    ``log(w) - log(-log(u))`` (weighted), of ``u`` itself (uniform) or of ``w`` (topk, no
    noise), equal keys taken in index order, returned ascending."""
    if mode == "topk":
        keys = weights_GN.float()
    elif mode == "uniform":
        keys = u_GN
    else:
        keys = torch.log(weights_GN.float()) - torch.log(-torch.log(u_GN.clamp_min(2.0**-25)))
    idx = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :k]
    return idx.sort(dim=1).values


def cls_attention(q_cls_GHD: torch.Tensor, k_GHND: torch.Tensor, scale: float) -> torch.Tensor:
    """Heads-averaged softmax attention of one (CLS) query over N keys.

    Args:
        q_cls_GHD: [G, H, D] the CLS query of each group (unscaled).
        k_GHND: [G, H, N, D] keys.
        scale: logit scale, usually 1/sqrt(D).

    Returns:
        [G, N] float32 (float64 for float64 inputs): softmax over N of scale * <q, k>,
        averaged over H. No N x N matrix is formed.
    """
    dtype = compute_dtype(q_cls_GHD)
    with torch.autocast(device_type=q_cls_GHD.device.type, enabled=False):  # keep the scores in fp32
        logits_GHN = torch.einsum("ghd,ghnd->ghn", q_cls_GHD.to(dtype), k_GHND.to(dtype)) * scale
        return logits_GHN.softmax(dim=-1).mean(dim=1)


def gather_rows(x_GNC: torch.Tensor, idx_GK: torch.Tensor) -> torch.Tensor:
    """x_GNC [G, N, C], idx_GK [G, K] int64 -> [G, K, C]; gradients scatter-add back into x."""
    return torch.gather(x_GNC, 1, idx_GK.unsqueeze(-1).expand(-1, -1, x_GNC.shape[-1]))


def select_and_gather(
    scores_GN: torch.Tensor, x_GNC: torch.Tensor, k: int, *, seed: int, offset: int | torch.Tensor = 0, row_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples k rows per group by ``scores`` (weighted, without replacement) and gathers them.

    Returns ``(idx_GK [G, k] int64 sorted, x_GKC [G, k, C])``.
    """
    idx_GK = sample_without_replacement(scores_GN, k, seed=seed, offset=offset, row_offset=row_offset)
    return idx_GK, gather_rows(x_GNC, idx_GK)


def gather_patches(video_BCTHW: torch.Tensor, idx_BK: torch.Tensor, patch: int) -> torch.Tensor:
    """Raw pixels of only the kept patches (im2col restricted to the visible set).

    Args:
        video_BCTHW: [B, C, T, H, W] with H and W divisible by ``patch``.
        idx_BK: [B, K] int64 token indices t * (H/p * W/p) + h * (W/p) + w.
        patch: patch side p (tubelet size 1).

    Returns:
        [B, K, C * p * p], each row flattened in (c, ph, pw) order: the order of a
        Conv3d(kernel=(1, p, p)) weight flattened to [C_out, C*p*p].
    """
    B, C, T, H, W = video_BCTHW.shape
    if H % patch or W % patch:
        raise ValueError(f"frame size {H}x{W} is not divisible by patch size {patch}")
    gh, gw = H // patch, W // patch
    patches = (
        video_BCTHW.reshape(B, C, T, gh, patch, gw, patch)
        .permute(0, 2, 3, 5, 1, 4, 6)
        .reshape(B, T * gh * gw, C * patch * patch)
    )
    return gather_rows(patches, idx_BK)


def alignment_loss(student_LBNC: torch.Tensor, teacher_LBNC: torch.Tensor) -> torch.Tensor:
    """UMT's unmasked-token alignment loss: mean over L, B, N of 2 - 2 cos(s, t).

    Both inputs are normalised again here (a no-op up to rounding for the unit vectors the
    models emit), so the value is a true cosine distance; accumulation is in fp32.
    Returns a 0-dim float32 tensor (float64 for float64 inputs).
    """
    dtype = compute_dtype(student_LBNC)
    s = F.normalize(student_LBNC.to(dtype), dim=-1)
    t = F.normalize(teacher_LBNC.to(dtype), dim=-1)
    return (2.0 - 2.0 * (s * t).sum(dim=-1)).mean()


def alignment_loss_backward(
    grad: torch.Tensor, student_LBNC: torch.Tensor, teacher_LBNC: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`alignment_loss` w.r.t. both inputs, given the upstream 0-dim grad.

    With x_hat = x / max(|x|, eps) and R rows: d/ds = -2 g / R * (t_hat - cos * s_hat) / |s|,
    and symmetrically for t. Returned in the inputs' dtypes.
    """
    dtype = compute_dtype(student_LBNC)
    s, t = student_LBNC.to(dtype), teacher_LBNC.to(dtype)
    s_norm = s.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    t_norm = t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s_hat, t_hat = s / s_norm, t / t_norm
    cos = (s_hat * t_hat).sum(dim=-1, keepdim=True)
    coef = -2.0 * grad.to(dtype) / (s.numel() // s.shape[-1])
    grad_s = coef * (t_hat - cos * s_hat) / s_norm
    grad_t = coef * (s_hat - cos * t_hat) / t_norm
    return grad_s.to(student_LBNC.dtype), grad_t.to(teacher_LBNC.dtype)
