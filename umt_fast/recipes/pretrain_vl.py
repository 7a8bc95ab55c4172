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
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from umt_fast.engine import checkpoint as ckpt
from umt_fast.config.vl import DEMO_DATA, VLPretrainConfig, config_to_dict
from umt_fast.data.transforms import normalize_video
from umt_fast.engine.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, unwrap, wrap_model
from umt_fast.engine.launch import open_run_dir
from umt_fast.masking import mask_and_targets
from umt_fast.interop import build_teacher
from umt_fast.models import build_student
from umt_fast.models.attention import set_attention_backend
from umt_fast.models.student import drop_path_scales, keep_probabilities
from umt_fast.engine.metrics import ProgressLine, build_metrics_sinks, check_sink_packages
from umt_fast.engine.trainer import check_finite_loss, seed_everything
from umt_fast.engine.optim import WarmupCosineSchedule, build_optimizer
from umt_fast.engine.stopping import StopOnSignal, stop_run
from umt_fast.data import captions as vl_data
from umt_fast.losses.vl import hard_negative_noise, mask_tokens, mlm_noise
from umt_fast.models.vl import (
    HEAD_NORM_EPS,
    VisionLanguageModel,
    VLBatch,
    from_reference_state_dict,
    is_stage2_state_dict,
    state_dict_to_reference,
)
from umt_fast.models.text import build_text_encoder, load_tokenizer, tokenize_captions
from umt_kernels.rng import mix_seed

log = logging.getLogger(__name__)

LOSS_NAMES = ("loss", "uta", "vtc", "vtm", "mlm")
EXPORT_NAME = "umt_stage2.pth"


@dataclass
class TrainResult:
    run_dir: str
    last_checkpoint: str | None
    steps_done: int
    last_loss: float | None
    export_path: str | None


# ----------------------------------------------------------------------------------- building


def build_model(cfg: VLPretrainConfig, teacher_dim: int, load_text: bool = True) -> VisionLanguageModel:
    """The stage-2 model of `cfg`: a fresh student of student.size, the text tower of text.weights."""
    student = build_student(cfg, teacher_dim, head_norm_eps=HEAD_NORM_EPS)
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

    if os.path.isdir(path):
        return ckpt.load_checkpoint(path)["student"]
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
        total = losses["uta"] + losses["vtc"] + losses["vtm"] + losses["mlm"]
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


