"""Video QA fine-tuning on the shared trainer: ``python -m umt_fast.finetune_qa``.

One step, as data (the reference's ``tasks/vqa.py`` ``train``):

    uint8 videos [B, T, S, S, 3] (a random frame per segment, RandomResizedCrop (0.5, 1), flip)
      -> normalise on the device
    questions -> [CLS] q (cleaned, data.max_q_len tokens); each question's distinct answers
      -> [CLS] a [SEP] (data.max_a_len tokens), weighted by their share of the annotated ones
    VideoQAModel.forward: the vision encoder on every token (drop path from counter-based factors),
      the question encoder attending to the video, the answer decoder on each answer
      -> loss = sum over the answers of weight x nll / B -> backward -> AdamW step

The model (`umt_fast.models.qa`) starts from a stage-2 model as the reference's fine-tuning does
(`init_from_stage2`) or from a QA model. data.test_list is answered at the end of training and
every eval.every_steps by `umt_fast.recipes.qa.evaluate_qa` (the ``python -m umt_fast.evaluate
qa`` command's ranking), into metrics.jsonl and <run_dir>/qa_eval.json; the model is also written
in the reference's UMT_QA naming to <run_dir>/umt_qa.pth, which that command reads.

World-size invariance, as the other recipes: step s reads global batch s (rank r holds questions
[r*b, (r+1)*b) of it); which question fills a position of a global batch, and its frames, crop
and flip, depend only on (seed, the position); the drop path of a question only on (seed, s, its
index in the global batch); and the loss of a rank is its share of the global mean (DDP and
FSDP2 average the gradients). So a step gives the same loss and update on any number of ranks at
the same train.global_batch_size, except for the text dropout (`text.dropout`), which draws from
torch's generator, seeded per (seed, step, rank).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from umt_fast.config.qa import QAFinetuneConfig
from umt_fast.config.vl import DEMO_DATA
from umt_fast.config.sections import STUDENT_SIZES
from umt_fast.data.captions import CaptionDataset, MediaBatchSampler, tokenize_captions
from umt_fast.data.dataset import init_worker
from umt_fast.data.transforms import normalize_video
from umt_fast.engine import checkpoint as ckpt
from umt_fast.engine.distributed import DistInfo, barrier, unwrap, wrap_model
from umt_fast.engine.flops import transformer_forward_flops
from umt_fast.engine.optim import WarmupCosineSchedule, build_optimizer
from umt_fast.engine.trainer import Setup, TrainResult, run
from umt_fast.models.qa import (
    QAVisionEncoder,
    VideoQAModel,
    init_from_stage2,
    is_qa_state_dict,
    load_reference_qa_state_dict,
    qa_state_dict_to_reference,
)
from umt_fast.models.student import StudentArch, drop_path_scales, keep_probabilities
from umt_fast.models.text import TextArch, build_text_encoder, load_tokenizer
from umt_fast.models.vl import is_stage2_state_dict, state_dict_to_reference
from umt_fast.recipes.evaluation import BestEvaluation, EvaluatingRecipe, whole_model
from umt_fast.recipes.pretrain import compile_blocks
from umt_fast.recipes.qa import (  # noqa: F401 (write_demo_qa_lists: also the recipe's name)
    evaluate_qa,
    format_qa_table,
    qa_accuracy,
    read_answer_list,
    read_qa_json,
    tokenize_answers,
    write_demo_qa_lists,
)
from umt_kernels.rng import mix_seed

log = logging.getLogger(__name__)

EXPORT_NAME = "umt_qa.pth"
"""The fine-tuned model in the reference's UMT_QA naming, in the run directory."""
BEST_EXPORT_NAME = "umt_qa_best.pth"
"""eval.keep_best: the model of the best evaluation so far (by acc), in the same naming."""
EVAL_REPORT = "qa_eval.json"
"""The last evaluation of data.test_list, in the run directory."""
STREAM = "qa_questions"
"""The data order's and augmentation's stream name (`umt_fast.data.order`)."""


# ----------------------------------------------------------------------------------- the data


def answers_with_weights(answer: str | list[str]) -> tuple[list[str], list[float]]:
    """The reference's ``get_answers_with_weights``: the distinct answers in order of first
    appearance, each weighted by its share of the annotated ones (1 / n added per occurrence)."""
    raw = [answer] if isinstance(answer, str) else list(answer)
    weights: dict[str, float] = {}
    for a in raw:
        weights[a] = weights.get(a, 0.0) + 1 / len(raw)
    return list(weights), list(weights.values())


