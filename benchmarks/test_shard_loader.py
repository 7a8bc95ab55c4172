"""Loader throughput from shards: ``pytest benchmarks/test_shard_loader.py`` (pytest-benchmark).

The stage-1 loader (`PretrainClipDataset` in `build_pretrain_loader`, one worker process per CPU
core, batches of 4 clips of 8 TSN frames, multi-scale crop to 224, flip) reading the same clips
three ways, on Kinetics-like videos generated in the setup with PyAV: 12 videos, 4 s at 30 fps,
568x320 (320p short side), H.264 (libx264 preset veryfast, CRF 23, yuv420p, x264's default
keyframe interval). Rows, each with clips/s in ``extra_info``:

  - ``files`` : the annotation list of the video files (the baseline, in the same run).
  - ``shards`` : the same list written as tar shards by ``python -m umt_fast.prepare shard``
    (``umt_fast.prepare.main``, about 4 clips per shard), read through its ``manifest.json``:
    each clip is one ranged read of its tar member, decoded from memory.
  - ``s3`` : the same shards uploaded to moto's S3 server (a ``python -m moto.server``
    subprocess on 127.0.0.1, credentials and endpoint in the environment as s3fs reads them),
    read through the ``s3://`` manifest URL: one ranged GET per clip.

Every row reads whole epochs: each round takes 2 epochs of the 12 clips, and every epoch must
hold each record once and skip none; the clips of one batch must equal, bit for bit, the clips
the dataset decodes from the source files in this process. The first round is a warm-up (it
drains the batches prefetched while the loader was idle, which would flatter the wall clock).
Besides clips/s (and per core: one worker per core), every row reports ``clips_per_cpu_s``:
clips per CPU second of the loader's workers, counted between two idle points (prefetch queues
full), which is the per-worker rate even on a machine shared with other jobs. The ``s3`` row
also reports the server's CPU seconds per clip (``server_cpu_s_per_clip``; on one machine it
competes with the workers for the same cores) and ``clips_per_cpu_s_with_server``. The
``shards`` and ``s3`` rows add their ratio to the ``files`` row of the same run
(``clips_per_s_vs_files``, ``clips_per_cpu_s_vs_files``) when that row ran first.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from benchmarks.test_data import _children, _cpu_s
from umt_fast import prepare
from umt_fast.data import PretrainClipDataset, build_pretrain_loader, read_annotation_list
from umt_fast.data.storage import is_member_ref, is_url
from umt_fast.data.synthetic import write_synthetic_video

NUM_FRAMES, IMG_SIZE = 8, 224
NUM_VIDEOS, SECONDS, FPS = 12, 4, 30
CLIPS_PER_SHARD = 4
BATCH = 4
EPOCHS_PER_ROUND, ROUNDS = 2, 4

_files_row: dict[str, float] = {}
"""The ``files`` row's rates in this run, for the other rows' ratios."""


@pytest.fixture(scope="module")
def clip_set(tmp_path_factory) -> dict:
    """The videos' list and the shard set made from it (``prepare shard``)."""
    root = tmp_path_factory.mktemp("shard_loader")
    paths = [
        write_synthetic_video(
            str(root / f"clip_{i:02d}.mp4"), num_frames=SECONDS * FPS, width=568, height=320, fps=FPS,
            codec="libx264", pattern="motion", seed=i, options={"preset": "veryfast", "crf": "23"},
        )
        for i in range(NUM_VIDEOS)
    ]  # fmt: skip
    listing = root / "clips.csv"
    listing.write_text("".join(f"{p},{i}\n" for i, p in enumerate(paths)))
    sizes = [os.path.getsize(p) for p in paths]
    shard_size = CLIPS_PER_SHARD * max(sizes)
    out = root / "shards"
    # One process: a few small shards are written in milliseconds, a pool of spawned workers takes seconds to start.
    assert prepare.main(["shard", str(listing), "--out", str(out), "--shard-size", str(shard_size),
                         "--num-workers", "1"]) == 0  # fmt: skip
    return {"list": listing, "manifest": out / "manifest.json", "dir": out,
            "shards": len(list(out.glob("shard-*.tar"))),
            "mean_kbit_per_s": round(float(np.mean(sizes)) * 8 / 1000 / SECONDS)}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_manifest(clip_set):
    """The shard set on moto's S3 server on 127.0.0.1: (its s3:// manifest URL, the server's pid)."""
    pytest.importorskip("s3fs", reason="the s3 row needs s3fs (pip install 's3fs')", exc_type=ImportError)
    pytest.importorskip("moto.server", reason="the s3 row needs moto's server mode (pip install 'moto[server]')",
                        exc_type=ImportError)  # fmt: skip
    import s3fs

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    env = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"moto's S3 server did not start on 127.0.0.1:{port}") from None
                    time.sleep(0.2)
            fs = s3fs.S3FileSystem()
            fs.mkdir("clips")
            fs.put(str(clip_set["dir"]) + "/", "clips/k/", recursive=True)
            yield "s3://clips/k/manifest.json", server.pid
        finally:
            server.terminate()
            server.wait(timeout=30)


