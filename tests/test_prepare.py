"""python -m umt_fast.prepare scan: every video of a list probed in worker processes, a bad file
reported (never a stop), a report, a summary and a cleaned list."""
import json
import os

import av
import pytest

from umt_fast import prepare
from umt_fast.data import sample_clip_paths


def _truth(path):
    """Frame rate, packets, size and codec read with PyAV directly."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        rate, codec = float(stream.average_rate), stream.codec_context.codec.name
        width, height = stream.codec_context.width, stream.codec_context.height
        packets = sum(1 for p in container.demux(stream) if p.size > 0)
    return rate, packets, width, height, codec


def test_scan_reports_every_video_and_writes_a_cleaned_list(tmp_path, capsys):
    clips = sample_clip_paths()
    (tmp_path / "cut.mp4").write_bytes(open(clips[0], "rb").read()[:3000])  # a truncated download
    (tmp_path / "notes.mp4").write_text("not a video")
    listing = tmp_path / "train.csv"
    lines = [f"{clip},{i}" for i, clip in enumerate(clips)]
    lines[1:1] = [f"{tmp_path / 'missing.mp4'},7", f"{tmp_path / 'cut.mp4'},8", f"{tmp_path / 'notes.mp4'},9"]
    listing.write_text("\n".join(lines) + "\n")
    out = tmp_path / "scan"
    assert prepare.main(["scan", str(listing), "--out", str(out), "--num-workers", "2", "--min-frames", "125"]) == 0

    records = [json.loads(line) for line in (out / "scan.jsonl").read_text().splitlines()]
    assert [r["path"] for r in records] == [line.rsplit(",", 1)[0] for line in lines]  # list order
    assert [r["line"] for r in records] == list(range(1, len(lines) + 1))
    bad = {os.path.basename(r["path"]): r["reason"] for r in records if not r["ok"]}
    assert set(bad) == {"missing.mp4", "cut.mp4", "notes.mp4"} and bad["missing.mp4"] == "file not found"
    for r in (r for r in records if r["ok"]):
        rate, packets, width, height, codec = _truth(r["path"])
        assert (r["fps"], r["frames"], r["width"], r["height"], r["codec"]) == (pytest.approx(rate, abs=1e-3), packets,
                                                                              width, height, codec)  # fmt: skip
        assert r["constant_frame_rate"] and r["duration_s"] == pytest.approx(packets / rate, rel=0.05)
        assert r["bitrate_kbps"] == pytest.approx(os.path.getsize(r["path"]) * 8 / r["duration_s"] / 1000, rel=1e-2)
        assert 1 <= r["keyframe_interval"] <= packets
    # the clean list: the readable videos with at least 125 frames, their lines as written
    kept = [line for line, r in zip(lines, records) if r["ok"] and r["frames"] >= 125]
    assert (out / "clean.csv").read_text().splitlines() == kept and 0 < len(kept) < 4
    summary = capsys.readouterr()
    assert "4 of 7 videos readable; 3 unreadable" in summary.out and "file not found" in summary.out
    assert "scanned 7/7" in summary.err and "ETA" in summary.err


def test_scan_of_a_missing_list_is_one_line(tmp_path, capsys):
    assert prepare.main(["scan", str(tmp_path / "nope.csv")]) == 2
    assert "nope.csv" in capsys.readouterr().err


def test_shard_writes_webdataset_tars_with_indexes_and_a_manifest_and_resumes(tmp_path, capsys):
    import hashlib
    import tarfile

    clips = sample_clip_paths()
    listing = tmp_path / "clean.csv"
    listing.write_text("".join(f"{c},{i}\n" for i, c in enumerate(clips)) + f"{tmp_path / 'gone.mp4'},9\n")
    out = tmp_path / "shards"
    args = ["shard", str(listing), "--out", str(out), "--shard-size", str(1_500_000)]
    assert prepare.main(args + ["--num-workers", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["clips"] == 4 and manifest["layout"] == "webdataset" and len(manifest["shards"]) >= 2
    assert [m["path"] for s in manifest["shards"] for m in s["missing"]] == [str(tmp_path / "gone.mp4")]
    seen = []
    for shard in manifest["shards"]:
        tar_path = out / shard["name"]
        assert hashlib.sha256(tar_path.read_bytes()).hexdigest() == shard["sha256"]
        data = tar_path.read_bytes()
        assert data[257:265] == b"ustar  \x00"  # a GNU-format header
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
        index = json.loads((out / shard["name"].replace(".tar", ".idx.json")).read_text())
        assert sorted(index) == sorted(names)
        for name, (offset, size) in index.items():  # one ranged read per member
            member = data[offset:offset + size]
            key = name.split(".")[0]
            if name.endswith(".json"):
                meta = json.loads(member)
                assert meta["index"] == int(key) and meta["label"] == int(key) and meta["path"] == clips[int(key)]
            else:
                assert member == open(clips[int(key)], "rb").read()
                seen.append(int(key))
    assert sorted(seen) == [0, 1, 2, 3]

    # a rerun skips the intact shards and rewrites a damaged one
    damaged = out / manifest["shards"][0]["name"]
    damaged.write_bytes(damaged.read_bytes()[:1000])
    capsys.readouterr()
    assert prepare.main(args + ["--num-workers", "1"]) == 0
    assert f"{len(manifest['shards']) - 1} already written, 1 to write" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text()) == manifest
