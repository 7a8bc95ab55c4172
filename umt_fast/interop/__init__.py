"""Reading the reference's and CLIP's weight files into our modules.

Public API (the interoperability contract):

    load_student(path_or_state_dict, num_frames=8, img_size=224, patch_size=16, strict=True)
        a stage-1 or stage-2 file -> SparseVideoStudent (encoder + alignment heads)
    load_video_vit(path_or_state_dict, num_frames=8, img_size=224, patch_size=16, strict=True)
        any student or fine-tuned file -> the dense VideoViT (classifier or encoder)
    init_video_vit(model, path_or_state_dict, strict=True, head_label_map=None)
        the backbone, fc_norm and a fitting head (K710 -> 400 classes, or rows by a label map)
        of any such file into an existing VideoViT
    load_teacher(path_or_state_dict, input_resolution=224, return_layers=6, strict=True)
        a CLIP visual tower in any supported format -> CLIPVisionTeacher

Files recognised (by their keys, not their names):

* Student side: the reference's stage-1 files (``encoder.*``, ``clip_decoder.*``), stage-2
  files (the ``vision_encoder.*`` part), fine-tuned files (``patch_embed.*``, ``blocks.*``,
  ``fc_norm.*``, ``head.*``, optional ``pos_embed``, or all of it behind ``backbone.`` /
  ``encoder.``); raw or under ``model`` / ``module`` / ``state_dict``; ``module.`` and
  torch.compile's ``_orig_mod.`` are removed. A ``pos_embed`` [1, N, C] in the file is
  resized to the requested frames and resolution (`resize_video_pos_embed`); without one, the
  dense ViT gets the reference's fixed table (1568 rows, resized to the clip).
* CLIP teachers: OpenAI state dicts (with or without ``visual.``), OpenAI's TorchScript
  ``.pt`` archives, open_clip checkpoints, timm ``vision_transformer`` CLIP weights and
  Hugging Face ``CLIPVisionModelWithProjection`` / ``CLIPModel`` weights; all are mapped to
  OpenAI's names (`clip_visual_state_dict`).
* Containers: ``torch.save`` pickles (read with ``weights_only=True``), ``.safetensors``,
  Hugging Face ``.bin`` (a pickle), and TorchScript zips, whose tensors are read straight
  from the archive without running its code (`read_torchscript_state_dict`).

Loading is strict by default: a mismatch raises a ValueError that lists the missing,
unexpected and wrong-shape keys (the first few of each, with counts). ``strict=False`` loads
what matches and logs the same report as a warning; wrong shapes always raise.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from umt_fast.config import RANDOM_TEACHER, TEACHER_ARCHS, PretrainConfig, TeacherSpec
from umt_fast.models.classifier import (
    PRETRAIN_FRAMES,
    VideoViT,
    VideoViTArch,
    finetune_pos_table,
    pretrain_grid,
    resize_pos_space,
    resize_pos_time,
)
from umt_fast.models.student import SparseVideoStudent, StudentArch
from umt_fast.models.teacher import CLIPVisionTeacher, TeacherArch, resize_clip_pos_embed
from umt_fast.safe_load import KeyReport, compare_keys, load_state_dict_checked, load_torch_file  # noqa: F401

log = logging.getLogger(__name__)

StateDict = Mapping[str, torch.Tensor]
_WRAPPER_KEYS = ("model", "module", "state_dict", "model_state_dict")
REFERENCE_PRETRAIN_FRAMES = 8
"""Frames of the reference's pre-training clips: the temporal size assumed for a file's
``pos_embed`` when its token count alone does not decide it (as the reference assumes)."""


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def read_state_dict(path_or_state_dict: str | os.PathLike | StateDict, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a file or a dict, unwrapping ``model`` / ``module`` /
    ``state_dict`` (nested wrappers too).

    Files: ``.safetensors``; TorchScript archives (tensors read from the zip, no code run);
    anything else through ``torch.load(weights_only=True)`` (`umt_fast.safe_load`), which also
    reads the reference's checkpoints with their ``args`` / ``config`` entries.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} file not found: {path}")
        if path.endswith(".safetensors") or is_torchscript_archive(path):
            try:
                if path.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    obj = load_file(path, device="cpu")
                else:
                    obj = read_torchscript_state_dict(path)
            except Exception as exc:
                raise ValueError(f"cannot read {what} file {path}: {exc}") from exc
        else:
            obj = load_torch_file(path, what)
        source = path
    else:
        obj, source = path_or_state_dict, f"the given {what} dict"
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{source} does not hold a state dict of tensors")
    return dict(obj)


def is_torchscript_archive(path: str) -> bool:
    """True for a zip written by torch.jit.save (it has ``*/code/`` and ``*/constants.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}  # fmt: skip


