"""The stage-2 training loop: build, initialise from stage 1, resume, step, log, checkpoint, export.

One step, as data (every step is all-video or all-image):

    uint8 media [B, T, H, W, 3] (T = num_frames for videos, 1 for images) -> normalise on the device
    teacher (frozen)  -> CLS attention -> visible tokens (ratio 0.8 video / 0.5 image) + UTA targets
    captions -> WordPiece ids [B, S]; a BERT-masked copy for MLM
    model(batch): ONE masked student forward -> UTA + VTC + VTM + MLM (weight 1 each) -> backward
    -> AdamW step

Same engine as stage 1: bf16 autocast on the GPU, the kernels, DDP or FSDP2 under torchrun, the
run directory, DCP checkpoints that resume at the exact data position, the progress line. At the
end the model is also written in the reference's stage-2 naming to <run_dir>/umt_stage2.pth.

World-size invariance, as stage 1: step s reads global batch s of its media type (rank r holds
pairs [r*b, (r+1)*b) of it), and the augmentation, the masks, the drop path, the MLM masking and
the hard negatives are functions of (seed, s, the pair's index in the global batch); the VTM and
MLM means are over the global batch. So a step gives the same losses and update on any number of
ranks at the same train.global_batch_size, except for the text tower's dropout (`text.dropout`),
which draws from torch's generator, seeded per (seed, step, rank).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from umt_fast.config.vl import DEMO_DATA, VLPretrainConfig
from umt_fast.data import captions as vl_data
from umt_fast.data.transforms import normalize_video
from umt_fast.engine import checkpoint as ckpt
from umt_fast.engine.distributed import DistInfo, barrier, unwrap, wrap_model
from umt_fast.engine.flops import pretrain_flops_per_clip, text_flops_per_pair
from umt_fast.engine.optim import WarmupCosineSchedule, build_optimizer
from umt_fast.engine.trainer import Recipe, Setup, TrainResult, run
from umt_fast.interop import build_teacher
from umt_fast.models.fp8 import teachers_at_precision
from umt_fast.losses.vl import hard_negative_noise, mask_tokens, mlm_noise
from umt_fast.masking import mask_and_targets, visible_tokens_per_clip
from umt_fast.models import build_student
from umt_fast.models.student import drop_path_scales, keep_probabilities
from umt_fast.models.text import build_text_encoder, load_tokenizer, tokenize_captions
from umt_fast.models.vl import (
    HEAD_NORM_EPS,
    VisionLanguageModel,
    VLBatch,
    from_reference_state_dict,
    is_stage2_state_dict,
    state_dict_to_reference,
)
from umt_fast.recipes.pretrain import compile_blocks
from umt_kernels.rng import mix_seed

log = logging.getLogger(__name__)

LOSS_NAMES = ("loss", "uta", "vtc", "vtm", "mlm")
EXPORT_NAME = "umt_stage2.pth"


# ----------------------------------------------------------------------------------- building


def build_model(cfg: VLPretrainConfig, teacher_dim: int, load_text: bool = True) -> VisionLanguageModel:
    """The stage-2 model of `cfg`: a fresh student of student.size, the text tower of text.weights."""
    student = build_student(cfg, teacher_dim, head_norm_eps=HEAD_NORM_EPS)
    student.set_grad_checkpointing(num_blocks=cfg.train.checkpointed_blocks(student.arch.depth))
    dropout = cfg.text.dropout if cfg.text.dropout >= 0 else None
    text = build_text_encoder(cfg.text.weights, cfg.text.fusion_layers, student.arch.width, load=load_text,
                              dropout=dropout)  # fmt: skip
    return VisionLanguageModel(student, text, cfg.model.embed_dim)


@dataclass(frozen=True)
class BatchPlan:
    """How every step's global batch is split over the ranks, and its hard-negative groups."""

    global_batch: int
    per_rank: int
    vtm_group: int


def vtm_group(group_size: int, global_batch: int) -> int:
    """The hard-negative group of `train.vtm_group_size` at this global batch (at most the batch)."""
    return min(group_size, global_batch)


