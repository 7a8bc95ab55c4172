"""Multiple-choice video-text retrieval (MSRVTT-MC) with a stage-2 model:
``python -m umt_fast.evaluate mc``.

    python -m umt_fast.evaluate mc --checkpoint runs/umt_b16_5m/umt_stage2.pth --text-weights bert-base-uncased \\
        --test-list msrvtt_mc_test.json --root /data/msrvtt --out msrvtt_mc.json

The test list is the reference's MSRVTT-MC JSON: a list of ``{"video": path, "caption": [the
candidate captions], "answer": the index of the right one}`` (5 candidates in MSRVTT-MC; any
number >= 1 here, and it may differ between videos). Each video picks one of its candidates by
three scores, and the accuracy of each is reported:

  * ``vtc``: the VTC similarity, as retrieval computes it (the mean over frames of the per-frame
    cosine of the video's frame embeddings and the caption's embedding);
  * ``vtm``: the VTM head's match probability, softmax over its two logits, index 1 (the
    reference's MC score; retrieval's re-ranking uses the match logit alone);
  * ``ensemble``: the reference's rule (``tasks/retrieval_mc.py``), per video and candidate n:
    ``0.7 * vtm_n + 0.3 * softmax_n(vtc / temp)``, the softmax over the video's candidates and
    ``temp`` the model's learnt temperature (clamped to [0.001, 0.5], as in training).

The choice is the argmax of the score over the video's candidates; among equal scores, the first
candidate (as torch's ``max`` / ``argmax`` pick). Videos are encoded whole (no masking), the
middle frame of each segment; captions are cleaned and tokenized as retrieval does.
Accuracies are in percent, like the reference's ``acc``.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from umt_fast.engine.distributed import gather_by_index
from umt_fast.recipes.retrieval import (
    encode_texts,
    encode_videos,
    make_parser,
    prepare_inputs,
    vtm_pair_logits,
    write_report,
)

METHODS = ("vtc", "vtm", "ensemble")
VTM_WEIGHT, VTC_WEIGHT = 0.7, 0.3
"""The reference's ensemble weights: the match probability's, the VTC softmax's."""

MC_LIST_HELP = ("the reference's MSRVTT-MC JSON: a list of {\"video\": path, \"caption\": [candidate captions], "
                "\"answer\": index of the right one}; 'demo' = the sample clips, each with every clip's first "
                "built-in caption as its candidates")  # fmt: skip


# ----------------------------------------------------------------------------------- the list


def read_mc_json(path: str, root: str = "") -> list[dict]:
    """A multiple-choice list as entries ``{"media": "video", "path", "captions": [candidates],
    "answer": int}``, in file order.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: one line naming the file and the 0-based entry: not a JSON list, no "video"
            (or an "image" entry), no "caption" list of non-empty strings, no "answer", or an
            answer that is not an integer index into the entry's candidates.
    """
    from umt_fast.data.captions import read_caption_json
    from umt_fast.data.storage import is_url, read_all

    entries = read_caption_json(path, root)  # the file, its JSON and every entry's path and caption strings
    if is_url(path):
        raw = read_all(path)
    else:
        with open(path, "rb") as f:
            raw = f.read()
    parsed = json.loads(raw.decode("utf-8-sig"))
    if not isinstance(parsed, list) or len(parsed) != len(entries):
        raise ValueError(f"{path}: a multiple-choice list must be a JSON list of {{\"video\", \"caption\", \"answer\"}} "
                         "objects")  # fmt: skip
    for i, (item, entry) in enumerate(zip(parsed, entries)):
        where = f"{path}: entry {i}"
        if entry["media"] != "video":
            raise ValueError(f"{where}: a multiple-choice entry needs \"video\", not \"{entry['media']}\"")
        if not isinstance(item["caption"], list):
            raise ValueError(f"{where}: \"caption\" must be a list of candidate captions, got {item['caption']!r:.80}")
        if "answer" not in item:
            raise ValueError(f"{where}: missing \"answer\" (the index of the right caption)")
        answer, n = item["answer"], len(entry["captions"])
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < n:
            raise ValueError(f"{where}: \"answer\" must be a candidate's index, an integer in [0, {n}) for its "
                             f"{n} captions, got {answer!r:.40}")  # fmt: skip
        entry["answer"] = answer
    return entries


# ----------------------------------------------------------------------------------- scoring


