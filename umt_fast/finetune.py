"""Fine-tuning for action recognition (UMT_SPEC.md section 3).

The built-in demo (a tiny model on the bundled sample clips, label = which clip; about a
minute on a laptop CPU):

    python -m umt_fast.finetune

The published recipes, from a reference checkpoint (nothing is downloaded):

    python -m umt_fast.finetune --preset umt_b16_ssv2 --init b16_ptk710_f8_res224.pth \\
        --data.train_list ssv2_train.csv --data.val_list ssv2_val.csv --data.root /data/ssv2 \\
        --run-dir runs/ft_b16_ssv2

Resume a run that stopped (``auto`` is the default): rerun with the same ``--run-dir``.

The model is the dense ViT over all tokens + mean pool + fc_norm + dropout + Linear head
(`umt_fast.models.classifier.VideoViT`); AdamW with layer-wise lr decay, warm-up + cosine;
soft-target cross-entropy with label smoothing, mixup / cutmix (timm's batch mode), random
erasing and RandAugment; drop path and optional activation checkpointing. The run directory
has the layout of pre-training (config.yaml, metrics.jsonl, log.txt, checkpoints/) plus
eval.json, the last multi-view evaluation. Model and optimizer are built by `build_model` and
`build_optimizer`, so a distributed wrapper can be applied between them.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from umt_fast import checkpoint as ckpt
from umt_fast.config import SAMPLE_CLIPS, STUDENT_SIZES
from umt_fast.data import BadSampleBudget, read_annotation_list, write_sample_clip_list
from umt_fast.data.annotations import VideoRecord
from umt_fast.data.labelled import FinetuneClipDataset, build_finetune_loader, read_class_names
from umt_fast.data.transforms import normalize_video
from umt_fast.evaluate import accuracy_report, format_report, predict_videos
from umt_fast.finetune_config import FinetuneConfig, build_config, check_paths, config_to_dict, save_config, scaled_lrs
from umt_fast.models.classifier import VideoViT, VideoViTArch
from umt_fast.train.logging import MetricsWriter, ProgressLine, setup_logging
from umt_fast.train.optim import WarmupCosineSchedule

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Model and optimizer
# --------------------------------------------------------------------------------------------


def build_model(cfg: FinetuneConfig, num_classes: int) -> VideoViT:
    """The classifier of ``cfg``, initialised from ``model.init`` when set."""
    size = STUDENT_SIZES[cfg.model.size]
    arch = VideoViTArch(
        width=size["width"], depth=size["depth"], heads=size["heads"], num_frames=cfg.data.num_frames,
        img_size=cfg.data.img_size, patch_size=cfg.model.patch_size, num_classes=num_classes,
        drop_path=cfg.model.drop_path, head_dropout=cfg.model.head_dropout,
    )  # fmt: skip
    model = VideoViT(arch)
    if cfg.model.init:
        from umt_fast import interop

        source = cfg.model.init
        if os.path.isdir(source):  # a run directory or checkpoint of ours
            from umt_fast.export import read_run_checkpoint

            source, _ = read_run_checkpoint(source)
        interop.init_video_vit(model, source, strict=cfg.model.init_strict)
        log.info("initialised from %s", cfg.model.init)
    model.set_grad_checkpointing(num_blocks=cfg.train.checkpointed_blocks(arch.depth))
    return model


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
    """AdamW over `layer_decay_param_groups` (fused on the GPU)."""
    inner = getattr(model, "module", model)
    groups = layer_decay_param_groups(inner, cfg.optim.weight_decay, cfg.optim.layer_decay)
    on_gpu = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=0.0, betas=cfg.optim.betas, eps=cfg.optim.eps, fused=on_gpu or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# --------------------------------------------------------------------------------------------
# Batch augmentation on the device: random erasing, mixup / cutmix, soft targets
# --------------------------------------------------------------------------------------------


def random_erasing_mask(
    num_images: int, height: int, width: int, probability: float, rng: np.random.Generator
) -> torch.Tensor | None:
    """timm's RandomErasing boxes (area 2%..1/3, aspect 0.3..3.3, 10 tries), one decision per
    image: bool [num_images, 1, H, W] (True = erase), or None when nothing is erased."""
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


def soft_targets(labels_B: torch.Tensor, num_classes: int, smoothing: float, lam: float) -> torch.Tensor:
    """[B] -> [B, K]: smoothed one-hot of each label mixed with that of the flipped batch."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    own = torch.full((labels_B.shape[0], num_classes), off, device=labels_B.device).scatter_(1, labels_B[:, None], on)
    if lam == 1.0:
        return own
    return own * lam + own.flip(0) * (1.0 - lam)


