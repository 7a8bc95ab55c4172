"""Zero-shot classification (`python -m umt_fast.evaluate zeroshot`) on hand-made embeddings: a
class's embedding is the normalised mean of its prompts' unit embeddings, a video's score the mean
over frames of the cosine, top-1 / top-5 counted by hand."""
import math

import pytest
import torch

from umt_fast.recipes import zeroshot


def test_a_class_embedding_is_the_normalised_mean_of_its_prompts(monkeypatch):
    prompts_seen = []
    # unit embeddings per prompt: class "cat" -> (1, 0) and (0, 1); class "dog" -> (-1, 0) twice
    table = {"cat": [1.0, 0.0], "a video of cat.": [0.0, 1.0], "dog": [-1.0, 0.0], "a video of dog.": [-1.0, 0.0]}

    def fake_encode_texts(model, tokenizer, prompts, device, max_len, autocast_dtype=None):
        prompts_seen.extend(prompts)
        return None, None, torch.tensor([table[p] for p in prompts])

    monkeypatch.setattr(zeroshot, "encode_texts", fake_encode_texts)
    emb = zeroshot.class_embeddings(None, None, ["cat", "dog"], ["{}", "a video of {}."], torch.device("cpu"))
    assert prompts_seen == ["cat", "a video of cat.", "dog", "a video of dog."]
    r = 1 / math.sqrt(2)
    assert torch.allclose(emb, torch.tensor([[r, r], [-1.0, 0.0]]))


def test_scores_are_the_mean_over_frames_and_top_k_is_counted_by_hand():
    from umt_fast.recipes.retrieval import vtc_similarity

    classes = torch.eye(3)  # three classes along the axes
    frames = torch.tensor([
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],  # video 0: frame cosines (1, 0), (0, 1), (0, 0) -> 0.5, 0.5, 0
        [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]],  # video 1: class 2
        [[0.6, 0.8, 0.0], [0.0, 1.0, 0.0]],  # video 2: class 1 (0.9) before class 0 (0.3)
    ])  # fmt: skip
    scores = vtc_similarity(classes, frames).T  # [V, C]
    assert torch.allclose(scores, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.3, 0.9, 0.0]]))
    # labels 0, 2, 0: video 0 ties 0 and 1 (argsort puts the lower index first), video 2 ranks 0 second
    report = zeroshot.topk_accuracy(scores, torch.tensor([0, 2, 0]))
    assert report["videos"] == 3
    assert report["top1"] == pytest.approx(200 / 3) and report["top5"] == 100.0


def test_top1_and_top5_over_ten_classes():
    scores = torch.arange(10.0).repeat(4, 1)  # every video ranks class 9 first, then 8, ...
    report = zeroshot.topk_accuracy(scores, torch.tensor([9, 5, 4, 0]))  # ranks 1, 5, 6, 10
    assert (report["top1"], report["top5"], report["videos"]) == (25.0, 50.0, 4)
