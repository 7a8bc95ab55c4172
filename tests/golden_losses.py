"""Golden losses: the per-step losses of the three demos' first steps, committed as assets.

Refactors of the engine must not change a number: `tests/test_golden_losses.py` reruns each
demo (its built-in preset, shortened with ``--train.max_steps``; the schedule is unchanged) on
the CPU and compares every logged term with ``tests/assets/losses/<name>.json`` within 1e-5.

An intended change of the numbers rewrites the assets, in the same commit that explains why:

    python -m tests.golden_losses --write
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ASSETS = os.path.join(os.path.dirname(__file__), "assets", "losses")

DEMOS: dict[str, tuple[str, list[str], tuple[str, ...]]] = {
    # name: (module, options after the demo preset, the metrics compared)
    "pretrain": ("umt_fast.pretrain", ["--train.max_steps", "8", "--log.every_steps", "1"], ("loss",)),
    "finetune": ("umt_fast.finetune", ["--train.max_steps", "6", "--log.every_steps", "1", "--eval.every_steps", "100"],
                 ("loss",)),
    "pretrain_vl": ("umt_fast.pretrain_vl", ["--train.max_steps", "4", "--log.every_steps", "1"],
                    ("loss", "uta", "vtc", "vtm", "mlm")),
}  # fmt: skip


def run_demo(name: str, run_dir: str) -> dict[str, list[float]]:
    """Runs demo ``name`` into ``run_dir``: {metric: [value at step 1, 2, ...]}."""
    import importlib

    from umt_fast.engine.metrics import read_metrics

    module, options, metrics = DEMOS[name]
    code = importlib.import_module(module).main(["--run-dir", run_dir, *options])
    if code != 0:
        raise RuntimeError(f"{module} {' '.join(options)} exited with {code}")
    records = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r]
    return {"step": [r["step"] for r in records], **{m: [r[m] for r in records] for m in metrics}}


def asset_path(name: str) -> str:
    return os.path.join(ASSETS, f"{name}.json")


def read_asset(name: str) -> dict:
    with open(asset_path(name)) as f:
        return json.load(f)


def write_assets() -> None:
    os.makedirs(ASSETS, exist_ok=True)
    for name, (module, options, _) in DEMOS.items():
        with tempfile.TemporaryDirectory() as tmp:
            values = run_demo(name, os.path.join(tmp, "run"))
        with open(asset_path(name), "w") as f:
            json.dump({"command": f"python -m {module} {' '.join(options)}", **values}, f, indent=1)
            f.write("\n")
        print(f"wrote {asset_path(name)}: loss {values['loss']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rerun the demos and rewrite the assets")
    if not parser.parse_args().write:
        parser.print_help()
        sys.exit(2)
    write_assets()
