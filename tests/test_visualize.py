"""Figures (mask, run report, benchmarks), their CLI, the metrics sinks, and the figures written
during pre-training, on the real sample clips and the demo's tiny models."""
import glob
import json
import os
import time
import random

import numpy as np
import pytest
import torch
from PIL import Image

from umt_fast.engine import checkpoint as ckpt
from umt_fast.config import build_config, get_preset
from umt_fast.data import sample_clip_paths
from umt_fast.masking import num_visible, sample_visible_tokens
from umt_fast.interop import build_teacher
from umt_fast.models import build_student
from umt_fast.pretrain import main as pretrain_main
from umt_fast.engine.metrics import build_metrics_sinks, read_metrics
from umt_fast.visualize import main
from umt_fast.viz import overlay
from umt_fast.viz.bench_report import bench_figure_size, load_benchmarks, order_rows
from umt_fast.viz.mask_figure import (
    MaskFigureInfo,
    compute_mask_views,
    describe_teacher,
    draw_mask_figure,
    load_eval_clip,
    mask_figure_size,
    title_lines,
)
from umt_fast.viz.render import render_rgb, save_figure
from umt_fast.viz.run_report import draw_run_report, load_run_metrics, run_figure_size
from umt_fast.viz.training import MaskFigureReporter, mask_figure_path

# The demo preset at 64 px (a 4x4 token grid) with one-step logging, for speed.
SMALL = ["--data.img_size", "64", "--teacher.input_resolution", "64", "--log.every_steps", "1"]
RED = np.array([200, 30, 30], dtype=np.uint8)
MIN_PIXEL_STD = 10.0  # a blank or single-colour picture has ~0


def _png(path):
    """(width, height, pixels [H, W, 3]) of a PNG file."""
    image = Image.open(path).convert("RGB")
    return image.width, image.height, np.asarray(image)


def _assert_not_blank(pixels):
    assert pixels.astype(np.float32).std() > MIN_PIXEL_STD


# ---------------------------------------------------------------- token overlays, read back from pixels


