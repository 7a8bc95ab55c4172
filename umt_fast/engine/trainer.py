"""The one training loop under every recipe (stage 1, stage 2, fine-tuning).

The trainer owns what every run does the same way; a `Recipe` supplies only what is its own:

    trainer                                   recipe
    -------                                   ------
    init_distributed, recipe.plan       <-    plan(info): the batch split, refused before anything is built
    run dir + its lock (one run at a time), config.yaml (a fresh run), log.txt, seeds
    attention backend                         build(info, resume_path) -> Setup: the model (wrapped),
                                        <-      optimizer, schedule, steps per epoch, FLOPs per step
    resume: restore model + optimizer,  <-    load_state(meta): the recipe's own state
      the bad-sample counts, the config diff -> config_history.jsonl
    metrics sinks (jsonl, TensorBoard, W&B)
    for step in [start, last):
      batch = next(batches)  (timed)    <-    batches(start_step): per-step inputs from the exact data position
      lr = schedule.set_lr(optimizer, step)
      sums += step_fn(batch, step)      <-    step(batch, step) -> [M] device tensor, no host sync
      every log.every_steps: ONE all-reduce of (sums, bad-sample counts, stop flag) -> host
        -> loss terms, lr, throughput, TFLOP/s, MFU, data wait, peak memory -> metrics + progress line
        -> non-finite loss: stop, naming the last good checkpoint
      after_step(done, ...)             <-    figures, evaluation (kept out of the throughput)
      checkpoint every checkpoint.every_steps, at the end and on a stop signal
    finish(info)                        <-    e.g. the stage-2 export
    teardown (signal handlers, progress line, sinks, loaders, the lock) whatever happens; a new run
      that fails before its first step leaves only its log.txt

Works the same in one process (CPU or GPU) and under torchrun (DDP or FSDP2): rank 0 writes
the run directory's logs, metrics and figures; every rank takes part in checkpoints.
"""
from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from umt_fast.config.cli import append_config_history, config_to_dict, differing_fields
from umt_fast.engine import checkpoint as ckpt
from umt_fast.engine.distributed import DistInfo, all_reduce_sum, init_distributed
from umt_fast.engine.flops import peak_tflops
from umt_fast.engine.launch import RunDirLock, open_run_dir
from umt_fast.engine.metrics import ProgressLine, build_metrics_sinks, check_sink_packages
from umt_fast.engine.optim import WarmupCosineSchedule
from umt_fast.engine.stopping import StopOnSignal, stop_run
from umt_fast.models.attention import set_attention_backend

log = logging.getLogger(__name__)

DATA_WAIT_WARNING = 0.10  # the share of step time spent waiting for data that is worth one warning


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def require_cuda_for_graphs(cfg, device: torch.device) -> None:
    if cfg.train.cuda_graphs and device.type != "cuda":
        raise ValueError(f"train.cuda_graphs=True needs a CUDA device, but training runs on {device}")


def why_it_ends(last_step: int, total_steps: int, steps_per_epoch: int, cfg) -> str:
    """Which option fixes a run's last step, and how to go further."""
    if cfg.train.max_steps and cfg.train.max_steps <= total_steps:
        return (f"train.max_steps={cfg.train.max_steps} ends it at step {last_step}: raise --train.max_steps "
                f"(the schedule of optim.epochs={cfg.optim.epochs} runs to step {total_steps})")
    return (f"its schedule ends at step {total_steps} (optim.epochs={cfg.optim.epochs} x {steps_per_epoch} steps "
            f"per epoch): raise --optim.epochs to train longer (train.max_steps cannot go past the schedule)")


def last_step_of(total_steps: int, max_steps: int) -> int:
    return min(total_steps, max_steps) if max_steps else total_steps


