"""Open-ended video question answering with a fine-tuned QA model: ``python -m umt_fast.evaluate qa``.

    python -m umt_fast.evaluate qa --checkpoint umt_qa_msrvtt.pth --text-weights bert-base-uncased \\
        --test-list msrvtt_qa_test.json --answer-list msrvtt_qa_answer_list.json --root /data/msrvtt \\
        --num-frames 12 --img-size 224 --k 128 --out msrvtt_qa.json

As the reference evaluates MSRVTT-QA, MSVD-QA and ActivityNet-QA (tasks/vqa.py ``evaluation``,
tasks/vqa_utils.py ``eval_simple_qa_acc``):

  * the test list is the reference's JSON, a list of ``{"video": path, "question": str,
    "answer": str}`` (``question_id`` optional: the entry's index when absent); the answer list is
    a JSON list of the candidate answers (e.g. msrvtt_qa_answer_list.json);
  * a question is cleaned as the reference cleans captions and tokenized ``[CLS] q`` (no [SEP]) to
    ``--max-len`` tokens (25); every candidate answer is tokenized ``[CLS] a [SEP]`` (the
    reference appends its ``eos`` "[SEP]" to the answer, not cleaned) to ``--max-a-len`` tokens (5);
  * videos are encoded whole, the middle frame of each segment; each question's answer is
    ranked by `umt_fast.models.qa.VideoQAModel.rank_answer` with ``--k`` candidates (128);
  * the accuracy is exact string match of the chosen candidate with the annotated answer, in
    percent (the reference reports it rounded to 2 decimals). An ``"answer"`` that is a list of
    strings (VQA style) is right when the prediction is one of them, and when every entry has
    two or more, VQAEval's consensus accuracy (``vqa_acc``, `vqa_question_accuracy`) is reported too.

`normalise_answer` is VQAEval's normalisation of a predicted answer (contractions, punctuation,
number words to digits, articles dropped); ``acc_normalised`` is the match after normalising
both sides with it (a diagnostic, not the reference's number).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time

import torch

from umt_fast.engine.distributed import DistInfo, gather_by_index, my_share
from umt_fast.recipes.evaluation import demo_path
from umt_fast.recipes.retrieval import (
    init_evaluation,
    iter_media,
    make_parser,
    run_input_size,
    write_report,
)

# ----------------------------------------------------------------------------------- VQAEval

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
"""VQAEval's contraction table, as the reference has it (its "somebody'd" -> "somebodyd" included)."""
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# VQAEval's patterns as written: "(?!<=\d)" is a look-ahead (not the look-behind it reads as), so a
# period not followed by a digit goes; and its sub() passes re.UNICODE (32) as the count.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_COUNT = int(re.UNICODE)
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """VQAEval ``processPunctuation``: each mark is removed where the ORIGINAL text has it next to
    a space (or has a digit-comma-digit anywhere), else replaced by a space; then every period not
    followed by a digit is removed (at most 32)."""
    out = text
    strip_all = _DIGIT_COMMA.search(text) is not None
    for p in PUNCTUATION:
        out = out.replace(p, "") if (p + " " in text or " " + p in text or strip_all) else out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """VQAEval ``processDigitArticle``: lower-case, split on whitespace, number words -> digits,
    articles dropped, contractions restored, joined by single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalise_answer(text: str) -> str:
    """How VQAEval normalises a predicted answer: newlines and tabs to spaces, strip, then
    `process_punctuation`, then `process_digit_article`."""
    return process_digit_article(process_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def vqa_question_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """VQAEval's accuracy of one question, in [0, 1]: the prediction normalised (`normalise_answer`),
    the annotators' answers only through `process_punctuation` and only when they are not all the
    same; for each annotator, min(1, matches among the others / 3); the mean over annotators. (So a
    single annotated answer always scores 0: VQAEval is for VQA's 10 answers per question.)"""
    gts = [process_punctuation(a) for a in gt_answers] if len(set(gt_answers)) > 1 else list(gt_answers)
    pred = normalise_answer(prediction)
    scores = [min(1.0, sum(g == pred for g in gts[:i] + gts[i + 1:]) / 3) for i in range(len(gts))]
    return sum(scores) / len(scores)


def qa_accuracy(predictions: list[str], answers: list[str | list[str]]) -> dict[str, float | int]:
    """The reference's open-ended QA accuracy (``eval_simple_qa_acc``) and two more:

    ``acc``: percent of questions whose prediction equals its answer exactly (a list of answers:
    equals one of them), ``correct`` the count; ``acc_normalised``: the same after
    `normalise_answer` on both sides; ``vqa_acc`` (only when every question has a list of two or
    more answers): the mean `vqa_question_accuracy`, in percent."""
    if len(predictions) != len(answers) or not answers:
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions (need as many, >= 1)")
    lists = [[a] if isinstance(a, str) else list(a) for a in answers]
    correct = sum(p in gts for p, gts in zip(predictions, lists))
    normalised = sum(normalise_answer(p) in {normalise_answer(g) for g in gts} for p, gts in zip(predictions, lists))
    out = {"acc": 100.0 * correct / len(lists), "correct": correct, "acc_normalised": 100.0 * normalised / len(lists)}
    if all(not isinstance(a, str) and len(a) >= 2 for a in answers):
        out["vqa_acc"] = 100.0 * sum(vqa_question_accuracy(p, g) for p, g in zip(predictions, lists)) / len(lists)
    return out


# ----------------------------------------------------------------------------------- the lists

QA_LIST_HELP = ("the reference's QA JSON (MSRVTT-QA, MSVD-QA, ActivityNet-QA): a list of {\"video\": path, "
                "\"question\": str, \"answer\": str, \"question_id\" (optional)}; 'demo' = the sample clips with "
                "questions written for them")  # fmt: skip


def _read_json(path: str):
    from umt_fast.data.storage import is_url, read_all

    if not is_url(path) and not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    raw = read_all(path) if is_url(path) else open(path, "rb").read()
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON file ({exc})") from None


def _is_text(x) -> bool:
    return isinstance(x, str) and x.strip() != ""


def read_qa_json(path: str, root: str = "") -> list[dict]:
    """A QA test (or training) list as entries ``{"media": "video", "path", "question", "answer":
    str or [str], "question_id"}``, in file order.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: one line naming the file and the 0-based entry: not a JSON list, an entry that is
            not an object, no non-empty "video" or "question" string, or an "answer" that is not a
            non-empty string or a non-empty list of them.
    """
    data = _read_json(path)
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: a QA list must be a non-empty JSON list of {{\"video\", \"question\", \"answer\"}} objects")
    entries = []
    for i, item in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: must be an object with \"video\", \"question\" and \"answer\", got {item!r:.60}")
        for key in ("video", "question", "answer"):
            if key not in item:
                raise ValueError(f"{where}: missing \"{key}\"")
        if not _is_text(item["video"]):
            raise ValueError(f"{where}: \"video\" must be a non-empty path string, got {item['video']!r:.60}")
        if not _is_text(item["question"]):
            raise ValueError(f"{where}: \"question\" must be a non-empty string, got {item['question']!r:.60}")
        answer = item["answer"]
        if not (_is_text(answer) or (isinstance(answer, list) and answer and all(_is_text(a) for a in answer))):
            raise ValueError(f"{where}: \"answer\" must be a non-empty string or a non-empty list of them, got {answer!r:.60}")
        video = item["video"]
        entries.append({"media": "video", "path": os.path.join(root, video) if root else video,
                        "question": item["question"], "answer": answer,
                        "question_id": item.get("question_id", i)})  # fmt: skip
    return entries


def read_answer_list(path: str) -> list[str]:
    """The candidate answers: a non-empty JSON list of non-empty strings (e.g. the reference's
    msrvtt_qa_answer_list.json). A bad one: one line naming the file (and the entry)."""
    data = _read_json(path)
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: an answer list must be a non-empty JSON list of answer strings")
    for i, a in enumerate(data):
        if not _is_text(a):
            raise ValueError(f"{path}: entry {i}: an answer must be a non-empty string, got {a!r:.60}")
    return list(data)


# ----------------------------------------------------------------------------------- the model


def load_qa_model(weights: str, text_weights: str, num_frames: int, img_size: int, patch_size: int = 16):
    """A QA model from a file in the reference's UMT_QA naming (its fine-tuned ``ckpt_best.pth``,
    ``{"model": ...}`` or raw, or ours: ``{"model": to_reference_qa_state_dict(model)}``); the BERT
    config and the tokenizer from `text_weights` (the folder used in fine-tuning). The input size
    is not in the weights: `num_frames` x `img_size` (the sin-cos table is rebuilt for it).
    Returns (model in eval mode, tokenizer).

    Raises:
        ValueError: not a QA model (a stage-2 file is named as such: fine-tune it first), or a
            BERT folder that does not fit the weights.
    """
    from umt_fast.interop import _backbone_shape, read_state_dict, strip_prefix
    from umt_fast.models.qa import QAVisionEncoder, VideoQAModel, is_qa_state_dict, load_reference_qa_state_dict, qa_shapes
    from umt_fast.models.student import StudentArch
    from umt_fast.models.text import build_text_encoder, load_tokenizer
    from umt_fast.models.vl import is_stage2_state_dict

    sd = read_state_dict(weights, "QA weights")
    if not is_qa_state_dict(sd):
        if is_stage2_state_dict(sd):
            raise ValueError(f"{weights} is a stage-2 model without an answer decoder: fine-tune it for QA first "
                             "(umt_fast.models.qa.init_from_stage2 starts a QA model from it)")  # fmt: skip
        raise ValueError(f"{weights}: not a UMT video-QA model (no text_decoder.* keys; first keys: {list(sd)[:4]})")
    shapes = qa_shapes(sd)
    vision = strip_prefix({k: v for k, v in sd.items() if k.startswith("vision_encoder.encoder.")}, "vision_encoder.encoder.")
    width, depth, mlp_ratio = _backbone_shape(vision, patch_size)
    arch = StudentArch(width=width, depth=depth, heads=max(width // 64, 1), teacher_dim=width, return_layers=1,
                       num_frames=num_frames, img_size=img_size, patch_size=patch_size, mlp_ratio=mlp_ratio)  # fmt: skip
    text = build_text_encoder(text_weights, shapes["fusion_layers"], width, load=False)
    if (text.arch.num_layers, text.arch.hidden) != (shapes["text_layers"], shapes["text_width"]) \
            or shapes["decoder_layers"] != shapes["fusion_layers"]:  # fmt: skip
        raise ValueError(f"--text-weights {text_weights} is a {text.arch.num_layers}-layer BERT of width {text.arch.hidden}; "
                         f"the weights hold {shapes['text_layers']} layers of width {shapes['text_width']} "
                         f"({shapes['fusion_layers']} fused, a decoder of {shapes['decoder_layers']})")  # fmt: skip
    model = VideoQAModel(QAVisionEncoder(arch), text)
    load_reference_qa_state_dict(model, sd, weights)
    return model.eval(), load_tokenizer(text_weights)


# ----------------------------------------------------------------------------------- answering

EOS = "[SEP]"
"""The reference's ``eos``: appended to every answer (its tokenizer adds no [SEP])."""
MAX_Q_LEN, MAX_A_LEN, K_TEST = 25, 5, 128
"""The reference's max_q_len, max_a_len and evaluation.k_test (every QA config)."""


def tokenize_answers(tokenizer, answers: list[str], max_len: int = MAX_A_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLS] a [SEP]`` padded / cut to `max_len`, as the reference tokenizes ``a + " [SEP]"``
    (the answer not cleaned)."""
    from umt_fast.models.text import tokenize_captions

    return tokenize_captions(tokenizer, [f"{a} {EOS}" for a in answers], max_len, clean=False)


@torch.no_grad()
def answer_questions(model, tokenizer, video_BTHWC: torch.Tensor, questions: list[str], video_of_question: list[int],
                     answer_ids: torch.Tensor, answer_mask: torch.Tensor, *, k: int = K_TEST, max_q_len: int = MAX_Q_LEN,
                     autocast_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Each question's answer index and its probability among the ranked candidates.

    Args:
        video_BTHWC: uint8 videos, on the model's device.
        questions: Q strings; ``video_of_question[q]`` the index of its video.
        answer_ids, answer_mask: [A, Sa] the tokenized candidates (`tokenize_answers`), on the device.

    Returns:
        (int64 [Q] the chosen candidates, float32 [Q] their probability after re-ranking).
    """
    from umt_fast.data.transforms import normalize_video
    from umt_fast.models.text import tokenize_captions
    from umt_fast.recipes.retrieval import _autocast

    device = video_BTHWC.device
    ids, mask = tokenize_captions(tokenizer, questions, max_q_len)
    ids, mask = ids.to(device), mask.to(device)
    owner = torch.tensor(video_of_question, device=device)
    with _autocast(device, autocast_dtype):
        vision = model.encode_vision(normalize_video(video_BTHWC))
        states = model.encode_question(ids, mask, vision[owner])
        top_ids, probs = model.rank_answer(states, mask, answer_ids, answer_mask, k)
    best = probs.float().argmax(1, keepdim=True)
    return top_ids.gather(1, best)[:, 0].cpu(), probs.float().gather(1, best)[:, 0].cpu()


def format_qa_table(results: dict, questions: int) -> str:
    lines = [f"{'metric':<16} {'value':>8}", f"{'acc':<16} {results['acc']:>8.2f}   ({results['correct']}/{questions})",
             f"{'acc_normalised':<16} {results['acc_normalised']:>8.2f}"]  # fmt: skip
    if "vqa_acc" in results:
        lines.append(f"{'vqa_acc':<16} {results['vqa_acc']:>8.2f}")
    return "\n".join(lines)


@dataclasses.dataclass
class QAResult:
    predictions: list[dict]  # per answered question, in list order
    unreadable: list[tuple[str, str]]


def evaluate_qa(model, tokenizer, entries: list[dict], answer_list: list[str], *, num_frames: int, img_size: int,
                device, k: int = K_TEST, max_q_len: int = MAX_Q_LEN, max_a_len: int = MAX_A_LEN, batch_size: int = 8,
                autocast_dtype=None, num_workers: int = 0, info: DistInfo = DistInfo()) -> QAResult:  # fmt: skip
    """Answers every question of `entries` (`read_qa_json`), reading its videos `batch_size` at a
    time (each video once, however many questions it has; decoded in ``num_workers`` processes,
    0: in this one); an unreadable video's questions are
    skipped and the video listed. A model already on `device` is not moved (``Module.to`` would
    reshard an FSDP2 model that the caller unsharded for the evaluation). Under torchrun
    (``info``, collective) each rank answers the questions of its share of the videos
    (`my_share`), and every rank returns all the answers."""
    if any(p.device != torch.device(device) for p in model.parameters()):
        model = model.to(device)
    model.eval()
    answer_ids, answer_mask = (t.to(device) for t in tokenize_answers(tokenizer, answer_list, max_a_len))
    videos: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        videos.setdefault(e["path"], []).append(i)
    paths = list(videos)
    mine = my_share(len(paths), info)
    chosen: dict[int, tuple[int, float]] = {}
    failed: dict[int, tuple[str, str]] = {}
    start = time.perf_counter()

    def answer(batch: list[tuple[int, torch.Tensor]]) -> None:
        qs = [q for j, _ in batch for q in videos[paths[j]]]
        owner = [n for n, (j, _) in enumerate(batch) for _ in videos[paths[j]]]
        idx, prob = answer_questions(model, tokenizer, torch.stack([m for _, m in batch]).to(device),
                                     [entries[q]["question"] for q in qs], owner, answer_ids, answer_mask, k=k,
                                     max_q_len=max_q_len, autocast_dtype=autocast_dtype)  # fmt: skip
        chosen.update({q: (int(a), float(p)) for q, a, p in zip(qs, idx, prob)})

    batch: list[tuple[int, torch.Tensor]] = []
    media = iter_media([{"media": "video", "path": paths[j]} for j in mine], num_frames, img_size, num_workers)
    share = f" (this rank's share of {info.world_size})" if info.distributed else ""
    for done, (n, item, reason) in enumerate(media, start=1):
        j = mine[n]
        if item is None:
            failed[j] = (paths[j], reason)
            print(f"unreadable video skipped: {paths[j]}: {reason}", file=sys.stderr, flush=True)
        else:
            batch.append((j, item))
        if len(batch) == batch_size or (done == len(mine) and batch):
            answer(batch)
            batch = []
        if info.is_main and (done % batch_size == 0 or done == len(mine)):
            rate = done / max(time.perf_counter() - start, 1e-9)
            print(f"answered {len(chosen)} questions of {done}/{len(mine)} videos{share} | {rate:.1f} videos/s",
                  file=sys.stderr, flush=True)  # fmt: skip
    chosen = gather_by_index(chosen, info)
    predictions = [{"question_id": entries[q]["question_id"], "video": entries[q]["path"], "question": entries[q]["question"],
                    "answer": entries[q]["answer"], "prediction": answer_list[a], "score": score}
                   for q, (a, score) in chosen.items()]  # fmt: skip
    return QAResult(predictions, list(gather_by_index(failed, info).values()))


def write_demo_qa_lists(directory: str) -> tuple[str, str]:
    """Write ``demo_qa.json`` (the sample clips with `DEMO_QA`'s questions) and ``demo_answers.json``
    (their distinct answers, in order of first appearance) into `directory`; returns their paths."""
    from umt_fast.config.qa import DEMO_QA
    from umt_fast.data.sample_clips import sample_clip_paths

    os.makedirs(directory, exist_ok=True)
    entries = [{"video": p, "question": q, "answer": a} for p in sample_clip_paths()
               for q, a in DEMO_QA[os.path.basename(p)]]  # fmt: skip
    answers = list(dict.fromkeys(a for e in entries for a in ([e["answer"]] if isinstance(e["answer"], str) else e["answer"])))
    paths = (os.path.join(directory, "demo_qa.json"), os.path.join(directory, "demo_answers.json"))
    for path, data in zip(paths, (entries, answers)):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
    return paths


# ----------------------------------------------------------------------------------- command line


def _reword(parser, dest: str, help: str, default=None) -> None:
    for action in parser._actions:
        if action.dest == dest:
            action.help = help
            if default is not None:
                action.default = default


def build_parser(prog: str = "python -m umt_fast.evaluate qa"):
    p = make_parser(prog, description="Open-ended video question answering (MSRVTT-QA, MSVD-QA, ActivityNet-QA): "
                    "each question's answer ranked from an answer list by a fine-tuned QA model, and the accuracy.",
                    test_list_help=QA_LIST_HELP, rerank=False)  # fmt: skip
    _reword(p, "weights", "QA weights in the reference's UMT_QA naming: its fine-tuned file (ckpt_best.pth) or ours "
            "({'model': to_reference_qa_state_dict(model)}); --weights is the older spelling")  # fmt: skip
    _reword(p, "max_len", f"question tokens ([CLS] included); default {MAX_Q_LEN}", MAX_Q_LEN)
    _reword(p, "num_frames", "frames per video (middle of each segment); default: the run's (a config.yaml beside the "
            "file), else 12 (the reference's QA recipes)")  # fmt: skip
    p.add_argument("--answer-list", required=True, help="JSON list of the candidate answers (e.g. "
                   "msrvtt_qa_answer_list.json); 'demo' = the demo questions' answers")  # fmt: skip
    p.add_argument("--k", type=int, default=K_TEST, help=f"candidates ranked by their whole sequence per question; default {K_TEST}")
    p.add_argument("--max-a-len", type=int, default=MAX_A_LEN, help=f"answer tokens ([CLS] and [SEP] included); default {MAX_A_LEN}")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m umt_fast.evaluate qa") -> int:
    args = build_parser(prog).parse_args(argv)
    from umt_fast.engine.checkpoint import check_writable

    try:
        if args.k < 1:
            raise ValueError(f"--k={args.k} must be >= 1")
        if args.num_workers < 0:
            raise ValueError(f"--num-workers={args.num_workers} must be >= 0")
        if args.max_len < 2 or args.max_a_len < 3:
            raise ValueError("--max-len must be >= 2 and --max-a-len >= 3 ([CLS], a token, [SEP])")
        if args.output:
            check_writable(args.output, "--out")
        entries = read_qa_json(demo_path(args.test_list, lambda d: write_demo_qa_lists(d)[0]), args.root)
        answer_list = read_answer_list(demo_path(args.answer_list, lambda d: write_demo_qa_lists(d)[1]))
        run_frames, run_size = run_input_size(args.weights)
        num_frames, img_size = args.num_frames or run_frames or 12, args.img_size or run_size or 224
        model, tokenizer = load_qa_model(args.weights, args.text_weights, num_frames, img_size)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info = init_evaluation(args.device)
    device, dtype = info.device, torch.bfloat16 if info.device.type == "cuda" else None
    result = evaluate_qa(model, tokenizer, entries, answer_list, num_frames=num_frames, img_size=img_size, device=device,
                         k=args.k, max_q_len=args.max_len, max_a_len=args.max_a_len, batch_size=args.batch_size,
                         autocast_dtype=dtype, num_workers=args.num_workers, info=info)  # fmt: skip
    if not info.is_main:  # the main rank reports; every rank holds the merged results
        return 0
    if not result.predictions:
        print(f"error: {args.test_list}: none of its {len(result.unreadable)} videos could be read", file=sys.stderr)
        return 2
    preds = result.predictions
    metrics = qa_accuracy([p["prediction"] for p in preds], [p["answer"] for p in preds])
    print(format_qa_table(metrics, len(preds)))
    if result.unreadable:
        skipped = len(entries) - len(preds)
        print(f"{len(result.unreadable)} unreadable video(s) skipped with their {skipped} question(s): the accuracy is over "
              f"the other {len(preds)}", file=sys.stderr)  # fmt: skip
    if args.output:
        write_report(args.output, {
            "weights": args.weights, "test_list": args.test_list, "answer_list": args.answer_list, "k": args.k,
            "num_frames": num_frames, "img_size": img_size, "questions": len(preds),
            "videos": len({p["video"] for p in preds}), "answers": len(answer_list), **metrics,
            "predictions": preds, "unreadable": [{"path": p, "reason": r} for p, r in result.unreadable],
        })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
