"""Multi-view evaluation of a video classifier (UMT_SPEC.md section 3, "Test"): every video as
``num_clips`` temporal clips x ``num_crops`` spatial crops, the softmax scores of its views
averaged; top-1 / top-5, per-class accuracy and the worst classes with what they are mistaken for.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from umt_fast.data.decoding import VideoDecodeError
from umt_fast.data.labelled import multi_view_clip
from umt_fast.data.transforms import normalize_video
from umt_fast.engine.distributed import (
    DistInfo,
    all_gather_objects,
    all_gather_stacked,
    destroy_distributed,
    init_distributed,
)
from umt_fast.engine.trainer import Recipe, TrainResult
from umt_fast.models.classifier import VideoViT

log = logging.getLogger(__name__)

WORST_CLASSES_SHOWN = 10


class ViewsDataset(Dataset):
    """Video i -> (i, uint8 views [V, T, S, S, 3] or None, error text or None)."""

    def __init__(self, paths: list[str], num_frames: int, img_size: int, num_clips: int, num_crops: int):
        self.paths, self.shape = paths, (num_frames, img_size, num_clips, num_crops)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, multi_view_clip(self.paths[i], *self.shape), None
        except VideoDecodeError as e:
            return i, None, e.reason


@dataclass
class Predictions:
    """Averaged softmax scores of the videos that could be read.

    Attributes:
        paths: the readable videos, in input order.
        probs: float32 [len(paths), K], the mean over views of the softmax.
        views_per_video: num_clips x num_crops.
        failed: (path, reason) of every unreadable video.
    """

    paths: list[str]
    probs: torch.Tensor
    views_per_video: int
    failed: list[tuple[str, str]] = field(default_factory=list)


def autocast_for(device: torch.device, precision: str = "bf16"):
    """bf16 autocast on a GPU when asked; nothing on a CPU."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_videos(
    model: VideoViT,
    paths: list[str],
    *,
    num_clips: int,
    num_crops: int,
    batch_size: int = 16,
    device: torch.device = torch.device("cpu"),
    precision: str = "bf16",
    num_workers: int = 0,
    on_video: Callable[[int, int], None] | None = None,
    info: DistInfo = DistInfo(),
) -> Predictions:
    """Runs ``model`` on every view of every video and averages the softmax per video.

    Under torchrun (``info``), rank r scores paths[r::world_size] and every rank returns the
    Predictions of all paths, in input order. The ranks run in lock-step, the same number of
    forward passes of the same shape each (FSDP2 all-gathers parameters in every forward): a rank
    with fewer videos, or with unreadable ones, runs blank views whose scores are dropped.

    Args:
        model: a classifier (num_classes > 0); its arch fixes frames and input size.
        batch_size: views per forward pass (at least one video's views).
        on_video: called as on_video(done, total) after each of this rank's videos (progress).
    """
    arch = model.arch
    if arch.num_classes == 0:
        raise ValueError("evaluation needs a classifier (a model with a head); this model has none")
    was_training = model.training
    model.eval()
    W, views_per_video = info.world_size, num_clips * num_crops
    mine = list(range(info.rank, len(paths), W))
    per_rank = -(-len(paths) // W)
    videos_per_pass = max(1, batch_size // views_per_video)
    loader = DataLoader(
        ViewsDataset([paths[i] for i in mine], arch.num_frames, arch.img_size, num_clips, num_crops),
        batch_size=None, num_workers=num_workers, pin_memory=device.type == "cuda",
    )  # fmt: skip
    items = iter(loader)
    blank = torch.zeros(views_per_video, arch.num_frames, arch.img_size, arch.img_size, 3, dtype=torch.uint8)
    probs = torch.zeros(per_rank, arch.num_classes, device=device)
    readable = torch.zeros(per_rank, dtype=torch.bool)
    failed: list[tuple[str, str]] = []
    for start in range(0, per_rank, videos_per_pass):
        chunk = []
        for j in range(start, min(start + videos_per_pass, per_rank)):
            views = None
            if j < len(mine):
                _, views, error = next(items)
                if views is None:
                    failed.append((paths[mine[j]], error))
                    log.warning("skipping unreadable video %s: %s", paths[mine[j]], error)
                else:
                    readable[j] = True
                if on_video is not None:
                    on_video(j + 1, len(mine))
            chunk.append(blank if views is None else views)
        views = torch.cat(chunk).to(device, non_blocking=True)
        scores = []
        for part in views.split(batch_size):
            with autocast_for(device, precision):
                logits = model(normalize_video(part))
            scores.append(logits.float().softmax(-1))
        probs[start:start + len(chunk)] = torch.cat(scores).view(len(chunk), views_per_video, -1).mean(1)
    model.train(was_training)
    if info.distributed:
        all_probs = all_gather_stacked(probs).cpu()  # [W, per_rank, K]
        all_readable = all_gather_stacked(readable.to(device, torch.int32)).cpu()  # NCCL: no bool
        failed = [f for part in all_gather_objects(failed) for f in part]
    else:
        all_probs, all_readable = probs.cpu()[None], readable[None]
    found = sorted((r + j * W, r, j) for r in range(W) for j in range(per_rank) if all_readable[r, j])
    stacked = torch.stack([all_probs[r, j] for _, r, j in found]) if found else torch.empty(0, arch.num_classes)
    reasons = dict(failed)
    return Predictions([paths[i] for i, _, _ in found], stacked, views_per_video,
                       [(p, reasons[p]) for p in paths if p in reasons])  # fmt: skip


def class_name(names: list[str] | None, label: int) -> str:
    return names[label] if names and 0 <= label < len(names) else str(label)


def accuracy_report(probs: torch.Tensor, labels: torch.Tensor, class_names: list[str] | None = None) -> dict[str, Any]:
    """Top-1 / top-5 (in %, over videos) and the worst classes.

    Args:
        probs: [V, K] averaged scores; labels: int64 [V].

    Returns:
        {"num_videos", "top1", "top5", "mean_class_top1", "worst_classes": [{"label", "name",
        "videos", "top1", "confused_with": [{"label", "name", "count"}]}]}
    """
    num_videos, num_classes = probs.shape
    if num_videos == 0:
        return {"num_videos": 0, "top1": None, "top5": None, "mean_class_top1": None, "worst_classes": []}
    top5 = probs.topk(min(5, num_classes), dim=-1).indices
    predicted = top5[:, 0]
    correct1 = predicted == labels
    correct5 = (top5 == labels[:, None]).any(-1)
    per_class = []
    for label in labels.unique().tolist():
        rows = labels == label
        wrong = predicted[rows & ~correct1]
        confused = torch.bincount(wrong, minlength=num_classes) if wrong.numel() else torch.zeros(num_classes)
        top_confused = [
            {"label": c, "name": class_name(class_names, c), "count": int(confused[c])}
            for c in confused.argsort(descending=True)[:3].tolist() if confused[c] > 0
        ]  # fmt: skip
        per_class.append({
            "label": label, "name": class_name(class_names, label), "videos": int(rows.sum()),
            "top1": 100.0 * float(correct1[rows].float().mean()), "confused_with": top_confused,
        })  # fmt: skip
    worst = sorted(per_class, key=lambda c: (c["top1"], -c["videos"], c["label"]))[:WORST_CLASSES_SHOWN]
    return {
        "num_videos": num_videos,
        "top1": 100.0 * float(correct1.float().mean()),
        "top5": 100.0 * float(correct5.float().mean()),
        "mean_class_top1": sum(c["top1"] for c in per_class) / len(per_class),
        "worst_classes": worst,
    }


def format_report(report: dict[str, Any], failed: list[tuple[str, str]] = ()) -> str:
    """The report as a readable table."""
    lines = [f"videos: {report['num_videos']}" + (f" ({len(failed)} unreadable, skipped)" if failed else "")]
    if report["top1"] is not None:
        lines += [
            f"top-1:  {report['top1']:6.2f} %",
            f"top-5:  {report['top5']:6.2f} %",
            f"mean per-class top-1: {report['mean_class_top1']:6.2f} %",
            "",
            "worst classes:",
            f"  {'class':<32} {'videos':>6} {'top-1 %':>8}  most often predicted instead",
        ]
        for c in report["worst_classes"]:
            confused = ", ".join(f"{x['name']} ({x['count']})" for x in c["confused_with"]) or "-"
            lines.append(f"  {c['name'][:32]:<32} {c['videos']:>6} {c['top1']:>8.1f}  {confused}")
    for path, reason in failed:
        lines.append(f"unreadable: {path}: {reason}")
    return "\n".join(lines)


def load_classifier(path: str, num_frames: int | None, img_size: int | None, patch_size: int | None) -> tuple[VideoViT, dict]:
    """A classifier from a fine-tuning or probe run (dir or checkpoint), an export of ours or a
    reference file; (model, what we know about it: num_frames, img_size, patch_size, class_names)."""
    from umt_fast import interop
    from umt_fast.engine.checkpoint import read_run_checkpoint, sidecar_path

    known: dict[str, Any] = {}
    description: dict[str, Any] = {}
    if os.path.isdir(path):
        state_dict, description = read_run_checkpoint(path)
        source: Any = state_dict
    else:
        sidecar = sidecar_path(path)
        if os.path.isfile(sidecar):
            with open(sidecar, encoding="utf-8") as f:
                description = json.load(f)
        source = path
    known = {k: description.get(k) for k in ("num_frames", "img_size", "patch_size", "class_names")}
    num_frames = num_frames or known.get("num_frames") or 8
    img_size = img_size or known.get("img_size") or 224
    patch_size = patch_size or known.get("patch_size") or 16
    sd = interop.canonical_video_state_dict(interop.read_state_dict(source, "video model checkpoint"))
    probe = probe_of(sd, (description.get("config") or {}).get("model") or {}, path)
    if probe is None:
        model = interop.load_video_vit(sd, num_frames=num_frames, img_size=img_size, patch_size=patch_size)
    else:  # a frozen backbone under a probe head: the run's config says which
        arch = interop.video_vit_arch_from_state_dict(sd, num_frames, img_size, patch_size, final_norm="norm.weight" in sd,
                                                      **probe)  # fmt: skip
        model = VideoViT(arch)
        interop.init_video_vit(model, sd)  # strict: every key of the run's model, pos_embed fitted to the clip
        model.eval()
    return model, {"num_frames": num_frames, "img_size": img_size, "patch_size": patch_size,
                   "class_names": known.get("class_names")}  # fmt: skip


def probe_of(sd: dict[str, Any], model_config: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The probe fields of `VideoViTArch` for a probe run's weights (None for a classifier or an
    encoder), from the run's ``model`` config section (its config, or the export's description).

    Without a description a linear probe is known by its head without ``fc_norm``; an attentive
    one (``probe.*``) is refused, since nothing says its number of heads."""
    probe = model_config.get("probe", "none")
    if probe == "none":
        if any(k.startswith("probe.") for k in sd):
            raise ValueError(
                f"{path} holds an attentive probe (probe.* weights) but no description of it: evaluate its run "
                "directory, or an export with the JSON that umt_fast.export writes beside it"
            )
        if "head.weight" not in sd or "fc_norm.weight" in sd:
            return None
        probe = "linear"
    fields: dict[str, Any] = {"probe": probe}
    if probe == "attentive":
        if "probe.query" not in sd:
            raise ValueError(f"{path} is described as an attentive probe, but holds no probe.* weights")
        fields.update(probe_queries=sd["probe.query"].shape[1], probe_heads=int(model_config.get("probe_heads", 0)))
    return fields


def resolve_device(name: str) -> torch.device:
    """--device auto | cpu | cuda -> the torch device (cuda refused when there is none)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    return torch.device(name)


def init_evaluation(device: str) -> DistInfo:
    """The evaluation's device and, under torchrun, its process group (each rank on its own GPU),
    which lives on for a later evaluation in the same process and ends at exit; one line on the
    main rank says how many ranks share the work."""
    resolve_device(device)  # refuses cuda where there is none, naming --device
    started = torch.distributed.is_initialized()
    info = init_distributed(device)  # a group already started (an earlier evaluation in this process) is kept
    if info.distributed and not started:
        atexit.register(destroy_distributed)
    if info.distributed and info.is_main:
        print(f"evaluating on {info.world_size} ranks, each its share of the list", file=sys.stderr, flush=True)
    return info


def progress_printer(verb: str, info: DistInfo = DistInfo(), every: int = 50):
    """``progress(done, total)`` printing "VERB done/total | rate | ETA" on stderr every ``every``
    items and at the end; under torchrun only the main rank prints (its share's progress)."""
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if info.is_main and (done % every == 0 or done == total):
            rate = done / max(time.perf_counter() - start, 1e-9)
            share = f" (this rank's share of {info.world_size})" if info.distributed else ""
            print(f"{verb} {done}/{total}{share} | {rate:.1f}/s | ETA {(total - done) / rate:.0f} s", file=sys.stderr,
                  flush=True)  # fmt: skip

    return progress


DEMO = "demo"
"""A list option's value that stands for the demo's own list on the sample clips."""


def demo_path(value: str, write: Callable[[str], str], demo: str = DEMO) -> str:
    """``value``, or where it is ``demo`` the demo's file, which ``write(directory)`` writes into a
    temporary directory removed at exit and returns."""
    if value != demo:
        return value
    directory = tempfile.mkdtemp(prefix="umt_fast_demo_")
    atexit.register(shutil.rmtree, directory, True)
    return write(directory)


def sample_clips_path(value: str) -> str:
    """``value``, or for ``sample_clips`` (as fine-tuning spells it) a temporary ``path,label``
    list of the sample clips, clip i labelled i."""
    from umt_fast.config import SAMPLE_CLIPS
    from umt_fast.data.sample_clips import write_sample_clip_list

    return demo_path(value, lambda directory: write_sample_clip_list(os.path.join(directory, "sample_clips.csv")),
                     SAMPLE_CLIPS)  # fmt: skip


class BestEvaluation:
    """``eval.keep_best``: the best of a run's evaluations so far by one score of its report. The
    report is kept as ``<run_dir>/<report>_best.json``, from which a resumed run takes the score
    to beat."""

    def __init__(self, run_dir: str, report_name: str, score: str, score_of: Callable[[dict], float]):
        root, ext = os.path.splitext(report_name)
        self.path, self.score, self.score_of = os.path.join(run_dir, f"{root}_best{ext}"), score, score_of
        self.best: float | None = None
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.best = score_of(json.load(f))

    def update(self, report: dict | None, info: DistInfo, save_model: Callable[[], None]) -> bool:
        """Collective: whether the main rank's ``report`` (None elsewhere, or where the evaluation
        read nothing) beats the best so far; if it does, ``save_model()`` runs on every rank (an
        export that may gather a sharded model) and the main rank writes the report."""
        from umt_fast.engine.checkpoint import atomic_write

        better = None
        if info.is_main and report is not None:
            value = self.score_of(report)
            better = self.best is None or value > self.best
        if info.distributed:
            better = all_gather_objects(better)[0]
        if not better:
            return False
        save_model()
        if info.is_main:
            atomic_write(self.path, lambda tmp: open(tmp, "w", encoding="utf-8").write(json.dumps(report, indent=2)))
            log.info("best evaluation so far (%s %.3f, before %s): wrote %s", self.score, value,
                     "none" if self.best is None else f"{self.best:.3f}", self.path)  # fmt: skip
            self.best = value
        return True


class EvaluatingRecipe(Recipe):
    """A recipe that evaluates data.test_list as it trains (at the steps `evaluation_due` names),
    keeps the best evaluation's model (eval.keep_best) and exports the model at the end.

    Subclasses name their files (``export_name``, ``best_export_name``, and ``naming`` for the
    log), define ``export(path)`` (collective) and ``evaluate(done, metrics)``, and set
    ``test_entries`` (None: no evaluation), ``steps_per_epoch``, ``best`` (a BestEvaluation or
    None) and ``report = None`` in ``build``.
    """

    export_name = best_export_name = naming = ""

    def export(self, path: str) -> str | None:
        """Collective: writes the model to ``path`` (from rank 0) and returns the path written."""
        raise NotImplementedError

    def evaluate(self, done: int, metrics) -> dict | None:
        """Collective: the report of the evaluation after step ``done`` (on the main rank)."""
        raise NotImplementedError

    def after_step(self, done: int, is_last: bool, metrics) -> None:
        if self.test_entries is None or not evaluation_due(self.cfg.eval, done, is_last, self.steps_per_epoch):
            return
        self.report = self.evaluate(done, metrics)
        if self.best is not None:
            path = os.path.join(self.cfg.run_dir, self.best_export_name)
            self.best.update(self.report, self.info, lambda: self.export(path))

    def finish(self, info: DistInfo) -> None:
        self.export_path = self.export(os.path.join(self.cfg.run_dir, self.export_name))
        if self.export_path:
            log.info("wrote %s (%s)", self.export_path, self.naming)

    def result(self, result: TrainResult) -> TrainResult:
        result.export_path = getattr(self, "export_path", None)
        result.eval_report = getattr(self, "report", None)
        return result


def evaluation_due(eval_cfg, done: int, is_last: bool, steps_per_epoch: int) -> bool:
    """Whether a run evaluates after optimizer step ``done``: at its last step, every
    ``eval_cfg.every_steps`` steps and at the end of every ``eval_cfg.every_epochs`` epochs."""
    every, epochs = eval_cfg.every_steps, eval_cfg.every_epochs
    return is_last or bool(every and done % every == 0) or bool(epochs and done % (epochs * steps_per_epoch) == 0)


def whole_model(model: torch.nn.Module, sharded: bool, build: Callable[[], torch.nn.Module], device: torch.device):
    """The model every rank of a training run evaluates with: the module itself (one process,
    DDP), or for an FSDP2-``sharded`` one (collective) a whole copy, ``build()`` loaded with the
    gathered weights, whose forward runs no collective, so the ranks can score shares of
    different sizes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from umt_fast.engine.distributed import unwrap

    if not sharded:
        return unwrap(model)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    copy = build()
    copy.load_state_dict(state)
    del state
    return copy.to(device)
