"""End-to-end stage-1 runs on the real sample clips: demo, resume after SIGKILL, failure modes."""
import os
import subprocess
import sys

import pytest
import torch

from tests import umt_reference as ref
from umt_fast.engine import checkpoint as ckpt
from umt_fast.config import build_config
from umt_fast.data import sample_clip_paths
from umt_fast.pretrain import main
from umt_fast.train import loop
from umt_fast.engine.metrics import read_metrics
from tests.launch import kill_at_checkpoint

# The demo preset at a smaller resolution (4x4 grid, 4 visible tokens per frame), for speed.
SMALL = ["--data.img_size", "64", "--teacher.input_resolution", "64", "--log.every_steps", "1"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses_by_step(run_dir):
    """The last logged loss of every step (a resumed run logs some steps twice)."""
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r}


def test_demo_trains_and_reports_where_it_saved(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    assert main(["--run-dir", str(run_dir), "--train.max_steps", "12"]) == 0
    out = capsys.readouterr().out
    final = ckpt.checkpoint_path(str(run_dir), 12)
    assert f"run directory: {run_dir}" in out and f"checkpoint:    {final}" in out
    assert os.path.isdir(final)
    for name in ("config.yaml", "config.json", "log.txt", "metrics.jsonl"):
        assert (run_dir / name).is_file()
    records = [r for r in read_metrics(str(run_dir / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert {"step", "loss", "lr", "clips/s", "data/skipped", "data_wait_ms", "tflops"} <= set(records[0])
    assert "mfu" not in records[0] and "peak_mem_gb" not in records[0]  # no known peak, no GPU memory on a CPU
    # TFLOP/s per clip/s is the model FLOPs of one clip: the tiny teacher on 4 frames of 7x7 + CLS, and
    # the tiny student's forward and backward on its 4 x 10 visible tokens (by hand, 24 w^2 + 4 s w per token)
    teacher = 4 * (4 * 50) * (24 * 128**2 + 4 * 50 * 128)
    student = 3 * 4 * 40 * (24 * 192**2 + 4 * 40 * 192)
    assert records[0]["tflops"] * 1e12 / records[0]["clips/s"] == pytest.approx(teacher + student, rel=1e-9)
    assert all(r["data_wait_ms"] >= 0 for r in records)
    losses = [r["loss"] for r in records]
    assert sum(losses[-3:]) / 3 < 0.75 * losses[0], losses
    log_text = (run_dir / "log.txt").read_text()
    assert "step 12/12" in log_text and "TFLOP/s" in log_text and "data " in log_text
    state = ckpt.load_checkpoint(final)
    assert {"student", "optimizer", "step", "data_position", "config", "bad_samples"} <= set(state)
    assert state["step"] == 12 and state["data_position"] == 12 * 4
    assert "encoder.blocks.0.attn.qkv.weight" in state["student"]


def test_kill_and_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    args = SMALL + ["--train.max_steps", "8", "--checkpoint.every_steps", "3"]
    straight = tmp_path / "straight"
    assert main(["--run-dir", str(straight)] + args) == 0

    killed = tmp_path / "killed"
    kill_at_checkpoint("umt_fast.pretrain", killed, args, 3)
    steps_saved = [s for s, _ in ckpt.list_checkpoints(str(killed))]
    assert steps_saved and max(steps_saved) < 8, "the kill must land mid-run"

    assert main(["--run-dir", str(killed), "--resume", "auto"] + args) == 0
    expected, got = _losses_by_step(straight), _losses_by_step(killed)
    assert sorted(got) == list(range(1, 9))
    assert got == expected
    events = [r for r in read_metrics(str(killed / "metrics.jsonl")) if r.get("event") == "resume"]
    assert events and events[-1]["step"] == max(steps_saved)


def test_resume_none_refuses_to_overwrite_a_run(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert main(["--run-dir", run_dir, "--train.max_steps", "1"] + SMALL) == 0
    assert main(["--run-dir", run_dir, "--train.max_steps", "2", "--resume", "none"] + SMALL) == 2
    assert "--resume auto" in capsys.readouterr().err
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [1]


def test_config_errors_stop_before_any_work(tmp_path, capsys):
    run_dir = tmp_path / "never"
    assert main(["--run-dir", str(run_dir), "--mask.ratio", "1.5"]) == 2
    assert "mask.ratio" in capsys.readouterr().err
    assert not run_dir.exists()
    assert main(["--run-dir", str(run_dir), "--data.train_list", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err
    assert not run_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_graphs_without_a_gpu_stop_before_any_work(tmp_path, capsys):
    run_dir = tmp_path / "never"
    assert main(["--run-dir", str(run_dir), "--train.cuda_graphs", "true"] + SMALL) == 2
    assert "train.cuda_graphs=True needs a CUDA device" in capsys.readouterr().err
    assert not run_dir.exists()


def test_cuda_graph_bookkeeping_in_the_training_loop(tmp_path, monkeypatch):
    """The loop's CUDA-graph path without capture (a CPU has no graphs): lr tensor and
    schedule, device step counter, checkpoints. Its losses equal the plain run's, and its
    checkpoint resumes a plain run (and the other way round) that continues the same losses."""
    import functools

    from umt_fast.engine.cuda_graph import CUDAGraphStep

    from umt_fast.engine import trainer

    monkeypatch.setattr(trainer, "require_cuda_for_graphs", lambda cfg, device: None)
    monkeypatch.setattr(loop, "CUDAGraphStep", functools.partial(CUDAGraphStep, capture=False))

    def run(run_dir, max_steps, graphs, resume="auto"):
        argv = ["--run-dir", str(run_dir), "--train.max_steps", str(max_steps), "--checkpoint.every_steps", "3",
                "--student.drop_path", "0.2", "--train.cuda_graphs", str(graphs).lower(), "--resume", resume] + SMALL
        loop.train(build_config(argv))
        return _losses_by_step(str(run_dir))

    plain = run(tmp_path / "plain", 6, False)
    graphed = run(tmp_path / "graphed", 6, True)
    assert sorted(graphed) == list(range(1, 7))
    for step in plain:
        assert graphed[step] == pytest.approx(plain[step], rel=1e-5, abs=1e-6)
    run(tmp_path / "mixed", 3, True)
    mixed = run(tmp_path / "mixed", 6, False)  # saved with graphs, resumed without
    for step in plain:
        assert mixed[step] == pytest.approx(plain[step], rel=1e-5, abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_run_resumes_and_tracks_the_eager_run(tmp_path):
    """fp32 on the GPU: a graph-replayed run logs the eager run's losses, and a run resumed
    from its step-6 checkpoint (warming up and capturing again) continues it."""
    def args(max_steps, graphs):
        return SMALL + ["--train.max_steps", str(max_steps), "--checkpoint.every_steps", "6",
                        "--train.precision", "fp32", "--train.cuda_graphs", str(graphs).lower()]

    eager, graphed, resumed = (str(tmp_path / name) for name in ("eager", "graphed", "resumed"))
    assert main(["--run-dir", eager] + args(10, False)) == 0
    assert main(["--run-dir", graphed] + args(10, True)) == 0
    expected, got = _losses_by_step(eager), _losses_by_step(graphed)
    assert sorted(got) == list(range(1, 11))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5)
    assert main(["--run-dir", resumed] + args(6, True)) == 0
    assert main(["--run-dir", resumed, "--resume", "auto"] + args(10, True)) == 0
    again = _losses_by_step(resumed)
    for step in range(7, 11):
        assert again[step] == pytest.approx(got[step], rel=1e-4, abs=1e-5)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_call = loop.PretrainStep.__call__

    def poisoned(self, video, step):
        loss = real_call(self, video, step)
        return loss * float("nan") if step == 3 else loss

    monkeypatch.setattr(loop.PretrainStep, "__call__", poisoned)
    run_dir = str(tmp_path / "nan")
    cfg = build_config(["--run-dir", run_dir, "--train.max_steps", "6", "--checkpoint.every_steps", "2",
                        "--log.every_steps", "2"] + SMALL[:4])
    with pytest.raises(loop.NonFiniteLossError) as err:
        loop.train(cfg)
    assert "steps 3 and 4" in str(err.value)
    assert ckpt.checkpoint_path(run_dir, 2) in str(err.value)
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2]
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(run_dir, 2))["step"] == 2  # intact


def test_unreadable_videos_are_skipped_and_counted(tmp_path):
    bad = tmp_path / "truncated clip.mp4"
    bad.write_bytes(open(sample_clip_paths()[0], "rb").read()[:2048])
    listing = tmp_path / "train.csv"
    listing.write_text("".join(f"{p},0\n" for p in sample_clip_paths()) + f"{bad},0\n")
    run_dir = tmp_path / "run"
    assert main(["--run-dir", str(run_dir), "--data.train_list", str(listing), "--train.max_steps", "4"] + SMALL) == 0
    records = [r for r in read_metrics(str(run_dir / "metrics.jsonl")) if "loss" in r]
    assert records[-1]["data/skipped"] >= 1
    assert "truncated clip.mp4" in (run_dir / "log.txt").read_text()


def test_mostly_unreadable_data_stops_with_examples(tmp_path):
    listing = tmp_path / "train.csv"
    lines = []
    for i in range(40):
        junk = tmp_path / f"junk_{i}.mp4"
        junk.write_text("not a video")
        lines.append(f"{junk},0")
    lines.append(f"{sample_clip_paths()[0]},0")
    listing.write_text("\n".join(lines) + "\n")
    cfg = build_config(["--run-dir", str(tmp_path / "run"), "--data.train_list", str(listing),
                        "--train.max_steps", "20"] + SMALL[:4])
    with pytest.raises(RuntimeError, match="junk_"):
        loop.train(cfg)


def test_teacher_weights_file_with_visual_prefix_trains(tmp_path):
    sd = ref.random_clip_visual_state_dict(width=128, layers=4, patch=16, output_dim=64, grid=7)
    path = tmp_path / "clip.pth"
    torch.save({f"visual.{k}": v for k, v in sd.items()}, path)
    run_dir = str(tmp_path / "run")
    # the file's 7x7 position grid is resized to the 4x4 grid of a 64-px teacher on load
    assert main(["--run-dir", run_dir, "--teacher.weights", str(path), "--train.max_steps", "2"] + SMALL) == 0
    assert "THE TEACHER IS RANDOM" not in open(os.path.join(run_dir, "log.txt")).read()


def test_teacher_weights_of_the_wrong_arch_are_refused(tmp_path, capsys):
    sd = ref.random_clip_visual_state_dict(width=64, layers=2, patch=16, output_dim=32, grid=7)
    path = tmp_path / "clip.pth"
    torch.save(sd, path)
    assert main(["--run-dir", str(tmp_path / "run"), "--teacher.weights", str(path)] + SMALL) == 2
    assert "--teacher.arch" in capsys.readouterr().err
    # a run that fails before its first step leaves only its log, which says why
    assert os.listdir(tmp_path / "run") == ["log.txt"]
    assert "the run failed before its first step" in (tmp_path / "run" / "log.txt").read_text()


def test_help_lists_every_option():
    out = subprocess.run([sys.executable, "-m", "umt_fast.pretrain", "--help"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    for option in ("--preset", "--run_dir", "--resume", "--train.max_steps", "--checkpoint.every_steps",
                   "--log.every_steps", "--data.train_list", "--data.root", "--teacher.weights", "--mask.policy"):
        assert option in out


def test_saved_files_follow_the_umask(tmp_path):
    """Checkpoints and exports are readable as the umask allows (not mkstemp's 0600)."""
    from umt_fast import export

    old = os.umask(0o027)
    try:
        ckpt.atomic_torch_save({"x": 1}, str(tmp_path / "meta.pt"))
        export._atomic_write(str(tmp_path / "weights.bin"), lambda p: open(p, "wb").close())
    finally:
        os.umask(old)
    for name in ("meta.pt", "weights.bin"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o640, name


def test_a_finished_run_says_which_option_trains_it_further(tmp_path):
    run_dir = str(tmp_path / "run")
    assert main(["--run-dir", run_dir, "--train.max_steps", "2"] + SMALL) == 0
    assert main(["--run-dir", run_dir, "--train.max_steps", "2"] + SMALL) == 0
    log_text = open(os.path.join(run_dir, "log.txt")).read()
    assert "resumed from step 2" in log_text
    assert "nothing to train: the run is at step 2 and train.max_steps=2 ends it at step 2: raise --train.max_steps" \
        in log_text
    assert main(["--run-dir", run_dir, "--train.max_steps", "3"] + SMALL) == 0  # raising it trains on
    assert sorted(_losses_by_step(run_dir)) == [1, 2, 3]


def test_a_second_run_on_the_same_directory_is_refused(tmp_path, capsys):
    """A second process trains in the run directory (held at its first step): this one is refused,
    naming that process, and writes nothing there."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from umt_fast.engine.launch import RunDirLock\n"
         f"lock = RunDirLock({str(run_dir)!r}); print('held', flush=True); time.sleep(120)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["--run-dir", str(run_dir), "--train.max_steps", "1"] + SMALL) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert f"run directory {run_dir} is in use by pid {holder.pid} on host" in err
    assert sorted(os.listdir(run_dir)) == [".lock"]


def test_a_global_batch_larger_than_the_list_warns(tmp_path):
    listing = tmp_path / "two.csv"
    listing.write_text("".join(f"{clip},0\n" for clip in sample_clip_paths()[:2]))
    run_dir = str(tmp_path / "run")
    assert main(["--run-dir", run_dir, "--data.train_list", str(listing), "--train.max_steps", "1"] + SMALL) == 0
    assert "a step takes 4 clips, more than the training data holds (2)" in open(os.path.join(run_dir, "log.txt")).read()


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path):
    """A truncated shard (a partial, disk-full write) or an unreadable meta.pt: --resume auto warns,
    naming it, and continues from the newest intact checkpoint, exactly."""
    run_dir = str(tmp_path / "run")
    args = ["--run-dir", run_dir, "--train.max_steps", "3", "--checkpoint.every_steps", "1"] + SMALL
    assert main(args) == 0
    straight = _losses_by_step(run_dir)
    newest = ckpt.checkpoint_path(run_dir, 3)
    shard = next(f for f in os.listdir(newest) if f.endswith(".distcp"))
    with open(os.path.join(newest, shard), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(newest, shard)) // 2)
    with open(os.path.join(ckpt.checkpoint_path(run_dir, 2), "meta.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    assert main(args) == 0
    log_text = open(os.path.join(run_dir, "log.txt")).read()
    assert f"skipping damaged checkpoint {newest}: {shard} is truncated" in log_text
    assert f"skipping damaged checkpoint {ckpt.checkpoint_path(run_dir, 2)}: unreadable metadata" in log_text
    assert "resumed from step 1" in log_text
    assert _losses_by_step(run_dir) == straight


def test_the_console_log_follows_stderr_after_the_stream_it_started_on_closes(tmp_path, monkeypatch):
    """A run's console handler outlives the stream it was made on (a test's capture, a closed
    redirect): a later run's messages reach the stderr of the moment, and nothing raises."""
    import io
    import logging

    from umt_fast.engine.metrics import setup_logging

    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging(str(tmp_path))
    logging.getLogger("umt_fast.test").warning("during the first run")
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("umt_fast.test").warning("after it")
    assert "WARNING: after it" in second.getvalue()
    assert "during the first run" in (tmp_path / "log.txt").read_text()
