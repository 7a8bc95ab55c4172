"""The config sections every training command shares: student, teacher, optim, train, dist,
checkpoint and log (a command may extend one with fields of its own, or change its defaults).
Each field carries its docstring (the --help text) and each section checks itself."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import math
import os

from umt_fast.config.cli import Bool, Pair, Section, fail, parse_entry, require, require_choice, require_paths

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
TIMM_PREFIX = "timm:"
"""`teacher.arch` prefix naming a timm model."""
RANDOM_TEACHER = "none"
"""`teacher.weights` value meaning: a randomly initialised teacher."""

StudentSize = Literal["tiny", "base", "large"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["bf16", "fp16", "fp32"]
AttentionBackend = Literal["auto", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "flash_attn_4", "math"]
"""umt_fast.models.attention.BACKENDS (kept here so the config loads without torch)."""
CompileMode = Literal["none", "blocks", "model"]
DistStrategy = Literal["ddp", "fsdp"]
WandbMode = Literal["", "online", "offline", "disabled"]
TeacherPrecision = Literal["auto", "fp8"]

DEVICES = get_args(Device)
PRECISIONS = get_args(Precision)
ATTENTION_BACKENDS = get_args(AttentionBackend)
COMPILE_MODES = get_args(CompileMode)
DIST_STRATEGIES = get_args(DistStrategy)
WANDB_MODES = get_args(WandbMode)
TEACHER_PRECISIONS = get_args(TeacherPrecision)
EXTRA_TEACHER_KEYS = ("arch", "weights", "input_resolution", "loss_weight", "return_layers")
"""The keys of one `teacher.extra` entry (``arch``, ``weights`` and ``input_resolution`` required)."""


@dataclass
class StudentConfig(Section):
    """The student: a sparse video ViT that sees only the visible tokens."""

    SECTION = "student"

    size: StudentSize = "base"
    """Student size: tiny (192 wide, 4 deep), base (ViT-B: 768, 12), large (ViT-L: 1024, 24)."""
    patch_size: int = 16
    """Spatial patch size in pixels (tubelet size is 1 frame: one token = one patch of one frame)."""
    drop_path: float = 0.1
    """Stochastic-depth rate of the last block (grows linearly from 0); in [0, 1). UMT-B 0.1, UMT-L 0.2."""
    return_layers: int = 6
    """K: how many of the student's last blocks are aligned with the teacher's last K blocks; 1..depth."""

    def validate(self) -> None:
        super().validate()
        require(self.patch_size >= 1, "student.patch_size", self.patch_size, "must be >= 1")
        require(0.0 <= self.drop_path < 1.0, "student.drop_path", self.drop_path, "must be in [0, 1)")
        depth = STUDENT_SIZES[self.size]["depth"]
        require(1 <= self.return_layers <= depth, "student.return_layers", self.return_layers,
                f"must be between 1 and the depth of a {self.size!r} student ({depth})")  # fmt: skip


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher of a run, resolved: the `teacher` section's (teacher 0) or an entry of
    ``teacher.extra`` (teachers 1, 2, ...). ``name`` is what errors call it."""

    arch: str
    weights: str
    input_resolution: int
    loss_weight: float
    return_layers: int
    name: str = "teacher"

    @property
    def is_timm(self) -> bool:
        return self.arch.startswith(TIMM_PREFIX)


def parse_extra_teacher(text: str, where: str) -> dict[str, str]:
    """'arch=NAME,weights=PATH,input_resolution=R[,loss_weight=W][,return_layers=K]' -> its
    key -> value strings; ValueError naming ``where`` for a malformed entry or an unknown key."""
    return parse_entry(text, where, EXTRA_TEACHER_KEYS, EXTRA_TEACHER_KEYS[:3],
                       "arch=timm:vit_small_patch14_dinov2,weights=dinov2_s.safetensors,input_resolution=196,"
                       "loss_weight=0.5")  # fmt: skip


