"""Student and teacher against the independent reference forward (tests/umt_reference.py)."""
import dataclasses

import pytest
import torch

from tests import umt_reference as ref
from umt_fast import interop
from umt_fast.masking import mask_and_targets, sample_visible_tokens
from umt_fast.models.teacher import resize_clip_pos_embed

T, IMG, PATCH = 2, 64, 16  # 2 frames of a 4x4 grid: 32 tokens


def _video(B=2, T=T, img=IMG, seed=0, dtype=torch.float32):
    return torch.randn(B, 3, T, img, img, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _visible(B, num_frames, patches, n_vis, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_frames * patches, generator=g)[:n_vis].sort().values for _ in range(B)])


@pytest.mark.parametrize("wrapper", [None, "model", "module"])
def test_student_matches_reference_fp32(tmp_path, wrapper):
    sd = ref.random_student_state_dict(width=128, depth=3, heads=2, K=2, teacher_dim=48, seed=1)
    path = tmp_path / "stage1.pth"
    torch.save(sd if wrapper is None else {wrapper: sd, "epoch": 3}, path)
    student = interop.load_student(path, num_frames=T, img_size=IMG, patch_size=PATCH)
    assert not student.training
    assert (student.arch.width, student.arch.depth, student.arch.heads) == (128, 3, 2)
    assert (student.arch.return_layers, student.arch.teacher_dim) == (2, 48)

    video = _video()
    idx = _visible(2, T, 16, 7)
    with torch.no_grad():
        ours = student(video, idx)
    expected = ref.student_forward(sd, video.double(), ref.bool_mask_from_indices(idx, T * 16), heads=2)
    assert ours.shape == (2, 2, 7, 48)
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(2, 2, 7), atol=1e-5, rtol=0)


def test_student_fp64_is_exact_to_reference():
    sd = ref.random_student_state_dict(width=64, depth=2, heads=1, K=2, teacher_dim=32, seed=2)
    student = interop.load_student(sd, num_frames=T, img_size=IMG).double()
    video, idx = _video(dtype=torch.float64, seed=3), _visible(2, T, 16, 9, seed=4)
    with torch.no_grad():
        ours = student(video, idx)
    expected = ref.student_forward(sd, video, ref.bool_mask_from_indices(idx, T * 16), heads=1)
    torch.testing.assert_close(ours, expected, atol=1e-10, rtol=0)


def test_student_gradients_reach_only_used_parameters():
    sd = ref.random_student_state_dict(width=64, depth=2, heads=1, K=1, teacher_dim=32)
    student = interop.load_student(sd, num_frames=T, img_size=IMG).train()
    out = student(_video(), _visible(2, T, 16, 5))
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert not any(n.endswith("pos_embed") for n in student.state_dict()), "sin-cos tables are not saved"


@pytest.mark.parametrize(
    "patch,res,file_grid,student_img",
    [(16, 64, 4, 64),  # B/16 style: teacher at the student's resolution
     (14, 56, 5, 64)],  # L/14 style: 196-px-like teacher, pos embed interpolated from a larger grid
)
def test_teacher_matches_reference(tmp_path, patch, res, file_grid, student_img):
    sd = ref.random_clip_visual_state_dict(width=128, layers=3, patch=patch, output_dim=40, grid=file_grid, seed=5)
    path = tmp_path / "clip_visual.pth"
    torch.save({f"visual.{k}": v for k, v in sd.items()} | {"text_projection": torch.zeros(3, 3)}, path)
    teacher = interop.load_teacher(path, input_resolution=res, return_layers=2)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())

    video = _video(img=student_img, seed=6)
    grid = res // patch
    out = teacher(video)
    idx = _visible(2, T, grid * grid, 6, seed=7)
    targets = out.targets(idx)

    sd_resized = dict(sd, positional_embedding=resize_clip_pos_embed(sd["positional_embedding"], grid))
    full, attn = ref.teacher_forward(sd_resized, video.double(), res, return_layers=2)
    expected_targets = torch.gather(full, 2, idx[None, :, :, None].expand(2, -1, -1, full.shape[-1]))
    assert out.cls_attn.shape == (2, T, grid * grid)
    torch.testing.assert_close(out.cls_attn.double(), attn.view(2, T, -1), atol=1e-5, rtol=0)
    assert targets.shape == (2, 2, 6, 40)
    torch.testing.assert_close(targets.double(), expected_targets, atol=1e-4, rtol=0)
    assert (out.cls_attn.sum(-1) < 1).all(), "CLS-attention rows are not renormalised"


