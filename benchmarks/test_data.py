"""Data-path throughput: ``pytest benchmarks/test_data.py`` (pytest-benchmark).

Clips of the stage-1 recipe (8 TSN frames, multi-scale crop to 224, flip) from Kinetics-like
videos generated in the setup with PyAV: 10 s at 30 fps, 568x320 (320p short side), H.264
(libx264 preset veryfast, CRF 23, yuv420p), keyframe interval 250 (x264's default, which most
re-encoded Kinetics copies carry) or 30 (1 s GOPs). Rows, each with clips/s in ``extra_info``:

  - ``pyav_plan`` : the PyAV path in one process on one core (`PretrainClipDataset`): probe,
    seek to the keyframe before the first sampled frame, decode to the last, crop + resize.
  - ``pyav_plan_decode_all`` : the same path decoding every frame from the seek to the last
    frame of a run, as before non-reference frames nothing needs were skipped
    (`decoding.SKIP_UNNEEDED_FRAMES = False`): the baseline for that change, in the same run.
  - ``pyav_every_frame`` : the baseline in the same run, the same clips read the way a
    decode-everything loader does: decode every frame of the video, keep the 8 sampled ones.
  - ``pyav_loader`` : the DataLoader with one worker process per CPU core, clips/s per core.
  - ``dali_plan`` : the CPU side of the DALI path, measured on any machine: reading a file and
    planning its clip (`sample_plan(keep_bytes=True)`), what the probe threads do per clip.
  - ``dali_gpu`` : the DALI path (NVDEC) on one GPU, when a GPU and DALI are present.

The per-core rows set ``torch.set_num_threads(1)``; PyAV decodes on one thread. Besides the
wall-clock time, every row reports ``clips_per_cpu_s``: clips per second of CPU time of the
processes doing the work (this thread, or the loader's workers), which is the per-core rate
even on a machine shared with other jobs.
"""
from __future__ import annotations

import os
import time

import av
import numpy as np
import pytest
import torch

from umt_fast.data import (
    PretrainClipDataset,
    VideoRecord,
    build_pretrain_loader,
    crop_resize_flip,
    dali_available,
)
from umt_fast.data import decoding
from umt_fast.data.synthetic import write_synthetic_video

NUM_FRAMES, IMG_SIZE = 8, 224
VIDEOS_PER_GOP = 2
CLIPS_PER_ROUND = 6
ON_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def kinetics_like(tmp_path_factory) -> dict[int, list[VideoRecord]]:
    """Keyframe interval -> VIDEOS_PER_GOP H.264 videos, 10 s, 30 fps, 568x320."""
    root = tmp_path_factory.mktemp("kinetics_like")
    videos = {}
    for gop in (250, 30):
        videos[gop] = [
            VideoRecord(
                write_synthetic_video(
                    str(root / f"gop{gop}_{i}.mp4"), num_frames=300, width=568, height=320, fps=30,
                    codec="libx264", pattern="motion", gop=gop, seed=i, options={"preset": "veryfast", "crf": "23"},
                ),
                i,
            )
            for i in range(VIDEOS_PER_GOP)
        ]  # fmt: skip
    return videos


@pytest.fixture
def one_core():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _describe(records: list[VideoRecord]) -> dict:
    sizes = [os.path.getsize(r.path) for r in records]
    return {"videos": len(records), "mean_kbit_per_s": round(float(np.mean(sizes)) * 8 / 1000 / 10)}


def _children() -> set[int]:
    pids = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids |= {int(pid) for pid in f.read().split()}
        except FileNotFoundError:  # a thread that ended since the listing
            pass
    return pids


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_s_when_idle(pids: list[int]) -> float:
    """The processes' total CPU seconds, read once they stop using CPU (all prefetching done)."""
    total = sum(_cpu_s(pid) for pid in pids)
    while True:
        time.sleep(0.3)
        now = sum(_cpu_s(pid) for pid in pids)
        if now - total < 0.02:
            return now
        total = now


