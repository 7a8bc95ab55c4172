"""Stage-2 losses, retrieval metrics and the media interleaving, against independent computations."""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from umt_fast.data import captions as vl_data
from umt_fast.losses.vl import (
    hard_negative_noise,
    hard_negatives,
    mask_tokens,
    mlm_loss,
    mlm_noise,
    sample_hard_negatives,
    vtc_loss,
    vtm_loss,
)
from umt_fast.recipes.retrieval import retrieval_metrics


def _vtc_by_hand(v, t, ids, temp):
    """Loops in float64: for each row, -mean over its positives of log softmax."""
    v, t = v.double(), t.double()
    n = len(ids)
    sim = [[float(v[i] @ t[j]) / temp for j in range(n)] for i in range(n)]

    def direction(s):
        total = 0.0
        for i in range(n):
            top = max(s[i])
            lse = top + math.log(sum(math.exp(x - top) for x in s[i]))
            pos = [j for j in range(n) if ids[i] == ids[j]]
            total += -sum(s[i][j] - lse for j in pos) / len(pos)
        return total / n

    return (direction(sim) + direction([list(r) for r in zip(*sim)])) / 2


def test_vtc_matches_a_hand_built_similarity_matrix_with_duplicate_ids():
    g = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    t = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    ids = [3, 3, 5, 7, 7, 7]  # two videos with several captions each
    temp = torch.tensor(0.07)
    got = vtc_loss(v, t, torch.tensor(ids), temp)
    assert got.item() == pytest.approx(_vtc_by_hand(v, t, ids, 0.07), rel=1e-5)
    # The temperature is clamped to [0.001, 0.5].
    assert vtc_loss(v, t, torch.tensor(ids), torch.tensor(2.0)).item() == pytest.approx(_vtc_by_hand(v, t, ids, 0.5), rel=1e-5)
    assert vtc_loss(v, t, torch.tensor(ids), torch.tensor(1e-5)).item() == pytest.approx(_vtc_by_hand(v, t, ids, 0.001), rel=1e-4)


def test_vtc_gradient_reaches_the_temperature():
    v = F.normalize(torch.randn(4, 8), dim=-1)
    t = F.normalize(torch.randn(4, 8), dim=-1)
    temp = torch.tensor(0.07, requires_grad=True)
    vtc_loss(v, t, torch.arange(4), temp).backward()
    assert temp.grad is not None and temp.grad.abs() > 0


def test_hard_negatives_never_pick_the_positive_or_a_same_id_item():
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    sim = torch.randn(8, 8) * 5
    sim.fill_diagonal_(100.0)  # the positive would win any unconstrained draw
    sim[0, 1] = sim[1, 0] = 90.0  # and so would a same-id item
    counts = torch.zeros(8, 8)
    for _ in range(2000):
        idx, valid = sample_hard_negatives(sim, ids)
        assert valid.all()
        assert (ids[idx] != ids).all()
        counts[torch.arange(8), idx] += 1
    # The draw follows softmax(sim) over the other ids (Gumbel-max): compare frequencies.
    probs = torch.softmax(sim.masked_fill(ids[:, None] == ids[None, :], float("-inf")), dim=1)
    assert torch.allclose(counts / 2000, probs, atol=0.05)


def test_hard_negatives_flag_rows_without_any_other_id():
    idx, valid = sample_hard_negatives(torch.randn(3, 3), torch.tensor([1, 1, 2]))
    assert valid.tolist() == [True, True, True]
    _, valid = sample_hard_negatives(torch.randn(2, 2), torch.tensor([1, 1]))
    assert valid.tolist() == [False, False]
    # Such rows weigh nothing in the VTM loss.
    logits = torch.tensor([[0.0, 5.0], [3.0, 0.0], [0.0, 9.0]])
    loss = vtm_loss(logits, torch.tensor([1, 0, 0]), torch.tensor([1.0, 1.0, 0.0]))
    expected = (F.cross_entropy(logits[:1], torch.tensor([1])) + F.cross_entropy(logits[1:2], torch.tensor([0]))) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("counter_based", [False, True])
