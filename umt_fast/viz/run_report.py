"""A run at a glance, from its ``metrics.jsonl``: loss, learning rate, throughput, data wait,
skipped samples and (when logged) MFU, against the step, with wall time on a second axis and
every resume marked.

Reading rules:
- records of the same step are merged (fine-tuning logs its evaluation beside the training
  record of that step); a step whose training record comes twice (a resumed run repeats the
  steps after its checkpoint) keeps the later one's values;
- ``{"event": "resume", "step": N}`` records become vertical lines at step N;
- lines that do not parse (a torn last line after a crash) are skipped and counted;
- a missing file raises FileNotFoundError, an empty one (or one without a metrics record)
  ValueError, both naming the path.
"""
from __future__ import annotations

import base64
import html
import math
import os
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from umt_fast.engine.metrics import format_duration, read_metrics_counting_skips
from umt_fast.viz.render import new_figure

METRICS_FILE = "metrics.jsonl"
PANELS: tuple[tuple[str, str], ...] = (
    ("loss", "loss (mean over the logging window)"),
    ("uta", "UTA (stage 2)"),
    ("vtc", "VTC (stage 2)"),
    ("vtm", "VTM (stage 2)"),
    ("mlm", "MLM (stage 2)"),
    ("train/top1", "train top-1 (%)"),
    ("eval/top1", "eval top-1 (%)"),
    ("lr", "learning rate"),
    ("clips/s", "throughput (clips/s)"),
    ("pairs/s", "throughput (pairs/s)"),
    ("data_wait_ms", "data wait per step (ms)"),
    ("data_time", "data wait per step (s)"),
    ("tflops", "model TFLOP/s per device"),
    ("data/skipped", "skipped samples (total)"),
    ("mfu", "MFU"),
    ("peak_mem_gb", "peak memory (GB)"),
)
"""(metrics key, panel title), in drawing order; a key that no record has gets no panel."""
PANEL_W, PANEL_H, TITLE_H = 620, 290, 90
RESUME_COLOUR = "#d62728"


@dataclass
class RunMetrics:
    """The deduplicated metrics of one run.

    Attributes:
        path: the metrics.jsonl read.
        steps: int64 [S], ascending and unique.
        values: key -> float64 [S] (NaN where that step's record lacks the key).
        wall_s: float64 [S], seconds since the first kept record's ``time`` (non-decreasing);
            None when the records carry no time.
        resume_steps: the step of every resume event, in file order.
        num_superseded: training records replaced by a later one of the same step (repeated steps).
        num_unparsable: non-blank lines that were not a JSON object (e.g. a torn last line).
    """

    path: str
    steps: np.ndarray
    values: dict[str, np.ndarray]
    wall_s: np.ndarray | None
    resume_steps: list[int]
    num_superseded: int
    num_unparsable: int

    def last(self, key: str) -> float | None:
        finite = self.values.get(key, np.array([]))
        finite = finite[np.isfinite(finite)]
        return float(finite[-1]) if finite.size else None


def metrics_path(run_dir_or_file: str) -> str:
    """``<dir>/metrics.jsonl`` for a directory, the path itself for a file."""
    return os.path.join(run_dir_or_file, METRICS_FILE) if os.path.isdir(run_dir_or_file) else run_dir_or_file