def _cells_read_back(image_HWC, grid):
    """From an overlay of a plain RED frame: (kept cells, greyed cells, outlined cells), each a set of
    patch indices, read from each cell's centre pixel and top-left corner pixel."""
    cell = image_HWC.shape[0] // grid
    kept, greyed, outlined = set(), set(), set()
    for p in range(grid * grid):
        row, col = divmod(p, grid)
        centre = image_HWC[row * cell + cell // 2, col * cell + cell // 2]
        corner = image_HWC[row * cell, col * cell]
        if (centre == RED).all():
            kept.add(p)
        elif centre[0] == centre[1] == centre[2]:
            greyed.add(p)
        if tuple(corner) == overlay.KEPT_OUTLINE_RGB:
            outlined.add(p)
    return kept, greyed, outlined


@pytest.mark.parametrize("policy", ["random", "tube"])
def test_mask_overlay_marks_exactly_the_tokens_the_mask_returned(policy):
    T, grid, side = 3, 7, 112
    P = grid * grid
    idx = sample_visible_tokens(policy, batch_size=1, num_frames=T, patches_per_frame=P, ratio=0.8, seed=3,
                                offset=5, device=torch.device("cpu"))[0].numpy()
    kept_Tgg = overlay.visible_token_grid(idx, T, grid)
    frame = np.broadcast_to(RED, (side, side, 3)).copy()
    read_back = set()
    for t in range(T):
        image = overlay.mask_overlay(frame, kept_Tgg[t])
        kept, greyed, outlined = _cells_read_back(image, grid)
        assert kept == outlined, "every kept cell is outlined, no masked cell is"
        assert kept.isdisjoint(greyed) and len(kept) + len(greyed) == P
        read_back |= {t * P + p for p in kept}
    assert read_back == set(idx.tolist())
    assert len(read_back) == len(idx) == (T * num_visible(P, 0.8) if policy == "tube" else num_visible(T * P, 0.8))


def test_value_overlay_greys_masked_tokens_and_outlines_kept_ones():
    grid = 4
    values = np.full((grid, grid), np.nan, dtype=np.float32)
    values[0, 1], values[2, 3], values[3, 0] = 0.0, 0.5, 1.0
    frame = np.broadcast_to(RED, (64, 64, 3)).copy()
    image = overlay.token_value_overlay(frame, values, vmin=0.0, vmax=1.0)
    _, greyed, outlined = _cells_read_back(image, grid)
    assert outlined == {1, 11, 12}
    assert greyed == set(range(16)) - {1, 11, 12}


def test_attention_heatmap_is_brightest_where_the_teacher_looks():
    grid = 4
    frame = np.full((64, 64, 3), 128, dtype=np.uint8)
    attn = np.full((grid, grid), 0.2)
    attn[1, 2] = 1.0
    image = overlay.attention_heatmap(frame, attn, vmax=1.0)
    cell_luma = overlay.luma(image).reshape(grid, 16, grid, 16).mean(axis=(1, 3))
    assert np.unravel_index(cell_luma.argmax(), cell_luma.shape) == (1, 2)


def test_overlay_rejects_a_frame_that_does_not_split_into_the_grid():
    with pytest.raises(ValueError, match="7x7"):
        overlay.mask_overlay(np.zeros((100, 100, 3), np.uint8), np.ones((7, 7), bool))


# ---------------------------------------------------------------- the mask figure


@pytest.fixture(scope="module")
def demo_models():
    cfg = get_preset("demo")
    torch.manual_seed(0)
    teacher = build_teacher(cfg)
    student = build_student(cfg, teacher_dim=teacher.arch.output_dim).eval()
    return cfg, teacher, student


def test_eval_clip_uses_the_presets_sampling_deterministically():
    path = sample_clip_paths()[1]  # bikes.mp4: 640x272, 250 frames
    clip = load_eval_clip(path, num_frames=4, img_size=112)
    assert clip.frames_THWC.shape == (4, 112, 112, 3) and clip.frames_THWC.dtype == torch.uint8
    assert clip.frame_indices == [31, 93, 156, 218]  # middle of each TSN segment
    again = load_eval_clip(path, num_frames=4, img_size=112)
    assert torch.equal(clip.frames_THWC, again.frames_THWC)


def test_mask_figure_of_a_sample_clip(demo_models, tmp_path):
    cfg, teacher, student = demo_models
    clip = load_eval_clip(sample_clip_paths()[0], cfg.data.num_frames, cfg.data.img_size)
    views = compute_mask_views(clip.frames_THWC, teacher, ratio=0.8, seed=0, student=student)
    T, P = 4, 49
    assert views.cls_attn_TP.shape == (T, P) and views.grid == 7
    assert {k: len(v) for k, v in views.visible.items()} == {"attention": T * 10, "tube": T * 10, "random": 40}
    assert views.student_policy == "attention" and views.student_cos_N.shape == (T * 10,)
    assert np.all(np.abs(views.student_cos_N) <= 1 + 1e-5)

    teacher_desc, random_teacher = describe_teacher("tiny", 112, "none")
    info = MaskFigureInfo("bigbuckbunny.mp4", clip.frame_indices, clip.num_video_frames, teacher_desc,
                          random_teacher, seed=0)
    titles = title_lines(info, views)
    assert any("RANDOM TEACHER" in text for text, _ in titles)
    out = tmp_path / "mask.png"
    save_figure(draw_mask_figure(views, info), str(out))
    width, height, pixels = _png(out)
    # frames, attention, three policies, student
    assert (width, height) == mask_figure_size(T, 112, num_rows=6, num_title_lines=len(titles))
    _assert_not_blank(pixels)

    # with real weights the title does not warn
    _, real = describe_teacher("vit_b16", 224, "clip_b16.pth")
    assert not any("RANDOM" in text for text, _ in title_lines(MaskFigureInfo("x", [0], 1, "t", real, 0), views))


def test_mask_views_do_not_touch_the_global_rng(demo_models):
    cfg, teacher, student = demo_models
    clip = torch.randint(0, 256, (4, 112, 112, 3), dtype=torch.uint8)
    before = torch.get_rng_state()
    first = compute_mask_views(clip, teacher, ratio=0.8, seed=1, student=student)
    assert torch.equal(torch.get_rng_state(), before)
    second = compute_mask_views(clip, teacher, ratio=0.8, seed=1, student=student)
    for policy in first.visible:
        assert np.array_equal(first.visible[policy], second.visible[policy])


def test_mask_cli_writes_a_png_and_reports_bad_input(tmp_path, capsys):
    out = tmp_path / "bikes_mask.png"
    assert main(["mask", sample_clip_paths()[1], "--out", str(out), "--seed", "3", "--mask.ratio", "0.5"] + SMALL) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    width, height, pixels = _png(out)
    assert (width, height) == mask_figure_size(4, 64, num_rows=5, num_title_lines=3)
    _assert_not_blank(pixels)

    assert main(["mask", str(tmp_path / "missing.mp4")]) == 2
    assert "missing.mp4" in capsys.readouterr().err
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("not a video")
    assert main(["mask", str(not_a_video)]) == 2
    assert "notes.mp4" in capsys.readouterr().err
    assert main(["mask", sample_clip_paths()[1], "--mask.ratio", "1.5"]) == 2
    assert "mask.ratio" in capsys.readouterr().err


# ---------------------------------------------------------------- the run report


def _write_resumed_run(path, torn_last_line=True):
    """Steps 1-6, killed, resumed from the step-4 checkpoint, steps 5-8 again (with new losses)."""
    lines = [{"step": s, "loss": 2.0 - 0.1 * s, "lr": 1e-3, "clips/s": 10.0, "data_time": 0.01,
              "data/skipped": 0, "epoch": s - 1, "time": 1000.0 + s} for s in range(1, 7)]
    lines.append({"event": "resume", "step": 4, "checkpoint": "checkpoints/step_00000004.pt"})
    lines += [{"step": s, "loss": 1.0 - 0.05 * s, "lr": 1e-3, "clips/s": 12.0, "data_time": 0.02,
               "data/skipped": 1, "epoch": s - 1, "time": 2000.0 + s, "mfu": 0.4} for s in range(5, 9)]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if torn_last_line:
        text += '{"step": 9, "loss": 0.5'
    path.write_text(text)


def test_run_report_keeps_the_later_record_of_a_repeated_step(tmp_path):
    _write_resumed_run(tmp_path / "metrics.jsonl")
    metrics = load_run_metrics(str(tmp_path))
    assert metrics.steps.tolist() == list(range(1, 9))
    assert metrics.values["loss"][4] == pytest.approx(1.0 - 0.05 * 5)  # step 5 from after the resume
    assert metrics.values["loss"][3] == pytest.approx(2.0 - 0.1 * 4)  # step 4 from before it
    assert metrics.resume_steps == [4]
    assert metrics.num_superseded == 2 and metrics.num_unparsable == 1
    assert np.isnan(metrics.values["mfu"][0]) and metrics.values["mfu"][-1] == pytest.approx(0.4)
    assert np.all(np.diff(metrics.wall_s) >= 0) and metrics.wall_s[-1] == pytest.approx(1007.0)

    fig = draw_run_report(metrics)
    pixels = render_rgb(fig)
    assert pixels.shape[:2][::-1] == run_figure_size(6)  # loss, lr, clips/s, data_time, data/skipped, mfu
    _assert_not_blank(pixels)


def test_run_report_of_a_finetuning_and_a_stage2_run(tmp_path):
    """Fine-tuning logs its evaluation at the step of a training record: both kept, no step counted
    as repeated; top-1 and the stage-2 terms get panels."""
    lines = []
    for s in range(1, 5):
        lines.append({"step": s, "loss": 2.0 - 0.1 * s, "train/top1": 10.0 * s, "lr": 1e-3, "clips/s": 8.0,
                      "uta": 0.5, "vtc": 1.0, "vtm": 0.7, "mlm": 3.0, "time": 100.0 + s})  # fmt: skip
        if s % 2 == 0:
            lines.append({"step": s, "eval/top1": 20.0 * s, "eval/top5": 100.0, "time": 100.5 + s})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    metrics = load_run_metrics(str(tmp_path))
    assert metrics.steps.tolist() == [1, 2, 3, 4] and metrics.num_superseded == 0
    assert metrics.values["loss"].tolist() == pytest.approx([1.9, 1.8, 1.7, 1.6])
    assert np.isnan(metrics.values["eval/top1"][0]) and metrics.values["eval/top1"][3] == 80.0
    for key in ("train/top1", "eval/top1", "uta", "vtc", "vtm", "mlm"):
        assert key in metrics.values, key
    assert render_rgb(draw_run_report(metrics)).shape[:2][::-1] == run_figure_size(9)


def test_run_cli_writes_png_and_html(tmp_path, capsys):
    _write_resumed_run(tmp_path / "metrics.jsonl")
    assert main(["run", str(tmp_path), "--html"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'report.png'}" in out and "report.html" in out
    width, height, pixels = _png(tmp_path / "report.png")
    assert (width, height) == run_figure_size(6)
    _assert_not_blank(pixels)
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page and "resumed at steps: 4" in page


def test_run_report_errors_name_the_file(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["run", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert main(["run", str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty / "metrics.jsonl") in err and "empty" in err

    partial = tmp_path / "partial.jsonl"  # only a resume event and a torn line
    partial.write_text('{"event": "resume", "step": 4}\n{"step": 5, "lo')
    with pytest.raises(ValueError, match="no metrics record.*1 unparsable"):
        load_run_metrics(str(partial))

    torn = tmp_path / "torn"
    torn.mkdir()
    _write_resumed_run(torn / "metrics.jsonl", torn_last_line=True)
    assert main(["run", str(torn)]) == 0


# ---------------------------------------------------------------- the benchmark chart


def test_bench_cli_draws_reference_rows_beside_ours(tmp_path, capsys):
    def bench(name, mean, **extra):
        return {"name": name, "group": None, "stats": {"mean": mean, "stddev": mean / 20, "rounds": 5},
                "extra_info": extra}

    results = tmp_path / "results.json"
    results.write_text(json.dumps({"machine_info": {"node": "ci"}, "benchmarks": [
        bench("test_sampling_reference[512-196-40]", 4e-3, rows_per_s=1.2e5),
        bench("test_kernel[gather_rows-reference_system]", 9e-3, impl="reference_system", GBps=20.0),
        bench("test_step_throughput", 0.4, clips_per_s=9.7),
        bench("test_kernel[gather_rows-triton]", 1e-3, impl="triton", GBps=180.0),
        bench("test_kernel[gather_rows-reference]", 3e-3, impl="reference", GBps=60.0),
        bench("test_sampling_throughput[512-196-40]", 2e-3, rows_per_s=2.4e5),
    ]}))
    rows, _ = load_benchmarks(str(results))
    # same operation together, ours first; groups in order of first appearance
    assert [r.name for r in order_rows(rows)] == [
        "test_kernel[gather_rows-triton]", "test_kernel[gather_rows-reference_system]",
        "test_kernel[gather_rows-reference]",
        "test_step_throughput",
        "test_sampling_throughput[512-196-40]", "test_sampling_reference[512-196-40]",
    ]
    assert [r.is_reference for r in order_rows(rows)] == [False, True, True, False, False, True]
    assert main(["bench", str(results)]) == 0
    width, height, pixels = _png(tmp_path / "results.png")
    assert (width, height) == bench_figure_size(num_rows=6, num_groups=3)
    _assert_not_blank(pixels)

    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["bench", str(bad)]) == 2
    assert "bad.json" in capsys.readouterr().err


# ---------------------------------------------------------------- metrics sinks


def _records(steps):
    return [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "clips/s": 5.0, "data/skipped": 0, "time": 100.0 + s}
            for s in steps]


def test_tensorboard_sink_events_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sinks = build_metrics_sinks(str(tmp_path), tensorboard=True)
    for record in _records(range(1, 4)):
        sinks.write(record)
    sinks.write({"event": "resume", "step": 3})
    sinks.write_image("mask_figure", np.full((40, 60, 3), 90, np.uint8), step=3)
    sinks.close()
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3, 3]

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"loss", "lr", "clips/s", "data/skipped"} <= set(events.Tags()["scalars"])
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, 0.333333)]
    assert [e.wall_time for e in events.Scalars("loss")] == [101.0, 102.0, 103.0]
    assert [(e.step, e.width, e.height) for e in events.Images("mask_figure")] == [(3, 60, 40)]


