"""The code examples of the README and of docs/python_api.md run as written."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PYTHON_API = os.path.join(ROOT, "docs", "python_api.md")


def _python_block(path: str, section: str) -> str:
    text = open(path, encoding="utf-8").read()
    assert section in text, f"{section!r} not found in {path}"
    return text.split(section, 1)[1].split("```python", 1)[1].split("```", 1)[0]


def test_umt_kernels_example_runs():
    namespace: dict = {}
    exec(_python_block(PYTHON_API, "## Using umt_kernels in your own model"), namespace)
    assert namespace["tokens"].shape == (2, 8 * 196 - int(8 * 196 * 0.9), 768)
    assert namespace["idx_frame"].shape == (16, 40) and namespace["targets"].shape == (16, 40, 512)
    assert namespace["loss"].dim() == 0


def test_readme_quickstart_commands():
    """The Quickstart's two commands are in the README as `.ci/run` runs the second."""
    text = open(README, encoding="utf-8").read()
    setup = ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.14.1 '
             'torchvision==0.29.1 && pip install -e ".[dev]" && ')
    assert setup + "python -m umt_fast.pretrain\n" in text
    assert setup + "python -m pytest tests -q\n" in text
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert setup + "python -m pytest tests -q" in ci
