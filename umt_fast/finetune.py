"""Fine-tuning for action recognition (UMT_SPEC.md section 3).

The built-in demo (a tiny model on the bundled sample clips, label = which clip; about a
minute on a laptop CPU):

    python -m umt_fast.finetune

The published recipes, from a reference checkpoint (nothing is downloaded):

    python -m umt_fast.finetune --preset umt_b16_ssv2 --init b16_ptk710_f8_res224.pth \\
        --data.train_list ssv2_train.csv --data.val_list ssv2_val.csv --data.root /data/ssv2 \\
        --run-dir runs/ft_b16_ssv2

Several GPUs (``train.global_batch_size`` is the global batch; add --dist.strategy fsdp to shard the
model):

    torchrun --nproc_per_node 8 -m umt_fast.finetune --preset umt_b16_ssv2 --init ... \\
        --data.train_list ssv2_train.csv --data.val_list ssv2_val.csv --run-dir runs/ft_b16_ssv2

Resume a run that stopped (``auto`` is the default): rerun with the same ``--run-dir``, at any
number of ranks.

The model is the dense ViT over all tokens + mean pool + fc_norm + dropout + Linear head
(`umt_fast.models.classifier.VideoViT`); AdamW with layer-wise lr decay, warm-up + cosine;
soft-target cross-entropy with label smoothing, mixup / cutmix (timm's batch mode), random
erasing and RandAugment; drop path and optional activation checkpointing. The run directory
has the layout of pre-training (config.yaml, metrics.jsonl, log.txt, checkpoints/) plus
eval.json, the last multi-view evaluation. Under torchrun the model is wrapped (DDP, or FSDP2
per block then the root) between `build_model` and `build_optimizer`; rank r trains on its
slice of every global batch, and every random draw of a step is made for the global batch, so
a step does not depend on the number of ranks.
"""
from __future__ import annotations

import sys

from umt_fast.config.finetune import FinetuneConfig, build_config, check_paths
from umt_fast.engine.launch import location_lines, run_training_command


def check_config(cfg: FinetuneConfig) -> None:
    """The config's paths, every label of the lists, then the head label map's rows (against a
    K710 head), before anything is built."""
    check_paths(cfg)
    from umt_fast.recipes.finetune import labelled_lists

    labelled_lists(cfg, sample_list=None)  # the bundled clips' list is written with the run
    if cfg.model.head_label_map:
        from umt_fast.interop import K710_CLASSES, read_head_label_map

        read_head_label_map(cfg.model.head_label_map, cfg.model.num_classes or None, K710_CLASSES, "model.head_label_map")


def _summary(result) -> list[str]:
    lines = location_lines(result)
    if result.last_loss is not None:
        lines.append(f"final loss:    {result.last_loss:.4f}, train top-1 {result.train_top1:.1f} % after {result.steps_done} steps")
    if result.eval_report and result.eval_report["top1"] is not None:
        r = result.eval_report
        lines.append(f"eval:          top-1 {r['top1']:.1f} %, top-5 {r['top5']:.1f} % on {r['num_videos']} videos "
                     f"x {r['views_per_video']} views")  # fmt: skip
    return lines


def _load_train():
    from umt_fast.recipes.finetune import train

    return train


FIXED_ON_RESUME = ("model.", "data.train_list", "data.mix", "data.val_list", "data.root", "data.class_names", "data.num_frames",
                  "data.img_size")
"""The fields of the model and the data: a resume that would change them is refused (unless
--allow-config-changes)."""


def main(argv: list[str] | None = None) -> int:
    return run_training_command(argv, build_config, check_config, _load_train, _summary, FIXED_ON_RESUME)


def __getattr__(name: str):
    """The library's names (``build_model``, ...) stay importable from the command, loaded on first use."""
    import importlib

    try:
        return getattr(importlib.import_module("umt_fast.recipes.finetune"), name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


if __name__ == "__main__":
    sys.exit(main())