def test_wandb_sink_writes_an_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'umt_fast[wandb]')")
    wandb_dir = tmp_path / "wandb_home"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sinks = build_metrics_sinks(str(run_dir), wandb_project="umt-fast-test", config={"train": {"seed": 0}})
    for record in _records(range(1, 4)):
        sinks.write(record)
    sinks.write_image("mask_figure", np.full((40, 60, 3), 90, np.uint8), step=3)
    sinks.close()

    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    offline = glob.glob(str(wandb_dir / "wandb" / f"offline-run-*-{run_id}"))
    assert len(offline) == 1, os.listdir(wandb_dir / "wandb")
    log_file = os.path.join(offline[0], f"run-{run_id}.wandb")
    deadline = time.time() + 60  # wandb's service may still be flushing the file after finish() returns
    while b"loss" not in open(log_file, "rb").read() and time.time() < deadline:
        time.sleep(0.2)
    assert b"loss" in open(log_file, "rb").read()
    assert glob.glob(os.path.join(offline[0], "files", "media", "images", "mask_figure_*.png"))


def test_a_missing_logging_package_is_a_clear_error_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # as if not installed
    run_dir = tmp_path / "run"
    assert pretrain_main(["--run-dir", str(run_dir), "--log.wandb", "my-project"] + SMALL) == 2
    err = capsys.readouterr().err
    assert "log.wandb='my-project'" in err and "pip install" in err
    assert not run_dir.exists()


