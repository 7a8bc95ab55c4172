"""Video question answering: the QA model against the restatement of the reference's UMT_QA in
tests/umt_reference.py (question states, decoder logits, the weighted training loss, the ranked
answers and their scores, float64, from the same reference-named weights), the reference's
checkpoint naming and its fine-tuning start from stage 2, VQAEval's normalisation and the
accuracies on hand-worked cases, and `python -m umt_fast.evaluate qa` end to end on the sample clips."""
import json
import os

import pytest
import torch

from tests import umt_reference as ref
from tests.tiny_text import write_bert_folder
from umt_fast.models.qa import (
    QAVisionEncoder,
    VideoQAModel,
    init_from_stage2,
    load_reference_qa_state_dict,
    qa_state_dict_from_stage2,
    to_reference_qa_state_dict,
)
from umt_fast.models.student import StudentArch
from umt_fast.models.text import build_text_encoder, load_tokenizer, tokenize_captions
from umt_fast.recipes import qa as qa_recipe

WIDTH, HIDDEN, TEXT_LAYERS, FUSION, TEXT_HEADS, VOCAB, MAX_POS = 64, 64, 3, 2, 2, 30522, 40
NUM_FRAMES, IMG_SIZE = 2, 32
ARCH = StudentArch(width=WIDTH, depth=2, heads=1, teacher_dim=WIDTH, return_layers=1, num_frames=NUM_FRAMES,
                   img_size=IMG_SIZE)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A local BERT folder: MiniLM's uncased WordPiece vocabulary and tokenizer, a 3-layer BERT of
    width 64 (2 heads) as its config; its weights are never read (the models are built random)."""
    return write_bert_folder(tmp_path_factory.mktemp("tiny_bert"), hidden_size=HIDDEN, num_hidden_layers=TEXT_LAYERS,
                             num_attention_heads=TEXT_HEADS, intermediate_size=96, max_position_embeddings=MAX_POS,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    return load_tokenizer(tiny_bert)


def _empty_model(tiny_bert) -> VideoQAModel:
    return VideoQAModel(QAVisionEncoder(ARCH), build_text_encoder(tiny_bert, FUSION, WIDTH, load=False))


def reference_qa_state_dict(seed: int = 0) -> dict:
    """Random weights in the reference's UMT_QA naming, written from its module layout (not from our
    mapping): vision_encoder.encoder.*, text_encoder.* (a BertModel, the last FUSION layers with
    crossattention from the vision width), text_decoder.bert.* (every layer with crossattention)
    and text_decoder.cls.predictions.*."""
    vision = ref.random_student_state_dict(WIDTH, ARCH.depth, 1, 0, WIDTH, patch=16, seed=seed)
    sd = {"vision_encoder." + k: v for k, v in vision.items()}
    common = dict(hidden=HIDDEN, heads=TEXT_HEADS, intermediate=96, vocab=VOCAB, max_positions=MAX_POS)
    sd.update(ref.random_bert_state_dict("text_encoder.", TEXT_LAYERS, cross_layers=range(TEXT_LAYERS - FUSION, TEXT_LAYERS),
                                         encoder_width=WIDTH, seed=seed + 1, **common))  # fmt: skip
    sd.update(ref.random_bert_state_dict("text_decoder.bert.", FUSION, cross_layers=range(FUSION), encoder_width=HIDDEN,
                                         lm_head=True, seed=seed + 2, **common))  # fmt: skip
    return sd


@pytest.fixture(scope="module")
def reference_weights():
    return {k: v.double() for k, v in reference_qa_state_dict().items()}


@pytest.fixture(scope="module")
def model(tiny_bert, reference_weights):
    m = _empty_model(tiny_bert).double()
    load_reference_qa_state_dict(m, reference_weights, "reference-named weights")
    return m.eval()


def _inputs(tokenizer):
    g = torch.Generator().manual_seed(7)
    video = torch.randn(3, 3, NUM_FRAMES, IMG_SIZE, IMG_SIZE, generator=g, dtype=torch.float64)
    q_ids, q_mask = tokenize_captions(tokenizer, ["What is the man doing?", "who rides a bike", "what color is the car"],
                                      qa_recipe.MAX_Q_LEN)  # fmt: skip
    return video, q_ids, q_mask


ANSWERS = ["talk", "people", "red", "a man", "ride bicycles", "green grass"]


# ----------------------------------------------------------------------------------- the model


def test_reference_named_weights_load_strictly_and_round_trip(model, reference_weights, tiny_bert):
    ours = to_reference_qa_state_dict(model)
    assert ours.keys() == reference_weights.keys()
    assert all(torch.equal(ours[k], reference_weights[k]) for k in ours)
    assert not any(k.startswith(("vision_proj", "text_proj", "itm_head", "temp", "text_encoder.cls")) for k in ours)
    # the LM head is tied to the decoder's own word embeddings
    head = model.text_decoder.cls.predictions.decoder.weight
    assert head.data_ptr() == model.text_decoder.bert.embeddings.word_embeddings.weight.data_ptr()
    assert head.data_ptr() != model.text_encoder.bert.embeddings.word_embeddings.weight.data_ptr()
    broken = dict(reference_weights)
    del broken["text_decoder.bert.encoder.layer.1.crossattention.self.key.bias"]
    with pytest.raises(ValueError, match="missing"):
        load_reference_qa_state_dict(_empty_model(tiny_bert), broken, "broken")


def test_question_states_and_decoder_logits_equal_the_reference(model, reference_weights, tokenizer):
    video, q_ids, q_mask = _inputs(tokenizer)
    with torch.no_grad():
        states = model.encode_question(q_ids, q_mask, model.encode_vision(video))
        want = ref.reference_qa_question_states(reference_weights, video, q_ids, q_mask, 1, TEXT_HEADS)
        assert (q_mask == 0).any()  # padded questions: the padding must not leak
        torch.testing.assert_close(states, want, rtol=0, atol=1e-10)
        a_ids, a_mask = qa_recipe.tokenize_answers(tokenizer, ANSWERS[:3])
        assert (a_mask == 0).any()
        logits = model.decoder_logits(a_ids, a_mask, states, q_mask)
        want_logits, _ = ref.reference_lm_head_model(reference_weights, a_ids, a_mask, TEXT_HEADS, want, q_mask)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-9)
    assert logits.std() > 0.1


def test_the_weighted_multi_answer_loss_equals_the_reference(model, reference_weights, tokenizer):
    """Question 0 has 2 answers (weights 0.6, 0.4), question 1 one (1.0), question 2 three."""
    video, q_ids, q_mask = _inputs(tokenizer)
    answers = ["talk", "speak on the phone", "people", "red", "dark red", "a red car"]
    a_ids, a_mask = qa_recipe.tokenize_answers(tokenizer, answers)
    counts, weights = [2, 1, 3], torch.tensor([0.6, 0.4, 1.0, 0.5, 0.3, 0.2], dtype=torch.float64)
    loss = model(video, q_ids, q_mask, a_ids, a_mask, torch.tensor(counts), weights)
    want = ref.reference_qa_train_loss(reference_weights, video, q_ids, q_mask, a_ids, a_mask, counts, weights, 1, TEXT_HEADS)
    assert loss.ndim == 0 and loss.item() == pytest.approx(want.item(), rel=1e-12)
    # by hand from the per-answer nll: sum(w * nll) / 3 questions
    with torch.no_grad():
        states = model.encode_question(q_ids, q_mask, model.encode_vision(video)).repeat_interleave(torch.tensor(counts), 0)
        nll = model.answer_nll(a_ids, a_mask, states, q_mask.repeat_interleave(torch.tensor(counts), 0))
    assert loss.item() == pytest.approx(float((weights * nll).sum() / 3), rel=1e-12)
    loss.backward()
    assert model.text_decoder.fusion[0].crossattention.self.key.weight.grad.abs().sum() > 0
    assert model.vision_encoder.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("k", [1, 3, 6, 10])
def test_rank_answer_equals_the_reference(model, reference_weights, tokenizer, k):
    video, q_ids, q_mask = _inputs(tokenizer)
    a_ids, a_mask = qa_recipe.tokenize_answers(tokenizer, ANSWERS)
    with torch.no_grad():
        states = model.encode_question(q_ids, q_mask, model.encode_vision(video))
        ids, probs = model.rank_answer(states, q_mask, a_ids, a_mask, k, chunk=4)
        kk = min(k, len(ANSWERS))  # the reference needs k <= the number of answers
        want_ids, want_probs = ref.reference_rank_answer(reference_weights, states, q_mask, a_ids, a_mask, kk, TEXT_HEADS)
    assert ids.tolist() == want_ids.tolist()
    torch.testing.assert_close(probs, want_probs, rtol=0, atol=1e-12)
    assert probs.shape == (3, kk) and torch.allclose(probs.sum(1), torch.ones(3, dtype=torch.float64))
    if kk > 1:
        assert (probs[:, 0] < 1 - 1e-6).any()  # not one-hot everywhere: the scores discriminate


def test_the_score_is_log_first_token_prob_minus_the_sequence_nll(model, tokenizer):
    """Re-derived: the first-token probability from decoding [CLS] alone, the whole-sequence nll
    (the first token counted again), score = log p1 - nll, softmax over the kept candidates."""
    video, q_ids, q_mask = _inputs(tokenizer)
    a_ids, a_mask = qa_recipe.tokenize_answers(tokenizer, ANSWERS)
    with torch.no_grad():
        states = model.encode_question(q_ids, q_mask, model.encode_vision(video))
        ids, probs = model.rank_answer(states, q_mask, a_ids, a_mask, len(ANSWERS))
        for b in range(3):
            first = model.decoder_logits(a_ids[:1, :1], None, states[b:b + 1], q_mask[b:b + 1])[0, 0].softmax(-1)
            s = states[b:b + 1].expand(len(ANSWERS), -1, -1)
            nll = model.answer_nll(a_ids, a_mask, s, q_mask[b:b + 1].expand(len(ANSWERS), -1))
            scores = first[a_ids[:, 1]].log() - nll
            order = scores.argsort(descending=True)
            assert ids[b].tolist() == order.tolist()
            torch.testing.assert_close(probs[b], scores.softmax(0)[order], rtol=0, atol=1e-12)


def test_fine_tuning_starts_from_stage2_as_the_reference_maps_it(tiny_bert):
    """The decoder takes the text tower's embeddings, its fusion layers (layer 1 -> 0, 2 -> 1) and its
    MLM head; the question encoder the whole tower; the vision encoder the student's encoder: key for
    key what the reference's setup_model loop makes of the same stage-2 state dict."""
    from umt_fast.models.student import SparseVideoStudent
    from umt_fast.models.vl import HEAD_NORM_EPS, VisionLanguageModel, to_reference_state_dict

    torch.manual_seed(11)
    vl_arch = StudentArch(width=WIDTH, depth=2, heads=1, teacher_dim=16, return_layers=2, num_frames=NUM_FRAMES,
                          img_size=IMG_SIZE, head_norm_eps=HEAD_NORM_EPS)  # fmt: skip
    vl = VisionLanguageModel(SparseVideoStudent(vl_arch), build_text_encoder(tiny_bert, FUSION, WIDTH, load=False), 16)
    with torch.no_grad():
        for p in vl.parameters():
            p.add_(0.01 * torch.randn_like(p))
    stage2 = to_reference_state_dict(vl)
    stage2["clip_teacher.conv1.weight"] = torch.zeros(1)
    qa = _empty_model(tiny_bert)
    init_from_stage2(qa, stage2, "stage-2 weights")
    ours = to_reference_qa_state_dict(qa)
    theirs = ref.reference_qa_from_stage2(stage2, fusion_layer=TEXT_LAYERS - FUSION)
    assert set(ours) <= set(theirs)
    leftover = set(theirs) - set(ours)  # what the reference's strict=False load leaves out
    assert all(k.startswith(("vision_encoder.clip_decoder.", "vision_encoder.pool_norm.", "vision_proj.", "text_proj.",
                             "itm_head.", "temp", "clip_teacher.")) for k in leftover), leftover  # fmt: skip
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert torch.equal(ours["text_decoder.bert.encoder.layer.0.crossattention.self.key.weight"],
                       stage2["text_encoder.bert.encoder.layer.1.crossattention.self.key.weight"])  # fmt: skip
    assert torch.equal(ours["text_decoder.cls.predictions.transform.dense.weight"],
                       stage2["text_encoder.cls.predictions.transform.dense.weight"])  # fmt: skip
    assert qa_state_dict_from_stage2(stage2, FUSION).keys() == ours.keys()


