"""Mask policies and the alignment loss as the engine uses them."""
import pytest
import torch

from umt_fast.losses import alignment_loss
from umt_fast.masking import num_visible, sample_visible_tokens, visible_tokens_per_clip

B, T, P = 3, 4, 49


def _sample(policy, ratio=0.8, cls_attn=None, offset=0):
    return sample_visible_tokens(policy, batch_size=B, num_frames=T, patches_per_frame=P, ratio=ratio,
                                 seed=0, offset=offset, device=torch.device("cpu"), cls_attn_BTP=cls_attn)


def test_reference_visible_counts():
    assert num_visible(196, 0.8) == 40  # 196 - int(156.8)
    assert visible_tokens_per_clip("attention", 8, 196, 0.8) == 320
    assert visible_tokens_per_clip("tube", 8, 196, 0.8) == 320
    assert visible_tokens_per_clip("random", 8, 196, 0.8) == 1568 - 1254


@pytest.mark.parametrize("policy", ["attention", "tube"])
def test_per_frame_policies_keep_exact_counts_per_frame(policy):
    idx = _sample(policy, cls_attn=torch.rand(B, T, P))
    n = num_visible(P, 0.8)
    assert idx.shape == (B, T * n)
    assert (idx[:, 1:] > idx[:, :-1]).all()
    frames = idx // P
    for t in range(T):
        assert ((frames == t).sum(dim=1) == n).all()


def test_tube_repeats_one_spatial_mask_over_frames():
    idx = _sample("tube").view(B, T, -1) % P
    assert (idx == idx[:, :1]).all()
    assert not (idx[0] == idx[1]).all(), "different clips draw different tubes"


def test_random_policy_counts_over_the_whole_clip():
    idx = _sample("random")
    assert idx.shape == (B, T * P - int(T * P * 0.8))
    assert (idx[:, 1:] > idx[:, :-1]).all()


def test_attention_policy_follows_the_teacher():
    n = num_visible(P, 0.8)
    attn = torch.zeros(B, T, P)
    chosen = torch.stack([torch.randperm(P)[:n].sort().values for _ in range(B * T)]).view(B, T, n)
    attn.scatter_(2, chosen, 1.0)
    idx = _sample("attention", cls_attn=attn).view(B, T, n)
    assert torch.equal(idx - torch.arange(T).view(1, T, 1) * P, chosen)


def test_attention_policy_requires_the_attention():
    with pytest.raises(ValueError, match="cls_attn"):
        _sample("attention")
    with pytest.raises(ValueError, match="policy"):
        _sample("block")


def test_alignment_loss_is_the_reference_formula():
    s = torch.nn.functional.normalize(torch.randn(2, 3, 5, 8, dtype=torch.float64), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(2, 3, 5, 8, dtype=torch.float64), dim=-1)
    expected = (2 - 2 * (s * t).sum(dim=-1)).mean()
    loss = alignment_loss(s, t)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert alignment_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="same"):
        alignment_loss(s, t[:, :, :4])


@pytest.mark.parametrize("policy", ["attention", "tube", "random"])
def test_masks_do_not_depend_on_how_the_batch_is_split(policy):
    attn = torch.rand(4, T, P)
    kwargs = dict(num_frames=T, patches_per_frame=P, ratio=0.8, seed=3, offset=7, device=torch.device("cpu"))
    whole = sample_visible_tokens(policy, batch_size=4, cls_attn_BTP=attn, **kwargs)
    parts = [sample_visible_tokens(policy, batch_size=2, cls_attn_BTP=attn[i:i + 2], first_clip=i, **kwargs) for i in (0, 2)]
    assert torch.equal(torch.cat(parts), whole)
