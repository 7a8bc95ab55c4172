"""Retrieval fine-tuning of a stage-2 model, as the reference's ``tasks/retrieval.py`` recipes:
VTC + VTM on a downstream caption list (UTA and MLM off, every token visible, per-frame VTC),
then the retrieval evaluation of ``python -m umt_fast.evaluate retrieval`` on data.test_list.
Stage 2's engine and options (``python -m umt_fast.pretrain_vl``), with the retrieval presets.

The built-in demo (the stage-2 demo's towers on the sample clips' captions, evaluated on them;
under a minute on a CPU):

    python -m umt_fast.finetune_retrieval

MSRVTT-9k with UMT-B/16 (one node, 8 GPUs), from a stage-2 run:

    torchrun --nproc_per_node 8 -m umt_fast.finetune_retrieval --preset ret_msrvtt_9k_b16 \\
        --init runs/umt_b16_25m/umt_stage2.pth --text.weights bert-base-uncased \\
        --data.video_list msrvtt_ret_train9k.json --data.test_list msrvtt_ret_test1k.json \\
        --data.root /data/msrvtt --run-dir runs/ret_msrvtt_b16

Resume with the same command (``--resume auto`` is the default). ``--help`` lists every option.
"""
from __future__ import annotations

import os
import sys

from umt_fast.config.vl import FIXED_ON_RESUME, build_retrieval_config, check_paths
from umt_fast.engine.launch import location_lines, run_training_command


def _summary(result) -> list[str]:
    lines = location_lines(result)
    if result.export_path:
        lines.append(f"weights:       {os.path.abspath(result.export_path)} (reference stage-2 naming)")
    report = result.eval_report
    if report:
        vtm = report["vtm"]
        lines.append(f"retrieval:     t2v R@1/5/10 {vtm['t2v_r1']:.1f}/{vtm['t2v_r5']:.1f}/{vtm['t2v_r10']:.1f}, "
                     f"v2t R@1 {vtm['v2t_r1']:.1f} (VTM re-ranked, {report['videos']} videos, step {report['step']})")
    if result.last_loss is not None:
        lines.append(f"final loss:    {result.last_loss:.4f} after {result.steps_done} steps")
    return lines


def _load_train():
    from umt_fast.recipes.pretrain_vl import train

    return train


def main(argv: list[str] | None = None) -> int:
    return run_training_command(argv, build_retrieval_config, check_paths, _load_train, _summary, FIXED_ON_RESUME)


if __name__ == "__main__":
    sys.exit(main())
