"""The throughput suite's --tiny mode runs on a CPU and reports both step paths."""
import json

from benchmarks import gpu_suite


def test_tiny_mode_reports_our_step_beside_the_reference_style_step(tmp_path, capsys):
    assert gpu_suite.main(["--tiny", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    rows = {row["path"]: row for row in report["steps"]}
    assert set(rows) == {"umt_fast", "reference-style"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["clips/s"] > 0 and row["batch"] == 2
    ours = rows["umt_fast"]
    assert ours["teacher fwd ms"] > 0 and ours["student fwd+bwd ms"] > 0 and ours["optimizer ms"] > 0
    assert ours["x reference-style"] == ours["clips/s"] / rows["reference-style"]["clips/s"]
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("| demo | reference-style |")  # the table comes last


def test_model_flops_match_the_published_costs():
    from umt_fast.models.student import StudentArch
    from umt_fast.models.teacher import TeacherArch

    teacher = TeacherArch(width=1024, layers=24, heads=16, patch_size=14, output_dim=768, input_resolution=196)
    student = StudentArch(width=1024, depth=24, heads=16, teacher_dim=768)
    flops = gpu_suite.model_flops_per_clip(teacher, student, teacher.grid, 320)
    assert 1.55e12 < flops < 1.7e12  # UMT-L: ~1.0 teacher + ~0.62 student (DESIGN.md)


def test_tiny_mode_adds_a_row_per_compile_mode(tmp_path):
    assert gpu_suite.main(["--tiny", "--compile-modes", "blocks", "--out", str(tmp_path)]) == 0
    rows = {row["path"]: row for row in json.loads((tmp_path / "gpu_suite.json").read_text())["steps"]}
    assert set(rows) == {"umt_fast", "umt_fast + compile blocks", "reference-style"}
    assert "error" not in rows["umt_fast + compile blocks"] and rows["umt_fast + compile blocks"]["clips/s"] > 0


def test_unknown_compile_mode_is_refused(capsys):
    import pytest

    with pytest.raises(SystemExit):
        gpu_suite.main(["--tiny", "--compile-modes", "fast"])
    assert "--compile-modes" in capsys.readouterr().err


def test_model_flops_formula_counts_every_block_matmul():
    """The MFU numerator against torch's own FLOP counter, op by op: the teacher's blocks over
    one forward, the student's blocks over forward and backward, for the demo models (the
    math attention backend, so that the attention matmuls are counted too). The formula leaves
    out only the patch embeddings and the heads (under 1% at UMT-L)."""
    import re

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from umt_fast.data.transforms import normalize_video
    from umt_fast.losses import alignment_loss
    from umt_fast.masking import mask_and_targets, visible_tokens_per_clip
    from umt_fast.models.attention import attention_backend

    def block_flops(counter):
        return sum(sum(by_op.values()) for name, by_op in counter.get_flop_counts().items()
                   if re.search(r"\.(resblocks|blocks)\.\d+$", name))

    cfg, teacher, student = gpu_suite._build("demo", torch.device("cpu"), tiny=False)
    B, T, S = 2, cfg.data.num_frames, cfg.data.img_size
    video = normalize_video(torch.randint(0, 256, (B, T, S, S, 3), dtype=torch.uint8))
    P = student.arch.patches_per_frame
    with attention_backend("math"):
        with FlopCounterMode(display=False) as teacher_count, torch.no_grad():
            idx, targets = mask_and_targets(teacher(video), "attention", ratio=cfg.mask.ratio, seed=0, offset=0)
        with FlopCounterMode(display=False) as student_count:
            alignment_loss(student(video, idx), targets).backward()

    from umt_fast.engine import flops

    grid, visible = teacher.arch.grid, visible_tokens_per_clip("attention", T, P, cfg.mask.ratio)
    teacher_formula = flops.transformer_forward_flops(T * (grid**2 + 1), grid**2 + 1, teacher.arch.width, teacher.arch.layers)
    student_formula = 3 * flops.transformer_forward_flops(visible, visible, student.arch.width, student.arch.depth)
    assert block_flops(teacher_count) == B * teacher_formula
    assert block_flops(student_count) == B * student_formula
    assert gpu_suite.model_flops_per_clip(teacher.arch, student.arch, grid, visible) == teacher_formula + student_formula
