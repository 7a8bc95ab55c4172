"""The training step: no host syncs on its path, and compiled == eager."""
import contextlib

import pytest
import torch

from umt_fast.config import get_preset
from umt_fast.interop import build_teacher
from umt_fast.models import build_student
from umt_fast.engine.optim import build_optimizer
from umt_fast.recipes.pretrain import PretrainStep

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


# ------------------------------------------------------------------------------- CUDA graphs


def _graph_pair(policy="attention", device="cpu", drop_path=0.1, checkpointed_blocks=0):
    """Two identical students: one for the plain step (float lr), one for the graph step
    (capturable AdamW, lr tensor, device step counter)."""
    from umt_fast.engine.cuda_graph import CUDAGraphStep

    cfg = get_preset("demo")
    cfg.data.img_size = cfg.teacher.input_resolution = 64
    cfg.student.drop_path = drop_path
    torch.manual_seed(0)
    teacher = build_teacher(cfg).to(device)
    students = [build_student(cfg, teacher.arch.output_dim).to(device) for _ in range(2)]
    students[1].load_state_dict(students[0].state_dict())
    steps = []
    for student, capturable in zip(students, (False, True)):
        student.set_grad_checkpointing(num_blocks=checkpointed_blocks)
        optimizer = build_optimizer(student, 1e-3, 0.05, (0.9, 0.95), 1e-8, capturable=capturable)
        steps.append(PretrainStep(student, teacher, optimizer, mask_policy=policy, mask_ratio=0.8, seed=3,
                                  device=torch.device(device), autocast_dtype=None))
    graphed = CUDAGraphStep(steps[1], warmup_steps=2, capture=device == "cuda")
    return steps[0], graphed, students


def _run_both(plain, graphed, device, num_steps):
    from umt_fast.engine.optim import WarmupCosineSchedule

    schedule = WarmupCosineSchedule(peak_lr=2e-3, min_lr=1e-4, total_steps=num_steps, warmup_steps=2)
    gen = torch.Generator().manual_seed(1)
    losses = {"plain": [], "graphed": []}
    for step in range(num_steps):
        video = torch.randint(0, 256, (4, 4, 64, 64, 3), dtype=torch.uint8, generator=gen).to(device)
        micro = [video[:2], video[2:]]
        schedule.set_lr(plain.optimizer, step)
        losses["plain"].append(plain(micro, step))
        schedule.set_lr(graphed.step_fn.optimizer, step)
        losses["graphed"].append(graphed(micro, step))
    return {k: torch.stack(v) for k, v in losses.items()}


@pytest.mark.parametrize("policy", ["attention", "tube"])
def test_graph_step_bookkeeping_equals_the_plain_step(policy):
    """Without capture (CPU), the graph step's device-side step counter, lr tensor and static
    input buffers must reproduce the plain step: same masks, drop path and lr schedule. The
    first step is bit-identical; later ones differ only by the last bit that an fp32 lr and
    capturable AdamW's on-device bias correction round differently."""
    plain, graphed, students = _graph_pair(policy)
    losses = _run_both(plain, graphed, "cpu", num_steps=4)
    assert losses["graphed"][0] == losses["plain"][0]
    torch.testing.assert_close(losses["graphed"], losses["plain"], atol=1e-6, rtol=1e-6)
    for p, q in zip(students[0].parameters(), students[1].parameters()):
        torch.testing.assert_close(p, q, atol=2e-7, rtol=1e-6)
    assert graphed.lr.item() == pytest.approx(plain.optimizer.param_groups[0]["lr"])


def test_graph_step_never_reads_the_device_back():
    _, graphed, _ = _graph_pair()
    video = torch.randint(0, 256, (2, 4, 64, 64, 3), dtype=torch.uint8)
    graphed(video, 0)
    calls = []
    with _forbid_host_reads(calls):
        graphed(video, 1)
    assert calls == [], f"host reads on the graph step's path: {sorted(set(calls))}"


