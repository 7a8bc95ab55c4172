"""Tests of umt_fast.config: presets, recipe numbers, CLI/YAML overrides, validation, round trip."""

import dataclasses
import json
import math
import re

import pytest
import yaml

from umt_fast import config as C
from umt_fast.config import (
    PRESETS,
    STUDENT_SIZES,
    TEACHER_ARCHS,
    PretrainConfig,
    build_config,
    config_from_dict,
    config_to_dict,
    get_preset,
    load_config_dict,
    num_visible_per_frame,
    peak_lr,
    save_config,
    scaled_min_lr,
    scaled_warmup_lr,
    validate,
)

# The published presets leave these to the user; tests fill them in to get a valid config.
REQUIRED = ["--teacher.weights", "none", "--data.train_list", "list.csv"]


def _ready(name: str) -> PretrainConfig:
    cfg = get_preset(name)
    if cfg.teacher.weights == "":
        cfg.teacher.weights = "none"
    if cfg.data.train_list == "":
        cfg.data.train_list = "list.csv"
    return cfg


# ---------------------------------------------------------------- presets and recipe numbers


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates(name):
    cfg = _ready(name)
    validate(cfg)
    assert cfg.preset == name
    # a preset function returns a fresh object every time
    assert get_preset(name) is not get_preset(name)


def test_demo_validates_as_is_and_is_the_default():
    validate(get_preset("demo"))
    assert build_config([]) == get_preset("demo")


def test_demo_preset_values():
    cfg = get_preset("demo")
    assert (cfg.student.size, cfg.student.drop_path, cfg.student.return_layers) == ("tiny", 0.0, 2)
    assert (cfg.teacher.arch, cfg.teacher.weights, cfg.teacher.input_resolution) == ("tiny", "none", 112)
    assert cfg.data.train_list == "sample_clips"
    assert (cfg.data.num_frames, cfg.data.img_size, cfg.data.num_workers) == (4, 112, 0)
    assert cfg.train.global_batch_size == 4 and cfg.train.max_steps == 40 and cfg.train.device == "auto"
    assert cfg.optim.epochs == 40 and cfg.optim.warmup_epochs == 4
    assert peak_lr(cfg) == pytest.approx(1e-3)
    assert 0 < scaled_min_lr(cfg) < peak_lr(cfg) / 10
    assert cfg.log.every_steps == 1 and cfg.checkpoint.every_steps == 20
    assert cfg.log.mask_figure_every_steps == 20  # figures at steps 20 and 40 of the 40
    assert (cfg.log.tensorboard, cfg.log.wandb) == (False, "")
    assert C.student_grid(cfg) == C.teacher_grid(cfg) == 7
    assert num_visible_per_frame(cfg) == 49 - int(49 * 0.8) == 10


def test_umt_b16_k710_recipe():
    cfg = get_preset("umt_b16_k710")
    assert cfg.student == C.StudentConfig(size="base", patch_size=16, drop_path=0.1, return_layers=6)
    assert cfg.teacher == C.TeacherConfig(arch="vit_b16", weights="", input_resolution=224)
    assert cfg.mask == C.MaskConfig(policy="attention", ratio=0.8)
    assert (cfg.data.num_frames, cfg.data.img_size) == (8, 224)
    o = cfg.optim
    assert (o.lr, o.min_lr, o.weight_decay, o.betas, o.eps) == (1.5e-4, 1e-5, 0.05, (0.9, 0.95), 1e-8)
    assert (o.epochs, o.warmup_epochs, o.warmup_lr) == (200, 40, 0.0)
    assert cfg.train.global_batch_size == 2048 and cfg.train.max_steps == 0
    assert peak_lr(cfg) == pytest.approx(1.2e-3)
    assert scaled_min_lr(cfg) == pytest.approx(8e-5)
    assert scaled_warmup_lr(cfg) == 0.0
    assert C.student_grid(cfg) == C.teacher_grid(cfg) == 14
    assert num_visible_per_frame(cfg) == 40  # 196 - int(196 * 0.8); 320 of 1568 per clip
    assert STUDENT_SIZES["base"] == dict(width=768, depth=12, heads=12)
    assert TEACHER_ARCHS["vit_b16"]["output_dim"] == 512


