"""VTC gathered over 2 gloo ranks (with gradients) equals the 1-rank computation on the whole batch."""
import os
import socket

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F


def _features(seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(8, 16, generator=g, dtype=torch.float64)
    t = torch.randn(8, 16, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])  # duplicates within and across the ranks' halves
    return v, t, ids


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist

    from umt_fast.vl.losses import vtc_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vtc_gathered_over_two_gloo_ranks_equals_one_rank(tmp_path):
    from umt_fast.vl.losses import vtc_loss

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
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