@pytest.mark.parametrize("policy", ["attention", "tube", "random"])
def test_graph_step_builds_no_tensor_from_host_data(policy):
    """What a CUDA graph captures must not create tensors from Python values (torch.tensor,
    as_tensor): on a GPU that is a host-to-device copy, which capture refuses. Checked on the
    step's device work with drop path on, by the ops it dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    _, graphed, _ = _graph_pair(policy)
    video = torch.randint(0, 256, (2, 4, 64, 64, 3), dtype=torch.uint8)
    graphed(video, 0)
    with Record() as record:
        graphed.step_fn.run(graphed.static_inputs, graphed.step_counter)
    assert "lift_fresh" not in record.ops and "bernoulli" not in record.ops


def test_graph_step_refuses_what_it_cannot_capture():
    from umt_fast.engine.cuda_graph import CUDAGraphStep

    plain, graphed, _ = _graph_pair()
    with pytest.raises(ValueError, match="capturable=True"):
        CUDAGraphStep(plain, capture=False)
    with pytest.raises(ValueError, match="CUDA device"):
        CUDAGraphStep(graphed.step_fn, capture=True)
    graphed.step_fn.grad_scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match="GradScaler"):
        CUDAGraphStep(graphed.step_fn, capture=False)
    graphed.step_fn.grad_scaler = None
    graphed(torch.zeros(2, 4, 64, 64, 3, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match=r"same micro-batch shapes.*\(2, 4, 64, 64, 3\)"):
        graphed(torch.zeros(3, 4, 64, 64, 3, dtype=torch.uint8), 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("checkpointed_blocks", [0, 2])
def test_graph_replay_equals_eager_on_gpu(checkpointed_blocks):
    """Two eager warm-up steps, a capture, then replays: losses and weights track the eager
    step's (fp32: the same kernels, so equal up to atomics), with drop path and activation
    checkpointing on, and no host sync during a replay."""
    plain, graphed, students = _graph_pair(device="cuda", checkpointed_blocks=checkpointed_blocks)
    losses = _run_both(plain, graphed, "cuda", num_steps=6)
    assert graphed.captured
    torch.testing.assert_close(losses["graphed"], losses["plain"], atol=1e-5, rtol=1e-5)
    for p, q in zip(students[0].parameters(), students[1].parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
    video = torch.randint(0, 256, (4, 4, 64, 64, 3), dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = graphed([video[:2], video[2:]], 6)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


def test_checkpoints_move_between_cuda_graph_and_plain_runs(tmp_path):
    """The lr is a device tensor in a CUDA-graph run and a float otherwise; a checkpoint of
    either restores into the other, and saving leaves the live lr tensor in place."""
    from umt_fast.engine import checkpoint as ckpt
    from umt_fast.engine.optim import use_lr_tensor

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))

    def train(m, optimizer, steps):
        for step in steps:
            for group in optimizer.param_groups:
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(1e-2 / (step + 1))
                else:
                    group["lr"] = 1e-2 / (step + 1)
            m(torch.ones(2, 4) * (step + 1)).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()

    graph_model = model()
    graph_opt = build_optimizer(graph_model, 1e-3, 0.05, (0.9, 0.95), 1e-8, capturable=True)
    lr = use_lr_tensor(graph_opt, torch.device("cpu"))
    train(graph_model, graph_opt, range(2))
    path = ckpt.save_checkpoint(str(tmp_path / "a"), 2, graph_model, graph_opt, {}, keep_last=1)
    assert all(group["lr"] is lr for group in graph_opt.param_groups)  # a captured graph still reads it

    plain_model = model()
    plain_opt = build_optimizer(plain_model, 5.0, 0.05, (0.9, 0.95), 1e-8)
    ckpt.restore_checkpoint(path, plain_model, plain_opt)
    assert plain_opt.param_groups[0]["lr"] == pytest.approx(0.005)
    train(plain_model, plain_opt, range(2, 4))
    train(graph_model, graph_opt, range(2, 4))
    for p, q in zip(plain_model.parameters(), graph_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-7, rtol=1e-6)

    path = ckpt.save_checkpoint(str(tmp_path / "b"), 4, plain_model, plain_opt, {}, keep_last=1)
    back_model = model()
    back = build_optimizer(back_model, 5.0, 0.05, (0.9, 0.95), 1e-8, capturable=True)
    use_lr_tensor(back, torch.device("cpu"))
    ckpt.restore_checkpoint(path, back_model, back)
    assert float(back.param_groups[0]["lr"]) == pytest.approx(0.0025)
    for p, q in zip(back_model.parameters(), plain_model.parameters()):
        assert torch.equal(p, q)