def test_umt_l16_k710_recipe():
    cfg = get_preset("umt_l16_k710")
    b = get_preset("umt_b16_k710")
    assert cfg.student == C.StudentConfig(size="large", patch_size=16, drop_path=0.2, return_layers=6)
    assert cfg.teacher == C.TeacherConfig(arch="vit_l14", weights="", input_resolution=196)
    # teacher 196 px / patch 14 = 14x14, the same grid as the student's 224 / 16
    assert TEACHER_ARCHS["vit_l14"]["patch_size"] == 14
    assert C.teacher_grid(cfg) == C.student_grid(cfg) == 14
    assert num_visible_per_frame(cfg) == 40
    assert (cfg.optim, cfg.train, cfg.mask, cfg.data) == (b.optim, b.train, b.mask, b.data)
    assert peak_lr(cfg) == pytest.approx(1.2e-3)
    assert STUDENT_SIZES["large"] == dict(width=1024, depth=24, heads=16)


def test_dataclass_defaults_are_the_b_recipe():
    d, b = PretrainConfig(), get_preset("umt_b16_k710")
    for sec in C.SECTIONS:
        assert getattr(d, sec) == getattr(b, sec), sec


def _help_entries(text: str) -> dict[str, str]:
    """--option -> its help text (without the default), from --help's output."""
    entries, current = {}, None
    for line in text.splitlines():
        words = line.strip(" │").split()
        if words and words[0].startswith("--"):
            current = words[0].rstrip(",")
            entries[current] = " ".join(words[2:])
        elif current and words and not line.strip(" │").startswith("-"):
            entries[current] += " " + " ".join(words)
        else:
            current = None
    return {k: re.sub(r"\(default: .*?\)", "", v).strip() for k, v in entries.items()}


def test_every_field_has_a_doc():
    entries = _help_entries(C.help_text())
    for name in C.all_field_names():
        option = f"--{name}"
        assert option in entries, option
        assert len(entries[option]) > 10, f"{option} has no docstring: {entries[option]!r}"


# ---------------------------------------------------------------- CLI overrides


def test_cli_overrides_of_each_type():
    cfg = build_config(
        [
            "--student.size", "base",               # str
            "--student.return_layers", "3",         # int
            "--student.drop_path", "0.25",          # float
            "--data.flip", "No",                    # bool
            "--optim.betas", "0.8,0.99",            # tuple[float, float]
            "--teacher.arch", "vit_b16",
            "--teacher.input_resolution", "112",    # 7x7 grid, as the demo student
            "--run-dir", "runs/x",
            "--resume", "none",
        ]
    )
    assert cfg.student.size == "base"
    assert cfg.student.return_layers == 3 and isinstance(cfg.student.return_layers, int)
    assert cfg.student.drop_path == 0.25
    assert cfg.data.flip is False
    assert cfg.optim.betas == (0.8, 0.99) and isinstance(cfg.optim.betas, tuple)
    assert cfg.run_dir == "runs/x" and cfg.resume == "none"
    assert cfg.preset == "demo"


def test_log_options_for_figures_tensorboard_and_wandb():
    cfg = build_config(["--log.mask_figure_every_steps", "5", "--log.tensorboard", "true",
                        "--log.wandb", "umt-runs", "--log.wandb_mode", "offline"])
    assert cfg.log == C.LogConfig(every_steps=1, mask_figure_every_steps=5, tensorboard=True, wandb="umt-runs",
                                  wandb_mode="offline")


@pytest.mark.parametrize(
    "text, expected",
    [("true", True), ("TRUE", True), ("1", True), ("yes", True), ("Yes", True),
     ("false", False), ("False", False), ("0", False), ("no", False), ("NO", False)],
)
def test_bool_spellings(text, expected):
    assert build_config(["--data.flip", text]).data.flip is expected


@pytest.mark.parametrize("text", ["0.9,0.95", "0.9, 0.95", "(0.9,0.95)", "[0.9, 0.95]"])
def test_tuple_spellings(text):
    assert build_config(["--optim.betas", text]).optim.betas == (0.9, 0.95)


def test_equals_form_and_float_forms():
    cfg = build_config(["--optim.lr=1e-2", "--optim.min_lr", "1E-4", "--train.seed=7"])
    assert cfg.optim.lr == 0.01 and cfg.optim.min_lr == 1e-4 and cfg.train.seed == 7


def test_unspecified_cli_options_do_not_clobber_the_preset():
    cfg = build_config(["--preset", "umt_l16_k710", *REQUIRED, "--train.max_steps", "5"])
    ref = _ready("umt_l16_k710")
    ref.train.max_steps = 5
    assert cfg == ref