def load_run_metrics(run_dir_or_file: str) -> RunMetrics:
    """Read and deduplicate a run's metrics (see the module docstring for the rules).

    Raises:
        FileNotFoundError: the file (or the run directory's metrics.jsonl) does not exist.
        ValueError: the file is empty or holds no metrics record.
    """
    path = metrics_path(run_dir_or_file)
    if not os.path.isfile(path):
        hint = "" if path.endswith(METRICS_FILE) else f" (expected a run directory or its {METRICS_FILE})"
        raise FileNotFoundError(f"{path}: no such file{hint}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty: the run has not logged a step yet")
    records, num_unparsable = read_metrics_counting_skips(path)
    by_step: dict[int, dict] = {}
    resume_steps: list[int] = []
    num_superseded = 0
    for record in records:
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        if record.get("event") == "resume":
            resume_steps.append(step)
        elif "event" not in record:
            earlier = by_step.setdefault(step, {})
            if "loss" in record and "loss" in earlier:  # the step again, after a resume
                num_superseded += 1
                earlier = by_step[step] = {k: v for k, v in earlier.items() if k.startswith("eval/")}
            earlier.update(record)
    if not by_step:
        raise ValueError(
            f"{path} holds no metrics record ({len(records)} records without a step's metrics, "
            f"{num_unparsable} unparsable lines): nothing to plot yet"
        )
    steps = np.array(sorted(by_step), dtype=np.int64)
    ordered = [by_step[s] for s in steps.tolist()]
    keys = [key for key, _ in PANELS if any(key in r for r in ordered)]
    values = {key: np.array([_number(r.get(key)) for r in ordered], dtype=np.float64) for key in keys}
    times = np.array([_number(r.get("time")) for r in ordered], dtype=np.float64)
    wall_s = None
    has_time = np.isfinite(times)
    if has_time.any():
        # Interpolate records without a time, and never let wall time run backwards.
        index = np.arange(len(times))
        filled = np.maximum.accumulate(np.interp(index, index[has_time], times[has_time]))
        wall_s = filled - filled[0]
    return RunMetrics(path, steps, values, wall_s, resume_steps, num_superseded, num_unparsable)


def _number(value) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


def summary_lines(metrics: RunMetrics) -> list[str]:
    """One headline and the reading notes of a run, for the figure title and the HTML page."""
    name = os.path.basename(os.path.dirname(os.path.abspath(metrics.path))) or metrics.path
    first, last = int(metrics.steps[0]), int(metrics.steps[-1])
    parts = [f"{name}: steps {first}-{last} ({len(metrics.steps)} logged)"]
    loss = metrics.last("loss")
    if loss is not None:
        parts.append(f"last loss {loss:.4f}")
    if metrics.wall_s is not None:
        parts.append(f"wall time {format_duration(float(metrics.wall_s[-1]))}")
    resumes = len(metrics.resume_steps)
    parts.append(f"{resumes} resume{'s' if resumes != 1 else ''}")
    notes = []
    if metrics.num_superseded:
        notes.append(f"{metrics.num_superseded} records of repeated steps replaced by the later ones")
    if metrics.num_unparsable:
        notes.append(f"{metrics.num_unparsable} unparsable line{'s' if metrics.num_unparsable != 1 else ''} "
                     "skipped (e.g. a torn last line)")  # fmt: skip
    return [" | ".join(parts)] + (["; ".join(notes)] if notes else [])


def run_figure_size(num_panels: int) -> tuple[int, int]:
    """(width, height) in pixels of a run report with ``num_panels`` panels."""
    rows = max(1, math.ceil(num_panels / 2))
    return 2 * PANEL_W, TITLE_H + rows * PANEL_H


