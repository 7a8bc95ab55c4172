"""Several teachers at once: the config forms of teacher.extra, the student's heads per teacher,
the step's loss (the weighted sum of each teacher's term, on the mask teacher's tokens) against an
independent computation, and training with CLIP-tiny plus a small DINOv2 from the command line:
the loss falls, each term is logged, resume is exact and two ranks equal one."""
import pytest
import torch
import yaml

from tests.launch import run_command
from umt_fast.config import PretrainConfig, build_config, teacher_specs
from umt_fast.data.transforms import normalize_video
from umt_fast.interop import build_teachers, load_student
from umt_fast.masking import sample_visible_tokens
from umt_fast.models import build_student
from umt_fast.recipes.pretrain import PretrainStep

DINO = "timm:vit_small_patch14_dinov2.lvd142m"
TWO_TEACHERS = ["--teacher.extra", f"arch={DINO},weights=none,input_resolution=56,loss_weight=0.5,return_layers=1"]
SMALL = ["--data.img_size", "64", "--teacher.input_resolution", "64", "--data.num_workers", "0",
         "--log.every_steps", "1", "--train.global_batch_size", "4", "--student.drop_path", "0.2"]  # fmt: skip


def test_extra_teachers_from_the_command_line_and_a_config_file(tmp_path):
    cfg = build_config(SMALL + TWO_TEACHERS + ["--mask.teacher", "1"])
    first, second = teacher_specs(cfg)
    assert (first.arch, first.loss_weight, first.return_layers) == ("tiny", 1.0, 2)
    assert (second.arch, second.input_resolution, second.loss_weight, second.return_layers) == (DINO, 56, 0.5, 1)
    assert second.name == "teacher.extra[0]" and cfg.mask.teacher == 1

    path = tmp_path / "two.yaml"  # a list of mappings, the config file's form
    path.write_text(yaml.safe_dump({"teacher": {"extra": [{"arch": "tiny", "weights": "none", "input_resolution": 64}]}}, sort_keys=False))
    cfg = build_config(["--config", str(path)] + SMALL)
    assert cfg.teacher.extra == ("arch=tiny,weights=none,input_resolution=64",)
    assert teacher_specs(cfg)[1].return_layers == cfg.student.return_layers  # K defaults to the student's


