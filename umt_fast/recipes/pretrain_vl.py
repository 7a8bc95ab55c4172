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

Retrieval fine-tuning (the ``ret_*`` presets) is the same loop with the terms of weight 0 left
out (UTA: teacher.loss_weight, then no teacher is built and the student sees every token; MLM:
text.mlm_weight), VTC and the hard negatives on per-frame embeddings (model.keep_temporal), and
the retrieval evaluation of data.test_list (`umt_fast.recipes.retrieval.evaluate`) at the end of
training and every eval.every_steps, into metrics.jsonl and <run_dir>/retrieval.json.

World-size invariance, as stage 1: step s reads global batch s of its media type (rank r holds
pairs [r*b, (r+1)*b) of it), and the augmentation, the masks, the drop path, the MLM masking and
the hard negatives are functions of (seed, s, the pair's index in the global batch); the VTM and
MLM means are over the global batch. So a step gives the same losses and update on any number of
ranks at the same train.global_batch_size, except for the text tower's dropout (`text.dropout`),
which draws from torch's generator, seeded per (seed, step, rank).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from umt_fast.config.vl import DEMO_DATA, VLPretrainConfig
from umt_fast.data import captions as vl_data
from umt_fast.data.transforms import normalize_video
from umt_fast.engine import checkpoint as ckpt
from umt_fast.engine.distributed import DistInfo, barrier, unwrap, wrap_model
from umt_fast.engine.flops import pretrain_flops_per_clip, text_flops_per_pair, transformer_forward_flops
from umt_fast.engine.optim import WarmupCosineSchedule, build_optimizer
from umt_fast.engine.trainer import Setup, TrainResult, run
from umt_fast.interop import build_teacher
from umt_fast.models.fp8 import teachers_at_precision
from umt_fast.losses import alignment_loss
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
from umt_fast.recipes.evaluation import BestEvaluation, EvaluatingRecipe, whole_model
from umt_fast.recipes.pretrain import compile_blocks
from umt_kernels.rng import mix_seed

log = logging.getLogger(__name__)

LOSS_NAMES = ("loss", "uta", "vtc", "vtm", "mlm")
EXPORT_NAME = "umt_stage2.pth"
BEST_EXPORT_NAME = "umt_stage2_best.pth"
"""eval.keep_best: the model of the best evaluation so far, in the reference's stage-2 naming."""
RETRIEVAL_REPORT = "retrieval.json"
"""The last retrieval evaluation of data.test_list, in the run directory."""


# ----------------------------------------------------------------------------------- building


class VLTrainingModel(VisionLanguageModel):
    """`VisionLanguageModel` training the run's choice of terms (same parameters, same state-dict
    keys). With all four terms on the pooled embedding (stage-2 pre-training) its forward computes
    what `VisionLanguageModel.forward` does. Otherwise a term switched off (``uta``: teacher.loss_weight 0,
    ``mlm``: text.mlm_weight 0) is not computed (0 in its place) and its head is frozen (no
    gradient: the alignment heads, or the MLM head's transform and bias, not the word embeddings
    its decoder shares), and with ``keep_temporal`` VTC and the hard negatives use one embedding
    per frame (`frame_features`), as the reference's retrieval fine-tuning does."""

    uta: bool = True
    mlm: bool = True
    keep_temporal: bool = False

    def select_terms(self, uta: bool, mlm: bool, keep_temporal: bool) -> None:
        self.uta, self.mlm, self.keep_temporal = uta, mlm, keep_temporal
        if not uta:
            self.student.clip_decoder.requires_grad_(False)
        if not mlm:
            head = self.text_encoder.cls.predictions
            head.transform.requires_grad_(False)
            head.bias.requires_grad_(False)

    def frame_features(self, tokens_BND: torch.Tensor, num_frames: int) -> torch.Tensor:
        """-> [B, T, E] unit vectors: per frame, the projection of pool_norm of the mean of its tokens
        (every frame holds N / T of the tokens, in frame order)."""
        B, N, D = tokens_BND.shape
        pooled_BTD = self.pool_norm(tokens_BND.view(B, num_frames, N // num_frames, D).mean(2))
        return F.normalize(self.vision_proj(pooled_BTD), dim=-1)

    def forward(self, batch: VLBatch) -> dict[str, torch.Tensor]:
        if self.uta:
            tokens, aligned, vision_feat = self.encode_vision(batch.video, batch.visible_idx, batch.drop_scales)
            uta = alignment_loss(aligned.float(), batch.targets.float())
        else:
            tokens = self.student.forward_features(batch.video, batch.visible_idx, batch.drop_scales)[-1]
            vision_feat, uta = None, tokens.new_zeros((), dtype=torch.float32)
        if self.keep_temporal:
            vision_feat = self.frame_features(tokens, batch.video.shape[2])
        elif vision_feat is None:
            vision_feat = F.normalize(self.vision_proj(self.pool_norm(tokens.mean(1))), dim=-1)
        return self.caption_losses(batch, tokens, vision_feat, uta, mlm=self.mlm)


def build_model(cfg: VLPretrainConfig, teacher_dim: int, load_text: bool = True) -> VLTrainingModel:
    """The stage-2 model of `cfg`: a fresh student of student.size, the text tower of text.weights,
    training the terms the config turns on (`VLTrainingModel`)."""
    student = build_student(cfg, teacher_dim, head_norm_eps=HEAD_NORM_EPS)
    student.set_grad_checkpointing(num_blocks=cfg.train.checkpointed_blocks(student.arch.depth))
    dropout = cfg.text.dropout if cfg.text.dropout >= 0 else None
    text = build_text_encoder(cfg.text.weights, cfg.text.fusion_layers, student.arch.width, load=load_text,
                              dropout=dropout)  # fmt: skip
    model = VLTrainingModel(student, text, cfg.model.embed_dim)
    model.select_terms(uta=cfg.teacher.uta, mlm=cfg.text.mlm_weight > 0, keep_temporal=cfg.model.keep_temporal)
    return model


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
        if stage in ("finetune", "qa"):
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


def caption_lists(cfg: VLPretrainConfig, info: DistInfo) -> dict[str, str]:
    """The paths of data.video_list, data.image_list and data.test_list ('' where unset), the
    demo's lists written into <run_dir>/demo_data where one is 'demo' (collective)."""
    lists = {"video": cfg.data.video_list, "image": cfg.data.image_list, "test": cfg.data.test_list}
    if DEMO_DATA in lists.values():
        demo_dir = os.path.join(cfg.run_dir, "demo_data")
        if info.is_main:
            vl_data.write_demo_caption_lists(demo_dir)
        barrier()
        demo = {"video": "demo_videos.json", "image": "demo_images.json", "test": "demo_videos.json"}
        lists = {k: os.path.join(demo_dir, demo[k]) if v == DEMO_DATA else v for k, v in lists.items()}
    return lists


def read_entries(cfg: VLPretrainConfig, path: str) -> list[dict]:
    """A caption list's entries (`read_caption_json`), each entry's captions joined into one
    paragraph with data.paragraph."""
    entries = vl_data.read_caption_json(path, cfg.data.root)
    return vl_data.join_paragraphs(entries) if cfg.data.paragraph else entries


def ids_by_file_name(records: list[vl_data.CaptionRecord]) -> list[vl_data.CaptionRecord]:
    """data.video_ids=file_name: the records' media ids renumbered so that records whose media
    has the same file name share one (the reference's retrieval fine-tuning keys its match ids by
    ``basename(path)``), numbered in order of first appearance."""
    ids: dict[str, int] = {}
    return [dataclasses.replace(r, media_id=ids.setdefault(os.path.basename(r.path), len(ids))) for r in records]


def caption_datasets(cfg: VLPretrainConfig, info: DistInfo, lists: dict[str, str] | None = None) -> list[vl_data.CaptionDataset]:
    lists = lists or caption_lists(cfg, info)
    out = []
    for media in ("video", "image"):
        path = lists[media]
        if not path:
            continue
        records = vl_data.caption_records(read_entries(cfg, path), media)
        if not records:
            raise ValueError(f"data.{media}_list={path!r} holds no {media} entries")
        if cfg.data.video_ids == "file_name":
            records = ids_by_file_name(records)
        out.append(vl_data.CaptionDataset(records, media, cfg.data.num_frames, cfg.data.img_size,
                                          seed=cfg.train.seed, flip=cfg.data.flip, max_seconds=cfg.data.max_seconds))  # fmt: skip
    return out


def test_entries(cfg: VLPretrainConfig, path: str) -> list[dict]:
    """data.test_list's entries, checked before training: one media type, every entry captioned."""
    entries = read_entries(cfg, path)
    if not entries or len({e["media"] for e in entries}) != 1:
        raise ValueError(f"data.test_list={path!r} must hold entries of one media type (all videos or all images)")
    missing = [i for i, e in enumerate(entries) if not e["captions"]]
    if missing:
        raise ValueError(f"data.test_list={path!r}: entry {missing[0]} has no caption")
    return entries


def evaluate_retrieval(model: VisionLanguageModel, tokenizer, cfg: VLPretrainConfig, entries: list[dict],
                       device: torch.device, autocast_dtype, info: DistInfo = DistInfo()) -> dict:  # fmt: skip
    """The retrieval evaluation of ``python -m umt_fast.evaluate retrieval`` on ``entries`` at the
    run's frames, size and text length: {"vtc": metrics, "vtm": metrics, "videos", "unreadable"}.
    Under torchrun (``info``, collective) each rank reads and encodes its share of the videos,
    as the command does, and every rank returns the report."""
    from umt_fast.recipes import retrieval

    T, S = cfg.data.num_frames, cfg.data.img_size
    shard = retrieval.load_shard(entries, T, S, info, num_workers=cfg.data.num_workers, max_seconds=cfg.data.max_seconds)
    if not shard.entries:
        raise ValueError(f"data.test_list={cfg.data.test_list!r}: none of its {len(shard.failed)} media could be read")
    results = retrieval.evaluate(model, tokenizer, shard.entries, num_frames=T, img_size=S, device=device, k=cfg.eval.k,
                                 max_len=cfg.text.max_len, batch_size=cfg.eval.batch_size, autocast_dtype=autocast_dtype,
                                 videos=shard.videos, positions=shard.positions, info=info)  # fmt: skip
    return {**results, "videos": len(shard.entries), "unreadable": [{"path": p, "reason": r} for p, r in shard.failed]}


# ----------------------------------------------------------------------------------- the step


class VLStep:
    """Callable ``(media, batch, step) -> [5] device tensor (total, uta, vtc, vtm, mlm)``; no host sync.
    The total weighs UTA (the teacher's term) by teacher.loss_weight and MLM by text.mlm_weight; a
    term of weight 0 is not computed (0 in the vector).

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
        """``teacher``: None with UTA off (teacher.loss_weight 0): the student then sees every token."""
        self.model, self.teacher, self.optimizer, self.tokenizer = model, teacher, optimizer, tokenizer
        self.cfg, self.device, self.autocast_dtype = cfg, device, autocast_dtype
        self.rank, self.world_size = rank, world_size
        # MLM never picks [CLS] or [PAD], as the reference; any other id (e.g. [UNK]) may be picked.
        self.special_ids = torch.tensor([tokenizer.cls_token_id, tokenizer.pad_token_id], device=device)
        self.vocab_size = unwrap(model).text_encoder.arch.vocab_size
        self.patches_per_frame = unwrap(model).student.arch.patches_per_frame

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
        idx, targets = None, None
        if ratio == 0:  # every token visible
            idx = torch.arange(T * self.patches_per_frame, device=self.device).expand(B, -1)
        if self.teacher is not None:
            with torch.no_grad(), self._autocast():
                teacher_out = self.teacher(video)
                if idx is None:
                    idx, targets = mask_and_targets(teacher_out, cfg.mask.policy, ratio=ratio, seed=seed, offset=step,
                                                    first_clip=first_clip)  # fmt: skip
                else:
                    targets = teacher_out.targets(idx)
        if "text_ids" not in batch:  # tokenized in the loader workers (CaptionCollate), else here
            text_ids, text_mask = tokenize_captions(self.tokenizer, batch["captions"], cfg.text.max_len)
            batch = {**batch, "text_ids": text_ids, "text_mask": text_mask}
        ids = batch["text_ids"].to(self.device, non_blocking=True)
        mask = batch["text_mask"].to(self.device, non_blocking=True)
        keyed = dict(seed=seed, offset=step, first_clip=first_clip, device=self.device)
        mlm_ids = mlm_labels = None
        if cfg.text.mlm_weight > 0:
            special = torch.isin(ids, self.special_ids) | (mask == 0)
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
        total = (self.cfg.teacher.loss_weight * losses["uta"] + losses["vtc"] + losses["vtm"]
                 + self.cfg.text.mlm_weight * losses["mlm"])
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


def _write_json(report: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)


class VLPretrainRecipe(EvaluatingRecipe):
    """Stage 2: UTA + VTC + VTM + MLM on interleaved video and image caption batches (the terms of
    weight 0 left out), evaluated on data.test_list when it is set."""

    unit = "pairs"
    export_name, best_export_name, naming = EXPORT_NAME, BEST_EXPORT_NAME, "the reference's stage-2 naming"
    loss_names = LOSS_NAMES

    def plan(self, info: DistInfo) -> None:
        self.info = info
        self.batch_plan = plan_batches(self.cfg, info.world_size)

    def build(self, info: DistInfo, resume_path: str | None) -> Setup:
        cfg, device = self.cfg, info.device
        lists = caption_lists(cfg, info)
        self.datasets = caption_datasets(cfg, info, lists)
        self.test_entries = test_entries(cfg, lists["test"]) if lists["test"] else None
        self.report = None
        self.best = BestEvaluation(cfg.run_dir, RETRIEVAL_REPORT, "vtm r_mean", lambda r: r["vtm"]["r_mean"]) \
            if cfg.eval.keep_best else None  # fmt: skip
        B, G = self.batch_plan.per_rank, self.batch_plan.global_batch
        counts = [vl_data.MediaBatchSampler(len(d), B, info.rank, info.world_size).batches_per_epoch for d in self.datasets]
        self.steps_per_epoch = steps_per_epoch = sum(counts)
        total_steps = cfg.optim.epochs * steps_per_epoch
        schedule = WarmupCosineSchedule(cfg.optim.lr, cfg.optim.min_lr, total_steps,
                                        cfg.optim.warmup_epochs * steps_per_epoch, cfg.optim.warmup_lr)  # fmt: skip
        self.low_precision = low_precision = torch.bfloat16 if device.type == "cuda" and cfg.train.precision == "bf16" else None
        teacher = None
        if cfg.teacher.uta:
            teacher = build_teacher(cfg).to(device)
            if low_precision is not None:
                teacher = teacher.to(low_precision)
            teacher = teachers_at_precision([teacher], cfg.teacher.precision, device)[0]
        model = build_model(cfg, teacher.arch.output_dim if teacher is not None else cfg.teacher.output_dim())
        if cfg.model.init and resume_path is None:
            what = initialise(model, cfg.model.init)
            log.info("initialised the %s from %s", what, cfg.model.init)
        elif not cfg.model.init:
            log.warning("model.init is empty: the vision tower starts from random weights (demos and tests only)")
        model = model.to(device)
        self.text_arch = text_arch = model.text_encoder.arch
        self.tokenizer = load_tokenizer(cfg.text.weights)
        if cfg.train.compile != "none":  # in place, names unchanged, before FSDP2 wraps the same blocks
            teacher_blocks = teacher.compilable_blocks if teacher is not None else []
            compile_blocks([*teacher_blocks, *shardable_blocks(model)], model, "blocks", cfg.train.compile_backend)
        self.model = wrapped = wrap_model(model, shardable_blocks(model), cfg.dist.strategy, info, low_precision)
        optimizer = build_optimizer(wrapped, schedule(0), cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps)
        self.step_fn = VLStep(wrapped, teacher, optimizer, self.tokenizer, cfg, device, low_precision, rank=info.rank,
                              world_size=info.world_size)  # fmt: skip
        self.media_counts = {"video": 0, "image": 0}
        student = model.student
        P = student.arch.patches_per_frame
        pair_flops = {}  # per media type: the vision side as in stage 1 (an image is one frame), + the text tower
        text_flops = text_flops_per_pair(text_arch, cfg.text.max_len)
        if not model.mlm:  # no second pass of the caption through every layer
            text_flops -= 3 * transformer_forward_flops(cfg.text.max_len, cfg.text.max_len, text_arch.hidden,
                                                        text_arch.num_layers)  # fmt: skip
        for media, T, ratio in (("video", student.arch.num_frames, cfg.mask.video_ratio), ("image", 1, cfg.mask.image_ratio)):
            visible = T * P if ratio == 0 else visible_tokens_per_clip(cfg.mask.policy, T, P, ratio)
            if teacher is not None:
                vision = pretrain_flops_per_clip(teacher.arch, student.arch, teacher.arch.grid, visible, T)
            else:  # the student alone, forward and backward
                vision = 3 * transformer_forward_flops(visible, visible, student.arch.width, student.arch.depth,
                                                       student.arch.mlp_ratio)  # fmt: skip
            pair_flops[media] = vision + text_flops
        # the steps of an epoch are video or image steps: the mean over them
        flops = G * sum(n * pair_flops[d.media] for n, d in zip(counts, self.datasets)) / steps_per_epoch
        describe = (f"preset {cfg.preset} | student {cfg.student.size} + text {text_arch.num_layers} layers "
                    f"({text_arch.fusion_layers} fusion, width {text_arch.hidden}), "
                    f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params | "
                    + ", ".join(f"{len(d)} {d.media} captions" for d in self.datasets)
                    + f" | global batch {G} = {info.world_size} ranks x {B}, hard negatives in groups of "
                    f"{self.batch_plan.vtm_group} | terms "
                    + " + ".join(n for n, on in (("UTA", model.uta), ("VTC", True), ("VTM", True), ("MLM", model.mlm))
                                 if on)
                    + (", per-frame VTC" if model.keep_temporal else "")
                    + (f" | retrieval test: {len(self.test_entries)} entries" if self.test_entries else ""))  # fmt: skip
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

    def evaluation_model(self) -> VisionLanguageModel:
        """Collective: the model every rank evaluates with (`whole_model`)."""
        cfg, info = self.cfg, self.info
        return whole_model(self.model, info.distributed and cfg.dist.strategy == "fsdp",
                           lambda: build_model(cfg, unwrap(self.model).student.arch.teacher_dim, load_text=False),
                           info.device)  # fmt: skip

    def evaluate(self, done: int, metrics) -> dict | None:
        """Collective: the retrieval evaluation of data.test_list, each rank reading and encoding
        its share of the videos. Rank 0 writes eval/* to metrics.jsonl and <run_dir>/retrieval.json
        and returns the report; the other ranks return None."""
        cfg, info = self.cfg, self.info
        model, report = self.evaluation_model(), None
        start = time.perf_counter()
        try:
            report = evaluate_retrieval(model, self.tokenizer, cfg, self.test_entries, info.device, self.low_precision,
                                        info)  # fmt: skip
        finally:
            self.model.train()
        if info.is_main:
            from umt_fast.recipes.retrieval import format_table

            report = {"step": done, "test_list": cfg.data.test_list, "k": cfg.eval.k, "num_frames": cfg.data.num_frames,
                      "img_size": cfg.data.img_size, **report}  # fmt: skip
            record = {f"eval/{scores}_{name}": value for scores in ("vtc", "vtm") for name, value in report[scores].items()}
            metrics.write({"step": done, **record, "eval/videos": report["videos"], "time": time.time()})
            ckpt.atomic_write(os.path.join(cfg.run_dir, RETRIEVAL_REPORT), functools.partial(_write_json, report))
            log.info("retrieval on %s at step %d (%d videos, %.1f s):\n%s", cfg.data.test_list, done,
                     report["videos"], time.perf_counter() - start, format_table({s: report[s] for s in ("vtc", "vtm")}))
        barrier()
        return report if info.is_main else None

    def export(self, path: str) -> str | None:
        return export_reference(self.model, self.text_arch, path, self.info)


def train(cfg: VLPretrainConfig) -> TrainResult:
    """Runs (or resumes) stage-2 pre-training as `cfg` says."""
    return run(VLPretrainRecipe(cfg))
