"""Zero-shot video-text retrieval with a stage-2 model: VTC similarity, then VTM re-ranking.

    python -m umt_fast.evaluate retrieval --weights runs/demo_vl/umt_stage2.pth --text-weights minilm \\
        --test-list msrvtt_1k_test.json --root /data/msrvtt/videos

Scoring (as the reference does at test time):
  * captions are cleaned and tokenized as the reference does: ``[CLS]`` + at most max_len - 1
    wordpieces, no ``[SEP]``, [PAD] to max_len (`umt_fast.models.text.tokenize_captions`);
  * every video is encoded whole (no masking), `num_frames` middle-of-segment frames; per frame,
    the frame's tokens are mean-pooled, pool_norm'ed and projected: one unit vector per frame;
  * VTC similarity of a caption and a video = the MEAN over frames of the per-frame cosine
    similarities (the reference's default "mean" aggregation);
  * VTM re-ranking: for every caption, its top-k videos by VTC similarity (and for every video, its
    top-k captions) are scored again with the VTM head's match logit alone on the fused text
    (cross-attending to all of the video's tokens); every other pair scores -100, so it ranks
    after them.
Ranking (the reference's ``itm_eval``): a query's candidates in ``np.argsort(scores)[::-1]``
order, equal scores included; its rank is the 0-based position of its best ground truth;
R@k = rank < k. Metrics: R@1/5/10, and the median and mean rank reported 1-based (reference rank
+ 1), for text-to-video and video-to-text (a video's rank is that of its best-ranked caption),
both for VTC alone and after re-ranking (text-to-video from the text-side top-k scores,
video-to-text from the video-side ones).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys

import numpy as np
import torch

from umt_fast.engine.distributed import DistInfo, all_gather_objects, gather_by_index, my_share
from umt_fast.recipes.evaluation import demo_path, init_evaluation, progress_printer

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- metrics


def reference_ranks(scores_QC: np.ndarray, pairs_P2: np.ndarray) -> np.ndarray:
    """0-based rank per query, as the reference's ``itm_eval``: the position of the query's best
    ground truth in ``np.argsort(row)[::-1]``, so equal scores fall in the order numpy's default
    argsort leaves them, reversed (not by index, not optimistically).

    Args:
        scores_QC: [Q, C] scores, higher = better; ranked in their own dtype.
        pairs_P2: int [P, 2] (query, candidate) ground-truth pairs; every query needs >= 1.

    Returns:
        int64 [Q]: the smallest position over each query's ground truths.
    """
    Q, C = scores_QC.shape
    order_QC = np.argsort(scores_QC, axis=1)[:, ::-1]
    position_QC = np.empty((Q, C), dtype=np.int64)
    np.put_along_axis(position_QC, order_QC, np.broadcast_to(np.arange(C), (Q, C)), axis=1)
    q, c = pairs_P2[:, 0], pairs_P2[:, 1]
    ranks = np.full(Q, C, dtype=np.int64)
    np.minimum.at(ranks, q, position_QC[q, c])
    return ranks


def _scores_numpy(scores: np.ndarray | torch.Tensor) -> np.ndarray:
    """A score matrix as numpy, keeping float16/32/64 as they are (bfloat16 -> float32)."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu()
        if scores.dtype not in (torch.float16, torch.float32, torch.float64):
            scores = scores.float()
        return scores.numpy()
    return np.asarray(scores)


