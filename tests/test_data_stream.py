"""The PyAV clip stream over long runs: exact resume (mid-epoch, across epoch boundaries, over
ranks) and flat worker memory, on tiny synthetic clips written with PyAV."""
from __future__ import annotations

import os
import time

import pytest
import torch

from umt_fast.data import PretrainClipDataset, VideoRecord, build_pretrain_loader
from umt_fast.data.synthetic import write_broken_videos, write_synthetic_video

NUM_RECORDS = 5
GLOBAL_BATCH = 4


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory) -> list[VideoRecord]:
    """NUM_RECORDS VP9 clips, 32x32, 16 to 20 frames."""
    root = tmp_path_factory.mktemp("tiny_clips")
    return [
        VideoRecord(write_synthetic_video(str(root / f"clip_{i}.webm"), num_frames=16 + i), None)
        for i in range(NUM_RECORDS)
    ]


def take(loader, num_batches: int) -> list[dict]:
    it = iter(loader)
    batches = [next(it) for _ in range(num_batches)]
    del it
    return batches


def stream_of(batches: list[dict]) -> list[tuple[int, int]]:
    """(position, record index) of every clip, in order."""
    return [
        (p, r) for b in batches for p, r in zip(b["positions"].tolist(), b["record_indices"].tolist())
    ]


def test_every_epoch_reads_every_record_once(tiny_records):
    ds = PretrainClipDataset(tiny_records, 4, 16, seed=0)
    stream = stream_of(take(build_pretrain_loader(ds, GLOBAL_BATCH, 0, num_workers=0, pin_memory=False), 5))
    assert [p for p, _ in stream] == list(range(5 * GLOBAL_BATCH))
    for epoch in range(len(stream) // NUM_RECORDS):
        records = [r for p, r in stream if p // NUM_RECORDS == epoch]
        assert sorted(records) == list(range(NUM_RECORDS)), epoch
    assert [r for _, r in stream[:NUM_RECORDS]] != [r for _, r in stream[NUM_RECORDS : 2 * NUM_RECORDS]]


@pytest.mark.parametrize("resume_step", [1, 2, 3])
def test_resume_continues_from_the_exact_next_sample(tiny_records, resume_step):
    """Positions 0..23 over 5 records: epochs start at 5, 10, 15, 20, so step 1 resumes mid-epoch 0,
    step 2's batch (8..11) crosses into epoch 2 and step 3 resumes mid-epoch 2."""
    ds = PretrainClipDataset(tiny_records, 4, 16, seed=1)
    num_steps = 6
    straight = take(build_pretrain_loader(ds, GLOBAL_BATCH, 0, num_workers=0, pin_memory=False), num_steps)

    resumed = take(
        build_pretrain_loader(ds, GLOBAL_BATCH, resume_step * GLOBAL_BATCH, num_workers=2, pin_memory=False),
        num_steps - resume_step,
    )
    assert stream_of(resumed) == stream_of(straight[resume_step:])
    for a, b in zip(resumed, straight[resume_step:]):
        assert torch.equal(a["video"], b["video"])

    # Two ranks, each with half of every global batch, resumed at the same step: together
    # they read exactly the clips of the single-rank run, each once.
    per_rank = [
        take(
            build_pretrain_loader(
                ds, GLOBAL_BATCH // 2, resume_step * GLOBAL_BATCH, num_workers=1, pin_memory=False,
                global_batch_size=GLOBAL_BATCH, rank=rank, world_size=2,
            ),
            num_steps - resume_step,
        )
        for rank in range(2)
    ]  # fmt: skip
    for step, expected in enumerate(straight[resume_step:]):
        rank0, rank1 = per_rank[0][step], per_rank[1][step]
        assert stream_of([rank0]) + stream_of([rank1]) == stream_of([expected])
        assert torch.equal(torch.cat([rank0["video"], rank1["video"]]), expected["video"])


def _children() -> set[int]:
    pids = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids |= {int(pid) for pid in f.read().split()}
        except FileNotFoundError:
            pass
    return pids


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_worker_memory_stays_flat_over_thousands_of_samples(tmp_path, tiny_records):
    broken = write_broken_videos(str(tmp_path / "broken"), num_frames_needed=8)
    records = tiny_records + [VideoRecord(broken[k], None) for k in ("truncated", "corrupt_stream", "short")]
    ds = PretrainClipDataset(records, 8, 32, seed=0)
    batch_size, warmup_batches, total_batches = 16, 25, 200  # 3200 samples, ~640 epochs of 5 readable clips
    before = _children()
    it = iter(build_pretrain_loader(ds, batch_size, 0, num_workers=2, pin_memory=False))
    start = time.perf_counter()
    skipped = 0
    for i in range(total_batches):
        batch = next(it)
        skipped += len(batch["skipped"])
        if i == warmup_batches:
            workers = sorted(_children() - before)
            assert len(workers) == 2, workers
            rss_start = {pid: _rss_kib(pid) for pid in workers}
    rss_end = {pid: _rss_kib(pid) for pid in workers}
    elapsed = time.perf_counter() - start
    del it
    assert skipped > total_batches * batch_size * 0.2  # the bad records were met all along
    growth_mib = {pid: (rss_end[pid] - rss_start[pid]) / 1024 for pid in workers}
    samples = (total_batches - warmup_batches) * batch_size
    print(f"{samples} samples in {elapsed:.1f} s; worker RSS {rss_start} -> {rss_end} KiB")
    assert all(g < 12 for g in growth_mib.values()), f"worker RSS grew by {growth_mib} MiB over {samples} samples"


def test_epoch_order_and_sample_draws_are_functions_of_seed_stream_and_position():
    from umt_fast.data.order import EpochPermutations, sample_rng

    a, b = EpochPermutations(10, 0, "x"), EpochPermutations(10, 0, "x")
    assert sorted(a[0].tolist()) == list(range(10))
    assert torch.equal(a[3], b[3]) and not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], EpochPermutations(10, 0, "y")[0])
    for epoch in range(5):  # the cache holds a few epochs; an evicted one comes back the same
        a[epoch]
    assert torch.equal(a[0], b[0])
    assert sample_rng(0, "x", 5, 1).random() == sample_rng(0, "x", 5, 1).random()
    assert sample_rng(0, "x", 5, 1).random() != sample_rng(0, "x", 5, 0).random()
