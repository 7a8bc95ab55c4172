"""The mask figure: a clip's frames, the teacher's CLS attention, the tokens each mask policy
keeps, and (given a student) how well the student matches the teacher on its kept tokens.

One PNG, one column per sampled frame, one row per view::

    frames | teacher CLS attention | attention mask | tube mask | random mask | [student]

The clip is sampled the way pre-training samples it, in deterministic form: TSN frame indices
at the middle of each segment, and the multi-scale crop at scale 1 in the centre position,
resized to ``data.img_size``. The masks come from `umt_fast.masking.sample_visible_tokens`
with a fixed seed, so the same clip and seed always give the same picture. Each policy draws
with its own offset (attention offset, tube offset + 1, random offset + 2): with one shared
offset the policies would reuse the same noise, and against a near-uniform (random) teacher
the attention mask would look like a copy of the tube mask.

Shape legend: T frames, S crop side, g token grid side, P = g * g tokens per frame,
N visible tokens of a clip, L aligned layers, Ct teacher feature width.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from umt_fast.data import (
    VideoDecodeError,
    count_frames,
    crop_resize_flip,
    decode_frames,
    fixed_crop_offsets,
    normalize_video,
    tsn_frame_indices,
)
from umt_fast.masking import POLICIES, num_visible, sample_visible_tokens
from umt_fast.viz.overlay import (
    KEPT_OUTLINE_RGB,
    attention_heatmap,
    mask_overlay,
    token_value_overlay,
    upscale_nearest,
    visible_token_grid,
)
from umt_fast.viz.render import DPI, new_figure

ATTENTION_CMAP = "inferno"
AGREEMENT_CMAP = "viridis"
_POLICY_LABELS = {"attention": "attention mask\n(UMT, semantic)", "tube": "tube mask", "random": "random mask"}

# Layout, in pixels.
_LABEL_W, _RIGHT_W, _HEADER_H, _FOOTER_H = 180, 120, 22, 40
_COL_GAP, _ROW_GAP, _TITLE_LINE_H = 6, 8, 22
_TARGET_PANEL_PX = 200


@dataclass
class EvalClip:
    """A clip sampled deterministically for figures.

    Attributes:
        frames_THWC: uint8 [T, S, S, 3], the student's crop.
        frame_indices: the T decoded frame numbers.
        num_video_frames: frames in the video.
        path: the video file.
    """

    frames_THWC: torch.Tensor
    frame_indices: list[int]
    num_video_frames: int
    path: str


def load_eval_clip(path: str, num_frames: int, img_size: int) -> EvalClip:
    """The pre-training sampling of ``path`` in deterministic form: TSN indices at the middle
    of each segment, the largest multi-scale crop (the short side) in the centre position of
    the fixed grid, resized to img_size x img_size, no flip.

    Raises:
        VideoDecodeError: the video cannot be decoded.
    """
    num_video_frames = count_frames(path)
    indices = tsn_frame_indices(num_video_frames, num_frames, None)
    try:
        frames_THWC = decode_frames(path, indices)
    except VideoDecodeError as e:
        # The metadata overstated the frame count: sample again from the true one (as the loader does).
        if not e.num_decodable_frames or e.num_decodable_frames >= num_video_frames:
            raise
        num_video_frames = e.num_decodable_frames
        indices = tsn_frame_indices(num_video_frames, num_frames, None)
        frames_THWC = decode_frames(path, indices)
    _, height, width, _ = frames_THWC.shape
    side = min(height, width)
    x0, y0 = fixed_crop_offsets(width, height, side, side)[4]  # the centre of the 13-offset grid
    clip = crop_resize_flip(frames_THWC, (x0, y0, side, side), img_size, flip=False)
    return EvalClip(clip, indices, num_video_frames, path)


@dataclass
class MaskViews:
    """Everything the mask figure shows, on the host.

    Attributes:
        frames_THWC: uint8 [T, S, S, 3].
        cls_attn_TP: float32 [T, P], the teacher's last-block heads-averaged CLS attention.
        grid: g.
        ratio: the mask ratio the masks were drawn with.
        visible: policy -> sorted visible token indices, int64 [N] (t * P + p).
        student_policy: the policy whose tokens `student_cos_N` is measured on, or None.
        student_cos_N: float32 [N], the cosine between the student's and the teacher's
            (L2-normalised) features per visible token, averaged over the L aligned layers;
            loss = mean(2 - 2 cos).
    """

    frames_THWC: np.ndarray
    cls_attn_TP: np.ndarray
    grid: int
    ratio: float
    visible: dict[str, np.ndarray] = field(default_factory=dict)
    student_policy: str | None = None
    student_cos_N: np.ndarray | None = None


@torch.no_grad()
def compute_mask_views(
    frames_THWC: torch.Tensor,
    teacher: torch.nn.Module,
    *,
    ratio: float,
    seed: int,
    offset: int = 0,
    policies: tuple[str, ...] = POLICIES,
    student: torch.nn.Module | None = None,
    student_policy: str = "attention",
    device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> MaskViews:
    """Runs the teacher (and the student) on one clip and draws every policy's mask.

    Args:
        frames_THWC: uint8 [T, S, S, 3], e.g. `EvalClip.frames_THWC`.
        teacher: a CLIPVisionTeacher whose token grid equals S / student patch.
        ratio, seed, offset: as in `sample_visible_tokens`; policy i of `POLICIES` draws with
            offset + i, so the panels are independent draws.
        student: optional SparseVideoStudent; its agreement with the teacher is measured on
            the tokens of ``student_policy``. Its train/eval mode is left as it is.
        device: where to run; default the teacher's device.
        autocast_dtype: autocast as in the training step (e.g. bf16 on a GPU), or None.
    """
    device = device or next(teacher.parameters()).device
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    )
    T = frames_THWC.shape[0]
    video_BCTHW = normalize_video(frames_THWC.unsqueeze(0).to(device))
    with autocast:
        teacher_out = teacher(video_BCTHW)
    cls_attn_BTP = teacher_out.cls_attn.float()
    P = cls_attn_BTP.shape[-1]
    grid = math.isqrt(P)
    views = MaskViews(
        frames_THWC=frames_THWC.cpu().numpy(),
        cls_attn_TP=cls_attn_BTP[0].cpu().numpy(),
        grid=grid,
        ratio=ratio,
    )
    wanted = list(policies) + ([student_policy] if student is not None and student_policy not in policies else [])
    for policy in wanted:
        visible_idx_BN = sample_visible_tokens(
            policy, batch_size=1, num_frames=T, patches_per_frame=P, ratio=ratio,
            seed=seed, offset=offset + POLICIES.index(policy), device=device, cls_attn_BTP=cls_attn_BTP,
        )  # fmt: skip
        views.visible[policy] = visible_idx_BN[0].cpu().numpy()
        if student is not None and policy == student_policy:
            with autocast:
                targets_LBNC = teacher_out.targets(visible_idx_BN)
                student_LBNC = student(video_BCTHW, visible_idx_BN)
            cos_BN = (student_LBNC.float() * targets_LBNC.float()).sum(-1).mean(0)
            views.student_policy = policy
            views.student_cos_N = cos_BN[0].cpu().numpy()
    return views


@dataclass
class MaskFigureInfo:
    """What the figure's title says."""

    clip_name: str
    frame_indices: list[int]
    num_video_frames: int
    teacher: str
    """e.g. "tiny @ 112 px, weights clip_b16.pth"."""
    random_teacher: bool
    seed: int
    step: int | None = None


