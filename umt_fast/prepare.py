"""Prepare data for training at scale: ``python -m umt_fast.prepare scan LIST``.

    # probe every video of a list in parallel: a report, a summary table and a cleaned list
    python -m umt_fast.prepare scan k710_train.csv --root /data/k710 --out k710_scan --num-workers 16

``scan`` records for each video whether it decodes (and why not), its duration, frame rate,
constant or variable frame rate, frame count, resolution, codec, keyframe interval and bitrate,
in ``OUT/scan.jsonl`` (one JSON object per line, in list order). It writes ``OUT/clean.csv``,
the list's lines without the unreadable videos and those shorter than ``--min-frames``, and
prints a summary table. A bad file never stops it. Exit code 2 for a missing or malformed list.
"""
from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import statistics
import sys
import time

from umt_fast.data.annotations import read_annotation_list
from umt_fast.data.decoding import scan_video
from umt_fast.engine.checkpoint import atomic_write, check_writable
from umt_fast.engine.metrics import format_duration


def _scan_one(task: tuple[int, str]) -> tuple[int, dict]:
    index, path = task
    return index, scan_video(path)


def scan_list(paths: list[str], num_workers: int, progress=None) -> list[dict]:
    """`scan_video` of every path, in worker processes; the records in input order."""
    records: list[dict | None] = [None] * len(paths)
    tasks = list(enumerate(paths))
    if num_workers <= 1:
        results = map(_scan_one, tasks)
        pool = None
    else:
        pool = multiprocessing.get_context("spawn").Pool(num_workers)
        results = pool.imap_unordered(_scan_one, tasks, chunksize=max(1, min(16, len(tasks) // (4 * num_workers))))
    try:
        for done, (index, record) in enumerate(results, start=1):
            records[index] = record
            if progress is not None:
                progress(done, len(paths))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return records  # type: ignore[return-value]


def summary_table(records: list[dict], min_frames: int) -> str:
    """The scan's summary: readable / unreadable / too short, the reasons, codecs, resolutions,
    frame rates and the spread of duration, keyframe interval and bitrate."""
    ok = [r for r in records if r["ok"]]
    short = [r for r in ok if r["frames"] < min_frames]
    lines = [f"{len(ok)} of {len(records)} videos readable; {len(records) - len(ok)} unreadable, {len(short)} shorter "
             f"than {min_frames} frames"]  # fmt: skip
    reasons = collections.Counter(r["reason"].split(" (")[0] for r in records if not r["ok"])
    for reason, n in reasons.most_common(5):
        lines.append(f"  unreadable: {n:>6} x {reason}")
    if ok:
        def top(key_fn, label):
            counts = collections.Counter(key_fn(r) for r in ok)
            lines.append(f"{label:<18}" + ", ".join(f"{k} ({n})" for k, n in counts.most_common(4)))

        top(lambda r: r["codec"], "codec")
        top(lambda r: f"{r['width']}x{r['height']}", "resolution")
        top(lambda r: r["fps"], "fps")
        vfr = sum(not r["constant_frame_rate"] for r in ok)
        lines.append(f"{'frame rate':<18}{len(ok) - vfr} constant, {vfr} variable")
        for key, label in (("duration_s", "duration (s)"), ("frames", "frames"), ("keyframe_interval", "keyframe interval"),
                           ("bitrate_kbps", "bitrate (kb/s)")):  # fmt: skip
            values = sorted(r[key] for r in ok)
            lines.append(f"{label:<18}min {values[0]:g}, median {statistics.median(values):g}, max {values[-1]:g}")
    return "\n".join(lines)


def scan_command(args: argparse.Namespace) -> int:
    try:
        entries = read_annotation_list(args.list, root=args.root)
        out = args.out or os.path.splitext(args.list)[0] + "_scan"
        check_writable(os.path.join(out, "scan.jsonl"), "--out")
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    last_print = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last_print[0] > 1.0:
            last_print[0] = now
            rate = done / max(now - start, 1e-9)
            print(f"scanned {done}/{total} | {rate:.1f} videos/s | ETA {format_duration((total - done) / rate)}",
                  file=sys.stderr, flush=True)  # fmt: skip

    records = scan_list([e.path for e in entries], args.num_workers, progress)
    for entry, record in zip(entries, records):
        record["line"] = entry.line
    keep = [e.text for e, r in zip(entries, records) if r["ok"] and r["frames"] >= args.min_frames]
    report, clean = os.path.join(out, "scan.jsonl"), os.path.join(out, "clean.csv")
    atomic_write(report, lambda tmp: open(tmp, "w").write("".join(json.dumps(r) + "\n" for r in records)))
    atomic_write(clean, lambda tmp: open(tmp, "w").write("".join(line + "\n" for line in keep)))
    print(summary_table(records, args.min_frames))
    print(f"wrote {report} and {clean} ({len(keep)} of {len(records)} lines)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m umt_fast.prepare", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{scan}")
    scan = commands.add_parser("scan", help="probe every video of a list: a report, a summary and a cleaned list")
    scan.add_argument("list", help="an annotation list ('path,label' or 'path' lines)")
    scan.add_argument("--root", default="", help="directory that relative paths are resolved against")
    scan.add_argument("--out", default="", help="output directory (default: LIST without its suffix + _scan)")
    scan.add_argument("--num-workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: the CPUs)")
    scan.add_argument("--min-frames", type=int, default=8,
                      help="videos with fewer frames are left out of clean.csv (default 8, the 8-frame recipes)")
    args = parser.parse_args(argv)
    return scan_command(args)


if __name__ == "__main__":
    sys.exit(main())