@dataclass
class TeacherConfig(Section):
    """The teacher: a frozen image ViT (OpenAI CLIP by default), run on every frame; more teachers
    may be distilled at once (teacher.extra)."""

    SECTION = "teacher"

    arch: str = "vit_b16"
    """Teacher architecture: tiny (tests/demo), vit_b16 (CLIP ViT-B/16), vit_l14 (CLIP ViT-L/14), or
    timm:MODEL_NAME, a timm ViT (CLIP, SigLIP/SigLIP2, DINOv2 with or without registers, DINOv3,
    EVA02/EVA-CLIP, PE-core, InternViT) whose grid, layers and width come from the model itself.
    """
    weights: str = ""
    """Path to the teacher's weights (OpenAI CLIP visual state dict; for timm:NAME, timm's naming or an
    original release); 'none' = random init (demo/tests only); '' = not set (an error).
    """
    input_resolution: int = 224
    """Side in pixels of the frames the teacher sees (clips are resized to it); its grid must equal the
    student's.
    """
    loss_weight: float = 1.0
    """Weight of this teacher's alignment term; with several teachers the loss is the weighted sum."""
    extra: tuple[str, ...] = ()
    """More teachers, distilled at once (teachers 1, 2, ...): each
    'arch=NAME,weights=PATH,input_resolution=R[,loss_weight=W][,return_layers=K]' (W 1, K
    student.return_layers by default); the student gets K heads of its own per teacher. In a config
    file: a list of such strings or of mappings.
    """
    precision: TeacherPrecision = "auto"
    """auto: the teachers run in train.precision (bf16 on a GPU); fp8: their block linears run in FP8
    (e4m3, per-channel weight and per-row activation scales) on Hopper or Ada GPUs.
    """

    @property
    def is_timm(self) -> bool:
        return self.arch.startswith(TIMM_PREFIX)

    def validate(self) -> None:
        super().validate()
        require(self.loss_weight > 0, "teacher.loss_weight", self.loss_weight, "must be > 0")
        for spec in self.specs(return_layers=1):
            _check_teacher_arch(spec)

    def specs(self, return_layers: int) -> list[TeacherSpec]:
        """Every teacher of the run, this section's first; ``return_layers``: the student's K, the
        default of every teacher. ValueError naming the entry for a bad extra teacher."""
        specs = [TeacherSpec(self.arch, self.weights, self.input_resolution, self.loss_weight, return_layers)]
        for i, text in enumerate(self.extra):
            where = f"teacher.extra[{i}]"
            d = parse_extra_teacher(text, where)
            numbers = {}
            for key, kind in (("input_resolution", int), ("loss_weight", float), ("return_layers", int)):
                if key in d:
                    try:
                        numbers[key] = kind(d[key])
                    except ValueError:
                        fail(f"{where}.{key}", d[key], f"must be {'an int' if kind is int else 'a number'}")
            spec = TeacherSpec(d["arch"], d["weights"], numbers["input_resolution"], numbers.get("loss_weight", 1.0),
                               numbers.get("return_layers", return_layers), where)  # fmt: skip
            require(spec.loss_weight > 0, f"{where}.loss_weight", spec.loss_weight, "must be > 0")
            require(spec.return_layers >= 1, f"{where}.return_layers", spec.return_layers, "must be >= 1")
            specs.append(spec)
        return specs

    def grid(self) -> int:
        """Patches per side of one teacher frame."""
        return self.input_resolution // TEACHER_ARCHS[self.arch]["patch_size"]


def _check_teacher_arch(spec: TeacherSpec) -> None:
    """One teacher's own rules: a known arch (or timm:NAME) and a resolution its patch divides."""
    if spec.is_timm:  # its patch size is the model's: checked when it is built
        require(len(spec.arch) > len(TIMM_PREFIX), f"{spec.name}.arch", spec.arch, "needs a model name: timm:MODEL_NAME")
        require(spec.input_resolution > 0, f"{spec.name}.input_resolution", spec.input_resolution, "must be > 0")
        return
    require_choice(f"{spec.name}.arch", spec.arch, [*TEACHER_ARCHS, f"{TIMM_PREFIX}MODEL_NAME"])
    patch = TEACHER_ARCHS[spec.arch]["patch_size"]
    require(spec.input_resolution > 0 and spec.input_resolution % patch == 0, f"{spec.name}.input_resolution",
            spec.input_resolution, f"must be a positive multiple of the patch size of {spec.name}.arch={spec.arch!r} "
            f"({patch})")  # fmt: skip