# ---------------------------------------------------------------- figures written by pre-training


def test_pretraining_writes_mask_figures_without_changing_the_losses(tmp_path):
    args = SMALL + ["--train.max_steps", "4", "--checkpoint.every_steps", "2"]
    plain, with_figures = tmp_path / "plain", tmp_path / "figures"
    assert pretrain_main(["--run-dir", str(plain), "--log.mask_figure_every_steps", "0"] + args) == 0
    assert pretrain_main(["--run-dir", str(with_figures), "--log.mask_figure_every_steps", "2",
                          "--log.tensorboard", "true"] + args) == 0

    def losses(run_dir):
        return {r["step"]: r["loss"] for r in read_metrics(str(run_dir / "metrics.jsonl")) if "loss" in r}

    assert losses(with_figures) == losses(plain)  # exactly
    assert not (plain / "figures").exists()
    pngs = sorted(glob.glob(str(with_figures / "figures" / "*.png")))
    assert pngs == [mask_figure_path(str(with_figures), 2), mask_figure_path(str(with_figures), 4)]
    for png in pngs:
        width, height, pixels = _png(png)
        # frames, attention, three policies, student agreement; 3 title lines (random teacher)
        assert (width, height) == mask_figure_size(4, 64, num_rows=6, num_title_lines=3)
        _assert_not_blank(pixels)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(with_figures / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Images("mask_figure")] == [2, 4]

    # the run's checkpoint and config give the CLI's student row
    out = tmp_path / "from_checkpoint.png"
    checkpoint = ckpt.checkpoint_path(str(with_figures), 4)
    assert main(["mask", sample_clip_paths()[0], "--checkpoint", checkpoint, "--out", str(out)]) == 0
    assert _png(out)[:2] == mask_figure_size(4, 64, num_rows=6, num_title_lines=3)