def train(cfg: VLPretrainConfig) -> TrainResult:
    """Runs (or resumes) stage-2 pre-training as `cfg` says."""
    info = init_distributed(cfg.train.device)
    plan = plan_batches(cfg, info.world_size)
    if info.is_main:
        check_sink_packages(cfg.log.tensorboard, cfg.log.wandb)  # refuse before touching anything
    resume_path, logger = open_run_dir(cfg, info)
    device = info.device
    seed_everything(cfg.train.seed)
    set_attention_backend(cfg.train.attention)

    datasets = caption_datasets(cfg, info)
    B, G = plan.per_rank, plan.global_batch
    counts = [vl_data.MediaBatchSampler(len(d), B, info.rank, info.world_size).batches_per_epoch for d in datasets]
    steps_per_epoch = sum(counts)
    total_steps = cfg.optim.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps
    schedule = WarmupCosineSchedule(cfg.optim.lr, cfg.optim.min_lr, total_steps,
                                    cfg.optim.warmup_epochs * steps_per_epoch, cfg.optim.warmup_lr)  # fmt: skip

    low_precision = torch.bfloat16 if device.type == "cuda" and cfg.train.precision == "bf16" else None
    teacher = build_teacher(cfg).to(device)
    if low_precision is not None:
        teacher = teacher.to(low_precision)
    model = build_model(cfg, teacher.arch.output_dim)
    if cfg.model.init and resume_path is None:
        what = initialise(model, cfg.model.init)
        log.info("initialised the %s from %s", what, cfg.model.init)
    elif not cfg.model.init:
        log.warning("model.init is empty: the vision tower starts from random weights (demos and tests only)")
    model = model.to(device)
    text_arch = model.text_encoder.arch
    tokenizer = load_tokenizer(cfg.text.weights)
    if cfg.train.compile == "blocks":  # in place, names unchanged, before FSDP2 wraps the same blocks
        for block in [*teacher.transformer.resblocks, *shardable_blocks(model)]:
            block.compile(backend=cfg.train.compile_backend)
    wrapped = wrap_model(model, shardable_blocks(model), cfg.dist.strategy, info, low_precision)
    optimizer = build_optimizer(wrapped, schedule(0), cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps)

    start_step = 0
    if resume_path is not None:
        meta = ckpt.restore_checkpoint(resume_path, wrapped, optimizer)
        start_step = meta["step"]
        log.info("resumed from %s at step %d", resume_path, start_step)

    metrics = None
    if info.is_main:
        rng = ckpt.rng_state()
        metrics = build_metrics_sinks(cfg.run_dir, tensorboard=cfg.log.tensorboard, wandb_project=cfg.log.wandb,
                                      wandb_mode=cfg.log.wandb_mode, config=config_to_dict(cfg),
                                      resume_step=start_step if resume_path is not None else None)  # fmt: skip
        ckpt.restore_rng_state(rng)
    log.info(
        "preset %s | student %s + text %d layers (%d fusion, width %d), %.1fM params | %s | global batch %d = %d "
        "ranks x %d, hard negatives in groups of %d | %d steps (%d per epoch) | %s, %s, compile %s",
        cfg.preset, cfg.student.size, text_arch.num_layers, text_arch.fusion_layers, text_arch.hidden,
        sum(p.numel() for p in model.parameters()) / 1e6,
        ", ".join(f"{len(d)} {d.media} captions" for d in datasets), G, info.world_size, B, plan.vtm_group,
        last_step, steps_per_epoch, device, cfg.train.precision if device.type == "cuda" else "fp32",
        cfg.train.compile,
    )  # fmt: skip

    stream = vl_data.InterleavedStream(datasets, B, cfg.train.seed, start_step, rank=info.rank,
                                       world_size=info.world_size, num_workers=cfg.data.num_workers,
                                       pin_memory=device.type == "cuda",
                                       collate_fn=vl_data.CaptionCollate(tokenizer, cfg.text.max_len))  # fmt: skip
    step_fn = VLStep(wrapped, teacher, optimizer, tokenizer, cfg, device, low_precision, rank=info.rank,
                     world_size=info.world_size)  # fmt: skip
    progress = ProgressLine(last_step, logger) if info.is_main else None
    last_checkpoint, last_loss, export_path = resume_path, None, None
    loss_sum = torch.zeros(len(LOSS_NAMES), device=device)
    window_steps, media_counts = 0, {"video": 0, "image": 0}
    window_start = time.perf_counter()
    wrapped.train()
    stop = StopOnSignal(info.distributed).install()
    try:
        for step in range(start_step, last_step):
            media, batch = next(stream)
            lr = schedule.set_lr(optimizer, step)
            loss_sum += step_fn(media, batch, step)
            media_counts[media] += 1
            window_steps += 1
            done = step + 1
            is_last = done == last_step
            save_now = done % cfg.checkpoint.every_steps == 0 or is_last
            stopping = False
            if done % cfg.log.every_steps == 0 or save_now or stop.check_every_step:
                flag = torch.full((1,), stop.flag, device=device)
                totals = all_reduce_sum(torch.cat([loss_sum, flag])).tolist()  # the one host sync per window
                values = [v / (window_steps * info.world_size) for v in totals[:-1]]
                stopping = totals[-1] > 0
                save_now = save_now or stopping
                last_loss = values[0]
                check_finite_loss(last_loss, done - window_steps + 1, done, last_checkpoint)
                elapsed = time.perf_counter() - window_start
                pairs_per_s = window_steps * G / elapsed
                if info.is_main:
                    record = {"step": done, **dict(zip(LOSS_NAMES, values)), "lr": lr, "pairs/s": pairs_per_s,
                              "temp": float(unwrap(wrapped).temp.detach().clamp(0.001, 0.5)) if not info.distributed
                              or cfg.dist.strategy == "ddp" else None,
                              "video_steps": media_counts["video"], "image_steps": media_counts["image"],
                              "epoch": step // steps_per_epoch, "time": time.time()}  # fmt: skip
                    metrics.write({k: v for k, v in record.items() if v is not None})
                    progress.update(done, last_loss, lr, pairs_per_s)
                loss_sum.zero_()
                window_steps, media_counts = 0, {"video": 0, "image": 0}
                window_start = time.perf_counter()
            if save_now:
                meta = {"data_position": done, "config": config_to_dict(cfg), "world_size": info.world_size}
                last_checkpoint = ckpt.save_checkpoint(cfg.run_dir, done, wrapped, optimizer, meta,
                                                       keep_last=cfg.checkpoint.keep_last, info=info)  # fmt: skip
                log.info("saved checkpoint %s", last_checkpoint)
            if stopping and not is_last:
                raise stop_run(stop, done, last_checkpoint, metrics)
        export_path = export_reference(wrapped, text_arch, os.path.join(cfg.run_dir, EXPORT_NAME), info)
        if export_path:
            log.info("wrote %s (the reference's stage-2 naming)", export_path)
    finally:
        stop.restore()
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
        del stream
    return TrainResult(cfg.run_dir, last_checkpoint, last_step, last_loss, export_path)
