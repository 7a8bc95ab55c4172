"""Prepare data for training at scale: ``python -m umt_fast.prepare scan|shard LIST``.

    # probe every video of a list in parallel: a report, a summary table and a cleaned list
    python -m umt_fast.prepare scan k710_train.csv --root /data/k710 --out k710_scan --num-workers 16

    # the list's clips and labels as tar shards in the WebDataset layout, with indexes and a manifest
    python -m umt_fast.prepare shard k710_scan/clean.csv --root /data/k710 --out k710_shards

``scan`` records for each video whether it decodes (and why not), its duration, frame rate,
constant or variable frame rate, frame count, resolution, codec, keyframe interval and bitrate,
in ``OUT/scan.jsonl`` (one JSON object per line, in list order). It writes ``OUT/clean.csv``,
the list's lines without the unreadable videos and those shorter than ``--min-frames``, and
prints a summary table. A bad file never stops it. Exit code 2 for a missing or malformed list.

``shard`` writes the clips, in list order, into GNU tar files of about ``--shard-size`` bytes in
the WebDataset layout: member ``KEY.<ext>`` (the video's bytes, unchanged) and ``KEY.json``
(``{"index", "path", "label"}``), KEY the clip's 9-digit position in the list. Beside each
``shard-NNNNNN.tar`` an ``.idx.json`` gives every member's data offset and size (one ranged read
fetches a clip), and ``manifest.json`` holds the clip count, the source list, the options and
each shard's SHA-256, members and first and last clip. Shards are written in parallel, each to a
temporary name renamed when complete; a rerun checks the finished shards against the manifest's
checksums and skips them. A missing source file is left out and listed in the manifest.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import multiprocessing
import os
import statistics
import sys
import tarfile
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


SHARD_SIZE = 10**9
MANIFEST = "manifest.json"


def plan_shards(paths: list[str], shard_size: int) -> list[list[int]]:
    """The clips of each shard, in list order: a new shard starts when the next file would take
    the current one past ``shard_size`` bytes (a shard holds at least one clip). Missing files
    count as empty here and are left out when written."""
    shards, current, size = [], [], 0
    for i, path in enumerate(paths):
        nbytes = os.path.getsize(path) if os.path.isfile(path) else 0
        if current and size + nbytes > shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes + 1024  # with the two members' tar headers
    if current:
        shards.append(current)
    return shards


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(task: tuple[str, list[tuple[int, str, int | None]]]) -> dict:
    """Writes one shard (``(tar path, [(clip index, video path, label)])``) to a temporary name,
    renames it, writes its index; returns its manifest entry."""
    tar_path, clips = task
    tmp = tar_path + ".tmp"
    missing = []
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for index, path, label in clips:
            if not os.path.isfile(path):
                missing.append({"index": index, "path": path})
                continue
            key = f"{index:09d}"
            ext = os.path.splitext(path)[1].lower() or ".mp4"
            tar.add(path, arcname=key + ext, recursive=False, filter=_plain_member)
            meta = json.dumps({"index": index, "path": path, "label": label}).encode()
            info = _plain_member(tarfile.TarInfo(key + ".json"))
            info.size = len(meta)
            tar.addfile(info, io.BytesIO(meta))
    members = {}
    with tarfile.open(tmp, "r") as tar:
        for member in tar:
            members[member.name] = [member.offset_data, member.size]
    with open(tmp + ".idx", "w") as f:
        json.dump(members, f)
    os.replace(tmp + ".idx", os.path.splitext(tar_path)[0] + ".idx.json")
    os.replace(tmp, tar_path)
    indices = [i for i, _, _ in clips]
    gone = {m["index"] for m in missing}
    return {"name": os.path.basename(tar_path), "sha256": _sha256(tar_path), "clips": len(clips) - len(missing),
            "first_index": indices[0], "last_index": indices[-1], "missing": missing,
            "index_sha256": _sha256(os.path.splitext(tar_path)[0] + ".idx.json"),
            "labels": [label for i, _, label in clips if i not in gone]}  # fmt: skip


def _plain_member(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """The same member on every machine: no owner, group or modification time."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    info.mode = 0o644
    return info


