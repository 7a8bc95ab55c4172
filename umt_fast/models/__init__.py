"""Student and teacher models, built from a config or from weight files (see interop)."""
from __future__ import annotations

import logging

from umt_fast.config import MLP_RATIO, RANDOM_TEACHER, STUDENT_SIZES, TEACHER_ARCHS, PretrainConfig
from umt_fast.models.student import LN_EPS, SparseVideoStudent, StudentArch
from umt_fast.models.teacher import CLIPVisionTeacher, TeacherArch, TeacherOutput

log = logging.getLogger(__name__)

__all__ = [
    "CLIPVisionTeacher",
    "SparseVideoStudent",
    "StudentArch",
    "TeacherArch",
    "TeacherOutput",
    "build_student",
    "build_teacher",
]


def build_teacher(cfg: PretrainConfig) -> CLIPVisionTeacher:
    """The frozen CLIP teacher: from ``teacher.weights``, or random for ``none`` (with a warning)."""
    from umt_fast import interop

    K = cfg.student.return_layers
    if cfg.teacher.weights == RANDOM_TEACHER:
        log.warning(
            "THE TEACHER IS RANDOM (--teacher.weights none): its attention and targets carry no "
            "semantic information. Fine for a demo or a smoke test, useless for real pre-training. "
            "Pass an OpenAI CLIP visual state dict with --teacher.weights PATH."
        )
        spec = TEACHER_ARCHS[cfg.teacher.arch]
        return CLIPVisionTeacher(TeacherArch(**spec, input_resolution=cfg.teacher.input_resolution, return_layers=K))
    teacher = interop.load_teacher(cfg.teacher.weights, input_resolution=cfg.teacher.input_resolution, return_layers=K)
    spec = TEACHER_ARCHS[cfg.teacher.arch]
    found = (teacher.arch.width, teacher.arch.layers, teacher.arch.patch_size, teacher.arch.output_dim)
    wanted = (spec["width"], spec["layers"], spec["patch_size"], spec["output_dim"])
    if found != wanted:
        raise ValueError(
            f"--teacher.weights {cfg.teacher.weights} holds a CLIP ViT with (width, layers, patch, output) = "
            f"{found}, but teacher.arch={cfg.teacher.arch!r} is {wanted}; pick the matching --teacher.arch"
        )
    return teacher


def build_student(cfg: PretrainConfig, teacher_dim: int, head_norm_eps: float = LN_EPS) -> SparseVideoStudent:
    size = STUDENT_SIZES[cfg.student.size]
    arch = StudentArch(
        width=size["width"],
        depth=size["depth"],
        heads=size["heads"],
        teacher_dim=teacher_dim,
        return_layers=cfg.student.return_layers,
        num_frames=cfg.data.num_frames,
        img_size=cfg.data.img_size,
        patch_size=cfg.student.patch_size,
        mlp_ratio=MLP_RATIO,
        drop_path=cfg.student.drop_path,
        head_norm_eps=head_norm_eps,
    )
    return SparseVideoStudent(arch)