@dataclass
class Setup:
    """What a recipe builds for the trainer."""

    model: nn.Module
    """The model as trained (DDP / FSDP2-wrapped under torchrun); checkpoints hold its state."""
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosineSchedule
    steps_per_epoch: int
    total_steps: int
    items_per_step: int
    """Clips (or pairs) per optimizer step over all ranks: the throughput's unit."""
    flops_per_step: float | None = None
    """Model FLOPs of one optimizer step over all ranks (engine.flops); None: not reported."""
    describe: str = ""
    """The one-line summary logged before the first step."""
    num_items: int | None = None
    """Clips (or pairs) in the training data, when the recipe knows them."""


@dataclass
class TrainResult:
    """Where a finished run is: its directory, last checkpoint, steps and last window's metrics."""

    run_dir: str
    last_checkpoint: str | None
    steps_done: int
    last_loss: float | None
    last_metrics: dict[str, Any] = field(default_factory=dict)
    eval_report: dict | None = None
    export_path: str | None = None

    @property
    def train_top1(self) -> float | None:
        return self.last_metrics.get("train/top1")


class Recipe:
    """One training recipe on the trainer; subclasses fill in the methods that raise.

    Attributes a subclass sets: ``cfg`` (its config, with the shared sections train, optim,
    checkpoint, log and dist), ``unit`` (what one item of the batch is, for the throughput),
    ``loss_names`` (the entries of the step's output vector; the first is the loss) and
    ``budget`` (a data.BadSampleBudget when its data skips unreadable samples, else None).
    """

    unit = "clips"
    loss_names: tuple[str, ...] = ("loss",)
    budget = None

    def __init__(self, cfg):
        self.cfg = cfg

    def plan(self, info: DistInfo) -> None:
        """Checks how the batch splits over ``info.world_size`` ranks; ValueError naming the fields."""

    def build(self, info: DistInfo, resume_path: str | None) -> Setup:
        raise NotImplementedError

    def load_state(self, meta: dict, info: DistInfo) -> None:
        """Restores the recipe's own state from a checkpoint's metadata."""

    def batches(self, start_step: int) -> Iterator[Any]:
        """The inputs of steps start_step, start_step + 1, ..."""
        raise NotImplementedError

    def step(self, batch: Any, step: int) -> torch.Tensor:
        """One optimizer step; a [len(loss_names)] fp32 device tensor (no host sync)."""
        raise NotImplementedError

    def window_metrics(self, sums: list[float], window_steps: int, world_size: int) -> dict[str, float]:
        """The logging window's metrics from the summed step outputs (over steps and ranks)."""
        return {name: total / (window_steps * world_size) for name, total in zip(self.loss_names, sums)}

    def data_position(self, steps_done: int) -> int:
        """Where the data stream continues after `steps_done` steps (stored in checkpoints)."""
        return steps_done * self.cfg.train.global_batch_size

    def checkpoint_meta(self) -> dict:
        """The recipe's own entries of a checkpoint's metadata."""
        return {}

    def after_step(self, done: int, is_last: bool, metrics) -> None:
        """Work between steps (figures, evaluation); its time is kept out of the throughput."""

    def finish(self, info: DistInfo) -> None:
        """After the last step (every rank): e.g. an export."""

    def result(self, result: TrainResult) -> TrainResult:
        return result

    def data_wait_advice(self, device: torch.device) -> str:
        data = self.cfg.data
        advice = f"raise --data.num_workers (now {data.num_workers})"
        if device.type == "cuda" and getattr(data, "decoder", "dali") != "dali":
            advice += " or decode on the GPU (--data.decoder dali)"
        return advice


def _window_record(recipe: Recipe, setup: Setup, info: DistInfo, sums: list[float], window_steps: int,
                   elapsed: float, data_wait: float, peak: float | None) -> dict[str, Any]:  # fmt: skip
    record = recipe.window_metrics(sums, window_steps, info.world_size)
    step_s = elapsed / window_steps
    record[f"{recipe.unit}/s"] = setup.items_per_step / step_s
    record["data_wait_ms"] = 1e3 * data_wait / window_steps
    if setup.flops_per_step:
        tflops = setup.flops_per_step / info.world_size / step_s / 1e12  # per device
        record["tflops"] = tflops
        if peak:
            record["mfu"] = tflops / peak
    if info.device.type == "cuda":
        record["peak_mem_gb"] = torch.cuda.max_memory_allocated(info.device) / 2**30
    return record


