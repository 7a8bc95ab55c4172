"""Reading the reference's and CLIP's weight files into our modules.

Public API (the interoperability contract):
    load_student(path_or_state_dict, num_frames=8, img_size=224, patch_size=16)
    load_teacher(path_or_state_dict, input_resolution=224, return_layers=6)

Loading is strict: a mismatch raises a ValueError that lists the missing, unexpected and
wrong-shape keys. Files are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
import torch.nn as nn

from umt_fast.models.student import SparseVideoStudent, StudentArch
from umt_fast.models.teacher import CLIPVisionTeacher, TeacherArch, resize_clip_pos_embed

StateDict = Mapping[str, torch.Tensor]
_WRAPPER_KEYS = ("model", "module", "state_dict")
_SHOWN_KEYS = 5


def read_state_dict(path_or_state_dict: str | os.PathLike | StateDict, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Returns a flat {name: tensor} dict from a file or a dict, unwrapping ``model``/``module``."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} file not found: {path}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"cannot read {what} file {path}: {exc}") from exc
        source = path
    else:
        obj, source = path_or_state_dict, f"the given {what} dict"
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{source} does not hold a state dict of tensors")
    return dict(obj)


def strip_prefix(state_dict: StateDict, prefix: str) -> dict[str, torch.Tensor]:
    """Removes ``prefix`` from every key that has it (keys without it are kept as they are)."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def load_state_dict_checked(module: nn.Module, state_dict: StateDict, source: str, strict: bool = True) -> None:
    """load_state_dict with a readable report of missing, unexpected and wrong-shape keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if state_dict[k].shape != expected[k].shape
    )
    problems = []
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong-shape", wrong_shape)):
        if keys:
            shown = ", ".join(keys[:_SHOWN_KEYS]) + (", ..." if len(keys) > _SHOWN_KEYS else "")
            problems.append(f"{len(keys)} {name} key(s): {shown}")
    if problems and (strict or wrong_shape):
        raise ValueError(f"{source} does not match {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=False)


def _count_indexed(state_dict: StateDict, pattern: str) -> int:
    regex = re.compile(pattern)
    indices = {int(m.group(1)) for k in state_dict if (m := regex.match(k))}
    if indices and indices != set(range(len(indices))):
        raise ValueError(f"layer indices matching {pattern!r} are not contiguous from 0: {sorted(indices)}")
    return len(indices)


def student_arch_from_state_dict(
    state_dict: StateDict, num_frames: int, img_size: int, patch_size: int, drop_path: float = 0.0
) -> StudentArch:
    """Infers width, depth, heads (width // 64), aligned layers and teacher dim from the weights."""
    key = "encoder.patch_embed.proj.weight"
    if key not in state_dict:
        raise ValueError(f"not a UMT stage-1 student state dict: no {key!r} (first keys: {list(state_dict)[:5]})")
    weight = state_dict[key]
    width = weight.shape[0]
    if tuple(weight.shape[2:]) != (1, patch_size, patch_size):
        raise ValueError(
            f"{key} has kernel {tuple(weight.shape[2:])}, expected (1, {patch_size}, {patch_size}) for patch_size={patch_size}"
        )
    depth = _count_indexed(state_dict, r"encoder\.blocks\.(\d+)\.")
    return_layers = _count_indexed(state_dict, r"clip_decoder\.(\d+)\.")
    if depth == 0 or return_layers == 0:
        raise ValueError(f"student state dict has {depth} encoder blocks and {return_layers} clip_decoder heads")
    return StudentArch(
        width=width,
        depth=depth,
        heads=width // 64,
        teacher_dim=state_dict["clip_decoder.0.head.weight"].shape[0],
        return_layers=return_layers,
        num_frames=num_frames,
        img_size=img_size,
        patch_size=patch_size,
        mlp_ratio=state_dict["encoder.blocks.0.mlp.fc1.weight"].shape[0] / width,
        drop_path=drop_path,
    )


def load_student(
    path_or_state_dict: str | os.PathLike | StateDict,
    num_frames: int = 8,
    img_size: int = 224,
    patch_size: int = 16,
) -> SparseVideoStudent:
    """Loads a reference stage-1 checkpoint (raw, or under ``model``/``module``) in eval mode.

    ``student(video_BCTHW, visible_idx_BN)`` then returns [L, B, N_vis, Ct] unit vectors.
    """
    state_dict = read_state_dict(path_or_state_dict, "student checkpoint")
    arch = student_arch_from_state_dict(state_dict, num_frames, img_size, patch_size)
    student = SparseVideoStudent(arch)
    load_state_dict_checked(student, state_dict, "student checkpoint")
    return student.eval()


def clip_visual_state_dict(path_or_state_dict: str | os.PathLike | StateDict) -> dict[str, torch.Tensor]:
    """An OpenAI CLIP visual-tower state dict, with a ``visual.`` prefix removed if present."""
    state_dict = read_state_dict(path_or_state_dict, "CLIP teacher weights")
    if any(k.startswith("visual.") for k in state_dict):
        state_dict = {k[len("visual."):]: v for k, v in state_dict.items() if k.startswith("visual.")}
    if "conv1.weight" not in state_dict:
        raise ValueError(
            "not an OpenAI CLIP visual state dict: no 'conv1.weight' "
            f"(first keys: {list(state_dict)[:5]})"
        )
    return state_dict


def teacher_arch_from_state_dict(state_dict: StateDict, input_resolution: int, return_layers: int) -> TeacherArch:
    conv = state_dict["conv1.weight"]
    width = conv.shape[0]
    return TeacherArch(
        width=width,
        layers=_count_indexed(state_dict, r"transformer\.resblocks\.(\d+)\."),
        heads=width // 64,
        patch_size=conv.shape[-1],
        output_dim=state_dict["proj"].shape[1],
        input_resolution=input_resolution,
        return_layers=return_layers,
    )


def load_teacher(
    path_or_state_dict: str | os.PathLike | StateDict,
    input_resolution: int = 224,
    return_layers: int = 6,
) -> CLIPVisionTeacher:
    """Loads OpenAI CLIP visual weights (with or without ``visual.``) as a frozen teacher.

    The position embedding is resized bicubically when the file's grid differs from
    ``input_resolution / patch`` (e.g. ViT-L/14 trained at 224 px, used at 196 px).
    """
    state_dict = clip_visual_state_dict(path_or_state_dict)
    arch = teacher_arch_from_state_dict(state_dict, input_resolution, return_layers)
    state_dict["positional_embedding"] = resize_clip_pos_embed(state_dict["positional_embedding"], arch.grid)
    teacher = CLIPVisionTeacher(arch)
    load_state_dict_checked(teacher, state_dict, "CLIP teacher weights")
    return teacher.eval()