class FinetuneStep:
    """Callable ``(video_uint8 [B, T, S, S, 3], labels [B], step) -> (loss, correct)``: both
    0-dim device tensors (no host sync). ``correct`` counts clips whose top-1 prediction is
    their own, un-mixed label."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: FinetuneConfig, num_classes: int,
                 device: torch.device):  # fmt: skip
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.num_classes, self.device = num_classes, device
        self.use_bf16 = device.type == "cuda" and cfg.train.precision == "bf16"

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_bf16 else contextlib.nullcontext()

    def __call__(self, video_BTHWC: torch.Tensor, labels_B: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        aug = self.cfg.aug
        rng = np.random.default_rng([self.cfg.train.seed, step])  # host-side draws: reproducible per step
        video = normalize_video(video_BTHWC.to(self.device, non_blocking=True))  # [B, 3, T, S, S]
        labels = labels_B.to(self.device, non_blocking=True)
        B, C, T, H, W = video.shape
        if aug.random_erasing > 0:
            mask = random_erasing_mask(B * T, H, W, aug.random_erasing, rng)  # per frame, as the reference
            if mask is not None:
                mask = mask.view(B, T, 1, H, W).transpose(1, 2).to(self.device, non_blocking=True)
                generator = torch.Generator(self.device).manual_seed(int(rng.integers(2**62)))
                noise = torch.randn(video.shape, generator=generator, device=self.device)
                video = torch.where(mask, noise, video)
        mix = draw_mix(H, W, aug.mixup, aug.cutmix, aug.mix_prob, aug.switch_prob, rng)
        if mix.box is not None:
            y0, y1, x0, x1 = mix.box
            video = video.clone()
            video[..., y0:y1, x0:x1] = video.flip(0)[..., y0:y1, x0:x1]
        elif mix.lam < 1.0:
            video = video * mix.lam + video.flip(0) * (1.0 - mix.lam)
        targets = soft_targets(labels, self.num_classes, aug.label_smoothing, mix.lam)
        with self._autocast():
            logits = self.model(video)
        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        correct = (logits.detach().argmax(-1) == labels).sum()
        return loss.detach(), correct


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    run_dir: str
    last_checkpoint: str | None
    steps_done: int
    last_loss: float | None
    train_top1: float | None
    eval_report: dict | None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available; use --train.device auto or cpu")
    return torch.device(name)


def _records(list_value: str, root: str, run_dir: str) -> list[VideoRecord]:
    if list_value == SAMPLE_CLIPS:
        return read_annotation_list(write_sample_clip_list(os.path.join(run_dir, "sample_clips.csv")))
    return read_annotation_list(list_value, root=root)


def _num_classes(cfg: FinetuneConfig, records: list[VideoRecord]) -> int:
    labels = [r.label for r in records if r.label is not None]
    largest = max(labels) if labels else -1
    if cfg.model.num_classes == 0:
        return largest + 1
    if largest >= cfg.model.num_classes:
        raise ValueError(
            f"data.train_list has label {largest}, but model.num_classes={cfg.model.num_classes}; labels must be in "
            f"[0, num_classes)"
        )
    return cfg.model.num_classes


def run_evaluation(model: VideoViT, cfg: FinetuneConfig, records: list[VideoRecord], device: torch.device,
                   class_names: list[str] | None) -> tuple[dict, list]:  # fmt: skip
    preds = predict_videos(
        model, [r.path for r in records], num_clips=cfg.eval.num_clips, num_crops=cfg.eval.num_crops,
        batch_size=cfg.eval.batch_size, device=device, precision=cfg.train.precision, num_workers=cfg.data.num_workers,
    )  # fmt: skip
    label_of = {r.path: r.label for r in records}
    labels = torch.tensor([label_of[p] for p in preds.paths], dtype=torch.long)
    report = accuracy_report(preds.probs, labels, class_names)
    report.update(num_clips=cfg.eval.num_clips, num_crops=cfg.eval.num_crops, views_per_video=preds.views_per_video,
                  unreadable=[{"path": p, "reason": r} for p, r in preds.failed])  # fmt: skip
    return report, preds.failed


def train(cfg: FinetuneConfig) -> FinetuneResult:
    """Runs (or resumes) fine-tuning as ``cfg`` says; returns where things are."""
    os.makedirs(cfg.run_dir, exist_ok=True)
    resume_path = ckpt.find_resume_checkpoint(cfg.run_dir, cfg.resume)
    logger = setup_logging(cfg.run_dir)
    save_config(cfg, cfg.run_dir)
    device = resolve_device(cfg.train.device)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)

    train_records = _records(cfg.data.train_list, cfg.data.root, cfg.run_dir)
    val_records = _records(cfg.data.val_list, cfg.data.root, cfg.run_dir) if cfg.data.val_list else []
    num_classes = _num_classes(cfg, train_records)
    class_names = read_class_names(cfg.data.class_names) if cfg.data.class_names else None
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"data.class_names has {len(class_names)} names, but there are {num_classes} classes")

    B = cfg.train.batch_size
    steps_per_epoch = max(1, len(train_records) // B)
    total_steps = cfg.optim.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps
    peak, final, start_lr = scaled_lrs(cfg)
    schedule = WarmupCosineSchedule(peak_lr=peak, min_lr=final, total_steps=total_steps,
                                    warmup_steps=cfg.optim.warmup_epochs * steps_per_epoch, warmup_lr=start_lr)  # fmt: skip

    if not cfg.model.init and cfg.preset != "demo":
        log.warning("no --model.init: fine-tuning starts from random weights, not from a pre-trained model")
    model = build_model(cfg, num_classes).to(device)
    optimizer = build_optimizer(model, cfg)
    budget = BadSampleBudget(cfg.data.max_bad_fraction)
    start_step = 0
    if resume_path is not None:
        meta = ckpt.restore_checkpoint(resume_path, model, optimizer)
        budget.load_state_dict(meta["bad_samples"])
        if "rng" in meta:
            ckpt.restore_rng_state(meta["rng"])
        start_step = meta["step"]
        log.info("resumed from %s at step %d", resume_path, start_step)

    metrics = MetricsWriter(os.path.join(cfg.run_dir, "metrics.jsonl"))
    if resume_path is not None:
        metrics.write({"event": "resume", "step": start_step, "checkpoint": resume_path})
    log.info(
        "preset %s | %s classifier, %d classes (%.1fM params) | %d train / %d val videos | %d videos x %d clips per "
        "step, %d steps (%d per epoch) | device %s", cfg.preset, cfg.model.size, num_classes,
        sum(p.numel() for p in model.parameters()) / 1e6, len(train_records), len(val_records), B,
        cfg.data.repeated_aug, last_step, steps_per_epoch, device,
    )  # fmt: skip

    dataset = FinetuneClipDataset(
        train_records, cfg.data.num_frames, cfg.data.img_size, seed=cfg.train.seed, repeated_aug=cfg.data.repeated_aug,
        min_scale=cfg.aug.min_scale, flip=cfg.aug.flip, rand_augment_ops=cfg.aug.rand_augment_ops,
        rand_augment_magnitude=cfg.aug.rand_augment_magnitude,
    )  # fmt: skip
    loader = build_finetune_loader(dataset, B, start_position=start_step * B, num_workers=cfg.data.num_workers,
                                   pin_memory=device.type == "cuda")  # fmt: skip
    step_fn = FinetuneStep(model, optimizer, cfg, num_classes, device)

    progress = ProgressLine(last_step, logger)
    last_checkpoint, last_loss, train_top1, report = resume_path, None, None, None
    loss_sum = torch.zeros((), device=device)
    correct_sum = torch.zeros((), device=device, dtype=torch.long)
    window_steps, window_clips = 0, 0
    window_start = time.perf_counter()
    clips_per_step = B * cfg.data.repeated_aug

    def evaluate_now(done: int) -> dict:
        eval_start = time.perf_counter()
        report, failed = run_evaluation(model, cfg, val_records, device, class_names)
        metrics.write({"step": done, "eval/top1": report["top1"], "eval/top5": report["top5"],
                       "eval/videos": report["num_videos"], "eval/views": report["views_per_video"],
                       "time": time.time()})  # fmt: skip
        with open(os.path.join(cfg.run_dir, "eval.json"), "w", encoding="utf-8") as f:
            json.dump({"step": done, **report}, f, indent=2)
        log.info("evaluation at step %d (%.1f s):\n%s", done, time.perf_counter() - eval_start, format_report(report, failed))
        return report

    batches = iter(loader)
    model.train()
    try:
        for step in range(start_step, last_step):
            batch = next(batches)
            budget.update(B, batch["skipped"])
            lr = schedule(step)
            set_lr(optimizer, lr)
            loss, correct = step_fn(batch["video"], batch["label"], step)
            loss_sum += loss
            correct_sum += correct
            window_steps += 1
            window_clips += clips_per_step
            done = step + 1
            is_last = done == last_step
            save_now = done % cfg.checkpoint.every_steps == 0 or is_last
            if done % cfg.log.every_steps == 0 or save_now:
                last_loss = (loss_sum / window_steps).item()  # the host sync, once per logging window
                train_top1 = 100.0 * correct_sum.item() / window_clips
                if not np.isfinite(last_loss):
                    raise RuntimeError(
                        f"loss became {last_loss} between steps {done - window_steps + 1} and {done}; stopping. The last "
                        f"good checkpoint is {last_checkpoint or '(none yet)'}; lower --optim.lr or check the data."
                    )
                elapsed = time.perf_counter() - window_start
                metrics.write({"step": done, "loss": last_loss, "train/top1": train_top1, "lr": lr,
                               "clips/s": window_clips / elapsed, "data/skipped": budget.num_skipped,
                               "epoch": step // steps_per_epoch, "time": time.time()})  # fmt: skip
                progress.update(done, last_loss, lr, window_clips / elapsed)
                loss_sum.zero_()
                correct_sum.zero_()
                window_steps, window_clips = 0, 0
                window_start = time.perf_counter()
            if val_records and ((cfg.eval.every_steps and done % cfg.eval.every_steps == 0) or is_last):
                eval_start = time.perf_counter()
                report = evaluate_now(done)
                model.train()
                window_start += time.perf_counter() - eval_start  # keep evaluation out of clips/s
            if save_now:
                meta = {"kind": "classifier", "config": config_to_dict(cfg), "data_position": done * B,
                        "bad_samples": budget.state_dict(), "num_classes": num_classes, "rng": ckpt.rng_state()}  # fmt: skip
                if class_names is not None:
                    meta["class_names"] = class_names
                last_checkpoint = ckpt.save_checkpoint(cfg.run_dir, done, model, optimizer, meta,
                                                       keep_last=cfg.checkpoint.keep_last)  # fmt: skip
                log.info("saved checkpoint %s", last_checkpoint)
    finally:
        progress.close()
        metrics.close()
        del batches, loader
    return FinetuneResult(cfg.run_dir, last_checkpoint, last_step, last_loss, train_top1, report)


def default_run_dir(preset: str) -> str:
    return os.path.join("runs", f"finetune-{preset}-{time.strftime('%Y%m%d-%H%M%S')}")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = build_config(argv)
        if not cfg.run_dir:
            cfg.run_dir = default_run_dir(cfg.preset)
        check_paths(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = train(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; resume with --resume auto --run-dir " + cfg.run_dir, file=sys.stderr)
        return 130
    print(f"run directory: {os.path.abspath(result.run_dir)}")
    print(f"checkpoint:    {os.path.abspath(result.last_checkpoint) if result.last_checkpoint else '(none)'}")
    if result.last_loss is not None:
        print(f"final loss:    {result.last_loss:.4f}, train top-1 {result.train_top1:.1f} % after {result.steps_done} steps")
    if result.eval_report and result.eval_report["top1"] is not None:
        r = result.eval_report
        print(f"eval:          top-1 {r['top1']:.1f} %, top-5 {r['top5']:.1f} % on {r['num_videos']} videos "
              f"x {r['views_per_video']} views")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