def test_a_reference_file_loads_through_the_command_loader(reference_weights, tiny_bert, tmp_path):
    path = tmp_path / "umt_qa.pth"
    extra = {"vision_encoder.clip_decoder.0.head.weight": torch.zeros(WIDTH, WIDTH),
             "text_encoder.embeddings.position_ids": torch.arange(MAX_POS)[None]}  # fmt: skip
    torch.save({"model": {**{k: v.float() for k, v in reference_weights.items()}, **extra}, "epoch": 3}, path)
    model, _ = qa_recipe.load_qa_model(str(path), tiny_bert, NUM_FRAMES, IMG_SIZE)
    got = to_reference_qa_state_dict(model)
    assert got.keys() == reference_weights.keys()
    assert all(torch.equal(got[k], reference_weights[k].float()) for k in got)
    # a stage-2 file is named for what it is
    stage2 = {"vision_encoder.encoder.patch_embed.proj.weight": torch.zeros(WIDTH, 3, 1, 16, 16),
              "text_encoder.bert.encoder.layer.0.attention.self.query.weight": torch.zeros(1)}  # fmt: skip
    torch.save({"model": stage2}, tmp_path / "stage2.pth")
    with pytest.raises(ValueError, match="stage-2 model without an answer decoder"):
        qa_recipe.load_qa_model(str(tmp_path / "stage2.pth"), tiny_bert, NUM_FRAMES, IMG_SIZE)