def _progress_extras(record: dict[str, Any]) -> str:
    parts = []
    if "tflops" in record:
        parts.append(f"{record['tflops']:.3g} TFLOP/s")
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    parts.append(f"data {record['data_wait_ms']:.0f} ms")
    if "peak_mem_gb" in record:
        parts.append(f"mem {record['peak_mem_gb']:.1f} GB")
    return " | ".join(parts)


def run(recipe: Recipe) -> TrainResult:
    """Runs (or resumes) `recipe` as its config says; returns where things are."""
    cfg = recipe.cfg
    info = init_distributed(cfg.train.device)
    recipe.plan(info)
    require_cuda_for_graphs(cfg, info.device)
    lock, created = None, False
    if info.is_main:
        check_sink_packages(cfg.log.tensorboard, cfg.log.wandb)  # refuse before touching anything
        created = not os.path.exists(cfg.run_dir)
        os.makedirs(cfg.run_dir, exist_ok=True)
        lock = RunDirLock(cfg.run_dir)
    steps_run = [0]  # how many steps this process ran, which the cleanup below needs
    try:
        return _train(recipe, info, steps_run)
    except BaseException as exc:
        if created and steps_run[0] == 0:  # failed before its first step: keep only the log
            if isinstance(exc, Exception):
                log.error("the run failed before its first step: %s", exc, extra={"file_only": True})
            _remove_all_but_the_log(cfg.run_dir)
        raise
    finally:
        if lock is not None:
            lock.release()


