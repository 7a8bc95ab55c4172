"""Stage 1: UMT pre-training. One optimizer step, as data (DESIGN.md "One stage-1 step"):

    uint8 clips [m, T, H, W, 3] -> normalise on the device -> x [m, 3, T, H, W]
    teacher(x)  -> CLS attention [m, T, P] + last-L residual streams
    mask policy -> visible token indices [m, N] (sorted, on the device); for the attention
                   policy, sampling and the gather of the teacher's rows are one fused launch
    teacher targets on those rows only [L, m, N, Ct];  student(x, idx) [L, m, N, Ct]
    loss = mean(2 - 2 cos) -> backward      (once per micro-batch of m clips)
    -> AdamW step                           (once per optimizer step)

The step never reads a value back to the host: the loss is returned as a device tensor and
read only when logging. Every shape depends on the config alone. The masks and the drop-path
draws are functions of (seed, step) and of each clip's index in the global batch, so a step is
reproducible on resume and does not depend on how the batch is split over ranks and
micro-batches.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from umt_fast.config import SAMPLE_CLIPS, PretrainConfig, peak_lr, scaled_min_lr, scaled_warmup_lr, teacher_specs
from umt_fast.data import BadSampleBudget, PretrainClipDataset, build_clip_loader, read_annotation_list, write_sample_clip_list
from umt_fast.data.mix import MixSource, read_mix
from umt_fast.data.transforms import normalize_video
from umt_fast.engine.cuda_graph import CUDAGraphStep
from umt_fast.engine.distributed import DistInfo, barrier, set_gradient_sync, unwrap, wrap_student
from umt_fast.engine.flops import pretrain_flops_per_clip
from umt_fast.engine.optim import WarmupCosineSchedule, build_optimizer
from umt_fast.engine.trainer import NonFiniteLossError, Recipe, Setup, TrainResult, run  # noqa: F401 (NonFiniteLossError: for callers)
from umt_fast.interop import build_teachers
from umt_fast.losses import alignment_loss
from umt_fast.masking import mask_and_targets, visible_tokens_per_clip
from umt_fast.models import build_student
from umt_fast.models.fp8 import teachers_at_precision
from umt_fast.models.student import drop_path_scales, keep_probabilities
from umt_fast.models.teacher import CLIPVisionTeacher
from umt_kernels.rng import mix_seed

log = logging.getLogger(__name__)

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class PretrainStep:
    """Callable ``(micro_batches, step) -> loss``.

    Args:
        student: the student, possibly wrapped in DDP or sharded with FSDP2.
        teacher: the frozen teacher (replicated), teacher 0.
        extra_teachers: further frozen teachers (1, 2, ...), each matched by its own student heads.
        loss_weights: one per teacher; the loss is the weighted sum of the teachers' terms.
        mask_teacher: the teacher whose attention the attention policy samples from.
        optimizer: over the student's parameters.
        mask_policy, mask_ratio: see umt_fast.masking.
        seed: the run seed (masks, drop path).
        device: where the step runs.
        autocast_dtype: bf16 / fp16 autocast on the GPU, None for fp32.
        grad_scaler: a GradScaler for fp16, else None.
        rank: this process's rank (seeds torch's generators per rank, for anything else random).
        first_clip: global index, within every global batch, of this rank's first clip.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: CLIPVisionTeacher,
        optimizer: torch.optim.Optimizer,
        *,
        mask_policy: str,
        mask_ratio: float,
        seed: int,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        grad_scaler: torch.amp.GradScaler | None = None,
        rank: int = 0,
        first_clip: int = 0,
        extra_teachers: tuple[nn.Module, ...] | list[nn.Module] = (),
        loss_weights: tuple[float, ...] | list[float] | None = None,
        mask_teacher: int = 0,
    ):
        self.student = student
        self.teacher = teacher
        self.teachers = [teacher, *extra_teachers]
        weights = [1.0] * len(self.teachers) if loss_weights is None else list(loss_weights)
        if len(weights) != len(self.teachers):
            raise ValueError(f"loss_weights has {len(weights)} entries for {len(self.teachers)} teachers")
        self.loss_weights = torch.tensor(weights, dtype=torch.float32, device=device)
        if not 0 <= mask_teacher < len(self.teachers):
            raise ValueError(f"mask_teacher={mask_teacher} names no teacher (there are {len(self.teachers)})")
        self.mask_teacher = mask_teacher
        self.optimizer = optimizer
        self.mask_policy = mask_policy
        self.mask_ratio = mask_ratio
        self.seed = seed
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.grad_scaler = grad_scaler
        self.rank = rank
        self.first_clip = first_clip
        self.keep_prob = keep_probabilities(unwrap(student).encoder.drop_probs, device)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @property
    def multi_teacher(self) -> bool:
        return len(self.teachers) > 1

    def micro_batch_loss(self, video_BTHWC: torch.Tensor, step: int | torch.Tensor, first_clip: int) -> torch.Tensor:
        """Forward of one micro-batch: uint8 [m, T, H, W, 3] -> 0-dim fp32 loss (with graph)."""
        return self.micro_batch_losses(video_BTHWC, step, first_clip)[0]

    def micro_batch_losses(self, video_BTHWC: torch.Tensor, step: int | torch.Tensor, first_clip: int) -> torch.Tensor:
        """Forward of one micro-batch: uint8 [m, T, H, W, 3] -> [1 + n_teachers] fp32, the loss (with
        graph) and each teacher's alignment term.

        ``step`` keys the masks: a Python int, or a 0-dim int64 tensor on the device (read
        there, so that a captured CUDA graph draws new masks on every replay). The mask
        teacher runs first and picks the visible tokens; every other teacher then runs and gives
        its targets on those tokens, one at a time, so that one teacher's residual streams are
        alive at once.
        """
        video = normalize_video(video_BTHWC.to(self.device, non_blocking=True))
        targets: list[torch.Tensor | None] = [None] * len(self.teachers)
        with torch.no_grad(), self._autocast():
            teacher_out = self.teachers[self.mask_teacher](video)
            visible_idx_BN, targets[self.mask_teacher] = mask_and_targets(
                teacher_out, self.mask_policy, ratio=self.mask_ratio, seed=self.seed, offset=step, first_clip=first_clip
            )
            del teacher_out  # frees the residual streams before the next forward
            for i, teacher in enumerate(self.teachers):
                if targets[i] is None:
                    targets[i] = teacher(video).targets(visible_idx_BN)
        drop_scales = None
        if self.keep_prob is not None:
            drop_scales = drop_path_scales(self.keep_prob, video.shape[0], seed=self.seed, offset=step, first_clip=first_clip)
        with self._autocast():
            outputs = self.student(video, visible_idx_BN, drop_scales, all_teachers=True)
        terms = torch.stack([alignment_loss(s, t) for s, t in zip(outputs, targets)])
        return torch.cat([(self.loss_weights * terms).sum().view(1), terms.detach()])

    def __call__(self, micro_batches: list[torch.Tensor] | torch.Tensor, step: int) -> torch.Tensor:
        """One optimizer step over this rank's clips (one uint8 tensor, or a list of micro-batches).

        Returns:
            0-dim fp32 on the device: this rank's mean loss over its micro-batches; with several
            teachers, [1 + n_teachers]: the loss, then each teacher's alignment term.
        """
        if isinstance(micro_batches, torch.Tensor):
            micro_batches = [micro_batches]
        self.seed_random_streams(step)
        return self.run(micro_batches, step)

    def seed_random_streams(self, step: int) -> None:
        """Seeds torch's generators from (seed, step, rank): reproducible on resume. (Masks and
        drop path do not use them: both are counter-based functions of the seed, the step and
        each clip's global index.)"""
        torch.manual_seed(mix_seed(self.seed, step) + self.rank)

    def run(self, micro_batches: list[torch.Tensor], step: int | torch.Tensor) -> torch.Tensor:
        """The step's device work, without seeding: zero the gradients, forward and backward
        every micro-batch, step the optimizer. Capturable in a CUDA graph when ``step`` is a
        device tensor and there is no GradScaler (see umt_fast.engine.cuda_graph)."""
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros(1 + len(self.teachers), device=self.device)
        first_clip, count = self.first_clip, len(micro_batches)
        for i, video in enumerate(micro_batches):
            with set_gradient_sync(self.student, i == count - 1):
                losses = self.micro_batch_losses(video, step, first_clip)
                scaled = losses[0] / count
                (self.grad_scaler.scale(scaled) if self.grad_scaler else scaled).backward()
            total += losses.detach()
            first_clip += video.shape[0]
        if self.grad_scaler:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        mean = total / count
        return mean if self.multi_teacher else mean[0]


