"""Run-directory checkpoints: atomic, step-numbered, keep-last-k, resumable at any world size.

A checkpoint is the directory ``<run_dir>/checkpoints/step_<8 digits>/``:

    .metadata, __*_*.distcp   model and optimizer state, written by torch.distributed.checkpoint
                              (DCP): every rank writes its own shards, and a checkpoint saved at
                              one world size (or under DDP, FSDP2 or a single process) loads at
                              any other
    meta.pt                   the next step, the data position, the bad-sample counts, the config

It is written into ``.tmp-step_<N>/`` and renamed into place once complete (rank 0, after all
ranks have written), so a run killed at any moment leaves only finished checkpoints behind.
``python -m umt_fast.export`` turns one into a single-file state dict.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from umt_fast.engine.distributed import DistInfo, barrier
from umt_fast.interop import _strip_wrapping_prefixes
from umt_fast.safe_load import load_torch_file

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8})$")
META = "meta.pt"


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir(run_dir), f"step_{step:08d}")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every finished checkpoint in the run directory, ascending."""
    directory = checkpoint_dir(run_dir)
    if not os.path.isdir(directory):
        return []
    found = [
        (int(m.group(1)), os.path.join(directory, name))
        for name in os.listdir(directory)
        if (m := _NAME.match(name)) and os.path.isfile(os.path.join(directory, name, META))
    ]
    return sorted(found)


STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)
"""A full disk, a quota or file-size limit, a read-only or forbidden location."""
_SHORT_WRITE = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")
"""How torch.save's zip writer reports a write the disk cut short (it keeps no errno)."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (full disk, quota, file-size limit, read-only)."""


