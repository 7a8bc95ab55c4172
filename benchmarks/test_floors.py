"""Throughput regression guard: the stage-1 step must stay within 10% of its card's committed
floor (benchmarks/floors.json). Skips, with the reason, where there is no GPU or no floor."""
from __future__ import annotations

import json
import os

import pytest
import torch

FLOORS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floors.json")


def _card_floors() -> dict[str, float] | None:
    name = torch.cuda.get_device_name()
    floors = json.load(open(FLOORS))["floors"]
    return next((per_preset for card, per_preset in floors.items() if card in name), None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the step floors are for GPUs")
def test_step_throughput_is_not_below_the_floor():
    floors = _card_floors()
    if not floors:
        pytest.skip(f"no floor recorded for {torch.cuda.get_device_name()} in benchmarks/floors.json")
    from benchmarks.gpu_suite import measured_matmul_tflops, step_rows

    device = torch.device("cuda")
    rows = step_rows(device, tiny=False, matmul_tflops=measured_matmul_tflops(device, torch.bfloat16))
    measured = {r["preset"]: r["clips/s"] for r in rows if r.get("path") == "umt_fast" and "clips/s" in r}
    for preset, floor in floors.items():
        assert measured.get(preset, 0.0) >= 0.9 * floor, f"{preset}: {measured.get(preset)} clips/s < 90% of {floor}"