# ----------------------------------------------------------------------------------- the recipe


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
        raise ValueError(f"train.global_batch_size={G} must be divisible by the number of ranks ({world_size})")
    per_rank = G // world_size
    micro = cfg.train.micro_batch_size or per_rank
    if per_rank % micro:
        raise ValueError(
            f"train.micro_batch_size={micro} must divide the per-rank batch "
            f"(train.global_batch_size {G} / {world_size} ranks = {per_rank})"
        )
    return BatchPlan(G, per_rank, micro)


def compile_blocks(modules: list[nn.Module], whole: nn.Module, mode: str, backend: str) -> None:
    """``train.compile``, in place (Module.compile keeps parameter names): each of `modules`
    (``blocks``), or `whole` (``model``)."""
    if mode == "blocks":
        for module in modules:
            module.compile(backend=backend)
    elif mode == "model":
        whole.compile(backend=backend)


def _compile(student, teacher, mode: str, backend: str, extra_teachers=()) -> None:
    """Stage 1: every teacher per block whenever compiling; the student per block or whole."""
    if mode == "none":
        return
    for t in (teacher, *extra_teachers):
        compile_blocks(t.compilable_blocks, t, "blocks", backend)
    compile_blocks(list(student.encoder.blocks), student, mode, backend)


def train_list_path(path: str, run_dir: str, info: DistInfo) -> str:
    """`data.train_list`, or the bundled sample clips' list written into the run directory."""
    if path != SAMPLE_CLIPS:
        return path
    path = os.path.join(run_dir, "sample_clips.csv")
    if info.is_main:
        write_sample_clip_list(path)
    barrier()
    return path