def pad_candidates(values_P: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair values [P, ...] (video-major, ``counts[v]`` candidates of video v) -> ([V, Nmax, ...]
    zero-padded, valid [V, Nmax] bool)."""
    padded = pad_sequence(list(torch.split(values_P, counts)), batch_first=True)
    valid = torch.arange(padded.shape[1], device=values_P.device) < torch.tensor(counts, device=values_P.device)[:, None]
    return padded, valid


def method_scores(sim_VN: torch.Tensor, vtm_logits_VN2: torch.Tensor, temp: float,
                  valid_VN: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Each method's score of every candidate: {"vtc", "vtm", "ensemble"} -> [V, N] float32,
    -inf on padding.

    Args:
        sim_VN: the VTC similarity of video v and its candidate n.
        vtm_logits_VN2: the VTM head's two logits of the pair (index 1 = match).
        temp: the VTC temperature (> 0).
        valid_VN: which candidates exist (default: all).
    """
    sim = sim_VN.float()
    valid = torch.ones_like(sim, dtype=torch.bool) if valid_VN is None else valid_VN
    vtc = sim.masked_fill(~valid, float("-inf"))
    vtm = F.softmax(vtm_logits_VN2.float(), dim=-1)[..., 1]
    ensemble = VTM_WEIGHT * vtm + VTC_WEIGHT * F.softmax(vtc / temp, dim=1)
    return {"vtc": vtc, "vtm": vtm.masked_fill(~valid, float("-inf")), "ensemble": ensemble.masked_fill(~valid, float("-inf"))}


def mc_choices(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each method's chosen candidate per video, int64 [V]: the argmax, the first among equals."""
    return {m: s.argmax(dim=1) for m, s in scores.items()}


def mc_accuracy(choices: dict[str, torch.Tensor], answers_V: torch.Tensor) -> dict[str, dict[str, float]]:
    """{method: {"acc": percent of videos whose choice is the answer, "correct": count}}."""
    out = {}
    for m, chosen in choices.items():
        correct = int((chosen.cpu() == answers_V.cpu()).sum())
        out[m] = {"acc": 100.0 * correct / len(answers_V), "correct": correct}
    return out


@torch.no_grad()
def mc_scores(model, tokenizer, videos: list[torch.Tensor], candidates: list[list[str]], device, *, batch_size: int = 8,
              max_len: int = 32, autocast_dtype=None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Every method's [V, Nmax] scores (`method_scores`) of each video's candidate captions.

    Args:
        videos: uint8 [T, H, W, 3] each, the same T.
        candidates: per video, its candidate captions (>= 1 each).
    """
    from umt_fast.losses.vl import clamp_temperature

    model = model.to(device).eval()
    counts = [len(c) for c in candidates]
    tokens, frame_feat = encode_videos(model, videos, device, batch_size, autocast_dtype)
    text_x, text_mask, text_feat = encode_texts(model, tokenizer, [c for cs in candidates for c in cs], device, max_len,
                                                autocast_dtype=autocast_dtype)  # fmt: skip
    owner = torch.repeat_interleave(torch.arange(len(videos), device=device), torch.tensor(counts, device=device))
    # the VTC similarity of each (caption, its video): the mean over frames of the per-frame cosine
    sim_P = torch.einsum("pe,pfe->pf", text_feat.float(), frame_feat[owner].float()).mean(-1)
    logits_P2 = vtm_pair_logits(model, text_x, text_mask, tokens, torch.arange(len(owner), device=device), owner,
                                autocast_dtype=autocast_dtype)  # fmt: skip
    sim, valid = pad_candidates(sim_P, counts)
    logits, _ = pad_candidates(logits_P2, counts)
    return method_scores(sim, logits, float(clamp_temperature(model.temp.detach().float())), valid)


def format_mc_table(results: dict[str, dict[str, float]], videos: int) -> str:
    lines = [f"{'scores':<9} {'accuracy':>8} {'correct':>9}"]
    for m in METHODS:
        lines.append(f"{m:<9} {results[m]['acc']:>8.2f} {results[m]['correct']:>5}/{videos}")
    return "\n".join(lines)


def write_demo_mc_list(directory: str) -> str:
    """``demo_mc.json`` in ``directory``: each sample clip with the first built-in caption of every
    clip as its candidates, its own the answer."""
    from umt_fast.data.captions import demo_video_entries

    clips = demo_video_entries()
    candidates = [e["caption"][0] for e in clips]
    path = os.path.join(directory, "demo_mc.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump([{"video": e["video"], "caption": candidates, "answer": i} for i, e in enumerate(clips)], f, indent=1)
    return path


# ----------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None, prog: str = "python -m umt_fast.evaluate mc") -> int:
    args = make_parser(prog, description="Multiple-choice video-text retrieval (MSRVTT-MC): each video's choice "
                       "among its candidate captions by VTC, by VTM and by the reference's ensemble of both.",
                       test_list_help=MC_LIST_HELP, rerank=False).parse_args(argv)  # fmt: skip
    try:
        run = prepare_inputs(args, read_mc_json, write_demo_mc_list)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    positions = run.positions if run.positions is not None else list(range(len(run.entries)))
    own = {}  # position -> {method: its chosen candidate}, for this rank's videos
    if positions:
        scores = mc_scores(run.model, run.tokenizer, run.videos, [run.entries[p]["captions"] for p in positions],
                           run.device, batch_size=args.batch_size, max_len=args.max_len,
                           autocast_dtype=run.autocast_dtype)  # fmt: skip
        chosen = {m: c.cpu().tolist() for m, c in mc_choices(scores).items()}
        own = {p: {m: chosen[m][j] for m in METHODS} for j, p in enumerate(positions)}
    merged = gather_by_index(own, run.info)
    if not run.info.is_main:  # the main rank reports; every rank holds the merged results
        return 0
    choices = {m: torch.tensor([merged[p][m] for p in range(len(run.entries))]) for m in METHODS}
    answers = torch.tensor([e["answer"] for e in run.entries])
    results = mc_accuracy(choices, answers)
    print(format_mc_table(results, len(run.entries)))
    if run.failed:
        print(f"{len(run.failed)} unreadable video(s) skipped: the accuracies are over the other {len(run.entries)}",
              file=sys.stderr)  # fmt: skip
    if args.output:
        predictions = [{"video": e["path"], "answer": e["answer"], **{m: int(choices[m][i]) for m in METHODS}}
                       for i, e in enumerate(run.entries)]  # fmt: skip
        write_report(args.output, {
            "weights": args.weights, "test_list": args.test_list, "num_frames": run.num_frames,
            "img_size": run.img_size, "videos": len(run.entries), "candidates": sum(len(e["captions"]) for e in run.entries),
            **results, "predictions": predictions, "unreadable": [{"path": p, "reason": r} for p, r in run.failed],
        })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
