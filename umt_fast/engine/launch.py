"""The command-line wrapper every training command shares (pretrain, finetune, pretrain_vl)."""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable


def default_run_dir(preset: str) -> str:
    return os.path.join("runs", f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}")


ALLOW_CHANGES = "--allow-config-changes"
"""The flag that resumes a run even where the command line changes its model or data."""


def run_training_command(
    argv: list[str] | None,
    build_config: Callable[..., Any],
    check_paths: Callable[[Any], None],
    load_train: Callable[[], Callable[[Any], Any]],
    summary: Callable[[Any], list[str]],
    fixed_on_resume: tuple[str, ...] = (),
) -> int:
    """Parse and check the config, run, and report; returns the process exit code.

    A run directory that holds a checkpoint is resumed with the config it trained with
    (`resumed_config`), not the preset's: options given override it, and are printed;
    options under ``fixed_on_resume`` (the model's and the data's) are refused unless
    ``--allow-config-changes`` is given.

    A bad config or input (ValueError / FileNotFoundError) prints ``error: ...`` and returns 2
    before any work; a full disk or an unwritable location, one line naming the path, and 1; Ctrl-C returns 130 with the resume command; a run stopped by SIGTERM or
    SIGUSR1 (umt_fast.engine.stopping) returns 128 + the signal number, its checkpoint saved. The process group is torn
    down whatever happens, and rank 0 prints ``summary(result)``. ``load_train`` imports the
    training function, so that torch loads only once the config is valid.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    allow_changes = ALLOW_CHANGES in argv
    argv = [a for a in argv if a != ALLOW_CHANGES]
    try:
        cfg = build_config(argv)
        if not cfg.run_dir:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ValueError("--run-dir is required under torchrun (every rank must write to the same place)")
            cfg.run_dir = default_run_dir(cfg.preset)
        cfg = resumed_config(cfg, argv, build_config, fixed_on_resume, allow_changes)
        check_paths(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from umt_fast.engine.distributed import destroy_distributed
    from umt_fast.data.dataset import UnreadableDataError
    from umt_fast.engine.stopping import TrainingStopped

    try:
        result = load_train()(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:
        print(f"{stopped}\nresume with --resume auto --run-dir {cfg.run_dir}", file=sys.stderr)
        return stopped.exit_code
    except UnreadableDataError as exc:
        message = str(exc).split("UnreadableDataError: ")[-1]  # a loader worker's: its traceback left out
        print(f"error: {message}\nThe checkpoints saved before are intact; fix or drop the unreadable data "
              f"(python -m umt_fast.prepare scan finds it) and resume with --resume auto --run-dir {cfg.run_dir}",
              file=sys.stderr)  # fmt: skip
        return 1
    except Exception as exc:
        from umt_fast.engine.checkpoint import storage_error

        full = storage_error(exc)
        if full is None:
            raise
        where = f" {full.filename}" if full.filename else ""
        print(f"error: cannot write{where}: {full.strerror or full}. The checkpoints saved before are intact; free "
              f"space (or pick a writable --run-dir) and resume with --resume auto --run-dir {cfg.run_dir}",
              file=sys.stderr)  # fmt: skip
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted at once: the steps since the last checkpoint are lost; resume with --resume auto "
              f"--run-dir {cfg.run_dir}", file=sys.stderr)  # fmt: skip
        return 130
    finally:
        destroy_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print("\n".join(summary(result)))
    return 0


class RunDirLock:
    """An exclusive flock on ``<run_dir>/.lock``, held while a run trains there: a second run on
    the same directory is refused with the first one's pid and host (the lock goes with the
    process, so a killed run leaves nothing to clean up)."""

    def __init__(self, run_dir: str):
        import fcntl
        import socket

        self.path = os.path.join(run_dir, ".lock")
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise ValueError(f"run directory {run_dir} is in use by {holder}; wait for that run to end, or "
                             "pass another --run-dir") from None  # fmt: skip
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on host {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing drops the flock


def resumed_config(cfg: Any, argv: list[str], build_config: Callable[..., Any], fixed: tuple[str, ...],
                   allow_changes: bool) -> Any:  # fmt: skip
    """The config to resume ``cfg.run_dir`` with: the run's own (its config.yaml and the changes of
    earlier resumes) with ``argv``'s options on top; ``cfg`` itself when there is nothing to resume."""
    from umt_fast.config.cli import config_to_dict, differing_fields, saved_run_config

    saved = saved_run_config(cfg.run_dir) if cfg.resume != "none" else None
    if saved is None:
        return cfg
    from umt_fast.engine.checkpoint import list_checkpoints

    if cfg.resume == "auto" and not list_checkpoints(cfg.run_dir):
        return cfg  # a run that stopped before its first checkpoint starts afresh
    run_dir = cfg.run_dir
    resumed = build_config(argv, base=saved)
    resumed.run_dir = run_dir
    if cfg.preset != resumed.preset and any(a.split("=")[0] == "--preset" for a in argv):
        print(f"warning: --preset {cfg.preset} ignored: {run_dir} resumes with its own config (from preset "
              f"{resumed.preset!r})", file=sys.stderr)  # fmt: skip
    changes = differing_fields(saved, config_to_dict(resumed), defaults=config_to_dict(type(resumed)()))
    refused = [k for k in changes if k.startswith(fixed)]
    if refused and not allow_changes:
        listed = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused)
        raise ValueError(f"{run_dir} resumes with the config it trained with, and these options would change its "
                         f"model or data: {listed}. Start a new --run-dir, or pass {ALLOW_CHANGES} to resume with "
                         "them anyway")  # fmt: skip
    listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
    print(f"resuming {run_dir} with the config it trained with" + (f", changing {listed}" if changes else ""),
          file=sys.stderr)  # fmt: skip
    return resumed


def open_run_dir(cfg: Any, info: Any) -> tuple[str | None, Any]:
    """Collective start of a training run: rank 0 creates ``cfg.run_dir``; every rank learns which
    checkpoint ``cfg.resume`` selects (refusing ``none`` over existing checkpoints) and gets the
    ``umt_fast`` logger (log.txt on rank 0); rank 0 then writes config.yaml/config.json (a fresh
    run only: a resumed one keeps them, and the trainer appends its changes to config_history.jsonl).

    Returns:
        (the checkpoint to resume from or None, the logger)
    """
    from umt_fast.engine import checkpoint as ckpt
    from umt_fast.config.cli import HISTORY_FILE, save_config
    from umt_fast.engine.distributed import barrier
    from umt_fast.engine.metrics import setup_logging

    if info.is_main:
        os.makedirs(cfg.run_dir, exist_ok=True)
    barrier()
    resume_path = ckpt.find_resume_checkpoint(cfg.run_dir, cfg.resume)
    logger = setup_logging(cfg.run_dir if info.is_main else None)
    if info.is_main and resume_path is None:  # a resumed run keeps the config.yaml it started with
        save_config(cfg, cfg.run_dir)
        stale_history = os.path.join(cfg.run_dir, HISTORY_FILE)
        if os.path.exists(stale_history):
            os.unlink(stale_history)
    return resume_path, logger


def location_lines(result: Any) -> list[str]:
    """The run directory and the last checkpoint of a training result."""
    checkpoint = os.path.abspath(result.last_checkpoint) if result.last_checkpoint else "(none)"
    return [f"run directory: {os.path.abspath(result.run_dir)}", f"checkpoint:    {checkpoint}"]
