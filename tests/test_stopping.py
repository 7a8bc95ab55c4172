"""Stopping on SIGTERM / SIGUSR1 / Ctrl-C: a checkpoint after the current step, then an exact resume."""
import functools
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.launch import REPO, run_module
from umt_fast.engine import checkpoint as ckpt
from umt_fast.pretrain import main
from umt_fast.engine.metrics import read_metrics
from umt_fast.engine.stopping import StopOnSignal, TrainingStopped

def _losses_by_step(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r}


def test_stop_on_signal_sets_a_flag_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopOnSignal(distributed=False) as stop:
        assert not stop.requested and not stop.check_every_step and stop.flag == 0.0
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.check_every_step and stop.flag == 1.0
        stopped = stop.stopped(7, "ckpt/step_7")
    assert signal.getsignal(signal.SIGUSR1) is before
    assert isinstance(stopped, TrainingStopped)
    assert stopped.signal_name == "SIGUSR1" and stopped.exit_code == 128 + signal.SIGUSR1
    assert "after step 7" in str(stopped) and "ckpt/step_7" in str(stopped)
    with StopOnSignal(distributed=True) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and not stop.check_every_step  # ranks agree at the logging all-reduce


def test_sigterm_to_the_process_group_saves_a_checkpoint_and_the_run_resumes_exactly(tmp_path):
    """As a scheduler does it: SIGTERM to the training process and its decoding workers. The
    run saves after the step in flight, exits 143 naming the checkpoint, and a resumed run
    logs the same losses as one never stopped."""
    args = ["--data.img_size", "64", "--teacher.input_resolution", "64", "--log.every_steps", "1",
            "--train.max_steps", "6", "--checkpoint.every_steps", "1000", "--data.num_workers", "2"]
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    command = [sys.executable, "-m", "umt_fast.pretrain"]
    assert main(["--run-dir", straight] + args) == 0

    proc = subprocess.Popen(command + ["--run-dir", stopped] + args, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics_path = os.path.join(stopped, "metrics.jsonl")
    deadline = time.time() + 120
    while not (os.path.exists(metrics_path) and len(_losses_by_step(stopped)) >= 2):
        assert proc.poll() is None and time.time() < deadline, "run ended before its second step"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    saved = [s for s, _ in ckpt.list_checkpoints(stopped)]
    assert len(saved) == 1 and 2 <= saved[0] < 6, saved
    assert f"stopped by SIGTERM after step {saved[0]}" in err and "--resume auto" in err
    events = [r for r in read_metrics(metrics_path) if r.get("event") == "stopped"]
    assert events == [{"event": "stopped", "signal": "SIGTERM", "step": saved[0],
                       "checkpoint": ckpt.checkpoint_path(stopped, saved[0])}]

    assert main(["--run-dir", stopped, "--resume", "auto"] + args) == 0
    assert _losses_by_step(stopped) == _losses_by_step(straight)


def _signal_at(step_to_signal, signum):
    """Wraps a step callable so that the process signals itself during that step."""
    def wrap(real_call):
        def call(self, *args):
            out = real_call(self, *args)
            if args[-1] == step_to_signal:
                os.kill(os.getpid(), signum)
            return out
        return call
    return wrap


def test_finetuning_stops_on_sigusr1_after_saving(tmp_path, monkeypatch):
    from tests.test_finetune import SMALL, _write_list
    from umt_fast import finetune

    monkeypatch.setattr(finetune.FinetuneStep, "__call__", _signal_at(2, signal.SIGUSR1)(finetune.FinetuneStep.__call__))
    train_list = _write_list(tmp_path / "train.csv")
    run_dir = str(tmp_path / "run")
    cfg = finetune.build_config(["--run-dir", run_dir, "--data.train_list", train_list, "--optim.epochs", "12",
                                 "--checkpoint.every_steps", "100"] + SMALL)
    with pytest.raises(TrainingStopped) as stopped:
        finetune.train(cfg)
    assert stopped.value.step == 3 and stopped.value.signal_name == "SIGUSR1"
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [3]
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(run_dir, 3))["data_position"] == 3 * 4