@pytest.mark.parametrize("extra, message", [
    ("arch=tiny,weights=none", "teacher.extra[0]='arch=tiny,weights=none' is not allowed: needs input_resolution"),
    ("arch=tiny,weights=none,input_resolution=64,lr=3", "teacher.extra[0] key='lr' is not allowed"),
    ("arch=tiny,weights=none,input_resolution=sixty", "teacher.extra[0].input_resolution='sixty' is not allowed"),
    ("arch=tiny,weights=none,input_resolution=112", "use teacher.extra[0].input_resolution=64"),
    ("arch=tiny,weights=none,input_resolution=64,loss_weight=0", "teacher.extra[0].loss_weight=0.0 is not allowed"),
    ("arch=tiny,weights=none,input_resolution=64,return_layers=5", "teacher.extra[0].return_layers=5 is not allowed"),
])  # fmt: skip
def test_bad_extra_teachers_are_refused_naming_the_entry(extra, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_config(SMALL + ["--teacher.extra", extra])


def test_the_mask_teacher_must_exist():
    with pytest.raises(ValueError, match="mask.teacher=1 is not allowed: names no teacher: the run has 1"):
        build_config(SMALL + ["--mask.teacher", "1"])


def _two_teacher_config() -> PretrainConfig:
    return build_config(SMALL + ["--teacher.extra", "arch=tiny,weights=none,input_resolution=64,loss_weight=0.25,"
                                 "return_layers=1", "--mask.teacher", "1"])  # fmt: skip


def test_the_step_loss_is_the_weighted_sum_on_the_mask_teachers_tokens():
    """Recomputed by hand: the visible tokens sampled from teacher 1's attention, each teacher's
    targets on them, each teacher's heads, the mean of 2 - 2 cos per teacher, weighted."""
    cfg = _two_teacher_config()
    torch.manual_seed(0)
    teachers = build_teachers(cfg)
    student = build_student(cfg, teachers[0].arch.output_dim, extra_heads=[(1, teachers[1].arch.output_dim)]).eval()
    assert [h.shape[-1] for h in student(torch.zeros(1, 3, 4, 64, 64), torch.arange(8).view(1, 8), all_teachers=True)] == [64, 64]
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    step = PretrainStep(student, teachers[0], optimizer, mask_policy="attention", mask_ratio=0.75, seed=3,
                        device=torch.device("cpu"), autocast_dtype=None, extra_teachers=teachers[1:],
                        loss_weights=[1.0, 0.25], mask_teacher=1)  # fmt: skip
    clips = torch.randint(0, 256, (2, 4, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    losses = step(clips, 5)

    video = normalize_video(clips)
    with torch.no_grad():
        cls_attn = teachers[1](video).cls_attn
        idx = sample_visible_tokens("attention", batch_size=2, num_frames=4, patches_per_frame=16, ratio=0.75, seed=3,
                                    offset=5, device=torch.device("cpu"), cls_attn_BTP=cls_attn)  # fmt: skip
        terms = []
        for teacher, predicted in zip(teachers, student(video, idx, all_teachers=True)):
            target = teacher(video).targets(idx).double()
            assert predicted.shape == target.shape
            terms.append((2 - 2 * (predicted.double() * target).sum(-1)).mean())
    expected = torch.stack([terms[0] + 0.25 * terms[1], terms[0], terms[1]])
    torch.testing.assert_close(losses.double(), expected, atol=1e-5, rtol=0)


def test_each_teachers_heads_are_in_the_checkpoint_and_export(tmp_path):
    cfg = _two_teacher_config()
    teachers = build_teachers(cfg)
    student = build_student(cfg, 64, extra_heads=[(1, teachers[1].arch.output_dim)])
    loaded = load_student(student.state_dict(), num_frames=4, img_size=64)
    assert loaded.arch.extra_heads == ((1, 64),) and loaded.arch.return_layers == 2
    idx = torch.arange(8).view(1, 8)
    video = torch.randn(1, 3, 4, 64, 64)
    for a, b in zip(student.eval()(video, idx, all_teachers=True), loaded(video, idx, all_teachers=True)):
        torch.testing.assert_close(a, b)


def _losses(run_dir, nproc, *args):
    records = run_command("umt_fast.pretrain", run_dir, nproc, SMALL + TWO_TEACHERS + list(args), port_base=29700)
    return [r for r in records if "loss" in r]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return _losses(tmp_path_factory.mktemp("one") / "run", 1, "--train.max_steps", "6")


def test_two_teachers_train_and_log_each_term(one_rank):
    assert [r["step"] for r in one_rank] == [1, 2, 3, 4, 5, 6]
    for r in one_rank:
        assert r["loss"] == pytest.approx(r["loss_teacher0"] + 0.5 * r["loss_teacher1"], rel=1e-5)
    assert one_rank[-1]["loss"] < one_rank[0]["loss"]


def test_two_teachers_resume_exactly(tmp_path, one_rank):
    run_dir = tmp_path / "run"
    _losses(run_dir, 1, "--train.max_steps", "3", "--checkpoint.every_steps", "3")
    resumed = _losses(run_dir, 1, "--train.max_steps", "6")
    for record in resumed[-3:]:
        expected = one_rank[record["step"] - 1]
        for key in ("loss", "loss_teacher0", "loss_teacher1"):
            assert record[key] == pytest.approx(expected[key], abs=1e-6), (key, record, expected)


def test_two_teachers_on_two_ranks_equal_one(tmp_path, one_rank):
    two = _losses(tmp_path / "run", 2, "--train.max_steps", "6")
    for a, b in zip(one_rank, two):
        for key in ("loss", "loss_teacher0", "loss_teacher1"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (key, a, b)


def test_a_run_saved_before_the_teacher_options_existed_resumes(tmp_path, capsys):
    """A config.yaml without teacher.extra, loss_weight, precision and mask.teacher (an older
    version's) stands for their defaults: no change of the model to refuse."""
    from umt_fast.pretrain import main

    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), "--checkpoint.every_steps", "1"] + SMALL
    assert main(args + ["--train.max_steps", "1"]) == 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    for key in ("extra", "loss_weight", "precision"):
        del saved["teacher"][key]
    del saved["mask"]["teacher"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    capsys.readouterr()
    assert main(["--run-dir", str(run_dir), "--train.max_steps", "2"]) == 0
    err = capsys.readouterr().err
    changes = next(line for line in err.splitlines() if line.startswith("resuming"))
    assert changes.endswith("changing train.max_steps: 1 -> 2")
    assert main(["--run-dir", str(run_dir), "--train.max_steps", "3", "--teacher.loss_weight", "2"]) == 2
    assert "would change its model or data: teacher.loss_weight: 1.0 -> 2.0" in capsys.readouterr().err