class _ScriptObject:
    """Stands in for a TorchScript class (``__torch__.*``) while unpickling: keeps its attributes."""


@dataclass
class _StorageType:
    dtype: torch.dtype


def _identity(value):
    return value


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_unused) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset).clone()


class _TorchScriptUnpickler(pickle.Unpickler):
    """Reads a TorchScript archive's ``data.pkl``: module objects become `_ScriptObject`s and
    tensors are rebuilt from the archive's ``data/`` entries. Any other global is refused, so
    nothing in the archive is executed."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(archive.open(f"{prefix}data.pkl"))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return _ScriptObject
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return dict
        if module == "torch.jit._pickle" and name.startswith("build_"):  # typed lists: build_intlist([1, 2])
            return _identity
        if module == "torch.jit._pickle" and name == "restore_type_tag":
            return lambda value, _type_tag: value
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a TorchScript archive")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        flat = torch.frombuffer(raw, dtype=storage_type.dtype) if raw else torch.empty(0, dtype=storage_type.dtype)
        return flat[:numel]


def read_torchscript_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive (e.g. OpenAI CLIP's ``ViT-B-16.pt``),
    named as ``module.state_dict()`` would name them, read from the zip without running its code."""
    with zipfile.ZipFile(path) as archive:
        data_pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not data_pkl:
            raise ValueError(f"{path}: TorchScript archive without a top-level data.pkl")
        root = _TorchScriptUnpickler(archive, data_pkl[0][: -len("data.pkl")]).load()
    out: dict[str, torch.Tensor] = {}

    def walk(obj, prefix: str) -> None:
        for name, value in vars(obj).items():
            if isinstance(value, torch.Tensor):
                out[prefix + name] = value
            elif isinstance(value, _ScriptObject):
                walk(value, f"{prefix}{name}.")

    walk(root, "")
    return out


def strip_prefix(state_dict: StateDict, prefix: str) -> dict[str, torch.Tensor]:
    """Removes ``prefix`` from every key that has it (keys without it are kept as they are)."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def _strip_wrapping_prefixes(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """Removes torch.compile's ``_orig_mod.`` (wherever it sits) and leading DDP ``module.``."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace("_orig_mod.", "")
        while key.startswith("module."):
            key = key[len("module."):]
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# Strict loading with a readable report
# --------------------------------------------------------------------------------------------


def _count_indexed(state_dict: StateDict, pattern: str) -> int:
    regex = re.compile(pattern)
    indices = {int(m.group(1)) for k in state_dict if (m := regex.match(k))}
    if indices and indices != set(range(len(indices))):
        raise ValueError(f"layer indices matching {pattern!r} are not contiguous from 0: {sorted(indices)}")
    return len(indices)


# --------------------------------------------------------------------------------------------
# The student side: reference stage-1 / stage-2 / fine-tuned files
# --------------------------------------------------------------------------------------------