def plan_batches(cfg: VLPretrainConfig, world_size: int) -> BatchPlan:
    """train.global_batch_size / train.batch_size / train.vtm_group_size at `world_size` ranks;
    ValueError naming the fields where they do not fit."""
    G, b = cfg.train.global_batch_size, cfg.train.batch_size
    if G and b and b * world_size != G:
        raise ValueError(f"train.batch_size={b} (per rank) x {world_size} ranks = {b * world_size} contradicts "
                         f"train.global_batch_size={G}; set one of them to 0 to derive it from the other")  # fmt: skip
    if G:
        if G % world_size:
            raise ValueError(f"train.global_batch_size={G} must be divisible by the number of ranks ({world_size})")
        b = G // world_size
    else:
        G = b * world_size
    group = vtm_group(cfg.train.vtm_group_size, G)
    if G % group:
        raise ValueError(f"train.vtm_group_size={group} must divide the global batch ({G} pairs)")
    if b % group:
        raise ValueError(
            f"train.vtm_group_size={group} must divide the per-rank batch ({G} pairs / {world_size} ranks = {b}): "
            "hard negatives are drawn within groups of consecutive pairs, and a group cannot be split over ranks. "
            f"Run on fewer ranks, or pass a train.vtm_group_size that divides {b} (the negatives then differ from "
            f"those of groups of {group})"
        )  # fmt: skip
    return BatchPlan(G, b, group)


