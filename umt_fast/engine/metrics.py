"""What a run reports: ``metrics.jsonl``, ``log.txt``, the live progress line, and the optional
TensorBoard and Weights & Biases mirrors of the metrics.

The training loop writes every record to one `MetricsSinks`, which fans it out to the sinks
the config asks for (`build_metrics_sinks`): ``metrics.jsonl`` always, TensorBoard with
``log.tensorboard``, W&B with ``log.wandb``. A record is either a metrics record
(``{"step": N, "loss": ..., "time": ...}``) or an event (``{"event": "resume", "step": N}``).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import secrets
import sys
import time
from typing import Any, TextIO

import numpy as np

log = logging.getLogger(__name__)

_NOT_SCALARS = ("step", "time", "event")


def scalar_items(record: dict[str, Any]) -> dict[str, float]:
    """The plottable numbers of a metrics record: every int/float value except step and time."""
    return {
        key: float(value)
        for key, value in record.items()
        if key not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class MetricsSink:
    """One destination of a run's metrics. Subclasses override what they support."""

    def write(self, record: dict[str, Any]) -> None:
        """A metrics record (has ``step``) or an event record (has ``event``)."""

    def write_image(self, tag: str, image_HWC: np.ndarray, step: int) -> None:
        """An RGB picture, uint8 [H, W, 3], e.g. the mask figure."""

    def close(self) -> None:
        pass


