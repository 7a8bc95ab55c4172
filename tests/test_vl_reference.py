"""Stage 2 against the reference, restated in tests/umt_reference.py: the captions' ids and
attention masks, the VTM re-ranking scores, and the retrieval ranks (ties included)."""
import os
import types

import numpy as np
import pytest
import torch

from tests import umt_reference as ref
from umt_fast.recipes.retrieval import NOT_RERANKED, reference_ranks, retrieval_metrics, vtm_rerank
from umt_fast.models.text import bundled_minilm_dir, clean_caption, load_tokenizer, tokenize_captions

WORDS = "the cat sat on a red mat and dog ran to big green park with two old men".split()  # one wordpiece each

CAPTIONS = [
    "a dog",
    "",
    "   ",
    "A Man's Café — naïve, RÉSUMÉ!!! (Zürich) 3.5% off: e-mail/me now; <person> #1 ~ok?",
    "Tokenization of unbelievably long antidisestablishmentarianism words",
    "emoji \U0001F600 and 中文字 and tabs\tand\nnewlines",
    "two  spaces - and -- dashes ' quotes \"here\" [MASK] [SEP] [unused1]",
    " ".join(WORDS * 4),  # far longer than max_len
]


def _captions_around(max_len: int) -> list[str]:
    """Captions of exactly max_len - 2, max_len - 1, max_len and max_len + 1 wordpieces."""
    return [" ".join((WORDS * 4)[:n]) for n in range(max(max_len - 2, 0), max_len + 2)]


@pytest.fixture(scope="module")
def reference_tokenizer():
    return ref.reference_bert_tokenizer(os.path.join(bundled_minilm_dir(), "vocab.txt"))


def _slow_hf_tokenizer():
    try:
        from transformers import BertTokenizerLegacy as Slow
    except ImportError:
        from transformers import BertTokenizer as Slow
    return Slow(os.path.join(bundled_minilm_dir(), "vocab.txt"), do_lower_case=True)


@pytest.fixture(scope="module", params=["fast", "slow"])
def our_tokenizer(request):
    tok = load_tokenizer("minilm") if request.param == "fast" else _slow_hf_tokenizer()
    assert tok.is_fast == (request.param == "fast")
    return tok


def _reference_input(tokenizer, texts, max_len):
    out = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return out["input_ids"], out["attention_mask"]


