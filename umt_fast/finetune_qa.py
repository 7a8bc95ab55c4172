"""Video question answering: fine-tune a stage-2 model as the reference's ``tasks/vqa.py`` does
(a question encoder attending to the video, an answer decoder, the weighted answer loss), then
answer data.test_list as ``python -m umt_fast.evaluate qa`` does.

The built-in demo (a tiny vision tower and the bundled MiniLM BERT on the sample clips, with
questions written for them, evaluated on the same questions; seconds on a CPU):

    python -m umt_fast.finetune_qa

MSRVTT-QA with UMT-L/16 (one node, 8 GPUs), from a stage-2 model:

    torchrun --nproc_per_node 8 -m umt_fast.finetune_qa --preset qa_msrvtt_l16 \\
        --init runs/umt_l16_25m/umt_stage2.pth --text.weights bert-large-uncased \\
        --data.train_list msrvtt_qa_train.json --data.test_list msrvtt_qa_test.json \\
        --data.answer_list msrvtt_qa_answer_list.json --data.root /data/msrvtt --run-dir runs/qa_msrvtt_l16

Resume with the same command (``--resume auto`` is the default). ``--help`` lists every option.
"""
from __future__ import annotations

import os
import sys

from umt_fast.config.qa import FIXED_ON_RESUME, QAFinetuneConfig, build_config, check_paths
from umt_fast.engine.launch import location_lines, run_training_command


def check_config(cfg: QAFinetuneConfig) -> None:
    """The config's paths, then every entry of the QA lists that are files, before anything is built."""
    check_paths(cfg)
    from umt_fast.recipes.finetune_qa import check_lists

    check_lists(cfg)


def _summary(result) -> list[str]:
    lines = location_lines(result)
    if result.export_path:
        lines.append(f"weights:       {os.path.abspath(result.export_path)} (reference UMT_QA naming)")
    report = result.eval_report
    if report:
        lines.append(f"QA accuracy:   {report['acc']:.2f} % ({report['correct']}/{report['questions']} questions, "
                     f"step {report['step']})")  # fmt: skip
    if result.last_loss is not None:
        lines.append(f"final loss:    {result.last_loss:.4f} after {result.steps_done} steps")
    return lines


def _load_train():
    from umt_fast.recipes.finetune_qa import train

    return train


def main(argv: list[str] | None = None) -> int:
    return run_training_command(argv, build_config, check_config, _load_train, _summary, FIXED_ON_RESUME)


if __name__ == "__main__":
    sys.exit(main())