def test_pos_embed_resize_is_bicubic_over_the_patch_grid():
    W, g0, g = 8, 16, 14
    pos = torch.randn(1 + g0 * g0, W, dtype=torch.float64)
    resized = resize_clip_pos_embed(pos, g)
    img = pos[1:].reshape(g0, g0, W).permute(2, 0, 1)[None]
    expected = torch.nn.functional.interpolate(img, size=(g, g), mode="bicubic", align_corners=False)
    assert resized.shape == (1 + g * g, W)
    torch.testing.assert_close(resized[0], pos[0])
    torch.testing.assert_close(resized[1:].reshape(g, g, W), expected[0].permute(1, 2, 0))


def test_student_and_teacher_compose_into_the_reference_step():
    """The whole stage-1 forward: teacher -> attention mask -> targets vs student, end to end."""
    t_sd = ref.random_clip_visual_state_dict(width=64, layers=2, patch=16, output_dim=32, grid=4, seed=8)
    s_sd = ref.random_student_state_dict(width=64, depth=2, heads=1, K=2, teacher_dim=32, seed=9)
    teacher = interop.load_teacher(t_sd, input_resolution=IMG, return_layers=2)
    student = interop.load_student(s_sd, num_frames=T, img_size=IMG)
    video = _video(seed=10)
    out = teacher(video)
    idx = sample_visible_tokens("attention", batch_size=2, num_frames=T, patches_per_frame=16, ratio=0.75,
                                seed=0, offset=0, device=video.device, cls_attn_BTP=out.cls_attn)
    assert idx.shape == (2, T * 4)
    with torch.no_grad():
        s = student(video, idx)
    mask = ref.bool_mask_from_indices(idx, T * 16)
    full, _ = ref.teacher_forward(t_sd, video.double(), IMG, 2)
    expected_t = full[:, ~mask].reshape(2, 2, -1, 32)  # the reference's boolean gather
    torch.testing.assert_close(out.targets(idx).double(), expected_t, atol=1e-4, rtol=0)
    expected_s = ref.student_forward(s_sd, video.double(), mask, heads=1)
    torch.testing.assert_close(s.double(), expected_s, atol=1e-5, rtol=0)