def draw_run_report(metrics: RunMetrics) -> Figure:
    """Two columns of panels, x = step; the top axis labels the same ticks with the wall time
    reached at that step; resumes are red dashed lines."""
    keys = [key for key, _ in PANELS if key in metrics.values and np.isfinite(metrics.values[key]).any()]
    titles = dict(PANELS)
    width, height = run_figure_size(len(keys))
    fig = new_figure(width, height, constrained=True)
    lines = summary_lines(metrics)
    fig.suptitle("\n".join(lines), fontsize=11)
    rows = max(1, math.ceil(len(keys) / 2))
    axes = fig.subplots(rows, 2, squeeze=False, sharex=True)
    steps = metrics.steps.astype(np.float64)
    wall = metrics.wall_s
    has_wall_axis = wall is not None and len(steps) >= 2 and wall[-1] > 0

    def wall_label(x: float, _pos) -> str:
        # The wall time reached at step x; blank outside the logged steps.
        if x < steps[0] or x > steps[-1]:
            return ""
        return format_duration(float(np.interp(x, steps, wall)))

    for i, ax in enumerate(axes.flat):
        if i >= len(keys):
            ax.set_visible(False)
            continue
        key = keys[i]
        y = metrics.values[key]
        ok = np.isfinite(y)
        style = dict(marker="o", markersize=3) if ok.sum() <= 60 else {}
        if key == "data/skipped":
            ax.step(steps[ok], y[ok], where="post", color="C3", **style)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(-0.5, max(1.0, float(np.nanmax(y))) * 1.1 + 0.5)
        else:
            ax.plot(steps[ok], y[ok], color="C0", linewidth=1.2, **style)
        if key == "loss" and ok.sum() > 20:
            window = _smoothing_window(int(ok.sum()))
            ax.plot(steps[ok], _moving_average(y[ok], window), color="C1", linewidth=1.8,
                    label=f"moving average ({window} records)")  # fmt: skip
        if key == "lr":
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
        if key == "mfu" and np.nanmax(y) <= 1.0:
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1%}"))
        for j, resume in enumerate(metrics.resume_steps):
            ax.axvline(resume, color=RESUME_COLOUR, linestyle="--", linewidth=1.0,
                       label=f"resume at step {resume}" if i == 0 and j < 3 else None)  # fmt: skip
        ax.set_title(titles[key], fontsize=10)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if i >= len(keys) - 2:
            ax.set_xlabel("step", fontsize=9)
            ax.tick_params(labelbottom=True)
        if has_wall_axis:
            top = ax.secondary_xaxis("top")
            top.xaxis.set_major_locator(ax.xaxis.get_major_locator())
            top.xaxis.set_major_formatter(FuncFormatter(wall_label))
            top.tick_params(labelsize=7, colors="0.4")
            if i < 2:
                top.set_xlabel("wall time at that step (since the first record)", fontsize=8, color="0.4")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    return fig


def _smoothing_window(num_points: int) -> int:
    """An odd window of about 1/20 of the points, at least 5."""
    return max(5, num_points // 20) | 1


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average, [S] -> [S]; the window shrinks at the ends (no lag, no padding)."""
    half = window // 2
    cumsum = np.concatenate([[0.0], np.cumsum(y)])
    lo = np.clip(np.arange(len(y)) - half, 0, len(y))
    hi = np.clip(np.arange(len(y)) + half + 1, 0, len(y))
    return (cumsum[hi] - cumsum[lo]) / (hi - lo)


def write_run_html(metrics: RunMetrics, png_path: str, html_path: str) -> str:
    """A self-contained page: the report PNG (embedded) and a table of the last values."""
    with open(png_path, "rb") as f:
        png_b64 = base64.b64encode(f.read()).decode("ascii")
    rows = "".join(
        f"<tr><td>{html.escape(key)}</td><td>{metrics.last(key):.6g}</td></tr>"
        for key in metrics.values
        if metrics.last(key) is not None
    )
    resumes = ", ".join(map(str, metrics.resume_steps)) or "none"
    title = html.escape(summary_lines(metrics)[0])
    notes = "".join(f"<p>{html.escape(line)}</p>" for line in summary_lines(metrics)[1:])
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}}td{{padding:2px 12px}}img{{max-width:100%}}</style></head>
<body><h2>{title}</h2>{notes}
<p>metrics: {html.escape(os.path.abspath(metrics.path))}<br>resumed at steps: {resumes}</p>
<table><tr><th align="left">last value</th><th></th></tr>{rows}</table>
<img alt="run report" src="data:image/png;base64,{png_b64}">
</body></html>
"""
    tmp = f"{html_path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, html_path)
    return html_path
