"""A pytest-benchmark JSON (``pytest benchmarks/ --benchmark-json RESULTS.json``) as a bar chart:
mean time per call with its standard deviation, annotated with the throughput where
``extra_info`` records one (``GBps`` or the first key ending in ``_per_s``).

Rows that time the same thing with different implementations are drawn together, ours first
and reference-style rows under them, coloured by implementation, each annotated with its
speed-up over the slowest row of the group. The implementation is ``extra_info["impl"]``, else
a name token starting with ``reference``, ``ref`` or ``baseline`` (reference-style), else ours.
Rows belong together when their names are equal once the implementation token is removed
(``test_kernel[gather_rows-triton]``, ``test_kernel[gather_rows-reference_system]``), or, for
a reference-style row that matches nothing that way, when one test name is a prefix of the
other with the same parameters (``test_sampling_throughput[512]``, ``test_sampling_reference[512]``).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from umt_fast.viz.render import new_figure

_REFERENCE_TOKEN = re.compile(r"(?<![a-z0-9])(?:reference|ref|baseline)\w*", re.IGNORECASE)
OURS_COLOURS = ("#1f77b4", "#17becf", "#2ca02c")
REFERENCE_COLOURS = ("#9a9a9a", "#d9a05b", "#5f5f5f")
ROW_H, BASE_H, GROUP_GAP, WIDTH = 30, 120, 14, 1200


def _without(name: str, token: str) -> str:
    """``name`` with ``token`` (delimited by [ ] - _ or the ends) removed, separators tidied."""
    out = re.sub(rf"(?<![a-z0-9]){re.escape(token)}(?![a-z0-9])", "", name, flags=re.IGNORECASE)
    out = re.sub(r"([-_])[-_]+", r"\1", out)
    out = re.sub(r"[-_]+([\[\]])", r"\1", re.sub(r"\[[-_]+", "[", out))
    return out.replace("[]", "").strip("-_")


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
    def impl(self) -> str:
        """The implementation: extra_info["impl"], else a reference token of the name, else ''."""
        if self.extra_info.get("impl"):
            return str(self.extra_info["impl"])
        match = _REFERENCE_TOKEN.search(self.name)
        return match.group(0) if match else ""

    @property
    def is_reference(self) -> bool:
        return bool(_REFERENCE_TOKEN.fullmatch(self.impl)) if self.impl else False

    @property
    def pair_key(self) -> str:
        """The name without its implementation token; a row and its references share it."""
        return _without(self.name, self.impl) if self.impl else self.name

    @property
    def base_name(self) -> str:
        return self.pair_key.split("[", 1)[0]

    @property
    def params(self) -> str:
        return self.pair_key.split("[", 1)[1] if "[" in self.pair_key else ""

    @property
    def throughput(self) -> tuple[str, float] | None:
        """(unit, value) from extra_info: GB/s, or the first ``*_per_s`` key."""
        for key, value in self.extra_info.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            if key == "GBps":
                return "GB/s", float(value)
            if key.endswith("_per_s"):
                return f"{key.removesuffix('_per_s').replace('_', ' ')}/s", float(value)
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


def group_rows(rows: list[BenchRow]) -> list[list[BenchRow]]:
    """Rows that time the same thing, together: groups in order of pytest-benchmark group and
    first appearance; in a group, ours first, then reference-style rows, each in file order."""
    groups: dict[tuple[str, str], list[BenchRow]] = {}
    for row in rows:
        groups.setdefault((row.group, row.pair_key), []).append(row)
    for key in [k for k, members in groups.items() if all(r.is_reference for r in members)]:
        ref = groups[key][0]
        for (group, _), members in groups.items():
            ours = [r for r in members if not r.is_reference]
            if group == ref.group and ours and ours[0].params == ref.params and (
                ours[0].base_name.startswith(ref.base_name) or ref.base_name.startswith(ours[0].base_name)
            ):
                members += groups.pop(key)
                break
    ordered = sorted(groups.items(), key=lambda item: item[0][0])
    return [[r for r in members if not r.is_reference] + [r for r in members if r.is_reference]
            for _, members in ordered]  # fmt: skip


def order_rows(rows: list[BenchRow]) -> list[BenchRow]:
    """`group_rows`, flattened."""
    return [row for members in group_rows(rows) for row in members]


def _time_unit(seconds: float) -> tuple[float, str]:
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if seconds >= scale:
            return scale, unit
    return 1e-9, "ns"


def bench_figure_size(num_rows: int, num_groups: int) -> tuple[int, int]:
    return WIDTH, BASE_H + num_rows * ROW_H + (num_groups - 1) * GROUP_GAP


def _implementation_colours(rows: list[BenchRow]) -> dict[str, str]:
    ours = [r.impl for r in rows if not r.is_reference]
    references = [r.impl for r in rows if r.is_reference]
    colours = {}
    for names, palette in ((ours, OURS_COLOURS), (references, REFERENCE_COLOURS)):
        for name in dict.fromkeys(names):
            colours[name] = palette[len([c for c in colours.values() if c in palette]) % len(palette)]
    return colours


def draw_bench_report(rows: list[BenchRow], machine_info: dict | None = None, title: str = "") -> Figure:
    """Horizontal bars of the mean time per call (error bar: one standard deviation), grouped and
    coloured as the module docstring says."""
    groups = group_rows(rows)
    rows = [row for members in groups for row in members]
    width, height = bench_figure_size(len(rows), len(groups))
    fig = new_figure(width, height, constrained=True)
    ax = fig.subplots()
    y_positions, y = [], 0.0
    for members in groups:
        for _ in members:
            y_positions.append(-y)
            y += 1
        y += GROUP_GAP / ROW_H
    y_positions = np.array(y_positions)
    colours = _implementation_colours(rows)
    scale, unit = _time_unit(float(np.median([r.mean_s for r in rows])))
    means = np.array([r.mean_s for r in rows]) / scale
    stddevs = np.array([r.stddev_s for r in rows]) / scale
    labels = {impl or "ours": colour for impl, colour in colours.items()}
    ax.barh(y_positions, means, xerr=stddevs, capsize=3, color=[colours[r.impl] for r in rows])
    ax.set_yticks(y_positions, [r.name for r in rows], fontsize=8)
    ax.set_xlabel(f"mean time per call ({unit}; error bar: 1 standard deviation)", fontsize=9)
    if means.max() / max(means.min(), 1e-12) > 100:
        ax.set_xscale("log")
    slowest = {id(r): max(members, key=lambda m: m.mean_s) for members in groups for r in members}
    for yi, row, mean, std in zip(y_positions, rows, means, stddevs):
        row_scale, row_unit = _time_unit(row.mean_s)
        parts = [f"{row.mean_s / row_scale:.3g} {row_unit}"]
        if row.throughput:
            throughput_unit, value = row.throughput
            parts.append(f"{value:.4g} {throughput_unit}")
        baseline = slowest[id(row)]
        if baseline is not row:
            parts.append(f"{baseline.mean_s / row.mean_s:.2f}x faster than {baseline.impl or 'ours'}")
        ax.text(mean + std, yi, "  " + " | ".join(parts), va="center", fontsize=8)
    handles = [Patch(color=colour, label=label) for label, colour in labels.items()]
    ax.legend(handles=handles, fontsize=8, loc="lower right", title="implementation", title_fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(labelsize=8)
    ax.margins(x=0.45 if ax.get_xscale() == "linear" else 0.25, y=0.02)
    machine = ""
    if machine_info:
        cpu = (machine_info.get("cpu") or {}).get("brand_raw", "")
        machine = " | ".join(x for x in (machine_info.get("node", ""), cpu, machine_info.get("python_version", "")) if x)
    fig.suptitle("\n".join(x for x in (title, machine) if x), fontsize=10)
    return fig
