"""The fine-tuning recipe for action recognition (UMT_SPEC.md section 3): the classifier, its
optimizer, the batch augmentation on the device, the step, the multi-view evaluation and the loop.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from umt_fast.config import SAMPLE_CLIPS, STUDENT_SIZES
from umt_fast.config.finetune import FinetuneConfig, mix_sources, scaled_lrs
from umt_fast.data import BadSampleBudget, write_sample_clip_list
from umt_fast.data.annotations import check_labels, read_labelled_list
from umt_fast.data.annotations import VideoRecord
from umt_fast.data.labelled import FinetuneClipDataset, build_finetune_loader, read_class_names
from umt_fast.data.mix import MixSource, SourceMix, read_mix
from umt_fast.data.transforms import normalize_video
from umt_fast.engine import checkpoint as ckpt
from umt_fast.engine.distributed import (
    DistInfo,
    barrier,
    exchange_with,
    unwrap,
    wrap_model,
)
from umt_fast.engine.flops import classifier_flops_per_clip, transformer_forward_flops
from umt_fast.engine.optim import WarmupCosineSchedule
from umt_fast.engine.trainer import Recipe, Setup, TrainResult, run
from umt_fast.models.classifier import VideoViT, VideoViTArch, head_dropout_scales
from umt_fast.models.student import drop_path_scales, keep_probabilities
from umt_fast.recipes.evaluation import accuracy_report, format_report, predict_videos
from umt_fast.recipes.pretrain import compile_blocks

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Model and optimizer
# --------------------------------------------------------------------------------------------


def build_model(cfg: FinetuneConfig, num_classes: int) -> VideoViT:
    """The classifier of ``cfg``, initialised from ``model.init`` when set.

    With ``model.probe`` linear or attentive: the backbone is frozen (`VideoViT` with a probe),
    built without drop path, and keeps the init file's final norm when it has one (stage-1 and
    stage-2 encoders); the file's ``fc_norm`` and head are not used, the probe head starts fresh.
    The backbone loads through the same `interop.init_video_vit` as fine-tuning's.
    """
    size = STUDENT_SIZES[cfg.model.size]
    probe = cfg.model.probe
    source = cfg.model.init
    if source and os.path.isdir(source):  # a run directory or checkpoint of ours
        from umt_fast.engine.checkpoint import read_run_checkpoint

        source, _ = read_run_checkpoint(source)
    final_norm = False
    if probe != "none":
        if source:
            source = probe_backbone_state_dict(source)
        final_norm = "norm.weight" in source if source else True  # no init: a fresh encoder's final norm
    arch = VideoViTArch(
        width=size["width"], depth=size["depth"], heads=size["heads"], num_frames=cfg.data.num_frames,
        img_size=cfg.data.img_size, patch_size=cfg.model.patch_size, num_classes=num_classes,
        drop_path=0.0 if probe != "none" else cfg.model.drop_path, head_dropout=cfg.model.head_dropout,
        final_norm=final_norm, probe=probe, probe_queries=cfg.model.probe_queries, probe_heads=cfg.model.probe_heads,
    )  # fmt: skip
    model = VideoViT(arch)
    if cfg.model.init:
        from umt_fast import interop

        if cfg.model.head_label_map:  # against the class count, which may come from the labels
            interop.read_head_label_map(cfg.model.head_label_map, num_classes, name="model.head_label_map")
        if probe == "attentive":  # the fresh pooler, as the fresh head, is part of what loads
            source = {**source, **{k: v for k, v in model.state_dict().items() if k.startswith("probe.")}}
        interop.init_video_vit(model, source, strict=cfg.model.init_strict,
                               head_label_map=cfg.model.head_label_map or None)
        log.info("initialised from %s", cfg.model.init)
    if probe == "none":
        model.set_grad_checkpointing(num_blocks=cfg.train.checkpointed_blocks(arch.depth))
    return model


PROBE_HEAD_PREFIXES = ("fc_norm.", "head.", "probe.")
"""What a probe does not take from its init file: the head side of a fine-tuned or probe checkpoint."""


def probe_backbone_state_dict(source) -> dict[str, torch.Tensor]:
    """The init file's (or state dict's) keys in the canonical naming, without its head side
    (`PROBE_HEAD_PREFIXES`), for a probe's frozen backbone."""
    from umt_fast import interop

    sd = interop.canonical_video_state_dict(interop.read_state_dict(source, "init checkpoint"))
    unused = sorted({k.split(".", 1)[0] for k in sd if k.startswith(PROBE_HEAD_PREFIXES)})
    if unused:
        log.info("probe: the init checkpoint's %s not used (the probe's head starts fresh)", ", ".join(unused))
    return {k: v for k, v in sd.items() if not k.startswith(PROBE_HEAD_PREFIXES)}