def test_stage2_stops_on_sigterm_after_saving(tmp_path, monkeypatch):
    from tests.tiny_text import tiny_text_weights
    from umt_fast.config.vl import build_config
    from umt_fast.recipes import pretrain_vl as vl_train

    monkeypatch.setattr(vl_train.VLStep, "__call__", _signal_at(1, signal.SIGTERM)(vl_train.VLStep.__call__))
    run_dir = str(tmp_path / "run")
    cfg = build_config(["--run-dir", run_dir, "--optim.epochs", "3", "--checkpoint.every_steps", "100",
                        "--text.weights", tiny_text_weights()])  # fmt: skip
    with pytest.raises(TrainingStopped) as stopped:
        vl_train.train(cfg)
    assert stopped.value.step == 2 and stopped.value.exit_code == 128 + signal.SIGTERM
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2]


def test_ctrl_c_saves_and_a_second_ctrl_c_stops_at_once(tmp_path):
    """Ctrl-C in a terminal: SIGINT to the command and its decoding workers. The first one finishes
    the step in flight, saves it and exits 130 with the resume line; a second one stops at once."""
    run_dir = str(tmp_path / "run")
    args = ["--run-dir", run_dir, "--data.img_size", "64", "--teacher.input_resolution", "64", "--log.every_steps", "1",
            "--train.max_steps", "40", "--checkpoint.every_steps", "1000", "--data.num_workers", "2"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "umt_fast.pretrain"] + args, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while not (os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and len(_losses_by_step(run_dir)) >= 2):
        assert proc.poll() is None and time.time() < deadline, "run ended before its second step"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    saved = [s for s, _ in ckpt.list_checkpoints(run_dir)]
    assert len(saved) == 1 and 2 <= saved[0] < 40, saved
    assert "Ctrl-C: stopping after this step" in err and f"stopped by SIGINT after step {saved[0]}" in err
    assert f"--resume auto --run-dir {run_dir}" in err and "Traceback" not in err

    with StopOnSignal(distributed=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def _limit_file_size(limit_bytes):
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))


def test_a_full_disk_stops_with_one_line_and_loses_nothing_saved(tmp_path):
    """A checkpoint that does not fit (a file-size limit standing in for a full disk): one line
    naming the file, exit code 1, the checkpoint saved before intact, and an exact resume."""
    common = ["--data.img_size", "64", "--teacher.input_resolution", "64", "--log.every_steps", "1",
              "--checkpoint.every_steps", "2", "--data.num_workers", "0"]  # fmt: skip
    args = common + ["--train.max_steps", "4"]
    straight, full = str(tmp_path / "straight"), str(tmp_path / "full")
    assert main(["--run-dir", straight] + args) == 0
    assert main(["--run-dir", full] + common + ["--train.max_steps", "2"]) == 0
    proc = run_module("umt_fast.pretrain", ["--run-dir", full] + args, preexec=functools.partial(_limit_file_size, 2**20))
    assert proc.returncode == 1, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "File too large" in error[0] and full in error[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert [s for s, _ in ckpt.list_checkpoints(full)] == [2] and ckpt.checkpoint_damage(ckpt.checkpoint_path(full, 2)) is None
    assert not [n for n in os.listdir(os.path.join(full, "checkpoints")) if n.startswith(".tmp")]
    assert main(["--run-dir", full] + args) == 0
    assert _losses_by_step(full) == _losses_by_step(straight)


def test_an_uncaught_error_with_a_loader_open_exits_instead_of_waiting_for_its_workers(tmp_path):
    """The loader workers ignore SIGTERM (for the stops above); a script that dies with a loader
    still open must exit anyway, not hang in multiprocessing's exit handler."""
    script = tmp_path / "crash.py"
    script.write_text(
        "from umt_fast.data import PretrainClipDataset, VideoRecord, build_pretrain_loader, sample_clip_paths\n"
        "records = [VideoRecord(p, None) for p in sample_clip_paths()]\n"
        "batches = iter(build_pretrain_loader(PretrainClipDataset(records, 2, 32, seed=0), 2, 0, num_workers=2,\n"
        "                                     pin_memory=False))\n"
        "next(batches)\n"
        "raise RuntimeError('a bug in the training script')\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert proc.returncode == 1 and "a bug in the training script" in proc.stderr