def test_loader_reports_missing_unexpected_and_wrong_shape_keys():
    sd = ref.random_student_state_dict(width=64, depth=2, heads=1, K=2, teacher_dim=32)
    del sd["encoder.norm.bias"]
    sd["encoder.extra.weight"] = torch.zeros(1)
    sd["encoder.blocks.1.mlp.fc2.bias"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        interop.load_student(sd, num_frames=T, img_size=IMG)
    msg = str(err.value)
    assert "1 missing key(s): encoder.norm.bias" in msg
    assert "1 unexpected key(s): encoder.extra.weight" in msg
    assert "encoder.blocks.1.mlp.fc2.bias: file (3,) vs model (64,)" in msg


def test_loaders_reject_the_wrong_kind_of_file(tmp_path):
    clip = ref.random_clip_visual_state_dict(width=64, layers=1, patch=16, output_dim=8, grid=4)
    with pytest.raises(ValueError, match="not a UMT stage-1 student"):
        interop.load_student(clip)
    with pytest.raises(ValueError, match="not an OpenAI CLIP visual state dict"):
        interop.load_teacher(ref.random_student_state_dict(64, 1, 1, 1, 8))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        interop.load_teacher(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="kernel"):
        interop.load_student(ref.random_student_state_dict(64, 1, 1, 1, 8, patch=16), patch_size=14)


def test_fused_attention_sampling_matches_the_two_step_path():
    t_sd = ref.random_clip_visual_state_dict(width=64, layers=2, patch=16, output_dim=32, grid=4, seed=11)
    teacher = interop.load_teacher(t_sd, input_resolution=IMG, return_layers=2)
    out = teacher(_video(seed=12))
    idx, targets = mask_and_targets(out, "attention", ratio=0.8, seed=5, offset=9)
    expected_idx = sample_visible_tokens("attention", batch_size=2, num_frames=T, patches_per_frame=16, ratio=0.8,
                                         seed=5, offset=9, device=torch.device("cpu"), cls_attn_BTP=out.cls_attn)
    assert torch.equal(idx, expected_idx)  # 16 - int(12.8) = 4 per frame
    torch.testing.assert_close(targets, out.targets(idx), atol=0, rtol=0)


@pytest.mark.parametrize("num_blocks", [1, 3])
def test_activation_checkpointing_gives_the_same_gradients(num_blocks):
    sd = ref.random_student_state_dict(width=64, depth=3, heads=1, K=2, teacher_dim=32, seed=13)
    video, idx = _video(seed=14), _visible(2, T, 16, 6, seed=15)

    def grads(checkpointed):
        student = interop.load_student(sd, num_frames=T, img_size=IMG)
        student = type(student)(dataclasses.replace(student.arch, drop_path=0.3))
        student.load_state_dict(sd)
        student.train().set_grad_checkpointing(num_blocks=checkpointed)
        torch.manual_seed(0)
        student(video, idx).square().sum().backward()
        return {n: p.grad for n, p in student.named_parameters()}

    plain, checkpointed = grads(0), grads(num_blocks)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_activation_checkpointing_rejects_bad_counts():
    student = interop.load_student(ref.random_student_state_dict(64, 2, 1, 1, 8), num_frames=T, img_size=IMG)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        student.set_activation_checkpointing(3)


@pytest.mark.parametrize("autocast", [False, True])
def test_teacher_layernorm_in_bf16_is_an_fp32_layernorm_rounded_once(autocast):
    """The bf16 teacher's LayerNorm runs PyTorch's 16-bit kernel: its output must be the
    float64 LayerNorm rounded to bf16 (within one bf16 step), also under autocast, which would
    otherwise hand back fp32."""
    from umt_fast.models.teacher import LayerNormFP32

    gen = torch.Generator().manual_seed(0)
    ln = LayerNormFP32(96, eps=1e-5)
    with torch.no_grad():
        ln.weight.copy_(torch.rand(96, generator=gen) + 0.5)
        ln.bias.copy_(torch.randn(96, generator=gen))
    ln = ln.to(torch.bfloat16)
    x = (torch.randn(300, 96, generator=gen) * 3 + 1).to(torch.bfloat16)
    expected = torch.nn.functional.layer_norm(
        x.double(), (96,), ln.weight.double(), ln.bias.double(), 1e-5
    ).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = ln(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=1e-6)


def test_teacher_layernorm_in_bf16_is_one_16_bit_op():
    """One native LayerNorm on the bf16 tensor: no fp32 copies of the activations around it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from umt_fast.models.teacher import LayerNormFP32

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append((func.overloadpacket.__name__, args[0].dtype))
            return func(*args, **(kwargs or {}))

    ln = LayerNormFP32(32).to(torch.bfloat16)
    x = torch.randn(10, 32).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), Record() as record:
        ln(x)
    assert record.ops == [("native_layer_norm", torch.bfloat16)]


def test_drop_path_scales_follow_the_drop_law_and_the_clip_index():
    from umt_fast.models.student import drop_path_scales

    probs = [0.0, 0.25, 0.5]
    keep = torch.tensor([1 - p for p in probs])
    scales = drop_path_scales(keep, 4000, seed=3, offset=7, first_clip=0)
    assert scales.shape == (3, 4000, 2)
    for p, block in zip(probs, scales):
        kept = block > 0
        assert torch.all(block[kept] == 1 / (1 - p)) and torch.all(block[~kept] == 0)
        assert abs(kept.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / 8000) ** 0.5 + 1e-9
    halves = [drop_path_scales(keep, 2000, seed=3, offset=7, first_clip=f) for f in (0, 2000)]
    assert torch.equal(torch.cat(halves, dim=1), scales)  # the same draws however the batch is split
    assert not torch.equal(drop_path_scales(keep, 4000, seed=3, offset=8, first_clip=0), scales)


def test_block_applies_the_drop_path_factors_per_clip():
    from umt_fast.models.student import Block

    torch.manual_seed(0)
    block = Block(32, 2, 4.0, drop_path=0.5).train()
    x = torch.randn(3, 5, 32)
    scales = torch.tensor([[0.0, 2.0], [2.0, 0.0], [2.0, 2.0]])
    out = block(x, scales)
    for b in range(3):
        xb = x[b:b + 1]
        h = xb + scales[b, 0] * block.attn(block.norm1(xb))
        expected = h + scales[b, 1] * block.mlp(block.norm2(h))
        torch.testing.assert_close(out[b:b + 1], expected)


def test_student_with_drop_path_is_the_same_whole_or_split_and_checkpointed():
    """Drop path keyed by the clip's global index: two half batches (ranks) give the whole
    batch's outputs, and recomputing blocks in the backward gives the same gradients."""
    from umt_fast.models.student import drop_path_scales

    sd = ref.random_student_state_dict(width=64, depth=3, heads=1, K=2, teacher_dim=32, seed=21)
    video, idx = _video(B=4, seed=22), _visible(4, T, 16, 6, seed=23)
    student = interop.load_student(sd, num_frames=T, img_size=IMG)
    student = type(student)(dataclasses.replace(student.arch, drop_path=0.5))
    student.load_state_dict(sd)
    student.train()
    probs = student.encoder.drop_probs
    assert probs[-1] == 0.5

    def scales(batch, first_clip):
        return drop_path_scales(torch.tensor([1 - p for p in probs]), batch, seed=1, offset=4, first_clip=first_clip)

    whole = student(video, idx, scales(4, 0))
    halves = torch.cat([student(video[:2], idx[:2], scales(2, 0)), student(video[2:], idx[2:], scales(2, 2))], dim=1)
    torch.testing.assert_close(halves, whole, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(whole, student.eval()(video, idx), atol=1e-3)  # something was dropped
    student.train()

    def grads(checkpointed):
        student.zero_grad()
        student.set_grad_checkpointing(num_blocks=checkpointed)
        student(video, idx, scales(4, 0)).square().sum().backward()
        return {n: p.grad.clone() for n, p in student.named_parameters()}

    plain, recomputed = grads(0), grads(3)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_teacher_mlp_folds_quick_gelu_into_one_silu():
    """The teacher's MLP equals c_proj(x * sigmoid(1.702 x)) of c_fc (float64, to rounding),
    and touches its [*, 4W] activations with one elementwise op (silu), not three."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from umt_fast.models.teacher import ResidualAttentionBlock

    torch.manual_seed(0)
    clip = {k: v.double() for k, v in ResidualAttentionBlock(16, 2).state_dict().items()}  # CLIP's own values
    block = ResidualAttentionBlock(16, 2).double()
    block.load_state_dict(clip)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    hidden = x @ clip["mlp.c_fc.weight"].T + clip["mlp.c_fc.bias"]
    literal = (hidden * torch.sigmoid(1.702 * hidden)) @ clip["mlp.c_proj.weight"].T + clip["mlp.c_proj.bias"]
    torch.testing.assert_close(block.mlp(x), literal, atol=1e-12, rtol=1e-12)
    # folded once, at load: the parameters hold the scaled values, state_dict() CLIP's
    torch.testing.assert_close(block.mlp.c_fc.weight, 1.702 * clip["mlp.c_fc.weight"], atol=0, rtol=1e-15)
    for key, value in block.state_dict().items():
        torch.testing.assert_close(value, clip[key], atol=0, rtol=1e-15, msg=key)

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() == 15 * 64:  # the [3, 5, 4W] activations
                self.ops.append(func.overloadpacket.__name__)
            return out

    with torch.no_grad(), Record() as record:
        block(x)
    assert [op for op in record.ops if op not in ("addmm", "view", "_unsafe_view")] == ["silu"], record.ops