def test_questions_and_answers_are_tokenized_as_the_reference(tokenizer, tiny_bert):
    tok = ref.reference_bert_tokenizer(os.path.join(tiny_bert, "vocab.txt"))
    questions = ["What is the man doing?", "Who's riding a bike -- down the street/road?"]
    ids, mask = tokenize_captions(tokenizer, questions, 25)
    want = tok([ref.reference_pre_text(q) for q in questions], padding="max_length", truncation=True, max_length=25,
               return_tensors="pt")  # fmt: skip
    assert ids.tolist() == want["input_ids"].tolist() and mask.tolist() == want["attention_mask"].tolist()
    answers = ["yes", "a red car", "playing football games well", "Don't"]
    ids, mask = qa_recipe.tokenize_answers(tokenizer, answers)
    want = tok([a + " [SEP]" for a in answers], padding="max_length", truncation=True, max_length=5, return_tensors="pt")
    assert ids.tolist() == want["input_ids"].tolist() and mask.tolist() == want["attention_mask"].tolist()
    assert ids[0].tolist()[:3] == [tokenizer.cls_token_id, tokenizer.convert_tokens_to_ids("yes"), tokenizer.sep_token_id]


# ----------------------------------------------------------------------------------- VQAEval


@pytest.mark.parametrize("text, normalised", [
    ("The dog.", "dog"),
    ("an apple", "apple"),
    ("A man and a woman", "man and woman"),
    ("two", "2"),
    ("Ten Dogs", "10 dogs"),
    ("none", "0"),
    ("dont", "don't"),
    ("isnt it", "isn't it"),
    ("yes!", "yes"),
    ("left-hand", "left hand"),
    ("1,000", "1000"),
    ("3.5 kg", "3.5 kg"),
    ("what? no", "what no"),
    ("\tred\n", "red"),
])  # fmt: skip
def test_vqaeval_normalisation_by_hand(text, normalised):
    assert qa_recipe.normalise_answer(text) == normalised
    r = ref.ReferenceVQANormaliser()
    assert r.processDigitArticle(r.processPunctuation(text.replace("\n", " ").replace("\t", " ").strip())) == normalised


