"""Frozen-feature probes of a UMT video encoder: a linear or attentive head on frozen features.

The fine-tuning command (`umt_fast.finetune`) with ``--model.probe attentive`` as the default:
the same options, presets, data, augmentation, multi-view evaluation, run directory, resume and
torchrun / DDP / FSDP2. The backbone from ``--init`` (a stage-1 or stage-2 file, an export, or a
run) is frozen and left out of the optimizer; only the probe head trains.

The built-in demo (a frozen tiny random model on the bundled sample clips, label = which clip):

    python -m umt_fast.probe

An attentive probe of a stage-1 UMT-B/16 on Kinetics-400 (V-JEPA's frozen-evaluation recipe), or
a linear probe of the same:

    python -m umt_fast.probe --preset probe_b16_k400 --init b16_ptk710_f8_res224.pth \\
        --data.train_list k400_train.csv --data.val_list k400_val.csv --data.root /data/k400 \\
        --run-dir runs/probe_b16_k400
    python -m umt_fast.probe --preset probe_b16_k400 --model.probe linear --init ... --run-dir runs/linear_b16_k400

The run is evaluated by ``python -m umt_fast.evaluate --checkpoint RUN_DIR`` like a fine-tuned one.
"""
from __future__ import annotations

import sys

from umt_fast.config.finetune import build_probe_config
from umt_fast.engine.launch import run_training_command
from umt_fast.finetune import FIXED_ON_RESUME, _load_train, _summary, check_config


def main(argv: list[str] | None = None) -> int:
    return run_training_command(argv, build_probe_config, check_config, _load_train, _summary, FIXED_ON_RESUME)


if __name__ == "__main__":
    sys.exit(main())