def canonical_video_state_dict(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """Any student-side file's keys in one naming: the backbone as ``patch_embed.*``,
    ``blocks.*``, ``norm.*``, ``pos_embed``, beside ``clip_decoder.*``, ``fc_norm.*``,
    ``head.*`` (and stage 2's ``pool_norm.*``).

    Removes ``module.`` / ``_orig_mod.``, keeps only the ``vision_encoder.`` part of a
    stage-2 file, and strips a leading ``backbone.`` or ``encoder.``.
    """
    sd = _strip_wrapping_prefixes(state_dict)
    if any(k.startswith("vision_encoder.") for k in sd):
        dropped = sorted({k.split(".", 1)[0] for k in sd if not k.startswith("vision_encoder.")})
        log.info("stage-2 file: reading its vision_encoder.* part (ignoring %s)", ", ".join(dropped) or "nothing")
        sd = {k[len("vision_encoder."):]: v for k, v in sd.items() if k.startswith("vision_encoder.")}
    for prefix in ("backbone.", "encoder."):
        sd = strip_prefix(sd, prefix)
    return sd


def resize_video_pos_embed(
    pos_embed: torch.Tensor, num_frames: int, grid: int, file_num_frames: int | None = None
) -> torch.Tensor:
    """Resizes a video ViT's 1-D position table [1, N0, C] to [1, num_frames * grid^2, C].

    As the reference's fine-tuning does with a file's ``pos_embed`` (run_class_finetuning.py):
    the table is viewed as T0 x g0 x g0 (t-major, as tokens are ordered), resized linearly in
    time (align_corners=False) when T0 differs, then bicubically in space (align_corners=False)
    when g0 differs, and flattened back (UMT_SPEC.md section 3). Computes in float32 (float64
    stays float64) and returns the input dtype; a table already of the requested size is
    returned as it is.

    Args:
        file_num_frames: T0; when None it is inferred from N0: ``num_frames`` if N0 is already
            num_frames * grid^2, else the reference's 8 frames if N0 / 8 is a square, else
            ``num_frames`` if N0 / num_frames is, else N0 / grid^2 if that divides evenly, else
            the smallest T0 that leaves a square grid.
    """
    if pos_embed.dim() == 2:
        pos_embed = pos_embed[None]
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be [1, N, C], got {tuple(pos_embed.shape)}")
    n0 = pos_embed.shape[1]
    t0 = file_num_frames or _infer_table_frames(n0, num_frames, grid)
    g0 = int(round((n0 // t0) ** 0.5)) if n0 % t0 == 0 else 0
    if g0 * g0 * t0 != n0:
        raise ValueError(f"pos_embed of {n0} tokens is not {t0} frames of a square grid")
    if (t0, g0) == (num_frames, grid):
        return pos_embed
    dtype = pos_embed.dtype
    table_1NC = pos_embed.to(torch.float64 if dtype == torch.float64 else torch.float32)
    if t0 != num_frames:
        table_1NC = resize_pos_time(table_1NC, t0, num_frames)
    if g0 != grid:
        table_1NC = resize_pos_space(table_1NC, g0, grid)
    return table_1NC.to(dtype)


def _infer_table_frames(num_tokens: int, num_frames: int, grid: int) -> int:
    def square(t: int) -> bool:
        return num_tokens % t == 0 and int(round((num_tokens // t) ** 0.5)) ** 2 == num_tokens // t

    if num_tokens == num_frames * grid * grid:  # already the requested table
        return num_frames
    for t in (REFERENCE_PRETRAIN_FRAMES, num_frames):
        if square(t):
            return t
    if num_tokens % (grid * grid) == 0:
        return num_tokens // (grid * grid)
    for t in range(1, num_tokens + 1):
        if square(t):
            return t
    raise AssertionError("unreachable: t = N always leaves a 1x1 grid")


def _backbone_shape(sd: StateDict, patch_size: int) -> tuple[int, int, float]:
    """(width, depth, mlp_ratio) of a canonical state dict's backbone."""
    key = "patch_embed.proj.weight"
    if key not in sd:
        raise ValueError(f"not a UMT video ViT state dict: no {key!r} under any known prefix (first keys: {list(sd)[:5]})")
    weight = sd[key]
    if weight.dim() != 5 or tuple(weight.shape[2:]) != (1, patch_size, patch_size):
        raise ValueError(
            f"{key} has kernel {tuple(weight.shape[2:])}, expected (1, {patch_size}, {patch_size}) for patch_size={patch_size}"
        )
    width = weight.shape[0]
    depth = _count_indexed(sd, r"blocks\.(\d+)\.")
    if depth == 0:
        raise ValueError("the state dict has no transformer blocks (blocks.{i}.*)")
    return width, depth, sd["blocks.0.mlp.fc1.weight"].shape[0] / width


def student_arch_from_state_dict(
    state_dict: StateDict, num_frames: int, img_size: int, patch_size: int, drop_path: float = 0.0
) -> StudentArch:
    """Infers width, depth, heads (width // 64), aligned layers and teacher dim from the weights
    (stage-1 naming: ``encoder.*``, ``clip_decoder.*``)."""
    if "encoder.patch_embed.proj.weight" not in state_dict:
        raise ValueError(
            "not a UMT stage-1 student state dict: no 'encoder.patch_embed.proj.weight' "
            f"(first keys: {list(state_dict)[:5]})"
        )
    width, depth, mlp_ratio = _backbone_shape(strip_prefix(state_dict, "encoder."), patch_size)
    return_layers = _count_indexed(state_dict, r"clip_decoder\.(\d+)\.")
    if return_layers == 0:
        raise ValueError(
            "not a UMT stage-1 student state dict: no alignment heads (clip_decoder.{k}.*); a fine-tuned or "
            "backbone-only file loads with load_video_vit"
        )
    extra_heads = tuple(
        (_count_indexed(state_dict, rf"extra_decoders\.{j}\.(\d+)\."), state_dict[f"extra_decoders.{j}.0.head.weight"].shape[0])
        for j in range(_count_indexed(state_dict, r"extra_decoders\.(\d+)\."))
    )  # the heads of further teachers (a run with teacher.extra)
    return StudentArch(
        width=width,
        depth=depth,
        heads=width // 64,
        teacher_dim=state_dict["clip_decoder.0.head.weight"].shape[0],
        return_layers=return_layers,
        extra_heads=extra_heads,
        num_frames=num_frames,
        img_size=img_size,
        patch_size=patch_size,
        mlp_ratio=mlp_ratio,
        drop_path=drop_path,
    )


_HEAD_PARTS = ("clip_decoder.", "extra_decoders.", "fc_norm.", "head.")


def student_state_dict(path_or_state_dict, what: str = "student checkpoint") -> dict[str, torch.Tensor]:
    """A stage-1 / stage-2 file in stage-1 naming (``encoder.*``, ``clip_decoder.*``, and
    ``encoder.pos_embed`` when the file has one); stage 2's ``pool_norm`` is left out."""
    sd = canonical_video_state_dict(read_state_dict(path_or_state_dict, what))
    if "pool_norm.weight" in sd:
        log.info("ignoring pool_norm.* (stage 2's vision-text pooling norm; not part of the student)")
    out = {}
    for key, value in sd.items():
        if key.startswith(_HEAD_PARTS):
            out[key] = value
        elif not key.startswith("pool_norm."):
            out["encoder." + key] = value
    return out


def load_student(
    path_or_state_dict,
    num_frames: int = 8,
    img_size: int = 224,
    patch_size: int = 16,
    strict: bool = True,
) -> SparseVideoStudent:
    """Loads a reference stage-1 or stage-2 checkpoint as the sparse student, in eval mode.

    ``student(video_BCTHW, visible_idx_BN)`` then returns [L, B, N_vis, Ct] unit vectors.
    A ``pos_embed`` in the file replaces the fixed sin-cos table (resized to the grid).
    """
    sd = student_state_dict(path_or_state_dict)
    arch = student_arch_from_state_dict(sd, num_frames, img_size, patch_size)
    student = SparseVideoStudent(arch)
    pos_embed = sd.pop("encoder.pos_embed", None)
    load_state_dict_checked(student, sd, "student checkpoint", strict=strict)
    if pos_embed is not None:
        resized = resize_video_pos_embed(pos_embed, num_frames, img_size // patch_size)
        student.encoder.pos_embed.copy_(resized[0])
    return student.eval()


def video_vit_arch_from_state_dict(
    sd: StateDict, num_frames: int, img_size: int, patch_size: int, **overrides
) -> VideoViTArch:
    """The dense ViT a canonical state dict describes: a classifier when it has ``head.*``
    (class count from the head), else an encoder with the final norm when it has ``norm.*``."""
    width, depth, mlp_ratio = _backbone_shape(sd, patch_size)
    fields = dict(
        width=width, depth=depth, heads=width // 64, num_frames=num_frames, img_size=img_size,
        patch_size=patch_size, mlp_ratio=mlp_ratio,
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
        final_norm="norm.weight" in sd and "head.weight" not in sd,
    )  # fmt: skip
    return VideoViTArch(**{**fields, **overrides})


def _video_vit_state_dict(sd: dict[str, torch.Tensor], model: VideoViT) -> dict[str, torch.Tensor]:
    """Fits a canonical state dict to ``model``: supplies ``pos_embed`` (`_video_vit_pos_embed`)
    and drops the parts the dense ViT has no use for (alignment heads, stage 2's pool norm, and
    the encoder's final norm when the model has none)."""
    arch = model.arch
    dropped = [k for k in sd if k.startswith(("clip_decoder.", "extra_decoders.", "pool_norm."))]
    if not arch.final_norm:
        dropped += [k for k in sd if k.startswith("norm.")]
    if dropped:
        log.info("not used by the dense ViT: %s", ", ".join(sorted({k.rsplit(".", 1)[0] for k in dropped})))
    out = {k: v for k, v in sd.items() if k not in dropped}
    out["pos_embed"] = _video_vit_pos_embed(out.get("pos_embed"), arch)
    return out


def _video_vit_pos_embed(file_pos_embed: torch.Tensor | None, arch: VideoViTArch) -> torch.Tensor:
    """The position table [1, N, D] the reference's fine-tuning model ends up with for a file.

    Without a table in the file (stage-1 files; fine-tuned files of the pre-training size):
    its fixed table, `finetune_pos_table` (the 1568-row sin-cos table resized to the clip).
    With one: resized to the clip (`resize_video_pos_embed`), except at the pre-training size
    (8 x 14 x 14 tokens), where the reference's model keeps its fixed table and does not read
    the file's.
    """
    fixed = finetune_pos_table(arch.num_frames, arch.grid, arch.width, arch.patch_size)
    if file_pos_embed is None:
        return fixed
    if (arch.num_frames, arch.grid) == (PRETRAIN_FRAMES, pretrain_grid(arch.patch_size)):
        if file_pos_embed.numel() != fixed.numel() or not torch.allclose(
            file_pos_embed.reshape(fixed.shape).float(), fixed, rtol=0, atol=1e-6
        ):
            log.info(
                "the file's pos_embed (%d rows) is not used: at the pre-training size %d x %d x %d the model keeps "
                "the fixed sin-cos table, as the reference's does", file_pos_embed.shape[-2], arch.num_frames,
                arch.grid, arch.grid,
            )  # fmt: skip
        return fixed
    return resize_video_pos_embed(file_pos_embed, arch.num_frames, arch.grid)


def load_video_vit(
    path_or_state_dict,
    num_frames: int = 8,
    img_size: int = 224,
    patch_size: int = 16,
    strict: bool = True,
) -> VideoViT:
    """Any student-side file as the dense ViT that runs on all tokens, in eval mode.

    A fine-tuned file gives a classifier (fc_norm + head, classes from the file); a stage-1 or
    stage-2 file gives its encoder with the final norm (the alignment heads are not used).
    """
    sd = canonical_video_state_dict(read_state_dict(path_or_state_dict, "video model checkpoint"))
    arch = video_vit_arch_from_state_dict(sd, num_frames, img_size, patch_size)
    model = VideoViT(arch)
    load_state_dict_checked(model, _video_vit_state_dict(sd, model), "video model checkpoint", strict=strict)
    return model.eval()


K710_CLASSES = 710
"""Classes of Kinetics-710 (K400 + K600 + K700 merged), the head of the reference's K710 files;
its first 400 rows are the Kinetics-400 classes in K400's order."""


def read_head_label_map(
    label_map: str | os.PathLike | list[int], num_classes: int | None, num_rows: int = K710_CLASSES,
    name: str = "head_label_map",
) -> list[int]:
    """The row of a file's head for each class of the model, validated.

    ``label_map`` is a list of ints or a JSON file holding one (as the reference's
    ``k710/label_mixto600.json`` / ``label_mixto700.json``): entry k is the file's head row
    that becomes class k. Each must be in [0, ``num_rows``) and there must be ``num_classes``
    of them (None: any number). Raises a one-line ValueError naming ``name`` (FileNotFoundError
    for a missing file).
    """
    if isinstance(label_map, (str, os.PathLike)):
        path = os.fspath(label_map)
        shown = repr(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name}={shown}: no such file")
        try:
            with open(path) as f:
                label_map = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{name}={shown} is not allowed: not a JSON file ({exc})") from exc
    else:
        shown = repr(label_map) if not isinstance(label_map, (list, tuple)) or len(label_map) <= 6 else (
            f"[{', '.join(map(repr, label_map[:4]))}, ...] ({len(label_map)} entries)"
        )
    if not isinstance(label_map, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in label_map
    ):
        raise ValueError(f"{name}={shown} is not allowed: must be a JSON list of ints (head rows), one per class")
    bad = next((i for i in label_map if not 0 <= i < num_rows), None)
    if bad is not None:
        raise ValueError(f"{name}={shown} is not allowed: row {bad} is outside [0, {num_rows}) (the head's classes)")
    if num_classes is not None and len(label_map) != num_classes:
        raise ValueError(
            f"{name}={shown} is not allowed: holds {len(label_map)} rows, but the model has {num_classes} classes"
        )
    return list(label_map)


def _fit_head(sd: dict[str, torch.Tensor], model: VideoViT, head_label_map) -> dict[str, torch.Tensor]:
    """The file's ``head.*`` for the model's classes, as the reference's fine-tuning picks them.

    With ``head_label_map``: rows by the map. A K710 head (710 rows) into 400 classes: its
    first 400 rows. Rows for the model's class count: as they are. Any other head is left out
    (the model's fresh head stays); ``fc_norm`` is kept from the file in every case.
    """
    num_classes = model.arch.num_classes
    rows = sd["head.weight"].shape[0] if "head.weight" in sd else None
    if head_label_map is not None:
        if rows is None:
            raise ValueError("head_label_map is given, but the init checkpoint has no head (head.weight) to map")
        index = read_head_label_map(head_label_map, num_classes, rows)
        where = f" {os.fspath(head_label_map)}" if isinstance(head_label_map, (str, os.PathLike)) else ""
        log.info("head: %d classes from the init checkpoint's %d-class head, rows by the label map%s",
                 num_classes, rows, where)  # fmt: skip
        return {**sd, "head.weight": sd["head.weight"][index], "head.bias": sd["head.bias"][index]}
    if rows is None or num_classes == 0:
        return sd
    if rows == K710_CLASSES and num_classes == 400:
        log.info("head: the first 400 rows of the init checkpoint's K710 head (the Kinetics-400 classes)")
        return {**sd, "head.weight": sd["head.weight"][:400], "head.bias": sd["head.bias"][:400]}
    if rows == num_classes:
        log.info("head: the init checkpoint's %d-class head", rows)
        return sd
    hint = " (a K710 head maps onto Kinetics-600/700 with a head label map)" if (
        rows == K710_CLASSES and num_classes in (600, 700)
    ) else ""
    log.warning("init checkpoint's head has %d classes, the model %d: the head starts fresh, fc_norm is kept%s",
                rows, num_classes, hint)  # fmt: skip
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


def init_video_vit(model: VideoViT, path_or_state_dict, strict: bool = True, head_label_map=None) -> KeyReport:
    """Initialises ``model`` (e.g. a fresh classifier) from any student-side file.

    The backbone must match (strictly, unless ``strict=False``). As in the reference's
    fine-tuning, the file's ``fc_norm`` is used whenever it has one, and its ``head`` when it
    fits: the same class count; a K710 head (710 classes) for 400 classes gives its first 400
    rows; ``head_label_map`` (a list of head rows, one per class, or a JSON file of one, e.g.
    the reference's ``label_mixto600.json``) picks the rows by the map. A head for another
    number of classes, or none, leaves the model's fresh head in place (logged).
    """
    sd = canonical_video_state_dict(read_state_dict(path_or_state_dict, "init checkpoint"))
    arch = model.arch
    width, depth, _ = _backbone_shape(sd, arch.patch_size)
    if (width, depth) != (arch.width, arch.depth):
        raise ValueError(
            f"init checkpoint holds a ViT of width {width} and depth {depth}, the model has width {arch.width} "
            f"and depth {arch.depth}; pick the matching model size"
        )
    sd = _fit_head(_video_vit_state_dict(sd, model), model, head_label_map)
    own = model.state_dict()
    fresh = [k for k in own if k.startswith(("fc_norm.", "head.")) and k not in sd]
    if fresh:
        log.info("fresh (not in the init checkpoint): %s", ", ".join(fresh))
        sd.update({k: own[k] for k in fresh})
    return load_state_dict_checked(model, sd, "init checkpoint", strict=strict)


# --------------------------------------------------------------------------------------------
# The teacher side: CLIP visual towers in several namings
# --------------------------------------------------------------------------------------------


def _hf_to_openai(sd: StateDict) -> dict[str, torch.Tensor]:
    """Hugging Face CLIPVisionModel(WithProjection) / CLIPModel names -> OpenAI visual names."""
    sd = {k[len("vision_model."):] if k.startswith("vision_model.") else k: v for k, v in sd.items()}
    if "visual_projection.weight" not in sd:
        raise ValueError(
            "Hugging Face CLIP weights without 'visual_projection.weight': a CLIPVisionModel has no output "
            "projection; use the CLIPVisionModelWithProjection or CLIPModel weights"
        )
    out = {
        "conv1.weight": sd.pop("embeddings.patch_embedding.weight"),
        "class_embedding": sd.pop("embeddings.class_embedding"),
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "proj": sd.pop("visual_projection.weight").t().contiguous(),
    }
    renames = {"pre_layrnorm.": "ln_pre.", "post_layernorm.": "ln_post."}
    layer_parts = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.",
                   "mlp.fc2.": "mlp.c_proj.", "self_attn.out_proj.": "attn.out_proj."}  # fmt: skip
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.startswith(("text_model.", "text_projection.", "logit_scale", "embeddings.position_ids")):
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.(.*)$", key)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            proj = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest)
            if proj:
                qkv.setdefault(i, {})[f"{proj.group(1)}.{proj.group(2)}"] = value
                continue
            for old, new in layer_parts.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            out[f"transformer.resblocks.{i}.{rest}"] = value
            continue
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    for i, parts in qkv.items():
        p = f"transformer.resblocks.{i}.attn."
        out[p + "in_proj_weight"] = torch.cat([parts["q.weight"], parts["k.weight"], parts["v.weight"]])
        out[p + "in_proj_bias"] = torch.cat([parts["q.bias"], parts["k.bias"], parts["v.bias"]])
    return out


def _timm_to_openai(sd: StateDict) -> dict[str, torch.Tensor]:
    """timm ``vision_transformer`` CLIP names -> OpenAI visual names."""
    sd = dict(sd)
    if "head.weight" not in sd:
        raise ValueError("timm CLIP weights without 'head.weight' (the output projection); use a model with its head")
    head_bias = sd.pop("head.bias", None)
    if head_bias is not None and head_bias.abs().max() > 0:
        raise ValueError("timm CLIP weights with a non-zero 'head.bias': CLIP's projection has no bias")
    out = {
        "conv1.weight": sd.pop("patch_embed.proj.weight"),
        "class_embedding": sd.pop("cls_token").reshape(-1),
        "positional_embedding": sd.pop("pos_embed").reshape(-1, sd["norm_pre.weight"].shape[0]),
        "proj": sd.pop("head.weight").t().contiguous(),
    }
    block_parts = {"norm1.": "ln_1.", "norm2.": "ln_2.", "attn.qkv.weight": "attn.in_proj_weight",
                   "attn.qkv.bias": "attn.in_proj_bias", "attn.proj.": "attn.out_proj.",
                   "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}  # fmt: skip
    for key, value in sd.items():
        m = re.match(r"blocks\.(\d+)\.(.*)$", key)
        if m:
            rest = m.group(2)
            for old, new in block_parts.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            out[f"transformer.resblocks.{m.group(1)}.{rest}"] = value
        elif key.startswith("norm_pre."):
            out["ln_pre." + key[len("norm_pre."):]] = value
        elif key.startswith("norm."):
            out["ln_post." + key[len("norm."):]] = value
        else:
            out[key] = value
    return out


def clip_visual_state_dict(path_or_state_dict) -> dict[str, torch.Tensor]:
    """A CLIP visual tower in OpenAI's names, from any supported format.

    OpenAI state dicts (``visual.`` removed; text-tower keys dropped), OpenAI TorchScript
    archives, open_clip checkpoints (``state_dict`` / ``module.``), timm CLIP ViTs and
    Hugging Face CLIP weights (``.safetensors`` or ``.bin``) are recognised by their keys.
    """
    sd = _strip_wrapping_prefixes(read_state_dict(path_or_state_dict, "CLIP teacher weights"))
    if any(k.startswith("vision_model.embeddings.") or k.startswith("embeddings.patch_embedding") for k in sd):
        return _hf_to_openai(sd)
    if any(k.startswith("visual.") for k in sd):
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    if "conv1.weight" not in sd and {"patch_embed.proj.weight", "cls_token", "norm_pre.weight"} <= set(sd):
        return _timm_to_openai(sd)
    if "conv1.weight" not in sd:
        raise ValueError(
            "not an OpenAI CLIP visual state dict, nor a timm or Hugging Face CLIP ViT (no OpenAI 'conv1.weight', "
            "timm 'patch_embed.proj.weight' + 'cls_token' or Hugging Face 'vision_model.embeddings.*'"
            f"); first keys: {list(sd)[:5]}"
        )
    return sd


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


def load_timm_teacher(path_or_state_dict, arch: str, input_resolution: int = 224, return_layers: int = 6,
                      strict: bool = True, **timm_kwargs):  # fmt: skip
    """A timm ViT (``arch`` = ``timm:MODEL_NAME``) as a frozen teacher, from weights in timm's naming
    (.pth, .bin, .safetensors) or an original release that the model's own timm
    ``checkpoint_filter_fn`` converts (OpenCLIP, DINOv2; big_vision ``.npz`` through timm's
    loader); ``path_or_state_dict=None`` keeps the random init (tests). The position embedding is
    resized to the grid of ``input_resolution``; ``timm_kwargs`` go to timm.create_model."""
    import importlib

    from umt_fast.models.timm_teacher import TIMM_PREFIX, TimmVisionTeacher, create_timm_vit

    model = create_timm_vit(arch, input_resolution, **timm_kwargs)
    if isinstance(path_or_state_dict, (str, os.PathLike)) and os.fspath(path_or_state_dict).endswith(".npz"):
        model.load_pretrained(os.fspath(path_or_state_dict))
    elif path_or_state_dict is not None:
        sd = _strip_wrapping_prefixes(read_state_dict(path_or_state_dict, f"{arch} teacher weights"))
        module = importlib.import_module(type(model).__module__)
        if hasattr(module, "checkpoint_filter_fn"):
            sd = module.checkpoint_filter_fn(sd, model)
        load_state_dict_checked(model, sd, f"{arch} teacher weights", strict=strict)
    return TimmVisionTeacher(model, arch[len(TIMM_PREFIX):], input_resolution, return_layers)


def load_teacher(
    path_or_state_dict,
    input_resolution: int = 224,
    return_layers: int = 6,
    strict: bool = True,
    arch: str | None = None,
    **timm_kwargs,
):
    """Loads CLIP visual weights (any format `clip_visual_state_dict` reads) as a frozen teacher;
    with ``arch="timm:MODEL_NAME"``, any supported timm ViT (`load_timm_teacher`; ``timm_kwargs``
    go to timm.create_model).

    The position embedding is resized bicubically when the file's grid differs from
    ``input_resolution / patch`` (e.g. ViT-L/14 trained at 224 px, used at 196 px).
    """
    if arch is not None and arch.startswith("timm:"):
        return load_timm_teacher(path_or_state_dict, arch, input_resolution, return_layers, strict, **timm_kwargs)
    if timm_kwargs:
        raise TypeError(f"load_teacher got {sorted(timm_kwargs)}: timm options need arch='timm:MODEL_NAME'")
    state_dict = clip_visual_state_dict(path_or_state_dict)
    arch = teacher_arch_from_state_dict(state_dict, input_resolution, return_layers)
    state_dict["positional_embedding"] = resize_clip_pos_embed(state_dict["positional_embedding"], arch.grid)
    teacher = CLIPVisionTeacher(arch)
    load_state_dict_checked(teacher, state_dict, "CLIP teacher weights", strict=strict)
    return teacher.eval()


def build_teacher(cfg: PretrainConfig) -> CLIPVisionTeacher:
    """The frozen teacher of the teacher section: from ``teacher.weights``, or random for ``none``
    (with a warning)."""
    return build_teachers(cfg)[0]


def build_teachers(cfg: PretrainConfig) -> list:
    """Every frozen teacher of the run (`umt_fast.config.teacher_specs`: the teacher section's,
    then teacher.extra's), each with its own K; FP8 block linears for ``teacher.precision=fp8``."""
    specs = cfg.teacher.specs(return_layers=cfg.student.return_layers)
    teachers = [_build_one_teacher(spec, cfg) for spec in specs]
    m = getattr(cfg.mask, "teacher", 0)  # stage 2's mask section has no mask.teacher: its one teacher
    if cfg.mask.policy == "attention" and not getattr(teachers[m], "has_cls_attn", True):
        spec = specs[m]
        raise ValueError(f"mask.policy='attention' needs the teacher's CLS or attention-pool attention, and "
                         f"{spec.name}.arch={spec.arch!r} has neither; use --mask.policy tube or random")  # fmt: skip
    return teachers


def _build_one_teacher(spec: TeacherSpec, cfg: PretrainConfig):
    if spec.weights == RANDOM_TEACHER:
        log.warning(
            "THE TEACHER IS RANDOM (%s.weights none): its attention and targets carry no semantic information. "
            "Fine for a demo or a smoke test, useless for real pre-training.", spec.name,
        )  # fmt: skip
    if spec.is_timm:
        return _build_timm_teacher(spec, cfg)
    arch = TEACHER_ARCHS[spec.arch]
    if spec.weights == RANDOM_TEACHER:
        return CLIPVisionTeacher(TeacherArch(**arch, input_resolution=spec.input_resolution, return_layers=spec.return_layers))
    teacher = load_teacher(spec.weights, input_resolution=spec.input_resolution, return_layers=spec.return_layers)
    found = (teacher.arch.width, teacher.arch.layers, teacher.arch.patch_size, teacher.arch.output_dim)
    wanted = (arch["width"], arch["layers"], arch["patch_size"], arch["output_dim"])
    if found != wanted:
        raise ValueError(
            f"--{spec.name}.weights {spec.weights} holds a CLIP ViT with (width, layers, patch, output) = "
            f"{found}, but {spec.name}.arch={spec.arch!r} is {wanted}; pick the matching --{spec.name}.arch"
        )
    return teacher


def _build_timm_teacher(spec: TeacherSpec, cfg: PretrainConfig):
    """A ``timm:NAME`` teacher, its grid checked against the student's."""
    weights = None if spec.weights == RANDOM_TEACHER else spec.weights
    try:
        teacher = load_timm_teacher(weights, spec.arch, spec.input_resolution, spec.return_layers)
    except AssertionError as exc:  # timm's own shape checks (e.g. a resolution that is not a multiple of the patch)
        raise ValueError(f"{spec.name}.arch={spec.arch!r} at {spec.name}.input_resolution="
                         f"{spec.input_resolution}: {exc}") from exc  # fmt: skip
    s_grid, patch = cfg.data.img_size // cfg.student.patch_size, teacher.arch.patch_size
    if spec.input_resolution % patch or teacher.arch.grid != s_grid:
        raise ValueError(
            f"{spec.name}.input_resolution={spec.input_resolution}: the grid of {spec.name}.arch={spec.arch!r} "
            f"(patch {patch}) must equal the student grid (data.img_size / student.patch_size = {cfg.data.img_size} / "
            f"{cfg.student.patch_size} = {s_grid}); use {spec.name}.input_resolution={s_grid * patch}"
        )
    return teacher
