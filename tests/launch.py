"""Running a training command the way a user does, in one process or under torchrun (gloo)."""
import os
import signal
import subprocess
import sys
import time

from umt_fast.engine.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kill_at_checkpoint(module: str, run_dir, args: list[str], step: int, timeout_s: float = 120) -> None:
    """Starts ``python -m module --run-dir run_dir *args`` and SIGKILLs it as soon as its checkpoint
    of ``step`` exists (asserting that it gets there)."""
    from umt_fast.engine import checkpoint as ckpt

    proc = subprocess.Popen([sys.executable, "-m", module, "--run-dir", str(run_dir), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + timeout_s
    while not os.path.exists(ckpt.checkpoint_path(str(run_dir), step)):
        assert proc.poll() is None and time.time() < deadline, "run ended before its checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def run_command(module: str, run_dir, nproc: int, args: list[str], port_base: int, env: dict | None = None) -> list[dict]:
    """``python -m module --run-dir run_dir *args`` on ``nproc`` ranks (torchrun when > 1, on a
    port from ``port_base``); asserts it exits 0 and returns its metrics.jsonl records."""
    cmd = [sys.executable, "-m", module]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(port_base + os.getpid() % 1000), "-m", module]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(cmd + ["--run-dir", str(run_dir), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(os.path.join(run_dir, "metrics.jsonl"))
