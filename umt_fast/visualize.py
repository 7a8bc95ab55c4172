"""See what the model sees: mask pictures, teacher attention and run reports, as PNG files.

    # a clip's frames, the teacher's CLS attention and the tokens each mask policy keeps
    python -m umt_fast.visualize mask clip.mp4 --preset umt_b16_k710 \\
        --teacher.weights clip_vit_b16_visual.pth --mask.ratio 0.8 --seed 0 --out mask.png

    # ... plus how well a trained student matches the teacher on the kept tokens
    python -m umt_fast.visualize mask clip.mp4 --checkpoint runs/demo/checkpoints/step_00000040

    # loss, lr, clips/s, data time, skipped samples and MFU of a run (and an HTML page)
    python -m umt_fast.visualize run runs/demo-20261126-063144 --html

    # a pytest-benchmark JSON as a bar chart
    python -m umt_fast.visualize bench RESULTS.json

Every command prints the files it wrote. A missing or unusable input is an error naming the
file, with exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m umt_fast.visualize",
        description="Pictures of masks, teacher attention, runs and benchmarks (PNG, optionally HTML).",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{mask,run,bench}")

    mask = commands.add_parser(
        "mask",
        usage=(
            "python -m umt_fast.visualize mask VIDEO [--preset NAME] [--config FILE] [--teacher.weights PATH] "
            "[--mask.ratio R] [--seed N] [--checkpoint PATH] [--out PNG] [--section.field VALUE ...]"
        ),
        help="a clip's frames, the teacher's CLS attention and each policy's kept tokens",
        description=(
            "One PNG: the clip's frames (the preset's TSN frames at the middle of each segment, centre "
            "crop), the teacher's CLS attention as a heat map, and the tokens that the attention, tube "
            "and random policies keep at --mask.ratio (kept tokens outlined, masked ones greyed). With "
            "--checkpoint, a last row shows how well that student matches the teacher on the kept tokens "
            "of --mask.policy.\n\nEvery option of python -m umt_fast.pretrain is accepted and applied the same "
            "way (preset, then --config, then --section.field), e.g. --teacher.weights, --mask.ratio, "
            "--data.num_frames, --train.device."
        ),
        allow_abbrev=False,
    )
    mask.add_argument("video", help="the video file")
    mask.add_argument("--preset", help="a pre-training preset (python -m umt_fast.pretrain --help lists them)")
    mask.add_argument("--config", metavar="FILE", help="a pre-training config file, e.g. a run's config.yaml")
    mask.add_argument("--seed", type=int, default=None,
                      help="seed of the masks (and of a random teacher's weights); default: train.seed")
    mask.add_argument("--checkpoint", metavar="PATH",
                      help="a pre-training checkpoint (RUN_DIR/checkpoints/step_N): adds the student-vs-teacher "
                           "row; without --preset or --config, RUN_DIR/config.yaml is used")
    mask.add_argument("--out", metavar="PNG", help="output file (default: <video name>_mask.png here)")
    _add_compact_option(mask)

    run = commands.add_parser(
        "run",
        help="loss, lr, clips/s, data time, skipped samples and MFU of a run's metrics.jsonl",
        description=(
            "One PNG from a run's metrics.jsonl: a panel per metric against the step, the wall time "
            "reached at each step tick on the top axis, resumes as red dashed lines. A step logged twice "
            "(after a resume) shows its later record; an unparsable (torn) line is skipped."
        ),
        allow_abbrev=False,
    )
    run.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, or its metrics.jsonl")
    run.add_argument("--out", metavar="PNG", help="output file (default: RUN_DIR/report.png)")
    run.add_argument("--html", action="store_true", help="also write a self-contained HTML page next to the PNG")
    _add_compact_option(run)

    bench = commands.add_parser(
        "bench",
        help="a pytest-benchmark JSON as a bar chart",
        description=(
            "One PNG from `pytest benchmarks/ --benchmark-json RESULTS.json`: mean time per benchmark with "
            "its standard deviation and throughput; a reference-style row (named reference, ref or "
            "baseline) is drawn in grey under the row it is the baseline of."
        ),
        allow_abbrev=False,
    )
    bench.add_argument("results", metavar="RESULTS.json")
    bench.add_argument("--out", metavar="PNG", help="output file (default: RESULTS.png next to it)")
    _add_compact_option(bench)
    return parser


def _add_compact_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compact", action="store_true",
                        help="5 bits per colour channel: about half the file size (e.g. for committing)")


def _split_config_options(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this command's own arguments, the --section.field options with their values)."""
    own, config = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            takes_next = "=" not in arg and i + 1 < len(argv)
            config += argv[i:i + 2] if takes_next else [arg]
            i += 2 if takes_next else 1
        else:
            own.append(arg)
            i += 1
    return own, config


def _default_out(path: str, suffix: str, here: bool) -> str:
    stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    return f"{stem}{suffix}" if here else os.path.join(os.path.dirname(os.path.abspath(path)), f"{stem}{suffix}")