def test_both_spellings_of_an_option():
    a = build_config(["--data.train_list", "x.csv", "--train.max_steps", "3", "--run-dir", "r"])
    b = build_config(["--data.train-list", "x.csv", "--train.max-steps", "3", "--run_dir", "r"])
    assert a == b and a.data.train_list == "x.csv" and a.train.max_steps == 3 and a.run_dir == "r"


def test_preset_then_yaml_then_cli(tmp_path):
    path = tmp_path / "over.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "run_dir": "from_yaml",
                "optim": {"lr": 0.01, "epochs": 7},
                "train": {"max_steps": 11, "seed": 3},
                "data": {"flip": False},
                "mask": None,  # an empty section is fine
            }
        )
    )
    cfg = build_config(["--config", str(path), "--train.max_steps", "22", "--optim.betas", "0.5,0.6"])
    demo = get_preset("demo")
    assert cfg.optim.lr == 0.01 and cfg.optim.epochs == 7  # YAML over preset
    assert cfg.train.seed == 3 and cfg.data.flip is False and cfg.run_dir == "from_yaml"
    assert cfg.train.max_steps == 22  # CLI over YAML
    assert cfg.optim.betas == (0.5, 0.6)
    assert cfg.train.global_batch_size == demo.train.global_batch_size  # untouched: preset
    assert cfg.student == demo.student and cfg.mask == demo.mask


def test_yaml_strings_are_converted(tmp_path):
    # PyYAML reads "1e-3" (no dot) as a string; it must still become a float.
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  betas: [0.8, 0.9]\ndata:\n  flip: 'no'\n")
    cfg = build_config(["--config", str(path)])
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.8, 0.9) and cfg.data.flip is False


def test_yaml_preset_is_used_unless_cli_names_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"preset": "umt_b16_k710", "teacher": {"weights": "none"},
                                    "data": {"train_list": "x.csv"}}))
    assert build_config(["--config", str(path)]).student.size == "base"
    with pytest.raises(ValueError, match="student.return_layers"):
        # CLI --preset demo wins; demo's tiny student has only 4 blocks
        build_config(["--config", str(path), "--preset", "demo", "--student.return_layers", "6"])


def test_yaml_unknown_key_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lrr": 0.1}}))
    with pytest.raises(ValueError, match=r"optim\.lrr.*optim\.lr"):
        build_config(["--config", str(path)])
    path.write_text(yaml.safe_dump({"optimizer": {"lr": 0.1}}))
    with pytest.raises(ValueError, match="optimizer"):
        build_config(["--config", str(path)])


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        build_config(["--config", str(tmp_path / "nope.yaml")])


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError) as e:
        build_config(["--preset", "umt_b16"])
    msg = str(e.value)
    assert "umt_b16" in msg and all(name in msg for name in PRESETS)


# ---------------------------------------------------------------- validation errors


BAD = [
    # (argv, field named in the message, value named in the message)
    (["--mask.ratio", "1.0"], "mask.ratio", "1.0"),
    (["--mask.ratio", "0"], "mask.ratio", "0"),
    (["--data.img_size", "100"], "data.img_size", "100"),
    (["--teacher.input_resolution", "224"], "teacher.input_resolution", "224"),
    (["--optim.lr", "-1e-3"], "optim.lr", "-0.001"),
    (["--optim.min_lr", "1.0"], "optim.min_lr", "1.0"),
    (["--student.return_layers", "5"], "student.return_layers", "5"),
    (["--preset", "umt_b16_k710", "--data.train_list", "x.csv"], "--teacher.weights", "none"),
    (["--preset", "umt_b16_k710", "--teacher.weights", "none"], "data.train_list", "--data.train_list"),
    (["--checkpoint.every_steps", "0"], "checkpoint.every_steps", "0"),
    (["--optim.betas", "0.9,1.0"], "optim.betas", "1.0"),
    (["--optim.warmup_epochs", "41"], "optim.warmup_epochs", "41"),
    (["--student.drop_path", "1.0"], "student.drop_path", "1.0"),
    (["--teacher.arch", "vit_b32"], "teacher.arch", "vit_b32"),
    (["--data.max_bad_fraction", "1.5"], "data.max_bad_fraction", "1.5"),
    (["--log.every_steps", "0"], "log.every_steps", "0"),
    (["--log.mask_figure_every_steps", "-1"], "log.mask_figure_every_steps", "-1"),
    (["--optim.lr", "nan"], "optim.lr", "nan"),
    (["--train.seed", "-1"], "train.seed", "-1"),
    (["--optim.warmup_lr", "-0.5"], "optim.warmup_lr", "-0.5"),
    (["--train.cuda_graphs", "true", "--train.precision", "fp16"], "train.precision", "fp16"),
    (["--train.cuda_graphs", "true", "--dist.strategy", "fsdp"], "dist.strategy", "fsdp"),
    (["--train.cuda_graphs", "true", "--train.device", "cpu"], "train.cuda_graphs", "cpu"),
]