def test_vqaeval_punctuation_rules_equal_the_reference():
    r = ref.ReferenceVQANormaliser()
    for text in ["a, b", "a,b", "1,2 and x-y", "end. of it.", "x.1", "(yes)", "it's  #1!", "a / b", "e-mail@x.com"]:
        assert qa_recipe.process_punctuation(text) == r.processPunctuation(text), text


def test_vqa_consensus_accuracy_by_hand():
    """Ten annotators: 3 say "2", 7 say "3". Predicting "two" (-> "2"): each "2" annotator's nine
    others hold two "2"s (2/3), each "3" annotator's nine hold all three (1): (3 * 2/3 + 7) / 10 = 0.9."""
    gts = ["2"] * 3 + ["3"] * 7
    assert qa_recipe.vqa_question_accuracy("two", gts) == pytest.approx(0.9)
    assert qa_recipe.vqa_question_accuracy("3", gts) == pytest.approx(1.0)
    assert qa_recipe.vqa_question_accuracy("four", gts) == 0.0
    r = ref.ReferenceVQANormaliser()
    for pred in ("two", "3", "four", "The 3."):
        assert qa_recipe.vqa_question_accuracy(pred, gts) == pytest.approx(r.question_accuracy(pred, gts))
    assert qa_recipe.vqa_question_accuracy("2", ["2"]) == 0.0  # one answer: VQAEval scores nothing


