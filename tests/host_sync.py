"""A host-sync detector for CPU tests: fails on any op that would make the host wait for a GPU.

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` catches syncs directly. On a CPU there is
nothing to wait for, so `forbid_host_syncs` recognises them by what they are:

* a `TorchDispatchMode` sees every ATen op the code dispatches, including those hidden inside
  other ops: reading a value (``item``, ``bool(t)``, ``int(t)``: ``_local_scalar_dense``),
  output shapes that depend on values (boolean indexing and boolean ``index_put_``, ``nonzero``,
  ``masked_select``, ``unique``, ``repeat_interleave`` with tensor repeats, ``bincount``), whole-
  tensor comparisons returning a Python bool (``equal``), and ``multinomial``, whose argument
  checks read the device back;
* ``Tensor.cpu`` / ``numpy`` / ``tolist``, which on a CPU tensor dispatch nothing.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNCING_OPS = {
    "_local_scalar_dense": "reads a value back (item / bool / int / float)",
    "nonzero": "output shape depends on values",
    "masked_select": "output shape depends on values",
    "unique": "output shape depends on values",
    "_unique": "output shape depends on values",
    "_unique2": "output shape depends on values",
    "unique_dim": "output shape depends on values",
    "unique_consecutive": "output shape depends on values",
    "bincount": "output shape depends on values",
    "equal": "returns a Python bool",
    "multinomial": "checks its input on the host",
    "argwhere": "output shape depends on values",
}
_HOST_METHODS = ("cpu", "numpy", "tolist")


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()))


class HostSyncError(AssertionError):
    pass


class _ForbidSyncingOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        why = _SYNCING_OPS.get(name)
        if func.__name__ in ("repeat_interleave.Tensor", "repeat_interleave.self_Tensor") and \
                (kwargs or {}).get("output_size") is None:
            why = "output shape depends on the repeats tensor"
        if name in ("index", "index_put", "index_put_", "_index_put_impl_") and _bool_index(args):
            why = "boolean indexing: output shape depends on values"
        if why:
            raise HostSyncError(f"host sync: aten.{name} ({why})")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def forbid_host_syncs():
    """Raises `HostSyncError` naming the first op inside the block that would sync with a GPU."""
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_METHODS}

    def refuse(name):
        def method(self, *args, **kwargs):
            raise HostSyncError(f"host sync: Tensor.{name}()")
        return method

    for name in _HOST_METHODS:
        setattr(torch.Tensor, name, refuse(name))
    try:
        with _ForbidSyncingOps():
            yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
