"""The reference's training checkpoints load as the reference writes them, without running code.

The files are built the way the reference's scripts build them: stage 1 and fine-tuning through
``single_modality/utils.py:save_model`` (``{model, optimizer, epoch, scaler, args}``, ``args`` an
``argparse.Namespace``), stage 2 through ``multi_modality/tasks/pretrain.py`` (``{model,
optimizer, scheduler, scaler, config, epoch, global_step}``, ``config`` the reference's
``utils.easydict.EasyDict``). The EasyDict class exists only while the file is written, under the
reference's module name, so loading cannot lean on it.
"""
import argparse
import pathlib
import sys
import types

import numpy as np
import pytest
import torch

from tests import umt_reference as ref
from umt_fast import interop
from umt_fast.safe_load import load_torch_file


class _EasyDict(dict):
    """The reference's ``utils.easydict.EasyDict``, restated: entries that are also attributes,
    nested dicts converted."""

    def __init__(self, d=None, **kwargs):
        for k, v in {**(d or {}), **kwargs}.items():
            setattr(self, k, v)

    def __setattr__(self, name, value):
        if isinstance(value, (list, tuple)):
            value = type(value)(self.__class__(x) if isinstance(x, dict) else x for x in value)
        elif isinstance(value, dict) and not isinstance(value, _EasyDict):
            value = _EasyDict(value)
        super().__setattr__(name, value)
        super().__setitem__(name, value)


def _save_with_easydict(obj_fn, path):
    """torch.save(obj_fn(EasyDict)) with EasyDict importable as ``utils.easydict.EasyDict``."""
    module, package = types.ModuleType("utils.easydict"), types.ModuleType("utils")
    _EasyDict.__module__, _EasyDict.__qualname__ = "utils.easydict", "EasyDict"
    module.EasyDict, package.easydict = _EasyDict, module
    saved = {name: sys.modules.get(name) for name in ("utils", "utils.easydict")}
    sys.modules.update({"utils": package, "utils.easydict": module})
    try:
        torch.save(obj_fn(_EasyDict), path)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def _optimizer_state(sd):
    params = [torch.nn.Parameter(v.clone()) for v in list(sd.values())[:3]]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95))
    sum(p.sum() for p in params).backward()
    opt.step()
    return opt.state_dict()


def _reference_args(**extra):
    fields = dict(model="pretrain_umt_base_patch16_224", batch_size=64, lr=np.float64(1.5e-4), window_size=(8, 14, 14),
                  mask_type="attention", output_dir="/out", seed=0, clip_return_layer=np.int64(6))  # fmt: skip
    return argparse.Namespace(**{**fields, **extra})


def _save_model_style(path, sd, args):
    """single_modality/utils.py save_model, the loss-scaler branch."""
    torch.save({"model": sd, "optimizer": _optimizer_state(sd), "epoch": 199,
                "scaler": torch.amp.GradScaler("cpu").state_dict(), "args": args}, path)  # fmt: skip


def test_stage1_file_as_the_reference_saves_it_loads(tmp_path):
    sd = ref.random_student_state_dict(width=64, depth=2, heads=1, K=2, teacher_dim=24)
    path = tmp_path / "checkpoint-199.pth"
    _save_model_style(path, sd, _reference_args())
    student = interop.load_student(str(path), num_frames=2, img_size=64)
    for key, value in sd.items():
        assert torch.equal(student.state_dict()[key], value), key
    args = load_torch_file(path)["args"]
    assert isinstance(args, argparse.Namespace) and args.window_size == (8, 14, 14) and args.lr == 1.5e-4


