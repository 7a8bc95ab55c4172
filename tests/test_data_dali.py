"""The DALI data path on DALI's CPU backend (VP8/VP9/MJPEG), on VP9 clips written with PyAV.

Covers what the GPU backend shares with it: the plans (frames, crop, flip), skipping bad videos
(the Python probe and DALI's own failures), and resume. NVDEC itself needs a GPU.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "nvidia.dali.fn", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130, part of the dev extra)"
)

from tests.test_data import INDEX_H, INDEX_W, assert_follows_plan  # noqa: E402
from umt_fast.data import DaliClipLoader, PretrainClipDataset, VideoRecord, build_pretrain_loader  # noqa: E402
from umt_fast.data.synthetic import write_broken_videos, write_synthetic_video  # noqa: E402
from umt_fast.pretrain import main  # noqa: E402
from umt_fast.engine.metrics import read_metrics  # noqa: E402


@pytest.fixture(scope="module")
def vp9_clips(tmp_path_factory) -> list[str]:
    """Five VP9 test-pattern clips, 64x48, 24 to 28 frames."""
    root = tmp_path_factory.mktemp("vp9")
    return [
        write_synthetic_video(str(root / f"index_{i}.webm"), num_frames=24 + i, width=INDEX_W, height=INDEX_H)
        for i in range(5)
    ]


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("broken_for_dali")
    paths = write_broken_videos(str(root), num_frames_needed=8)
    # H.264 is fine for PyAV and for NVDEC, but DALI's CPU backend cannot decode it.
    paths["h264_on_cpu"] = write_synthetic_video(str(root / "h264.mp4"), num_frames=24, codec="libx264",
                                                 width=INDEX_W, height=INDEX_H)  # fmt: skip
    return paths


def batches(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def stream_of(batch_list: list[dict]) -> list[tuple[int, int]]:
    return [(p, r) for b in batch_list for p, r in zip(b["positions"].tolist(), b["record_indices"].tolist())]


def test_dali_reads_what_the_plan_says_like_pyav(vp9_clips):
    records = [VideoRecord(p, None) for p in vp9_clips]
    ds = PretrainClipDataset(records, 8, 16, seed=5)
    loader = DaliClipLoader(ds, 4, 0, num_threads=2)
    got = batches(loader, 3)
    loader.close()
    flips = set()
    for batch in got:
        assert batch["video"].shape == (4, 8, 16, 16, 3) and batch["video"].dtype == torch.uint8
        assert batch["skipped"] == [] and batch["skip_reasons"] == []
        for k, position in enumerate(batch["positions"].tolist()):
            plan = ds.sample_plan(position)
            assert batch["record_indices"][k] == plan.record_index
            assert_follows_plan(batch["video"][k], plan, 16)  # the planned frames, box and flip
            flips.add(plan.flip)
            pyav = ds[position]["video"]  # the other decoder: same clip up to colour conversion
            assert (batch["video"][k].float() - pyav.float()).abs().mean() < 4
    assert flips == {False, True}


@pytest.mark.parametrize(
    "kind",
    ["missing", "zero_bytes", "truncated", "not_a_video", "short", "unknown_codec", "corrupt_stream", "h264_on_cpu"],
)
def test_dali_skips_and_substitutes_every_kind_of_bad_video(vp9_clips, broken, kind):
    bad = broken[kind]
    ds = PretrainClipDataset([VideoRecord(bad, None), VideoRecord(vp9_clips[0], None)], 8, 16, seed=0)
    loader = DaliClipLoader(ds, 4, 0, num_threads=1)
    got = batches(loader, 2)
    loader.close()
    for batch in got:
        assert batch["video"].shape == (4, 8, 16, 16, 3)  # shapes stay static
        assert batch["record_indices"].tolist() == [1, 1, 1, 1]  # every clip from the good video
        expected_skips = sum(ds.record_index(p) == 0 for p in batch["positions"].tolist())
        assert batch["skipped"] == [bad] * expected_skips and len(batch["skip_reasons"]) == expected_skips
        for k, position in enumerate(batch["positions"].tolist()):
            first_attempt = 1 if ds.record_index(position) == 0 else 0  # attempt 1 of the bad record: the good one
            assert_follows_plan(batch["video"][k], ds.sample_plan(position, first_attempt), 16)
    reasons = {r for b in got for r in b["skip_reasons"]}
    assert reasons, "no sample read the bad video"
    expected = {
        "short": "has 7 frames, needs 8",
        "h264_on_cpu": "unsupported codec h264 (this decoder reads mjpeg, vp8, vp9)",
        "corrupt_stream": "DALI: ",  # passes the probe; DALI fails, the batch is decoded one by one
        "missing": "file not found",
    }
    if kind in expected:
        assert all(expected[kind] in r for r in reasons), reasons


def test_dali_all_bad_raises_with_examples(broken):
    paths = [broken[k] for k in ("missing", "corrupt_stream", "h264_on_cpu")]
    ds = PretrainClipDataset([VideoRecord(p, None) for p in paths], 8, 16, seed=0, max_substitutes=4)
    loader = DaliClipLoader(ds, 2, 0, num_threads=1)
    with pytest.raises(RuntimeError, match="unreadable") as info:
        next(loader)
    loader.close()
    assert all(p in str(info.value) for p in paths)


@pytest.mark.parametrize("resume_step", [1, 2])
def test_dali_resume_and_ranks_match_the_uninterrupted_pyav_stream(vp9_clips, resume_step):
    records = [VideoRecord(p, None) for p in vp9_clips]
    ds = PretrainClipDataset(records, 8, 16, seed=2)
    G, num_steps = 4, 5  # positions 0..19 over 5 records; step 2's batch (8..11) crosses an epoch
    pyav = list(zip(range(num_steps), build_pretrain_loader(ds, G, 0, num_workers=0, pin_memory=False)))
    pyav = [b for _, b in pyav]
    straight = batches(DaliClipLoader(ds, G, 0, num_threads=2), num_steps)
    assert stream_of(straight) == stream_of(pyav)

    resumed = batches(DaliClipLoader(ds, G, resume_step * G, num_threads=2), num_steps - resume_step)
    assert stream_of(resumed) == stream_of(straight[resume_step:])
    for a, b in zip(resumed, straight[resume_step:]):
        assert torch.equal(a["video"], b["video"])

    ranks = [
        batches(DaliClipLoader(ds, G // 2, resume_step * G, num_threads=1, global_batch_size=G, rank=r, world_size=2),
                num_steps - resume_step)
        for r in range(2)
    ]  # fmt: skip
    for step, expected in enumerate(straight[resume_step:]):
        assert stream_of([ranks[0][step]]) + stream_of([ranks[1][step]]) == stream_of([expected])
        assert torch.equal(torch.cat([ranks[0][step]["video"], ranks[1][step]["video"]]), expected["video"])


def test_pretrain_runs_on_the_dali_decoder(tmp_path, vp9_clips, broken):
    listing = tmp_path / "train.csv"
    listing.write_text("".join(f"{p},0\n" for p in vp9_clips) + f"{broken['corrupt_stream']},0\n")
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), "--data.train_list", str(listing), "--data.decoder", "dali",
            "--data.img_size", "64", "--teacher.input_resolution", "64", "--train.max_steps", "3",
            "--log.every_steps", "1", "--data.max_bad_fraction", "0.5"]  # fmt: skip
    assert main(args) == 0
    records = [r for r in read_metrics(str(run_dir / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    log = (run_dir / "log.txt").read_text()
    assert "DALI" in log
    # 12 clips over 6 records: the corrupt one came up twice, was skipped twice, named once.
    assert records[-1]["data/skipped"] == 2
    assert log.count(f"skipping undecodable video {broken['corrupt_stream']}") == 1
