"""The stage-1 training loop: build, resume, step, log, checkpoint.

Works the same in one process (CPU or GPU) and under torchrun (DDP or FSDP2): rank 0 writes
the run directory's logs, metrics and figures; every rank takes part in checkpoints.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from umt_fast.engine import checkpoint as ckpt
from umt_fast.config import (
    SAMPLE_CLIPS,
    PretrainConfig,
    config_to_dict,
    peak_lr,
    scaled_min_lr,
    scaled_warmup_lr,
)
from umt_fast.data import (
    BadSampleBudget,
    PretrainClipDataset,
    build_clip_loader,
    read_annotation_list,
    write_sample_clip_list,
)
from umt_fast.engine.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, wrap_student
from umt_fast.engine.launch import open_run_dir
from umt_fast.interop import build_teacher
from umt_fast.models import build_student
from umt_fast.models.attention import set_attention_backend
from umt_fast.engine.cuda_graph import CUDAGraphStep
from umt_fast.engine.metrics import ProgressLine, build_metrics_sinks, check_sink_packages
from umt_fast.engine.optim import WarmupCosineSchedule, build_optimizer
from umt_fast.recipes.pretrain import PretrainStep
from umt_fast.engine.stopping import StopOnSignal, stop_run

log = logging.getLogger(__name__)

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class NonFiniteLossError(RuntimeError):
    pass


def check_finite_loss(loss: float, first_step: int, last_step: int, last_checkpoint: str | None) -> None:
    """Stops a run whose logging-window loss (steps first..last) is NaN or infinite, naming the last
    good checkpoint (none is written after the bad step)."""
    if not np.isfinite(loss):
        raise NonFiniteLossError(
            f"loss became {loss} between steps {first_step} and {last_step}; stopping. "
            f"The last good checkpoint is {last_checkpoint or '(none yet)'}; lower --optim.lr or check the data."
        )


@dataclass
class TrainResult:
    run_dir: str
    last_checkpoint: str | None
    steps_done: int
    last_loss: float | None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _train_list_path(cfg: PretrainConfig, info: DistInfo) -> str:
    if cfg.data.train_list != SAMPLE_CLIPS:
        return cfg.data.train_list
    path = os.path.join(cfg.run_dir, "sample_clips.csv")
    if info.is_main:
        write_sample_clip_list(path)
    barrier()
    return path


def _differing_fields(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differing_fields(a, b, f"{prefix}{key}.")
        elif a != b and key not in ("resume", "run_dir"):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch of every step is split: over ranks, then into micro-batches."""

    global_batch: int
    per_rank: int
    micro: int

    @property
    def accumulation(self) -> int:
        return self.per_rank // self.micro


def plan_batches(cfg: PretrainConfig, world_size: int) -> BatchPlan:
    G = cfg.train.global_batch_size
    if G % world_size:
        raise ValueError(
            f"train.global_batch_size={G} must be divisible by the number of ranks ({world_size})"
        )
    per_rank = G // world_size
    micro = cfg.train.micro_batch_size or per_rank
    if per_rank % micro:
        raise ValueError(
            f"train.micro_batch_size={micro} must divide the per-rank batch "
            f"(train.global_batch_size {G} / {world_size} ranks = {per_rank})"
        )
    return BatchPlan(G, per_rank, micro)


def _compile(student, teacher, mode: str, backend: str) -> None:
    """In place (Module.compile keeps parameter names): per block, or the student's whole forward."""
    if mode == "none":
        return
    for block in teacher.transformer.resblocks:
        block.compile(backend=backend)
    if mode == "blocks":
        for block in student.encoder.blocks:
            block.compile(backend=backend)
    else:
        student.compile(backend=backend)


def _require_cuda_for_graphs(cfg: PretrainConfig, device: torch.device) -> None:
    if cfg.train.cuda_graphs and device.type != "cuda":
        raise ValueError(f"train.cuda_graphs=True needs a CUDA device, but training runs on {device}")


