"""Student and teacher models, built from a config or from weight files (see interop)."""
from __future__ import annotations

from umt_fast.config import MLP_RATIO, STUDENT_SIZES, PretrainConfig
from umt_fast.models.student import LN_EPS, SparseVideoStudent, StudentArch
from umt_fast.models.teacher import CLIPVisionTeacher, TeacherArch, TeacherOutput

__all__ = [
    "CLIPVisionTeacher",
    "SparseVideoStudent",
    "StudentArch",
    "TeacherArch",
    "TeacherOutput",
    "build_student",
]


def build_student(cfg: PretrainConfig, teacher_dim: int, head_norm_eps: float = LN_EPS,
                  extra_heads: tuple[tuple[int, int], ...] = ()) -> SparseVideoStudent:  # fmt: skip
    """The student of ``cfg``: K = student.return_layers heads of width ``teacher_dim``, and
    ``extra_heads`` (K, Ct) per further teacher."""
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
        extra_heads=tuple(extra_heads),
    )
    return SparseVideoStudent(arch)
