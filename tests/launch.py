"""Running commands the way a user does: in a process of their own, on one rank or several (gloo).

Processes start from a fork server that has imported torch, transformers and the recipes once
(tests/preloaded.py), so each costs its work and not the ~15 s a fresh interpreter spends on
imports. A command process gets the environment torchrun gives its workers (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT, ...), its own stdout and stderr files, and runs ``python -m
module`` as runpy does. ``run_command(..., launcher="torchrun")`` starts fresh interpreters under
``python -m torch.distributed.run`` instead, for the test that is about that launch itself.
"""
import atexit
import multiprocessing
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from umt_fast.engine.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_context = None


def _fork_server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["tests.preloaded"])
    return _context


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _enter(env: dict, stdout: str, stderr: str, preexec=None) -> None:
    """Makes a process from the fork server look like one started fresh in ``env`` from REPO
    (``preexec`` as subprocess.Popen's ``preexec_fn``)."""
    for fd, path in ((1, stdout), (2, stderr)):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, fd)
        os.close(out)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(REPO)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # The server's children inherit its "forkserver" start method: their DataLoader workers would
    # be the server's children, not the command's, and outlive a killed command. A fresh
    # interpreter has the platform's default (fork on Linux).
    multiprocessing.set_start_method(None, force=True)
    if "OMP_NUM_THREADS" in env:  # the OpenMP runtime read the server's environment when it loaded
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    if preexec is not None:
        preexec()


def _run_module(module: str, argv: list[str]) -> None:
    """``python -m module *argv``, in a process from the fork server."""
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        atexit._run_exitfuncs()  # a forked process ends in os._exit, which runs none


def _run_function(target, args: tuple, enter: tuple) -> None:
    _enter(*enter)
    target(*args)


@dataclass
class Ranks:
    """The processes of one command, one per rank, and the files their output goes to."""

    processes: list
    stdout: list[str]
    stderr: list[str]

    def wait(self, timeout_s: float = 600) -> list[int]:
        """Exit codes, rank order. A rank that fails, or any rank past the deadline, brings the
        others down after a moment (as torchrun does), so a broken collective cannot hang."""
        deadline = time.time() + timeout_s
        while any(p.exitcode is None for p in self.processes):
            if time.time() > deadline or any(p.exitcode not in (None, 0) for p in self.processes):
                end = min(deadline, time.time()) + 5
                while time.time() < end and any(p.exitcode is None for p in self.processes):
                    time.sleep(0.05)
                self.kill()
                break
            time.sleep(0.02)
        for p in self.processes:
            p.join()
        return [p.exitcode for p in self.processes]

    def kill(self) -> None:
        for p in self.processes:
            if p.exitcode is None:
                p.kill()

    def output(self, rank: int = 0) -> tuple[str, str]:
        """(stdout, stderr) of ``rank`` so far."""
        with open(self.stdout[rank]) as out, open(self.stderr[rank]) as err:
            return out.read(), err.read()

    def check(self, timeout_s: float = 600) -> None:
        """Waits and asserts that every rank exited 0, with the stderr of every rank that did not
        (a rank that loses its peer fails too: the first failure is not always the cause)."""
        codes = self.wait(timeout_s)
        failed = [rank for rank, code in enumerate(codes) if code != 0]
        assert not failed, "\n".join(f"rank {rank} exited {codes[rank]}:\n" + self.output(rank)[1][-3000:]
                                      for rank in failed)  # fmt: skip


def start_ranks(target, args: tuple, nproc: int = 1, env: dict | None = None, preexec=None) -> Ranks:
    """``target(*args)`` in ``nproc`` processes from the fork server, each in this process's
    environment updated by ``env`` and, on several ranks, torchrun's (rank 0 hosts the
    rendezvous on a free port). ``preexec`` (picklable) runs first in each process. The output
    files are removed when this process exits."""
    ctx = _fork_server()
    base = {**os.environ, **(env or {})}
    if nproc > 1:
        port = free_port()
        base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc),
                    LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", GROUP_WORLD_SIZE="1",
                    TORCHELASTIC_RUN_ID=f"test-{port}")  # fmt: skip
    logs = tempfile.mkdtemp(prefix="ranks-")
    atexit.register(shutil.rmtree, logs, True)
    ranks = Ranks([], [], [])
    for rank in range(nproc):
        rank_env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "ROLE_RANK": str(rank)} if nproc > 1 else base
        out, err = os.path.join(logs, f"{rank}.out"), os.path.join(logs, f"{rank}.err")
        process = ctx.Process(target=_run_function, args=(target, args, (rank_env, out, err, preexec)))
        process.start()
        ranks.processes.append(process)
        ranks.stdout.append(out)
        ranks.stderr.append(err)
    return ranks


def start_command(module: str, argv: list[str], nproc: int = 1, env: dict | None = None, **options) -> Ranks:
    """``python -m module *argv`` on ``nproc`` ranks (see start_ranks for ``options``)."""
    return start_ranks(_run_module, (module, argv), nproc, env, **options)


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str


def run_module(module: str, argv: list[str], env: dict | None = None, timeout_s: float = 600, **options) -> Completed:
    """``python -m module *argv`` in a process of its own, to its end (``options``: start_ranks')."""
    ranks = start_command(module, argv, 1, env, **options)
    code = ranks.wait(timeout_s)[0]
    return Completed(code, *ranks.output(0))


def kill_at_checkpoint(module: str, run_dir, args: list[str], step: int, timeout_s: float = 120) -> None:
    """Starts ``python -m module --run-dir run_dir *args`` and SIGKILLs it as soon as its checkpoint
    of ``step`` exists (asserting that it gets there)."""
    from umt_fast.engine import checkpoint as ckpt

    process = start_command(module, ["--run-dir", str(run_dir), *args]).processes[0]
    deadline = time.time() + timeout_s
    while not os.path.exists(ckpt.checkpoint_path(str(run_dir), step)):
        assert process.exitcode is None and time.time() < deadline, "run ended before its checkpoint"
        time.sleep(0.01)
    process.kill()
    process.join()


def run_command(module: str, run_dir, nproc: int, args: list[str], port_base: int = 0, env: dict | None = None,
                launcher: str = "fork") -> list[dict]:
    """``python -m module --run-dir run_dir *args`` on ``nproc`` ranks, OMP_NUM_THREADS=1; asserts
    that every rank exits 0 and returns the metrics.jsonl records. ``launcher="torchrun"`` runs it
    in fresh interpreters under torchrun (on a port from ``port_base``), as a user does."""
    argv = ["--run-dir", str(run_dir), *args]
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", module]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(port_base + os.getpid() % 1000), "-m", module]  # fmt: skip
        proc = subprocess.run(cmd + argv, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        start_command(module, argv, nproc, env).check()
    return read_metrics(os.path.join(run_dir, "metrics.jsonl"))
