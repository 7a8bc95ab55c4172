"""No host sync in any training step, seen op by op (tests/host_sync.py), and the detector itself."""
import numpy as np
import pytest
import torch

from tests.host_sync import HostSyncError, forbid_host_syncs


def _video(B, T, S, seed=0):
    return torch.randint(0, 256, (B, T, S, S, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _stage1_step(policy):
    from umt_fast.config import get_preset
    from umt_fast.interop import build_teacher
    from umt_fast.models import build_student
    from umt_fast.engine.optim import build_optimizer
    from umt_fast.recipes.pretrain import PretrainStep

    cfg = get_preset("demo")
    cfg.data.img_size = cfg.teacher.input_resolution = 64
    cfg.student.drop_path = 0.1
    torch.manual_seed(0)
    teacher = build_teacher(cfg)
    student = build_student(cfg, teacher.arch.output_dim)
    optimizer = build_optimizer(student, 1e-3, 0.05, (0.9, 0.95), 1e-8)
    return PretrainStep(student, teacher, optimizer, mask_policy=policy, mask_ratio=0.8, seed=0,
                        device=torch.device("cpu"), autocast_dtype=None)  # fmt: skip


@pytest.mark.parametrize("policy", ["attention", "tube", "random"])
def test_stage1_step_has_no_host_sync(policy):
    step = _stage1_step(policy)
    video = _video(2, 4, 64)
    step(video, 0)  # warm-up outside the check (lazy initialisation)
    with forbid_host_syncs():
        loss = step([video[:1], video[1:]], 1)
    assert loss.dim() == 0


def test_stage2_step_has_no_host_sync():
    from umt_fast.config.vl import get_preset
    from umt_fast.interop import build_teacher
    from umt_fast.engine.optim import build_optimizer
    from umt_fast.models.text import load_tokenizer, tokenize_captions
    from umt_fast.recipes.pretrain_vl import VLStep, build_model

    cfg = get_preset("demo_vl")
    cfg.data.img_size = cfg.teacher.input_resolution = 64
    cfg.data.num_frames = 2
    cfg.student.drop_path = 0.1
    torch.manual_seed(0)
    teacher = build_teacher(cfg)
    model = build_model(cfg, teacher.arch.output_dim)
    optimizer = build_optimizer(model, 1e-4, 0.02, (0.9, 0.999), 1e-8)
    tokenizer = load_tokenizer(cfg.text.weights)
    step = VLStep(model, teacher, optimizer, tokenizer, cfg, torch.device("cpu"), None)
    ids, mask = tokenize_captions(tokenizer, ["a dog runs", "two cats sleep on a red sofa"], cfg.text.max_len)
    batch = {"media": _video(2, 2, 64), "text_ids": ids, "text_mask": mask, "ids": torch.tensor([0, 1])}
    step("video", batch, 0)
    with forbid_host_syncs():
        losses = step("video", batch, 1)
    assert losses.shape == (5,)


def test_finetune_step_has_no_host_sync():
    from umt_fast.recipes.finetune import FinetuneStep, build_model, build_optimizer
    from umt_fast.config.finetune import get_preset

    cfg = get_preset("demo")
    cfg.data.img_size, cfg.data.num_frames = 32, 2
    cfg.model.drop_path, cfg.model.head_dropout = 0.1, 0.2
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=3)
    step = FinetuneStep(model, build_optimizer(model, cfg), cfg, 3, torch.device("cpu"))
    video, labels = _video(4, 2, 32), torch.tensor([0, 1, 2, 0])
    step(video, labels, 0)
    with forbid_host_syncs():
        for s in range(1, 4):  # mixup, cutmix and random erasing all drawn on some step
            loss, correct = step(video, labels, s)
    assert loss.dim() == 0 and correct.dim() == 0


def test_the_detector_catches_a_planted_boolean_index(monkeypatch):
    """A boolean index planted into the stage-1 step (keeping rows by a mask, the reference's way)
    is caught, although the step reads nothing back explicitly."""
    from umt_fast.recipes import pretrain as step_module

    original = step_module.alignment_loss

    def loss_on_rows_kept_by_a_mask(student_LBNC, teacher_LBNC):
        keep = teacher_LBNC.norm(dim=-1) > 0
        return original(student_LBNC[keep], teacher_LBNC[keep])

    step = _stage1_step("tube")
    video = _video(2, 4, 64)
    step(video, 0)
    monkeypatch.setattr(step_module, "alignment_loss", loss_on_rows_kept_by_a_mask)
    step(video, 1)  # the planted step runs
    with pytest.raises(HostSyncError, match="boolean indexing"):
        with forbid_host_syncs():
            step(video, 2)


@pytest.mark.parametrize("planted, found", [
    (lambda x: x[x > 0], "aten.index"),
    (lambda x: x.nonzero(), "aten.nonzero"),
    (lambda x: torch.multinomial(x.abs() + 0.1, 2), "aten.multinomial"),
    (lambda x: torch.unique(x.round()), "unique"),
    (lambda x: x.repeat_interleave(torch.tensor([1, 2, 0]), dim=0), "aten.repeat_interleave"),
    (lambda x: x.masked_select(x > 0), "aten.masked_select"),
    (lambda x: float(x.sum()), "_local_scalar_dense"),
    (lambda x: x.max().item(), "_local_scalar_dense"),
    (lambda x: x.tolist(), "Tensor.tolist"),
    (lambda x: x.cpu(), "Tensor.cpu"),
])  # fmt: skip
def test_the_detector_names_each_kind_of_sync(planted, found):
    x = torch.randn(3, 4)
    with pytest.raises(HostSyncError, match=found):
        with forbid_host_syncs():
            planted(x)
    with forbid_host_syncs():  # what a sync-free step does instead passes
        torch.where(x > 0, x, 0).sum()
        x.repeat_interleave(2, dim=0)
        x.topk(2).indices.sort()
        np.float32(1.0)