def test_accuracy_on_a_hand_made_prediction_set():
    preds = ["talk", "dog", "2", "man"]
    answers = ["talk", "cat", "two", "the man"]
    out = qa_recipe.qa_accuracy(preds, answers)
    assert out == {"acc": 25.0, "correct": 1, "acc_normalised": 75.0}  # "two" -> "2", "the man" -> "man"
    gt = [{"question_id": i, "answer": a} for i, a in enumerate(answers)]
    assert out["acc"] == ref.reference_simple_qa_acc(gt, [{"question_id": i, "answer": p} for i, p in enumerate(preds)])
    vqa = qa_recipe.qa_accuracy(["two", "cat"], [["2"] * 3 + ["3"] * 7, ["cat", "dog"]])
    assert vqa["correct"] == 1 and vqa["acc"] == 50.0  # "cat" is one of its answers; "two" is no exact match
    # ["cat", "dog"], predicting "cat": leaving out "cat" -> 0 matches, leaving out "dog" -> 1 / 3: mean 1/6
    assert qa_recipe.vqa_question_accuracy("cat", ["cat", "dog"]) == pytest.approx(1 / 6)
    assert vqa["vqa_acc"] == pytest.approx(100 * (0.9 + 1 / 6) / 2)


# ----------------------------------------------------------------------------------- the command

QUESTIONS = [("what animal is in the video", "rabbit"), ("what are the people riding", "bicycles"),
             ("how many people ride", "two"), ("what is the man holding", "phone"), ("where is the man", "car")]  # fmt: skip
ANSWER_LIST = ["rabbit", "bicycles", "two", "phone", "car", "dog", "cake"]


@pytest.fixture(scope="module")
def tiny_qa_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("qa") / "umt_qa.pth"
    torch.save({"model": reference_qa_state_dict(seed=5)}, path)
    return path


def _qa_entries():
    from umt_fast.data import sample_clip_paths

    clips = sample_clip_paths()
    owners = [0, 1, 1, 2, 3]
    return clips, [{"video": clips[o], "question": q, "answer": a} for o, (q, a) in zip(owners, QUESTIONS)]


