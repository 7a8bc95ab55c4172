"""Fine-tuning under torchrun on CPU with gloo: the same global batch gives the same losses,
train top-1 and eval top-1 on one rank or two (DDP and FSDP2), and a checkpoint saved by two
FSDP2 ranks resumes in a single process.

The demo preset, with mixup, cutmix, random erasing, drop path and head dropout switched on
(they are drawn for the global batch, so a step does not depend on the world size) and a larger learning rate
without warm-up, so that the losses move away from ln(4) within the few steps.
"""

import pytest

from tests.markers import needs_fsdp_on_cpu
from umt_fast.engine import checkpoint as ckpt
from umt_fast import finetune
from umt_fast.config.finetune import build_config
from tests.launch import run_command

ARGS = ["--preset", "demo", "--model.drop_path", "0.3", "--model.head_dropout", "0.3",
        "--data.img_size", "64", "--data.num_frames", "2",
        "--aug.mixup", "0.8", "--aug.cutmix", "1.0", "--aug.random_erasing", "0.5", "--optim.lr", "0.32",
        "--optim.warmup_epochs", "0", "--log.every_steps", "1", "--eval.num_clips", "1", "--eval.num_crops", "1",
        "--train.max_steps", "4", "--checkpoint.every_steps", "2", "--data.num_workers", "0"]  # fmt: skip


def _run(run_dir, nproc, *extra):
    records = run_command("umt_fast.finetune", run_dir, nproc, ARGS + list(extra), port_base=31500)
    return {
        "loss": {r["step"]: r["loss"] for r in records if "loss" in r},
        "train/top1": {r["step"]: r["train/top1"] for r in records if "train/top1" in r},
        "eval/top1": {r["step"]: r["eval/top1"] for r in records if "eval/top1" in r},
        "eval/videos": {r["step"]: r["eval/videos"] for r in records if "eval/videos" in r},
    }


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("one") / "run", 1)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    return run_dir, _run(run_dir, 2, "--dist.strategy", "fsdp")


def _assert_same(one, two):
    assert sorted(two["loss"]) == [1, 2, 3, 4]
    assert max(one["loss"].values()) - min(one["loss"].values()) > 0.05  # the losses do move
    for step, loss in one["loss"].items():
        assert loss == pytest.approx(two["loss"][step], abs=1e-4), (step, one["loss"], two["loss"])
    assert one["train/top1"] == two["train/top1"]
    assert one["eval/top1"] == two["eval/top1"] and two["eval/videos"] == {4: 4}  # the whole eval set


def test_ddp_on_two_ranks_matches_one_rank(tmp_path, one_rank):
    _assert_same(one_rank, _run(tmp_path / "run", 2, "--dist.strategy", "ddp"))


@needs_fsdp_on_cpu
def test_fsdp_on_two_ranks_matches_one_rank(one_rank, fsdp_run):
    _assert_same(one_rank, fsdp_run[1])


@needs_fsdp_on_cpu
def test_fsdp_checkpoint_resumes_in_a_single_process(tmp_path, one_rank, fsdp_run):
    run_dir, _ = fsdp_run
    assert [s for s, _ in ckpt.list_checkpoints(str(run_dir))] == [2, 4]
    resumed = _run(tmp_path / "run", 1, "--resume", ckpt.checkpoint_path(str(run_dir), 2))
    assert sorted(resumed["loss"]) == [3, 4]
    for step in (3, 4):
        assert resumed["loss"][step] == pytest.approx(one_rank["loss"][step], abs=1e-4)


def test_global_batch_must_split_over_ranks_and_torchrun_needs_a_run_dir(monkeypatch, capsys):
    cfg = build_config(["--train.batch_size", "6"])
    assert finetune.per_rank_batch(cfg, 2) == 3
    with pytest.raises(ValueError, match=r"train.global_batch_size=6 must be divisible by the number of ranks \(4\)"):
        finetune.per_rank_batch(cfg, 4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert finetune.main(["--train.max_steps", "1"]) == 2
    assert "--run-dir is required under torchrun" in capsys.readouterr().err
