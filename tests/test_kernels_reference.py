"""umt_kernels reference ops against hand-worked values and exact probabilities."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import umt_kernels
from umt_kernels import reference, rng


def _exact_inclusion(weights: list[float], k: int) -> list[float]:
    """P(item i among the first k sequential draws without replacement, prob. prop. to w)."""
    incl = [0.0] * len(weights)
    total = sum(weights)
    for seq in itertools.permutations(range(len(weights)), k):
        p, left = 1.0, total
        for i in seq:
            p *= weights[i] / left
            left -= weights[i]
        for i in seq:
            incl[i] += p
    return incl


@pytest.mark.parametrize("weights,k", [([0.5, 0.2, 0.15, 0.1, 0.05], 2), ([3.0, 1.0, 1.0, 0.5, 0.25, 0.25], 3)])
def test_weighted_inclusion_frequencies_match_exact_probabilities(weights, k):
    draws = 40_000
    w = torch.tensor(weights).expand(draws, -1).contiguous()
    idx = umt_kernels.sample_without_replacement(w, k, seed=123, offset=0)
    freq = torch.zeros(len(weights)).index_add_(0, idx.flatten(), torch.ones(idx.numel())) / draws
    exact = torch.tensor(_exact_inclusion(weights, k))
    sigma = (exact * (1 - exact) / draws).sqrt()
    assert ((freq - exact).abs() <= 5 * sigma + 1e-4).all(), (freq, exact)
    # Without replacement differs from top-k and from with-replacement: sanity that the
    # exact answer is not trivially 0/1 so the check is meaningful.
    assert ((exact > 0.05) & (exact < 0.95)).sum() >= 3


@pytest.mark.parametrize("G,N,k", [(7, 13, 1), (3, 13, 13), (5, 49, 10), (1, 196, 40)])
def test_sampled_indices_are_sorted_unique_and_counted(G, N, k):
    w = torch.rand(G, N) + 0.01
    idx = umt_kernels.sample_without_replacement(w, k, seed=1, offset=2)
    assert idx.shape == (G, k) and idx.dtype == torch.int64
    assert (idx[:, 1:] > idx[:, :-1]).all(), "strictly ascending means sorted and no duplicates"
    assert ((idx >= 0) & (idx < N)).all()


def test_sampling_is_reproducible_and_depends_on_seed_and_offset():
    w = torch.rand(16, 50)
    a = umt_kernels.sample_without_replacement(w, 10, seed=5, offset=7)
    assert torch.equal(a, umt_kernels.sample_without_replacement(w, 10, seed=5, offset=7))
    assert not torch.equal(a, umt_kernels.sample_without_replacement(w, 10, seed=5, offset=8))
    assert not torch.equal(a, umt_kernels.sample_without_replacement(w, 10, seed=6, offset=7))


@pytest.mark.parametrize("seed", [0, 5, 2**32 - 1])
def test_a_device_offset_mixes_to_the_host_key(seed):
    for offset in (0, 1, 7, 2**31, 2**40 + 3, 2**62, 2**63 - 1):
        assert rng.mix_seed_on_device(seed, torch.tensor(offset)).item() == rng.mix_seed(seed, offset)


def test_a_tensor_offset_draws_what_the_int_offset_draws():
    w, x = torch.rand(6, 30), torch.randn(6, 30, 5)
    for offset in (0, 9, 123456789012):
        t = torch.tensor(offset)
        for mode in ("weighted", "uniform"):
            expected = umt_kernels.sample_without_replacement(w, 7, seed=3, offset=offset, row_offset=2, mode=mode)
            got = umt_kernels.sample_without_replacement(w, 7, seed=3, offset=t, row_offset=2, mode=mode)
            assert torch.equal(got, expected)
        idx, rows = umt_kernels.select_and_gather(w, x, 7, seed=3, offset=t)
        assert torch.equal(idx, umt_kernels.sample_without_replacement(w, 7, seed=3, offset=offset))
        assert torch.equal(rows, reference.gather_rows(x, idx))


@pytest.mark.parametrize("bad", [torch.tensor(1.0), torch.tensor([1]), torch.tensor(1, dtype=torch.int32)])
def test_a_bad_tensor_offset_is_refused(bad):
    with pytest.raises(ValueError, match="0-dim int64"):
        umt_kernels.sample_without_replacement(torch.rand(2, 5), 2, seed=0, offset=bad)


def test_topk_mode_keeps_the_largest_weights_ties_in_index_order():
    w = torch.tensor([[0.1, 0.5, 0.5, 0.2, 0.9], [3.0, -1.0, 2.0, 2.0, 2.0]])
    assert umt_kernels.sample_without_replacement(w, 3, seed=0, mode="topk").tolist() == [[1, 2, 4], [0, 2, 3]]
    assert umt_kernels.sample_without_replacement(w, 2, seed=0, mode="topk").tolist() == [[1, 4], [0, 2]]
    x = torch.randn(7, 40)
    for seed, offset in ((0, 0), (5, 9)):
        idx = umt_kernels.sample_without_replacement(x, 6, seed=seed, offset=offset, mode="topk")
        assert torch.equal(idx, torch.topk(x, 6, dim=1).indices.sort(dim=1).values)


def test_noise_is_uniform_and_a_function_of_the_global_row():
    u = rng.uniform_noise((4000, 50), seed=3, offset=1, device=torch.device("cpu")).double()
    assert ((u >= 0) & (u < 1)).all()
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / u.numel())
    hist = torch.histc(u, bins=16, min=0, max=1) / u.numel()
    assert (hist - 1 / 16).abs().max() < 5 * math.sqrt((1 / 16) * (15 / 16) / u.numel())
    lag = torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1]
    assert abs(lag.item()) < 5 / math.sqrt(u.numel())
    tail = rng.uniform_noise((10, 50), seed=3, offset=1, row_offset=3990, device=torch.device("cpu"))
    assert torch.equal(tail.double(), u[3990:])


def test_zero_weight_items_are_never_drawn_while_positive_ones_remain():
    w = torch.zeros(500, 10)
    w[:, [1, 4, 8]] = torch.tensor([0.1, 5.0, 1.0])
    idx = umt_kernels.sample_without_replacement(w, 3, seed=0, offset=0)
    assert torch.equal(idx, torch.tensor([1, 4, 8]).expand(500, 3))


def test_uniform_mode_is_uniform():
    draws, N, k = 20_000, 8, 3
    idx = umt_kernels.sample_without_replacement(torch.empty(draws, N), k, seed=9, offset=0, mode="uniform")
    freq = torch.bincount(idx.flatten(), minlength=N) / draws
    assert (freq - k / N).abs().max() < 5 * math.sqrt((k / N) * (1 - k / N) / draws)


def test_sampler_rejects_bad_k_and_shapes():
    with pytest.raises(ValueError, match="k must be in"):
        umt_kernels.sample_without_replacement(torch.rand(2, 5), 6, seed=0)
    with pytest.raises(ValueError, match="2-D"):
        umt_kernels.sample_without_replacement(torch.rand(5), 1, seed=0)


def test_cls_attention_matches_materialised_softmax_in_float64():
    G, H, N, D = 3, 4, 17, 8
    q = torch.randn(G, H, N, D, dtype=torch.float64)
    k = torch.randn(G, H, N, D, dtype=torch.float64)
    full = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1)  # [G, H, N, N]
    expected = full[:, :, 0, :].mean(dim=1)
    got = umt_kernels.cls_attention(q[:, :, 0], k, scale=D**-0.5)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)


def test_gather_patches_returns_the_pixels_of_each_kept_patch():
    B, C, T, H, W, p = 2, 3, 2, 32, 48, 16
    video = torch.randn(B, C, T, H, W)
    gw, P = W // p, (H // p) * (W // p)
    idx = torch.tensor([[0, 5, 7, 11], [1, 2, 6, 10]])
    out = umt_kernels.gather_patches(video, idx, p)
    assert out.shape == (B, 4, C * p * p)
    for b in range(B):
        for j, token in enumerate(idx[b].tolist()):
            t, rest = divmod(token, P)
            h, w = divmod(rest, gw)
            patch = video[b, :, t, h * p:(h + 1) * p, w * p:(w + 1) * p]
            assert torch.equal(out[b, j], patch.flatten())


def test_gather_patches_then_linear_equals_conv3d_patch_embedding():
    video, weight, bias = torch.randn(1, 3, 2, 32, 32), torch.randn(8, 3, 1, 16, 16), torch.randn(8)
    idx = torch.tensor([[0, 3, 6]])
    conv = F.conv3d(video, weight, bias, stride=(1, 16, 16)).flatten(2).transpose(1, 2)
    sparse = F.linear(umt_kernels.gather_patches(video, idx, 16), weight.flatten(1), bias)
    torch.testing.assert_close(sparse, conv[:, [0, 3, 6]], atol=1e-4, rtol=1e-5)


def test_gather_rows_backward_scatters_into_the_gathered_rows():
    x = torch.randn(2, 5, 3, requires_grad=True)
    idx = torch.tensor([[0, 4], [2, 3]])
    umt_kernels.gather_rows(x, idx).sum().backward()
    expected = torch.zeros(2, 5, 3)
    expected[0, [0, 4]] = 1
    expected[1, [2, 3]] = 1
    assert torch.equal(x.grad, expected)


def test_select_and_gather_gathers_the_sampled_rows():
    scores, x = torch.rand(4, 9), torch.randn(4, 9, 5)
    idx, rows = umt_kernels.select_and_gather(scores, x, 3, seed=2, offset=1)
    assert torch.equal(idx, umt_kernels.sample_without_replacement(scores, 3, seed=2, offset=1))
    assert torch.equal(rows, x[torch.arange(4)[:, None], idx])


def test_alignment_loss_hand_worked_value():
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]).view(1, 1, 4, 2)
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.5, math.sqrt(3) / 2]]).view(1, 1, 4, 2)
    # 2 - 2cos: 0, 2, 4, 1 -> mean 1.75
    assert umt_kernels.alignment_loss(s, t).item() == pytest.approx(1.75, abs=1e-6)


def test_cls_attention_stays_fp32_under_bf16_autocast():
    q, k = torch.randn(2, 2, 8, dtype=torch.float64), torch.randn(2, 2, 33, 8, dtype=torch.float64)
    expected = torch.softmax(torch.einsum("ghd,ghnd->ghn", q, k) * 8**-0.5, dim=-1).mean(dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = umt_kernels.cls_attention(q.float(), k.float(), 8**-0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)


# Gradients of every differentiable op, checked numerically in float64 (reference path).


def _f64(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def test_gradcheck_gather_ops():
    idx = torch.tensor([[0, 2, 2], [4, 1, 3]])  # repeated index: gradients must add up
    assert torch.autograd.gradcheck(lambda x: umt_kernels.gather_rows(x, idx), (_f64(2, 5, 3),))
    scores = torch.rand(2, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: umt_kernels.select_and_gather(scores, x, 2, seed=1, offset=0)[1], (_f64(2, 5, 3),)
    )
    patch_idx = torch.tensor([[0, 3]])
    assert torch.autograd.gradcheck(lambda v: umt_kernels.gather_patches(v, patch_idx, 2), (_f64(1, 2, 1, 4, 4),))


def test_gradcheck_cls_attention_and_alignment_loss():
    assert torch.autograd.gradcheck(lambda q, k: umt_kernels.cls_attention(q, k, 0.5), (_f64(2, 2, 3), _f64(2, 2, 5, 3, seed=1)))
    assert torch.autograd.gradcheck(umt_kernels.alignment_loss, (_f64(2, 3, 4, 6), _f64(2, 3, 4, 6, seed=1)))


def test_ops_compile_with_fullgraph_on_the_reference_path():
    def step(w, x, s, t):
        idx, rows = umt_kernels.select_and_gather(w, x, 3, seed=0, offset=1)
        return umt_kernels.alignment_loss(s, t) + rows.sum() + umt_kernels.gather_rows(x, idx).sum()

    x = torch.randn(2, 9, 4, requires_grad=True)
    args = (torch.rand(2, 9), x, torch.randn(2, 3, 8, requires_grad=True), torch.randn(2, 3, 8))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    torch.testing.assert_close(out, step(*args))
    out.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_ops_compile_with_fullgraph_with_a_device_offset():
    def draw(w, counter):
        uniform = umt_kernels.sample_without_replacement(w, 3, seed=0, offset=counter, mode="uniform")
        return umt_kernels.sample_without_replacement(w, 3, seed=0, offset=counter), uniform

    w, counter = torch.rand(4, 9), torch.tensor(5)
    compiled = torch.compile(draw, fullgraph=True, backend="aot_eager")
    for value in (5, 6):  # the same compiled graph reads the counter's new value
        counter.fill_(value)
        expected = [umt_kernels.sample_without_replacement(w, 3, seed=0, offset=value, mode=m) for m in ("weighted", "uniform")]
        for got, want in zip(compiled(w, counter), expected):
            assert torch.equal(got, want)


def test_derive_seed_chains_mix_seed_over_its_parts():
    import zlib

    assert rng.derive_seed(7) == 7
    assert rng.derive_seed(7, 3) == rng.mix_seed(7, 3)
    assert rng.derive_seed(7, "clips", 3) == rng.mix_seed(rng.mix_seed(7, zlib.crc32(b"clips")), 3)
    seeds = {rng.derive_seed(0, stream, epoch) for stream in ("a", "b") for epoch in range(50)}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)