def storage_error(exc: BaseException) -> OSError | None:
    """The OSError of a full or unwritable location behind ``exc`` (through exception chains and
    torch.distributed.checkpoint's per-rank failures), or None."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CheckpointWriteError) or (isinstance(e, OSError) and e.errno in STORAGE_ERRNOS):
            return e
        pending += [e.__cause__, e.__context__]
        pending += [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
    return None


def _as_write_error(exc: BaseException, path: str) -> CheckpointWriteError | None:
    """``exc`` as a CheckpointWriteError naming ``path`` when the storage caused it, else None."""
    found = storage_error(exc)
    if found is not None:
        return CheckpointWriteError(found.errno, found.strerror or str(found), path)
    text = " ".join(str(e) for e in (exc, *(f[0] for f in getattr(exc, "failures", {}).values())))
    if any(marker in text for marker in _SHORT_WRITE):
        return CheckpointWriteError(errno.EIO, "a write was cut short (a full disk, or a quota or file-size limit)", path)
    return None


def temp_file_beside(path: str, suffix: str = "") -> tuple[int, str]:
    """(fd, name) of a new temporary file in ``path``'s directory, created with the permissions
    of the umask as any other file (mkstemp's own are 0600: teammates could not read it)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``: a reader
    never sees a half-written file, and a failed write leaves nothing behind."""
    fd, tmp = temp_file_beside(path)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_writable(path: str, option: str) -> None:
    """ValueError naming ``option`` when ``path`` cannot be written (checked before the work)."""
    try:
        fd, tmp = temp_file_beside(path)
    except OSError as exc:
        raise ValueError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(tmp)


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temp file in the target directory, fsync, then rename over ``path``."""
    directory = os.path.dirname(path) or "."
    fd, tmp = temp_file_beside(path, suffix=".pt")
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
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state() -> dict[str, Any]:
    """Every process-global RNG state (to put back after code that may draw from them)."""
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


@contextmanager
def _single_process_ok():
    """DCP warns when it runs without a process group; that is how single-process runs use it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
        yield


def save_checkpoint(
    run_dir: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
    keep_last: int, info: DistInfo = DistInfo(),
) -> str:
    """Collective: every rank calls it. Writes the checkpoint of ``step``; prunes old ones."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = checkpoint_path(run_dir, step)
    tmp = os.path.join(checkpoint_dir(run_dir), f".tmp-step_{step:08d}")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a torn attempt of an earlier, killed run
        os.makedirs(tmp)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        with _single_process_ok():
            dcp.save({"model": model_state, "optim": _scalar_hyperparameters(optim_state)}, checkpoint_id=tmp)
        barrier()
        if info.is_main:
            atomic_torch_save({**meta, "step": step}, os.path.join(tmp, META))
    except BaseException as exc:
        if info.is_main:  # a disk-full write: give the space back; the finished checkpoints stay as they are
            shutil.rmtree(tmp, ignore_errors=True)
        # (torch.distributed.checkpoint's CheckpointException is a BaseException)
        write_error = None if isinstance(exc, (KeyboardInterrupt, SystemExit)) else _as_write_error(exc, final)
        if write_error is not None:
            raise write_error from exc
        raise
    if info.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(checkpoint_dir(run_dir))
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    barrier()
    return final


def _scalar_hyperparameters(optim_state: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state with its param groups' one-element tensor hyperparameters (the lr
    tensor of a CUDA-graph run) as Python floats: checkpoints store them one way, so a run
    resumes with or without CUDA graphs whichever way it was saved. (A CUDA-graph step turns
    the lr back into its device tensor after a restore.) New group dicts: the optimizer's own
    lr tensor, which a captured graph reads, is left alone."""
    def scalar(key: str, value: Any) -> Any:
        if key != "params" and isinstance(value, torch.Tensor) and value.numel() == 1:
            return value.item()
        return value

    groups = [{key: scalar(key, value) for key, value in group.items()} for group in optim_state.get("param_groups", [])]
    return {**optim_state, "param_groups": groups} if "param_groups" in optim_state else optim_state


def _check_checkpoint(path: str) -> None:
    if not os.path.isfile(os.path.join(path, META)):
        if os.path.exists(path):
            raise ValueError(f"{path} is not a finished umt_fast checkpoint (no {META})")
        raise FileNotFoundError(f"checkpoint not found: {path}")


def restore_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective: loads model and optimizer state in place (any sharding) and returns the meta."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _check_checkpoint(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": _scalar_hyperparameters(optim_state)}
    try:
        with _single_process_ok():
            dcp.load(state, checkpoint_id=path)
    except Exception as exc:
        raise ValueError(f"cannot load checkpoint {path} into this model: {exc}") from exc
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return load_torch_file(os.path.join(path, META), "checkpoint metadata")


def load_checkpoint(path: str) -> dict[str, Any]:
    """One process reads a checkpoint whole: ``{"student": full state dict, "optimizer": ...,
    "config": ..., "step": ..., ...}`` (for export, figures and inspection, not for resuming)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    _check_checkpoint(path)
    with tempfile.TemporaryDirectory() as tmp:
        consolidated = os.path.join(tmp, "full.pt")
        with _single_process_ok():
            dcp_to_torch_save(path, consolidated)
        full = load_torch_file(consolidated, f"checkpoint {path}")
    meta = load_torch_file(os.path.join(path, META), "checkpoint metadata")
    return {**meta, "student": full["model"], "optimizer": full["optim"]}


def checkpoint_damage(path: str) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from (None when it is intact): its
    metadata does not load, or a shard file is missing or shorter than the data it indexes
    (a truncated or partial, disk-full write). Reads no tensor data."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        load_torch_file(os.path.join(path, META), "checkpoint metadata")
        metadata = FileSystemReader(path).read_metadata()
    except Exception as exc:  # any unreadable file: the reason is what the user needs
        return f"unreadable metadata ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) < size:
            return f"{name} is truncated ({os.path.getsize(file)} of {size} bytes)"
    return None


def find_resume_checkpoint(run_dir: str, resume: str) -> str | None:
    """Which checkpoint ``--resume`` asks for: ``auto`` = the newest intact one in the run dir (a
    damaged newer one is skipped with a warning naming it; or none), ``none`` = start fresh
    (refused if the run dir already holds checkpoints), else a path."""
    existing = list_checkpoints(run_dir)
    if resume == "auto":
        for _, path in reversed(existing):
            damage = checkpoint_damage(path)
            if damage is None:
                return path
            log.warning("skipping damaged checkpoint %s: %s", path, damage)
        if existing:
            raise ValueError(f"every checkpoint in {checkpoint_dir(run_dir)} is damaged (see the warnings above); "
                             "--resume none in a new --run-dir starts afresh")  # fmt: skip
        return None
    if resume == "none":
        if existing:
            raise ValueError(
                f"--resume none, but {checkpoint_dir(run_dir)} already holds {len(existing)} checkpoint(s) "
                f"(newest: step {existing[-1][0]}); use --resume auto to continue it or choose a new --run-dir"
            )
        return None
    _check_checkpoint(resume)
    return resume


# Reading a run's weights back (export, evaluation, fine-tuning from a run)

STUDENT_NAMING = "reference stage-1 (encoder.*, clip_decoder.{k}.*)"
CLASSIFIER_NAMING = "reference fine-tuned (patch_embed.*, blocks.*, fc_norm.*, head.*, pos_embed)"


def resolve_checkpoint(path: str) -> str:
    """A checkpoint as given (``checkpoints/step_N``), or the newest one of a run directory."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, META)):
        found = list_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"{path} is neither a checkpoint nor a run directory with checkpoints/step_*")
        return found[-1][1]
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def read_run_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict in the reference's naming, description) of a run checkpoint or run dir.

    The description has ``kind`` (``student`` for pre-training runs, their vision tower for
    stage-2 runs, ``classifier`` for fine-tuning runs), ``stage`` (``stage1``, ``stage2`` or
    ``finetune``), ``naming``, ``num_frames``, ``img_size``, ``patch_size``, the run's ``config``,
    ``source`` and ``step``.
    """
    path = resolve_checkpoint(path)
    state = load_checkpoint(path)
    if "student" not in state:
        raise ValueError(f"{path} is not a umt_fast run checkpoint: it holds no model weights (keys: {sorted(state)})")
    config = state.get("config") or {}
    kind = state.get("kind", "student")
    data = config.get("data", {})
    stage = run_stage(config)
    if stage == "qa":
        raise ValueError(f"{path} is {STAGE_NAMES[stage]}: its model is the run's umt_qa.pth, for python -m "
                         "umt_fast.evaluate qa --checkpoint RUN_DIR/umt_qa.pth")  # fmt: skip
    weights = state["student"]
    if stage == "stage2":  # the vision-language model: its student is the stage-1 student
        weights = {k[len("student."):]: v for k, v in weights.items() if k.startswith("student.")}
    if kind == "student":
        naming, patch_size = STUDENT_NAMING, config.get("student", {}).get("patch_size")
    else:
        naming, patch_size = CLASSIFIER_NAMING, config.get("model", {}).get("patch_size")
    description = {
        "format": "umt_fast export",
        "kind": kind,
        "stage": stage,
        "naming": naming,
        "num_frames": data.get("num_frames"),
        "img_size": data.get("img_size"),
        "patch_size": patch_size,
        "step": state.get("step"),
        "source": os.path.abspath(path),
        "config": config,
    }
    if "class_names" in state:
        description["class_names"] = state["class_names"]
    return _strip_wrapping_prefixes(weights), description


STAGE_NAMES = {"stage1": "a stage-1 pre-training run", "stage2": "a stage-2 (vision-language) run",
               "finetune": "a fine-tuning run", "qa": "a video-QA fine-tuning run"}  # fmt: skip


def run_stage(config: dict[str, Any]) -> str:
    """Which command made a run, from its config's sections: stage1, stage2, finetune or qa."""
    if "answer_list" in config.get("data", {}):
        return "qa"
    if "text" in config:
        return "stage2"
    if "eval" in config or "aug" in config:
        return "finetune"
    return "stage1"


def sidecar_path(out: str) -> str:
    """``model.safetensors`` -> ``model.json``."""
    return os.path.splitext(out)[0] + ".json"
