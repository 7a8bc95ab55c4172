"""The Triton kernels against their references: interpreter on the CPU, compiled on a GPU.

Shapes stay small (the interpreter runs every program in Python); odd sizes that are not
multiples of the block, k = 1 and k = N, fp32 and bf16, and non-contiguous inputs.
"""
import itertools
import math

import pytest
import torch

import umt_kernels
from umt_kernels import reference
from umt_kernels._backend import triton_can_run

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_can_run(DEVICE), reason="needs a GPU or TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _triton_backend():
    with umt_kernels.backend("triton"):
        yield


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("G,N,k", [(3, 7, 1), (2, 7, 7), (4, 50, 10), (2, 196, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["weighted", "uniform", "topk"])
def test_sampler_draws_exactly_what_the_reference_draws(G, N, k, dtype, mode):
    weights = _rand(G, N, dtype=dtype) + 0.01
    idx = umt_kernels.sample_without_replacement(weights, k, seed=11, offset=3, row_offset=5, mode=mode)
    with umt_kernels.backend("reference"):
        expected = umt_kernels.sample_without_replacement(weights, k, seed=11, offset=3, row_offset=5, mode=mode)
    assert torch.equal(idx, expected)
    assert idx.shape == (G, k) and (idx[:, 1:] > idx[:, :-1]).all()


def test_a_slice_of_the_batch_draws_what_the_whole_batch_draws():
    weights = _rand(6, 30)
    whole = umt_kernels.sample_without_replacement(weights, 7, seed=2, offset=8)
    halves = [umt_kernels.sample_without_replacement(weights[i:i + 3], 7, seed=2, offset=8, row_offset=i) for i in (0, 3)]
    assert torch.equal(torch.cat(halves), whole)


def test_a_device_offset_draws_what_the_int_offset_draws():
    """The key read from memory (CUDA-graph replays) keys the same draw as the scalar key."""
    weights, rows = _rand(5, 29), _randn(5, 29, 70)
    for offset in (4, 2**40 + 1):
        t = torch.tensor(offset, device=DEVICE)
        for mode in ("weighted", "uniform"):
            expected = reference.sample_without_replacement(weights, 6, seed=1, offset=offset, row_offset=3, mode=mode)
            got = umt_kernels.sample_without_replacement(weights, 6, seed=1, offset=t, row_offset=3, mode=mode)
            assert torch.equal(got, expected)
        idx, gathered = umt_kernels.select_and_gather(weights, rows, 6, seed=1, offset=t)
        assert torch.equal(idx, reference.sample_without_replacement(weights, 6, seed=1, offset=offset))
        assert torch.equal(gathered, reference.gather_rows(rows, idx))


def test_sampler_reads_non_contiguous_weights():
    weights_NG = _rand(33, 4) + 0.01
    idx = umt_kernels.sample_without_replacement(weights_NG.t(), 5, seed=1, offset=0)
    assert torch.equal(idx, umt_kernels.sample_without_replacement(weights_NG.t().contiguous(), 5, seed=1, offset=0))


def test_sampler_is_reproducible_and_varies_with_seed_and_offset():
    weights = _rand(4, 30)
    draw = lambda s, o: umt_kernels.sample_without_replacement(weights, 6, seed=s, offset=o)  # noqa: E731
    assert torch.equal(draw(1, 2), draw(1, 2))
    assert not torch.equal(draw(1, 2), draw(1, 3))
    assert not torch.equal(draw(1, 2), draw(2, 2))


def test_zero_weights_are_drawn_last_and_ties_break_by_index():
    weights = torch.zeros(2, 9, device=DEVICE)
    weights[:, [2, 5]] = 1.0
    assert torch.equal(umt_kernels.sample_without_replacement(weights, 2, seed=0).cpu(), torch.tensor([[2, 5], [2, 5]]))
    # k exceeds the positive items: all of them, then the lowest-index zero-weight items
    assert torch.equal(umt_kernels.sample_without_replacement(weights, 4, seed=0).cpu(), torch.tensor([[0, 1, 2, 5]] * 2))


def _exact_inclusion(weights, k):
    incl, total = [0.0] * len(weights), sum(weights)
    for seq in itertools.permutations(range(len(weights)), k):
        p, left = 1.0, total
        for i in seq:
            p, left = p * weights[i] / left, left - weights[i]
        for i in seq:
            incl[i] += p
    return torch.tensor(incl)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="many programs: too slow for the interpreter")
def test_kernel_inclusion_frequencies_on_gpu():
    weights, k, draws = [3.0, 1.0, 1.0, 0.5, 0.25, 0.25], 3, 200_000
    idx = umt_kernels.sample_without_replacement(torch.tensor(weights, device=DEVICE).expand(draws, -1), k, seed=3)
    freq = torch.bincount(idx.flatten().cpu(), minlength=6) / draws
    exact = _exact_inclusion(weights, k)
    assert ((freq - exact).abs() <= 5 * (exact * (1 - exact) / draws).sqrt() + 1e-4).all()


# ------------------------------------------------------------------------- cls_attention


@pytest.mark.parametrize("G,H,N,D", [(3, 2, 17, 8), (2, 3, 197, 64), (1, 1, 5, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cls_attention_matches_float64_softmax(G, H, N, D, dtype):
    q_GHND, k_GHND = _randn(G, H, N, D, dtype=dtype, seed=1), _randn(G, H, N, D, dtype=dtype, seed=2)
    got = umt_kernels.cls_attention(q_GHND[:, :, 0], k_GHND, D**-0.5)  # a strided slice, as the teacher passes it
    q64, k64 = q_GHND.double(), k_GHND.double()
    expected = torch.softmax(q64 @ k64.transpose(-1, -2) * D**-0.5, dim=-1)[:, :, 0].mean(dim=1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)


# --------------------------------------------------------------------- gathers and loss


@pytest.mark.parametrize("G,N,K,C", [(2, 11, 1, 5), (3, 11, 11, 70), (2, 40, 9, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_rows_and_its_backward(G, N, K, C, dtype):
    x_CNG = _randn(C, N, G, dtype=dtype).requires_grad_()
    x = x_CNG.permute(2, 1, 0)  # non-contiguous [G, N, C]
    idx = torch.randint(0, N, (G, K), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out = umt_kernels.gather_rows(x, idx)
    assert torch.equal(out, x.detach()[torch.arange(G, device=DEVICE)[:, None], idx])
    grad = _randn(G, K, C, dtype=dtype, seed=4)
    out.backward(grad)
    x_ref = x.detach().clone().requires_grad_()
    reference.gather_rows(x_ref, idx).backward(grad)
    torch.testing.assert_close(x_CNG.grad.permute(2, 1, 0), x_ref.grad)


# The last case spans several row blocks (k > 64) and channel splits, one of them partial.
@pytest.mark.parametrize("G,N,k,C", [(3, 13, 1, 70), (2, 13, 13, 8), (4, 196, 40, 96), (2, 150, 70, 300)])
def test_select_and_gather_is_the_sampler_plus_the_gather(G, N, k, C):
    scores = _rand(G, N, seed=5)
    x = _randn(G, N, C, seed=6).requires_grad_()
    idx, rows = umt_kernels.select_and_gather(scores, x, k, seed=9, offset=4, row_offset=2)
    assert torch.equal(idx, umt_kernels.sample_without_replacement(scores, k, seed=9, offset=4, row_offset=2))
    assert torch.equal(rows, x.detach()[torch.arange(G, device=DEVICE)[:, None], idx])
    rows.sum().backward()
    expected = torch.zeros(G, N, device=DEVICE).scatter_(1, idx, 1.0)
    assert torch.equal(x.grad, expected[..., None].expand(G, N, C))


@pytest.mark.parametrize("patch,dtype", [(16, torch.float32), (8, torch.bfloat16), (16, torch.uint8)])
def test_gather_patches_matches_the_reference(patch, dtype):
    B, C, T, H, W = 2, 3, 3, 2 * patch, 3 * patch
    video = (_rand(B, T, H, W, C, seed=7) * 255).to(dtype).permute(0, 4, 1, 2, 3)  # channels-last storage
    P = (H // patch) * (W // patch)
    idx = torch.stack([torch.randperm(T * P, generator=torch.Generator().manual_seed(b))[:7].sort().values
                       for b in range(B)]).to(DEVICE)
    assert torch.equal(umt_kernels.gather_patches(video, idx, patch), reference.gather_patches(video, idx, patch))


def test_gather_patches_backward_scatters_into_the_kept_patches():
    video = _randn(1, 3, 2, 32, 32, seed=8).requires_grad_()
    idx = torch.tensor([[1, 6]], device=DEVICE)
    umt_kernels.gather_patches(video, idx, 16).sum().backward()
    expected = torch.zeros(1, 3, 2, 32, 32, device=DEVICE)
    expected[:, :, 0, 0:16, 16:32] = 1  # token 1: frame 0, row 0, col 1
    expected[:, :, 1, 16:32, 0:16] = 1  # token 6: frame 1, row 1, col 0
    assert torch.equal(video.grad, expected)


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 3, 5, 37), (6, 2, 7, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_alignment_loss_forward_and_backward_match_the_reference(shape, dtype):
    s = _randn(*shape, dtype=dtype, seed=9).requires_grad_()
    t = _randn(*shape, dtype=dtype, seed=10).requires_grad_()
    loss = umt_kernels.alignment_loss(s, t)
    s64, t64 = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    expected = reference.alignment_loss(s64, t64)
    expected.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    loss.backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(t.grad.double(), t64.grad, atol=tol, rtol=tol)


def test_alignment_loss_only_computes_the_gradients_asked_for():
    s = _randn(2, 4, 16, seed=11).requires_grad_()
    t = _randn(2, 4, 16, seed=12)
    umt_kernels.alignment_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_ops_trace_into_one_compiled_graph():
    def step(weights, x, video, idx, s, t):
        vis, rows = umt_kernels.select_and_gather(weights, x, 3, seed=0, offset=1)
        attn = umt_kernels.cls_attention(x[:, None, 0, :8], x[:, None, :, :8], 0.3)
        return (umt_kernels.alignment_loss(s, t) + rows.sum() + attn.sum()
                + umt_kernels.gather_patches(video, idx, 16).sum() + umt_kernels.gather_rows(x, vis).sum())

    args = (_rand(2, 9), _randn(2, 9, 16), _randn(1, 3, 1, 32, 32), torch.tensor([[0, 3]], device=DEVICE),
            _randn(2, 3, 8), _randn(2, 3, 8))
    compiled = torch.compile(step, fullgraph=True, backend="inductor" if DEVICE.type == "cuda" else "aot_eager")
    torch.testing.assert_close(compiled(*args), step(*args))