def train(cfg: PretrainConfig) -> TrainResult:
    """Runs (or resumes) stage-1 pre-training as ``cfg`` says; returns where things are."""
    info = init_distributed(cfg.train.device)
    plan = plan_batches(cfg, info.world_size)
    _require_cuda_for_graphs(cfg, info.device)
    if info.is_main:
        check_sink_packages(cfg.log.tensorboard, cfg.log.wandb)  # refuse before touching anything
    resume_path, logger = open_run_dir(cfg, info)
    device = info.device
    seed_everything(cfg.train.seed)
    set_attention_backend(cfg.train.attention)

    records = read_annotation_list(_train_list_path(cfg, info), root=cfg.data.root)
    G = plan.global_batch
    steps_per_epoch = max(1, len(records) // G)
    total_steps = cfg.optim.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps
    schedule = WarmupCosineSchedule(
        peak_lr=peak_lr(cfg),
        min_lr=scaled_min_lr(cfg),
        total_steps=total_steps,
        warmup_steps=cfg.optim.warmup_epochs * steps_per_epoch,
        warmup_lr=scaled_warmup_lr(cfg),
    )

    low_precision = _AUTOCAST[cfg.train.precision] if device.type == "cuda" else None
    teacher = build_teacher(cfg).to(device)
    if low_precision is not None:
        teacher = teacher.to(low_precision)  # frozen: bf16/fp16 weights, LayerNorm statistics in fp32
    student = build_student(cfg, teacher_dim=teacher.arch.output_dim).to(device)
    student.set_activation_checkpointing(cfg.train.checkpointed_blocks(student.arch.depth))
    _compile(student, teacher, cfg.train.compile, cfg.train.compile_backend)
    # DDP is built on a side stream for CUDA graphs, as PyTorch's capture of DDP asks.
    graph_capture = cfg.train.cuda_graphs and device.type == "cuda"
    with torch.cuda.stream(torch.cuda.Stream()) if graph_capture else contextlib.nullcontext():
        model = wrap_student(student, cfg.dist.strategy, info, low_precision)
    optimizer = build_optimizer(
        model, schedule(0), cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps, capturable=cfg.train.cuda_graphs
    )
    scaler = torch.amp.GradScaler("cuda") if low_precision == torch.float16 else None
    budget = BadSampleBudget(cfg.data.max_bad_fraction)

    start_step = 0
    if resume_path is not None:
        meta = ckpt.restore_checkpoint(resume_path, model, optimizer)
        changed = _differing_fields(meta.get("config", {}), config_to_dict(cfg))
        if changed:
            log.warning("resuming with a config that differs from the checkpoint's: %s", "; ".join(changed))
        if info.is_main:  # the counts are global totals; the other ranks count from zero
            budget.load_state_dict(meta["bad_samples"])
        if scaler is not None and "grad_scaler" in meta:
            scaler.load_state_dict(meta["grad_scaler"])
        start_step = meta["step"]
        log.info("resumed from %s at step %d (data position %d)", resume_path, start_step, meta["data_position"])

    metrics = None
    if info.is_main:
        rng = ckpt.rng_state()  # third-party loggers must not shift the run's random streams
        metrics = build_metrics_sinks(
            cfg.run_dir, tensorboard=cfg.log.tensorboard, wandb_project=cfg.log.wandb, wandb_mode=cfg.log.wandb_mode,
            config=config_to_dict(cfg), resume_step=start_step if resume_path is not None else None,
        )  # fmt: skip
        ckpt.restore_rng_state(rng)
        if resume_path is not None:
            metrics.write({"event": "resume", "step": start_step, "checkpoint": resume_path})
    log.info(
        "preset %s | student %s (%.1fM params) | teacher %s | %d clips | global batch %d = %d ranks x %d x %d "
        "micro-batches | %d steps (%d per epoch) | %s, %s, attention %s, compile %s, CUDA graphs %s",
        cfg.preset, cfg.student.size, sum(p.numel() for p in student.parameters()) / 1e6, cfg.teacher.arch,
        len(records), G, info.world_size, plan.micro, plan.accumulation, last_step, steps_per_epoch, device,
        cfg.train.precision if device.type == "cuda" else "fp32", cfg.train.attention, cfg.train.compile,
        "on" if cfg.train.cuda_graphs else "off",
    )

    dataset = PretrainClipDataset(records, cfg.data.num_frames, cfg.data.img_size, seed=cfg.train.seed, flip=cfg.data.flip)
    loader = build_clip_loader(
        cfg.data.decoder, dataset, plan.micro, start_position=start_step * G, num_workers=cfg.data.num_workers,
        device=device, global_batch_size=G, rank=info.rank, world_size=info.world_size,
    )
    step_fn = PretrainStep(
        model, teacher, optimizer,
        mask_policy=cfg.mask.policy, mask_ratio=cfg.mask.ratio, seed=cfg.train.seed, device=device,
        autocast_dtype=low_precision, grad_scaler=scaler, rank=info.rank, first_clip=info.rank * plan.per_rank,
    )
    if cfg.train.cuda_graphs:
        step_fn = CUDAGraphStep(step_fn)

    figures = None
    if cfg.log.mask_figure_every_steps > 0 and info.is_main:
        if info.distributed and cfg.dist.strategy == "fsdp":
            log.warning("log.mask_figure_every_steps is ignored under FSDP (rank 0 cannot run a sharded student alone)")
        else:
            from umt_fast.viz.training import MaskFigureReporter

            figures = MaskFigureReporter(cfg, [r.path for r in records], teacher, student, device, low_precision)

    progress = ProgressLine(last_step, logger) if info.is_main else None
    last_checkpoint = resume_path
    last_loss = None
    loss_sum = torch.zeros((), device=device)
    window_steps, data_time = 0, 0.0
    window_start = time.perf_counter()
    model.train()
    batches = iter(loader)
    stop = StopOnSignal(info.distributed).install()
    try:
        for step in range(start_step, last_step):
            fetch_start = time.perf_counter()
            micro_batches = []
            for _ in range(plan.accumulation):
                batch = next(batches)
                budget.update(plan.micro, batch["skipped"], batch["skip_reasons"])
                micro_batches.append(batch["video"])
            data_time += time.perf_counter() - fetch_start

            lr = schedule.set_lr(optimizer, step)
            loss_sum += step_fn(micro_batches, step)
            window_steps += 1
            done = step + 1

            is_last = done == last_step
            save_now = done % cfg.checkpoint.every_steps == 0 or is_last
            stopping = False
            if done % cfg.log.every_steps == 0 or save_now or stop.check_every_step:
                # The only host sync: once per logging window, summed over ranks.
                counts = torch.tensor([budget.num_skipped, budget.num_seen, stop.flag], device=device, dtype=torch.float32)
                totals = all_reduce_sum(torch.cat([loss_sum.view(1), counts])).tolist()
                last_loss = totals[0] / (window_steps * info.world_size)
                num_skipped, num_seen = int(totals[1]), int(totals[2])
                stopping = totals[3] > 0
                save_now = save_now or stopping
                check_finite_loss(last_loss, done - window_steps + 1, done, last_checkpoint)
                elapsed = time.perf_counter() - window_start
                clips_per_s = window_steps * G / elapsed
                if info.is_main:
                    metrics.write({
                        "step": done, "loss": last_loss, "lr": lr, "clips/s": clips_per_s,
                        "data_time": data_time / window_steps, "data/skipped": num_skipped,
                        "epoch": step // steps_per_epoch, "time": time.time(),
                    })
                    progress.update(done, last_loss, lr, clips_per_s)
                loss_sum.zero_()
                window_steps, data_time = 0, 0.0
                window_start = time.perf_counter()

            if figures is not None and figures.due(done):
                figure_start = time.perf_counter()
                path = figures.maybe_write(done, metrics)
                if path:
                    log.info("wrote %s", path)
                window_start += time.perf_counter() - figure_start  # keep drawing out of clips/s

            if save_now:
                meta = {
                    "data_position": done * G,
                    "bad_samples": {**budget.state_dict(), "num_skipped": num_skipped, "num_seen": num_seen},
                    "config": config_to_dict(cfg),
                    "world_size": info.world_size,
                }
                if scaler is not None:
                    meta["grad_scaler"] = scaler.state_dict()
                last_checkpoint = ckpt.save_checkpoint(
                    cfg.run_dir, done, model, optimizer, meta, keep_last=cfg.checkpoint.keep_last, info=info
                )
                log.info("saved checkpoint %s", last_checkpoint)
            if stopping and not is_last:
                raise stop_run(stop, done, last_checkpoint, metrics)
    finally:
        stop.restore()
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
        del batches, loader
    return TrainResult(cfg.run_dir, last_checkpoint, last_step, last_loss)