@dataclass(frozen=True)
class QARecord:
    """One training question: its video, the question and its weighted distinct answers."""

    path: str
    question: str
    answers: tuple[str, ...]
    weights: tuple[float, ...]


def qa_records(entries: list[dict]) -> list[QARecord]:
    """`umt_fast.recipes.qa.read_qa_json` entries -> one record per question."""
    out = []
    for e in entries:
        answers, weights = answers_with_weights(e["answer"])
        out.append(QARecord(e["path"], e["question"], tuple(answers), tuple(weights)))
    return out


class QADataset(CaptionDataset):
    """Augmented questions indexed by sample position, as `umt_fast.data.captions.CaptionDataset`
    (whose order, augmentation and substitution of undecodable videos it shares, on a stream of
    its own): the record and all of its randomness (frames, crop, flip) are functions of
    (seed, position) alone."""

    def __init__(self, records: list[QARecord], num_frames: int, img_size: int, seed: int, flip: bool = True,
                 max_substitutes: int = 16):  # fmt: skip
        super().__init__(records, "video", num_frames, img_size, seed, flip, max_substitutes, stream=STREAM)

    def __getitem__(self, position: int) -> dict[str, Any]:
        record, video, skipped = self.load(position)
        return {"video": video, "record": record, "position": position, "skipped": skipped}


class QACollate:
    """A batch of `QADataset` samples as the step reads it, tokenized in the loader workers:

    ``video`` uint8 [B, T, S, S, 3]; ``question_ids`` / ``question_mask`` int64 [B, max_q_len]
    (`tokenize_captions`: cleaned, ``[CLS] q``); ``answer_ids`` / ``answer_mask`` int64 [M,
    max_a_len] (`tokenize_answers`: ``[CLS] a [SEP]``), the answers of question 0, then 1, ...;
    ``answer_counts`` int64 [B] (sum M); ``answer_weights`` float32 [M]; ``positions`` int64 [B];
    ``questions``, ``answers`` (per question, its distinct answers) and ``skipped``."""

    def __init__(self, tokenizer, max_q_len: int, max_a_len: int):
        self.tokenizer, self.max_q_len, self.max_a_len = tokenizer, max_q_len, max_a_len

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        records = [s["record"] for s in samples]
        questions = [r.question for r in records]
        answers = [a for r in records for a in r.answers]
        q_ids, q_mask = tokenize_captions(self.tokenizer, questions, self.max_q_len)
        a_ids, a_mask = tokenize_answers(self.tokenizer, answers, self.max_a_len)
        return {
            "video": torch.stack([s["video"] for s in samples]),
            "question_ids": q_ids, "question_mask": q_mask, "answer_ids": a_ids, "answer_mask": a_mask,
            "answer_counts": torch.tensor([len(r.answers) for r in records], dtype=torch.long),
            "answer_weights": torch.tensor([w for r in records for w in r.weights], dtype=torch.float32),
            "positions": torch.tensor([s["position"] for s in samples], dtype=torch.long),
            "questions": questions, "answers": [list(r.answers) for r in records],
            "skipped": [p for s in samples for p in s["skipped"]],
        }  # fmt: skip


def qa_loader(dataset: QADataset, per_rank: int, collate: QACollate, start_step: int = 0, *, rank: int = 0,
              world_size: int = 1, num_workers: int = 0, pin_memory: bool = False):  # fmt: skip
    """The endless batches of one rank from global step `start_step` on: global batch j covers
    positions [j*G, (j+1)*G) of its epoch (`MediaBatchSampler`; an epoch's tail that does not fill
    a global batch is dropped, as the reference's loader drops it), rank r reads [r*b, (r+1)*b)."""
    sampler = MediaBatchSampler(len(dataset), per_rank, rank, world_size, start_step)
    return iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                           pin_memory=pin_memory, persistent_workers=num_workers > 0,
                           worker_init_fn=init_worker if num_workers > 0 else None))  # fmt: skip


