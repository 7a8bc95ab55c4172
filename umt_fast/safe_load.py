"""Reading ``torch.save`` files without running their code, and loading state dicts into modules
with one readable report of missing, unexpected and wrong-shape keys (`load_state_dict_checked`).

Every pickle is read with ``torch.load(weights_only=True)``. Besides tensors and plain
containers, exactly the non-tensor objects that the reference's training scripts (and our own
run metadata) put into their files are allowed:

* ``argparse.Namespace``: the ``args`` of the reference's stage-1 and fine-tuning checkpoints
  (``single_modality/utils.py``, ``save_model``: ``{model, optimizer, epoch, scaler, args}``);
* the reference's ``EasyDict`` (``multi_modality/utils/easydict.py``): the ``config`` of its
  stage-2 checkpoints. It is read as a ``collections.OrderedDict`` of the same entries (whose
  attributes are the entries too, as an EasyDict's are), so the reference's code is never needed;
* numpy scalars, dtypes and arrays of plain dtypes (numbers in ``args``, a numpy RNG state).

Any other class is refused with one line naming the file and the class. A file that is not a
``torch.save`` pickle at all is refused with one line saying so.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

EASYDICT_NAMES = ("utils.easydict.EasyDict", "multi_modality.utils.easydict.EasyDict", "easydict.EasyDict")

log = logging.getLogger(__name__)


def _numpy_globals() -> list:
    try:
        core = np._core  # numpy >= 2
        core_names = ("numpy._core", "numpy.core")
    except AttributeError:
        core = np.core
        core_names = ("numpy.core",)
    dtype_classes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType") and n != "ObjectDType"]
    out: list = [np.dtype, np.ndarray, *dtype_classes]
    for name in core_names:  # files written under numpy 1 name numpy.core, under numpy 2 numpy._core
        out.append((core.multiarray.scalar, f"{name}.multiarray.scalar"))
        out.append((core.multiarray._reconstruct, f"{name}.multiarray._reconstruct"))
    return out


def _allowed_globals() -> list:
    # torch's restricted unpickler fills only exact dicts and OrderedDicts, so an EasyDict (a dict
    # subclass) is rebuilt as an OrderedDict.
    return [argparse.Namespace, *[(collections.OrderedDict, name) for name in EASYDICT_NAMES], *_numpy_globals()]


_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with the reference's own
    non-tensor objects allowed (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the file: it is not a ``torch.save`` file, or it holds an
            object of a class no checkpoint of ours or of the reference holds (named).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = _unsupported_globals(path, str(exc))
        if unsafe:
            raise ValueError(
                f"{what} file {path} holds a pickled {', '.join(unsafe)}, which no checkpoint of umt_fast or of the "
                "reference holds; refusing to load it (that would run code from the file)"
            ) from None
        raise ValueError(f"{what} file {path} is not a torch.save checkpoint, or it is truncated ({_detail(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError):
        raise ValueError(f"{what} file {path} is not a torch.save checkpoint, or it is truncated") from None


def _unsupported_globals(path: str, message: str) -> list[str]:
    """The classes and functions in the file that the allow-list lacks."""
    allowed = {entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"
               for entry in _allowed_globals()}  # fmt: skip
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip file: fall back to what torch's message names
        found = _UNSUPPORTED.findall(message)
    return sorted(set(found) - allowed)


def _detail(exc: BaseException) -> str:
    """The informative line of a torch.load error (the restricted unpickler's own complaint,
    not torch's paragraphs of advice around it)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines[:-1]):
        if line.endswith("WeightsUnpickler error:"):
            return lines[i + 1]
    return lines[0] if lines else type(exc).__name__


# Loading a state dict into a module, with one readable report of what does not fit.

_SHOWN_KEYS = 5
StateDict = Mapping[str, torch.Tensor]


@dataclass
class KeyReport:
    """How a state dict's keys compare with a module's."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape)

    def describe(self) -> str:
        problems = []
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("wrong-shape", self.wrong_shape)):
            if keys:
                shown = ", ".join(keys[:_SHOWN_KEYS]) + (", ..." if len(keys) > _SHOWN_KEYS else "")
                problems.append(f"{len(keys)} {name} key(s): {shown}")
        return "; ".join(problems)


def compare_keys(module: nn.Module, state_dict: StateDict) -> KeyReport:
    expected = module.state_dict()
    return KeyReport(
        missing=sorted(set(expected) - set(state_dict)),
        unexpected=sorted(set(state_dict) - set(expected)),
        wrong_shape=sorted(
            f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in set(expected) & set(state_dict)
            if state_dict[k].shape != expected[k].shape
        ),
    )


def load_state_dict_checked(module: nn.Module, state_dict: StateDict, source: str, strict: bool = True) -> KeyReport:
    """load_state_dict with a readable report of missing, unexpected and wrong-shape keys.

    Strict (the default): any mismatch raises ValueError with the report. ``strict=False``:
    the matching keys are loaded and the report is logged as a warning; wrong shapes still
    raise (such a tensor cannot be loaded).
    """
    report = compare_keys(module, state_dict)
    if report and (strict or report.wrong_shape):
        raise ValueError(f"{source} does not match {type(module).__name__}: {report.describe()}")
    if report:
        log.warning("loading %s into %s with strict=False: %s", source, type(module).__name__, report.describe())
    module.load_state_dict({k: v for k, v in state_dict.items() if k not in report.unexpected}, strict=False)
    return report
