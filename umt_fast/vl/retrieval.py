"""Zero-shot video-text retrieval with a stage-2 model: VTC similarity, then VTM re-ranking.

    python -m umt_fast.evaluate retrieval --weights runs/demo_vl/umt_stage2.pth --text-weights minilm \\
        --test-list msrvtt_1k_test.json --root /data/msrvtt/videos

Scoring (as the reference does at test time):
  * every video is encoded whole (no masking), `num_frames` middle-of-segment frames; per frame,
    the frame's tokens are mean-pooled, pool_norm'ed and projected: one unit vector per frame;
  * VTC similarity of a caption and a video = the MEAN over frames of the per-frame cosine
    similarities (the reference's default "mean" aggregation);
  * VTM re-ranking: for every caption, its top-k videos by VTC similarity (and for every video, its
    top-k captions) are scored again with the VTM head's match logit on the fused text (cross-
    attending to all of the video's tokens); candidates outside the top k rank after them.
Metrics: R@1/5/10, median and mean rank (1-based), for text-to-video and video-to-text (a video's
rank is that of its best-ranked caption), both for VTC alone and after re-ranking.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

import numpy as np
import torch

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- metrics


def retrieval_metrics(sim_TV: np.ndarray | torch.Tensor, text_to_video: list[int]) -> dict[str, float]:
    """R@1/5/10 (percent), median and mean rank of both directions from a [texts, videos] score matrix.

    Args:
        sim_TV: higher = more similar.
        text_to_video: the video of each text (a video may have several texts, every video >= 1).
    """
    sim = np.asarray(sim_TV.float().cpu() if isinstance(sim_TV, torch.Tensor) else sim_TV, dtype=np.float64)
    nt, nv = sim.shape
    t2v = np.asarray(text_to_video)
    if t2v.shape != (nt,) or t2v.min() < 0 or t2v.max() >= nv:
        raise ValueError(f"text_to_video must give a video in [0, {nv}) for each of the {nt} texts")
    # text -> video: 1-based rank of the right video in the text's row (ties counted pessimistically
    # only against strictly higher scores).
    correct = sim[np.arange(nt), t2v]
    ranks_t = (sim > correct[:, None]).sum(1) + 1
    # video -> text: rank of the best-ranked of its texts in the video's column.
    ranks_v = np.empty(nv, dtype=np.int64)
    for v in range(nv):
        mine = np.flatnonzero(t2v == v)
        if mine.size == 0:
            raise ValueError(f"video {v} has no text")
        col = sim[:, v]
        ranks_v[v] = min(int((col > col[i]).sum()) + 1 for i in mine)
    out = {}
    for name, ranks in (("t2v", ranks_t), ("v2t", ranks_v)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = float(100.0 * (ranks <= k).mean())
        out[f"{name}_medr"] = float(np.median(ranks))
        out[f"{name}_meanr"] = float(ranks.mean())
    out["mean_r1"] = (out["t2v_r1"] + out["v2t_r1"]) / 2
    return out


def format_table(results: dict[str, dict[str, float]]) -> str:
    cols = ("r1", "r5", "r10", "medr", "meanr")
    lines = [f"{'scores':<8} {'dir':<4} " + " ".join(f"{c:>7}" for c in ("R@1", "R@5", "R@10", "MedR", "MeanR"))]
    for scores, m in results.items():
        for d in ("t2v", "v2t"):
            lines.append(f"{scores:<8} {d:<4} " + " ".join(f"{m[f'{d}_{c}']:>7.2f}" for c in cols))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- model


def _count(sd, pattern: str) -> int:
    return len({int(m.group(1)) for k in sd if (m := re.match(pattern, k))})


def load_stage2_model(weights: str, text_weights: str, num_frames: int, img_size: int, patch_size: int = 16):
    """A stage-2 model from a reference-format file (ours: <run_dir>/umt_stage2.pth) or a stage-2 run
    checkpoint directory; the BERT config comes from `text_weights` (the same folder as in training).
    Returns (model in eval mode, tokenizer)."""
    from umt_fast import checkpoint as ckpt
    from umt_fast.interop import read_state_dict, strip_prefix, student_arch_from_state_dict
    from umt_fast.models.student import SparseVideoStudent
    from umt_fast.vl.model import VisionLanguageModel, load_reference_state_dict, stage2_shapes, state_dict_to_reference
    from umt_fast.vl.text import TextArch, build_text_encoder, load_tokenizer

    if os.path.isdir(weights):
        sd = ckpt.load_checkpoint(weights)["student"]
        n_low = _count(sd, r"text_encoder\.bert\.encoder\.layer\.(\d+)\.")
        n_fusion = _count(sd, r"text_encoder\.fusion\.(\d+)\.")
        if not n_fusion:
            raise ValueError(f"{weights} is not a stage-2 run checkpoint (no text_encoder.fusion.* keys)")
        tmp = TextArch(vocab_size=0, hidden=0, num_layers=n_low + n_fusion, heads=1, intermediate=0, max_positions=0,
                       type_vocab_size=0, fusion_layers=n_fusion, vision_width=0)  # fmt: skip
        sd = state_dict_to_reference(sd, tmp)
    else:
        sd = read_state_dict(weights, "stage-2 weights")
    shapes = stage2_shapes(sd)
    vision = {k[len("vision_encoder."):]: v for k, v in sd.items() if k.startswith("vision_encoder.")}
    arch = student_arch_from_state_dict(strip_prefix(vision, ""), num_frames, img_size, patch_size)
    student = SparseVideoStudent(arch)
    text = build_text_encoder(text_weights, shapes["fusion_layers"], arch.width, load=False)
    if text.arch.num_layers != shapes["text_layers"] or text.arch.hidden != shapes["text_width"]:
        raise ValueError(f"--text-weights {text_weights} is a {text.arch.num_layers}-layer BERT of width "
                         f"{text.arch.hidden}; the weights hold {shapes['text_layers']} layers of width "
                         f"{shapes['text_width']}")  # fmt: skip
    model = VisionLanguageModel(student, text, shapes["embed_dim"])
    load_reference_state_dict(model, {k: v for k, v in sd.items() if not k.startswith("vision_encoder.clip_teacher")}, weights)
    return model.eval(), load_tokenizer(text_weights)


# ----------------------------------------------------------------------------------- scoring


@torch.no_grad()
def encode_videos(model, videos_uint8: list[torch.Tensor], device, batch_size: int = 8, autocast_dtype=None):
    """uint8 [T, H, W, 3] each (same T within a batch) -> (tokens [Nv, N, D], frame feats [Nv, T, E])."""
    from umt_fast.data.transforms import normalize_video

    tokens, feats = [], []
    for i in range(0, len(videos_uint8), batch_size):
        chunk = torch.stack(videos_uint8[i:i + batch_size]).to(device)
        with _autocast(device, autocast_dtype):
            t, f = model.encode_vision_test(normalize_video(chunk))
        tokens.append(t)
        feats.append(f.float())
    return torch.cat(tokens), torch.cat(feats)


@torch.no_grad()
def encode_texts(model, tokenizer, captions: list[str], device, max_len: int = 32, batch_size: int = 64, autocast_dtype=None):
    """-> (text features [Nt, S, H], attention masks [Nt, S], unit embeddings [Nt, E])."""
    xs, masks, feats = [], [], []
    for i in range(0, len(captions), batch_size):
        tok = tokenizer(captions[i:i + batch_size], padding="max_length", truncation=True, max_length=max_len,
                        return_tensors="pt")  # fmt: skip
        ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
        with _autocast(device, autocast_dtype):
            x, f = model.encode_text(ids, mask)
        xs.append(x)
        masks.append(mask)
        feats.append(f.float())
    return torch.cat(xs), torch.cat(masks), torch.cat(feats)


def vtc_similarity(text_feat_TE: torch.Tensor, frame_feat_VFE: torch.Tensor) -> torch.Tensor:
    """[Nt, E], [Nv, F, E] -> [Nt, Nv]: the mean over frames of the per-frame cosine similarities."""
    return torch.einsum("te,vfe->tvf", text_feat_TE.float(), frame_feat_VFE.float()).mean(-1)


@torch.no_grad()
def vtm_rerank(model, sim_TV, text_x, text_mask, vision_tokens, k: int, batch_size: int = 64, autocast_dtype=None):
    """Re-scores each text's top-k videos and each video's top-k texts with the VTM match logit.

    Returns:
        (t2v scores [Nt, Nv], v2t scores [Nt, Nv]); entries outside the top k are -inf.
    """
    device = sim_TV.device
    nt, nv = sim_TV.shape

    def score(pairs_t, pairs_v):
        out = []
        for i in range(0, len(pairs_t), batch_size):
            t, v = pairs_t[i:i + batch_size], pairs_v[i:i + batch_size]
            with _autocast(device, autocast_dtype):
                logits = model.match_logits(text_x[t], text_mask[t], vision_tokens[v])
            out.append(logits[:, 1].float())
        return torch.cat(out)

    k_v, k_t = min(k, nv), min(k, nt)
    t2v = torch.full((nt, nv), float("-inf"), device=device)
    top_v = sim_TV.topk(k_v, dim=1).indices  # [Nt, k]
    rows = torch.arange(nt, device=device).repeat_interleave(k_v)
    t2v[rows, top_v.flatten()] = score(rows, top_v.flatten())
    v2t = torch.full((nt, nv), float("-inf"), device=device)
    top_t = sim_TV.topk(k_t, dim=0).indices  # [k, Nv]
    cols = torch.arange(nv, device=device).repeat(k_t)
    v2t[top_t.flatten(), cols] = score(top_t.flatten(), cols)
    return t2v, v2t


def _autocast(device, dtype):
    import contextlib

    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def evaluate(model, tokenizer, entries: list[dict], *, num_frames: int, img_size: int, device, k: int = 128,
             max_len: int = 32, batch_size: int = 8, autocast_dtype=None) -> dict[str, dict[str, float]]:  # fmt: skip
    """Zero-shot retrieval over `entries` (read_caption_json's output): {"vtc": metrics, "vtm": metrics}."""
    from umt_fast.vl.data import load_media

    videos = [load_media(e["path"], e["media"], num_frames, img_size, rng=None) for e in entries]
    if len({v.shape[0] for v in videos}) != 1:
        raise ValueError("a retrieval list must hold one media type (all videos or all images)")
    captions = [c for e in entries for c in e["captions"]]
    text_to_video = [i for i, e in enumerate(entries) for _ in e["captions"]]
    model = model.to(device).eval()
    tokens, frame_feat = encode_videos(model, videos, device, batch_size, autocast_dtype)
    text_x, text_mask, text_feat = encode_texts(model, tokenizer, captions, device, max_len, autocast_dtype=autocast_dtype)
    sim = vtc_similarity(text_feat, frame_feat)
    t2v, v2t = vtm_rerank(model, sim, text_x, text_mask, tokens, k, autocast_dtype=autocast_dtype)
    vtc = retrieval_metrics(sim, text_to_video)
    m_t2v, m_v2t = retrieval_metrics(t2v, text_to_video), retrieval_metrics(v2t, text_to_video)
    vtm = {key: (m_t2v if key.startswith("t2v") else m_v2t)[key] for key in m_t2v if key != "mean_r1"}
    vtm["mean_r1"] = (vtm["t2v_r1"] + vtm["v2t_r1"]) / 2
    return {"vtc": vtc, "vtm": vtm}


# ----------------------------------------------------------------------------------- command line


def make_parser(prog: str = "python -m umt_fast.evaluate retrieval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Zero-shot video-text retrieval (VTC, then VTM re-ranking).")
    p.add_argument("--weights", required=True, help="stage-2 weights: a reference-format file (e.g. <run_dir>/umt_stage2.pth) "
                   "or a stage-2 run checkpoint directory")
    p.add_argument("--text-weights", required=True, help="the local BERT folder used in training ('minilm' = the bundled MiniLM)")
    p.add_argument("--test-list", required=True, help="JSON list of {\"video\": path, \"caption\": str or [str]} (MSRVTT style)")
    p.add_argument("--root", default="", help="directory relative media paths are resolved against")
    p.add_argument("--num-frames", type=int, default=4, help="frames per video (middle of each segment); default 4")
    p.add_argument("--img-size", type=int, default=224, help="input side in pixels; default 224")
    p.add_argument("--k", type=int, default=128, help="candidates re-ranked by VTM per query; default 128")
    p.add_argument("--max-len", type=int, default=32, help="caption tokens; default 32")
    p.add_argument("--batch-size", type=int, default=8, help="videos per forward; default 8")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--output", default="", help="write the metrics as JSON here")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m umt_fast.evaluate retrieval") -> int:
    args = make_parser(prog).parse_args(argv)
    from umt_fast.vl.data import read_caption_json

    try:
        if args.k < 1:
            raise ValueError(f"--k={args.k} must be >= 1")
        entries = read_caption_json(args.test_list, args.root)
        model, tokenizer = load_stage2_model(args.weights, args.text_weights, args.num_frames, args.img_size)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    results = evaluate(model, tokenizer, entries, num_frames=args.num_frames, img_size=args.img_size, device=device,
                       k=args.k, max_len=args.max_len, batch_size=args.batch_size, autocast_dtype=dtype)  # fmt: skip
    print(format_table(results))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({"weights": args.weights, "test_list": args.test_list, "k": args.k, **results}, f, indent=2)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