def probe_flops_per_clip(arch: VideoViTArch) -> float:
    """A probe's training FLOPs for one clip: the frozen backbone's forward (no backward) plus the
    head's forward and backward (the attentive pooler's projections, attention and MLP)."""
    N, D = arch.num_tokens, arch.width
    head = 2 * D * arch.num_classes
    if arch.probe == "attentive":
        Q = arch.probe_queries
        head += 2 * N * D * 2 * D + 2 * Q * D * D + 4 * Q * N * D + 4 * arch.mlp_ratio * Q * D * D
    return transformer_forward_flops(N, N, D, arch.depth, arch.mlp_ratio) + 3 * head


def layer_decay_param_groups(model: VideoViT, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups keyed by (depth, decay): ``lr_scale`` = layer_decay^(depth + 1 - layer_id)
    (the head at 1), no weight decay on 1-D parameters, biases and ``no_weight_decay()``."""
    depth = model.arch.depth
    skip = model.no_weight_decay()
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name.endswith(".bias") or name in skip)
        layer = model.layer_id(name)
        group = groups.setdefault((layer, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - layer), "layer": layer,
        })  # fmt: skip
        group["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW over `layer_decay_param_groups`, with the fused kernel (CUDA and CPU: one launch,
    and no read-back of the step counter). A probe's frozen backbone is not in it: its groups
    hold the head's parameters only, all at ``lr_scale`` 1."""
    inner = getattr(model, "module", model)
    groups = layer_decay_param_groups(inner, cfg.optim.weight_decay, cfg.optim.layer_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=0.0, betas=cfg.optim.betas, eps=cfg.optim.eps, fused=True)


# --------------------------------------------------------------------------------------------
# Batch augmentation on the device: random erasing, mixup / cutmix, soft targets
# --------------------------------------------------------------------------------------------


def random_erasing_boxes(
    num_images: int, height: int, width: int, probability: float, rng: np.random.Generator
) -> list[tuple[int, int, int, int, int]]:
    """timm's RandomErasing boxes (area 2%..1/3, aspect 0.3..3.3, 10 tries), one decision per
    image: [(image, top, left, h, w)] of the images that are erased."""
    boxes = []
    for i in range(num_images):
        if rng.random() >= probability:
            continue
        for _ in range(10):
            area = height * width * rng.uniform(0.02, 1 / 3)
            aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                boxes.append((i, top, left, h, w))
                break
    return boxes


def random_erasing_mask(
    num_images: int, height: int, width: int, probability: float, rng: np.random.Generator
) -> torch.Tensor | None:
    """`random_erasing_boxes` as bool [num_images, 1, H, W] (True = erase), or None when nothing
    is erased."""
    boxes = random_erasing_boxes(num_images, height, width, probability, rng)
    if not boxes:
        return None
    mask = torch.zeros(num_images, 1, height, width, dtype=torch.bool)
    for i, top, left, h, w in boxes:
        mask[i, :, top:top + h, left:left + w] = True
    return mask


@dataclass
class MixParams:
    """One batch's mixing decision: lam = weight of each clip's own content and label."""

    lam: float
    box: tuple[int, int, int, int] | None  # cutmix (y0, y1, x0, x1), or None for mixup


def draw_mix(height: int, width: int, mixup: float, cutmix: float, mix_prob: float, switch_prob: float,
             rng: np.random.Generator) -> MixParams:  # fmt: skip
    """timm's Mixup in batch mode: pick mixup or cutmix, draw lam ~ Beta(alpha, alpha); for
    cutmix a box of area (1 - lam), clipped to the frame, and lam corrected to the clipped area."""
    if (mixup <= 0 and cutmix <= 0) or rng.random() >= mix_prob:
        return MixParams(1.0, None)
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < switch_prob)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    if not use_cutmix:
        return MixParams(lam, None)
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    return MixParams(lam, (y0, y1, x0, x1))