def qa_lists(cfg: QAFinetuneConfig, info: DistInfo | None = None) -> dict[str, str]:
    """The paths of data.train_list, data.test_list and data.answer_list ('' where unset), the demo's
    lists written into <run_dir>/demo_data where one is 'demo' (collective when `info` is given)."""
    lists = {"train": cfg.data.train_list, "test": cfg.data.test_list, "answers": cfg.data.answer_list}
    if DEMO_DATA in lists.values():
        demo_dir = os.path.join(cfg.run_dir, "demo_data")
        if info is None or info.is_main:
            write_demo_qa_lists(demo_dir)
        barrier()
        demo = {"train": "demo_qa.json", "test": "demo_qa.json", "answers": "demo_answers.json"}
        lists = {k: os.path.join(demo_dir, demo[k]) if v == DEMO_DATA else v for k, v in lists.items()}
    return lists


def _read(field: str, fn, *args):
    try:
        return fn(*args)
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from None


def read_lists(cfg: QAFinetuneConfig, lists: dict[str, str]) -> tuple[list[dict] | None, list[dict] | None, list[str] | None]:
    """(training entries, test entries, answer list), None where a list is '' (unset); ValueError
    naming the field, the file and the entry for a malformed one."""
    train = _read("data.train_list", read_qa_json, lists["train"], cfg.data.root) if lists["train"] else None
    test = _read("data.test_list", read_qa_json, lists["test"], cfg.data.root) if lists["test"] else None
    answers = _read("data.answer_list", read_answer_list, lists["answers"]) if lists["answers"] else None
    return train, test, answers


def check_lists(cfg: QAFinetuneConfig) -> None:
    """Reads the lists that are files before anything is built (the demo's are written with the run)."""
    read_lists(cfg, {k: ("" if v == DEMO_DATA else v) for k, v in
                     (("train", cfg.data.train_list), ("test", cfg.data.test_list), ("answers", cfg.data.answer_list))})


# ----------------------------------------------------------------------------------- the model


def build_model(cfg: QAFinetuneConfig, load_text: bool = True) -> VideoQAModel:
    """The QA model of `cfg`: a vision encoder of model.size at data.num_frames x data.img_size, the
    text tower of text.weights (its BERT weights when `load_text`) as the question encoder, and a
    fresh answer decoder of text.fusion_layers layers."""
    size = STUDENT_SIZES[cfg.model.size]
    arch = StudentArch(width=size["width"], depth=size["depth"], heads=size["heads"], teacher_dim=size["width"],
                       return_layers=1, num_frames=cfg.data.num_frames, img_size=cfg.data.img_size,
                       patch_size=cfg.model.patch_size, drop_path=cfg.model.drop_path)  # fmt: skip
    vision = QAVisionEncoder(arch)
    vision.encoder.checkpointed_blocks = cfg.train.checkpointed_blocks(arch.depth)
    dropout = cfg.text.dropout if cfg.text.dropout >= 0 else None
    text = build_text_encoder(cfg.text.weights, cfg.text.fusion_layers, arch.width, load=load_text, dropout=dropout)
    return VideoQAModel(vision, text)


def _count(sd: dict, pattern: str) -> int:
    return len({int(m.group(1)) for k in sd if (m := re.match(pattern, k))})


