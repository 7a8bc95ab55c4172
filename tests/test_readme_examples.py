"""The README's code examples run as written."""
import os

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_block(section: str) -> str:
    text = open(README, encoding="utf-8").read()
    return text.split(section, 1)[1].split("```python", 1)[1].split("```", 1)[0]


def test_umt_kernels_example_runs():
    namespace: dict = {}
    exec(_python_block("## Using umt_kernels in your own model"), namespace)
    assert namespace["tokens"].shape == (2, 8 * 196 - int(8 * 196 * 0.9), 768)
    assert namespace["idx_frame"].shape == (16, 40) and namespace["targets"].shape == (16, 40, 512)
    assert namespace["loss"].dim() == 0
