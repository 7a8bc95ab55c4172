"""`python -m umt_fast.evaluate mc`: multiple-choice video-text retrieval (MSRVTT-MC). The three
choice rules on hand-made scores, the ensemble against the reference's rule restated in
tests/umt_reference.py, the command end to end on a tiny random stage-2 model and the sample
clips, and malformed lists refused in one line."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tests import umt_reference as ref
from umt_fast.recipes.retrieval_mc import mc_accuracy, mc_choices, method_scores, pad_candidates

NUM_FRAMES, IMG_SIZE = 2, 32


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _two_logits(p: float, offset: float = 0.0) -> list[float]:
    """VTM logits [no-match, match] whose match probability is p, both shifted by `offset`."""
    return [offset, offset + _logit(p)]


# Three videos; video 1 has 2 candidates, its third slot is padding (scores there must be ignored).
SIM = torch.tensor([[0.30, 0.20, 0.10],
                    [0.50, 0.60, 9.90],
                    [0.10, 0.20, 0.35]])  # fmt: skip
VALID = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
# Match probabilities [0.10, 0.60, 0.62] for video 0, with candidate 0's logits shifted so that its
# raw match logit (0.803) is the largest: the choice must follow the probability, not that logit.
LOGITS = torch.tensor([[_two_logits(0.10, 3.0), _two_logits(0.60), _two_logits(0.62)],
                       [_two_logits(0.90), _two_logits(0.20), _two_logits(0.999)],
                       [_two_logits(0.30), _two_logits(0.30), _two_logits(0.80)]])  # fmt: skip
ANSWERS = torch.tensor([1, 0, 2])


def test_each_method_chooses_as_worked_out_by_hand():
    """By hand, temperature 0.1:
    video 0: VTC picks 0 (0.30). VTM picks 2 (0.62). softmax([3, 2, 1]) = [0.6652, 0.2447, 0.0900];
      ensemble = 0.7 * [0.10, 0.60, 0.62] + 0.3 * that = [0.2696, 0.4934, 0.4610]: picks 1.
    video 1 (2 candidates): VTC picks 1 (0.60). VTM picks 0 (0.90). softmax([5, 6]) = [0.2689, 0.7311];
      ensemble = [0.6300 + 0.0807, 0.1400 + 0.2193] = [0.7107, 0.3593]: picks 0.
    video 2: VTC 2, VTM 2; softmax([1, 2, 3.5]) = [0.0629, 0.1710, 0.7662]; ensemble = [0.2289,
      0.2613, 0.7899]: picks 2.
    Answers [1, 0, 2]: VTC 1/3, VTM 2/3, ensemble 3/3."""
    scores = method_scores(SIM, LOGITS, 0.1, VALID)
    choices = mc_choices(scores)
    assert choices["vtc"].tolist() == [0, 1, 2]
    assert choices["vtm"].tolist() == [2, 0, 2]
    assert choices["ensemble"].tolist() == [1, 0, 2]
    assert scores["ensemble"][0].tolist() == pytest.approx([0.2696, 0.4934, 0.4610], abs=1e-4)
    assert scores["ensemble"][1, :2].tolist() == pytest.approx([0.7107, 0.3593], abs=1e-4)
    assert all(s[1, 2] == float("-inf") for s in scores.values())  # the padding slot
    acc = mc_accuracy(choices, ANSWERS)
    assert acc == {"vtc": {"acc": pytest.approx(100 / 3), "correct": 1},
                   "vtm": {"acc": pytest.approx(200 / 3), "correct": 2},
                   "ensemble": {"acc": 100.0, "correct": 3}}  # fmt: skip


def test_the_ensemble_depends_on_the_temperature():
    """Temperature 1, video 0: softmax([0.3, 0.2, 0.1]) = [0.3672, 0.3322, 0.3006]; ensemble =
    [0.1802, 0.5197, 0.5242]: picks 2 (at 0.1 it picks 1). VTC and VTM do not change."""
    choices = mc_choices(method_scores(SIM, LOGITS, 1.0, VALID))
    assert choices["ensemble"][0] == 2
    assert choices["vtc"].tolist() == [0, 1, 2] and choices["vtm"].tolist() == [2, 0, 2]


def test_equal_scores_choose_the_first_candidate_and_padding_is_laid_out_per_video():
    sim, valid = pad_candidates(torch.tensor([0.25, 0.5, 0.5, 0.125, 0.75, 0.75]), [3, 1, 2])
    assert sim.tolist() == [[0.25, 0.5, 0.5], [0.125, 0.0, 0.0], [0.75, 0.75, 0.0]]
    assert valid.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    logits = torch.zeros(3, 3, 2)  # every match probability 0.5
    choices = mc_choices(method_scores(sim, logits, 0.07, valid))
    assert choices["vtc"].tolist() == [1, 0, 0]
    assert choices["vtm"].tolist() == [0, 0, 0]
    assert choices["ensemble"].tolist() == [1, 0, 0]


# ----------------------------------------------------------------------------------- a tiny model


@pytest.fixture(scope="module")
def tiny_stage2(tmp_path_factory):
    """A random stage-2 model (2-block student of width 192, 2-layer MiniLM-shaped BERT with one
    fusion layer), saved in the reference's format, with a temperature of 0.05."""
    from umt_fast.models.student import SparseVideoStudent, StudentArch
    from umt_fast.models.text import build_text_encoder
    from umt_fast.models.vl import HEAD_NORM_EPS, VisionLanguageModel, to_reference_state_dict

    torch.manual_seed(0)
    arch = StudentArch(width=192, depth=2, heads=3, teacher_dim=24, return_layers=2, num_frames=NUM_FRAMES,
                       img_size=IMG_SIZE, head_norm_eps=HEAD_NORM_EPS)  # fmt: skip
    model = VisionLanguageModel(SparseVideoStudent(arch), build_text_encoder("minilm", 1, 192, load=False), 16)
    with torch.no_grad():
        model.temp.fill_(0.05)
    path = tmp_path_factory.mktemp("mc") / "umt_stage2.pth"
    torch.save({"model": to_reference_state_dict(model)}, path)
    return path