class _ImageSink:
    def __init__(self):
        self.images = []

    def write_image(self, tag, image_HWC, step):
        self.images.append((tag, image_HWC.shape, step))


def test_drawing_leaves_every_rng_stream_and_the_train_mode_as_they_were(demo_models, tmp_path):
    cfg, teacher, student = demo_models
    cfg = build_config(["--run-dir", str(tmp_path), "--log.mask_figure_every_steps", "5"])
    reporter = MaskFigureReporter(cfg, sample_clip_paths(), teacher, student, torch.device("cpu"), None)
    student.train()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    before = ckpt.rng_state()
    sink = _ImageSink()
    assert reporter.maybe_write(4, sink) is None  # not due
    assert reporter.maybe_write(5, sink) == mask_figure_path(str(tmp_path), 5)
    after = ckpt.rng_state()
    assert torch.equal(before["torch"], after["torch"]) and before["python"] == after["python"]
    assert all(np.array_equal(a, b) for a, b in zip(before["numpy"], after["numpy"]))
    assert student.training
    assert sink.images == [("mask_figure", _png(mask_figure_path(str(tmp_path), 5))[2].shape, 5)]
    student.eval()


def test_a_figure_that_fails_to_draw_only_warns(tmp_path, monkeypatch):
    import umt_fast.viz.mask_figure as mask_figure

    def broken(*args, **kwargs):
        raise RuntimeError("no ink")

    monkeypatch.setattr(mask_figure, "draw_mask_figure", broken)
    run_dir = tmp_path / "run"
    assert pretrain_main(["--run-dir", str(run_dir), "--train.max_steps", "2",
                          "--log.mask_figure_every_steps", "1"] + SMALL) == 0
    log_text = (run_dir / "log.txt").read_text()
    assert "could not draw the mask figure at step 1: RuntimeError: no ink" in log_text
    assert "step 2/2" in log_text


def test_progress_eta_comes_from_the_steps_measured_after_the_first_window(monkeypatch):
    """A slow first window (warm-up, workers starting) does not inflate the ETA after it."""
    import io
    import logging

    from umt_fast.engine import metrics as metrics_module

    clock = iter([0.0, 100.0, 102.0, 104.0])  # built at 0; window 1 ends at 100 s, then 2 s a step
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: next(clock))
    line = metrics_module.ProgressLine(11, logging.getLogger("test.progress"), stream=io.StringIO(), start_step=1)
    assert line.update(2, 1.0, 1e-3, 1.0).endswith("ETA 15:00")  # 9 steps x 100 s: the only measure yet
    assert line.update(3, 1.0, 1e-3, 1.0).endswith("ETA 00:16")  # 8 x 2 s
    assert line.update(4, 1.0, 1e-3, 1.0).endswith("ETA 00:14")
