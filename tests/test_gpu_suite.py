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