def title_lines(info: MaskFigureInfo, views: MaskViews) -> list[tuple[str, str]]:
    """The figure's title as (text, colour) lines; a random teacher gets a red warning line."""
    S = views.frames_THWC.shape[1]
    frames = ", ".join(map(str, info.frame_indices))
    where = f"step {info.step}  |  " if info.step is not None else ""
    lines = [
        (f"{where}{info.clip_name}: frames {frames} of {info.num_video_frames}, centre crop at {S} px", "black"),
        (
            f"teacher {info.teacher}  |  mask ratio {views.ratio:g} "
            f"({views.grid}x{views.grid} tokens per frame)  |  seed {info.seed}",
            "black",
        ),
    ]
    if info.random_teacher:
        lines.append(
            ("RANDOM TEACHER (random weights): its attention carries no meaning, so neither does the "
             "attention mask", "#c00000")
        )  # fmt: skip
    return lines


def _panel_scale(side: int) -> int:
    return max(1, round(_TARGET_PANEL_PX / side))


def mask_figure_size(num_frames: int, img_size: int, num_rows: int, num_title_lines: int) -> tuple[int, int]:
    """(width, height) in pixels of a mask figure."""
    panel = img_size * _panel_scale(img_size)
    width = _LABEL_W + num_frames * panel + (num_frames - 1) * _COL_GAP + _RIGHT_W
    height = (
        num_title_lines * _TITLE_LINE_H + 12 + _HEADER_H + num_rows * panel + (num_rows - 1) * _ROW_GAP + _FOOTER_H
    )
    return width, height


def _kept_label(policy: str, views: MaskViews) -> str:
    T, P = views.cls_attn_TP.shape
    if policy == "random":
        return f"keeps {num_visible(T * P, views.ratio)}/{T * P}\nper clip"
    return f"keeps {num_visible(P, views.ratio)}/{P}\nper frame"


