"""Running a training command the way a user does, in one process or under torchrun (gloo)."""
import os
import subprocess
import sys

from umt_fast.engine.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