def _remove_all_but_the_log(run_dir: str) -> None:
    import shutil

    for name in os.listdir(run_dir):
        if name != "log.txt":
            path = os.path.join(run_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
    if not os.listdir(run_dir):
        os.rmdir(run_dir)


def _train(recipe: Recipe, info: DistInfo, steps_run: list[int]) -> TrainResult:
    cfg = recipe.cfg
    resume_path, logger = open_run_dir(cfg, info)
    device = info.device
    seed_everything(cfg.train.seed)
    set_attention_backend(cfg.train.attention)
    setup = recipe.build(info, resume_path)
    model, optimizer, schedule = setup.model, setup.optimizer, setup.schedule
    if setup.num_items is not None and setup.items_per_step > setup.num_items:
        log.warning("a step takes %d %s, more than the training data holds (%d): every step repeats some of them; "
                    "lower --train.global_batch_size", setup.items_per_step, recipe.unit, setup.num_items)  # fmt: skip
    last_step = last_step_of(setup.total_steps, cfg.train.max_steps)
    precision = cfg.train.precision if device.type == "cuda" else "fp32"
    peak = peak_tflops(device, precision)  # the card's, for MFU; None on a CPU or an unknown card
    budget = recipe.budget

    start_step = 0
    if resume_path is not None:
        meta = ckpt.restore_checkpoint(resume_path, model, optimizer)
        changed = differing_fields(meta.get("config", {}), config_to_dict(cfg), defaults=config_to_dict(type(cfg)()))
        if changed:
            log.warning("resuming with a config that differs from the checkpoint's: %s",
                        "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()))  # fmt: skip
            if info.is_main:
                append_config_history(cfg.run_dir, meta["step"], changed)
        if budget is not None and info.is_main:  # the counts are global totals; other ranks count from zero
            budget.load_state_dict(meta["bad_samples"])
        recipe.load_state(meta, info)
        start_step = meta["step"]
        log.info("resumed from step %d (%s, data position %d)", start_step, resume_path, meta["data_position"])
        if start_step >= last_step:
            log.warning("nothing to train: the run is at step %d and %s", start_step,
                        why_it_ends(last_step, setup.total_steps, setup.steps_per_epoch, cfg))  # fmt: skip

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
    log.info("%s | %d steps (%d per epoch) | %s, %s, attention %s, compile %s%s", setup.describe, last_step,
             setup.steps_per_epoch, device, precision, cfg.train.attention, cfg.train.compile,
             ", CUDA graphs" if cfg.train.cuda_graphs else "")  # fmt: skip

    progress = ProgressLine(last_step, logger, unit=recipe.unit, start_step=start_step) if info.is_main else None
    last_checkpoint, last_metrics = resume_path, {}
    sums = torch.zeros(len(recipe.loss_names), device=device)
    window_steps, data_wait, windows, warned = 0, 0.0, 0, False
    num_skipped = num_seen = 0
    model.train()
    batches = recipe.batches(start_step)
    window_start = time.perf_counter()
    stop = StopOnSignal(info.distributed).install()
    try:
        for step in range(start_step, last_step):
            fetch_start = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - fetch_start
            lr = schedule.set_lr(optimizer, step)
            sums += recipe.step(batch, step)
            steps_run[0] += 1
            window_steps += 1
            done = step + 1
            is_last = done == last_step
            save_now = done % cfg.checkpoint.every_steps == 0 or is_last
            stopping = False
            if done % cfg.log.every_steps == 0 or save_now or stop.check_every_step:
                # The only host sync: once per logging window, summed over ranks.
                counts = [budget.num_skipped, budget.num_seen] if budget is not None else []
                host = torch.tensor([*counts, stop.flag], device=device, dtype=torch.float32)
                totals = all_reduce_sum(torch.cat([sums, host])).tolist()
                stopping = totals[-1] > 0
                save_now = save_now or stopping
                if budget is not None:
                    num_skipped, num_seen = int(totals[len(sums)]), int(totals[len(sums) + 1])
                elapsed = time.perf_counter() - window_start
                record = _window_record(recipe, setup, info, totals[:len(sums)], window_steps, elapsed, data_wait,
                                        peak)  # fmt: skip
                check_finite_loss(record["loss"], done - window_steps + 1, done, last_checkpoint)
                windows += 1
                if windows > 1 and not warned and data_wait > DATA_WAIT_WARNING * elapsed:
                    warned = True
                    log.warning("the step waited for its data %.0f%% of the time (%.1f of %.1f ms per step): %s",
                                100 * data_wait / elapsed, record["data_wait_ms"], 1e3 * elapsed / window_steps,
                                recipe.data_wait_advice(device))  # fmt: skip
                last_metrics = {"step": done, **record, "lr": lr}
                if info.is_main:
                    extra = {"data/skipped": num_skipped} if budget is not None else {}
                    metrics.write({**last_metrics, **extra, "epoch": step // setup.steps_per_epoch, "time": time.time()})
                    progress.update(done, record["loss"], lr, record[f"{recipe.unit}/s"], _progress_extras(record))
                sums.zero_()
                window_steps, data_wait = 0, 0.0
                window_start = time.perf_counter()

            pause_start = time.perf_counter()
            recipe.after_step(done, is_last, metrics)
            window_start += time.perf_counter() - pause_start  # keep figures and evaluation out of the throughput

            if save_now:
                meta = {"data_position": recipe.data_position(done), "config": config_to_dict(cfg),
                        "world_size": info.world_size, **recipe.checkpoint_meta()}  # fmt: skip
                if budget is not None:
                    meta["bad_samples"] = {**budget.state_dict(), "num_skipped": num_skipped, "num_seen": num_seen}
                last_checkpoint = ckpt.save_checkpoint(cfg.run_dir, done, model, optimizer, meta,
                                                       keep_last=cfg.checkpoint.keep_last, info=info)  # fmt: skip
                log.info("saved checkpoint %s", last_checkpoint)
            if stopping and not is_last:
                raise stop_run(stop, done, last_checkpoint, metrics)
        recipe.finish(info)
    finally:
        stop.restore()
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
        del batches
    return recipe.result(TrainResult(cfg.run_dir, last_checkpoint, last_step, last_metrics.get("loss"), last_metrics))

