"""The import contract (.importlinter): umt_kernels stands alone, the data, masking and loss
layers sit below the engine, and nothing imports the command modules."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_contracts_are_kept():
    pytest.importorskip("importlinter", reason="import-linter is not installed (pip install -e '.[dev]')")
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    result = subprocess.run([sys.executable, "-c", code, "--config", os.path.join(ROOT, ".importlinter")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_each_package_directory_is_named_as_it_imports():
    """A top-level directory imports under its own name from the repository root (tests and
    commands run there). One named otherwise would shadow a third-party module of that name: a
    ``kernels/`` directory once made transformers take it for the Hugging Face ``kernels`` package."""
    import importlib.util

    packages = sorted(name for name in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, name, "__init__.py")))
    assert {"umt_fast", "umt_kernels"} <= set(packages)
    assert set(packages) <= {"umt_fast", "umt_kernels", "tests", "benchmarks"}, packages
    for name in ("umt_fast", "umt_kernels"):
        origin = importlib.util.find_spec(name).origin
        assert os.path.samefile(origin, os.path.join(ROOT, name, "__init__.py")), (name, origin)
