"""A pytest-benchmark JSON (``pytest benchmarks/ --benchmark-json RESULTS.json``) as a bar chart:
mean time per call with its standard deviation, annotated with the throughput where
``extra_info`` records one (the first key ending in ``_per_s``).

A reference-style row (a name or parameter marked ``reference``, ``ref`` or ``baseline``, or
``extra_info["impl"]`` set to one of those) is drawn in grey directly under the row it is the
baseline of (the same name without the marker), and that row is annotated with its speed-up.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure

from umt_fast.viz.render import new_figure

_REFERENCE_MARK = re.compile(r"(?<![a-z0-9])(reference|ref|baseline)(?![a-z0-9])", re.IGNORECASE)
OURS_COLOUR, REFERENCE_COLOUR = "#1f77b4", "#9a9a9a"
ROW_H, BASE_H, WIDTH = 34, 130, 1200


@dataclass
class BenchRow:
    """One benchmark: its name, mean and standard deviation in seconds, and extra_info."""

    name: str
    group: str
    mean_s: float
    stddev_s: float
    rounds: int
    extra_info: dict = field(default_factory=dict)

    @property
    def is_reference(self) -> bool:
        impl = str(self.extra_info.get("impl", ""))
        return bool(_REFERENCE_MARK.search(self.name)) or impl.lower() in ("reference", "ref", "baseline")

    @property
    def base_name(self) -> str:
        """The test name before any ``[params]``, without a reference marker."""
        base = _REFERENCE_MARK.sub("", self.name.split("[", 1)[0])
        return re.sub(r"[-_]{2,}", "_", base).strip("-_")

    @property
    def params(self) -> str:
        """The ``[params]`` part of the name without a reference marker ('' if none)."""
        if "[" not in self.name:
            return ""
        return _REFERENCE_MARK.sub("", self.name.split("[", 1)[1]).strip("-_]")

    @property
    def throughput(self) -> tuple[str, float] | None:
        for key, value in self.extra_info.items():
            if key.endswith("_per_s") and isinstance(value, (int, float)) and math.isfinite(value):
                return key, float(value)
        return None


def load_benchmarks(path: str) -> tuple[list[BenchRow], dict]:
    """Rows of a pytest-benchmark JSON and its machine_info.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, not pytest-benchmark output, or no benchmarks in it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}); expected pytest --benchmark-json output") from e
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path} has no 'benchmarks' list; expected pytest --benchmark-json output")
    rows = []
    for bench in data["benchmarks"]:
        stats = bench.get("stats") or {}
        if not isinstance(stats.get("mean"), (int, float)):
            continue
        rows.append(BenchRow(
            name=str(bench.get("name", "?")), group=str(bench.get("group") or ""),
            mean_s=float(stats["mean"]), stddev_s=float(stats.get("stddev") or 0.0),
            rounds=int(stats.get("rounds") or 0), extra_info=dict(bench.get("extra_info") or {}),
        ))  # fmt: skip
    if not rows:
        raise ValueError(f"{path} holds no benchmark results")
    return rows, dict(data.get("machine_info") or {})


def reference_of(row: BenchRow, rows: list[BenchRow]) -> BenchRow | None:
    """The reference-style row that ``row`` is compared with: same group and params, and one
    base name a prefix of the other (``test_sampling_reference`` for ``test_sampling_throughput``);
    the longest shared name wins."""
    if row.is_reference:
        return None
    best, best_len = None, 0
    for ref in rows:
        if not ref.is_reference or ref.group != row.group or ref.params != row.params:
            continue
        a, b = ref.base_name, row.base_name
        if a.startswith(b) or b.startswith(a):
            shared = min(len(a), len(b))
            if shared > best_len:
                best, best_len = ref, shared
    return best


def order_rows(rows: list[BenchRow]) -> list[BenchRow]:
    """By group, then file order; each reference row right under the row it is the baseline of."""
    ordered: list[BenchRow] = []
    for row in sorted((r for r in rows if not r.is_reference), key=lambda r: r.group):
        ordered.append(row)
        ref = reference_of(row, rows)
        if ref is not None and ref not in ordered:
            ordered.append(ref)
    return ordered + [r for r in rows if r not in ordered]


def _time_unit(seconds: float) -> tuple[float, str]:
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if seconds >= scale:
            return scale, unit
    return 1e-9, "ns"


def bench_figure_size(num_rows: int) -> tuple[int, int]:
    return WIDTH, BASE_H + num_rows * ROW_H


def draw_bench_report(rows: list[BenchRow], machine_info: dict | None = None, title: str = "") -> Figure:
    """Horizontal bars of the mean time per call (error bar: one standard deviation), each
    annotated with its throughput from extra_info and, against a reference row, the speed-up."""
    rows = order_rows(rows)
    width, height = bench_figure_size(len(rows))
    fig = new_figure(width, height, constrained=True)
    ax = fig.subplots()
    y = np.arange(len(rows))[::-1]
    colours = [REFERENCE_COLOUR if r.is_reference else OURS_COLOUR for r in rows]
    scale, unit = _time_unit(float(np.median([r.mean_s for r in rows])))
    means = np.array([r.mean_s for r in rows]) / scale
    stddevs = np.array([r.stddev_s for r in rows]) / scale
    ax.barh(y, means, xerr=stddevs, color=colours, capsize=3)
    ax.set_yticks(y, [r.name for r in rows], fontsize=8)
    ax.set_xlabel(f"mean time per call ({unit}; error bar: 1 standard deviation)", fontsize=9)
    if means.max() / max(means.min(), 1e-12) > 100:
        ax.set_xscale("log")
    for yi, row, mean, std in zip(y, rows, means, stddevs):
        parts = [f"{mean:.3g} {unit}"]
        if row.throughput:
            name, value = row.throughput
            parts.append(f"{value:.4g} {name.removesuffix('_per_s').replace('_', ' ')}/s")
        ref = reference_of(row, rows)
        if ref is not None:
            parts.append(f"{ref.mean_s / row.mean_s:.2f}x the speed of the reference")
        ax.text(mean + std, yi, "  " + " | ".join(parts), va="center", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(labelsize=8)
    ax.margins(x=0.45 if ax.get_xscale() == "linear" else 0.2)
    machine = ""
    if machine_info:
        cpu = (machine_info.get("cpu") or {}).get("brand_raw", "")
        machine = " | ".join(x for x in (machine_info.get("node", ""), cpu, machine_info.get("python_version", "")) if x)
    legend = "blue: umt_fast" + ("; grey: reference-style rows" if any(r.is_reference for r in rows) else "")
    fig.suptitle("\n".join(x for x in (title, machine, legend) if x), fontsize=10)
    return fig
