"""Every attention backend that can run here agrees with a float64 softmax(q k^T) v."""
import pytest
import torch

from umt_fast.models import attention

GPU = torch.cuda.is_available()


def _runnable(name: str) -> bool:
    if name == "flash_attn_4":
        return attention.flash_attn_4_available()
    if name in ("sdpa_cudnn", "sdpa_efficient"):
        return GPU
    return True


@pytest.mark.parametrize("name", attention.BACKENDS)
def test_backends_agree(name):
    if not _runnable(name):
        pytest.skip(f"{name} cannot run on this machine")
    device = torch.device("cuda" if GPU else "cpu")
    dtype = torch.bfloat16 if GPU and name != "math" else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 64, generator=g).to(device, dtype) for _ in range(3))
    expected = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8.0, dim=-1) @ v.double()
    with attention.attention_backend(name):
        got = attention.multi_head_attention(q, k, v)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)


def test_unknown_or_unavailable_backend_is_refused():
    with pytest.raises(ValueError, match="must be one of"):
        attention.set_attention_backend("xformers")
    if not attention.flash_attn_4_available():
        with pytest.raises(ValueError, match="flash-attn-4"):
            attention.set_attention_backend("flash_attn_4")
    assert attention.get_attention_backend() == "auto"