@dataclass
class OptimConfig(Section):
    """AdamW and its learning-rate schedule (linear warm-up, then cosine per step)."""

    SECTION = "optim"

    lr: float = 1.5e-4
    """Base learning rate per 256 clips; the peak is lr * train.global_batch_size / 256 (1.2e-3 at batch
    2048).
    """
    min_lr: float = 1e-5
    """Final cosine learning rate per 256 clips, scaled like lr (8e-5 at batch 2048); in [0, lr]."""
    warmup_lr: float = 0.0
    """Learning rate per 256 clips at the start of the linear warm-up, scaled like lr; in [0, lr]."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to 1-D parameters and biases); >= 0."""
    betas: Pair = (0.9, 0.95)
    """AdamW (beta1, beta2), each in [0, 1); on the command line: 0.9,0.95."""
    eps: float = 1e-8
    """AdamW epsilon; > 0."""
    epochs: int = 200
    """Length of the schedule in epochs (passes over the training data); >= 1."""
    warmup_epochs: int = 40
    """Epochs of linear warm-up at the start of the schedule; in [0, epochs]."""

    def validate(self) -> None:
        super().validate()
        require(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        require(0 <= self.min_lr <= self.lr, "optim.min_lr", self.min_lr, f"must be in [0, optim.lr={self.lr}]")
        require(0 <= self.warmup_lr <= self.lr, "optim.warmup_lr", self.warmup_lr, f"must be in [0, optim.lr={self.lr}]")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        require(all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas, "each beta must be in [0, 1)")
        require(self.eps > 0, "optim.eps", self.eps, "must be > 0")
        require(self.epochs >= 1, "optim.epochs", self.epochs, "must be >= 1")
        require(0 <= self.warmup_epochs <= self.epochs, "optim.warmup_epochs", self.warmup_epochs,
                f"must be in [0, optim.epochs={self.epochs}]")  # fmt: skip


@dataclass
class TrainConfig(Section):
    """The training loop."""

    SECTION = "train"
    GLOBAL_BATCH_FROM_PER_RANK: ClassVar[bool] = False
    """True where a per-rank batch option exists: global_batch_size 0 then means per-rank x ranks."""

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
    device: Device = "auto"
    """auto (CUDA when available, else CPU), cpu, or cuda."""
    precision: Precision = "bf16"
    """On the GPU: bf16 (teacher weights in bf16, bf16 autocast for the student, fp32 master weights,
    no loss scaling), fp16 (the same in fp16, with dynamic loss scaling) or fp32. The CPU always
    runs fp32.
    """
    attention: AttentionBackend = "auto"
    """Attention kernel: auto (PyTorch SDPA picks: cuDNN on Hopper, flash on Ampere), sdpa_flash,
    sdpa_cudnn, sdpa_efficient, sdpa_math, flash_attn_4 (needs flash-attn-4), or math (explicit
    fp32 softmax, for checking).
    """
    compile: CompileMode = "none"
    """torch.compile the models: none, blocks (each transformer block on its own) or model (the whole
    forward).
    """
    compile_backend: str = "inductor"
    """torch.compile backend (inductor; aot_eager for a fast check on a CPU)."""
    activation_checkpointing: str = "off"
    """Recompute student block activations in the backward: off, all, or N (the first N blocks)."""
    cuda_graphs: Bool = False
    """Capture the whole optimizer step in one CUDA graph after a few eager warm-up steps and
    replay it (CUDA only; one process or DDP; not with fp16 or FSDP2).
    """

    def validate(self) -> None:
        super().validate()
        if not (self.GLOBAL_BATCH_FROM_PER_RANK and self.global_batch_size == 0):
            require(self.global_batch_size >= 1, "train.global_batch_size", self.global_batch_size, "must be >= 1")
        require(self.micro_batch_size >= 0, "train.micro_batch_size", self.micro_batch_size,
                "must be >= 0 (0 = per-rank batch)")  # fmt: skip
        require(self.max_steps >= 0, "train.max_steps", self.max_steps, "must be >= 0 (0 = full schedule)")
        require(0 <= self.seed < 2**32, "train.seed", self.seed, "must be in [0, 2**32)")
        require(bool(self.compile_backend), "train.compile_backend", self.compile_backend, "must not be empty")
        ac = self.activation_checkpointing
        require(ac in ("off", "all") or (ac.isdigit() and int(ac) >= 1), "train.activation_checkpointing", ac,
                "must be off, all, or a positive number of blocks")  # fmt: skip

    def checkpointed_blocks(self, depth: int) -> int:
        """How many of the first blocks to recompute in the backward."""
        ac = self.activation_checkpointing
        return 0 if ac == "off" else depth if ac == "all" else min(int(ac), depth)


@dataclass
class DistConfig(Section):
    """Multi-GPU / multi-node training under torchrun (ignored in a single process)."""

    SECTION = "dist"

    strategy: DistStrategy = "ddp"
    """ddp (replicated model, gradients all-reduced) or fsdp (FSDP2 fully_shard per block, bf16
    parameters in compute with fp32 reduction on the GPU).
    """


@dataclass
class CheckpointConfig(Section):
    """Checkpoints in <run_dir>/checkpoints/."""

    SECTION = "checkpoint"

    every_steps: int = 1000
    """Save a checkpoint every this many optimizer steps; >= 1."""
    keep_last: int = 3
    """Keep only the newest this many step checkpoints; >= 1."""

    def validate(self) -> None:
        super().validate()
        require(self.every_steps >= 1, "checkpoint.every_steps", self.every_steps, "must be >= 1")
        require(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "must be >= 1")


@dataclass
class LogConfig(Section):
    """Progress lines, <run_dir>/metrics.jsonl, TensorBoard and Weights & Biases."""

    SECTION = "log"

    every_steps: int = 50
    """Log (and read the loss back from the device) every this many optimizer steps; >= 1."""
    tensorboard: Bool = False
    """Also write the metrics (and figures) as TensorBoard events in <run_dir>/tensorboard/."""
    wandb: str = ""
    """Weights & Biases project to also log the metrics (and figures) to; '' = off."""
    wandb_mode: WandbMode = ""
    """W&B mode: online, offline or disabled; '' = the WANDB_MODE environment variable, else online."""

    def validate(self) -> None:
        super().validate()
        require(self.every_steps >= 1, "log.every_steps", self.every_steps, "must be >= 1")


def refuse_unsupported(train: TrainConfig, command: str, *, precisions=PRECISIONS, compile_modes=COMPILE_MODES,
                       micro_batches: bool = True, cuda_graphs: bool = True) -> None:  # fmt: skip
    """ValueError naming the shared train option a command's step cannot honour (and why)."""
    require_choice("train.precision", train.precision, precisions)
    require_choice("train.compile", train.compile, compile_modes)
    if not micro_batches:
        require(train.micro_batch_size == 0, "train.micro_batch_size", train.micro_batch_size,
                f"must be 0 for {command}: its losses need the whole per-rank batch in one forward")  # fmt: skip
    if not cuda_graphs:
        require(not train.cuda_graphs, "train.cuda_graphs", train.cuda_graphs,
                f"is not available for {command}: its step draws on the host")  # fmt: skip


MIX_KEYS = ("list", "weight", "root", "label_offset", "label_map")
"""The keys of one `data.mix` entry (``list`` and ``weight`` required)."""


def mix_sources(entries: tuple[str, ...], field: str = "data.mix") -> list[dict]:
    """A data.mix field's entries as {list, weight, root, label_offset, label_map}; ValueError
    naming the entry."""
    sources = []
    for i, text in enumerate(entries):
        where = f"{field}[{i}]"
        d = parse_entry(text, where, MIX_KEYS, ("list", "weight"), "list=k400.csv,weight=2,root=/data/k400")
        try:
            weight = float(d["weight"])
            offset = int(d.get("label_offset", 0))
        except ValueError:
            fail(where, text, "weight must be a number and label_offset an integer")
        require(weight > 0 and math.isfinite(weight), f"{where}.weight", weight, "must be a finite number > 0")
        require(not ("label_offset" in d and "label_map" in d), where, text,
                "takes label_offset or label_map (whose new labels may include any offset), not both")  # fmt: skip
        sources.append({"list": d["list"], "weight": weight, "root": d.get("root", ""), "label_offset": offset,
                        "label_map": d.get("label_map", "")})  # fmt: skip
    return sources


def check_mix_paths(entries: tuple[str, ...], builtin_list: str, field: str = "data.mix") -> None:
    """FileNotFoundError naming the entry's key for a local list, label map or root that does not
    exist (URLs and the built-in list name are not checked)."""
    for i, source in enumerate(mix_sources(entries, field)):
        require_paths([(f"{field}[{i}].{key}", source[key], exists) for key, exists in
                       (("list", os.path.isfile), ("label_map", os.path.isfile), ("root", os.path.isdir))
                       if source[key] and source[key] != builtin_list and "://" not in source[key]])  # fmt: skip
