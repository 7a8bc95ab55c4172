"""What a run reports: ``metrics.jsonl``, ``log.txt`` and the live progress line."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, TextIO


class MetricsWriter:
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
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def setup_logging(run_dir: str) -> logging.Logger:
    """Logs ``umt_fast.*`` to ``<run_dir>/log.txt`` (everything) and the console (warnings and info)."""
    logger = logging.getLogger("umt_fast")
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    file_handler = logging.FileHandler(os.path.join(run_dir, "log.txt"), encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    console.addFilter(lambda record: not getattr(record, "progress", False))
    logger.addHandler(file_handler)
    logger.addHandler(console)
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
    """step/total, loss, lr, clips/s and ETA: rewritten in place on a terminal, one line
    per update otherwise (and always one line per update in ``log.txt``)."""

    def __init__(self, total_steps: int, logger: logging.Logger, stream: TextIO = sys.stderr):
        self.total_steps = total_steps
        self.logger = logger
        self.stream = stream
        self.interactive = stream.isatty()
        self._start = time.perf_counter()
        self._start_step: int | None = None

    def update(self, step: int, loss: float, lr: float, clips_per_s: float) -> str:
        """``step`` is the number of optimizer steps done so far."""
        if self._start_step is None:
            self._start_step = step - 1
        done = step - self._start_step
        rate = done / max(time.perf_counter() - self._start, 1e-9)
        eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
        width = len(str(self.total_steps))
        line = (
            f"step {step:>{width}}/{self.total_steps} | loss {loss:.4f} | lr {lr:.3e} | "
            f"{clips_per_s:.1f} clips/s | ETA {format_duration(eta)}"
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
