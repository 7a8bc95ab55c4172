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

from umt_fast.config.vl import FIXED_ON_RESUME, build_config, check_paths
from umt_fast.engine.launch import location_lines, run_training_command


def _summary(result) -> list[str]:
    lines = location_lines(result)
    if result.export_path:
        lines.append(f"weights:       {os.path.abspath(result.export_path)} (reference stage-2 naming)")
    report = result.eval_report
    if report:  # the retrieval evaluation of data.test_list
        vtm = report["vtm"]
        lines.append(f"retrieval:     t2v R@1/5/10 {vtm['t2v_r1']:.1f}/{vtm['t2v_r5']:.1f}/{vtm['t2v_r10']:.1f}, "
                     f"v2t R@1 {vtm['v2t_r1']:.1f} (VTM re-ranked, {report['videos']} videos, step {report['step']})")
    if result.last_loss is not None:
        lines.append(f"final loss:    {result.last_loss:.4f} after {result.steps_done} steps")
    return lines


def _load_train():
    from umt_fast.recipes.pretrain_vl import train

    return train


def main(argv: list[str] | None = None, build=build_config) -> int:
    return run_training_command(argv, build, check_paths, _load_train, _summary, FIXED_ON_RESUME)


if __name__ == "__main__":
    sys.exit(main())