def read_init_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A file (reference stage-1 / stage-2, or our export) or a run checkpoint directory."""
    from umt_fast.interop import read_state_dict

    if os.path.isdir(path):  # a run directory or one of its checkpoints
        state = ckpt.load_checkpoint(ckpt.resolve_checkpoint(path))
        stage = ckpt.run_stage(state.get("config") or {})
        if stage == "finetune":
            raise ValueError(f"model.init={path!r} is {ckpt.STAGE_NAMES[stage]}; stage 2 starts from a stage-1 run "
                             "or file (or a stage-2 one)")  # fmt: skip
        return state["student"]
    return read_state_dict(path, "init checkpoint")


def initialise(model: VisionLanguageModel, path: str) -> str:
    """Load `path` into `model`, strictly. Stage-2 weights (the reference's naming or a stage-2 run
    checkpoint) load everything; stage-1 weights (the reference's or a stage-1 run) load the student.
    Returns what was loaded."""
    from umt_fast.interop import load_state_dict_checked, strip_prefix, student_state_dict

    sd = read_init_state_dict(path)
    sd = strip_prefix({k.replace("_orig_mod.", ""): v for k, v in sd.items()}, "module.")
    if is_stage2_state_dict(sd):
        load_state_dict_checked(model, from_reference_state_dict(sd, model.text_encoder.arch), path)
        return "stage-2 model (reference naming)"
    if "student.encoder.patch_embed.proj.weight" in sd:
        load_state_dict_checked(model, sd, path)
        return "stage-2 model"
    student = student_state_dict(sd, "init checkpoint")  # any stage-1 naming -> encoder.*, clip_decoder.*
    if student.pop("encoder.pos_embed", None) is not None:
        log.info("model.init: ignoring the file's pos_embed (the fixed sin-cos table is rebuilt)")
    extra = [k for k in student if k.startswith("extra_decoders.")]
    if extra:
        log.info("model.init: ignoring the heads of the stage-1 run's further teachers (extra_decoders.*)")
        student = {k: v for k, v in student.items() if k not in extra}
    if "encoder.patch_embed.proj.weight" not in student:
        raise ValueError(f"model.init={path!r}: neither a UMT stage-1 nor a stage-2 checkpoint (first keys: {list(sd)[:4]})")
    load_state_dict_checked(model.student, student, path)
    return "stage-1 student (encoder + alignment heads)"


def shardable_blocks(model: VisionLanguageModel) -> list[nn.Module]:
    """What FSDP2 shards one by one: the student's blocks and every text layer."""
    text = model.text_encoder
    return list(model.student.encoder.blocks) + list(text.bert.encoder.layer) + list(text.fusion)


def caption_datasets(cfg: VLPretrainConfig, info: DistInfo) -> list[vl_data.CaptionDataset]:
    video_list, image_list = cfg.data.video_list, cfg.data.image_list
    if DEMO_DATA in (video_list, image_list):
        demo_dir = os.path.join(cfg.run_dir, "demo_data")
        if info.is_main:
            vl_data.write_demo_caption_lists(demo_dir)
        barrier()
        demo_video, demo_image = (os.path.join(demo_dir, n) for n in ("demo_videos.json", "demo_images.json"))
        video_list = demo_video if video_list == DEMO_DATA else video_list
        image_list = demo_image if image_list == DEMO_DATA else image_list
    out = []
    for media, path in (("video", video_list), ("image", image_list)):
        if not path:
            continue
        records = vl_data.caption_records(vl_data.read_caption_json(path, cfg.data.root), media)
        if not records:
            raise ValueError(f"data.{media}_list={path!r} holds no {media} entries")
        out.append(vl_data.CaptionDataset(records, media, cfg.data.num_frames, cfg.data.img_size,
                                          seed=cfg.train.seed, flip=cfg.data.flip))  # fmt: skip
    return out


# ----------------------------------------------------------------------------------- the step


class VLStep:
    """Callable ``(media, batch, step) -> [5] device tensor (total, uta, vtc, vtm, mlm)``; no host sync.
    The total weighs UTA (the teacher's term) by teacher.loss_weight.

    ``batch`` is this rank's share of the step's global batch of ``B * world_size`` pairs (rank r
    holds pairs [r*B, (r+1)*B)). The masks, drop path, MLM masking and hard-negative noise are
    counter-based functions of (seed, step, global pair index), the hard negatives are drawn
    within groups of `vtm_group` (train.vtm_group_size, at most the global batch) consecutive
    pairs, and the losses are this rank's shares of the global ones
    (`VisionLanguageModel.forward`): the same step at any world size. torch's
    generator, seeded from (seed, step, rank), serves the text tower's dropout alone.
    """

    def __init__(self, model, teacher, optimizer, tokenizer, cfg: VLPretrainConfig, device, autocast_dtype, rank=0,
                 world_size=1):  # fmt: skip
        self.model, self.teacher, self.optimizer, self.tokenizer = model, teacher, optimizer, tokenizer
        self.cfg, self.device, self.autocast_dtype = cfg, device, autocast_dtype
        self.rank, self.world_size = rank, world_size
        # MLM never picks [CLS] or [PAD], as the reference; any other id (e.g. [UNK]) may be picked.
        self.special_ids = torch.tensor([tokenizer.cls_token_id, tokenizer.pad_token_id], device=device)
        self.vocab_size = unwrap(model).text_encoder.arch.vocab_size

    @functools.cached_property
    def keep_prob(self) -> torch.Tensor | None:
        """[depth] keep probabilities of the student's blocks on the device (None: no drop path)."""
        return keep_probabilities(unwrap(self.model).student.encoder.drop_probs, self.device)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def make_batch(self, media: str, batch: dict, step: int) -> VLBatch:
        cfg = self.cfg
        seed = cfg.train.seed
        video = normalize_video(batch["media"].to(self.device, non_blocking=True))
        B, _, T = video.shape[:3]
        group = vtm_group(cfg.train.vtm_group_size, B * self.world_size)
        if B % group:
            raise ValueError(f"train.vtm_group_size={group} must divide the per-rank batch ({B})")
        ratio = cfg.mask.video_ratio if media == "video" else cfg.mask.image_ratio
        first_clip = self.rank * B
        with torch.no_grad(), self._autocast():
            teacher_out = self.teacher(video)
            idx, targets = mask_and_targets(teacher_out, cfg.mask.policy, ratio=ratio, seed=seed, offset=step,
                                            first_clip=first_clip)  # fmt: skip
        if "text_ids" not in batch:  # tokenized in the loader workers (CaptionCollate), else here
            text_ids, text_mask = tokenize_captions(self.tokenizer, batch["captions"], cfg.text.max_len)
            batch = {**batch, "text_ids": text_ids, "text_mask": text_mask}
        ids = batch["text_ids"].to(self.device, non_blocking=True)
        mask = batch["text_mask"].to(self.device, non_blocking=True)
        special = torch.isin(ids, self.special_ids) | (mask == 0)
        keyed = dict(seed=seed, offset=step, first_clip=first_clip, device=self.device)
        mlm_ids, mlm_labels = mask_tokens(ids, special, mask_token_id=self.tokenizer.mask_token_id,
                                          vocab_size=self.vocab_size, prob=cfg.text.mlm_prob,
                                          uniform_3BS=mlm_noise(B, ids.shape[1], **keyed))  # fmt: skip
        drop_scales = None
        if self.keep_prob is not None:
            drop_scales = drop_path_scales(self.keep_prob, B, seed=seed, offset=step, first_clip=first_clip)
        return VLBatch(video=video, visible_idx=idx, targets=targets, text_ids=ids, text_mask=mask,
                       mlm_ids=mlm_ids, mlm_labels=mlm_labels, ids=batch["ids"].to(self.device),
                       drop_scales=drop_scales, negative_noise=hard_negative_noise(B, group, **keyed))  # fmt: skip

    def __call__(self, media: str, batch: dict, step: int) -> torch.Tensor:
        torch.manual_seed(mix_seed(self.cfg.train.seed, step) + self.rank)  # the text tower's dropout
        self.optimizer.zero_grad(set_to_none=True)
        vl_batch = self.make_batch(media, batch, step)
        with self._autocast():
            losses = self.model(vl_batch)
        total = self.cfg.teacher.loss_weight * losses["uta"] + losses["vtc"] + losses["vtm"] + losses["mlm"]
        total.backward()
        self.optimizer.step()
        return torch.stack([total, losses["uta"], losses["vtc"], losses["vtm"], losses["mlm"]]).detach().float()


# ----------------------------------------------------------------------------------- the loop


def export_reference(model: nn.Module, text_arch, path: str, info: DistInfo) -> str | None:
    """Collective: the full model in the reference's stage-2 naming, written by rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not info.is_main:
        return None
    ckpt.atomic_torch_save({"model": state_dict_to_reference(sd, text_arch)}, path)
    return path


class VLPretrainRecipe(Recipe):
    """Stage 2: UTA + VTC + VTM + MLM on interleaved video and image caption batches."""

    unit = "pairs"
    loss_names = LOSS_NAMES

    def plan(self, info: DistInfo) -> None:
        self.info = info
        self.batch_plan = plan_batches(self.cfg, info.world_size)

    def build(self, info: DistInfo, resume_path: str | None) -> Setup:
        cfg, device = self.cfg, info.device
        self.datasets = caption_datasets(cfg, info)
        B, G = self.batch_plan.per_rank, self.batch_plan.global_batch
        counts = [vl_data.MediaBatchSampler(len(d), B, info.rank, info.world_size).batches_per_epoch for d in self.datasets]
        steps_per_epoch = sum(counts)
        total_steps = cfg.optim.epochs * steps_per_epoch
        schedule = WarmupCosineSchedule(cfg.optim.lr, cfg.optim.min_lr, total_steps,
                                        cfg.optim.warmup_epochs * steps_per_epoch, cfg.optim.warmup_lr)  # fmt: skip
        low_precision = torch.bfloat16 if device.type == "cuda" and cfg.train.precision == "bf16" else None
        teacher = build_teacher(cfg).to(device)
        if low_precision is not None:
            teacher = teacher.to(low_precision)
        teacher = teachers_at_precision([teacher], cfg.teacher.precision, device)[0]
        model = build_model(cfg, teacher.arch.output_dim)
        if cfg.model.init and resume_path is None:
            what = initialise(model, cfg.model.init)
            log.info("initialised the %s from %s", what, cfg.model.init)
        elif not cfg.model.init:
            log.warning("model.init is empty: the vision tower starts from random weights (demos and tests only)")
        model = model.to(device)
        self.text_arch = text_arch = model.text_encoder.arch
        self.tokenizer = load_tokenizer(cfg.text.weights)
        if cfg.train.compile != "none":  # in place, names unchanged, before FSDP2 wraps the same blocks
            compile_blocks([*teacher.compilable_blocks, *shardable_blocks(model)], model, "blocks",
                           cfg.train.compile_backend)  # fmt: skip
        self.model = wrapped = wrap_model(model, shardable_blocks(model), cfg.dist.strategy, info, low_precision)
        optimizer = build_optimizer(wrapped, schedule(0), cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps)
        self.step_fn = VLStep(wrapped, teacher, optimizer, self.tokenizer, cfg, device, low_precision, rank=info.rank,
                              world_size=info.world_size)  # fmt: skip
        self.media_counts = {"video": 0, "image": 0}
        student = model.student
        P = student.arch.patches_per_frame
        pair_flops = {}  # per media type: the vision side as in stage 1 (an image is one frame), + the text tower
        for media, T, ratio in (("video", student.arch.num_frames, cfg.mask.video_ratio), ("image", 1, cfg.mask.image_ratio)):
            visible = visible_tokens_per_clip(cfg.mask.policy, T, P, ratio)
            pair_flops[media] = (pretrain_flops_per_clip(teacher.arch, student.arch, teacher.arch.grid, visible, T)
                                 + text_flops_per_pair(text_arch, cfg.text.max_len))  # fmt: skip
        # the steps of an epoch are video or image steps: the mean over them
        flops = G * sum(n * pair_flops[d.media] for n, d in zip(counts, self.datasets)) / steps_per_epoch
        describe = (f"preset {cfg.preset} | student {cfg.student.size} + text {text_arch.num_layers} layers "
                    f"({text_arch.fusion_layers} fusion, width {text_arch.hidden}), "
                    f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params | "
                    + ", ".join(f"{len(d)} {d.media} captions" for d in self.datasets)
                    + f" | global batch {G} = {info.world_size} ranks x {B}, hard negatives in groups of "
                    f"{self.batch_plan.vtm_group}")  # fmt: skip
        return Setup(wrapped, optimizer, schedule, steps_per_epoch, total_steps, G, flops, describe)

    def batches(self, start_step: int):
        cfg, info = self.cfg, self.info
        return vl_data.InterleavedStream(self.datasets, self.batch_plan.per_rank, cfg.train.seed, start_step,
                                         rank=info.rank, world_size=info.world_size, num_workers=cfg.data.num_workers,
                                         pin_memory=info.device.type == "cuda",
                                         collate_fn=vl_data.CaptionCollate(self.tokenizer, cfg.text.max_len))  # fmt: skip

    def step(self, media_batch: tuple[str, dict], step: int) -> torch.Tensor:
        media, batch = media_batch
        self.media_counts[media] += 1
        return self.step_fn(media, batch, step)

    def data_position(self, steps_done: int) -> int:
        return steps_done  # the interleaved stream continues from the step number

    def window_metrics(self, sums: list[float], window_steps: int, world_size: int) -> dict[str, float]:
        record = super().window_metrics(sums, window_steps, world_size)
        if not self.info.distributed or self.cfg.dist.strategy == "ddp":  # an FSDP2 shard holds no whole temp
            record["temp"] = float(unwrap(self.model).temp.detach().clamp(0.001, 0.5))
        record.update(video_steps=self.media_counts["video"], image_steps=self.media_counts["image"])
        self.media_counts = {"video": 0, "image": 0}
        return record

    def finish(self, info: DistInfo) -> None:
        self.export_path = export_reference(self.model, self.text_arch, os.path.join(self.cfg.run_dir, EXPORT_NAME), info)
        if self.export_path:
            log.info("wrote %s (the reference's stage-2 naming)", self.export_path)

    def result(self, result: TrainResult) -> TrainResult:
        result.export_path = getattr(self, "export_path", None)
        return result


def train(cfg: VLPretrainConfig) -> TrainResult:
    """Runs (or resumes) stage-2 pre-training as `cfg` says."""
    return run(VLPretrainRecipe(cfg))
