"""Prepare data for training at scale: ``python -m umt_fast.prepare scan|shard LIST``.

    # probe every video of a list in parallel: a report, a summary table and a cleaned list
    python -m umt_fast.prepare scan k710_train.csv --root /data/k710 --out k710_scan --num-workers 16

    # the list's clips and labels (or captions) as tar shards in the WebDataset layout, with indexes and a manifest
    python -m umt_fast.prepare shard k710_scan/clean.csv --root /data/k710 --out k710_shards

``scan`` records for each video whether it decodes (and why not), its duration, frame rate,
constant or variable frame rate, frame count, resolution, codec, keyframe interval and bitrate,
in ``OUT/scan.jsonl`` (one JSON object per line, in list order). It writes ``OUT/clean.csv``,
the list's lines without the unreadable videos and those shorter than ``--min-frames``, and
prints a summary table. A bad file never stops it. Exit code 2 for a missing or malformed list.

``shard`` writes the clips, in list order, into GNU tar files of about ``--shard-size`` bytes in
the WebDataset layout: member ``KEY.<ext>`` (the video's bytes, unchanged, or with ``--reencode``
the video re-encoded by `umt_fast.data.reencode`) and ``KEY.json`` (``{"index", "path", "label"}``,
and for a stage-2 JSON caption list ``"caption"`` and ``"media"``: its captions, ``video`` or
``image``), KEY the clip's 9-digit position in the list. Beside each ``shard-NNNNNN.tar`` an
``.idx.json`` gives every member's data offset and size (one ranged read fetches a clip), and
``manifest.json`` holds the clip count, the source list, the options and each shard's SHA-256,
members, labels or captions, and first and last clip. Shards are written in parallel, each to a
temporary name renamed when complete and logged to ``progress.jsonl``; a rerun (after a kill,
too) skips the finished shards whose bytes, clips and options are unchanged. A missing source
file, or one that cannot be re-encoded, is left out and listed in the manifest with the reason.
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

from umt_fast.data.annotations import VideoRecord, read_annotation_list
from umt_fast.data.decoding import VideoDecodeError, scan_video
from umt_fast.data.storage import read_all
from umt_fast.data.reencode import CODECS, ReencodeOptions, reencode_video
from umt_fast.engine.checkpoint import atomic_write, check_writable
from umt_fast.engine.metrics import format_duration


def scan_image(path: str) -> dict:
    """What ``scan`` records about an image of a caption list: ``ok`` (it decodes) or ``reason``,
    and ``width``, ``height``, ``format``, ``size_bytes``; never raises."""
    from PIL import Image

    record: dict = {"path": path, "media": "image", "ok": False}
    try:
        with Image.open(path) as im:
            im.load()
            record.update(ok=True, width=im.width, height=im.height, format=im.format, size_bytes=os.path.getsize(path))
    except FileNotFoundError:
        record["reason"] = "file not found"
    except Exception as e:  # a scan reports every file and stops on none
        record["reason"] = f"cannot read image: {type(e).__name__}: {e}"
    return record


def _scan_one(task: tuple[int, str, str]) -> tuple[int, dict]:
    index, path, media = task
    return index, scan_image(path) if media == "image" else scan_video(path)


def scan_list(paths: list[str], num_workers: int, progress=None, media: list[str] | None = None) -> list[dict]:
    """`scan_video` (or `scan_image` where ``media`` says "image") of every path, in worker
    processes; the records in input order."""
    records: list[dict | None] = [None] * len(paths)
    tasks = [(i, path, media[i] if media else "video") for i, path in enumerate(paths)]
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
    images = [r for r in records if r.get("media") == "image"]
    ok = [r for r in records if r["ok"] and r.get("media") != "image"]
    short = [r for r in ok if r["frames"] < min_frames]
    what = f"{len(records) - len(images)} videos" + (f" and {len(images)} images" if images else "")
    lines = [f"{len(ok) + sum(r['ok'] for r in images)} of {what} readable; {sum(not r['ok'] for r in records)} "
             f"unreadable, {len(short)} videos shorter than {min_frames} frames"]  # fmt: skip
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

    records = scan_list([e.path for e in entries], args.num_workers, progress, [e.media for e in entries])
    captions = args.list.lower().endswith(".json") and any(e.captions for e in entries)
    for i, (entry, record) in enumerate(zip(entries, records)):
        record["entry" if captions else "line"] = i if captions else entry.line
    kept = [i for i, r in enumerate(records) if r["ok"] and (r.get("media") == "image" or r["frames"] >= args.min_frames)]
    report = os.path.join(out, "scan.jsonl")
    atomic_write(report, lambda tmp: open(tmp, "w").write("".join(json.dumps(r) + "\n" for r in records)))
    if captions:  # a caption list: its entries as written, in a JSON list
        raw = json.loads(read_all(args.list).decode("utf-8-sig"))
        clean = os.path.join(out, "clean.json")
        atomic_write(clean, lambda tmp: open(tmp, "w").write(json.dumps([raw[i] for i in kept], indent=1)))
    else:
        clean = os.path.join(out, "clean.csv")
        atomic_write(clean, lambda tmp: open(tmp, "w").write("".join(entries[i].text + "\n" for i in kept)))
    print(summary_table(records, args.min_frames))
    print(f"wrote {report} and {clean} ({len(kept)} of {len(records)} {'entries' if captions else 'lines'})")
    return 0


SHARD_SIZE = 10**9
REENCODE_FIELDS = ("codec", "fps", "short_side", "keyframe_interval", "max_seconds", "crf")
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


def clip_meta(index: int, entry: VideoRecord) -> dict:
    """A clip's ``KEY.json``: its position in the list, source path, label, and for a caption list
    its captions and media type."""
    meta = {"index": index, "path": entry.path, "label": entry.label}
    if entry.captions:
        meta.update(caption=list(entry.captions), media=entry.media)
    return meta


def clips_sha256(clips: list[tuple[int, VideoRecord]], options: dict) -> str:
    """What a shard is made from (its clips' ``KEY.json`` and the options): a finished shard is
    reused only when this is unchanged."""
    text = json.dumps([options] + [clip_meta(i, e) for i, e in clips], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _member_bytes(entry: VideoRecord, reencode: ReencodeOptions | None) -> tuple[bytes | None, str]:
    """(the video member's bytes, its extension), or (None, why) for a clip left out."""
    if not os.path.isfile(entry.path):
        return None, "file not found"
    if reencode is None or entry.media == "image":
        with open(entry.path, "rb") as f:
            return f.read(), os.path.splitext(entry.path)[1].lower() or ".mp4"
    try:
        return reencode_video(entry.path, reencode), reencode.extension
    except VideoDecodeError as exc:
        return None, f"cannot re-encode: {exc.reason}"


def write_shard(task: tuple[str, list[tuple[int, VideoRecord]], dict]) -> dict:
    """Writes one shard (``(tar path, [(clip index, list entry)], options)``) to a temporary name,
    renames it, writes its index; returns its manifest entry. ``options["reencode"]``: a
    `ReencodeOptions` dict, or None to store the videos' bytes unchanged."""
    tar_path, clips, options = task
    reencode = ReencodeOptions(**options["reencode"]) if options.get("reencode") else None
    tmp = tar_path + ".tmp"
    missing, written = [], []
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for index, entry in clips:
            data, ext = _member_bytes(entry, reencode)
            if data is None:
                missing.append({"index": index, "path": entry.path, "reason": ext})
                continue
            key = f"{index:09d}"
            for name, payload in ((key + ext, data), (key + ".json", json.dumps(clip_meta(index, entry)).encode())):
                info = _plain_member(tarfile.TarInfo(name))
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            written.append(entry)
    members = {}
    with tarfile.open(tmp, "r") as tar:
        for member in tar:
            members[member.name] = [member.offset_data, member.size]
    with open(tmp + ".idx", "w") as f:
        json.dump(members, f)
    os.replace(tmp + ".idx", os.path.splitext(tar_path)[0] + ".idx.json")
    os.replace(tmp, tar_path)
    entry = {"name": os.path.basename(tar_path), "sha256": _sha256(tar_path), "clips": len(written),
             "first_index": clips[0][0], "last_index": clips[-1][0], "missing": missing,
             "index_sha256": _sha256(os.path.splitext(tar_path)[0] + ".idx.json"),
             "source_sha256": clips_sha256(clips, options), "labels": [e.label for e in written]}  # fmt: skip
    if any(e.captions for e in written):  # a caption list (stage 2): what read_shard_manifest gives back
        entry.update(captions=[list(e.captions) for e in written], media=[e.media for e in written])
    return entry


def _plain_member(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """The same member on every machine: no owner, group or modification time."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    info.mode = 0o644
    return info


PROGRESS = "progress.jsonl"


def _reencode_options(args: argparse.Namespace) -> ReencodeOptions | None:
    given = [f"--{name.replace('_', '-')}" for name in REENCODE_FIELDS if getattr(args, name) is not None]
    if not args.reencode:
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --reencode")
        return None
    return ReencodeOptions(**{name: getattr(args, name) for name in REENCODE_FIELDS if getattr(args, name) is not None})


def _finished_shards(out: str) -> dict[str, dict]:
    """The entries of shards an earlier run finished: its manifest's, then those it logged to
    progress.jsonl as each shard completed (a run that was killed has no manifest yet)."""
    found = {}
    manifest_path = os.path.join(out, MANIFEST)
    if os.path.isfile(manifest_path):
        found = {s["name"]: s for s in json.load(open(manifest_path))["shards"]}
    progress = os.path.join(out, PROGRESS)
    if os.path.isfile(progress):
        for line in open(progress, encoding="utf-8"):
            try:
                entry = json.loads(line)
            except ValueError:  # the line a kill cut short
                continue
            found[entry["name"]] = entry
    return found


def shard_command(args: argparse.Namespace) -> int:
    try:
        entries = read_annotation_list(args.list, root=args.root)
        if args.shard_size < 1:
            raise ValueError(f"--shard-size={args.shard_size} must be >= 1")
        reencode = _reencode_options(args)
        check_writable(os.path.join(args.out, MANIFEST), "--out")
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    options = {"shard_size": args.shard_size, "reencode": reencode.as_dict() if reencode else None}
    plan = plan_shards([e.path for e in entries], args.shard_size)
    manifest_path = os.path.join(args.out, MANIFEST)
    previous = _finished_shards(args.out)
    tasks, done = [], {}
    for n, indices in enumerate(plan):
        name = f"shard-{n:06d}.tar"
        path = os.path.join(args.out, name)
        clips = [(i, entries[i]) for i in indices]
        entry = previous.get(name)
        if entry and entry.get("source_sha256") == clips_sha256(clips, options) and os.path.isfile(path) \
                and _sha256(path) == entry["sha256"]:  # fmt: skip
            done[name] = entry  # finished by an earlier run from the same clips and options, and intact
            continue
        tasks.append((path, clips, options))
    print(f"{len(plan)} shards of about {args.shard_size / 1e9:g} GB for {len(entries)} clips; {len(done)} already "
          f"written, {len(tasks)} to write" + (f"; re-encoding to {reencode.codec}" if reencode else ""),
          file=sys.stderr)  # fmt: skip
    start = time.perf_counter()
    pool = multiprocessing.get_context("spawn").Pool(args.num_workers) if args.num_workers > 1 and len(tasks) > 1 else None
    results = pool.imap_unordered(write_shard, tasks) if pool is not None else map(write_shard, tasks)
    try:
        with open(os.path.join(args.out, PROGRESS), "a", encoding="utf-8") as progress:
            for k, entry in enumerate(results, start=1):
                done[entry["name"]] = entry
                progress.write(json.dumps(entry) + "\n")
                progress.flush()
                rate = k / max(time.perf_counter() - start, 1e-9)
                print(f"sharded {k}/{len(tasks)} | {rate:.2f} shards/s | ETA {format_duration((len(tasks) - k) / rate)}",
                      file=sys.stderr, flush=True)  # fmt: skip
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    shards = [done[f"shard-{n:06d}.tar"] for n in range(len(plan))]
    manifest = {"clips": sum(s["clips"] for s in shards), "source_list": os.path.abspath(args.list),
                "root": args.root, "options": options, "layout": "webdataset", "shards": shards}  # fmt: skip
    atomic_write(manifest_path, lambda tmp: open(tmp, "w").write(json.dumps(manifest, indent=1)))
    os.remove(os.path.join(args.out, PROGRESS))
    missing = [m for s in shards for m in s["missing"]]
    print(f"wrote {len(shards)} shards ({manifest['clips']} clips) and {manifest_path}"
          + (f"; {len(missing)} clip(s) left out (missing or not re-encodable), listed there" if missing else ""))  # fmt: skip
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
    shard.add_argument("--reencode", action="store_true",
                       help="re-encode every video (PyAV) with the options below instead of storing its bytes")
    shard.add_argument("--codec", choices=tuple(CODECS), default=None,
                       help="with --reencode: h264 (default) or hevc in MP4, or vp9 in WebM (DALI's CPU backend)")
    shard.add_argument("--fps", type=float, default=None, help="with --reencode: constant frame rate (default: the source's)")
    shard.add_argument("--short-side", type=int, default=None,
                       help="with --reencode: pixels of the shorter side, aspect kept (e.g. 320; default: unchanged)")
    shard.add_argument("--keyframe-interval", type=float, default=None,
                       help="with --reencode: seconds between keyframes (default 1)")
    shard.add_argument("--max-seconds", type=float, default=None, help="with --reencode: keep at most this much (default: all)")
    shard.add_argument("--crf", type=int, default=None, help="with --reencode: constant rate factor (default 23)")
    args = parser.parse_args(argv)
    return scan_command(args) if args.command == "scan" else shard_command(args)


if __name__ == "__main__":
    sys.exit(main())
