"""Multi-view evaluation of a video classifier (UMT_SPEC.md section 3, "Test").

Every video is seen as ``num_clips`` temporal clips x ``num_crops`` spatial crops (short side
resized to the input size, crops along the long side); the softmax scores of its views are
averaged. Reports top-1 / top-5, per-class accuracy and the worst classes with what they are
mistaken for, as JSON and as a table.

    # a fine-tuning run (its newest checkpoint) or a classifier file, on an annotation list
    python -m umt_fast.evaluate --checkpoint runs/ft_b16_k400 --list k400_val.csv --root /data/k400 \\
        --class-names k400_classes.txt --num-clips 4 --num-crops 3 --out eval_k400.json

    # one video: its top-5 labels
    python -m umt_fast.evaluate --checkpoint umt_b16_k400.safetensors --video clip.mp4 \\
        --class-names k400_classes.txt --num-frames 8 --img-size 224

Unreadable videos are skipped, listed in the report and on stderr, and left out of the accuracy.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from umt_fast.config import SAMPLE_CLIPS
from umt_fast.data.annotations import read_labelled_list
from umt_fast.engine.checkpoint import atomic_write, check_writable
from umt_fast.data.labelled import read_class_names
from umt_fast.models.classifier import VideoViT
from umt_fast.recipes.evaluation import (  # noqa: F401 (the library's names, importable from the command too)
    Predictions,
    accuracy_report,
    autocast_for,
    class_name,
    format_report,
    init_evaluation,
    load_classifier,
    predict_videos,
    progress_printer,
    resolve_device,
    sample_clips_path,
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "retrieval":  # zero-shot video-text retrieval of a stage-2 model
        from umt_fast.recipes.retrieval import main as retrieval_main

        return retrieval_main(argv[1:], prog="python -m umt_fast.evaluate retrieval")
    if argv and argv[0] == "zeroshot":  # zero-shot classification by class-name prompts
        from umt_fast.recipes.zeroshot import main as zeroshot_main

        return zeroshot_main(argv[1:])
    if argv and argv[0] == "mc":  # multiple-choice video-text retrieval (MSRVTT-MC)
        from umt_fast.recipes.retrieval_mc import main as mc_main

        return mc_main(argv[1:])
    if argv and argv[0] == "qa":  # open-ended video question answering (MSRVTT-QA, MSVD-QA, ActivityNet-QA)
        from umt_fast.recipes.qa import main as qa_main

        return qa_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m umt_fast.evaluate",
        description="Multi-view top-1/top-5 of a video classifier on an annotation list, or the top-5 labels of one "
        "video. `python -m umt_fast.evaluate retrieval --help`: zero-shot video-text retrieval; `... zeroshot --help`: "
        "zero-shot classification; `... mc --help`: multiple-choice video-text retrieval (MSRVTT-MC); `... qa --help`: "
        "open-ended video question answering (MSRVTT-QA, MSVD-QA, ActivityNet-QA).",
    )
    parser.add_argument("--checkpoint", required=True, help="a fine-tuning run dir or checkpoint, an export, or a reference fine-tuned file")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", help="annotation list of 'path,label' lines; 'sample_clips' = the sample clips, "
                      "labelled by their index")  # fmt: skip
    what.add_argument("--video", help="one video file: print its top-5 labels")
    parser.add_argument("--root", default="", help="prefix for relative paths in --list")
    parser.add_argument("--class-names", default="", help="file with one class name per line (line i = label i)")
    parser.add_argument("--num-clips", type=int, default=4, help="temporal clips per video (default 4)")
    parser.add_argument("--num-crops", type=int, choices=(1, 3), default=3, help="spatial crops per clip (default 3)")
    parser.add_argument("--num-frames", type=int, default=None, help="frames per clip (default: the checkpoint's, else 8)")
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: the checkpoint's, else 224)")
    parser.add_argument("--patch-size", type=int, default=None, help="patch size (default: the checkpoint's, else 16)")
    parser.add_argument("--batch-size", type=int, default=16, help="views per forward pass")
    parser.add_argument("--num-workers", type=int, default=2, help="decoding worker processes")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 autocast on a GPU")
    parser.add_argument("--out", default="", help="write the report as JSON here (with --list)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.num_clips < 1:
            raise ValueError(f"--num-clips={args.num_clips} must be >= 1")
        if args.out:
            check_writable(args.out, "--out")  # before any decoding
        device = resolve_device(args.device)  # before the weights are read: a bad --device is named first
        model, known = load_classifier(args.checkpoint, args.num_frames, args.img_size, args.patch_size)
        if model.arch.num_classes == 0:
            raise ValueError(
                f"--checkpoint {args.checkpoint} holds an encoder without a classification head (a pre-trained "
                "model); fine-tune it first (python -m umt_fast.finetune), or extract features (python -m umt_fast.extract)"
            )
        names = read_class_names(args.class_names) if args.class_names else known.get("class_names")
        if names is not None and len(names) != model.arch.num_classes:
            raise ValueError(f"{len(names)} class names, but the classifier has {model.arch.num_classes} classes")
        if args.video:
            return _predict_one(model.to(device), args, device, names)
        records = read_labelled_list(sample_clips_path(args.list), args.root, model.arch.num_classes, "--list")
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info = init_evaluation(args.device)  # under torchrun: each rank on its own GPU, scoring its share
    model = model.to(info.device)
    preds = predict_videos(
        model, [r.path for r in records], num_clips=args.num_clips, num_crops=args.num_crops, batch_size=args.batch_size,
        device=info.device, precision=args.precision, num_workers=args.num_workers,
        on_video=progress_printer("evaluated", info), info=info,
    )  # fmt: skip
    if not info.is_main:  # the main rank reports; every rank holds the merged results
        return 0
    label_of = {r.path: r.label for r in records}
    labels = torch.tensor([label_of[p] for p in preds.paths], dtype=torch.long)
    report = accuracy_report(preds.probs, labels, names)
    report.update(
        checkpoint=os.path.abspath(args.checkpoint), list=args.list if args.list == SAMPLE_CLIPS else os.path.abspath(args.list),
        num_clips=args.num_clips, num_crops=args.num_crops, views_per_video=preds.views_per_video, num_frames=model.arch.num_frames,
        img_size=model.arch.img_size, unreadable=[{"path": p, "reason": r} for p, r in preds.failed],
    )  # fmt: skip
    print(format_report(report, preds.failed))
    for path, reason in preds.failed:
        print(f"unreadable video skipped: {path}: {reason}", file=sys.stderr)
    if args.out:
        atomic_write(args.out, lambda tmp: open(tmp, "w", encoding="utf-8").write(json.dumps(report, indent=2)))
        print(f"wrote {args.out}")
    return 0


def _predict_one(model: VideoViT, args: argparse.Namespace, device: torch.device, names: list[str] | None) -> int:
    preds = predict_videos(model, [args.video], num_clips=args.num_clips, num_crops=args.num_crops,
                           batch_size=args.batch_size, device=device, precision=args.precision)  # fmt: skip
    if preds.failed:
        print(f"error: cannot read {args.video}: {preds.failed[0][1]}", file=sys.stderr)
        return 2
    scores, labels = preds.probs[0].topk(min(5, preds.probs.shape[1]))
    print(f"{args.video} ({preds.views_per_video} views):")
    for rank, (score, label) in enumerate(zip(scores.tolist(), labels.tolist()), start=1):
        print(f"  {rank}. {class_name(names, label):<40} {100 * score:6.2f} %")
    return 0


def __getattr__(name: str):
    """The library's names (``build_model``, ...) stay importable from the command, loaded on first use."""
    import importlib

    try:
        return getattr(importlib.import_module("umt_fast.recipes.evaluation"), name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


if __name__ == "__main__":
    sys.exit(main())
