"""Export a run's weights as one file in the reference's naming.

    python -m umt_fast.export runs/umt_b16 --out umt_b16_stage1.safetensors
    python -m umt_fast.export runs/umt_b16/checkpoints/step_00010000 --out umt_b16.pth --format pth

The input is a run-directory checkpoint (``checkpoints/step_N``) or a run directory (its
newest checkpoint), from ``umt_fast.pretrain`` or ``umt_fast.finetune``. The output is a
plain state dict:

* pre-training runs: the student in the reference's stage-1 naming (``encoder.*``,
  ``clip_decoder.{k}.*``), which the reference code and `umt_fast.interop.load_student` read;
* fine-tuning runs: the classifier in the reference's fine-tuned naming (``patch_embed.*``,
  ``blocks.*``, ``fc_norm.*``, ``head.*``, ``pos_embed``), read by
  `umt_fast.interop.load_video_vit`.

Beside it, ``<out without suffix>.json`` records what the file is (kind, architecture,
frames, resolution, source checkpoint and step); a ``.safetensors`` file also carries that
JSON in its metadata under ``umt_fast``. safetensors (the default) is the preferred format:
it holds only tensors and loads without unpickling.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from umt_fast.engine.checkpoint import atomic_write, read_run_checkpoint, resolve_checkpoint, sidecar_path  # noqa: F401 (also here)

FORMATS = ("safetensors", "pth")


_atomic_write = atomic_write  # the older private name


def save_state_dict(
    state_dict: dict[str, torch.Tensor], out: str, fmt: str = "safetensors", description: dict[str, Any] | None = None
) -> tuple[str, str | None]:
    """Writes ``state_dict`` to ``out`` (atomically) and ``description`` to the JSON beside it.

    Returns (weights path, JSON path or None).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is not allowed: must be one of {', '.join(FORMATS)}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    meta = json.dumps(description or {}, default=str)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata={"umt_fast": meta}))
    else:

        def write_pickle(tmp: str) -> None:
            with open(tmp, "wb") as f:
                torch.save(tensors, f)

        atomic_write(out, write_pickle)
    if description is None:
        return out, None
    json_path = sidecar_path(out)

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(description, indent=2, default=str) + "\n")

    atomic_write(json_path, write_json)
    return out, json_path


def export_checkpoint(checkpoint: str, out: str, fmt: str | None = None) -> tuple[str, str | None, dict[str, Any]]:
    """Exports a run checkpoint (or a run dir's newest) to ``out``; the format defaults to the
    suffix of ``out`` (``.pth`` / ``.pt`` -> pth, anything else -> safetensors)."""
    if fmt is None:
        fmt = "pth" if out.endswith((".pth", ".pt", ".bin")) else "safetensors"
    state_dict, description = read_run_checkpoint(checkpoint)
    description["file_format"] = fmt
    weights, json_path = save_state_dict(state_dict, out, fmt, description)
    return weights, json_path, description


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m umt_fast.export",
        description="Write a run's student (pre-training) or classifier (fine-tuning) as one state-dict file in the "
        "reference's naming, with a JSON description beside it.",
    )
    parser.add_argument("checkpoint", help="a checkpoint (run_dir/checkpoints/step_N), or a run directory (its newest checkpoint)")
    parser.add_argument("--out", required=True, help="output file (.safetensors or .pth)")
    parser.add_argument("--format", choices=FORMATS, default=None, help="default: from --out's suffix, else safetensors")
    args = parser.parse_args(argv)
    try:
        weights, json_path, description = export_checkpoint(args.checkpoint, args.out, args.format)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {weights} ({description['kind']}, {description['naming']}, step {description['step']})")
    if json_path:
        print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
