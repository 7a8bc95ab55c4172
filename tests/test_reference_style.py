"""The throughput suite's baseline computes the same function as our step."""
import torch

from benchmarks.reference_style import _host_mask, _student_forward, _teacher_forward
from umt_fast.config import get_preset
from umt_fast.interop import build_teacher
from umt_fast.models import build_student


def test_reference_style_forward_equals_ours_for_the_same_mask():
    cfg = get_preset("demo")
    cfg.data.img_size = cfg.teacher.input_resolution = 64
    torch.manual_seed(0)
    teacher, student = build_teacher(cfg), None
    student = build_student(cfg, teacher.arch.output_dim).eval()
    video = torch.randn(2, 3, 4, 64, 64)
    targets_full, attn = _teacher_forward(teacher, video)
    ours = teacher(video)
    torch.testing.assert_close(attn.view(2, 4, -1), ours.cls_attn, atol=1e-6, rtol=1e-5)
    mask = _host_mask(attn, 4, 2)
    assert mask.shape == (2, 64) and (~mask).sum() == 2 * 4 * 4
    idx = torch.stack([torch.nonzero(~m).flatten() for m in mask])
    torch.testing.assert_close(targets_full[:, ~mask].reshape(2, 2, -1, 64), ours.targets(idx), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(_student_forward(student, video, mask), student(video, idx), atol=1e-5, rtol=1e-5)


def test_reference_way_teacher_block_is_the_same_function():
    """The suite's teacher-block baseline (fp32-upcast LayerNorm, literal QuickGELU) computes
    what our block computes."""
    from benchmarks.reference_style import teacher_block_forward
    from umt_fast.models.teacher import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(32, 4).eval()
    x = torch.randn(3, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher_block_forward(block, x), block(x)[0], atol=1e-5, rtol=1e-5)