def shard_command(args: argparse.Namespace) -> int:
    try:
        entries = read_annotation_list(args.list, root=args.root)
        if args.shard_size < 1:
            raise ValueError(f"--shard-size={args.shard_size} must be >= 1")
        check_writable(os.path.join(args.out, MANIFEST), "--out")
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plan = plan_shards([e.path for e in entries], args.shard_size)
    manifest_path = os.path.join(args.out, MANIFEST)
    previous = {}
    if os.path.isfile(manifest_path):
        previous = {s["name"]: s for s in json.load(open(manifest_path))["shards"]}
    tasks, done = [], {}
    for n, indices in enumerate(plan):
        name = f"shard-{n:06d}.tar"
        path = os.path.join(args.out, name)
        entry = previous.get(name)
        if entry and entry["first_index"] == indices[0] and entry["last_index"] == indices[-1] \
                and os.path.isfile(path) and _sha256(path) == entry["sha256"]:  # fmt: skip
            gone = {m["index"] for m in entry["missing"]}
            index_path = os.path.splitext(path)[0] + ".idx.json"
            entry.setdefault("labels", [entries[i].label for i in indices if i not in gone])
            if "index_sha256" not in entry and os.path.isfile(index_path):  # a manifest from before these fields
                entry["index_sha256"] = _sha256(index_path)
            done[name] = entry  # finished by an earlier run, and intact
            continue
        tasks.append((path, [(i, entries[i].path, entries[i].label) for i in indices]))
    print(f"{len(plan)} shards of about {args.shard_size / 1e9:g} GB for {len(entries)} clips; {len(done)} already "
          f"written, {len(tasks)} to write", file=sys.stderr)  # fmt: skip
    start = time.perf_counter()
    pool = multiprocessing.get_context("spawn").Pool(args.num_workers) if args.num_workers > 1 and len(tasks) > 1 else None
    results = pool.imap_unordered(write_shard, tasks) if pool is not None else map(write_shard, tasks)
    try:
        for k, entry in enumerate(results, start=1):
            done[entry["name"]] = entry
            rate = k / max(time.perf_counter() - start, 1e-9)
            print(f"sharded {k}/{len(tasks)} | {rate:.2f} shards/s | ETA {format_duration((len(tasks) - k) / rate)}",
                  file=sys.stderr, flush=True)  # fmt: skip
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    shards = [done[f"shard-{n:06d}.tar"] for n in range(len(plan))]
    manifest = {"clips": sum(s["clips"] for s in shards), "source_list": os.path.abspath(args.list),
                "root": args.root, "options": {"shard_size": args.shard_size}, "layout": "webdataset",
                "shards": shards}  # fmt: skip
    atomic_write(manifest_path, lambda tmp: open(tmp, "w").write(json.dumps(manifest, indent=1)))
    missing = [m for s in shards for m in s["missing"]]
    print(f"wrote {len(shards)} shards ({manifest['clips']} clips) and {manifest_path}"
          + (f"; {len(missing)} missing file(s) left out, listed there" if missing else ""))  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m umt_fast.prepare", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{scan,shard}")
    scan = commands.add_parser("scan", help="probe every video of a list: a report, a summary and a cleaned list")
    scan.add_argument("list", help="an annotation list ('path,label' or 'path' lines)")
    scan.add_argument("--root", default="", help="directory that relative paths are resolved against")
    scan.add_argument("--out", default="", help="output directory (default: LIST without its suffix + _scan)")
    scan.add_argument("--num-workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: the CPUs)")
    scan.add_argument("--min-frames", type=int, default=8,
                      help="videos with fewer frames are left out of clean.csv (default 8, the 8-frame recipes)")
    shard = commands.add_parser("shard", help="the clips and labels as WebDataset tar shards, with indexes and a manifest")
    shard.add_argument("list", help="an annotation list (e.g. a scan's clean.csv)")
    shard.add_argument("--out", required=True, help="output directory")
    shard.add_argument("--root", default="", help="directory that relative paths are resolved against")
    shard.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="bytes per shard, about (default 1e9)")
    shard.add_argument("--num-workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: the CPUs)")
    args = parser.parse_args(argv)
    return scan_command(args) if args.command == "scan" else shard_command(args)


if __name__ == "__main__":
    sys.exit(main())