def test_evaluate_qa_end_to_end_on_the_sample_clips(tiny_qa_file, tiny_bert, tmp_path, capsys):
    from umt_fast.data.captions import load_media
    from umt_fast.evaluate import main as evaluate_main

    clips, entries = _qa_entries()
    missing = str(tmp_path / "missing.mp4")
    listing = tmp_path / "qa_test.json"
    listing.write_text(json.dumps(entries[:2] + [{"video": missing, "question": "what", "answer": "dog"}] + entries[2:]))
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(ANSWER_LIST))
    out = tmp_path / "qa.json"
    rc = evaluate_main(["qa", "--checkpoint", str(tiny_qa_file), "--text-weights", tiny_bert, "--test-list", str(listing),
                        "--answer-list", str(answers), "--num-frames", str(NUM_FRAMES), "--img-size", str(IMG_SIZE),
                        "--k", "4", "--batch-size", "2", "--out", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(out.read_text())
    assert report["questions"] == 5 and report["videos"] == 4 and report["answers"] == len(ANSWER_LIST)
    assert (report["num_frames"], report["img_size"], report["k"]) == (NUM_FRAMES, IMG_SIZE, 4)
    assert [u["path"] for u in report["unreadable"]] == [missing]
    assert "unreadable video skipped" in captured.err and "1 unreadable video(s) skipped with their 1 question(s)" in captured.err
    preds = report["predictions"]
    assert [p["question"] for p in preds] == [q for q, _ in QUESTIONS]
    assert [p["question_id"] for p in preds] == [0, 1, 3, 4, 5]  # the entry index when the list has none
    correct = sum(p["prediction"] == p["answer"] for p in preds)
    assert report["correct"] == correct and report["acc"] == pytest.approx(100.0 * correct / 5)
    assert 0.0 <= report["acc"] <= 100.0 and all(p["prediction"] in ANSWER_LIST for p in preds)
    assert all(0 < p["score"] <= 1 for p in preds)
    assert "acc" in captured.out and f"wrote {out}" in captured.out

    # the same predictions from the model directly
    model, tokenizer = qa_recipe.load_qa_model(str(tiny_qa_file), tiny_bert, NUM_FRAMES, IMG_SIZE)
    videos = torch.stack([load_media(c, "video", NUM_FRAMES, IMG_SIZE, rng=None) for c in clips])
    a_ids, a_mask = qa_recipe.tokenize_answers(tokenizer, ANSWER_LIST)
    idx, prob = qa_recipe.answer_questions(model, tokenizer, videos, [q for q, _ in QUESTIONS], [0, 1, 1, 2, 3], a_ids,
                                           a_mask, k=4)  # fmt: skip
    assert [ANSWER_LIST[i] for i in idx] == [p["prediction"] for p in preds]
    assert prob.tolist() == pytest.approx([p["score"] for p in preds], rel=1e-5)


@pytest.mark.parametrize("bad, message", [
    ({"answer": None}, "entry 1: missing \"answer\""),
    ({"answer": ""}, "entry 1: \"answer\" must be a non-empty string or a non-empty list of them"),
    ({"answer": []}, "entry 1: \"answer\" must be a non-empty string"),
    ({"answer": 3}, "entry 1: \"answer\" must be a non-empty string"),
    ({"question": None}, "entry 1: missing \"question\""),
    ({"question": ["a"]}, "entry 1: \"question\" must be a non-empty string"),
    ({"video": None}, "entry 1: missing \"video\""),
    ({"video": 7}, "entry 1: \"video\" must be a non-empty path string"),
])  # fmt: skip
def test_a_malformed_entry_is_refused_in_one_line_before_any_work(bad, message, tmp_path, capsys, tiny_bert):
    from umt_fast.evaluate import main as evaluate_main

    _, entries = _qa_entries()
    entry = dict(entries[0])
    for key, value in bad.items():
        if value is None:
            entry.pop(key)
        else:
            entry[key] = value
    listing = tmp_path / "qa_test.json"
    listing.write_text(json.dumps([entries[1], entry, entries[2]]))
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(ANSWER_LIST))
    rc = evaluate_main(["qa", "--checkpoint", str(tmp_path / "not_there.pth"), "--text-weights", tiny_bert,
                        "--test-list", str(listing), "--answer-list", str(answers)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith(f"error: {listing}: ") and message in err, err


def test_a_bad_answer_list_is_refused_in_one_line(tmp_path, capsys, tiny_bert):
    from umt_fast.evaluate import main as evaluate_main

    _, entries = _qa_entries()
    listing = tmp_path / "qa_test.json"
    listing.write_text(json.dumps(entries))
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["rabbit", "", "car"]))
    rc = evaluate_main(["qa", "--checkpoint", "x.pth", "--text-weights", tiny_bert, "--test-list", str(listing),
                        "--answer-list", str(answers)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"{answers}: entry 1: an answer must be a non-empty string" in err


def test_evaluate_dispatches_qa(capsys):
    from umt_fast.evaluate import main as evaluate_main

    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["qa", "--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "python -m umt_fast.evaluate qa" in text and "question answering" in text
    assert "--answer-list" in text and "--k" in text and "--max-a-len" in text and "question tokens" in text