class PretrainRecipe(Recipe):
    """Stage 1: the sparse student distilled from the frozen teacher on the visible tokens."""

    def plan(self, info: DistInfo) -> None:
        self.info = info
        self.batch_plan = plan_batches(self.cfg, info.world_size)

    def build(self, info: DistInfo, resume_path: str | None) -> Setup:
        cfg, plan, device = self.cfg, self.batch_plan, info.device
        self.mix = None
        if cfg.data.mix:
            sources = [MixSource(**{**d, "list": train_list_path(d["list"], cfg.run_dir, info)})
                       for d in cfg.data.mix_sources()]  # fmt: skip
            self.records, self.mix = read_mix(sources, cfg.train.seed)
            log.info("data.mix: %s (data.train_list is not read)", ", ".join(
                f"{s.list} ({n} clips, weight {s.weight:g})" for s, n in zip(sources, self.mix.sizes)))
        else:
            self.records = read_annotation_list(train_list_path(cfg.data.train_list, cfg.run_dir, info),
                                                root=cfg.data.root)  # fmt: skip
        G = plan.global_batch
        steps_per_epoch = max(1, len(self.records) // G)
        total_steps = cfg.optim.epochs * steps_per_epoch
        schedule = WarmupCosineSchedule(peak_lr=peak_lr(cfg), min_lr=scaled_min_lr(cfg), total_steps=total_steps,
                                        warmup_steps=cfg.optim.warmup_epochs * steps_per_epoch,
                                        warmup_lr=scaled_warmup_lr(cfg))  # fmt: skip
        self.low_precision = AUTOCAST[cfg.train.precision] if device.type == "cuda" else None
        teachers = [t.to(device) for t in build_teachers(cfg)]
        if self.low_precision is not None:  # frozen: bf16/fp16 weights, LayerNorm statistics in fp32
            teachers = [t.to(self.low_precision) for t in teachers]
        teachers = teachers_at_precision(teachers, cfg.teacher.precision, device)
        teacher = teachers[0]
        extra_heads = [(t.arch.return_layers, t.arch.output_dim) for t in teachers[1:]]
        student = build_student(cfg, teacher_dim=teacher.arch.output_dim, extra_heads=extra_heads).to(device)
        student.set_grad_checkpointing(num_blocks=cfg.train.checkpointed_blocks(student.arch.depth))
        _compile(student, teacher, cfg.train.compile, cfg.train.compile_backend, teachers[1:])
        # DDP is built on a side stream for CUDA graphs, as PyTorch's capture of DDP asks.
        graph_capture = cfg.train.cuda_graphs and device.type == "cuda"
        with torch.cuda.stream(torch.cuda.Stream()) if graph_capture else contextlib.nullcontext():
            model = wrap_student(student, cfg.dist.strategy, info, self.low_precision)
        optimizer = build_optimizer(model, schedule(0), cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps,
                                    capturable=cfg.train.cuda_graphs)  # fmt: skip
        self.scaler = torch.amp.GradScaler("cuda") if self.low_precision == torch.float16 else None
        self.budget = BadSampleBudget(cfg.data.max_bad_fraction)
        self.teacher, self.student, self.model = teacher, student, model
        step_fn = PretrainStep(model, teacher, optimizer, mask_policy=cfg.mask.policy, mask_ratio=cfg.mask.ratio,
                               seed=cfg.train.seed, device=device, autocast_dtype=self.low_precision,
                               grad_scaler=self.scaler, rank=info.rank, first_clip=info.rank * plan.per_rank,
                               extra_teachers=teachers[1:], mask_teacher=cfg.mask.teacher,
                               loss_weights=[spec.loss_weight for spec in teacher_specs(cfg)])  # fmt: skip
        if len(teachers) > 1:
            self.loss_names = ("loss", *(f"loss_teacher{i}" for i in range(len(teachers))))
        self.step_fn = CUDAGraphStep(step_fn) if cfg.train.cuda_graphs else step_fn
        self.figures = None
        if cfg.log.mask_figure_every_steps > 0 and info.is_main:
            if info.distributed and cfg.dist.strategy == "fsdp":
                log.warning("log.mask_figure_every_steps is ignored under FSDP (rank 0 cannot run a sharded student alone)")
            else:
                from umt_fast.viz.training import MaskFigureReporter

                self.figures = MaskFigureReporter(cfg, [r.path for r in self.records], teacher, student, device,
                                                  self.low_precision)  # fmt: skip
        num_visible = visible_tokens_per_clip(cfg.mask.policy, student.arch.num_frames, student.arch.patches_per_frame,
                                              cfg.mask.ratio)  # fmt: skip
        flops = G * sum(pretrain_flops_per_clip(t.arch, student.arch, t.arch.grid, num_visible,
                                                with_student=t is teacher)
                        for t in teachers)  # fmt: skip
        describe = (f"preset {cfg.preset} | student {cfg.student.size} ({sum(p.numel() for p in student.parameters()) / 1e6:.1f}M "
                    f"params) | teacher {' + '.join(spec.arch for spec in teacher_specs(cfg))} | {len(self.records)} clips | global batch {G} = "
                    f"{info.world_size} ranks x {plan.micro} x {plan.accumulation} micro-batches")  # fmt: skip
        return Setup(model, optimizer, schedule, steps_per_epoch, total_steps, G, flops, describe, len(self.records))

    def load_state(self, meta: dict, info: DistInfo) -> None:
        if self.scaler is not None and "grad_scaler" in meta:
            self.scaler.load_state_dict(meta["grad_scaler"])

    def checkpoint_meta(self) -> dict:
        return {"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def batches(self, start_step: int) -> Iterator[list[torch.Tensor]]:
        cfg, plan, info = self.cfg, self.batch_plan, self.info
        dataset = PretrainClipDataset(self.records, cfg.data.num_frames, cfg.data.img_size, seed=cfg.train.seed,
                                      flip=cfg.data.flip, mix=self.mix)  # fmt: skip
        loader = build_clip_loader(cfg.data.decoder, dataset, plan.micro, start_position=start_step * plan.global_batch,
                                   num_workers=cfg.data.num_workers, device=info.device,
                                   global_batch_size=plan.global_batch, rank=info.rank,
                                   world_size=info.world_size)  # fmt: skip
        stream = iter(loader)
        while True:
            micro_batches = []
            for _ in range(plan.accumulation):
                batch = next(stream)
                self.budget.update(plan.micro, batch["skipped"], batch["skip_reasons"])
                micro_batches.append(batch["video"])
            yield micro_batches

    def step(self, micro_batches: list[torch.Tensor], step: int) -> torch.Tensor:
        return self.step_fn(micro_batches, step).view(-1)

    def after_step(self, done: int, is_last: bool, metrics) -> None:
        if self.figures is not None and self.figures.due(done):
            path = self.figures.maybe_write(done, metrics)
            if path:
                log.info("wrote %s", path)


def train(cfg: PretrainConfig) -> TrainResult:
    """Runs (or resumes) stage-1 pre-training as ``cfg`` says; returns where things are."""
    return run(PretrainRecipe(cfg))
