"""Feature extraction: one embedding per video (or per-token features) to safetensors or .npy.

    python -m umt_fast.extract --checkpoint umt_b16_stage1.safetensors --videos videos.csv --root /data \\
        --out features.safetensors
    python -m umt_fast.extract --checkpoint runs/umt_b16 --videos a.mp4 b.mp4 --out feats.npy --tokens

Each video is read as one clip: num_frames frames from the middles of equal segments, the
short side resized to the input size and the centre crop taken. The embedding is the mean of
the encoder's final-normed tokens for a pre-trained (stage-1 / stage-2) model, and the
head's input (mean-pooled tokens through fc_norm) for a fine-tuned classifier. ``--tokens``
also writes every token's feature ([T * P, D], token t * P + p).

Output: ``.safetensors`` holds ``embeddings`` [N, D] float32 (and ``tokens`` [N, T*P, D]),
with the video paths in row order in its metadata; ``.npy`` holds the embeddings (or, with
``--tokens``, the token features). Beside either, ``<out without suffix>.json`` lists the
rows' paths, the unreadable videos (skipped, also reported on stderr) and the settings.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from umt_fast.data.annotations import read_annotation_list
from umt_fast.data.transforms import normalize_video
from umt_fast.engine.checkpoint import atomic_write, check_writable
from umt_fast.recipes.evaluation import ViewsDataset, autocast_for, resolve_device
from umt_fast.models.classifier import VideoViT

LIST_SUFFIXES = (".csv", ".txt", ".lst", ".list")


def load_feature_model(path: str, num_frames: int | None, img_size: int | None, patch_size: int | None) -> VideoViT:
    """The dense ViT of any student-side file, export or run (dir or checkpoint), in eval mode."""
    from umt_fast import interop
    from umt_fast.engine import checkpoint as export

    known: dict = {}
    source = path
    if os.path.isdir(path):
        source, known = export.read_run_checkpoint(path)
    elif os.path.isfile(export.sidecar_path(path)):
        with open(export.sidecar_path(path), encoding="utf-8") as f:
            known = json.load(f)
    return interop.load_video_vit(
        source, num_frames=num_frames or known.get("num_frames") or 8, img_size=img_size or known.get("img_size") or 224,
        patch_size=patch_size or known.get("patch_size") or 16,
    )  # fmt: skip


def video_paths(items: list[str], root: str = "") -> list[str]:
    """Video paths from command-line items: an annotation list (.csv/.txt/...) expands to its
    videos; anything else is a video file."""
    paths: list[str] = []
    for item in items:
        if item.lower().endswith(LIST_SUFFIXES):
            paths += [r.path for r in read_annotation_list(item, root=root)]
        else:
            paths.append(os.path.join(root, item) if root and not os.path.isabs(item) else item)
    return paths


@torch.no_grad()
def extract_features(
    model: VideoViT,
    paths: list[str],
    *,
    tokens: bool = False,
    batch_size: int = 8,
    device: torch.device = torch.device("cpu"),
    precision: str = "bf16",
    num_workers: int = 0,
    progress=None,
) -> tuple[list[str], torch.Tensor, torch.Tensor | None, list[tuple[str, str]]]:
    """(paths read, embeddings float32 [N, D], token features float32 [N, T*P, D] or None,
    (path, reason) of the unreadable videos)."""
    arch = model.arch
    model.eval()
    loader = DataLoader(ViewsDataset(paths, arch.num_frames, arch.img_size, 1, 1), batch_size=None,
                        num_workers=num_workers)  # fmt: skip
    done_paths, embeddings, token_features, failed = [], [], [], []
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        clips = torch.cat([v for _, v in pending]).to(device, non_blocking=True)
        with autocast_for(device, precision):
            embedding, features = model.embed(normalize_video(clips))
        embeddings.append(embedding.float().cpu())
        if tokens:
            token_features.append(features.float().cpu())
        done_paths.extend(paths[i] for i, _ in pending)
        pending.clear()

    for done, (i, views, error) in enumerate(loader, start=1):
        if views is None:
            failed.append((paths[i], error))
            print(f"unreadable video skipped: {paths[i]}: {error}", file=sys.stderr, flush=True)
        else:
            pending.append((i, views))
            if len(pending) == batch_size:
                flush()
        if progress is not None:
            progress(done, len(paths))
    if pending:
        flush()
    width = arch.width
    emb = torch.cat(embeddings) if embeddings else torch.empty(0, width)
    tok = (torch.cat(token_features) if token_features else torch.empty(0, arch.num_tokens, width)) if tokens else None
    return done_paths, emb, tok, failed


def write_features(out: str, paths: list[str], embeddings: torch.Tensor, tokens: torch.Tensor | None,
                   failed: list[tuple[str, str]], settings: dict) -> str:  # fmt: skip
    """Writes the features (format from the suffix of ``out``) and the JSON beside; returns its path."""
    description = {"paths": paths, "unreadable": [{"path": p, "reason": r} for p, r in failed], **settings}
    if out.endswith(".npy"):  # one array a file: the tokens go to OUT, the embeddings beside it
        arrays = {out: embeddings} if tokens is None else {out: tokens, embeddings_beside(out): embeddings}
        description["arrays"] = {os.path.basename(p): ("tokens [N, T*P, D]" if a is tokens else "embeddings [N, D]")
                                 for p, a in arrays.items()}  # fmt: skip
        for path, array in arrays.items():
            atomic_write(path, lambda tmp, a=array: np.save(open(tmp, "wb"), a.numpy()))
    elif out.endswith(".safetensors"):
        from safetensors.torch import save_file

        tensors = {"embeddings": embeddings.contiguous()}
        if tokens is not None:
            tensors["tokens"] = tokens.contiguous()
        atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata={"umt_fast": json.dumps(description)}))
    else:
        raise ValueError(f"--out {out}: the suffix must be .safetensors or .npy")
    json_path = os.path.splitext(out)[0] + ".json"
    atomic_write(json_path, lambda tmp: open(tmp, "w", encoding="utf-8").write(json.dumps(description, indent=2)))
    return json_path


def embeddings_beside(out: str) -> str:
    """Where ``--tokens --out X.npy`` puts the embeddings: X_embeddings.npy."""
    return os.path.splitext(out)[0] + "_embeddings.npy"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m umt_fast.extract", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run dir or checkpoint, an export, or a reference file")
    parser.add_argument("--videos", nargs="+", required=True, help="video files and/or annotation lists (.csv/.txt)")
    parser.add_argument("--root", default="", help="prefix for relative paths")
    parser.add_argument("--out", required=True, help="output .safetensors or .npy")
    parser.add_argument("--tokens", action="store_true", help="also write per-token features [N, T*P, D]")
    parser.add_argument("--num-frames", type=int, default=None, help="default: the checkpoint's, else 8")
    parser.add_argument("--img-size", type=int, default=None, help="default: the checkpoint's, else 224")
    parser.add_argument("--patch-size", type=int, default=None, help="default: the checkpoint's, else 16")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per forward pass")
    parser.add_argument("--num-workers", type=int, default=2, help="decoding worker processes")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 autocast on a GPU")
    args = parser.parse_args(argv)
    try:
        if not args.out.endswith((".safetensors", ".npy")):
            raise ValueError(f"--out {args.out}: the suffix must be .safetensors or .npy")
        check_writable(args.out, "--out")  # before any decoding
        device = resolve_device(args.device)
        model = load_feature_model(args.checkpoint, args.num_frames, args.img_size, args.patch_size).to(device)
        paths = video_paths(args.videos, args.root)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done % 20 == 0 or done == total:
            rate = done / max(time.perf_counter() - start, 1e-9)
            eta = (total - done) / rate if rate > 0 else float("inf")
            print(f"extracted {done}/{total} videos | {rate:.1f} videos/s | ETA {eta:.0f} s", file=sys.stderr, flush=True)

    done, embeddings, tokens, failed = extract_features(
        model, paths, tokens=args.tokens, batch_size=args.batch_size, device=device, precision=args.precision,
        num_workers=args.num_workers, progress=progress,
    )  # fmt: skip
    arch = model.arch
    settings = {"checkpoint": os.path.abspath(args.checkpoint), "num_frames": arch.num_frames, "img_size": arch.img_size,
                "patch_size": arch.patch_size, "dim": arch.width,
                "embedding": "mean of final-normed tokens" if arch.num_classes == 0 else "fc_norm(mean of tokens)"}  # fmt: skip
    json_path = write_features(args.out, done, embeddings, tokens, failed, settings)
    if tokens is not None and args.out.endswith(".npy"):
        print(f"wrote {args.out}: tokens {list(tokens.shape)} and {embeddings_beside(args.out)}: embeddings "
              f"{list(embeddings.shape)}, {len(done)} videos; {json_path}")  # fmt: skip
    else:
        print(f"wrote {args.out}: {len(done)} videos, embeddings {list(embeddings.shape)}"
              + (f", tokens {list(tokens.shape)}" if tokens is not None else "") + f"; {json_path}")  # fmt: skip
    if failed:
        print(f"{len(failed)} unreadable video(s) skipped (listed in {json_path})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
