"""Reading ``torch.save`` files without running their code.

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
import os
import pickle
import re
from typing import Any

import numpy as np
import torch

EASYDICT_NAMES = ("utils.easydict.EasyDict", "multi_modality.utils.easydict.EasyDict", "easydict.EasyDict")


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
