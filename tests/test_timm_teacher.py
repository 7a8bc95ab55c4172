"""timm ViTs as the unmasked teacher: CLS attention and targets against the same timm model
computed independently in float64 (timm's own forward_intermediates, an explicit softmax),
the family's pixels, loading weights in timm's naming, and the clear refusals."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from umt_fast import interop
from umt_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from umt_fast.masking import mask_and_targets

SMALL = dict(depth=3, embed_dim=64, num_heads=2)
K = 2


def _teacher(name, resolution, **kwargs):
    torch.manual_seed(0)
    teacher = interop.load_teacher(None, input_resolution=resolution, return_layers=K, arch=f"timm:{name}",
                                   **SMALL, **kwargs)  # fmt: skip
    return teacher.double()


def _clip(T=2, size=32, seed=1):
    return torch.randn(2, 3, T, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _frames(video, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """[B, 3, T, H, W] ImageNet-normalised -> [B*T, 3, H, W] normalised to (mean, std)."""
    B, C, T, H, W = video.shape
    x = video.transpose(1, 2).reshape(B * T, C, H, W)
    pixels = x * torch.tensor(IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    return (pixels - torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)) / torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)


def _explicit_cls_row(block, x):
    """The last block's full attention matrix, heads averaged, the CLS row: [N, S]."""
    attn = block.attn
    N, S, _ = x.shape
    q, k, _ = attn.qkv(block.norm1(x)).reshape(N, S, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return torch.softmax((q * attn.scale) @ k.transpose(-1, -2), dim=-1).mean(1)[:, 0]


@pytest.mark.parametrize("name, resolution, prefix", [
    ("vit_base_patch16_clip_224.openai", 32, 1),          # CLS token, head = the token projection
    ("vit_small_patch14_reg4_dinov2.lvd142m", 28, 5),     # CLS + 4 registers, no projection
    ("vit_intern300m_patch14_448", 28, 1),                 # InternViT
])  # fmt: skip
def test_cls_attention_and_targets_match_timm(name, resolution, prefix):
    teacher = _teacher(name, resolution)
    model = teacher.model
    video = _clip(size=resolution)
    out = teacher(video)
    B, T = 2, 2
    P = (resolution // model.patch_embed.patch_size[0]) ** 2
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if "clip" in name else (model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    frames = _frames(video, mean, std)
    with torch.no_grad():
        depth = len(model.blocks)
        before_last = model.forward_intermediates(frames, indices=[depth - 2], norm=False, output_fmt="NLC",
                                                  intermediates_only=True, return_prefix_tokens=True)[0]  # fmt: skip
        tokens = torch.cat([before_last[1], before_last[0]], dim=1)  # (patches, prefix) -> prefix first
        expected_attn = _explicit_cls_row(model.blocks[-1], tokens)[:, prefix:].reshape(B, T, P)
        taps = model.forward_intermediates(frames, indices=K, norm=False, output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(out.cls_attn.double(), expected_attn, atol=1e-6, rtol=1e-5)
    assert out.cls_attn.dtype == torch.float32 and out.cls_attn.shape == (B, T, P)
    assert out.cls_attn.sum(-1).max() < 1  # the prefix keys keep their share: not renormalised

    idx = torch.tensor([[0, 3, P + 1], [2, P, 2 * P - 1]])
    targets = out.targets(idx)
    assert targets.shape == (K, B, 3, teacher.arch.output_dim)
    for layer, tap in enumerate(taps):
        rows = tap.reshape(B, T * P, -1)[torch.arange(B)[:, None], idx]
        expected = model.norm(rows)
        if "clip" in name:
            expected = model.head(expected)
        torch.testing.assert_close(targets[layer], F.normalize(expected, dim=-1), atol=1e-10, rtol=1e-10)
    assert teacher.arch.output_dim == (model.head.out_features if "clip" in name else 64)


@pytest.mark.parametrize("name", ["vit_base_patch16_siglip_224", "vit_base_patch16_siglip_224.v2_webli"])
def test_siglip_uses_its_attention_pool_probe_and_its_own_pixels(name):
    teacher = _teacher(name, 32)
    model = teacher.model
    video = _clip()
    out = teacher(video)
    frames = _frames(video, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # SigLIP's pretrained_cfg, not ImageNet's
    pool = model.attn_pool
    with torch.no_grad():
        final = model.forward_features(frames)  # after the final norm; SigLIP has no prefix tokens
        N, S, C = final.shape
        k = pool.kv(final).reshape(N, S, 2, pool.num_heads, -1).permute(2, 0, 3, 1, 4)[0]
        q = pool.q(pool.latent).reshape(1, -1, pool.num_heads, pool.head_dim).transpose(1, 2)
        probe = torch.softmax((pool.q_norm(q) * pool.scale) @ pool.k_norm(k).transpose(-1, -2), dim=-1).mean(1)[:, 0]
    torch.testing.assert_close(out.cls_attn.double(), probe.reshape(2, 2, -1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.cls_attn.sum(-1), torch.ones(2, 2), atol=1e-5, rtol=0)  # patches are all its keys


def test_a_teacher_without_cls_or_pool_refuses_the_attention_policy_only():
    teacher = _teacher("vit_base_patch16_224.augreg_in21k", 32, class_token=False, global_pool="avg")
    out = teacher(_clip())
    assert out.cls_attn is None
    with pytest.raises(ValueError, match="--mask.policy attention needs the teacher's CLS"):
        mask_and_targets(out, "attention", ratio=0.5, seed=0, offset=0)
    idx, targets = mask_and_targets(out, "tube", ratio=0.5, seed=0, offset=0)
    assert idx.shape == (2, 2 * 2) and targets.shape == (K, 2, 4, 64)


def test_weights_in_timm_naming_load(tmp_path):
    source = _teacher("vit_small_patch14_reg4_dinov2.lvd142m", 28).float()
    path = tmp_path / "dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    torch.manual_seed(123)  # a different random init, replaced by the file
    loaded = interop.load_teacher(str(path), input_resolution=28, return_layers=K,
                                  arch="timm:vit_small_patch14_reg4_dinov2.lvd142m", **SMALL)  # fmt: skip
    video = _clip(size=28).float()
    a, b = source(video), loaded(video)
    torch.testing.assert_close(a.cls_attn, b.cls_attn, atol=0, rtol=0)
    torch.testing.assert_close(a.streams, b.streams, atol=0, rtol=0)


@pytest.mark.parametrize("name, resolution", [
    ("eva02_base_patch16_clip_224", 32),      # EVA-CLIP: rotary embedding, CLS, the CLIP projection
    ("vit_pe_core_base_patch16_224", 32),     # PE-core: rotary embedding, CLS and an attention pool
    ("vit_base_patch16_dinov3", 32),          # DINOv3: rotary embedding, CLS + 4 registers
])  # fmt: skip
def test_rope_families_match_timms_explicit_softmax(name, resolution):
    """The CLS row read from what timm hands to SDPA equals the attention matrix timm's own manual
    path computes (softmax, then attn_drop: hooked there), rotary embedding and all."""
    import copy

    teacher = _teacher(name, resolution)
    reference = copy.deepcopy(teacher.model)
    last = reference.blocks[-1].attn
    last.fused_attn = False
    seen = {}
    last.attn_drop.register_forward_hook(lambda module, args, out: seen.__setitem__("attn", args[0]))
    video = _clip(size=resolution)
    out = teacher(video)
    model = teacher.model
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if "_clip_" in name else (model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    frames = _frames(video, mean, std)
    with torch.no_grad():
        reference.forward_features(frames)
        taps = model.forward_intermediates(frames, indices=K, norm=False, output_fmt="NLC", intermediates_only=True)
    prefix, P = model.num_prefix_tokens, (resolution // 16) ** 2
    expected = seen["attn"].mean(1)[:, 0, prefix:].reshape(2, 2, P)
    torch.testing.assert_close(out.cls_attn.double(), expected, atol=1e-6, rtol=1e-5)
    idx = torch.tensor([[0, 5], [1, P + 2]])
    targets = out.targets(idx)
    for layer, tap in enumerate(taps):
        rows = model.norm(tap.reshape(2, 2 * P, -1)[torch.arange(2)[:, None], idx])
        if "_clip_" in name:
            rows = model.head(rows)
        # (timm keeps the rotary tables in float32: agreement to float32 rounding)
        torch.testing.assert_close(targets[layer], F.normalize(rows, dim=-1), atol=1e-6, rtol=1e-5)


def test_unknown_and_unsupported_models_are_refused():
    with pytest.raises(ValueError, match="timm has no model 'vit_nonexistent_patch16'"):
        interop.load_teacher(None, arch="timm:vit_nonexistent_patch16")
    with pytest.raises(ValueError, match="is a timm ResNet; timm teachers are ViTs"):
        interop.load_teacher(None, input_resolution=32, arch="timm:resnet18")


def test_pretraining_with_a_timm_teacher(tmp_path, capsys):
    """--teacher.arch timm:NAME on the command line: a wrong resolution is refused with the one that
    fits; the right one trains (the student's heads get the teacher's width)."""
    from umt_fast.config import build_config
    from umt_fast.engine.metrics import read_metrics
    from umt_fast.pretrain import main

    arch = "timm:vit_tiny_patch16_224.augreg_in21k"
    with pytest.raises(ValueError, match="needs a model name"):
        build_config(["--teacher.arch", "timm:"])
    with pytest.raises(ValueError, match="teacher.arch='vit_b32' is not allowed"):
        build_config(["--teacher.arch", "vit_b32"])
    common = ["--teacher.arch", arch, "--data.img_size", "64", "--train.max_steps", "2", "--log.every_steps", "1"]
    assert main(["--run-dir", str(tmp_path / "bad"), "--teacher.input_resolution", "112"] + common) == 2
    assert "use teacher.input_resolution=64" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    assert main(["--run-dir", str(run_dir), "--teacher.input_resolution", "64"] + common) == 0
    losses = [r["loss"] for r in read_metrics(str(run_dir / "metrics.jsonl")) if "loss" in r]
    assert len(losses) == 2 and all(0 < loss < 4 for loss in losses)  # 2 - 2 cos: in [0, 4]