@pytest.mark.parametrize("argv, name, value", BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_value_raises_value_error_naming_the_field(argv, name, value):
    with pytest.raises(ValueError) as e:
        build_config(argv)
    msg = str(e.value)
    assert name in msg, msg
    assert value in msg, msg


UNPARSABLE = [
    # (argv, option named in the message, value named in the message): tyro refuses them, exit code 2
    (["--mask.policy", "semantic"], "--mask.policy", "semantic"),
    (["--data.flip", "maybe"], "--data.flip", "maybe"),
    (["--student.size", "huge"], "--student.size", "huge"),
    (["--optim.betas", "0.9"], "--optim.betas", "0.9"),
    (["--train.global_batch_size", "four"], "--train.global_batch_size", "four"),
    (["--train.device", "tpu"], "--train.device", "tpu"),
    (["--train.precision", "fp8"], "--train.precision", "fp8"),
    (["--log.wandb_mode", "offlne"], "--log.wandb_mode", "offlne"),
    (["--log.tensorboard", "sometimes"], "--log.tensorboard", "sometimes"),
]


@pytest.mark.parametrize("argv, option, value", UNPARSABLE, ids=[" ".join(a) for a, _, _ in UNPARSABLE])
def test_unparsable_value_exits_2_naming_the_option(argv, option, value, capsys):
    with pytest.raises(SystemExit) as e:
        build_config(argv)
    assert e.value.code == 2
    err = " ".join(capsys.readouterr().err.replace("│", " ").split())
    assert option in err and value in err, err


def test_a_bad_value_in_a_file_names_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    for section, values, name in [("mask", {"policy": "semantic"}, "mask.policy"),
                                  ("log", {"wandb_mode": "offlne"}, "did you mean 'offline'"),
                                  ("data", {"flip": "maybe"}, "data.flip"),
                                  ("train", {"device": "tpu"}, "train.device")]:  # fmt: skip
        path.write_text(yaml.safe_dump({section: values}))
        with pytest.raises(ValueError, match=re.escape(name)):
            build_config(["--config", str(path)])


def test_return_layers_bounded_by_teacher_layers():
    # a 12-block student with the 4-layer tiny teacher: K=6 passes the student check only
    cfg = get_preset("demo")
    cfg.student.size = "base"
    cfg.student.return_layers = 6
    with pytest.raises(ValueError, match=r"student\.return_layers.*teacher layers \(4"):
        validate(cfg)


def test_grid_mismatch_message_suggests_a_resolution():
    with pytest.raises(ValueError, match=r"teacher\.input_resolution=224.*teacher.input_resolution=112"):
        build_config(["--teacher.input_resolution", "224"])


def test_ratio_just_below_one_still_leaves_a_visible_token():
    cfg = get_preset("demo")
    cfg.mask.ratio = 1 - 1e-17  # == 1.0 in float: rejected by the range check
    with pytest.raises(ValueError, match="mask.ratio"):
        validate(cfg)
    # the largest float below 1: P * ratio still rounds below P, so one token per frame stays visible
    cfg.mask.ratio = math.nextafter(1.0, 0.0)
    validate(cfg)
    assert num_visible_per_frame(cfg) == 1
    cfg.mask.ratio = 0.01  # int(49 * 0.01) = 0: nothing masked, but allowed
    validate(cfg)
    assert num_visible_per_frame(cfg) == 49


def test_direct_assignment_of_a_wrong_type_is_caught():
    cfg = get_preset("demo")
    cfg.train.global_batch_size = "4"
    with pytest.raises(ValueError, match="train.global_batch_size"):
        validate(cfg)
    cfg = get_preset("demo")
    cfg.data.flip = 1
    with pytest.raises(ValueError, match="data.flip"):
        validate(cfg)


def test_check_paths(tmp_path):
    cfg = get_preset("demo")
    C.check_paths(cfg)  # 'none' teacher, bundled clips, no root, resume auto: nothing to check
    cfg.teacher.weights = str(tmp_path / "clip.pth")
    with pytest.raises(FileNotFoundError, match="teacher.weights"):
        C.check_paths(cfg)
    (tmp_path / "clip.pth").write_bytes(b"")
    C.check_paths(cfg)
    cfg.data.root = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="data.root"):
        C.check_paths(cfg)