def test_mlm_masking_rates_and_special_tokens(counter_based):
    g = torch.Generator().manual_seed(0)
    B, S, V, MASK = 400, 32, 1000, 103
    ids = torch.randint(200, V, (B, S), generator=g)
    special = torch.zeros(B, S, dtype=torch.bool)
    special[:, 0] = True  # [CLS]
    special[:, 20:] = True  # [SEP] and padding
    noise = mlm_noise(B, S, seed=0, offset=3, first_clip=0, device=torch.device("cpu")) if counter_based else None
    masked, labels = mask_tokens(ids, special, mask_token_id=MASK, vocab_size=V, prob=0.5, generator=g,
                                 uniform_3BS=noise)  # fmt: skip
    chosen = labels != -100
    assert not chosen[special].any() and torch.equal(masked[special], ids[special])
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    n = (~special).sum().item()  # 7600 candidates
    k = chosen.sum().item()
    assert abs(k / n - 0.5) < 4 * math.sqrt(0.25 / n)
    to_mask = (masked == MASK) & chosen
    kept = (masked == ids) & chosen
    rnd = chosen & ~to_mask & ~kept
    for count, p in ((to_mask.sum().item(), 0.8), (rnd.sum().item(), 0.1 * (1 - 1 / V)), (kept.sum().item(), 0.1)):
        assert abs(count / k - p) < 4 * math.sqrt(p * (1 - p) / k) + 0.002


def test_hard_negatives_and_mlm_masking_do_not_depend_on_how_the_batch_is_split():
    """Rank r of 2 holds pairs [4r, 4r + 4) of a global batch of 8: its draws are the whole batch's."""
    g = torch.Generator().manual_seed(0)
    B, K, S, cpu = 8, 4, 6, torch.device("cpu")
    v, t = (F.normalize(torch.randn(B, 16, generator=g), dim=-1) for _ in range(2))
    ids = torch.tensor([0, 0, 1, 2, 3, 4, 4, 5])
    temp = torch.tensor([0.07])

    def negatives(part, first, step=7):
        return hard_negatives(v[part], t[part], ids[part], temp,
                              hard_negative_noise(part.stop - part.start, K, seed=3, offset=step, first_clip=first,
                                                  device=cpu))  # fmt: skip

    whole = negatives(slice(0, 8), 0)
    halves = [negatives(slice(4 * r, 4 * r + 4), 4 * r) for r in range(2)]
    for i in range(4):  # neg_text, valid_v, neg_video, valid_t
        offset = 4 if i % 2 == 0 else 0  # the indices are into each rank's own batch
        assert torch.equal(whole[i], torch.cat([halves[0][i], halves[1][i] + offset]))
    for neg, valid in ((whole[0], whole[1]), (whole[2], whole[3])):
        assert valid.all() and torch.equal(neg // K, torch.arange(B) // K)  # within its group
        assert (ids[neg] != ids).all()  # never the positive or a same-id pair
    later = torch.cat([negatives(slice(0, 8), 0, step)[0] for step in range(8, 40)])
    assert not torch.equal(later, whole[0].repeat(32))  # a new draw each step
    noise = mlm_noise(B, S, seed=3, offset=7, first_clip=0, device=cpu)
    split = [mlm_noise(4, S, seed=3, offset=7, first_clip=4 * r, device=cpu) for r in range(2)]
    assert torch.equal(noise, torch.cat(split, dim=1))


def test_mlm_loss_averages_over_chosen_tokens_only():
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[-100, 2, -100], [4, -100, -100]])
    expected = (F.cross_entropy(logits[0, 1:2], torch.tensor([2])) + F.cross_entropy(logits[1, 0:1], torch.tensor([4]))) / 2
    assert mlm_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert mlm_loss(logits, torch.full((2, 3), -100)).item() == 0.0


def test_retrieval_metrics_on_a_hand_made_matrix():
    # 4 videos, 5 texts (video 1 has two captions).
    t2v = [0, 1, 1, 2, 3]
    sim = np.array([
        [0.9, 0.1, 0.0, 0.2],  # text 0 -> video 0: rank 1
        [0.5, 0.4, 0.8, 0.0],  # text 1 -> video 1: rank 3
        [0.1, 0.7, 0.3, 0.2],  # text 2 -> video 1: rank 1
        [0.6, 0.5, 0.4, 0.3],  # text 3 -> video 2: rank 3
        [0.9, 0.8, 0.7, 0.1],  # text 4 -> video 3: rank 4
    ])
    m = retrieval_metrics(sim, t2v)
    assert m["t2v_r1"] == pytest.approx(40.0) and m["t2v_r5"] == 100.0
    assert m["t2v_medr"] == 3.0 and m["t2v_meanr"] == pytest.approx(12 / 5)
    # video -> text columns: v0 -> text 0 (0.9 ties with text 4, which np.argsort(col)[::-1] puts
    # first, as the reference ranks) rank 2; v1 -> best of texts 1 (0.4: rank 4) and 2 (0.7: rank 2)
    # = 2; v2 -> text 3 (0.4: rank 3); v3 -> text 4 (0.1: rank 4).
    assert m["v2t_r1"] == 0.0 and m["v2t_r5"] == 100.0
    assert m["v2t_medr"] == 2.5 and m["v2t_meanr"] == pytest.approx(11 / 4)
    with pytest.raises(ValueError):
        retrieval_metrics(sim, [0, 1, 1, 2, 9])