def _device(name: str):
    """train.device (auto, cpu, cuda) -> a torch.device; one device, no process group."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available; use --train.device auto or cpu")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def mask_command(args: argparse.Namespace) -> list[str]:
    """Draw the mask figure of args.video; returns the written paths."""
    import torch

    from umt_fast.engine import checkpoint as ckpt
    from umt_fast.config import SAMPLE_CLIPS, build_config
    from umt_fast.data import VideoDecodeError
    from umt_fast.interop import build_teacher
    from umt_fast.models import build_student
    from umt_fast.viz.mask_figure import (
        MaskFigureInfo,
        compute_mask_views,
        describe_teacher,
        draw_mask_figure,
        load_eval_clip,
    )
    from umt_fast.viz.render import save_figure

    if not os.path.isfile(args.video):
        raise FileNotFoundError(f"{args.video}: no such video file")
    argv = list(args.config_argv)  # every option that is not mask's own: pretrain's, for build_config
    if args.checkpoint is not None:
        if not os.path.exists(args.checkpoint):
            raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such checkpoint")
        args.checkpoint = ckpt.resolve_checkpoint(args.checkpoint)  # a run directory: its newest checkpoint
        # <run_dir>/checkpoints/step_N -> <run_dir>/config.yaml
        run_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint))), "config.yaml")
        if os.path.isfile(run_config):
            from umt_fast.config.cli import load_config_dict

            stage = ckpt.run_stage(load_config_dict(run_config))
            if stage != "stage1":
                raise ValueError(f"--checkpoint {args.checkpoint} is {ckpt.STAGE_NAMES[stage]}; the mask figure's student "
                                 "row compares a stage-1 student with its teacher: pass a pre-training checkpoint, or "
                                 "leave --checkpoint out for the teacher's attention and the masks alone")  # fmt: skip
        if not any(a.split("=")[0] in ("--preset", "--config") for a in argv) and os.path.isfile(run_config):
            argv += ["--config", run_config]
    if not any(a.split("=")[0] in ("--data.train_list", "--data.train-list") for a in argv):
        argv += ["--data.train_list", SAMPLE_CLIPS]  # validation wants one; the figure reads only the video
    cfg = build_config(argv, prog="python -m umt_fast.visualize mask")
    seed = cfg.train.seed if args.seed is None else args.seed
    device = _device(cfg.train.device)

    try:
        clip = load_eval_clip(args.video, cfg.data.num_frames, cfg.data.img_size)
    except VideoDecodeError as exc:
        raise ValueError(str(exc)) from exc
    torch.manual_seed(seed)  # a random teacher's weights
    teacher = build_teacher(cfg).to(device)
    student = None
    if args.checkpoint is not None:
        state = ckpt.load_checkpoint(args.checkpoint)
        student = build_student(cfg, teacher_dim=teacher.arch.output_dim)
        try:
            student.load_state_dict(state["student"])
        except (RuntimeError, KeyError) as exc:
            raise ValueError(
                f"--checkpoint {args.checkpoint} does not hold a student of this config ({exc}); "
                "pass the run's config with --config RUN_DIR/config.yaml"
            ) from exc
        student = student.to(device).eval()
    views = compute_mask_views(
        clip.frames_THWC, teacher, ratio=cfg.mask.ratio, seed=seed,
        student=student, student_policy=cfg.mask.policy, device=device,
    )  # fmt: skip
    teacher_desc, random_teacher = describe_teacher(cfg.teacher.arch, cfg.teacher.input_resolution, cfg.teacher.weights)
    step = state.get("step") if args.checkpoint is not None else None
    info = MaskFigureInfo(
        clip_name=os.path.basename(args.video), frame_indices=clip.frame_indices,
        num_video_frames=clip.num_video_frames, teacher=teacher_desc, random_teacher=random_teacher,
        seed=seed, step=step,
    )  # fmt: skip
    out = args.out or _default_out(args.video, "_mask.png", here=True)
    save_figure(draw_mask_figure(views, info), out, compact=args.compact)
    return [out]


def run_command(args: argparse.Namespace) -> list[str]:
    from umt_fast.viz.render import save_figure
    from umt_fast.viz.run_report import draw_run_report, load_run_metrics, write_run_html

    metrics = load_run_metrics(args.run_dir)
    out = args.out or os.path.join(os.path.dirname(metrics.path), "report.png")
    save_figure(draw_run_report(metrics), out, compact=args.compact)
    written = [out]
    if args.html:
        written.append(write_run_html(metrics, out, os.path.splitext(out)[0] + ".html"))
    return written


def bench_command(args: argparse.Namespace) -> list[str]:
    from umt_fast.viz.bench_report import draw_bench_report, load_benchmarks
    from umt_fast.viz.render import save_figure

    rows, machine_info = load_benchmarks(args.results)
    out = args.out or _default_out(args.results, ".png", here=False)
    save_figure(draw_bench_report(rows, machine_info, title=os.path.basename(args.results)), out, compact=args.compact)
    return [out]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    own, config_argv = _split_config_options(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    if args.command == "mask":
        args.config_argv = config_argv + [a for name in ("preset", "config") if getattr(args, name)
                                          for a in (f"--{name}", getattr(args, name))]  # fmt: skip
    elif config_argv:
        parser.error(f"unrecognized arguments: {' '.join(config_argv)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.command == "mask":
            written = mask_command(args)
        elif args.command == "run":
            written = run_command(args)
        else:
            written = bench_command(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
