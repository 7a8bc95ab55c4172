"""Stage-1 UMT pre-training.

Run the built-in demo (tiny models on the sample clips, a few minutes on a laptop CPU):

    python -m umt_fast.pretrain

The published recipes (one node, 8 GPUs; add --dist.strategy fsdp to shard the student):

    torchrun --nproc_per_node 8 -m umt_fast.pretrain --preset umt_b16_k710 \\
        --data.train_list k710_train.csv --data.root /data/k710 \\
        --teacher.weights clip_vit_b16_visual.pth --run-dir runs/umt_b16

Resume a run that stopped or was killed (``auto`` is the default):

    python -m umt_fast.pretrain --preset ... --run-dir runs/umt_b16 --resume auto

``--help`` lists every ``--section.field`` option.
"""
from __future__ import annotations

import sys

from umt_fast.config import build_config, check_paths
from umt_fast.engine.launch import location_lines, run_training_command


def _summary(result) -> list[str]:
    lines = location_lines(result)
    if result.last_loss is not None:
        lines.append(f"final loss:    {result.last_loss:.4f} after {result.steps_done} steps")
    return lines


def _load_train():
    from umt_fast.recipes.pretrain import train

    return train


FIXED_ON_RESUME = ("student.", "teacher.", "data.train_list", "data.mix", "data.root", "data.num_frames", "data.img_size")
"""The fields of the model and the data: a resume that would change them is refused (unless
--allow-config-changes)."""


def main(argv: list[str] | None = None) -> int:
    return run_training_command(argv, build_config, check_paths, _load_train, _summary, FIXED_ON_RESUME)


if __name__ == "__main__":
    sys.exit(main())
