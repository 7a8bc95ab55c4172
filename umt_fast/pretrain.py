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

import os
import sys
import time

from umt_fast.config import build_config, check_paths


def default_run_dir(preset: str) -> str:
    return os.path.join("runs", f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = build_config(argv)
        if not cfg.run_dir:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ValueError("--run-dir is required under torchrun (every rank must write to the same place)")
            cfg.run_dir = default_run_dir(cfg.preset)
        check_paths(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from umt_fast.distributed import destroy_distributed
    from umt_fast.train.loop import train  # torch and friends load only once the config is valid

    try:
        result = train(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; resume with --resume auto --run-dir " + cfg.run_dir, file=sys.stderr)
        return 130
    finally:
        destroy_distributed()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"run directory: {os.path.abspath(result.run_dir)}")
    print(f"checkpoint:    {os.path.abspath(result.last_checkpoint) if result.last_checkpoint else '(none)'}")
    if result.last_loss is not None:
        print(f"final loss:    {result.last_loss:.4f} after {result.steps_done} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