def _stage2_run_to_reference(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stage-2 run checkpoint's model state (our naming) -> the reference's stage-2 naming."""
    n_low = _count(sd, r"text_encoder\.bert\.encoder\.layer\.(\d+)\.")
    n_fusion = _count(sd, r"text_encoder\.fusion\.(\d+)\.")
    arch = TextArch(vocab_size=0, hidden=0, num_layers=n_low + n_fusion, heads=1, intermediate=0, max_positions=0,
                    type_vocab_size=0, fusion_layers=n_fusion, vision_width=0)  # fmt: skip
    return state_dict_to_reference(sd, arch)


def initialise(model: VideoQAModel, path: str) -> str:
    """Load model.init into `model`, strictly: a QA model whole (the reference's UMT_QA naming, or a
    QA run checkpoint), or a stage-2 model (the reference's naming, or a stage-2 run checkpoint) as
    the reference's fine-tuning starts (`init_from_stage2`). Returns what was loaded."""
    from umt_fast.interop import read_state_dict, strip_prefix
    from umt_fast.safe_load import load_state_dict_checked

    if os.path.isdir(path):  # a run directory or one of its checkpoints
        state = ckpt.load_checkpoint(ckpt.resolve_checkpoint(path))
        sd = strip_prefix({k.replace("_orig_mod.", ""): v for k, v in state["student"].items()}, "module.")
        if "text_decoder.bert.embeddings.word_embeddings.weight" in sd:
            load_state_dict_checked(model, sd, path)
            return "QA model (a QA run)"
        if "student.encoder.patch_embed.proj.weight" not in sd or not _count(sd, r"text_encoder\.fusion\.(\d+)\."):
            stage = ckpt.run_stage(state.get("config") or {})
            raise ValueError(f"model.init={path!r} is {ckpt.STAGE_NAMES[stage]}; QA fine-tuning starts from a stage-2 "
                             "model or a QA model")  # fmt: skip
        sd = _stage2_run_to_reference(sd)
    else:
        sd = read_state_dict(path, "model.init")
        sd = strip_prefix({k.replace("_orig_mod.", ""): v for k, v in sd.items()}, "module.")
        if is_qa_state_dict(sd):
            load_reference_qa_state_dict(model, sd, path)
            return "QA model (UMT_QA naming)"
    if not is_stage2_state_dict(sd):
        raise ValueError(f"model.init={path!r}: neither a UMT stage-2 nor a QA model (first keys: {list(sd)[:4]})")
    if sd.pop("vision_encoder.encoder.pos_embed", None) is not None:
        log.info("model.init: ignoring the file's pos_embed (the fixed sin-cos table is rebuilt)")
    init_from_stage2(model, sd, path)
    return "stage-2 model (question encoder, answer decoder from its fusion layers and MLM head)"


def shardable_blocks(model: VideoQAModel) -> list[nn.Module]:
    """What FSDP2 shards one by one: the vision blocks, BERT's layers and the question encoder's
    fusion layers. The answer decoder's layers stay with the root: `VideoQAModel.decoder_logits`
    calls their parts (attention, cross-attention, MLP) one by one, not their forward."""
    text = model.text_encoder
    return list(model.vision_encoder.encoder.blocks) + list(text.bert.encoder.layer) + list(text.fusion)


def step_flops(model: VideoQAModel, cfg: QAFinetuneConfig, answers_per_question: float) -> float:
    """Model FLOPs of one question, forward and backward (3x): the vision encoder on every token,
    the question through the text tower, each answer through the decoder (cross-attention counted as
    self-attention over the sequence)."""
    v, t = model.vision_encoder.arch, model.text_encoder.arch
    N, Sq, Sa = v.num_tokens, cfg.data.max_q_len, cfg.data.max_a_len
    vision = transformer_forward_flops(N, N, v.width, v.depth, v.mlp_ratio)
    question = transformer_forward_flops(Sq, Sq, t.hidden, t.num_layers)
    decoder = answers_per_question * transformer_forward_flops(Sa, Sa, t.hidden, t.fusion_layers)
    return 3 * (vision + question + decoder)


# ----------------------------------------------------------------------------------- the step


class QAStep:
    """Callable ``(batch, step) -> [1] device tensor (the loss)``; no host sync.

    ``batch`` is this rank's share of the step's global batch of ``B * world_size`` questions (rank r
    holds [r*B, (r+1)*B)); the drop-path factors are counter-based functions of (seed, step, the
    question's index in the global batch). torch's generator, seeded from (seed, step, rank), serves
    the text dropout alone."""

    def __init__(self, model, optimizer, cfg: QAFinetuneConfig, device, autocast_dtype, rank: int = 0):
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.device, self.autocast_dtype, self.rank = device, autocast_dtype, rank

    @functools.cached_property
    def keep_prob(self) -> torch.Tensor | None:
        """[depth] keep probabilities of the vision blocks on the device (None: no drop path)."""
        return keep_probabilities(unwrap(self.model).vision_encoder.encoder.drop_probs, self.device)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def __call__(self, batch: dict, step: int) -> torch.Tensor:
        seed = self.cfg.train.seed
        torch.manual_seed(mix_seed(seed, step) + self.rank)  # the text dropout
        self.optimizer.zero_grad(set_to_none=True)
        to = functools.partial(torch.Tensor.to, device=self.device, non_blocking=True)
        video = normalize_video(to(batch["video"]))
        B = video.shape[0]
        drop_scales = None
        if self.keep_prob is not None:
            drop_scales = drop_path_scales(self.keep_prob, B, seed=seed, offset=step, first_clip=self.rank * B)
        with self._autocast():
            loss = self.model(video, to(batch["question_ids"]), to(batch["question_mask"]), to(batch["answer_ids"]),
                              to(batch["answer_mask"]), to(batch["answer_counts"]), to(batch["answer_weights"]),
                              drop_scales)  # fmt: skip
        loss.backward()
        self.optimizer.step()
        return loss.detach().float().reshape(1)


# ----------------------------------------------------------------------------------- the recipe


def plan_batch(cfg: QAFinetuneConfig, world_size: int) -> tuple[int, int]:
    """(global batch, per-rank batch) of train.global_batch_size / train.batch_size at `world_size`
    ranks; ValueError naming the fields where they do not fit."""
    G, b = cfg.train.global_batch_size, cfg.train.batch_size
    if G and b and b * world_size != G:
        raise ValueError(f"train.batch_size={b} (per rank) x {world_size} ranks = {b * world_size} contradicts "
                         f"train.global_batch_size={G}; set one of them to 0 to derive it from the other")  # fmt: skip
    if G:
        if G % world_size:
            raise ValueError(f"train.global_batch_size={G} must be divisible by the number of ranks ({world_size})")
        return G, G // world_size
    return b * world_size, b


def export_reference(model: nn.Module, text_arch: TextArch, path: str, info: DistInfo) -> str | None:
    """Collective: the full model in the reference's UMT_QA naming, written by rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not info.is_main:
        return None
    ckpt.atomic_torch_save({"model": qa_state_dict_to_reference(sd, text_arch)}, path)
    return path


class QAFinetuneRecipe(EvaluatingRecipe):
    """Video QA fine-tuning: the reference's weighted answer loss, then the evaluation of data.test_list."""

    unit = "questions"
    export_name, best_export_name, naming = EXPORT_NAME, BEST_EXPORT_NAME, "the reference's UMT_QA naming"
    loss_names = ("loss",)

    def plan(self, info: DistInfo) -> None:
        self.info = info
        self.global_batch, self.per_rank = plan_batch(self.cfg, info.world_size)

    def build(self, info: DistInfo, resume_path: str | None) -> Setup:
        cfg, device = self.cfg, info.device
        train, self.test_entries, self.answer_list = read_lists(cfg, qa_lists(cfg, info))
        self.report = None
        self.best = BestEvaluation(cfg.run_dir, EVAL_REPORT, "acc", lambda r: r["acc"]) if cfg.eval.keep_best else None
        records = qa_records(train)
        if len(records) < self.global_batch:
            raise ValueError(f"data.train_list holds {len(records)} questions, fewer than one global batch of "
                             f"{self.global_batch} (train.global_batch_size / train.batch_size)")  # fmt: skip
        self.dataset = QADataset(records, cfg.data.num_frames, cfg.data.img_size, seed=cfg.train.seed, flip=cfg.data.flip)
        self.steps_per_epoch = steps_per_epoch = len(records) // self.global_batch
        total_steps = cfg.optim.epochs * steps_per_epoch
        schedule = WarmupCosineSchedule(cfg.optim.lr, cfg.optim.min_lr, total_steps,
                                        cfg.optim.warmup_epochs * steps_per_epoch, cfg.optim.warmup_lr)  # fmt: skip
        self.low_precision = low_precision = torch.bfloat16 if device.type == "cuda" and cfg.train.precision == "bf16" else None
        model = build_model(cfg, load_text=not cfg.model.init)
        if cfg.model.init and resume_path is None:
            what = initialise(model, cfg.model.init)
            log.info("initialised the %s from %s", what, cfg.model.init)
        elif not cfg.model.init:
            log.warning("model.init is empty: the vision tower and the answer decoder start from random weights "
                        "(demos and tests only)")  # fmt: skip
        model = model.to(device)
        self.text_arch = model.text_encoder.arch
        self.tokenizer = load_tokenizer(cfg.text.weights)
        if cfg.train.compile != "none":  # in place, names unchanged, before FSDP2 wraps the same blocks
            compile_blocks(shardable_blocks(model), model, "blocks", cfg.train.compile_backend)
        self.model = wrapped = wrap_model(model, shardable_blocks(model), cfg.dist.strategy, info, low_precision)
        optimizer = build_optimizer(wrapped, schedule(0), cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps)
        self.step_fn = QAStep(wrapped, optimizer, cfg, device, low_precision, rank=info.rank)
        answers_per_question = sum(len(r.answers) for r in records) / len(records)
        flops = self.global_batch * step_flops(model, cfg, answers_per_question)
        t = self.text_arch
        describe = (f"preset {cfg.preset} | vision {cfg.model.size} ({cfg.data.num_frames} x {cfg.data.img_size} px) + "
                    f"text {t.num_layers} layers ({t.fusion_layers} fusion, width {t.hidden}) + decoder "
                    f"{t.fusion_layers} layers, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params | "
                    f"{len(records)} questions | global batch {self.global_batch} = {info.world_size} ranks x "
                    f"{self.per_rank}"
                    + (f" | test: {len(self.test_entries)} questions, {len(self.answer_list)} answers, k {cfg.eval.k}"
                       if self.test_entries else ""))  # fmt: skip
        return Setup(wrapped, optimizer, schedule, steps_per_epoch, total_steps, self.global_batch, flops, describe,
                     num_items=len(records))  # fmt: skip

    def batches(self, start_step: int):
        cfg, info = self.cfg, self.info
        collate = QACollate(self.tokenizer, cfg.data.max_q_len, cfg.data.max_a_len)
        return qa_loader(self.dataset, self.per_rank, collate, start_step, rank=info.rank, world_size=info.world_size,
                         num_workers=cfg.data.num_workers, pin_memory=info.device.type == "cuda")  # fmt: skip

    def step(self, batch: dict, step: int) -> torch.Tensor:
        return self.step_fn(batch, step)

    def data_position(self, steps_done: int) -> int:
        return steps_done * self.global_batch

    def evaluation_model(self) -> VideoQAModel:
        """Collective: the model every rank evaluates with (`whole_model`)."""
        cfg, info = self.cfg, self.info
        return whole_model(self.model, info.distributed and cfg.dist.strategy == "fsdp",
                           lambda: build_model(cfg, load_text=False), info.device)

    def evaluate(self, done: int, metrics) -> dict | None:
        """Collective: answers data.test_list, each rank the questions of its share of the videos.
        Rank 0 writes eval/* to metrics.jsonl and <run_dir>/qa_eval.json, and returns the report;
        other ranks return None."""
        cfg, info = self.cfg, self.info
        model = self.evaluation_model()
        report = None
        start = time.perf_counter()
        try:
            result = evaluate_qa(model, self.tokenizer, self.test_entries, self.answer_list,
                                 num_frames=cfg.data.num_frames, img_size=cfg.data.img_size, device=info.device,
                                 k=cfg.eval.k, max_q_len=cfg.data.max_q_len, max_a_len=cfg.data.max_a_len,
                                 batch_size=cfg.eval.batch_size, autocast_dtype=self.low_precision,
                                 num_workers=cfg.data.num_workers, info=info)  # fmt: skip
        finally:
            self.model.train()
        if not result.predictions:  # every rank holds all the answers; training goes on, only the evaluation is lost
            if info.is_main:
                log.error("data.test_list=%r: none of its %d videos could be read; no evaluation at step %d",
                          cfg.data.test_list, len(result.unreadable), done)  # fmt: skip
            barrier()
            return None
        if info.is_main:
            preds = result.predictions
            accuracy = qa_accuracy([p["prediction"] for p in preds], [p["answer"] for p in preds])
            report = {"step": done, "test_list": cfg.data.test_list, "answer_list": cfg.data.answer_list, "k": cfg.eval.k,
                      "num_frames": cfg.data.num_frames, "img_size": cfg.data.img_size, "questions": len(preds),
                      "videos": len({p["video"] for p in preds}), "answers": len(self.answer_list), **accuracy,
                      "predictions": preds,
                      "unreadable": [{"path": p, "reason": r} for p, r in result.unreadable]}  # fmt: skip
            record = {f"eval/{name}": value for name, value in report.items()
                      if name in ("acc", "correct", "acc_normalised", "vqa_acc", "questions")}  # fmt: skip
            metrics.write({"step": done, **record, "time": time.time()})
            path = os.path.join(cfg.run_dir, EVAL_REPORT)
            ckpt.atomic_write(path, lambda tmp: open(tmp, "w", encoding="utf-8").write(json.dumps(report, indent=2)))
            log.info("QA on %s at step %d (%d questions of %d videos, %.1f s):\n%s", cfg.data.test_list, done,
                     report["questions"], report["videos"], time.perf_counter() - start,
                     format_qa_table(report, report["questions"]))  # fmt: skip
        barrier()
        return report if info.is_main else None

    def export(self, path: str) -> str | None:
        return export_reference(self.model, self.text_arch, path, self.info)


def train(cfg: QAFinetuneConfig) -> TrainResult:
    """Runs (or resumes) QA fine-tuning as `cfg` says."""
    return run(QAFinetuneRecipe(cfg))
