"""The training step: no host syncs on its path, and compiled == eager."""
import contextlib

import pytest
import torch

from umt_fast.config import get_preset
from umt_fast.models import build_student, build_teacher
from umt_fast.train.optim import build_optimizer
from umt_fast.train.step import PretrainStep

_SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def _forbid_host_reads(calls: list):
    """Records every Tensor method that would read device memory back to the host."""
    originals = {name: getattr(torch.Tensor, name) for name in _SYNCING}

    def spy(name):
        def method(self, *args, **kwargs):
            calls.append(name)
            return originals[name](self, *args, **kwargs)
        return method

    for name in _SYNCING:
        setattr(torch.Tensor, name, spy(name))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def _step(policy="attention", device="cpu"):
    cfg = get_preset("demo")
    cfg.data.img_size = cfg.teacher.input_resolution = 64
    torch.manual_seed(0)
    teacher = build_teacher(cfg).to(device)
    student = build_student(cfg, teacher.arch.output_dim).to(device)
    optimizer = build_optimizer(student, 1e-3, 0.05, (0.9, 0.95), 1e-8)
    step = PretrainStep(student, teacher, optimizer, mask_policy=policy, mask_ratio=0.8, seed=0,
                        device=torch.device(device), autocast_dtype=None)
    video = torch.randint(0, 256, (2, 4, 64, 64, 3), dtype=torch.uint8)
    return step, video, student


@pytest.mark.parametrize("policy", ["attention", "tube", "random"])
def test_step_never_reads_the_device_back(policy):
    step, video, _ = _step(policy)
    step(video, 0)  # warm-up outside the check (lazy inits may inspect values once)
    calls = []
    with _forbid_host_reads(calls):
        loss = step([video[:1], video[1:]], 1)
    assert calls == [], f"host reads on the step's path: {sorted(set(calls))}"
    assert loss.dim() == 0 and loss.requires_grad is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_step_has_no_host_sync_on_gpu():
    step, video, _ = _step("attention", "cuda")
    video = video.cuda()
    step(video, 0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the step raises
    try:
        loss = step(video, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loss.is_cuda and torch.isfinite(loss)


def test_compiled_step_matches_eager():
    losses = {}
    for mode in ("none", "blocks", "model"):
        step, video, student = _step()
        if mode == "blocks":
            for block in student.encoder.blocks:
                block.compile(backend="aot_eager")
        elif mode == "model":
            student.compile(backend="aot_eager")
        losses[mode] = [step(video, i) for i in range(3)]
    for mode in ("blocks", "model"):
        torch.testing.assert_close(torch.stack(losses[mode]), torch.stack(losses["none"]), atol=1e-5, rtol=1e-5)