def retrieval_metrics(sim_TV: np.ndarray | torch.Tensor, text_to_video: list[int],
                      v2t_sim_TV: np.ndarray | torch.Tensor | None = None) -> dict[str, float]:  # fmt: skip
    """R@1/5/10 (percent), median and mean rank of both directions, ranked as the reference's
    ``itm_eval`` ranks (`reference_ranks`): R@k = 0-based rank < k; the median and mean are
    reported 1-based (reference rank + 1). Also ``mean_r1`` (of the two directions) and the
    reference's ``r_mean`` (the mean of the six recalls), by which its fine-tuning keeps the best.

    Text-to-video ranks each text's row of `sim_TV` (the right video); video-to-text ranks each
    video's column of `v2t_sim_TV` (default `sim_TV`) and keeps its best-ranked caption.

    Args:
        sim_TV: [texts, videos] scores, higher = more similar (for VTM re-ranking: the text-to-video
            scores, -100 outside each text's top k).
        text_to_video: the video of each text (a video may have several texts, every video >= 1).
        v2t_sim_TV: [texts, videos] scores for video-to-text (VTM re-ranking: -100 outside each
            video's top k).
    """
    t2v_scores = _scores_numpy(sim_TV)
    v2t_scores = t2v_scores if v2t_sim_TV is None else _scores_numpy(v2t_sim_TV)
    nt, nv = t2v_scores.shape
    if v2t_scores.shape != (nt, nv):
        raise ValueError(f"the video-to-text scores are {v2t_scores.shape}, the text-to-video ones {(nt, nv)}")
    t2v = np.asarray(text_to_video, dtype=np.int64)
    if t2v.shape != (nt,) or t2v.min() < 0 or t2v.max() >= nv:
        raise ValueError(f"text_to_video must give a video in [0, {nv}) for each of the {nt} texts")
    missing = np.setdiff1d(np.arange(nv), t2v)
    if missing.size:
        raise ValueError(f"video {int(missing[0])} has no text")
    texts = np.arange(nt)
    ranks_t = reference_ranks(np.ascontiguousarray(t2v_scores), np.stack([texts, t2v], 1))
    ranks_v = reference_ranks(np.ascontiguousarray(v2t_scores.T), np.stack([t2v, texts], 1))
    out = {}
    for name, ranks in (("t2v", ranks_t), ("v2t", ranks_v)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * int((ranks < k).sum()) / len(ranks)
        out[f"{name}_medr"] = float(np.median(ranks + 1))
        out[f"{name}_meanr"] = float((ranks + 1).mean())
    out["mean_r1"] = (out["t2v_r1"] + out["v2t_r1"]) / 2
    out["r_mean"] = sum(out[f"{d}_r{k}"] for d in ("t2v", "v2t") for k in (1, 5, 10)) / 6  # the reference's r_mean
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
    from umt_fast.engine import checkpoint as ckpt
    from umt_fast.interop import read_state_dict, strip_prefix, student_arch_from_state_dict
    from umt_fast.models.student import SparseVideoStudent
    from umt_fast.models.vl import (
        HEAD_NORM_EPS, VisionLanguageModel, load_reference_state_dict, stage2_shapes, state_dict_to_reference,
    )
    from umt_fast.models.text import TextArch, build_text_encoder, load_tokenizer

    if os.path.isdir(weights):
        sd = ckpt.load_checkpoint(ckpt.resolve_checkpoint(weights))["student"]
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
    student = SparseVideoStudent(dataclasses.replace(arch, head_norm_eps=HEAD_NORM_EPS))
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
    """uint8 [T, H, W, 3] each (same T within a batch) -> (tokens [Nv, N, D], frame feats [Nv, T, E]);
    (None, None) for no videos (a rank whose share is empty)."""
    from umt_fast.data.transforms import normalize_video

    if not videos_uint8:
        return None, None
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
    """-> (text features [Nt, S, H], attention masks [Nt, S], unit embeddings [Nt, E]); the captions
    tokenized as the reference does (`umt_fast.models.text.tokenize_captions`)."""
    from umt_fast.models.text import tokenize_captions

    xs, masks, feats = [], [], []
    for i in range(0, len(captions), batch_size):
        ids, mask = tokenize_captions(tokenizer, captions[i:i + batch_size], max_len)
        ids, mask = ids.to(device), mask.to(device)
        with _autocast(device, autocast_dtype):
            x, f = model.encode_text(ids, mask)
        xs.append(x)
        masks.append(mask)
        feats.append(f.float())
    return torch.cat(xs), torch.cat(masks), torch.cat(feats)


def vtc_similarity(text_feat_TE: torch.Tensor, frame_feat_VFE: torch.Tensor) -> torch.Tensor:
    """[Nt, E], [Nv, F, E] -> [Nt, Nv]: the mean over frames of the per-frame cosine similarities."""
    return torch.einsum("te,vfe->tvf", text_feat_TE.float(), frame_feat_VFE.float()).mean(-1)


NOT_RERANKED = -100.0
"""The score of a pair outside the re-ranked top k (the reference's fill value)."""


@torch.no_grad()
def vtm_rerank(model, sim_TV, text_x, text_mask, vision_tokens, k: int, batch_size: int = 64, autocast_dtype=None,
               video_positions: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Re-scores each text's top-k videos and each video's top-k texts with the VTM match logit
    alone (the VTC score is not added), as the reference does.

    Args:
        vision_tokens: [Nv, N, D] every video's tokens, or under torchrun ([n, N, D] or None) this
            rank's share: the videos at ``video_positions``. Each rank then scores the pairs of
            its own videos, and every rank returns all the scores.

    Returns:
        (t2v scores [Nt, Nv], v2t scores [Nt, Nv]) float32; entries outside the top k are
        `NOT_RERANKED` (-100, the reference's fill).
    """
    device = sim_TV.device
    nt, nv = sim_TV.shape

    def score(pairs_t, pairs_v):
        if video_positions is None:
            return vtm_pair_logits(model, text_x, text_mask, vision_tokens, pairs_t, pairs_v, batch_size,
                                   autocast_dtype)[:, 1]  # fmt: skip
        return _score_own_pairs(model, text_x, text_mask, vision_tokens, video_positions, pairs_t, pairs_v, nv,
                                batch_size, autocast_dtype)  # fmt: skip

    k_v, k_t = min(k, nv), min(k, nt)
    t2v = torch.full((nt, nv), NOT_RERANKED, device=device)
    top_v = sim_TV.topk(k_v, dim=1).indices  # [Nt, k]
    rows = torch.arange(nt, device=device).repeat_interleave(k_v)
    t2v[rows, top_v.flatten()] = score(rows, top_v.flatten())
    v2t = torch.full((nt, nv), NOT_RERANKED, device=device)
    top_t = sim_TV.topk(k_t, dim=0).indices  # [k, Nv]
    cols = torch.arange(nv, device=device).repeat(k_t)
    v2t[top_t.flatten(), cols] = score(top_t.flatten(), cols)
    return t2v, v2t


def _score_own_pairs(model, text_x, text_mask, vision_tokens, video_positions, pairs_t, pairs_v, nv: int,
                     batch_size: int, autocast_dtype) -> torch.Tensor:  # fmt: skip
    """[P] match logits of every pair, each scored by the rank that holds its video's tokens."""
    local_of = torch.full((nv,), -1, dtype=torch.long, device=pairs_v.device)
    local_of[torch.tensor(video_positions, dtype=torch.long, device=pairs_v.device)] = \
        torch.arange(len(video_positions), device=pairs_v.device)  # fmt: skip
    local_v = local_of[pairs_v]
    mine = (local_v >= 0).nonzero()[:, 0]
    logits = vtm_pair_logits(model, text_x, text_mask, vision_tokens, pairs_t[mine], local_v[mine], batch_size,
                             autocast_dtype)[:, 1] if len(mine) else torch.empty(0)  # fmt: skip
    out = torch.empty(len(pairs_v))
    for idx, values in all_gather_objects((mine.cpu(), logits.cpu())):
        out[idx] = values
    return out.to(pairs_v.device)


@torch.no_grad()
def vtm_pair_logits(model, text_x, text_mask, vision_tokens, text_idx, video_idx, batch_size: int = 64,
                    autocast_dtype=None) -> torch.Tensor:  # fmt: skip
    """The VTM head's two logits [P, 2] float32 (index 1 = match) for the (text, video) pairs
    ``(text_idx[p], video_idx[p])``: the fused text cross-attends to all of the video's tokens;
    ``batch_size`` pairs per forward."""
    out = []
    for i in range(0, len(text_idx), batch_size):
        t, v = text_idx[i:i + batch_size], video_idx[i:i + batch_size]
        with _autocast(vision_tokens.device, autocast_dtype):
            logits = model.match_logits(text_x[t], text_mask[t], vision_tokens[v])
        out.append(logits.float())
    return torch.cat(out)


def _autocast(device, dtype):
    import contextlib

    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


class _Media(torch.utils.data.Dataset):
    """Entry i -> (i, its uint8 media or None, why it is unreadable or None): decoded as in testing."""

    def __init__(self, entries: list[dict], num_frames: int, img_size: int, max_seconds: float = 0.0):
        self.entries, self.num_frames, self.img_size, self.max_seconds = entries, num_frames, img_size, max_seconds

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        from umt_fast.data.captions import load_media
        from umt_fast.data.decoding import VideoDecodeError

        e = self.entries[i]
        try:
            return i, load_media(e["path"], e["media"], self.num_frames, self.img_size, rng=None,
                                 max_seconds=self.max_seconds), None  # fmt: skip
        except (VideoDecodeError, OSError) as exc:
            return i, None, getattr(exc, "reason", None) or str(exc)


def iter_media(entries: list[dict], num_frames: int, img_size: int, num_workers: int = 0, max_seconds: float = 0.0):
    """Yields (i, entry i's uint8 media or None, why it is unreadable or None) in list order,
    decoded as in testing (from the first ``max_seconds`` of a video when > 0) in ``num_workers``
    processes (0: in this one)."""
    from umt_fast.data.dataset import init_worker

    yield from torch.utils.data.DataLoader(_Media(entries, num_frames, img_size, max_seconds), batch_size=None,
                                           num_workers=num_workers, worker_init_fn=init_worker if num_workers else None)


@dataclasses.dataclass
class MediaShard:
    """A list's media as one rank holds them (`load_shard`); in one process, all of them."""

    entries: list[dict]  # every readable entry of the list, in list order (on every rank)
    videos: list[torch.Tensor]  # this rank's share of their uint8 [T, S, S, 3] media
    positions: list[int]  # where each of `videos` sits in `entries`
    failed: list[tuple[str, str]]  # (path, reason) of every unreadable entry, in list order


def load_shard(entries: list[dict], num_frames: int, img_size: int, info=None, progress=None,
               num_workers: int = 0, max_seconds: float = 0.0) -> MediaShard:  # fmt: skip
    """Decodes, as in testing, the media of this rank's share of ``entries`` (`my_share`: every
    world_size-th entry from the rank's own; in one process, all), in ``num_workers`` processes
    (0: in this one), naming each unreadable one on stderr. Collective under torchrun: every rank
    learns which entries were readable."""
    info = info or DistInfo()
    mine = my_share(len(entries), info)
    readable, videos, failed = {}, [], {}
    media = iter_media([entries[i] for i in mine], num_frames, img_size, num_workers, max_seconds)
    for done, (j, item, reason) in enumerate(media, start=1):
        i = mine[j]
        if item is None:
            failed[i] = (entries[i]["path"], reason)
            print(f"unreadable {entries[i]['media']} skipped: {entries[i]['path']}: {reason}", file=sys.stderr, flush=True)
        else:
            readable[i] = True
            videos.append(item)
        if progress is not None:
            progress(done, len(mine))
    order = list(gather_by_index(readable, info))
    position = {i: p for p, i in enumerate(order)}
    return MediaShard([entries[i] for i in order], videos, [position[i] for i in mine if i in readable],
                      list(gather_by_index(failed, info).values()))  # fmt: skip


def load_entries(entries: list[dict], num_frames: int, img_size: int, progress=None, num_workers: int = 0,
                 max_seconds: float = 0.0):  # fmt: skip
    """(the readable entries, their uint8 media, [(path, reason)] of the unreadable ones), in list
    order; decoded in ``num_workers`` processes (0: in this one)."""
    shard = load_shard(entries, num_frames, img_size, progress=progress, num_workers=num_workers,
                       max_seconds=max_seconds)  # fmt: skip
    return shard.entries, shard.videos, shard.failed


def evaluate(model, tokenizer, entries: list[dict], *, num_frames: int, img_size: int, device, k: int = 128,
             max_len: int = 32, batch_size: int = 8, autocast_dtype=None, videos=None,
             positions: list[int] | None = None, info: DistInfo = DistInfo()) -> dict[str, dict[str, float]]:  # fmt: skip
    """Zero-shot retrieval over `entries` (read_caption_json's output): {"vtc": metrics, "vtm": metrics}.

    ``videos``: the entries' media, already loaded (`load_entries`); else loaded here. Under
    torchrun (``info``, collective): this rank's share of them, the entries at ``positions``
    (`load_shard`); each rank encodes its own videos and re-ranks their pairs, and every rank
    returns the metrics."""
    if videos is None:
        shard = load_shard(entries, num_frames, img_size, info)
        if shard.failed:
            raise ValueError(f"{len(shard.failed)} unreadable media, e.g. {shard.failed[0][0]}: {shard.failed[0][1]}")
        entries, videos, positions = shard.entries, shard.videos, shard.positions
    if not info.distributed:
        positions = None
    frames = {v.shape[0] for v in videos}
    if len(set().union(*all_gather_objects(frames)) if info.distributed else frames) != 1:
        raise ValueError("a retrieval list must hold one media type (all videos or all images)")
    captions = [c for e in entries for c in e["captions"]]
    text_to_video = [i for i, e in enumerate(entries) for _ in e["captions"]]
    model = model.to(device).eval()
    tokens, frame_feat = encode_videos(model, videos, device, batch_size, autocast_dtype)
    if info.distributed:  # every rank gets every video's frame embeddings (small: [Nv, T, E])
        own = {} if frame_feat is None else dict(zip(positions, frame_feat.cpu()))
        frame_feat = torch.stack(list(gather_by_index(own, info).values())).to(device)
    text_x, text_mask, text_feat = encode_texts(model, tokenizer, captions, device, max_len, autocast_dtype=autocast_dtype)
    sim = vtc_similarity(text_feat, frame_feat)
    t2v, v2t = vtm_rerank(model, sim, text_x, text_mask, tokens, k, autocast_dtype=autocast_dtype,
                          video_positions=positions)  # fmt: skip
    return {"vtc": retrieval_metrics(sim, text_to_video), "vtm": retrieval_metrics(t2v, text_to_video, v2t)}


# ----------------------------------------------------------------------------------- command line


RETRIEVAL_LIST_HELP = ("JSON list of {\"video\": path, \"caption\": str or [str]} (MSRVTT style); 'demo' = the sample "
                       "clips with their built-in captions")  # fmt: skip


def make_parser(prog: str = "python -m umt_fast.evaluate retrieval", *,
                description: str = "Zero-shot video-text retrieval (VTC, then VTM re-ranking).",
                test_list_help: str = RETRIEVAL_LIST_HELP, rerank: bool = True) -> argparse.ArgumentParser:  # fmt: skip
    """The options of an evaluation of a stage-2 model on a JSON test list (`prepare_inputs`
    reads them); ``rerank`` adds ``--k``."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--checkpoint", "--weights", dest="weights", required=True,
                   help="stage-2 weights: a reference-format file (e.g. <run_dir>/umt_stage2.pth), a stage-2 run "
                   "directory or one of its checkpoints (--weights is the older spelling)")
    p.add_argument("--text-weights", required=True, help="the local BERT folder used in training ('minilm' = the bundled MiniLM)")
    p.add_argument("--test-list", required=True, help=test_list_help)
    p.add_argument("--root", default="", help="directory relative media paths are resolved against")
    p.add_argument("--num-frames", type=int, default=None,
                   help="frames per video (middle of each segment); default: the run's (a run, or umt_stage2.pth "
                   "beside its config.yaml), else 4")
    p.add_argument("--img-size", type=int, default=None, help="input side in pixels; default: the run's, else 224")
    if rerank:
        p.add_argument("--k", type=int, default=128, help="candidates re-ranked by VTM per query; default 128")
        p.add_argument("--max-seconds", type=float, default=None,
                       help="read only each video's first this many seconds (the reference's DiDeMo trimmed30: 30); "
                       "default: the run's data.max_seconds, else 0 = the whole video")
    p.add_argument("--max-len", type=int, default=32, help="caption tokens; default 32")
    p.add_argument("--batch-size", type=int, default=8, help="videos per forward; default 8")
    p.add_argument("--num-workers", type=int, default=2, help="decoding worker processes (0 = in this one); default 2")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", "--output", dest="output", default="",
                   help="write the metrics as JSON here (--output is the older spelling)")
    return p


@dataclasses.dataclass
class Stage2Inputs:
    """A stage-2 model and a test list's decoded media, ready to score (`prepare_inputs`)."""

    model: torch.nn.Module  # in eval mode, on `device`
    tokenizer: object
    entries: list[dict]  # the readable entries, in list order
    videos: list[torch.Tensor]  # their uint8 [T, S, S, 3] media (under torchrun, this rank's share)
    failed: list[tuple[str, str]]  # (path, reason) of the unreadable ones
    num_frames: int
    img_size: int
    device: torch.device
    autocast_dtype: torch.dtype | None  # bf16 on a GPU, else None
    max_seconds: float = 0.0  # > 0: the videos were read from their first max_seconds
    positions: list[int] | None = None  # under torchrun: where each of `videos` sits in `entries`
    info: DistInfo = DistInfo()


def prepare_inputs(args: argparse.Namespace, read_list, write_demo=None) -> Stage2Inputs:
    """What `make_parser`'s options ask for: checks ``--out`` is writable, takes the input size
    from the options, else the run's, else 4 x 224, reads the list (``read_list(path, root)`` ->
    entries as `read_caption_json` gives them; ``--test-list demo``: the file ``write_demo(directory)``
    writes), loads the model, then decodes every entry's media
    with a progress line, skipping (and naming) the unreadable ones. Under torchrun each rank
    decodes its share (`load_shard`) and runs on its own GPU.

    Raises:
        ValueError, FileNotFoundError: a bad option, list or weights file (before any decoding),
            or a list none of whose media could be read.
    """
    from umt_fast.engine.checkpoint import check_writable

    if args.output:
        check_writable(args.output, "--out")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers={args.num_workers} must be >= 0")
    run_data = run_data_config(args.weights)
    num_frames, img_size = args.num_frames or run_data.get("num_frames") or 4, args.img_size or run_data.get("img_size") or 224
    max_seconds = getattr(args, "max_seconds", None)
    if max_seconds is None:  # only retrieval has the option; the others read whole videos unless the run trimmed them
        max_seconds = run_data.get("max_seconds") or 0.0
    if max_seconds < 0:
        raise ValueError(f"--max-seconds={max_seconds} must be >= 0 (0 = the whole video)")
    entries = read_list(demo_path(args.test_list, write_demo) if write_demo else args.test_list, args.root)
    model, tokenizer = load_stage2_model(args.weights, args.text_weights, num_frames, img_size)
    info = init_evaluation(args.device)
    shard = load_shard(entries, num_frames, img_size, info, progress_printer("read", info), args.num_workers, max_seconds)
    if not shard.entries:
        raise ValueError(f"{args.test_list}: none of its {len(shard.failed)} media could be read")
    dtype = torch.bfloat16 if info.device.type == "cuda" else None
    return Stage2Inputs(model.to(info.device).eval(), tokenizer, shard.entries, shard.videos, shard.failed, num_frames,
                        img_size, info.device, dtype, max_seconds, shard.positions if info.distributed else None, info)  # fmt: skip


def write_report(path: str, report: dict) -> None:
    """``report`` as indented JSON at ``path`` (written atomically), then a line saying so."""
    from umt_fast.engine.checkpoint import atomic_write

    atomic_write(path, lambda tmp: open(tmp, "w").write(json.dumps(report, indent=2)))
    print(f"wrote {path}")


def main(argv: list[str] | None = None, prog: str = "python -m umt_fast.evaluate retrieval") -> int:
    args = make_parser(prog).parse_args(argv)
    from umt_fast.data.captions import read_caption_json

    try:
        if args.k < 1:
            raise ValueError(f"--k={args.k} must be >= 1")
        run = prepare_inputs(args, read_caption_json, write_demo_retrieval_list)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = evaluate(run.model, run.tokenizer, run.entries, num_frames=run.num_frames, img_size=run.img_size,
                       device=run.device, k=args.k, max_len=args.max_len, batch_size=args.batch_size,
                       autocast_dtype=run.autocast_dtype, videos=run.videos, positions=run.positions,
                       info=run.info)  # fmt: skip
    if not run.info.is_main:  # the main rank reports; every rank holds the merged results
        return 0
    print(format_table(results))
    if run.failed:
        print(f"{len(run.failed)} unreadable media skipped (their captions too): the metrics are over the other "
              f"{len(run.entries)}", file=sys.stderr)  # fmt: skip
    if args.output:
        write_report(args.output, {"weights": args.weights, "test_list": args.test_list, "k": args.k,
                                   "num_frames": run.num_frames, "img_size": run.img_size,
                                   "max_seconds": run.max_seconds, **results,
                                   "unreadable": [{"path": p, "reason": r} for p, r in run.failed]})  # fmt: skip
    return 0


def write_demo_retrieval_list(directory: str) -> str:
    """``demo_videos.json`` in ``directory``: the sample clips and their built-in captions."""
    from umt_fast.data.captions import demo_video_entries

    path = os.path.join(directory, "demo_videos.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(demo_video_entries(), f, indent=1)
    return path


def run_data_config(weights: str) -> dict:
    """The ``data`` section of the run behind ``weights``: a run directory or checkpoint's config,
    or the config.yaml beside an exported umt_stage2.pth; {} when unknown."""
    from umt_fast.config.cli import load_config_dict

    path = os.path.abspath(weights)
    candidates = [os.path.join(path, "config.yaml"), os.path.join(os.path.dirname(os.path.dirname(path)), "config.yaml")] \
        if os.path.isdir(path) else [os.path.join(os.path.dirname(path), "config.yaml")]  # fmt: skip
    for candidate in candidates:
        if os.path.isfile(candidate):
            return load_config_dict(candidate).get("data") or {}
    return {}


def run_input_size(weights: str) -> tuple[int | None, int | None]:
    """(frames, size) the run behind ``weights`` trained at (`run_data_config`); (None, None) when unknown."""
    data = run_data_config(weights)
    return data.get("num_frames"), data.get("img_size")


if __name__ == "__main__":
    sys.exit(main())
