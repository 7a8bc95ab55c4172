"""The stage-1 training loop: build, resume, step, log, checkpoint."""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from umt_fast import checkpoint as ckpt
from umt_fast.config import (
    SAMPLE_CLIPS,
    PretrainConfig,
    config_to_dict,
    peak_lr,
    save_config,
    scaled_min_lr,
    scaled_warmup_lr,
)
from umt_fast.data import (
    BadSampleBudget,
    PretrainClipDataset,
    build_pretrain_loader,
    read_annotation_list,
    write_sample_clip_list,
)
from umt_fast.models import build_student, build_teacher
from umt_fast.train.logging import ProgressLine, build_metrics_sinks, check_sink_packages, setup_logging
from umt_fast.train.optim import WarmupCosineSchedule, build_optimizer
from umt_fast.train.step import PretrainStep

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    run_dir: str
    last_checkpoint: str | None
    steps_done: int
    last_loss: float | None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available; use --train.device auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _train_list_path(cfg: PretrainConfig) -> str:
    if cfg.data.train_list == SAMPLE_CLIPS:
        return write_sample_clip_list(os.path.join(cfg.run_dir, "sample_clips.csv"))
    return cfg.data.train_list


def _differing_fields(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differing_fields(a, b, f"{prefix}{key}.")
        elif a != b and key not in ("resume", "run_dir"):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def train(cfg: PretrainConfig) -> TrainResult:
    """Runs (or resumes) stage-1 pre-training as ``cfg`` says; returns where things are."""
    check_sink_packages(cfg.log.tensorboard, cfg.log.wandb)  # refuse before touching anything
    os.makedirs(cfg.run_dir, exist_ok=True)
    resume_path = ckpt.find_resume_checkpoint(cfg.run_dir, cfg.resume)
    logger = setup_logging(cfg.run_dir)
    save_config(cfg, cfg.run_dir)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)

    records = read_annotation_list(_train_list_path(cfg), root=cfg.data.root)
    B = cfg.train.batch_size
    steps_per_epoch = max(1, len(records) // B)
    total_steps = cfg.optim.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps
    schedule = WarmupCosineSchedule(
        peak_lr=peak_lr(cfg),
        min_lr=scaled_min_lr(cfg),
        total_steps=total_steps,
        warmup_steps=cfg.optim.warmup_epochs * steps_per_epoch,
        warmup_lr=scaled_warmup_lr(cfg),
    )

    use_bf16 = device.type == "cuda" and cfg.train.precision == "bf16"
    teacher = build_teacher(cfg).to(device)
    if use_bf16:
        teacher = teacher.to(torch.bfloat16)
    student = build_student(cfg, teacher_dim=teacher.arch.output_dim).to(device)
    optimizer = build_optimizer(student, schedule(0), cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps)
    budget = BadSampleBudget(cfg.data.max_bad_fraction)

    start_step = 0
    if resume_path is not None:
        state = ckpt.load_checkpoint(resume_path)
        changed = _differing_fields(state.get("config", {}), config_to_dict(cfg))
        if changed:
            log.warning("resuming with a config that differs from the checkpoint's: %s", "; ".join(changed))
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        budget.load_state_dict(state["bad_samples"])
        ckpt.restore_rng_state(state["rng"])
        start_step = state["step"]
        log.info("resumed from %s at step %d (data position %d)", resume_path, start_step, state["data_position"])

    rng = ckpt.rng_state()  # third-party loggers must not shift the run's random streams
    metrics = build_metrics_sinks(
        cfg.run_dir, tensorboard=cfg.log.tensorboard, wandb_project=cfg.log.wandb, wandb_mode=cfg.log.wandb_mode,
        config=config_to_dict(cfg), resume_step=start_step if resume_path is not None else None,
    )  # fmt: skip
    ckpt.restore_rng_state(rng)
    if resume_path is not None:
        metrics.write({"event": "resume", "step": start_step, "checkpoint": resume_path})
    log.info(
        "preset %s | student %s (%.1fM params) | teacher %s | %d clips, batch %d, %d steps (%d per epoch) | device %s",
        cfg.preset, cfg.student.size, sum(p.numel() for p in student.parameters()) / 1e6, cfg.teacher.arch,
        len(records), B, last_step, steps_per_epoch, device,
    )

    dataset = PretrainClipDataset(records, cfg.data.num_frames, cfg.data.img_size, seed=cfg.train.seed, flip=cfg.data.flip)
    loader = build_pretrain_loader(
        dataset, B, start_position=start_step * B, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda"
    )
    step_fn = PretrainStep(
        student, teacher, optimizer,
        mask_policy=cfg.mask.policy, mask_ratio=cfg.mask.ratio, mask_seed=cfg.train.seed,
        device=device, autocast_dtype=torch.bfloat16 if use_bf16 else None,
    )

    figures = None
    if cfg.log.mask_figure_every_steps > 0:
        from umt_fast.viz.training import MaskFigureReporter

        figures = MaskFigureReporter(
            cfg, [r.path for r in records], teacher, student, device, torch.bfloat16 if use_bf16 else None
        )

    progress = ProgressLine(last_step, logger)
    last_checkpoint = resume_path
    last_loss = None
    loss_sum = torch.zeros((), device=device)
    window_steps, window_clips, data_time = 0, 0, 0.0
    window_start = time.perf_counter()
    student.train()
    batches = iter(loader)
    try:
        for step in range(start_step, last_step):
            fetch_start = time.perf_counter()
            batch = next(batches)
            data_time += time.perf_counter() - fetch_start
            budget.update(B, batch["skipped"])

            lr = schedule.set_lr(optimizer, step)
            loss_sum += step_fn(batch["video"], step)
            window_steps += 1
            window_clips += B
            done = step + 1

            is_last = done == last_step
            if done % cfg.log.every_steps == 0 or is_last or done % cfg.checkpoint.every_steps == 0:
                last_loss = (loss_sum / window_steps).item()  # the only host sync, once per log window
                if not np.isfinite(last_loss):
                    raise NonFiniteLossError(
                        f"loss became {last_loss} between steps {done - window_steps + 1} and {done}; stopping. "
                        f"The last good checkpoint is {last_checkpoint or '(none yet)'}; lower --optim.lr or check the data."
                    )
                elapsed = time.perf_counter() - window_start
                metrics.write({
                    "step": done, "loss": last_loss, "lr": lr, "clips/s": window_clips / elapsed,
                    "data_time": data_time / window_steps, "data/skipped": budget.num_skipped,
                    "epoch": step // steps_per_epoch, "time": time.time(),
                })
                progress.update(done, last_loss, lr, window_clips / elapsed)
                loss_sum.zero_()
                window_steps, window_clips, data_time = 0, 0, 0.0
                window_start = time.perf_counter()

            if figures is not None and figures.due(done):
                figure_start = time.perf_counter()
                path = figures.maybe_write(done, metrics)
                if path:
                    log.info("wrote %s", path)
                window_start += time.perf_counter() - figure_start  # keep drawing out of clips/s

            if done % cfg.checkpoint.every_steps == 0 or is_last:
                last_checkpoint = ckpt.save_checkpoint(
                    cfg.run_dir, done,
                    {
                        "student": student.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "data_position": done * B,
                        "bad_samples": budget.state_dict(),
                        "config": config_to_dict(cfg),
                    },
                    keep_last=cfg.checkpoint.keep_last,
                )
                log.info("saved checkpoint %s", last_checkpoint)
    finally:
        progress.close()
        metrics.close()
        del batches, loader
    return TrainResult(cfg.run_dir, last_checkpoint, last_step, last_loss)
