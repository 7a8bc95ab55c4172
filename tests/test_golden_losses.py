"""The three demos reproduce their committed per-step losses (tests/golden_losses.py)."""
import pytest

from tests import golden_losses

TOLERANCE = 1e-5


@pytest.mark.parametrize("name", sorted(golden_losses.DEMOS))
def test_demo_reproduces_its_golden_losses(name, tmp_path):
    expected = golden_losses.read_asset(name)
    got = golden_losses.run_demo(name, str(tmp_path / "run"))
    assert got["step"] == expected["step"]
    for metric in golden_losses.DEMOS[name][2]:
        worst = max(abs(a - b) for a, b in zip(got[metric], expected[metric]))
        assert worst <= TOLERANCE, (
            f"{name} {metric} moved by {worst:.2e} (> {TOLERANCE}): {got[metric]} vs the golden {expected[metric]}; "
            "if the change is intended, rewrite the assets with `python -m tests.golden_losses --write`"
        )