def soft_targets(labels_B: torch.Tensor, num_classes: int, smoothing: float, lam: float,
                 partner_labels_B: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """[B] -> [B, K]: smoothed one-hot of each label mixed with that of its mixing partner
    (``partner_labels_B``; default: the flipped batch)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off

    def one_hot(labels: torch.Tensor) -> torch.Tensor:
        return torch.full((labels.shape[0], num_classes), off, device=labels.device).scatter_(1, labels[:, None], on)

    own = one_hot(labels_B)
    if lam == 1.0:
        return own
    partner = own.flip(0) if partner_labels_B is None else one_hot(partner_labels_B)
    return own * lam + partner * (1.0 - lam)


class FinetuneStep:
    """Callable ``(video_uint8 [B, T, S, S, 3], labels [B], step) -> (loss, correct)``: both
    0-dim device tensors (no host sync). ``correct`` counts clips whose top-1 prediction is
    their own, un-mixed label.

    Under torchrun each rank passes its share of the global batch (rank r holds global clips
    [r*B, (r+1)*B)), and every random draw is made for the global batch, so a step does the
    same work at any world size: the erasing boxes are drawn for all clips from the step's
    generator and each clip's noise comes from its global index; mixup / cutmix pair global
    clip i with clip G-1-i (timm's batch mode over the global batch), whose rows live on rank
    world_size-1-r and are exchanged with it.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: FinetuneConfig, num_classes: int,
                 device: torch.device, rank: int = 0, world_size: int = 1):  # fmt: skip
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.num_classes, self.device = num_classes, device
        self.rank, self.world_size = rank, world_size
        self.use_bf16 = device.type == "cuda" and cfg.train.precision == "bf16"
        self.keep_prob = keep_probabilities(unwrap(model).drop_probs, device)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_bf16 else contextlib.nullcontext()

    def _erase(self, video: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Random erasing per frame (as the reference) with normal noise: [B, C, T, H, W]."""
        B, C, T, H, W = video.shape
        first = self.rank * B * T  # this rank's first frame in the global batch
        boxes = random_erasing_boxes(B * T * self.world_size, H, W, self.cfg.aug.random_erasing, rng)
        if not boxes:
            return video
        noise_seed = int(rng.integers(2**62))
        mask = torch.zeros(B, T, H, W, dtype=torch.bool)
        erased = set()
        for i, top, left, h, w in boxes:
            if first <= i < first + B * T:
                clip, t = divmod(i - first, T)
                mask[clip, t, top:top + h, left:left + w] = True
                erased.add(clip)
        if not erased:
            return video
        noise = torch.empty_like(video)
        generator = torch.Generator(self.device)
        for clip in sorted(erased):  # each clip's noise from its global index
            generator.manual_seed(noise_seed + self.rank * B + clip)
            noise[clip] = torch.randn(noise.shape[1:], generator=generator, device=self.device)
        return torch.where(mask[:, None].to(self.device, non_blocking=True), noise, video)

    def _partners(self, video: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixing partners of this rank's clips: rows of the flipped global batch."""
        if self.world_size > 1:
            video, labels = exchange_with(self.world_size - 1 - self.rank, [video, labels])
        return video.flip(0), labels.flip(0)

    def __call__(self, video_BTHWC: torch.Tensor, labels_B: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        aug = self.cfg.aug
        rng = np.random.default_rng([self.cfg.train.seed, step])  # host-side draws: reproducible per step
        video = normalize_video(video_BTHWC.to(self.device, non_blocking=True))  # [B, 3, T, S, S]
        labels = labels_B.to(self.device, non_blocking=True)
        B, C, T, H, W = video.shape
        if aug.random_erasing > 0:
            video = self._erase(video, rng)
        mix = draw_mix(H, W, aug.mixup, aug.cutmix, aug.mix_prob, aug.switch_prob, rng)
        partner_labels = None
        if mix.box is not None or mix.lam < 1.0:
            partner_video, partner_labels = self._partners(video, labels)
            if mix.box is not None:
                y0, y1, x0, x1 = mix.box
                video = video.clone()
                video[..., y0:y1, x0:x1] = partner_video[..., y0:y1, x0:x1]
            else:
                video = video * mix.lam + partner_video * (1.0 - mix.lam)
        targets = soft_targets(labels, self.num_classes, aug.label_smoothing, mix.lam, partner_labels)
        drop_scales = None
        if self.keep_prob is not None:  # keyed by each clip's global index: the same at any world size
            drop_scales = drop_path_scales(self.keep_prob, B, seed=self.cfg.train.seed, offset=step, first_clip=self.rank * B)
        head_scales = None
        if self.cfg.model.head_dropout > 0:  # likewise keyed by clip
            head_scales = head_dropout_scales(self.cfg.model.head_dropout, B, unwrap(self.model).arch.width,
                                              seed=self.cfg.train.seed, offset=step, first_clip=self.rank * B,
                                              device=video.device)
        with self._autocast():
            logits = self.model(video, drop_scales, head_scales)
        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        correct = (logits.detach().argmax(-1) == labels).sum()
        return loss.detach(), correct


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def labelled_lists(cfg: FinetuneConfig, sample_list: str | None
                   ) -> tuple[list[VideoRecord], list[VideoRecord], int, SourceMix | None]:  # fmt: skip
    """(training records, validation records, number of classes, the mix of data.mix or None),
    every label checked: an integer in [0, model.num_classes), or (num_classes 0) the classes the
    training records have, after a mix's label offsets and maps. ``sample_list``: the file the
    'sample_clips' lists stand for (None: not checked yet)."""

    def read(value: str, num_classes: int | None, what: str) -> list[VideoRecord]:
        if value == SAMPLE_CLIPS:
            return read_labelled_list(sample_list, "", num_classes, what) if sample_list else []
        return read_labelled_list(value, cfg.data.root, num_classes, what) if value else []

    mix = None
    if cfg.data.mix:
        sources = [MixSource(**{**d, "list": sample_list if d["list"] == SAMPLE_CLIPS else d["list"]})
                   for d in mix_sources(cfg.data.mix)]  # fmt: skip
        if any(source.list is None for source in sources):  # the bundled clips' list is not written yet
            train = []
        else:
            train, mix = read_mix(sources, cfg.train.seed)
            for i, (source, start, size) in enumerate(zip(sources, mix.offsets, mix.sizes)):
                how = f" (after data.mix[{i}]'s {'label map' if source.label_map else 'label offset'})" \
                    if source.label_map or source.label_offset else ""  # fmt: skip
                check_labels(train[start:start + size], source.list, cfg.model.num_classes or None, f"data.mix[{i}]", how)
    else:
        train = read(cfg.data.train_list, cfg.model.num_classes or None, "data.train_list")
    num_classes = cfg.model.num_classes or (1 + max((r.label for r in train), default=-1))
    return train, read(cfg.data.val_list, num_classes if train else None, "data.val_list"), num_classes, mix


def _write_sample_list(cfg: FinetuneConfig, info: DistInfo) -> None:
    """<run_dir>/sample_clips.csv when a list is 'sample_clips': written once, by rank 0."""
    if SAMPLE_CLIPS in (cfg.data.train_list, cfg.data.val_list):
        if info.is_main:
            write_sample_clip_list(os.path.join(cfg.run_dir, "sample_clips.csv"))
        barrier()


def per_rank_batch(cfg: FinetuneConfig, world_size: int) -> int:
    """train.global_batch_size (videos per optimizer step, over all ranks) / world_size."""
    if cfg.train.global_batch_size % world_size:
        raise ValueError(
            f"train.global_batch_size={cfg.train.global_batch_size} must be divisible by the number of ranks ({world_size}): it is "
            f"the global batch of videos per optimizer step"
        )
    return cfg.train.global_batch_size // world_size


def run_evaluation(model: nn.Module, cfg: FinetuneConfig, records: list[VideoRecord], device: torch.device,
                   class_names: list[str] | None, info: DistInfo = DistInfo()) -> tuple[dict, list]:  # fmt: skip
    """Multi-view evaluation of ``records``; under torchrun sharded over the ranks (the report is
    over all videos, on every rank)."""
    paths = [r.path for r in records]
    options = dict(num_clips=cfg.eval.num_clips, num_crops=cfg.eval.num_crops, batch_size=cfg.eval.batch_size,
                   device=device, precision=cfg.train.precision, num_workers=cfg.data.num_workers)  # fmt: skip
    model = unwrap(model)  # DDP: the module itself; FSDP2: the sharded model, run in lock-step
    preds = predict_videos(model, paths, info=info, **options)
    label_of = {r.path: r.label for r in records}
    labels = torch.tensor([label_of[p] for p in preds.paths], dtype=torch.long)
    report = accuracy_report(preds.probs, labels, class_names)
    report.update(num_clips=cfg.eval.num_clips, num_crops=cfg.eval.num_crops, views_per_video=preds.views_per_video,
                  unreadable=[{"path": p, "reason": r} for p, r in preds.failed])  # fmt: skip
    return report, preds.failed


class FinetuneRecipe(Recipe):
    """Fine-tuning: the dense classifier on labelled clips, evaluated with multiple views."""

    loss_names = ("loss", "correct")

    def plan(self, info: DistInfo) -> None:
        self.info = info
        self.per_rank = per_rank_batch(self.cfg, info.world_size)

    def build(self, info: DistInfo, resume_path: str | None) -> Setup:
        cfg, device = self.cfg, info.device
        _write_sample_list(cfg, info)
        self.train_records, self.val_records, num_classes, self.mix = labelled_lists(
            cfg, os.path.join(cfg.run_dir, "sample_clips.csv"))
        if self.mix is not None:
            log.info("data.mix: %s (data.train_list is not read)", ", ".join(
                f"{d['list']} ({n} clips, weight {d['weight']:g})" for d, n in zip(mix_sources(cfg.data.mix), self.mix.sizes)))
        self.num_classes = num_classes
        self.class_names = read_class_names(cfg.data.class_names) if cfg.data.class_names else None
        if self.class_names is not None and len(self.class_names) != num_classes:
            raise ValueError(f"data.class_names has {len(self.class_names)} names, but there are {num_classes} classes")
        B = cfg.train.global_batch_size
        steps_per_epoch = max(1, len(self.train_records) // B)
        total_steps = cfg.optim.epochs * steps_per_epoch
        peak, final, start_lr = scaled_lrs(cfg)
        schedule = WarmupCosineSchedule(peak_lr=peak, min_lr=final, total_steps=total_steps,
                                        warmup_steps=cfg.optim.warmup_epochs * steps_per_epoch, warmup_lr=start_lr)  # fmt: skip
        probe = cfg.model.probe
        if not cfg.model.init and cfg.preset not in ("demo", "probe_demo"):
            log.warning("no --model.init: %s", "the probe reads a frozen random backbone, not a pre-trained one"
                        if probe != "none" else "fine-tuning starts from random weights, not from a pre-trained model")
        if probe != "none" and (cfg.model.drop_path > 0 or cfg.optim.layer_decay < 1 or cfg.train.activation_checkpointing != "off"):
            log.info("model.probe=%s: the frozen backbone runs without drop path, layer decay or activation "
                     "checkpointing (model.drop_path, optim.layer_decay, train.activation_checkpointing do not apply)", probe)
        model = build_model(cfg, num_classes).to(device)
        arch, num_params = model.arch, sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        compile_blocks(list(model.blocks), model, cfg.train.compile, cfg.train.compile_backend)
        low_precision = torch.bfloat16 if device.type == "cuda" and cfg.train.precision == "bf16" else None
        # DDP, or FSDP2 per block then the root (parameters kept in fp32; compute in bf16 on the GPU).
        self.model = model = wrap_model(model, model.blocks, cfg.dist.strategy, info, low_precision)
        optimizer = build_optimizer(model, cfg)
        self.budget = BadSampleBudget(cfg.data.max_bad_fraction)
        self.step_fn = FinetuneStep(model, optimizer, cfg, num_classes, device, rank=info.rank, world_size=info.world_size)
        self.clips_per_step = B * cfg.data.repeated_aug  # over all ranks
        self.report = None
        what = (f"{cfg.model.size} classifier" if probe == "none" else
                f"{probe} probe of a frozen {cfg.model.size} backbone ({trainable / 1e6:.2f}M trainable)")  # fmt: skip
        describe = (f"preset {cfg.preset} | {what}, {num_classes} classes ({num_params / 1e6:.1f}M "
                    f"params) | {len(self.train_records)} train / {len(self.val_records)} val videos | {B} videos x "
                    f"{cfg.data.repeated_aug} clips per step = {info.world_size} ranks x {self.per_rank} videos")  # fmt: skip
        per_clip = classifier_flops_per_clip(arch) if probe == "none" else probe_flops_per_clip(arch)
        flops = self.clips_per_step * per_clip
        return Setup(model, optimizer, schedule, steps_per_epoch, total_steps, self.clips_per_step, flops, describe,
                     len(self.train_records) * cfg.data.repeated_aug)  # fmt: skip

    def load_state(self, meta: dict, info: DistInfo) -> None:
        if info.is_main and "rng" in meta:
            ckpt.restore_rng_state(meta["rng"])

    def batches(self, start_step: int):
        cfg, info, B = self.cfg, self.info, self.cfg.train.global_batch_size
        dataset = FinetuneClipDataset(
            self.train_records, cfg.data.num_frames, cfg.data.img_size, seed=cfg.train.seed,
            repeated_aug=cfg.data.repeated_aug, min_scale=cfg.aug.min_scale, flip=cfg.aug.flip,
            rand_augment_ops=cfg.aug.rand_augment_ops, rand_augment_magnitude=cfg.aug.rand_augment_magnitude,
            mix=self.mix,
        )  # fmt: skip
        loader = build_finetune_loader(dataset, self.per_rank, start_position=start_step * B,
                                       num_workers=cfg.data.num_workers, pin_memory=info.device.type == "cuda",
                                       global_batch_size=B, rank=info.rank, world_size=info.world_size)  # fmt: skip
        for batch in loader:
            self.budget.update(self.per_rank, batch["skipped"])
            yield batch

    def step(self, batch: dict, step: int) -> torch.Tensor:
        loss, correct = self.step_fn(batch["video"], batch["label"], step)
        return torch.stack([loss, correct.float()])

    def window_metrics(self, sums: list[float], window_steps: int, world_size: int) -> dict[str, float]:
        return {"loss": sums[0] / (window_steps * world_size), "train/top1": 100.0 * sums[1] / (window_steps * self.clips_per_step)}

    def data_position(self, steps_done: int) -> int:
        return steps_done * self.cfg.train.global_batch_size

    def checkpoint_meta(self) -> dict:
        meta = {"kind": "classifier", "num_classes": self.num_classes, "rng": ckpt.rng_state()}
        if self.class_names is not None:
            meta["class_names"] = self.class_names
        return meta

    def after_step(self, done: int, is_last: bool, metrics) -> None:
        every = self.cfg.eval.every_steps
        if not self.val_records or not ((every and done % every == 0) or is_last):
            return
        eval_start = time.perf_counter()
        self.report, failed = run_evaluation(self.model, self.cfg, self.val_records, self.info.device,
                                             self.class_names, self.info)  # fmt: skip
        report = self.report
        if self.info.is_main:
            metrics.write({"step": done, "eval/top1": report["top1"], "eval/top5": report["top5"],
                           "eval/videos": report["num_videos"], "eval/views": report["views_per_video"],
                           "time": time.time()})  # fmt: skip
            with open(os.path.join(self.cfg.run_dir, "eval.json"), "w", encoding="utf-8") as f:
                json.dump({"step": done, **report}, f, indent=2)
        log.info("evaluation at step %d (%.1f s):\n%s", done, time.perf_counter() - eval_start, format_report(report, failed))
        self.model.train()

    def result(self, result: TrainResult) -> TrainResult:
        result.eval_report = self.report
        return result


FinetuneResult = TrainResult


def train(cfg: FinetuneConfig) -> TrainResult:
    """Runs (or resumes) fine-tuning as ``cfg`` says; returns where things are.

    In one process, or under torchrun with DDP or FSDP2 (``dist.strategy``): each rank trains on
    its share of every global batch, rank 0 alone writes the run directory's logs and metrics,
    and every rank takes part in checkpoints and evaluation.
    """
    return run(FinetuneRecipe(cfg))
