"""Run-directory checkpoints: atomic, step-numbered, keep-last-k, resumable.

A checkpoint is ``<run_dir>/checkpoints/step_<8 digits>.pt`` holding the model, the
optimizer, the next step to run, the data position, the RNG states, the bad-sample counts
and the config. It is written to a temporary file in the same directory, fsynced, and
renamed over the final name, so a run killed at any moment leaves either the old set of
checkpoints or the new one, never a torn file.
"""
from __future__ import annotations

import logging
import os
import random
import re
import tempfile
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir(run_dir), f"step_{step:08d}.pt")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every finished checkpoint in the run directory, ascending."""
    directory = checkpoint_dir(run_dir)
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), os.path.join(directory, n)) for n in os.listdir(directory) if (m := _NAME.match(n))]
    return sorted(found)


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temp file in the target directory, fsync, then rename over ``path``."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str, step: int, state: dict[str, Any], keep_last: int) -> str:
    """Writes ``state`` (plus the RNG states) as the checkpoint of ``step``; prunes old ones."""
    path = checkpoint_path(run_dir, step)
    atomic_torch_save({**state, "step": step, "rng": rng_state()}, path)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        os.unlink(old)
    return path


def load_checkpoint(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # Our own files: they hold RNG states and config dicts besides tensors.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc


def find_resume_checkpoint(run_dir: str, resume: str) -> str | None:
    """Which checkpoint ``--resume`` asks for: ``auto`` = newest in the run dir (or none),
    ``none`` = start fresh (refused if the run dir already holds checkpoints), else a path."""
    existing = list_checkpoints(run_dir)
    if resume == "auto":
        return existing[-1][1] if existing else None
    if resume == "none":
        if existing:
            raise ValueError(
                f"--resume none, but {checkpoint_dir(run_dir)} already holds {len(existing)} checkpoint(s) "
                f"(newest: step {existing[-1][0]}); use --resume auto to continue it or choose a new --run-dir"
            )
        return None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume: checkpoint file not found: {resume}")
    return resume
