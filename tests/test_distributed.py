"""Multi-process training on CPU with gloo: the same global batch gives the same losses on one
rank or two (DDP and FSDP2), with or without gradient accumulation, drop path included, and a
checkpoint saved at one world size resumes at another."""

import pytest
import torch
import torch.nn as nn

from tests.markers import needs_fsdp_on_cpu
from umt_fast.engine import checkpoint as ckpt
from umt_fast.engine.distributed import DistInfo, check_fsdp_supported, wrap_model
from tests.launch import run_command

# Drop path on: its draws, like the masks, must not depend on the number of ranks.
ARGS = ["--data.img_size", "64", "--teacher.input_resolution", "64", "--log.every_steps", "1",
        "--train.global_batch_size", "4", "--data.num_workers", "0", "--student.drop_path", "0.3"]


def _run(run_dir, nproc, *extra, launcher="fork"):
    records = run_command("umt_fast.pretrain", run_dir, nproc, ARGS + list(extra), port_base=29500, launcher=launcher)
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def single_rank_losses(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("one") / "run", 1, "--train.max_steps", "4")


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=needs_fsdp_on_cpu)])
def test_two_ranks_match_one_rank(tmp_path, single_rank_losses, strategy):
    """DDP runs under torchrun itself, as users launch it; the other multi-rank tests start their
    ranks from the preloaded fork server with torchrun's environment (tests.launch)."""
    launcher = "torchrun" if strategy == "ddp" else "fork"
    losses = _run(tmp_path / "run", 2, "--train.max_steps", "4", "--dist.strategy", strategy, launcher=launcher)
    assert sorted(losses) == [1, 2, 3, 4]
    for step, loss in single_rank_losses.items():
        assert loss == pytest.approx(losses[step], abs=1e-4), (step, single_rank_losses, losses)


def test_gradient_accumulation_matches_one_pass(tmp_path, single_rank_losses):
    losses = _run(tmp_path / "run", 1, "--train.max_steps", "4", "--train.micro_batch_size", "2")
    for step, loss in single_rank_losses.items():
        assert loss == pytest.approx(losses[step], abs=1e-4)


@needs_fsdp_on_cpu
def test_fsdp_checkpoint_resumes_in_a_single_process(tmp_path, single_rank_losses):
    run_dir = tmp_path / "run"
    _run(run_dir, 2, "--train.max_steps", "2", "--dist.strategy", "fsdp", "--checkpoint.every_steps", "2")
    assert [s for s, _ in ckpt.list_checkpoints(str(run_dir))] == [2]
    resumed = _run(run_dir, 1, "--train.max_steps", "4", "--resume", "auto")
    for step in (3, 4):
        assert resumed[step] == pytest.approx(single_rank_losses[step], abs=1e-4)


def test_global_batch_must_split_over_ranks():
    """The recipe plans the split before anything is built (the trainer calls plan first)."""
    from umt_fast.config import build_config
    from umt_fast.recipes.pretrain import PretrainRecipe

    recipe = PretrainRecipe(build_config(ARGS + ["--train.global_batch_size", "3"]))
    with pytest.raises(ValueError, match=r"train.global_batch_size=3 must be divisible by the number of ranks \(2\)"):
        recipe.plan(DistInfo(rank=0, world_size=2, device=torch.device("cpu")))
    recipe = PretrainRecipe(build_config(ARGS + ["--train.global_batch_size", "4", "--train.micro_batch_size", "3"]))
    with pytest.raises(ValueError, match=r"train.micro_batch_size=3 must divide the per-rank batch"):
        recipe.plan(DistInfo(rank=0, world_size=2, device=torch.device("cpu")))


def test_fsdp_on_cpu_is_refused_where_gloo_sums_gradients(monkeypatch):
    """torch 2.7 and 2.8 reduce FSDP2 gradients over gloo as a sum (2 ranks: twice the gradient);
    a run there would checkpoint an optimizer state off by the world size."""
    two_cpu_ranks = DistInfo(rank=0, world_size=2, device=torch.device("cpu"))
    monkeypatch.setattr(torch, "__version__", "2.8.0+cu128")
    with pytest.raises(ValueError, match=r"--dist.strategy fsdp on CPU ranks needs torch >= 2\.9 \(this is 2\.8\.0"):
        wrap_model(nn.Linear(2, 2), [], "fsdp", two_cpu_ranks, None)
    check_fsdp_supported(torch.device("cuda", 0))  # NCCL ranks are fine
    monkeypatch.setattr(torch, "__version__", "2.10.0")  # compared as a version: "2.10" > "2.9"
    check_fsdp_supported(torch.device("cpu"))