class MetricsWriter(MetricsSink):
    """Appends one JSON object per line to ``metrics.jsonl``, flushed at once.

    A run killed mid-write can leave a torn last line; on open that fragment is ended with a
    newline so the next record starts cleanly (readers skip lines that do not parse).
    """

    def __init__(self, path: str):
        self.path = path
        needs_newline = False
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        self._file = open(path, "a", encoding="utf-8")
        if needs_newline:
            self._file.write("\n")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``; unparsable (torn) lines are skipped."""
    return read_metrics_counting_skips(path)[0]


def read_metrics_counting_skips(path: str) -> tuple[list[dict[str, Any]], int]:
    """(records, number of non-blank lines skipped because they are not a JSON object)."""
    records, skipped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                skipped += 1
    return records, skipped


class TensorBoardSink(MetricsSink):
    """The scalars of every metrics record (same names as in ``metrics.jsonl``) and the
    pictures, as TensorBoard event files in ``log_dir``.

    Args:
        purge_step: on a resume, the first step the resumed run logs; events of the interrupted
            attempt at or after it are hidden by TensorBoard, so no step shows twice.
    """

    def __init__(self, log_dir: str, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        if "event" in record or "step" not in record:
            return
        walltime = record.get("time")
        for key, value in scalar_items(record).items():
            self._writer.add_scalar(key, value, global_step=record["step"], walltime=walltime)
        self._writer.flush()

    def write_image(self, tag: str, image_HWC: np.ndarray, step: int) -> None:
        self._writer.add_image(tag, image_HWC, global_step=step, dataformats="HWC")
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink(MetricsSink):
    """Every metrics record and picture, logged to a Weights & Biases run.

    The run's id is kept in ``<run_dir>/wandb_run_id.txt`` so that a resumed run continues the
    same W&B run. The x-axis is the record's ``step`` (a W&B custom step metric), so steps
    that a resume logs again do not clash with W&B's own monotonic step counter.

    Args:
        project: the W&B project.
        run_dir: the run directory; its name becomes the W&B run name.
        mode: 'online', 'offline' or 'disabled'; '' leaves it to wandb (WANDB_MODE, else online).
        config: the run's config (a nested dict), shown in W&B.
    """

    def __init__(self, project: str, run_dir: str, mode: str, config: dict[str, Any]):
        import wandb

        self._wandb = wandb
        id_path = os.path.join(run_dir, "wandb_run_id.txt")
        if os.path.isfile(id_path):
            run_id = open(id_path, encoding="utf-8").read().strip()
        else:
            run_id = secrets.token_hex(4)  # W&B ids are [a-z0-9]; not from `random`, whose state the run owns
            with open(id_path, "w", encoding="utf-8") as f:
                f.write(run_id + "\n")
        kwargs: dict[str, Any] = {}
        if mode:
            kwargs["mode"] = mode
        self.run = wandb.init(
            project=project,
            name=os.path.basename(os.path.abspath(run_dir)),
            id=run_id,
            resume="allow",
            dir=os.environ.get("WANDB_DIR") or run_dir,
            config=config,
            settings=wandb.Settings(console="off"),  # log.txt already holds the console
            **kwargs,
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def write(self, record: dict[str, Any]) -> None:
        if "event" in record or "step" not in record:
            return
        self.run.log({"step": record["step"], **scalar_items(record)})

    def write_image(self, tag: str, image_HWC: np.ndarray, step: int) -> None:
        self.run.log({"step": step, tag: self._wandb.Image(image_HWC)})

    def close(self) -> None:
        self.run.finish()


class MetricsSinks(MetricsSink):
    """Fans every record and picture out to a list of sinks, in order."""

    def __init__(self, sinks: list[MetricsSink]):
        self.sinks = list(sinks)

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def write_image(self, tag: str, image_HWC: np.ndarray, step: int) -> None:
        for sink in self.sinks:
            sink.write_image(tag, image_HWC, step)

    def close(self) -> None:
        errors = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # close every sink even if one fails
                errors.append(exc)
        if errors:
            raise errors[0]


def check_sink_packages(tensorboard: bool, wandb_project: str) -> None:
    """Raise ValueError naming the option and the install command when a requested sink's
    package is missing (called before a run starts any work)."""
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError(
            "log.tensorboard=true needs the tensorboard package, which is not installed: "
            "pip install 'umt_fast[tensorboard]' (or pip install tensorboard)"
        )
    if wandb_project and importlib.util.find_spec("wandb") is None:
        raise ValueError(
            f"log.wandb={wandb_project!r} needs the wandb package, which is not installed: "
            "pip install 'umt_fast[wandb]' (or pip install wandb)"
        )


def build_metrics_sinks(
    run_dir: str,
    *,
    tensorboard: bool = False,
    wandb_project: str = "",
    wandb_mode: str = "",
    config: dict[str, Any] | None = None,
    resume_step: int | None = None,
) -> MetricsSinks:
    """``<run_dir>/metrics.jsonl``, plus ``<run_dir>/tensorboard/`` and a W&B run when asked.

    Args:
        resume_step: the step a resumed run continues from (None for a fresh run).
    """
    check_sink_packages(tensorboard, wandb_project)
    sinks: list[MetricsSink] = [MetricsWriter(os.path.join(run_dir, "metrics.jsonl"))]
    try:
        if tensorboard:
            purge_step = None if resume_step is None else resume_step + 1
            sinks.append(TensorBoardSink(os.path.join(run_dir, "tensorboard"), purge_step=purge_step))
        if wandb_project:
            sinks.append(WandbSink(wandb_project, run_dir, wandb_mode, config or {}))
    except BaseException:
        MetricsSinks(sinks).close()
        raise
    return MetricsSinks(sinks)


class _StderrHandler(logging.StreamHandler):
    """A console handler writing to whatever ``sys.stderr`` is at each record (a redirect, or a
    capture that ended since the handler was made), never to a stream closed since."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(run_dir: str | None) -> logging.Logger:
    """Logs ``umt_fast.*`` to ``<run_dir>/log.txt`` (everything) and the console (warnings and info).

    ``run_dir=None`` (ranks other than 0) logs warnings and errors to the console only.
    """
    logger = logging.getLogger("umt_fast")
    logger.setLevel(logging.INFO if run_dir is not None else logging.WARNING)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = _StderrHandler()
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    # progress lines have their own console output; "file_only" records (e.g. the error a command
    # prints itself) go to log.txt alone
    console.addFilter(lambda record: not (getattr(record, "progress", False) or getattr(record, "file_only", False)))
    logger.addHandler(console)
    if run_dir is not None:
        file_handler = logging.FileHandler(os.path.join(run_dir, "log.txt"), encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(file_handler)
    logger.propagate = False
    return logger


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressLine:
    """step/total, loss, lr, throughput, then any extras (TFLOP/s, MFU, data wait, memory) and
    the ETA: rewritten in place on a terminal, one line per update otherwise (and always one
    line per update in ``log.txt``)."""

    def __init__(self, total_steps: int, logger: logging.Logger, stream: TextIO = sys.stderr, unit: str = "clips",
                 start_step: int = 0):  # fmt: skip
        self.total_steps, self.start_step = total_steps, start_step
        self.unit = unit
        self.logger = logger
        self.stream = stream
        self.interactive = stream.isatty()
        self._start = time.perf_counter()
        self._first: tuple[int, float] | None = None

    def update(self, step: int, loss: float, lr: float, clips_per_s: float, extras: str = "") -> str:
        """``step`` is the number of optimizer steps done so far. The ETA comes from the steps
        measured since the first update (the first window's warm-up, worker start and compiles
        left out); at the first update, from that window."""
        now = time.perf_counter()
        if self._first is None or step <= self._first[0]:
            self._first = (step, now)
            seconds_per_step = (now - self._start) / max(step - self.start_step, 1)
        else:
            seconds_per_step = (now - self._first[1]) / (step - self._first[0])
        eta = (self.total_steps - step) * seconds_per_step
        width = len(str(self.total_steps))
        line = (
            f"step {step:>{width}}/{self.total_steps} | loss {loss:.4f} | lr {lr:.3e} | "
            f"{clips_per_s:.1f} {self.unit}/s | {extras + ' | ' if extras else ''}ETA {format_duration(eta)}"
        )
        self.logger.info(line, extra={"progress": True})
        if self.interactive:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        return line

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