def _every_frame_clip(ds: PretrainClipDataset, position: int) -> torch.Tensor:
    """The plan's clip read by decoding every frame of the video (the baseline)."""
    plan = ds.sample_plan(position)
    wanted = set(plan.frame_indices)
    kept = {}
    with av.open(plan.path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24")
    frames = torch.from_numpy(np.stack([kept[i] for i in plan.frame_indices]))
    return crop_resize_flip(frames, plan.crop_box, IMG_SIZE, plan.flip)


@pytest.mark.parametrize("gop", [250, 30])
@pytest.mark.parametrize("path", ["pyav_plan", "pyav_plan_decode_all", "pyav_every_frame"])
def test_pyav_clips_per_core(benchmark, kinetics_like, one_core, monkeypatch, path, gop):
    monkeypatch.setattr(decoding, "SKIP_UNNEEDED_FRAMES", path != "pyav_plan_decode_all")
    ds = PretrainClipDataset(kinetics_like[gop], NUM_FRAMES, IMG_SIZE, seed=0)
    positions = iter(range(10**9))
    read = (lambda p: _every_frame_clip(ds, p)) if path == "pyav_every_frame" else (lambda p: ds[p]["video"])

    cpu_s = []

    def run():
        start = time.thread_time()
        for _ in range(CLIPS_PER_ROUND):
            read(next(positions))
        cpu_s.append(time.thread_time() - start)

    assert read(next(positions)).shape == (NUM_FRAMES, IMG_SIZE, IMG_SIZE, 3)
    run()  # warm-up: page cache, codec init
    cpu_s.clear()
    benchmark.pedantic(run, rounds=3, iterations=1)
    if benchmark.stats:
        benchmark.extra_info.update(
            path=path, gop=gop, cores=1, clips_per_s=CLIPS_PER_ROUND / benchmark.stats.stats.mean,
            clips_per_cpu_s=CLIPS_PER_ROUND * len(cpu_s) / sum(cpu_s), **_describe(kinetics_like[gop]),
        )  # fmt: skip


@pytest.mark.parametrize("gop", [250, 30])
def test_pyav_loader_clips_per_core(benchmark, kinetics_like, gop):
    cores = len(os.sched_getaffinity(0))
    ds = PretrainClipDataset(kinetics_like[gop], NUM_FRAMES, IMG_SIZE, seed=0)
    batch = 4
    before = _children()
    it = iter(build_pretrain_loader(ds, batch, 0, num_workers=cores, pin_memory=False))
    for _ in range(cores):
        first = next(it)  # workers started and warm
    assert first["video"].shape == (batch, NUM_FRAMES, IMG_SIZE, IMG_SIZE, 3)
    workers = sorted(_children() - before)
    num_batches, rounds = 3 * cores, 2
    # Between idle points (prefetch queues full) the workers made exactly the batches taken.
    cpu_start = _cpu_s_when_idle(workers)

    def run():
        for _ in range(num_batches):
            next(it)

    benchmark.pedantic(run, rounds=rounds, iterations=1)
    worker_cpu_s = _cpu_s_when_idle(workers) - cpu_start
    clips_made = rounds * num_batches * batch
    del it
    if benchmark.stats:
        clips_per_s = num_batches * batch / benchmark.stats.stats.mean
        benchmark.extra_info.update(
            path="pyav_loader", gop=gop, cores=cores, clips_per_s=clips_per_s, clips_per_s_per_core=clips_per_s / cores,
            clips_per_cpu_s=clips_made / worker_cpu_s, **_describe(kinetics_like[gop]),
        )  # fmt: skip


@pytest.mark.parametrize("gop", [250, 30])
def test_dali_plan_cpu_cost(benchmark, kinetics_like, one_core, gop):
    from umt_fast.data.dali import DALI_GPU_CODECS

    ds = PretrainClipDataset(kinetics_like[gop], NUM_FRAMES, IMG_SIZE, seed=0)
    positions = iter(range(10**9))
    plans_per_round, cpu_s = 50, []

    def run():
        start = time.thread_time()
        for _ in range(plans_per_round):
            ds.sample_plan(next(positions), keep_bytes=True, codecs=DALI_GPU_CODECS)
        cpu_s.append(time.thread_time() - start)

    plan = ds.sample_plan(next(positions), keep_bytes=True, codecs=DALI_GPU_CODECS)
    assert len(plan.frame_indices) == NUM_FRAMES
    run()
    cpu_s.clear()
    benchmark.pedantic(run, rounds=3, iterations=1)
    if benchmark.stats:
        benchmark.extra_info.update(
            path="dali_plan", gop=gop, cores=1, clips_per_s=plans_per_round / benchmark.stats.stats.mean,
            clips_per_cpu_s=plans_per_round * len(cpu_s) / sum(cpu_s), **_describe(kinetics_like[gop]),
        )  # fmt: skip


@pytest.mark.skipif(not ON_GPU, reason="the DALI GPU path (NVDEC) needs a GPU")
@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed (pip install 'umt_fast[gpu]')")
@pytest.mark.parametrize("gop", [250, 30])
def test_dali_clips_per_gpu(benchmark, kinetics_like, gop):
    from umt_fast.data import DaliClipLoader

    ds = PretrainClipDataset(kinetics_like[gop], NUM_FRAMES, IMG_SIZE, seed=0)
    batch = 32
    loader = DaliClipLoader(ds, batch, 0, device=torch.device("cuda"), num_threads=min(8, os.cpu_count() or 1))
    first = next(loader)["video"]
    assert first.is_cuda and first.shape == (batch, NUM_FRAMES, IMG_SIZE, IMG_SIZE, 3)

    def run():
        for _ in range(4):
            next(loader)
        torch.cuda.synchronize()

    start = time.perf_counter()
    benchmark.pedantic(run, rounds=3, iterations=1)
    loader.close()
    if benchmark.stats:
        benchmark.extra_info.update(
            path="dali_gpu", gop=gop, gpu=torch.cuda.get_device_name(), clips_per_s=4 * batch / benchmark.stats.stats.mean,
            wall_s=time.perf_counter() - start, **_describe(kinetics_like[gop]),
        )  # fmt: skip


@pytest.fixture(scope="module")
def raw_and_reencoded(tmp_path_factory) -> dict[str, list[VideoRecord]]:
    """Raw-download-like videos (10 s, 30 fps, 1280x720, H.264 with x264's 250-frame keyframe
    interval) and the same videos through ``prepare shard --reencode --short-side 320`` (1 s GOP)."""
    from umt_fast.data.reencode import ReencodeOptions, reencode_video

    root = tmp_path_factory.mktemp("raw")
    raw = [
        VideoRecord(write_synthetic_video(str(root / f"raw_{i}.mp4"), num_frames=300, width=1280, height=720, fps=30,
                                          codec="libx264", pattern="motion", seed=i,
                                          options={"preset": "veryfast", "crf": "23"}), i)  # fmt: skip
        for i in range(VIDEOS_PER_GOP)
    ]
    reencoded = []
    for record in raw:
        path = record.path.replace("raw_", "reencoded_")
        with open(path, "wb") as f:
            f.write(reencode_video(record.path, ReencodeOptions(short_side=320, keyframe_interval=1.0)))
        reencoded.append(VideoRecord(path, record.label))
    return {"raw": raw, "reencoded": reencoded}


@pytest.mark.parametrize("version", ["raw", "reencoded"])
def test_pyav_raw_against_reencoded_clips_per_core(benchmark, raw_and_reencoded, one_core, version):
    """The PyAV path on raw 720p clips (250-frame GOPs), and on the same clips re-encoded at a
    320 px short side with 1 s GOPs: what ``prepare shard --reencode`` buys per core."""
    records = raw_and_reencoded[version]
    ds = PretrainClipDataset(records, NUM_FRAMES, IMG_SIZE, seed=0)
    positions = iter(range(10**9))
    cpu_s = []

    def run():
        start = time.thread_time()
        for _ in range(CLIPS_PER_ROUND):
            ds[next(positions)]
        cpu_s.append(time.thread_time() - start)

    assert ds[next(positions)]["video"].shape == (NUM_FRAMES, IMG_SIZE, IMG_SIZE, 3)
    run()  # warm-up
    cpu_s.clear()
    benchmark.pedantic(run, rounds=3, iterations=1)
    if benchmark.stats:
        info = decoding.probe_video(records[0].path)
        benchmark.extra_info.update(
            path="pyav_plan", version=version, cores=1, clips_per_s=CLIPS_PER_ROUND / benchmark.stats.stats.mean,
            clips_per_cpu_s=CLIPS_PER_ROUND * len(cpu_s) / sum(cpu_s), size=f"{info.width}x{info.height}",
            keyframe_interval=round(info.num_frames / max(1, len(info.keyframes)), 1), **_describe(records),
        )  # fmt: skip
