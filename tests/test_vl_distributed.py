"""Stage 2 over 2 gloo ranks on CPU: VTC gathered with gradients equals the 1-rank computation on the
whole batch, and a run at the same global batch gives the same losses (total, UTA, VTC, VTM, MLM)
on one rank or two, under DDP and FSDP2, with drop path on (drawn per pair of the global batch)
and the text tower's dropout off (the one draw that depends on the rank); the batch options
that cannot give that are refused."""
import os

import pytest
import torch
import torch.nn.functional as F

from tests.markers import needs_fsdp_on_cpu
from umt_fast.config.vl import build_config
from tests.launch import run_command, start_ranks
from tests.tiny_text import tiny_text_weights

LOSSES = ("loss", "uta", "vtc", "vtm", "mlm")
# The demo at 64 px and 2 frames: 6 video and 6 image captions, a global batch of 4 = 1 video and
# 1 image step per epoch; hard negatives within pairs (2 groups of the global batch). The small
# text tower of tests/tiny_text.py, at a learning rate that moves it within these 4 steps.
ARGS = ["--text.weights", tiny_text_weights(), "--optim.lr", "1e-2",
        "--data.img_size", "64", "--teacher.input_resolution", "64", "--data.num_frames", "2",
        "--train.global_batch_size", "4", "--train.batch_size", "0", "--train.vtm_group_size", "2",
        "--student.drop_path", "0.1", "--text.dropout", "0", "--train.max_steps", "4",
        "--log.every_steps", "1", "--checkpoint.every_steps", "4", "--data.num_workers", "0"]  # fmt: skip


def _features(seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(8, 16, generator=g, dtype=torch.float64)
    t = torch.randn(8, 16, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])  # duplicates within and across the ranks' halves
    return v, t, ids


def _worker(out_dir):
    import torch.distributed as dist

    from umt_fast.losses.vl import vtc_loss

    dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR/PORT: tests.launch.start_ranks
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        v, t, ids = _features()
        b = v.shape[0] // world
        part = slice(rank * b, (rank + 1) * b)
        v_local = v[part].clone().requires_grad_(True)
        t_local = t[part].clone().requires_grad_(True)
        temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
        loss = vtc_loss(F.normalize(v_local, dim=-1), F.normalize(t_local, dim=-1), ids[part], temp)
        loss.backward()
        torch.save({"loss": loss.detach(), "gv": v_local.grad, "gt": t_local.grad, "gtemp": temp.grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears the group down while the other's collectives are in flight
    finally:
        dist.destroy_process_group()


def test_vtc_gathered_over_two_gloo_ranks_equals_one_rank(tmp_path):
    from umt_fast.losses.vl import vtc_loss

    start_ranks(_worker, (str(tmp_path),), nproc=2).check()
    v, t, ids = _features()
    v.requires_grad_(True)
    t.requires_grad_(True)
    temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    loss = vtc_loss(F.normalize(v, dim=-1), F.normalize(t, dim=-1), ids, temp)
    loss.backward()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank, res in enumerate(results):
        part = slice(rank * 4, (rank + 1) * 4)
        assert torch.allclose(res["loss"], loss.detach(), atol=1e-12)
        # Every rank computes the same global loss and the gather's backward sums the ranks'
        # gradients, so a rank's input gradient is world_size x the 1-rank one; DDP's average over
        # ranks then gives the parameters exactly the 1-rank gradient.
        assert torch.allclose(res["gv"], 2 * v.grad[part], atol=1e-10)
        assert torch.allclose(res["gt"], 2 * t.grad[part], atol=1e-10)
        assert torch.allclose(res["gtemp"], temp.grad, atol=1e-10)


def _run(run_dir, nproc, *extra):
    records = run_command("umt_fast.pretrain_vl", run_dir, nproc, ARGS + list(extra), port_base=32500)
    return {r["step"]: r for r in records if "loss" in r}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("one") / "run", 1)


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=needs_fsdp_on_cpu)])
def test_two_ranks_give_the_one_rank_losses_at_the_same_global_batch(tmp_path, one_rank, strategy):
    two = _run(tmp_path / "run", 2, "--dist.strategy", strategy)
    assert sorted(one_rank) == sorted(two) == [1, 2, 3, 4]
    assert {r["video_steps"] for r in one_rank.values()} == {0, 1}  # video and image steps both ran
    assert [r["video_steps"] for r in one_rank.values()] == [r["video_steps"] for r in two.values()]
    assert one_rank[1]["loss"] - one_rank[4]["loss"] > 1.0  # the updates matter
    for step, record in one_rank.items():
        for name in LOSSES:
            assert record[name] == pytest.approx(two[step][name], abs=1e-4), (step, name, record, two[step])


def test_batch_options_that_would_change_with_the_world_size_are_refused():
    from umt_fast.recipes.pretrain_vl import BatchPlan, plan_batches

    def plan(world, *argv):
        return plan_batches(build_config(list(argv)), world)

    global_batch = ["--train.batch_size", "0", "--train.global_batch_size"]
    assert plan(1) == BatchPlan(global_batch=4, per_rank=4, vtm_group=4)  # the demo: a group is at most the batch
    assert plan(2, "--train.vtm_group_size", "4") == BatchPlan(8, 4, 4)  # the demo's batch is per rank
    assert plan(2, *global_batch, "8", "--train.vtm_group_size", "4") == BatchPlan(8, 4, 4)
    assert plan(4, "--train.global_batch_size", "8", "--train.batch_size", "2", "--train.vtm_group_size", "2") == \
        BatchPlan(8, 2, 2)
    with pytest.raises(ValueError, match=r"train.batch_size=4 \(per rank\) x 4 ranks = 16 contradicts "
                                         r"train.global_batch_size=8; set one of them to 0"):
        plan(4, "--train.global_batch_size", "8")
    with pytest.raises(ValueError, match=r"train.global_batch_size=6 must be divisible by the number of ranks \(4\)"):
        plan(4, *global_batch, "6")
    with pytest.raises(ValueError, match=r"train.vtm_group_size=4 must divide the per-rank batch \(4 pairs / 2 "
                                         r"ranks = 2\)"):
        plan(2, *global_batch, "4")  # one group of 4 (the whole batch) cannot be split
    with pytest.raises(ValueError, match=r"train.vtm_group_size=4 must divide the global batch \(6 pairs\)"):
        plan(1, *global_batch, "6", "--train.vtm_group_size", "4")
    with pytest.raises(ValueError, match="train.global_batch_size=0 and train.batch_size=0: set one of them"):
        build_config(["--train.global_batch_size", "0", "--train.batch_size", "0"])
    for field, value in (("train.vtm_group_size", "1"), ("train.global_batch_size", "1"), ("text.dropout", "1.0")):
        with pytest.raises(ValueError, match=field):
            build_config([f"--{field}", value])