def test_finetuned_file_as_the_reference_saves_it_loads(tmp_path):
    backbone = {k[len("encoder."):]: v for k, v in ref.random_student_state_dict(64, 2, 1, 1, 24).items()
                if k.startswith("encoder.") and not k.startswith("encoder.norm.")}  # fmt: skip
    sd = {**backbone, "fc_norm.weight": torch.rand(64), "fc_norm.bias": torch.rand(64),
          "head.weight": torch.randn(7, 64), "head.bias": torch.randn(7)}  # fmt: skip
    path = tmp_path / "checkpoint-best.pth"
    _save_model_style(path, sd, _reference_args(nb_classes=7, finetune="/ckpt/stage1.pth"))
    model = interop.load_video_vit(str(path), num_frames=2, img_size=64)
    assert model.arch.num_classes == 7
    assert torch.equal(model.state_dict()["head.weight"], sd["head.weight"])
    assert torch.equal(model.state_dict()["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])


def test_stage2_file_as_the_reference_saves_it_loads(tmp_path):
    from umt_fast.models.student import SparseVideoStudent, StudentArch
    from umt_fast.models.vl import HEAD_NORM_EPS, VisionLanguageModel, to_reference_state_dict
    from umt_fast.recipes.retrieval import load_stage2_model
    from umt_fast.models.text import build_text_encoder

    torch.manual_seed(0)
    arch = StudentArch(width=192, depth=2, heads=3, teacher_dim=24, return_layers=2, num_frames=2, img_size=32,
                       head_norm_eps=HEAD_NORM_EPS)  # fmt: skip
    model = VisionLanguageModel(SparseVideoStudent(arch), build_text_encoder("minilm", 2, 192, load=False), 16)
    sd = to_reference_state_dict(model)
    path = tmp_path / "ckpt_09.pth"
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]), lambda s: 1.0)

    def build(EasyDict):
        config = EasyDict({"model": {"vision_encoder": {"name": "vit_b16", "clip_return_layer": 2}},
                           "inputs": {"max_txt_l": {"image": 32, "video": 32}}, "batch_size": [128, 128],
                           "optimizer": {"lr": np.float64(1e-4)}})  # fmt: skip
        return {"model": sd, "optimizer": _optimizer_state(sd), "scheduler": scheduler.state_dict(),
                "scaler": torch.amp.GradScaler("cpu").state_dict(), "config": config, "epoch": 9,
                "global_step": 1234}  # fmt: skip

    _save_with_easydict(build, path)
    assert "utils" not in sys.modules or not hasattr(sys.modules["utils"], "easydict")
    loaded, _tokenizer = load_stage2_model(str(path), "minilm", num_frames=2, img_size=32)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    config = load_torch_file(path)["config"]
    assert config["inputs"]["max_txt_l"]["video"] == 32 and config.model["vision_encoder"]["name"] == "vit_b16"


_RAN = []


def _record_run(what):
    _RAN.append(what)


class _Payload:
    def __reduce__(self):
        return (_record_run, ("ran",))


def test_a_planted_class_is_refused_by_name_and_never_run(tmp_path):
    sd = ref.random_student_state_dict(width=64, depth=2, heads=1, K=2, teacher_dim=24)
    path = tmp_path / "checkpoint-199.pth"
    _save_model_style(path, sd, _reference_args(output_dir=pathlib.PurePosixPath("/out")))
    with pytest.raises(ValueError, match=r"checkpoint-199\.pth holds a pickled pathlib\.PurePosixPath") as info:
        interop.load_student(str(path), num_frames=2, img_size=64)
    assert "\n" not in str(info.value)

    torch.save({"model": sd, "args": _Payload()}, path)
    with pytest.raises(ValueError, match=r"holds a pickled tests\.test_reference_checkpoints\._record_run"):
        interop.load_student(str(path), num_frames=2, img_size=64)
    assert _RAN == []


@pytest.mark.parametrize("content", [b"not a checkpoint at all\n" * 20, b""], ids=["text", "empty"])
def test_a_garbage_or_truncated_file_gets_one_line(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"weights\.pth is not a torch\.save checkpoint") as info:
        interop.load_student(str(path))
    assert "\n" not in str(info.value)
    good = tmp_path / "good.pth"
    torch.save({"model": ref.random_student_state_dict(64, 2, 1, 2, 24)}, good)
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a partial write
    with pytest.raises(ValueError, match=r"weights\.pth is not a torch\.save checkpoint, or it is truncated"):
        interop.load_student(str(path))
