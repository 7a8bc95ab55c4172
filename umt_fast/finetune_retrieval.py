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

import sys

from umt_fast import pretrain_vl
from umt_fast.config.vl import build_retrieval_config


def main(argv: list[str] | None = None) -> int:
    """Stage 2's command with the retrieval presets (``ret_demo`` by default)."""
    return pretrain_vl.main(argv, build=build_retrieval_config)


if __name__ == "__main__":
    sys.exit(main())
