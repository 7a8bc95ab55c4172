"""Stage-2 UMT pre-training: vision-language (UTA + VTC + VTM + MLM), continuing from stage 1.

The built-in demo (tiny vision towers, the bundled MiniLM BERT, the sample clips and a few
photographs with built-in captions; a couple of minutes on a CPU):

    python -m umt_fast.pretrain_vl

The published recipe (one node, 8 GPUs):

    torchrun --nproc_per_node 8 -m umt_fast.pretrain_vl --preset umt_b16_5m \\
        --init runs/umt_b16/checkpoints/step_00064000 --teacher.weights clip_vit_b16_visual.pth \\
        --text.weights bert-base-uncased --data.video_list webvid2m.json --data.image_list cc3m.json \\
        --data.root /data --run-dir runs/umt_b16_5m

Resume with the same command (``--resume auto`` is the default). ``--help`` lists every option.
"""
from __future__ import annotations

import os
import sys
import time

from umt_fast.config_vl import build_config, check_paths


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = build_config(argv)
        if not cfg.run_dir:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ValueError("--run-dir is required under torchrun (every rank must write to the same place)")
            cfg.run_dir = os.path.join("runs", f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
        check_paths(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from umt_fast.distributed import destroy_distributed
    from umt_fast.vl.train import train

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
    if result.export_path:
        print(f"weights:       {os.path.abspath(result.export_path)} (reference stage-2 naming)")
    if result.last_loss is not None:
        print(f"final loss:    {result.last_loss:.4f} after {result.steps_done} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