def test_the_reference_tokenizer_keeps_max_len_minus_one_wordpieces(reference_tokenizer):
    assert reference_tokenizer.num_special_tokens_to_add() == 1
    ids, mask = _reference_input(reference_tokenizer, [" ".join(WORDS[:9]), "a dog"], 8)
    expected = [101] + reference_tokenizer.convert_tokens_to_ids(WORDS[:7])
    assert ids[0].tolist() == expected and mask[0].tolist() == [1] * 8
    assert ids[1].tolist() == [101, 1037, 3899, 0, 0, 0, 0, 0] and mask[1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("max_len", [1, 2, 8, 32])
def test_tokenize_captions_equals_the_reference_tokenizer(our_tokenizer, reference_tokenizer, max_len):
    captions = CAPTIONS + _captions_around(max_len)
    for n, caption in zip(range(max(max_len - 2, 0), max_len + 2), _captions_around(max_len)):
        assert len(reference_tokenizer.tokenize(caption)) == n
    # The tokenizer alone (no clean-up) and the reference's whole text path (pre_text, then it).
    for clean, texts in ((False, captions), (True, [ref.reference_pre_text(c) for c in captions])):
        ids, mask = tokenize_captions(our_tokenizer, captions, max_len, clean=clean)
        want_ids, want_mask = _reference_input(reference_tokenizer, texts, max_len)
        assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape == (len(captions), max_len)
        assert torch.equal(ids, want_ids), (clean, (ids != want_ids).any(1).nonzero().flatten().tolist())
        assert torch.equal(mask, want_mask.long())
    assert (ids[:, 0] == 101).all()
    plain = torch.tensor([[101] + [our_tokenizer.convert_tokens_to_ids(w) for w in (WORDS * 4)[:max_len - 1]]])
    assert torch.equal(tokenize_captions(our_tokenizer, [" ".join(WORDS * 4)], max_len)[0], plain)


def test_tokenize_captions_edge_cases(our_tokenizer):
    ids, mask = tokenize_captions(our_tokenizer, [], 6)
    assert ids.shape == mask.shape == (0, 6) and ids.dtype == mask.dtype == torch.int64
    ids, mask = tokenize_captions(our_tokenizer, [""], 4)
    assert ids.tolist() == [[101, 0, 0, 0]] and mask.tolist() == [[1, 0, 0, 0]]
    with pytest.raises(ValueError, match="max_len"):
        tokenize_captions(our_tokenizer, ["a"], 0)


def test_clean_caption_is_the_reference_pre_text():
    for caption in CAPTIONS + ["<PERSON> walks\n", "a/b-c", "x  \t y", "Don't!"]:
        assert clean_caption(caption) == ref.reference_pre_text(caption)


def test_mlm_never_masks_cls_and_pad_only():
    from umt_fast.recipes.pretrain_vl import VLStep

    tok = load_tokenizer("minilm")
    model = types.SimpleNamespace(student=types.SimpleNamespace(arch=types.SimpleNamespace(patches_per_frame=4)),
                                  text_encoder=types.SimpleNamespace(arch=types.SimpleNamespace(vocab_size=10)))
    step = VLStep(model, None, None, tok, None, torch.device("cpu"), None)
    ids, mask = tokenize_captions(tok, ["a \U0001F600 dog [SEP] [MASK] here", "one"], 10)
    assert tok.unk_token_id in ids.tolist()[0]
    special = torch.isin(ids, step.special_ids) | (mask == 0)  # as VLStep.make_batch
    never = (ids == tok.pad_token_id) | (ids == tok.cls_token_id)  # the reference's MLMLoss.mask
    assert torch.equal(special, never)


# ----------------------------------------------------------------------------------- ranking


def _retrieval_set(rng: np.random.Generator, nv: int, max_captions: int = 3):
    """text_to_video, and the reference's txt2img (int per text) / img2txt (list per video)."""
    counts = rng.integers(1, max_captions + 1, nv)
    text_to_video = [v for v in range(nv) for _ in range(counts[v])]
    img2txt = {v: [t for t, u in enumerate(text_to_video) if u == v] for v in range(nv)}
    return text_to_video, dict(enumerate(text_to_video)), img2txt


def _with_ties(rng: np.random.Generator, nt: int, nv: int, levels: int, text_to_video, fill_fraction=0.0):
    """[Nt, Nv] float32 scores on a few levels (many ties, also with the ground truth), some rows
    copying their ground truth's score elsewhere, and a -100 fill outside a random part."""
    scores = (rng.integers(0, levels, (nt, nv)) / levels).astype(np.float32)
    for t, v in enumerate(text_to_video):
        if rng.random() < 0.5:
            scores[t, rng.integers(0, nv, 3)] = scores[t, v]
    if fill_fraction:
        scores[rng.random((nt, nv)) < fill_fraction] = NOT_RERANKED
    return scores


def _assert_matches_reference(ours, i2t_VT, t2i_TV, txt2img, img2txt):
    want = ref.reference_itm_eval(i2t_VT, t2i_TV, txt2img, img2txt)
    ranks_i2t, ranks_t2i = ref.reference_itm_ranks(i2t_VT, t2i_TV, txt2img, img2txt)
    for k in (1, 5, 10):
        assert ours[f"t2v_r{k}"] == want[f"img_r{k}"] and ours[f"v2t_r{k}"] == want[f"txt_r{k}"]
    assert ours["t2v_medr"] == np.median(ranks_t2i + 1) and ours["v2t_medr"] == np.median(ranks_i2t + 1)
    assert ours["t2v_meanr"] == pytest.approx((ranks_t2i + 1).mean(), abs=1e-12)
    assert ours["v2t_meanr"] == pytest.approx((ranks_i2t + 1).mean(), abs=1e-12)


@pytest.mark.parametrize("nv,levels,fill", [(5, 3, 0.0), (12, 2, 0.3), (40, 4, 0.5), (300, 6, 0.6), (700, 3, 0.9)])
def test_retrieval_ranks_equal_the_reference_itm_eval_with_ties(nv, levels, fill):
    rng = np.random.default_rng(nv)
    text_to_video, txt2img, img2txt = _retrieval_set(rng, nv)
    nt = len(text_to_video)
    # One matrix (VTC: the reference ranks i2t_scores and i2t_scores.T).
    sim = _with_ties(rng, nt, nv, levels, text_to_video, fill)
    _assert_matches_reference(retrieval_metrics(sim, text_to_video), sim.T, sim, txt2img, img2txt)
    _assert_matches_reference(retrieval_metrics(torch.from_numpy(sim), text_to_video), sim.T, sim, txt2img, img2txt)
    half = sim.astype(np.float16)  # the reference's fp16 ITC matrix is ranked in float16
    _assert_matches_reference(retrieval_metrics(half, text_to_video), half.T, half, txt2img, img2txt)
    # Two matrices (VTM: t2i_scores_x for text->video, i2t_scores_x for video->text).
    t2i = _with_ties(rng, nt, nv, levels, text_to_video, fill)
    i2t = _with_ties(rng, nt, nv, levels, text_to_video, fill).T.copy()
    _assert_matches_reference(retrieval_metrics(t2i, text_to_video, i2t.T), i2t, t2i, txt2img, img2txt)


def test_all_equal_scores_rank_as_numpy_argsort_reversed():
    # Every score equal: each query's rank is where np.argsort(row)[::-1] puts its ground truth.
    scores = np.full((3, 30), NOT_RERANKED, dtype=np.float32)
    ranks = reference_ranks(scores, np.array([[0, 0], [1, 29], [2, 10]]))
    want = [int(np.flatnonzero(np.argsort(scores[q])[::-1] == c)[0]) for q, c in ((0, 0), (1, 29), (2, 10))]
    assert ranks.tolist() == want
    m = retrieval_metrics(np.zeros((2, 2), dtype=np.float32), [0, 1])
    assert m["t2v_r1"] == m["v2t_r1"] == 50.0  # not optimistic: one of the two ties is ranked second


def test_vtm_rerank_equals_the_reference_scores_and_metrics():
    g = torch.Generator().manual_seed(0)
    nv, k = 9, 4
    rng = np.random.default_rng(1)
    text_to_video, txt2img, img2txt = _retrieval_set(rng, nv)
    nt = len(text_to_video)
    text_x = torch.randn(nt, 3, 2, generator=g)
    text_mask = torch.ones(nt, 3, dtype=torch.long)
    tokens = torch.randn(nv, 5, 2, generator=g)
    sim_TV = torch.randn(nt, nv, generator=g)  # no ties: both pick the same top k

    def logit(tx, vx):  # a pair's match logit, rounded so that ties occur
        return torch.round(4 * (tx[:, 0, 0] * vx[:, 0, 0] + tx[:, 1, 1])) / 4

    model = types.SimpleNamespace(match_logits=lambda tx, tm, vx: torch.stack([torch.zeros(len(tx)), logit(tx, vx)], 1))
    t2v, v2t = vtm_rerank(model, sim_TV, text_x, text_mask, tokens, k, batch_size=5)
    i2t_x, t2i_x = ref.reference_rerank_scores(sim_TV.T.contiguous(), lambda t, v: logit(text_x[t], tokens[v]), k)
    assert t2v.dtype == v2t.dtype == torch.float32
    assert np.array_equal(t2v.numpy(), t2i_x) and np.array_equal(v2t.numpy().T, i2t_x)
    assert (t2v == NOT_RERANKED).sum() == nt * (nv - k) and (v2t == NOT_RERANKED).sum() == nv * (nt - k)
    _assert_matches_reference(retrieval_metrics(t2v, text_to_video, v2t), i2t_x, t2i_x, txt2img, img2txt)
    vtc = retrieval_metrics(sim_TV, text_to_video)
    _assert_matches_reference(vtc, sim_TV.T.numpy(), sim_TV.numpy(), txt2img, img2txt)


def test_stage2_alignment_heads_match_the_reference_vision_encoder():
    """The stage-2 model's UTA outputs against the reference's stage-2 vision encoder, in float64:
    its heads' LayerNorm has torch's default eps 1e-5, where stage 1's has 1e-6."""
    from umt_fast.models.student import SparseVideoStudent, StudentArch
    from umt_fast.models.vl import HEAD_NORM_EPS, VisionLanguageModel
    from umt_fast.models.text import build_text_encoder

    sd = ref.random_student_state_dict(width=64, depth=2, heads=1, K=2, teacher_dim=8, seed=4)
    for k in range(2):  # small head outputs, so that the eps is felt
        sd[f"clip_decoder.{k}.head.weight"] = sd[f"clip_decoder.{k}.head.weight"] * 0.01
        sd[f"clip_decoder.{k}.head.bias"] = sd[f"clip_decoder.{k}.head.bias"] * 0.01
    arch = StudentArch(width=64, depth=2, heads=1, teacher_dim=8, return_layers=2, num_frames=2, img_size=32,
                       head_norm_eps=HEAD_NORM_EPS)  # fmt: skip
    model = VisionLanguageModel(SparseVideoStudent(arch), build_text_encoder("minilm", 1, 64, load=False), 16)
    model.student.load_state_dict(sd)
    model = model.double().eval()
    video = torch.randn(2, 3, 2, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    idx = torch.tensor([[0, 2, 5, 7], [1, 3, 4, 6]])
    with torch.no_grad():
        _, aligned, _ = model.encode_vision(video, idx)
    mask = ref.bool_mask_from_indices(idx, 8)
    expected = ref.student_forward({k: v.double() for k, v in sd.items()}, video, mask, heads=1, head_eps=1e-5)
    stage1_eps = ref.student_forward({k: v.double() for k, v in sd.items()}, video, mask, heads=1, head_eps=1e-6)
    assert (aligned - expected).abs().max() < 1e-12
    assert (aligned - stage1_eps).abs().max() > 1e-6