# ---------------------------------------------------------------- unknown options, --help


@pytest.mark.parametrize(
    "option, suggestion",
    [("--train.max_step", "--train.max_steps"), ("--optim.lrr", "--optim.lr"),
     ("--trian.max_steps", "--train.max_steps"), ("--data.trainlist", "--data.train_list")],
)
def test_unknown_option_exits_2_and_names_it(option, suggestion, capsys):
    with pytest.raises(SystemExit) as e:
        build_config([option, "5"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert option in err and suggestion in err, err


def test_unknown_option_in_equals_form(capsys):
    with pytest.raises(SystemExit) as e:
        build_config(["--train.max_step=5"])
    assert e.value.code == 2
    assert "--train.max_step" in capsys.readouterr().err


def test_abbreviations_are_not_accepted(capsys):
    with pytest.raises(SystemExit) as e:
        build_config(["--data.train", "x.csv"])
    assert e.value.code == 2


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        build_config(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ["--train.max_steps", "--checkpoint.every_steps", "--log.every_steps", "--data.train_list",
                "--data.root", "--preset", "--run_dir", "--resume", "--config"]:
        assert opt in out, opt
    for name in C.all_field_names():
        if name != "preset" and "." in name:
            assert f"--{name} " in out, name
    # help comes from the field docstrings and shows the default
    assert "Stop after this many optimizer steps" in out
    assert "(default: 0.9,0.95)" in out
    assert all(name in out for name in PRESETS)


# ---------------------------------------------------------------- serialisation


@pytest.mark.parametrize("name", list(PRESETS))
def test_save_load_round_trip(name, tmp_path):
    cfg = _ready(name)
    cfg.run_dir = str(tmp_path / "run")
    cfg.optim.betas = (0.85, 0.975)
    yaml_path = save_config(cfg, cfg.run_dir)
    assert yaml_path == tmp_path / "run" / "config.yaml"
    json_path = tmp_path / "run" / "config.json"
    assert json_path.is_file()
    for path in (yaml_path, json_path):
        d = load_config_dict(path)
        assert d == config_to_dict(cfg)
        back = config_from_dict(d)
        assert back == cfg
        assert isinstance(back.optim.betas, tuple)
    # key order follows the dataclasses, sections included
    text = yaml_path.read_text()
    assert text.index("preset:") < text.index("student:") < text.index("teacher:") < text.index("log:")
    assert list(json.loads(json_path.read_text())) == ["preset", "run_dir", "resume", *C.SECTIONS]
    # and a saved config can be fed back through --config
    assert build_config(["--config", str(yaml_path)]) == cfg


def test_config_from_dict_rejects_unknown_keys_and_bad_types():
    d = config_to_dict(get_preset("demo"))
    d["train"]["max_step"] = 3
    with pytest.raises(ValueError, match="train.max_step"):
        config_from_dict(d)
    d = config_to_dict(get_preset("demo"))
    d["bogus"] = 1
    with pytest.raises(ValueError, match="bogus"):
        config_from_dict(d)
    d = config_to_dict(get_preset("demo"))
    d["train"]["global_batch_size"] = 4.5
    with pytest.raises(ValueError, match="train.global_batch_size"):
        config_from_dict(d)
    d = config_to_dict(get_preset("demo"))
    d["teacher"]["weights"] = None
    with pytest.raises(ValueError, match="teacher.weights"):
        config_from_dict(d)


def test_help_shows_the_chosen_presets_values(capsys):
    with pytest.raises(SystemExit):
        build_config(["--preset", "umt_l16_k710", "--help"])
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "--student.size {tiny,base,large} Student size" in out
    assert "(default: large)" in out and "(default: vit_l14)" in out and "(default: 196)" in out


def test_no_help_mentions_what_its_command_lacks(capsys):
    from umt_fast import visualize
    from umt_fast.config import finetune

    assert "teacher" not in finetune.help_text().lower()
    with pytest.raises(SystemExit):
        visualize.main(["mask", "--help"])
    out = capsys.readouterr().out
    assert "--run-dir" not in out and "--resume" not in out and "--preset" in out
