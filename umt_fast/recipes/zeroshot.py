"""Zero-shot video classification with a stage-2 model (InternVideo2's ``zero_shot`` evaluation):
``python -m umt_fast.evaluate zeroshot``.

Every class name goes through the prompt templates; a class's embedding is the normalised mean
of its prompts' unit VTC embeddings. A video's score for a class is the VTC similarity that
retrieval uses (the mean over frames of the per-frame cosine similarity); its prediction is the
best-scoring class. Reported: top-1 and top-5 over the readable videos of a labelled list.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from umt_fast.engine.distributed import gather_by_index
from umt_fast.recipes.evaluation import demo_path, sample_clips_path
from umt_fast.recipes.retrieval import (
    encode_texts,
    encode_videos,
    init_evaluation,
    load_shard,
    load_stage2_model,
    progress_printer,
    run_input_size,
    vtc_similarity,
)

DEFAULT_TEMPLATES = ("{}", "a video of {}.", "a video of a person {}.")


def class_embeddings(model, tokenizer, class_names: list[str], templates: list[str], device, max_len: int = 32,
                     autocast_dtype=None) -> torch.Tensor:  # fmt: skip
    """[C, E] unit vectors: per class, the normalised mean of its prompts' unit embeddings."""
    prompts = [t.format(name) for name in class_names for t in templates]
    _, _, feats = encode_texts(model, tokenizer, prompts, device, max_len, autocast_dtype=autocast_dtype)
    return F.normalize(feats.view(len(class_names), len(templates), -1).mean(1), dim=-1)


def zeroshot_scores(model, tokenizer, videos: list[torch.Tensor], class_names: list[str], templates: list[str], device,
                    batch_size: int = 8, max_len: int = 32, autocast_dtype=None) -> torch.Tensor:  # fmt: skip
    """[V, C]: every video's VTC similarity to every class."""
    _, frame_feat = encode_videos(model, videos, device, batch_size, autocast_dtype)
    text = class_embeddings(model, tokenizer, class_names, templates, device, max_len, autocast_dtype)
    return vtc_similarity(text, frame_feat).T


def topk_accuracy(scores_VC: torch.Tensor, labels_V: torch.Tensor) -> dict[str, float]:
    ranked = scores_VC.argsort(dim=1, descending=True, stable=True)  # equal scores: the lower class first
    hit = ranked == labels_V[:, None]
    return {"top1": 100.0 * hit[:, :1].any(1).float().mean().item(),
            "top5": 100.0 * hit[:, :5].any(1).float().mean().item(), "videos": len(labels_V)}  # fmt: skip


def write_demo_class_names(directory: str) -> str:
    """``demo_classes.txt`` in ``directory``: the first built-in caption of each sample clip, in
    clip order (``--list sample_clips`` labels clip i with i)."""
    from umt_fast.data.captions import demo_video_entries

    path = os.path.join(directory, "demo_classes.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(e["caption"][0] + "\n" for e in demo_video_entries())
    return path


def main(argv: list[str] | None = None, prog: str = "python -m umt_fast.evaluate zeroshot") -> int:
    from umt_fast.data.annotations import read_labelled_list
    from umt_fast.data.labelled import read_class_names
    from umt_fast.engine.checkpoint import atomic_write, check_writable

    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", "--weights", dest="weights", required=True,
                   help="stage-2 weights: a reference-format file, a stage-2 run directory or one of its checkpoints")
    p.add_argument("--text-weights", required=True, help="the local BERT folder used in training ('minilm' = the bundled one)")
    p.add_argument("--list", required=True, help="labelled list ('path,label' lines), as for fine-tuning; "
                   "'sample_clips' = the sample clips, labelled by their index")  # fmt: skip
    p.add_argument("--class-names", required=True, help="one class name per line (line i = label i); 'demo' = "
                   "each sample clip's first built-in caption")  # fmt: skip
    p.add_argument("--templates", default="", help="prompt templates, one per line with {} for the class name "
                   f"(default: {' | '.join(DEFAULT_TEMPLATES)})")
    p.add_argument("--root", default="", help="directory relative paths are resolved against")
    p.add_argument("--num-frames", type=int, default=None, help="default: the run's, else 4")
    p.add_argument("--img-size", type=int, default=None, help="default: the run's, else 224")
    p.add_argument("--max-len", type=int, default=32, help="prompt tokens; default 32")
    p.add_argument("--batch-size", type=int, default=8, help="videos per forward; default 8")
    p.add_argument("--num-workers", type=int, default=2, help="decoding worker processes (0 = in this one); default 2")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", default="", help="write the report as JSON here")
    args = p.parse_args(argv)
    try:
        if args.out:
            check_writable(args.out, "--out")
        if args.num_workers < 0:
            raise ValueError(f"--num-workers={args.num_workers} must be >= 0")
        names = read_class_names(demo_path(args.class_names, write_demo_class_names))
        templates = list(DEFAULT_TEMPLATES)
        if args.templates:
            templates = [t.strip() for t in open(args.templates, encoding="utf-8") if t.strip()]
            bad = [t for t in templates if "{}" not in t]
            if not templates or bad:
                raise ValueError(f"--templates {args.templates}: every line needs {{}} for the class name"
                                 + (f" (not {bad[0]!r})" if bad else ""))  # fmt: skip
        records = read_labelled_list(sample_clips_path(args.list), args.root, len(names), "--list")
        run_frames, run_size = run_input_size(args.weights)
        num_frames, img_size = args.num_frames or run_frames or 4, args.img_size or run_size or 224
        model, tokenizer = load_stage2_model(args.weights, args.text_weights, num_frames, img_size)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    entries = [{"path": r.path, "media": "video", "captions": [], "label": r.label} for r in records]
    info = init_evaluation(args.device)
    shard = load_shard(entries, num_frames, img_size, info, progress_printer("read", info), args.num_workers)
    entries, failed = shard.entries, shard.failed
    if not entries:
        print(f"error: {args.list}: none of its {len(failed)} videos could be read", file=sys.stderr)
        return 2
    device, dtype = info.device, torch.bfloat16 if info.device.type == "cuda" else None
    model = model.to(device).eval()
    own = {}  # position in entries -> the video's [C] scores, for this rank's share
    if shard.videos:
        scores = zeroshot_scores(model, tokenizer, shard.videos, names, templates, device, args.batch_size,
                                 args.max_len, dtype).cpu()  # fmt: skip
        own = dict(zip(shard.positions, scores))
    scores = torch.stack(list(gather_by_index(own, info).values()))
    if not info.is_main:  # the main rank reports; every rank holds the merged results
        return 0
    report = topk_accuracy(scores, torch.tensor([e["label"] for e in entries]))
    print(f"zero-shot top-1 {report['top1']:.1f} %, top-5 {report['top5']:.1f} % on {report['videos']} videos, "
          f"{len(names)} classes, {len(templates)} templates")  # fmt: skip
    if failed:
        print(f"{len(failed)} unreadable video(s) skipped", file=sys.stderr)
    if args.out:
        report.update(num_frames=num_frames, img_size=img_size, templates=templates,
                      unreadable=[{"path": p, "reason": r} for p, r in failed])  # fmt: skip
        atomic_write(args.out, lambda tmp: open(tmp, "w").write(json.dumps(report, indent=2)))
        print(f"wrote {args.out}")
    return 0