def _cpu_when_idle(pids: list[int]) -> dict[int, float]:
    """Each process's CPU seconds, read once none of them uses CPU any more (all prefetching done)."""
    total = sum(_cpu_s(pid) for pid in pids)
    while True:
        time.sleep(0.3)
        now = {pid: _cpu_s(pid) for pid in pids}
        if sum(now.values()) - total < 0.02:
            return now
        total = sum(now.values())


def _reference_clips(records, positions: list[int]) -> torch.Tensor:
    """The clips at `positions` decoded in this process, on one thread, from the source files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds = PretrainClipDataset(records, NUM_FRAMES, IMG_SIZE, seed=0)
        return torch.stack([ds[p]["video"] for p in positions])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("path", ["files", "shards", "s3"])
def test_shard_loader_clips_per_core(benchmark, request, clip_set, path):
    cores = len(os.sched_getaffinity(0))
    files = read_annotation_list(str(clip_set["list"]))
    server_pid = None
    if path == "files":
        train_list = str(clip_set["list"])
    elif path == "shards":
        train_list = str(clip_set["manifest"])
    else:
        train_list, server_pid = request.getfixturevalue("s3_manifest")
    records = read_annotation_list(train_list)
    assert [r.label for r in records] == [r.label for r in files] == list(range(NUM_VIDEOS))
    if path == "files":
        assert all(os.path.isfile(r.path) for r in records)
    else:
        assert all(is_member_ref(r.path) and is_url(r.path) == (path == "s3") for r in records), records[0].path

    ds = PretrainClipDataset(records, NUM_FRAMES, IMG_SIZE, seed=0)
    batches_per_epoch = NUM_VIDEOS // BATCH
    before = _children()
    it = iter(build_pretrain_loader(ds, BATCH, 0, num_workers=cores, pin_memory=False))
    epochs: list[list[int]] = []
    skipped: list[str] = []

    def take_epochs(n: int) -> None:
        for _ in range(n):
            read = []
            for _ in range(batches_per_epoch):
                batch = next(it)
                read += batch["record_indices"].tolist()
                skipped.extend(batch["skipped"])
            epochs.append(read)

    try:
        first = next(it)  # workers started
        assert first["video"].shape == (BATCH, NUM_FRAMES, IMG_SIZE, IMG_SIZE, 3) and not first["skipped"]
        expected = _reference_clips(files, first["positions"].tolist())
        assert torch.equal(first["video"], expected), f"{path}: the loader's clips differ from the files' clips"
        for _ in range(batches_per_epoch - 1):
            next(it)  # the rest of the first epoch: workers warm, the next round starts at an epoch
        workers = sorted(_children() - before)
        assert len(workers) == cores, (workers, before)
        watched = workers + ([server_pid] if server_pid else [])
        # Between idle points (prefetch queues full) the workers made exactly the batches taken.
        cpu_start = _cpu_when_idle(watched)

        benchmark.pedantic(take_epochs, args=(EPOCHS_PER_ROUND,), rounds=ROUNDS, iterations=1, warmup_rounds=1)
        cpu_end = _cpu_when_idle(watched)
    finally:
        # The workers ignore SIGTERM (`init_worker`): stopped here, so that a failed assertion, whose
        # traceback keeps the iterator alive, cannot leave them for the exit handler to wait on.
        it._shutdown_workers()
    assert skipped == [], skipped[:3]
    assert len(epochs) == (ROUNDS + 1) * EPOCHS_PER_ROUND
    for read in epochs:
        assert sorted(read) == list(range(NUM_VIDEOS)), read  # every clip of the list, once per epoch
    clips_made = len(epochs) * NUM_VIDEOS
    worker_cpu_s = sum(cpu_end[p] - cpu_start[p] for p in workers)
    if benchmark.stats:
        clips_per_s = EPOCHS_PER_ROUND * NUM_VIDEOS / benchmark.stats.stats.mean
        info = dict(
            path=path, cores=cores, workers=cores, batch=BATCH, clips_per_s=clips_per_s,
            clips_per_s_per_core=clips_per_s / cores, clips_per_cpu_s=clips_made / worker_cpu_s,
            videos=NUM_VIDEOS, seconds=SECONDS, shards=0 if path == "files" else clip_set["shards"],
            mean_kbit_per_s=clip_set["mean_kbit_per_s"],
        )  # fmt: skip
        if server_pid:
            server_cpu_s = cpu_end[server_pid] - cpu_start[server_pid]
            info.update(server_cpu_s_per_clip=server_cpu_s / clips_made,
                        clips_per_cpu_s_with_server=clips_made / (worker_cpu_s + server_cpu_s))  # fmt: skip
        if path == "files":
            _files_row.update(clips_per_s=clips_per_s, clips_per_cpu_s=info["clips_per_cpu_s"])
        elif _files_row:
            info.update(clips_per_s_vs_files=clips_per_s / _files_row["clips_per_s"],
                        clips_per_cpu_s_vs_files=info["clips_per_cpu_s"] / _files_row["clips_per_cpu_s"])  # fmt: skip
        benchmark.extra_info.update(info)