def test_interleave_order_is_the_same_on_every_rank_and_proportional():
    order = vl_data.interleave_order([7, 3], seed=5, epoch=2)
    assert sorted(order) == [0] * 7 + [1] * 3
    assert order == vl_data.interleave_order([7, 3], seed=5, epoch=2)
    assert order != vl_data.interleave_order([7, 3], seed=5, epoch=3)


class _FakeCaptions(torch.utils.data.Dataset):
    def __init__(self, media, n):
        self.media, self.n = media, n

    def __len__(self):
        return self.n

    def __getitem__(self, position):
        return {"media": torch.zeros(1, 2, 2, 3, dtype=torch.uint8), "caption": f"{self.media}{position}",
                "id": position, "skipped": []}


def _stream(rank, world, start=0, per_rank=2):
    return vl_data.InterleavedStream([_FakeCaptions("video", 24), _FakeCaptions("image", 13)], per_rank, seed=1,
                                     start_step=start, rank=rank, world_size=world)


def test_interleaved_stream_same_media_order_on_every_rank_and_disjoint_batches():
    streams = [_stream(r, 2) for r in range(2)]
    assert streams[0].steps_per_media == [6, 3]  # 24 // 4, 13 // 4 (the tail is dropped)
    for _ in range(20):  # over two epochs
        (m0, b0), (m1, b1) = next(streams[0]), next(streams[1])
        assert m0 == m1
        assert not set(b0["ids"].tolist()) & set(b1["ids"].tolist())


def test_interleaved_stream_resumes_where_it_stopped():
    full = _stream(0, 1)
    seen = [next(full) for _ in range(15)]
    resumed = _stream(0, 1, start=8)
    for media, batch in seen[8:]:
        m, b = next(resumed)
        assert m == media and b["captions"] == batch["captions"]


def test_random_resized_crop_box_stays_inside_and_in_scale():
    rng = random.Random(0)
    for _ in range(200):
        x, y, w, h = vl_data.random_resized_crop_box(320, 240, rng, scale=vl_data.RRC_SCALE)
        assert 0 <= x and x + w <= 320 and 0 <= y and y + h <= 240
        assert 0.5 * 320 * 240 * 0.97 <= w * h <= 320 * 240


def test_caption_lists_give_one_sample_per_caption_with_the_media_id(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text('[{"video": "a.mp4", "caption": ["one", "two"]}, {"image": "/abs/b.jpg", "caption": "three"},'
                    ' {"video": "c.mp4", "caption": "four"}]')
    entries = vl_data.read_caption_json(str(path), root="/data")
    videos = vl_data.caption_records(entries, "video")
    assert [(r.path, r.caption, r.media_id) for r in videos] == [
        ("/data/a.mp4", "one", 0), ("/data/a.mp4", "two", 0), ("/data/c.mp4", "four", 2)]
    assert [(r.path, r.media_id) for r in vl_data.caption_records(entries, "image")] == [("/abs/b.jpg", 1)]
    path.write_text('[{"video": "a.mp4"}]')
    with pytest.raises(ValueError, match="caption"):
        vl_data.read_caption_json(str(path))


def test_caption_collate_tokenizes_in_the_loader():
    from umt_fast.models.text import load_tokenizer

    collate = vl_data.CaptionCollate(load_tokenizer("minilm"), max_len=8)
    samples = [_FakeCaptions("video", 2)[i] for i in range(2)]
    batch = collate(samples)
    assert batch["text_ids"].shape == batch["text_mask"].shape == (2, 8)
    assert batch["text_ids"][0, 0].item() == 101 and batch["captions"] == ["video0", "video1"]  # [CLS]
    assert 102 not in batch["text_ids"].tolist()[0]  # no [SEP], as the reference
    assert "text_ids" not in vl_data.collate_captions(samples)