def test_the_ensemble_equals_the_reference_rule_on_a_tiny_model(tiny_stage2):
    from umt_fast.data.transforms import normalize_video
    from umt_fast.models.text import tokenize_captions
    from umt_fast.recipes.retrieval import load_stage2_model
    from umt_fast.recipes.retrieval_mc import mc_scores

    model, tokenizer = load_stage2_model(str(tiny_stage2), "minilm", NUM_FRAMES, IMG_SIZE)
    g = torch.Generator().manual_seed(3)
    videos = [torch.randint(0, 256, (NUM_FRAMES, IMG_SIZE, IMG_SIZE, 3), dtype=torch.uint8, generator=g) for _ in range(3)]
    words = "a dog runs on the grass a man plays guitar two cats sleep on a red sofa people dance".split()
    candidates = [[" ".join(words[i:i + 4]) for i in range(5 * v, 5 * v + 5)] for v in range(3)]
    ours = mc_scores(model, tokenizer, videos, candidates, torch.device("cpu"), batch_size=2)

    with torch.no_grad():
        tokens, _ = model.encode_vision_test(normalize_video(torch.stack(videos)))
        B, P = len(videos), model.student.arch.patches_per_frame
        pooled_image = model.pool_norm(tokens.view(B, NUM_FRAMES, P, -1).mean(2))  # [b, t, c]
        ids, mask = tokenize_captions(tokenizer, [c for cs in candidates for c in cs], 32)
        text = model.text_encoder.forward_text(ids, mask)
        itm = model.match_logits(text, mask, tokens.repeat_interleave(5, 0))  # the video tiled per option
        want, want_pred = ref.reference_mc_answers(model.vision_proj, model.text_proj, model.temp.reshape(()),
                                                   pooled_image, text[:, 0], itm, 5)  # fmt: skip
    assert torch.allclose(ours["ensemble"], want, atol=1e-5)
    assert mc_choices(ours)["ensemble"].tolist() == want_pred.tolist()
    assert ours["vtm"].std() > 1e-3 and ours["vtc"].std() > 1e-3  # both terms of the mix vary


def _clip_entries():
    from umt_fast.data import sample_clip_paths

    clips = sample_clip_paths()
    options = [["a rabbit in the grass", "bikes on a road", "a man on the phone", "a red car", "two dogs"],
               ["a man on the phone", "people walking", "a rabbit"],
               ["bikes on a road", "a cat", "a bird flies", "a boat", "a cake"],
               ["a red car", "a rabbit eats"]]  # fmt: skip
    answers = [0, 2, 0, 1]
    return clips, [{"video": c, "caption": o, "answer": a} for c, o, a in zip(clips, options, answers)]


