"""umt_fast: Unmasked-Teacher video pre-training, fast.

Layers, each importing only the ones below it (checked by import-linter, `.importlinter`):

    commands   pretrain, pretrain_vl, finetune, probe, evaluate, extract, export, visualize, prepare
    recipes    the three training recipes, multi-view evaluation, retrieval
    viz        figures
    engine     the trainer, distributed wrapping, checkpoints, metrics, optimizer, stops
    interop    checkpoint files <-> models (the reference's, OpenAI CLIP's, timm's)
    models | data | masking | losses
    config | safe_load
    umt_kernels (a package of its own: torch and triton only)
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

# Module paths from before the engine/recipes layout, still importable under their old names.
MOVED_MODULES = {
    "umt_fast.config_vl": "umt_fast.config.vl",
    "umt_fast.finetune_config": "umt_fast.config.finetune",
    "umt_fast.config_cli": "umt_fast.config.cli",
    "umt_fast.distributed": "umt_fast.engine.distributed",
    "umt_fast.checkpoint": "umt_fast.engine.checkpoint",
    "umt_fast.launch": "umt_fast.engine.launch",
    "umt_fast.train": "umt_fast.engine",
    "umt_fast.train.optim": "umt_fast.engine.optim",
    "umt_fast.train.logging": "umt_fast.engine.metrics",
    "umt_fast.train.stopping": "umt_fast.engine.stopping",
    "umt_fast.train.cuda_graph": "umt_fast.engine.cuda_graph",
    "umt_fast.train.loop": "umt_fast.recipes.pretrain",
    "umt_fast.train.step": "umt_fast.recipes.pretrain",
    "umt_fast.vl": "umt_fast.recipes",
    "umt_fast.vl.train": "umt_fast.recipes.pretrain_vl",
    "umt_fast.vl.retrieval": "umt_fast.recipes.retrieval",
    "umt_fast.vl.model": "umt_fast.models.vl",
    "umt_fast.vl.text": "umt_fast.models.text",
    "umt_fast.vl.losses": "umt_fast.losses.vl",
    "umt_fast.vl.data": "umt_fast.data.captions",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module at its new path (the same module object).

    An old package whose children moved elsewhere (`umt_fast.train`, `umt_fast.vl`) becomes a
    small stand-in package: `from umt_fast.train import loop` finds the moved child, and any
    other name is read from the package it moved to.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=_is_old_package(fullname))

    def create_module(self, spec):
        if _is_old_package(spec.name):
            return _OldPackage(spec.name)
        module = importlib.import_module(MOVED_MODULES[spec.name])
        self.own_spec = module.__spec__  # the import system overwrites it with the alias's spec
        return module

    def exec_module(self, module):
        if not isinstance(module, _OldPackage):
            module.__spec__ = self.own_spec


def _is_old_package(name: str) -> bool:
    return any(old.startswith(name + ".") for old in MOVED_MODULES)


class _OldPackage(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        child = f"{self.__name__}.{attr}"
        if child in MOVED_MODULES:
            return importlib.import_module(child)
        return getattr(importlib.import_module(MOVED_MODULES[self.__name__]), attr)


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())