def draw_mask_figure(views: MaskViews, info: MaskFigureInfo) -> Figure:
    """The mask figure; its pixel size is `mask_figure_size` (fixed, no tight bounding box)."""
    T, S = views.frames_THWC.shape[:2]
    g = views.grid
    scale = _panel_scale(S)
    panel = S * scale
    policies = [p for p in POLICIES if p in views.visible]
    rows: list[tuple[str, list[np.ndarray], dict | None]] = []

    frames = [upscale_nearest(f, scale) for f in views.frames_THWC]
    rows.append(("frames\n(centre crop)", frames, None))

    attn_TP = views.cls_attn_TP * views.cls_attn_TP.shape[1]  # 1 = uniform attention
    vmax = float(max(attn_TP.max(), 1e-6))
    heat = [attention_heatmap(f, a.reshape(g, g), vmax=vmax, cmap=ATTENTION_CMAP) for f, a in zip(frames, attn_TP)]
    rows.append((
        "teacher's CLS\nattention\n(last block)", heat,
        dict(vmin=0.0, vmax=vmax, cmap=ATTENTION_CMAP, label="attention x P\n(1 = uniform)"),
    ))  # fmt: skip

    for policy in policies:
        kept_Tgg = visible_token_grid(views.visible[policy], T, g)
        panels = [mask_overlay(f, k) for f, k in zip(frames, kept_Tgg)]
        label = f"{_POLICY_LABELS[policy]}\n{_kept_label(policy, views)}"
        rows.append((label, panels, dict(counts=kept_Tgg.reshape(T, -1).sum(1))))

    if views.student_cos_N is not None and views.student_policy is not None:
        idx = views.visible[views.student_policy]
        values = np.full(T * g * g, np.nan, dtype=np.float32)
        values[idx] = views.student_cos_N
        values_Tgg = values.reshape(T, g, g)
        panels = [token_value_overlay(f, v, vmin=0.0, vmax=1.0, cmap=AGREEMENT_CMAP) for f, v in zip(frames, values_Tgg)]
        mean_cos = float(np.mean(views.student_cos_N))
        label = (
            f"student vs teacher\n(cosine per kept\ntoken, {views.student_policy}\nmask)\n"
            f"mean {mean_cos:.2f}, loss {2 - 2 * mean_cos:.3f}"
        )
        rows.append((label, panels, dict(vmin=0.0, vmax=1.0, cmap=AGREEMENT_CMAP, label="cosine\n(1 = match)")))

    titles = title_lines(info, views)
    width, height = mask_figure_size(T, S, len(rows), len(titles))
    fig = new_figure(width, height)
    top = len(titles) * _TITLE_LINE_H + 12
    for i, (text, colour) in enumerate(titles):
        fig.text(0.5, 1 - (8 + i * _TITLE_LINE_H) / height, text, ha="center", va="top", fontsize=11,
                 color=colour, weight="bold" if i == 0 or colour != "black" else "normal")  # fmt: skip

    def box(x_px: float, y_top_px: float, w_px: float, h_px: float) -> list[float]:
        return [x_px / width, 1 - (y_top_px + h_px) / height, w_px / width, h_px / height]

    for r, (label, panels, extra) in enumerate(rows):
        y = top + _HEADER_H + r * (panel + _ROW_GAP)
        for c, image in enumerate(panels):
            ax = fig.add_axes(box(_LABEL_W + c * (panel + _COL_GAP), y, panel, panel))
            ax.imshow(image, interpolation="nearest")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(f"frame {info.frame_indices[c]}", fontsize=9, pad=3)
            if extra and "counts" in extra:
                ax.text(0.03, 0.97, f"{extra['counts'][c]} kept", transform=ax.transAxes, ha="left", va="top",
                        fontsize=8, color="white",
                        bbox=dict(facecolor="black", alpha=0.65, pad=1.5, edgecolor="none"))  # fmt: skip
        fig.text((_LABEL_W - 10) / width, 1 - (y + panel / 2) / height, label, ha="right", va="center", fontsize=9)
        if extra and "cmap" in extra:
            cax = fig.add_axes(box(width - _RIGHT_W + 12, y + panel * 0.08, 12, panel * 0.84))
            mappable = ScalarMappable(norm=Normalize(extra["vmin"], extra["vmax"]), cmap=extra["cmap"])
            bar = fig.colorbar(mappable, cax=cax)
            bar.ax.tick_params(labelsize=7)
            bar.set_label(extra["label"], fontsize=8)

    outline_hex = "#{:02x}{:02x}{:02x}".format(*KEPT_OUTLINE_RGB)
    fig.text(_LABEL_W / width, 12 / height, "outlined: token kept (the student sees it)", ha="left", va="bottom",
             fontsize=9, color="black", bbox=dict(facecolor=outline_hex, alpha=0.5, pad=2, edgecolor="none"))  # fmt: skip
    fig.text((_LABEL_W + 290) / width, 12 / height, "grey: masked (hidden from the student)", ha="left", va="bottom",
             fontsize=9, color="black", bbox=dict(facecolor="#969696", alpha=0.5, pad=2, edgecolor="none"))  # fmt: skip
    assert abs(fig.get_figwidth() * DPI - width) < 0.5
    return fig


def describe_teacher(arch: str, input_resolution: int, weights: str) -> tuple[str, bool]:
    """("tiny @ 112 px, random weights", True) or ("vit_b16 @ 224 px, weights clip.pth", False)."""
    if weights in ("", "none"):
        return f"{arch} @ {input_resolution} px, random weights", True
    return f"{arch} @ {input_resolution} px, weights {os.path.basename(weights)}", False