def test_evaluate_mc_end_to_end_on_the_sample_clips(tiny_stage2, tmp_path, capsys):
    """The report: every method's accuracy in percent and its count agree with its per-video choices;
    the VTC choices equal the argmax worked out from the model's own embeddings; the missing video
    is skipped and listed."""
    from umt_fast.data.captions import load_media
    from umt_fast.data.transforms import normalize_video
    from umt_fast.evaluate import main as evaluate_main
    from umt_fast.models.text import tokenize_captions
    from umt_fast.recipes.retrieval import load_stage2_model

    clips, entries = _clip_entries()
    missing = str(tmp_path / "missing.mp4")
    listing = tmp_path / "mc_test.json"
    listing.write_text(json.dumps(entries[:2] + [{"video": missing, "caption": ["x", "y"], "answer": 1}] + entries[2:]))
    out = tmp_path / "mc.json"
    assert evaluate_main(["mc", "--checkpoint", str(tiny_stage2), "--text-weights", "minilm", "--test-list", str(listing),
                          "--num-frames", str(NUM_FRAMES), "--img-size", str(IMG_SIZE), "--out", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    captured = capsys.readouterr()
    assert report["videos"] == 4 and report["candidates"] == 5 + 3 + 5 + 2
    assert (report["num_frames"], report["img_size"]) == (NUM_FRAMES, IMG_SIZE)
    assert [u["path"] for u in report["unreadable"]] == [missing]
    assert "unreadable video skipped" in captured.err and "1 unreadable video(s) skipped" in captured.err
    preds = report["predictions"]
    assert [p["video"] for p in preds] == clips and [p["answer"] for p in preds] == [0, 2, 0, 1]
    for method in ("vtc", "vtm", "ensemble"):
        correct = sum(p[method] == p["answer"] for p in preds)
        assert report[method]["correct"] == correct
        assert 0.0 <= report[method]["acc"] <= 100.0
        assert report[method]["acc"] == pytest.approx(100.0 * correct / 4)
        assert all(0 <= p[method] < len(e["caption"]) for p, e in zip(preds, entries))
        assert method in captured.out
    assert "accuracy" in captured.out and f"wrote {out}" in captured.out

    model, tokenizer = load_stage2_model(str(tiny_stage2), "minilm", NUM_FRAMES, IMG_SIZE)
    with torch.no_grad():
        videos = torch.stack([load_media(c, "video", NUM_FRAMES, IMG_SIZE, rng=None) for c in clips])
        frames = model.encode_vision_test(normalize_video(videos))[1]  # [V, T, E] unit vectors
        want = []
        for v, e in enumerate(entries):
            ids, mask = tokenize_captions(tokenizer, e["caption"], 32)
            text = F.normalize(model.text_proj(model.text_encoder.forward_text(ids, mask)[:, 0]), dim=-1)
            want.append(int((text @ frames[v].T).mean(1).argmax()))
    assert [p["vtc"] for p in preds] == want


@pytest.mark.parametrize("bad, message", [
    ({"answer": 5}, "entry 1: \"answer\" must be a candidate's index, an integer in [0, 5) for its 5 captions, got 5"),
    ({"answer": -1}, "entry 1: \"answer\" must be a candidate's index"),
    ({"answer": "1"}, "entry 1: \"answer\" must be a candidate's index"),
    ({"answer": True}, "entry 1: \"answer\" must be a candidate's index"),
    ({"answer": None}, "entry 1: \"answer\" must be a candidate's index"),
    ({"caption": []}, "entry 1: \"caption\" must be a non-empty"),
    ({"caption": ["a dog", ""]}, "entry 1: \"caption\" must be a non-empty"),
    ({"caption": "a dog"}, "entry 1: \"caption\" must be a list of candidate captions"),
    ({"caption": None}, "entry 1: missing \"caption\""),
    ({"answer": None, "drop": True}, "entry 1: missing \"answer\""),
    ({"video": None}, "entry 1: needs exactly one of \"video\" or \"image\""),
    ({"video": None, "image": "a.jpg"}, "entry 1: a multiple-choice entry needs \"video\", not \"image\""),
])  # fmt: skip
def test_a_malformed_entry_is_refused_in_one_line_before_any_work(bad, message, tmp_path, capsys):
    from umt_fast.evaluate import main as evaluate_main

    _, entries = _clip_entries()
    entry = dict(entries[0])
    drop = bad.pop("drop", False)
    for key, value in bad.items():
        if value is None and (drop or key != "answer"):
            entry.pop(key)
        else:
            entry[key] = value
    listing = tmp_path / "mc_test.json"
    listing.write_text(json.dumps([entries[1], entry, entries[2]]))
    weights = tmp_path / "not_there.pth"  # the list is checked before the weights are read
    rc = evaluate_main(["mc", "--checkpoint", str(weights), "--text-weights", "minilm", "--test-list", str(listing)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith(f"error: {listing}: ") and message in err, err


def test_evaluate_dispatches_mc(capsys):
    from umt_fast.evaluate import main as evaluate_main

    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["mc", "--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "python -m umt_fast.evaluate mc" in text and "Multiple-choice" in text and "\"answer\"" in text
    assert "--k" not in text and "--test-list" in text and "--out" in text
