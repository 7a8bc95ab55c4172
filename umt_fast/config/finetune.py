"""Configuration of a fine-tuning run (action recognition), in the layout of `umt_fast.config`.

A run is one `FinetuneConfig` of nested sections (``model``, ``data``, ``aug``, ``optim``,
``train``, ``eval``, ``checkpoint``, ``log``); every field has a default and a docstring, and
the values come from a preset, then ``--config FILE``, then ``--section.field VALUE`` options,
as for pre-training. Bad values raise ValueError naming the field before any work.

Presets (UMT_SPEC.md section 3 and the reference's published fine-tuning scripts):

* ``demo``: a tiny model on the bundled sample clips, each clip's identity as its label;
* ``umt_b16_k400`` / ``umt_l16_k400``: Kinetics-400, starting (as the reference's K400
  scripts do) from the K710-fine-tuned model: 5 epochs, 1 warm-up, lr 2e-5 (B) / 1e-5 (L);
* ``umt_b16_ssv2`` / ``umt_l16_ssv2``: Something-Something v2, no flip: B from the stage-1
  model (30 epochs, 5 warm-up, lr 2e-4), L from the K710-fine-tuned model (14 epochs,
  4 warm-up, lr 4e-4, 12 checkpointed blocks);
* ``probe_demo``: an attentive probe of a frozen tiny model on the bundled sample clips;
* ``probe_b16_k400`` / ``probe_l16_k400``: an attentive probe of a frozen stage-1 / stage-2
  encoder on Kinetics-400, with V-JEPA's frozen-evaluation recipe (20 epochs, lr 1e-3, weight
  decay 0.01, batch 256, no warm-up).

``python -m umt_fast.probe`` is this command with ``model.probe`` attentive by default
(`PROBE_SCHEMA`).

lr values are per 256 clips, and a step holds ``train.global_batch_size x data.repeated_aug`` clips,
which is how the reference scales them (``lr x batch x num_sample / 256``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from umt_fast.config import SAMPLE_CLIPS, STUDENT_SIZES
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
    CheckpointConfig,
    DistConfig,
    LogConfig,
    OptimConfig,
    StudentSize,
    TrainConfig,
    check_mix_paths,
    mix_sources,
    refuse_unsupported,
)

FINETUNE_PRECISIONS = ("bf16", "fp32")


@dataclass
class ModelConfig(Section):
    """The classifier: the dense video ViT, mean pooling, fc_norm, dropout and a Linear head; or
    a frozen backbone under a probe head (model.probe)."""

    SECTION = "model"

    size: StudentSize = "base"
    """Backbone size, one of tiny (192 wide, 4 deep), base (ViT-B), large (ViT-L)."""
    patch_size: int = 16
    """Spatial patch size in pixels (tubelet size 1)."""
    num_classes: int = 400
    """Classes of the head (0 = as many as the labels of data.train_list, 1 + the largest)."""
    init: str = ""
    """Weights to start from: a stage-1 / stage-2 / fine-tuned reference file (.pth/.safetensors),
    an export of ours, or a pre-training run checkpoint (checkpoints/step_N); '' = random init.
    """
    init_strict: Bool = True
    """Refuse an init file whose backbone does not match exactly (false: load what matches and log a
    warning listing the rest).
    """
    head_label_map: str = ""
    """JSON list of the init file's head rows, one per class (row k becomes class k): starts the head
    from a K710 file's for Kinetics-600 / 700, as the reference's k710/label_mixto600.json /
    label_mixto700.json do; '' = none (a 710-class head for 400 classes gives its first 400 rows,
    a head of another class count starts fresh).
    """
    drop_path: float = 0.1
    """Stochastic depth of the last block, linear from 0 (B 0.1, L 0.2); in [0, 1)."""
    head_dropout: float = 0.0
    """Dropout before the head (the reference's fc_drop_rate, 0 in its recipes); in [0, 1)."""
    probe: Literal["none", "linear", "attentive"] = "none"
    """none: fine-tune the whole classifier. linear / attentive: a frozen-feature probe: the backbone
    from model.init (patch embedding, blocks, final norm) is frozen, left out of the optimizer and
    runs without drop path (model.drop_path, optim.layer_decay and train.activation_checkpointing do
    not apply); only the head trains: linear = mean of the tokens -> Linear; attentive = learned
    queries cross-attending to the tokens, then an MLP (V-JEPA's attentive probe) -> Linear. The
    init file's fc_norm and head are not used.
    """
    probe_queries: int = 1
    """Learned queries of the attentive probe (their outputs are averaged before the head); >= 1."""
    probe_heads: int = 0
    """Attention heads of the attentive probe (0 = the backbone's: tiny 3, base 12, large 16); must
    divide the width.
    """

    def validate(self) -> None:
        super().validate()
        require(self.patch_size >= 1, "model.patch_size", self.patch_size, "must be >= 1")
        require(self.probe_queries >= 1, "model.probe_queries", self.probe_queries, "must be >= 1")
        width = STUDENT_SIZES[self.size]["width"]
        require(self.probe_heads >= 0 and (self.probe_heads == 0 or width % self.probe_heads == 0), "model.probe_heads",
                self.probe_heads, f"must be 0 (the backbone's) or divide the width of a {self.size!r} model ({width})")  # fmt: skip
        if self.probe != "none":
            require(not self.head_label_map, "model.head_label_map", self.head_label_map,
                    f"does not apply to a probe (model.probe={self.probe}), whose head starts fresh")  # fmt: skip
        require(self.num_classes >= 0, "model.num_classes", self.num_classes, "must be >= 0 (0 = from the labels)")
        require(0.0 <= self.drop_path < 1.0, "model.drop_path", self.drop_path, "must be in [0, 1)")
        require(0.0 <= self.head_dropout < 1.0, "model.head_dropout", self.head_dropout, "must be in [0, 1)")
        if self.head_label_map:
            require(bool(self.init), "model.head_label_map", self.head_label_map,
                     "needs model.init (the file whose head rows it picks)")  # fmt: skip


@dataclass
class LabelledDataConfig(Section):
    """Labelled clips: annotation lists of 'path,label' lines (the reference's CSV)."""

    SECTION = "data"

    train_list: str = ""
    """Training list ('path,label' lines); 'sample_clips' = the bundled clips, labelled by identity."""
    val_list: str = ""
    """Evaluation list ('' = no evaluation during training); 'sample_clips' as for train_list."""
    root: str = ""
    """Directory that relative paths in the lists are resolved against ('' = as written)."""
    class_names: str = ""
    """Optional file with one class name per line (line i = label i), used in the reports."""
    num_frames: int = 8
    """Frames per clip (TSN sampling: one frame from each of num_frames equal segments)."""
    img_size: int = 224
    """Side of the square input crop; a multiple of model.patch_size."""
    repeated_aug: int = 2
    """Repeated augmentation: each decoded video gives this many independently augmented clips
    (the reference's num_sample); >= 1.
    """
    num_workers: int = 4
    """DataLoader worker processes (0 = load in the main process)."""
    max_bad_fraction: float = 0.5
    """Largest tolerated fraction of undecodable videos (skipped; beyond it the run stops)."""
    mix: tuple[str, ...] = ()
    """Several labelled lists or shard manifests mixed by weight, in place of data.train_list (e.g.
    K400 + K600 + K700 as K710 through label maps): each
    'list=PATH,weight=W[,root=DIR][,label_offset=N][,label_map=FILE]'; the mix is a function of
    (seed, step), the same on every rank. In a config file: a list of such strings or of mappings.
    """

    def validate(self) -> None:
        super().validate()
        mix_sources(self.mix)
        require(self.num_frames >= 1, "data.num_frames", self.num_frames, "must be >= 1")
        require(self.img_size > 0, "data.img_size", self.img_size, "must be > 0")
        require(self.repeated_aug >= 1, "data.repeated_aug", self.repeated_aug, "must be >= 1")
        require(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")
        require(0 <= self.max_bad_fraction <= 1, "data.max_bad_fraction", self.max_bad_fraction, "must be in [0, 1]")


@dataclass
class AugmentConfig(Section):
    """Training augmentation (the reference's): RandomResizedCrop, flip, RandAugment, random erasing,
    mixup / cutmix and label smoothing."""

    SECTION = "aug"

    min_scale: float = 0.08
    """RandomResizedCrop: smallest crop area as a fraction of the frame (aspect ratio 3/4..4/3); in (0, 1]."""
    flip: Bool = True
    """Random horizontal flip (off for Something-Something, whose labels name directions)."""
    rand_augment_ops: int = 4
    """RandAugment: operations per clip, the same for all its frames (0 = off)."""
    rand_augment_magnitude: int = 7
    """RandAugment magnitude on timm's 0..10 scale (the reference's rand-m7-n4); in [0, 10]."""
    random_erasing: float = 0.25
    """Probability of erasing one random box (the same in every frame) with normal noise; in [0, 1]."""
    mixup: float = 0.8
    """Mixup Beta(alpha, alpha) parameter (0 = off)."""
    cutmix: float = 1.0
    """CutMix Beta(alpha, alpha) parameter (0 = off); the box is the same in every frame."""
    mix_prob: float = 1.0
    """Probability that a batch is mixed at all (when mixup or cutmix is on); in [0, 1]."""
    switch_prob: float = 0.5
    """With both on: probability of cutmix instead of mixup for a batch; in [0, 1]."""
    label_smoothing: float = 0.1
    """Label smoothing of the (mixed) targets; in [0, 1)."""

    def validate(self) -> None:
        super().validate()
        require(0 < self.min_scale <= 1, "aug.min_scale", self.min_scale, "must be in (0, 1]")
        require(self.rand_augment_ops >= 0, "aug.rand_augment_ops", self.rand_augment_ops, "must be >= 0")
        require(0 <= self.rand_augment_magnitude <= 10, "aug.rand_augment_magnitude", self.rand_augment_magnitude,
                 "must be in [0, 10]")  # fmt: skip
        for name in ("random_erasing", "mix_prob", "switch_prob"):
            value = getattr(self, name)
            require(0 <= value <= 1, f"aug.{name}", value, "must be in [0, 1]")
        require(self.mixup >= 0, "aug.mixup", self.mixup, "must be >= 0 (0 = off)")
        require(self.cutmix >= 0, "aug.cutmix", self.cutmix, "must be >= 0 (0 = off)")
        require(0 <= self.label_smoothing < 1, "aug.label_smoothing", self.label_smoothing, "must be in [0, 1)")


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """AdamW with layer-wise lr decay, linear warm-up then cosine per step."""

    lr: float = 2e-4
    """Base learning rate per 256 clips; the peak is lr * train.global_batch_size * data.repeated_aug / 256."""
    min_lr: float = 1e-6
    """Final cosine learning rate per 256 clips, scaled like lr; in [0, lr]."""
    warmup_lr: float = 1e-6
    """Learning rate per 256 clips at the start of the warm-up, scaled like lr; in [0, lr]."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2), each in [0, 1); on the command line: 0.9,0.999."""
    epochs: int = 30
    """Length of the schedule in epochs (passes over data.train_list); >= 1."""
    warmup_epochs: int = 5
    """Epochs of linear warm-up; in [0, epochs]."""
    layer_decay: float = 0.75
    """Layer-wise lr decay: block i trains at lr * decay^(depth - i), the patch embedding at
    decay^(depth + 1), the head at lr (B 0.75, L 0.85); in (0, 1], 1 = off.
    """

    def validate(self) -> None:
        super().validate()
        require(0 < self.layer_decay <= 1, "optim.layer_decay", self.layer_decay, "must be in (0, 1]")


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """The training loop (the shared train section; a batch counts videos)."""

    global_batch_size: int = 256
    """Videos per optimizer step over all ranks (each gives data.repeated_aug clips); must divide by the
    number of ranks; >= 1. Also spelled --train.batch_size, its older name.
    """
    seed: int = 0
    """Random seed (head init, data order, augmentation, drop path); in [0, 2**32)."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16: bf16 autocast on the GPU (fp32 weights); fp32: none. The CPU always runs fp32."""
    activation_checkpointing: str = "off"
    """Recompute block activations in the backward (torch.utils.checkpoint per block): off, all,
    or N (the first N blocks).
    """

    @property
    def batch_size(self) -> int:
        """The older name of global_batch_size."""
        return self.global_batch_size

    def validate(self) -> None:
        super().validate()
        refuse_unsupported(self, "fine-tuning", precisions=FINETUNE_PRECISIONS, micro_batches=False,
                           cuda_graphs=False)  # fmt: skip


@dataclass
class EvalConfig(Section):
    """Multi-view evaluation on data.val_list: num_clips temporal clips x num_crops spatial crops
    per video (short side resized to data.img_size, crops along the long side), softmax averaged."""

    SECTION = "eval"

    every_steps: int = 0
    """Evaluate every this many optimizer steps (0 = only at the end of the run)."""
    num_clips: int = 4
    """Temporal clips per video (K400 4, SSv2 2); >= 1."""
    num_crops: Literal[1, 3] = 3
    """Spatial crops per clip: 3 (start, centre, end of the long side) or 1 (centre)."""
    batch_size: int = 16
    """Views per forward pass; >= 1."""

    def validate(self) -> None:
        super().validate()
        require(self.every_steps >= 0, "eval.every_steps", self.every_steps, "must be >= 0 (0 = at the end)")
        require(self.num_clips >= 1, "eval.num_clips", self.num_clips, "must be >= 1")
        require(self.batch_size >= 1, "eval.batch_size", self.batch_size, "must be >= 1")


@dataclass
class FinetuneConfig(RunConfig):
    """Everything a fine-tuning run needs (its run directory also gets eval.json)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: LabelledDataConfig = field(default_factory=LabelledDataConfig)
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)


def clips_per_step(cfg: FinetuneConfig) -> int:
    """train.global_batch_size videos x data.repeated_aug clips each."""
    return cfg.train.global_batch_size * cfg.data.repeated_aug


def scaled_lrs(cfg: FinetuneConfig) -> tuple[float, float, float]:
    """(peak, final, warm-up start) learning rates: the per-256-clip values x clips per step / 256."""
    scale = clips_per_step(cfg) / 256
    return cfg.optim.lr * scale, cfg.optim.min_lr * scale, cfg.optim.warmup_lr * scale


def _check(cfg: FinetuneConfig) -> None:
    """Fine-tuning's cross-field rules and required values (after every section's own checks)."""
    require(cfg.data.img_size % cfg.model.patch_size == 0, "data.img_size", cfg.data.img_size,
             f"must be a multiple of model.patch_size={cfg.model.patch_size}")  # fmt: skip
    if cfg.data.train_list == "" and not cfg.data.mix:
        raise ValueError(
            "data.train_list is not set: pass --data.train_list FILE ('path,label' lines) "
            f"or --data.train_list {SAMPLE_CLIPS} for the bundled clips"
        )


def check_paths(cfg: FinetuneConfig) -> None:
    """FileNotFoundError for a list, root, class-name, init, label-map or resume path that does not exist."""
    check_path_fields(cfg, {
        "data.train_list": (os.path.isfile, (SAMPLE_CLIPS,)), "data.val_list": (os.path.isfile, (SAMPLE_CLIPS,)),
        "data.class_names": (os.path.isfile, ()), "data.root": (os.path.isdir, ()),
        "model.init": (os.path.exists, ()), "model.head_label_map": (os.path.isfile, ()),
    })  # fmt: skip
    check_mix_paths(cfg.data.mix, SAMPLE_CLIPS)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def _demo() -> FinetuneConfig:
    """Tiny model on the bundled sample clips (label = which clip); ~1 minute on a 2-core CPU."""
    cfg = FinetuneConfig(preset="demo")
    cfg.model = ModelConfig(size="tiny", patch_size=16, num_classes=0, init="", drop_path=0.0)
    cfg.data = LabelledDataConfig(train_list=SAMPLE_CLIPS, val_list=SAMPLE_CLIPS, num_frames=4, img_size=112,
                                  repeated_aug=2, num_workers=0)  # fmt: skip
    # Light augmentation: four clips, two of them the same scene at different quality, leave
    # little to learn from if the clips are mixed and erased as hard as in the recipes.
    cfg.aug = AugmentConfig(min_scale=0.25, rand_augment_ops=2, rand_augment_magnitude=5, random_erasing=0.25,
                            mixup=0.0, cutmix=0.0, label_smoothing=0.1)  # fmt: skip
    # 4 videos x 2 clips = 8 clips per step: lr 0.032 per 256 -> 1e-3 peak; one step per epoch.
    cfg.optim = FinetuneOptimConfig(lr=0.032, min_lr=3.2e-4, warmup_lr=0.0, epochs=30, warmup_epochs=3,
                                    layer_decay=0.9)  # fmt: skip
    cfg.train = FinetuneTrainConfig(global_batch_size=4, max_steps=0, seed=0)
    cfg.eval = EvalConfig(every_steps=10, num_clips=2, num_crops=3, batch_size=12)
    cfg.checkpoint = CheckpointConfig(every_steps=10, keep_last=2)
    cfg.log = LogConfig(every_steps=2)
    return cfg


def _recipe(size: str, dataset: str) -> FinetuneConfig:
    """The reference's published recipe (its exp/finetuning scripts; UMT_SPEC.md section 3)."""
    base = size == "base"
    cfg = FinetuneConfig(preset=f"umt_{'b' if base else 'l'}16_{dataset}")
    num_classes = {"k400": 400, "ssv2": 174}[dataset]
    cfg.model = ModelConfig(size=size, num_classes=num_classes, drop_path=0.1 if base else 0.2)
    cfg.data = LabelledDataConfig(num_frames=8, img_size=224, repeated_aug=2)
    cfg.aug = AugmentConfig(flip=dataset != "ssv2")
    layer_decay = 0.75 if base else 0.85
    if dataset == "k400":  # from the K710-fine-tuned model
        lr, epochs, warmup = (2e-5 if base else 1e-5), 5, 1
    elif base:  # SSv2 B: from the stage-1 model
        lr, epochs, warmup = 2e-4, 30, 5
    else:  # SSv2 L: from the K710-fine-tuned model
        lr, epochs, warmup = 4e-4, 14, 4
    cfg.optim = FinetuneOptimConfig(lr=lr, min_lr=1e-6, warmup_lr=1e-6, weight_decay=0.05, betas=(0.9, 0.999),
                                    eps=1e-8, epochs=epochs, warmup_epochs=warmup, layer_decay=layer_decay)  # fmt: skip
    cfg.train = FinetuneTrainConfig(global_batch_size=256, activation_checkpointing="off" if base else "12")
    cfg.eval = EvalConfig(every_steps=0, num_clips=4 if dataset == "k400" else 2, num_crops=3)
    return cfg


def _probe_demo() -> FinetuneConfig:
    """Attentive probe of a frozen tiny model (random, or --init) on the bundled sample clips, label =
    which clip; ~1 minute on a 2-core CPU."""
    cfg = _demo()
    cfg.preset = "probe_demo"
    cfg.model.probe = "attentive"
    # Only the head trains: 8 clips per step, lr 0.064 per 256 -> 2e-3 peak (a few times 1e-2 makes the
    # pooler's loss climb).
    cfg.optim = FinetuneOptimConfig(lr=0.064, min_lr=6.4e-4, warmup_lr=0.0, weight_decay=0.01, epochs=30,
                                    warmup_epochs=3, layer_decay=1.0)  # fmt: skip
    return cfg


def _probe_recipe(size: str) -> FinetuneConfig:
    """Attentive probe of a frozen stage-1 / stage-2 encoder on Kinetics-400, with the numbers of
    V-JEPA's frozen evaluation (facebookresearch/jepa, configs/evals/vitl16_k400_16x8x3.yaml and
    evals/video_classification_frozen/eval.py; V-JEPA 2's configs/eval/vitl/k400.yaml keeps the epochs,
    batch and weight decay): 20 epochs, batch 256 (4 per GPU x 64), AdamW lr 1e-3 from the first step
    (no warm-up) with a cosine to 0, weight decay 0.01 (V-JEPA's falls by a cosine to ~0; here it stays),
    a depth-1 pooler with one query and the encoder's heads, plain cross-entropy (no label smoothing,
    no mixup), RandomResizedCrop 0.08-1, RandAugment and random erasing 0.25, no flip, 8 temporal x 3
    spatial views. UMT's input (8 frames at 224 px) replaces V-JEPA's 16; V-JEPA's gradient clipping at
    1.0 has no counterpart here.
    """
    base = size == "base"
    cfg = FinetuneConfig(preset=f"probe_{'b' if base else 'l'}16_k400")
    cfg.model = ModelConfig(size=size, num_classes=400, drop_path=0.0, probe="attentive", probe_queries=1, probe_heads=0)
    cfg.data = LabelledDataConfig(num_frames=8, img_size=224, repeated_aug=1)
    cfg.aug = AugmentConfig(min_scale=0.08, flip=False, rand_augment_ops=4, rand_augment_magnitude=7, random_erasing=0.25,
                            mixup=0.0, cutmix=0.0, label_smoothing=0.0)  # fmt: skip
    cfg.optim = FinetuneOptimConfig(lr=1e-3, min_lr=0.0, warmup_lr=0.0, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8,
                                    epochs=20, warmup_epochs=0, layer_decay=1.0)  # fmt: skip
    cfg.train = FinetuneTrainConfig(global_batch_size=256)
    cfg.eval = EvalConfig(every_steps=0, num_clips=8, num_crops=3)
    return cfg


PRESETS: dict[str, Callable[[], FinetuneConfig]] = {
    "demo": _demo,
    "umt_b16_k400": lambda: _recipe("base", "k400"),
    "umt_l16_k400": lambda: _recipe("large", "k400"),
    "umt_b16_ssv2": lambda: _recipe("base", "ssv2"),
    "umt_l16_ssv2": lambda: _recipe("large", "ssv2"),
    "probe_demo": _probe_demo,
    "probe_b16_k400": lambda: _probe_recipe("base"),
    "probe_l16_k400": lambda: _probe_recipe("large"),
}
PRESET_HELP = {
    "demo": _demo.__doc__,
    "umt_b16_k400": "UMT-B/16 on Kinetics-400 (init: the K710-fine-tuned B model), 8x224, 4x3 views",
    "umt_l16_k400": "UMT-L/16 on Kinetics-400 (init: the K710-fine-tuned L model), 8x224, 4x3 views",
    "umt_b16_ssv2": "UMT-B/16 on Something-Something v2 (init: the stage-1 B model), no flip, 2x3 views",
    "umt_l16_ssv2": "UMT-L/16 on Something-Something v2 (init: the K710-fine-tuned L model), no flip, 2x3 views",
    "probe_demo": _probe_demo.__doc__,
    "probe_b16_k400": "attentive probe of a frozen UMT-B/16 (init: the stage-1 or stage-2 B model) on Kinetics-400, "
                      "V-JEPA's recipe: 20 epochs, lr 1e-3, wd 0.01, batch 256; 8x224, 8x3 views",
    "probe_l16_k400": "the same for a frozen UMT-L/16",
}


# --------------------------------------------------------------------------------------------
# Command line and files (the shared machinery of umt_fast.config.cli)
# --------------------------------------------------------------------------------------------

def _drop_the_presets_val_list(cfg: FinetuneConfig, preset: FinetuneConfig) -> None:
    """A training list of the user's own is not evaluated on the preset's validation list."""
    if cfg.data.train_list != preset.data.train_list and cfg.data.val_list == preset.data.val_list:
        cfg.data.val_list = ""


SCHEMA = ConfigSchema(
    root=FinetuneConfig,
    presets=PRESETS,
    validate=_check,
    description="Fine-tune a UMT video ViT for action recognition (mean pool, fc_norm, linear head).",
    prog="python -m umt_fast.finetune",
    preset_help=PRESET_HELP,
    shorthands=(("--init", "model.init"),),
    aliases={"train.batch_size": "train.global_batch_size"},
    resolve=_drop_the_presets_val_list,
)
SECTIONS = SCHEMA.sections
FinetuneLogConfig = LogConfig


def _as_probe(preset: Callable[[], FinetuneConfig]) -> Callable[[], FinetuneConfig]:
    """A preset with model.probe attentive where it has none (the probe command's default)."""

    def probe_preset() -> FinetuneConfig:
        cfg = preset()
        if cfg.model.probe == "none":
            cfg.model.probe, cfg.model.drop_path = "attentive", 0.0
        return cfg

    probe_preset.__doc__ = preset.__doc__
    return probe_preset


PROBE_SCHEMA = dataclasses.replace(
    SCHEMA,
    presets={name: _as_probe(fn) for name, fn in PRESETS.items()},
    description="Train a probe (attentive by default, or --model.probe linear) on a frozen UMT video encoder, "
    "and evaluate it with the fine-tuning recipe's multi-view evaluation.",
    prog="python -m umt_fast.probe",
    default_preset="probe_demo",
)
"""``python -m umt_fast.probe``: the fine-tuning command's options and presets, with model.probe
attentive by default (every preset without a probe gets the attentive one) and ``probe_demo`` as
the default preset."""


def build_probe_config(argv: list[str] | None = None, base: dict | None = None) -> FinetuneConfig:
    """argv -> a validated FinetuneConfig for the probe command (`PROBE_SCHEMA`)."""
    return PROBE_SCHEMA.build(argv, None, base)


def probe_help_text() -> str:
    """What ``python -m umt_fast.probe --help`` prints."""
    return PROBE_SCHEMA.help_text()


def validate(cfg: FinetuneConfig) -> None:
    """Every check; ValueError naming the first bad field, its value and what is allowed."""
    SCHEMA.check(cfg)


def get_preset(name: str) -> FinetuneConfig:
    return SCHEMA.get_preset(name)


def all_field_names() -> list[str]:
    return SCHEMA.all_field_names()


def apply_dict(cfg: FinetuneConfig, d: Any, where: str = "") -> None:
    """Apply a nested dict (the config.yaml layout) onto cfg, converting every value."""
    SCHEMA.apply_dict(cfg, d, where)


def config_from_dict(d: dict[str, Any], check: bool = True) -> FinetuneConfig:
    return SCHEMA.from_dict(d, check)


def help_text() -> str:
    """What ``python -m umt_fast.finetune --help`` prints."""
    return SCHEMA.help_text()


def build_config(argv: list[str] | None = None, prog: str = "python -m umt_fast.finetune", base: dict | None = None) -> FinetuneConfig:
    """argv -> a validated FinetuneConfig: preset < --config FILE < --section.field options."""
    return SCHEMA.build(argv, prog, base)


__all__ = [
    "AugmentConfig", "EvalConfig", "FinetuneConfig", "FinetuneLogConfig", "FinetuneOptimConfig",
    "FinetuneTrainConfig", "LabelledDataConfig", "ModelConfig", "PRESETS", "PROBE_SCHEMA", "SECTIONS", "build_config",
    "build_probe_config", "check_paths", "clips_per_step", "config_from_dict", "config_to_dict", "get_preset",
    "help_text", "probe_help_text", "save_config", "scaled_lrs", "validate",
]  # fmt: skip
