"""Weights in and out: every supported file format against the OpenAI-named / stage-1 original."""
import json
import logging
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from tests import umt_reference as ref
from umt_fast.engine import checkpoint as ckpt
from umt_fast import export, interop
from umt_fast.models.classifier import VideoViT, VideoViTArch, finetune_pos_table
from umt_fast.models.student import sincos_table

T, IMG, PATCH = 2, 64, 16  # 2 frames of a 4x4 grid
CLIP = dict(width=64, layers=2, patch=16, output_dim=24, grid=4)


def _video(B=2, T=T, img=IMG, seed=0):
    return torch.randn(B, 3, T, img, img, generator=torch.Generator().manual_seed(seed))


def _visible(B=2, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(T * 16, generator=g)[:n].sort().values for _ in range(B)])


def _stage1(seed=1):
    return ref.random_student_state_dict(width=64, depth=2, heads=1, K=2, teacher_dim=24, seed=seed)


def _student_out(student):
    with torch.no_grad():
        return student(_video(), _visible())


# --------------------------------------------------------------------------------------------
# Student side
# --------------------------------------------------------------------------------------------


def _variants(sd):
    compiled = {k.replace("encoder.", "encoder._orig_mod.", 1): v for k, v in sd.items()}
    stage2 = {f"vision_encoder.{k}": v for k, v in sd.items()} | {
        "vision_encoder.pool_norm.weight": torch.ones(64), "vision_encoder.pool_norm.bias": torch.zeros(64),
        "clip_teacher.conv1.weight": torch.zeros(8, 3, 16, 16), "text_encoder.bert.embeddings.word_embeddings.weight":
        torch.zeros(10, 8), "vision_proj.weight": torch.zeros(8, 64), "temp": torch.tensor(0.07),
    }  # fmt: skip
    return {
        "raw": sd,
        "model wrapper": {"model": sd, "epoch": 3},
        "module wrapper + module. prefix": {"module": {f"module.{k}": v for k, v in sd.items()}},
        "torch.compile _orig_mod.": {f"_orig_mod.{k}": v for k, v in compiled.items()},
        "backbone. prefix": {f"backbone.{k}": v for k, v in sd.items()},
        "stage 2": {"model": stage2},
    }


@pytest.mark.parametrize("variant", list(_variants({})))
def test_student_loads_from_every_reference_layout(tmp_path, variant):
    sd = _stage1()
    expected = _student_out(interop.load_student(sd, num_frames=T, img_size=IMG))
    path = tmp_path / "file.pth"
    torch.save(_variants(sd)[variant], path)
    student = interop.load_student(path, num_frames=T, img_size=IMG)
    torch.testing.assert_close(_student_out(student), expected, atol=0, rtol=0)


def test_student_loads_from_safetensors(tmp_path):
    sd = _stage1()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "s.safetensors")
    student = interop.load_student(tmp_path / "s.safetensors", num_frames=T, img_size=IMG)
    torch.testing.assert_close(_student_out(student), _student_out(interop.load_student(sd, num_frames=T, img_size=IMG)))


def _lerp_weights(n_out, n_in, dtype=torch.float64):
    """[n_out, n_in]: PyTorch's linear interpolation, align_corners=False (half-pixel centres)."""
    w = torch.zeros(n_out, n_in, dtype=dtype)
    for i in range(n_out):
        x = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        x0 = min(int(x), n_in - 1)
        x1 = min(x0 + 1, n_in - 1)
        w[i, x0] += 1 - (x - x0)
        w[i, x1] += x - x0
    return w


def _cubic_weights(n_out, n_in, dtype=torch.float64, a=-0.75):
    """[n_out, n_in]: bicubic (Keys, a = -0.75) along one axis, align_corners=False, borders clamped."""

    def k(t):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        if t < 2:
            return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
        return 0.0

    w = torch.zeros(n_out, n_in, dtype=dtype)
    for i in range(n_out):
        x = (i + 0.5) * n_in / n_out - 0.5
        x0 = int(torch.floor(torch.tensor(x)))
        for j in range(x0 - 1, x0 + 3):
            w[i, min(max(j, 0), n_in - 1)] += k(x - j)
    return w


@pytest.mark.parametrize("t0,g0,t1,g1", [(8, 4, 4, 6), (2, 6, 3, 4), (4, 5, 4, 5), (3, 4, 3, 7)])
def test_pos_embed_resize_matches_a_float64_reference(t0, g0, t1, g1):
    C = 5
    pos = torch.randn(1, t0 * g0 * g0, C, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    table = pos.reshape(t0, g0, g0, C)
    wt, ws = _lerp_weights(t1, t0), _cubic_weights(g1, g0)
    expected = torch.einsum("at,bh,cw,thwd->abcd", wt, ws, ws, table).reshape(1, -1, C)
    resized = interop.resize_video_pos_embed(pos, num_frames=t1, grid=g1, file_num_frames=t0)
    assert resized.shape == (1, t1 * g1 * g1, C) and resized.dtype == torch.float64
    torch.testing.assert_close(resized, expected, atol=1e-12, rtol=0)
    # fp32 path, and T0 inferred from the token count when the file's grid is the target's or 8 frames
    inferred = interop.resize_video_pos_embed(pos.float(), num_frames=t1, grid=g1, file_num_frames=t0)
    torch.testing.assert_close(inferred.double(), expected, atol=1e-5, rtol=0)


def test_pos_embed_frames_are_inferred_like_the_reference():
    pos = torch.randn(1, 8 * 196, 4)
    for frames, grid in ((16, 14), (4, 7), (8, 16)):  # 8 x 14 x 14, as the reference assumes
        expected = interop.resize_video_pos_embed(pos, num_frames=frames, grid=grid, file_num_frames=8)
        torch.testing.assert_close(interop.resize_video_pos_embed(pos, num_frames=frames, grid=grid), expected)
    pos16 = torch.randn(1, 16 * 196, 4)  # a 16-frame table: 3136 / 8 is not a square
    expected = interop.resize_video_pos_embed(pos16, num_frames=8, grid=14, file_num_frames=16)
    torch.testing.assert_close(interop.resize_video_pos_embed(pos16, num_frames=8, grid=14), expected)
    with pytest.raises(ValueError, match="not 3 frames of a square grid"):
        interop.resize_video_pos_embed(torch.randn(1, 50, 4), num_frames=2, grid=4, file_num_frames=3)


def _finetuned_file(seed=2, num_classes=5, pos_frames=T, pos_grid=4):
    """A reference fine-tuned state dict: backbone without the encoder. prefix, fc_norm, head, pos_embed."""
    sd = interop.canonical_video_state_dict(_stage1(seed))
    sd = {k: v for k, v in sd.items() if not k.startswith(("clip_decoder.", "norm."))}
    g = torch.Generator().manual_seed(seed)
    sd |= {
        "fc_norm.weight": 1 + 0.1 * torch.randn(64, generator=g), "fc_norm.bias": 0.1 * torch.randn(64, generator=g),
        "head.weight": torch.randn(num_classes, 64, generator=g), "head.bias": torch.randn(num_classes, generator=g),
        "pos_embed": torch.randn(1, pos_frames * pos_grid**2, 64, generator=g),
    }  # fmt: skip
    return sd


def _dense_reference_logits(sd, video, pos_embed):
    """The fine-tuned model's forward restated with the stage-1 reference blocks: all tokens
    visible, mean pool, fc_norm, head."""
    s1 = {f"encoder.{k}": v for k, v in sd.items() if k.startswith(("patch_embed.", "blocks."))}
    B = video.shape[0]
    x = torch.nn.functional.conv3d(video, s1["encoder.patch_embed.proj.weight"], s1["encoder.patch_embed.proj.bias"],
                                   stride=(1, 16, 16)).flatten(2).transpose(1, 2) + pos_embed
    for i in range(2):
        p = f"encoder.blocks.{i}"
        h = torch.nn.functional.layer_norm(x, (64,), s1[p + ".norm1.weight"], s1[p + ".norm1.bias"], 1e-6)
        bias = torch.cat([s1[p + ".attn.q_bias"], torch.zeros(64), s1[p + ".attn.v_bias"]])
        q, k, v = torch.nn.functional.linear(h, s1[p + ".attn.qkv.weight"], bias).reshape(B, -1, 3, 1, 64).permute(2, 0, 3, 1, 4)
        a = ((q * 64**-0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        x = x + torch.nn.functional.linear(a.transpose(1, 2).reshape(B, -1, 64), s1[p + ".attn.proj.weight"], s1[p + ".attn.proj.bias"])
        h = torch.nn.functional.layer_norm(x, (64,), s1[p + ".norm2.weight"], s1[p + ".norm2.bias"], 1e-6)
        h = torch.nn.functional.gelu(torch.nn.functional.linear(h, s1[p + ".mlp.fc1.weight"], s1[p + ".mlp.fc1.bias"]))
        x = x + torch.nn.functional.linear(h, s1[p + ".mlp.fc2.weight"], s1[p + ".mlp.fc2.bias"])
    pooled = torch.nn.functional.layer_norm(x.mean(1), (64,), sd["fc_norm.weight"], sd["fc_norm.bias"], 1e-6)
    return torch.nn.functional.linear(pooled, sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("prefix", ["", "backbone.", "module."])
def test_finetuned_file_loads_as_a_classifier(tmp_path, prefix):
    sd = _finetuned_file()
    torch.save({"model": {prefix + k: v for k, v in sd.items()}}, tmp_path / "ft.pth")
    model = interop.load_video_vit(tmp_path / "ft.pth", num_frames=T, img_size=IMG)
    assert model.arch.num_classes == 5 and not model.arch.final_norm
    video = _video()
    with torch.no_grad():
        logits = model(video)
    expected = _dense_reference_logits({k: v.double() for k, v in sd.items()}, video.double(), sd["pos_embed"].double())
    torch.testing.assert_close(logits.double(), expected, atol=1e-5, rtol=0)


def test_finetuned_pos_embed_is_resized_to_the_requested_clip(tmp_path):
    sd = _finetuned_file(pos_frames=8, pos_grid=4)  # trained on 8 frames of 4x4
    model = interop.load_video_vit(sd, num_frames=4, img_size=96)  # used on 4 frames of 6x6
    expected = interop.resize_video_pos_embed(sd["pos_embed"], num_frames=4, grid=6)
    torch.testing.assert_close(model.pos_embed, expected, atol=0, rtol=0)
    assert model(_video(T=4, img=96)).shape == (2, 5)


def test_stage1_file_loads_as_a_dense_encoder_and_as_a_classifier_init():
    sd = _stage1()
    encoder = interop.load_video_vit(sd, num_frames=T, img_size=IMG)
    assert encoder.arch.final_norm and encoder.arch.num_classes == 0
    torch.testing.assert_close(encoder.pos_embed, finetune_pos_table(T, IMG // 16, 64), atol=0, rtol=0)
    # all tokens visible and the stage-1 table: the dense encoder equals the sparse student's encoder
    student = interop.load_student(sd, num_frames=T, img_size=IMG)
    torch.testing.assert_close(student.encoder.pos_embed, sincos_table(T * 16, 64))
    all_tokens = torch.arange(T * 16).expand(2, -1)
    with torch.no_grad():
        encoder.pos_embed.copy_(student.encoder.pos_embed[None])
        sparse_last = student.encoder(_video(), all_tokens)[-1]
        dense = encoder.forward_features(_video())
    torch.testing.assert_close(dense, sparse_last, atol=1e-5, rtol=0)

    classifier = VideoViT(VideoViTArch(width=64, depth=2, heads=1, num_frames=T, img_size=IMG, num_classes=7))
    head_before = classifier.head.weight.clone()
    interop.init_video_vit(classifier, sd)
    torch.testing.assert_close(classifier.blocks[1].mlp.fc2.weight, sd["encoder.blocks.1.mlp.fc2.weight"])
    torch.testing.assert_close(classifier.head.weight, head_before)  # fresh head kept
    assert 0.5e-5 < classifier.head.weight.std() < 4e-5  # trunc-normal(std .02) x 0.001


# --------------------------------------------------------------------------------------------
# Fine-tuning: position tables and heads as the reference's fine-tuning builds them
# --------------------------------------------------------------------------------------------

CLIP_SIZES = [(8, 224), (4, 96), (16, 224), (2, 160), (12, 64)]  # (frames, px): grids 14, 6, 14, 10, 4


def _backbone_and_head(sd_stage1, model):
    """The reference fine-tuning model's state dict for a stage-1 init: the file's backbone and
    the classifier's own (fresh) fc_norm and head."""
    sd = {k[len("encoder."):]: v for k, v in sd_stage1.items() if k.startswith(("encoder.patch_embed.", "encoder.blocks."))}
    return sd | {k: v for k, v in model.state_dict().items() if k.startswith(("fc_norm.", "head."))}


@pytest.mark.parametrize("frames,img", CLIP_SIZES)
def test_tables_without_a_file_pos_embed_are_the_reference_finetuning_tables(frames, img):
    grid, n = img // 16, frames * (img // 16) ** 2
    expected = ref.finetune_sinusoid_table(n, 64, frames, pre_n_position=1568)
    # an independent float64 check of the modes: the 8 x 14 x 14 table, bicubic in space, linear in time
    table0 = sincos_table(1568, 64).double().reshape(8, 14, 14, 64)
    ws, wt = _cubic_weights(grid, 14), _lerp_weights(frames, 8)
    einsum = torch.einsum("at,bh,cw,thwd->abcd", wt, ws, ws, table0).reshape(1, n, 64)
    torch.testing.assert_close(expected.double(), einsum, atol=2e-6, rtol=0)
    old = sincos_table(n, 64)[None]  # the table of the clip's own length, which the reference does not use
    if (frames, grid) == (8, 14):
        torch.testing.assert_close(expected, old, atol=0, rtol=0)
    else:
        assert (expected - old).abs().max() > 0.1

    sd1 = _stage1()
    model = VideoViT(VideoViTArch(width=64, depth=2, heads=1, num_frames=frames, img_size=img, num_classes=5))
    torch.testing.assert_close(model.pos_embed, expected, atol=0, rtol=0)  # a fresh model (no init file)
    interop.init_video_vit(model, sd1)
    torch.testing.assert_close(model.pos_embed, expected, atol=0, rtol=0)
    video = _video(B=1, T=frames, img=img, seed=frames).double()
    with torch.no_grad():
        ours = model.double().eval()(video)
        want = ref.finetune_vit_forward(_backbone_and_head(sd1, model), video, heads=1)
    assert (ours - want).abs().max() < 1e-9

    finetuned = ref.finetuned_state_dict(sd1, num_classes=7, seed=frames)  # an 8 x 224 fine-tuned file: no pos_embed
    model = interop.load_video_vit(finetuned, num_frames=frames, img_size=img)
    torch.testing.assert_close(model.pos_embed, expected, atol=0, rtol=0)
    with torch.no_grad():
        ours = model.double()(video)
        want = ref.finetune_vit_forward(finetuned, video, heads=1)
    assert (ours - want).abs().max() < 1e-9


@pytest.mark.parametrize("frames,img", [(16, 224), (4, 96), (16, 160), (8, 96)])
def test_a_file_pos_embed_is_resized_as_the_reference_finetuning_resizes_it(frames, img):
    finetuned = ref.finetuned_state_dict(_stage1(), num_classes=3, seed=1)
    table = torch.randn(1, 1568, 64, generator=torch.Generator().manual_seed(frames + img))  # 8 x 14 x 14
    model = interop.load_video_vit(finetuned | {"pos_embed": table}, num_frames=frames, img_size=img)
    n = frames * (img // 16) ** 2
    expected = ref.finetune_checkpoint_pos_embed(table, n, frames)
    torch.testing.assert_close(model.pos_embed, expected, atol=0, rtol=0)
    if (frames, img) == (4, 96):
        video = _video(B=2, T=frames, img=img).double()
        with torch.no_grad():
            ours = model.double()(video)
        assert (ours - ref.finetune_vit_forward(finetuned, video, heads=1, pos_embed=expected.double())).abs().max() < 1e-9


def test_at_the_pretraining_size_the_model_keeps_its_fixed_table(caplog):
    """The reference's model at 8 x 14 x 14 does not register its table, so a file's pos_embed is
    not read (e.g. the 16-frame table of a 16-frame fine-tuned file)."""
    finetuned = ref.finetuned_state_dict(_stage1(), num_classes=3)
    fixed = ref.finetune_sinusoid_table(1568, 64, 8)
    with caplog.at_level(logging.INFO, logger="umt_fast.interop"):
        model = interop.load_video_vit(finetuned | {"pos_embed": fixed}, num_frames=8, img_size=224)
    torch.testing.assert_close(model.pos_embed, fixed, atol=0, rtol=0)
    assert "is not used" not in caplog.text
    sixteen = ref.finetune_sinusoid_table(3136, 64, 16)
    with caplog.at_level(logging.INFO, logger="umt_fast.interop"):
        model = interop.load_video_vit(finetuned | {"pos_embed": sixteen}, num_frames=8, img_size=224)
    torch.testing.assert_close(model.pos_embed, fixed, atol=0, rtol=0)
    assert "the file's pos_embed (3136 rows) is not used" in caplog.text
    # at 16 frames the same file's table is already the clip's: kept as it is
    model = interop.load_video_vit(finetuned | {"pos_embed": sixteen}, num_frames=16, img_size=224)
    torch.testing.assert_close(model.pos_embed, sixteen, atol=0, rtol=0)


def _k710_file(tmp_path, seed=5):
    sd = ref.finetuned_state_dict(_stage1(), num_classes=710, seed=seed)
    torch.save({"module": sd}, tmp_path / "k710.pth")
    return sd, tmp_path / "k710.pth"


def _classifier(num_classes):
    return VideoViT(VideoViTArch(width=64, depth=2, heads=1, num_frames=T, img_size=IMG, num_classes=num_classes)).eval()


def test_a_k710_head_gives_kinetics_400_its_first_rows_and_600_rows_by_a_label_map(tmp_path, caplog):
    sd, path = _k710_file(tmp_path)
    video = _video().double()
    with torch.no_grad():
        k710 = interop.load_video_vit(path, num_frames=T, img_size=IMG).double()(video)
    assert k710.shape == (2, 710)

    k400 = _classifier(400)
    with caplog.at_level(logging.INFO, logger="umt_fast.interop"):
        interop.init_video_vit(k400, path)
    assert "the first 400 rows of the init checkpoint's K710 head" in caplog.text
    torch.testing.assert_close(k400.fc_norm.weight, sd["fc_norm.weight"], atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(k400.double()(video), k710[:, :400], atol=1e-10, rtol=0)

    label_map = torch.randperm(710, generator=torch.Generator().manual_seed(0))[:600].tolist()
    (tmp_path / "label_mixto600.json").write_text(json.dumps(label_map))
    for given in (tmp_path / "label_mixto600.json", str(tmp_path / "label_mixto600.json"), label_map):
        k600 = _classifier(600)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="umt_fast.interop"):
            interop.init_video_vit(k600, path, head_label_map=given)
        assert "head: 600 classes from the init checkpoint's 710-class head, rows by the label map" in caplog.text
        torch.testing.assert_close(k600.head.bias, sd["head.bias"][label_map], atol=0, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(k600.double()(video), k710[:, label_map], atol=1e-10, rtol=0)


def test_a_head_of_another_class_count_starts_fresh_and_fc_norm_is_kept(tmp_path, caplog):
    sd, path = _k710_file(tmp_path)
    for classes, hint in ((174, False), (700, True)):
        model = _classifier(classes)
        head_before = model.head.weight.clone()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="umt_fast.interop"):
            interop.init_video_vit(model, path)
        assert f"head has 710 classes, the model {classes}: the head starts fresh, fc_norm is kept" in caplog.text
        assert ("head label map" in caplog.text) == hint
        torch.testing.assert_close(model.head.weight, head_before, atol=0, rtol=0)
        torch.testing.assert_close(model.fc_norm.bias, sd["fc_norm.bias"], atol=0, rtol=0)


def test_bad_head_label_maps_are_refused_naming_the_map(tmp_path):
    _, path = _k710_file(tmp_path)
    cases = {
        "short.json": (list(range(599)), r"head_label_map='.*short.json' is not allowed: holds 599 rows, but the model has 600 classes"),
        "range.json": (list(range(599)) + [710], r"head_label_map='.*range.json' is not allowed: row 710 is outside \[0, 710\)"),
        "negative.json": ([-1] + list(range(599)), r"row -1 is outside \[0, 710\)"),
        "dict.json": ({"0": 1}, r"dict.json' is not allowed: must be a JSON list of ints"),
        "floats.json": ([0.0] * 600, r"must be a JSON list of ints"),
        "bools.json": ([True] * 600, r"must be a JSON list of ints"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message):
            interop.init_video_vit(_classifier(600), path, head_label_map=tmp_path / name)
    (tmp_path / "broken.json").write_text("[1, 2,")
    with pytest.raises(ValueError, match=r"broken.json' is not allowed: not a JSON file"):
        interop.init_video_vit(_classifier(600), path, head_label_map=tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match=r"head_label_map='.*missing.json': no such file"):
        interop.init_video_vit(_classifier(600), path, head_label_map=tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"head_label_map=\[0, 1, 2, 3, \.\.\.\] \(599 entries\) is not allowed: holds 599"):
        interop.init_video_vit(_classifier(600), path, head_label_map=list(range(599)))
    with pytest.raises(ValueError, match="the init checkpoint has no head"):
        interop.init_video_vit(_classifier(2), _stage1(), head_label_map=[0, 1])


def test_strict_errors_and_the_non_strict_report(caplog):
    sd = _stage1()
    del sd["encoder.blocks.0.norm1.bias"]
    sd["encoder.blocks.0.extra"] = torch.zeros(2)
    with pytest.raises(ValueError) as err:
        interop.load_student(sd, num_frames=T, img_size=IMG)
    assert "1 missing key(s): encoder.blocks.0.norm1.bias" in str(err.value)
    assert "1 unexpected key(s): encoder.blocks.0.extra" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="umt_fast.interop"):
        student = interop.load_student(sd, num_frames=T, img_size=IMG, strict=False)
    assert "strict=False" in caplog.text and "1 missing key(s): encoder.blocks.0.norm1.bias" in caplog.text
    assert "1 unexpected key(s): encoder.blocks.0.extra" in caplog.text
    torch.testing.assert_close(student.encoder.blocks[0].norm1.weight, sd["encoder.blocks.0.norm1.weight"])

    many = {k: v for k, v in _stage1().items() if ".blocks.1." not in k}  # 13 keys per block; 1 added back
    with pytest.raises(ValueError, match=r"12 missing key\(s\): (\S+, ){5}\.\.\."):
        interop.load_student(many | {"encoder.blocks.1.attn.q_bias": torch.zeros(64)}, num_frames=T, img_size=IMG)
    wrong = _stage1() | {"encoder.blocks.0.mlp.fc1.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"encoder.blocks.0.mlp.fc1.bias: file \(3,\) vs model \(256,\)"):
        interop.load_student(wrong, num_frames=T, img_size=IMG, strict=False)  # wrong shapes never load


# --------------------------------------------------------------------------------------------
# Teacher side: one OpenAI-named original, converted to every format in the test
# --------------------------------------------------------------------------------------------


def _openai():
    return ref.random_clip_visual_state_dict(**CLIP, seed=3)


def _to_timm(sd):
    out = {
        "patch_embed.proj.weight": sd["conv1.weight"], "cls_token": sd["class_embedding"].reshape(1, 1, -1),
        "pos_embed": sd["positional_embedding"][None], "norm_pre.weight": sd["ln_pre.weight"],
        "norm_pre.bias": sd["ln_pre.bias"], "norm.weight": sd["ln_post.weight"], "norm.bias": sd["ln_post.bias"],
        "head.weight": sd["proj"].t().contiguous(), "head.bias": torch.zeros(sd["proj"].shape[1]),
    }  # fmt: skip
    names = {"ln_1": "norm1", "ln_2": "norm2", "attn.in_proj_weight": "attn.qkv.weight",
             "attn.in_proj_bias": "attn.qkv.bias", "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.fc1",
             "mlp.c_proj": "mlp.fc2"}  # fmt: skip
    for key, value in sd.items():
        if key.startswith("transformer.resblocks."):
            i, rest = key[len("transformer.resblocks."):].split(".", 1)
            for old, new in names.items():
                rest = rest.replace(old, new)
            out[f"blocks.{i}.{rest}"] = value
    return out


def _to_hf(sd):
    W = CLIP["width"]
    out = {
        "vision_model.embeddings.patch_embedding.weight": sd["conv1.weight"],
        "vision_model.embeddings.class_embedding": sd["class_embedding"],
        "vision_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "vision_model.embeddings.position_ids": torch.arange(sd["positional_embedding"].shape[0])[None],
        "vision_model.pre_layrnorm.weight": sd["ln_pre.weight"], "vision_model.pre_layrnorm.bias": sd["ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["ln_post.weight"], "vision_model.post_layernorm.bias": sd["ln_post.bias"],
        "visual_projection.weight": sd["proj"].t().contiguous(),
        "text_model.embeddings.token_embedding.weight": torch.zeros(10, 8), "logit_scale": torch.tensor(4.6),
    }  # fmt: skip
    for i in range(CLIP["layers"]):
        s, d = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for j, name in enumerate("qkv"):
            out[d + f"self_attn.{name}_proj.weight"] = sd[s + "attn.in_proj_weight"][j * W:(j + 1) * W].contiguous()
            out[d + f"self_attn.{name}_proj.bias"] = sd[s + "attn.in_proj_bias"][j * W:(j + 1) * W].contiguous()
        for old, new in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            for p in ("weight", "bias"):
                out[d + f"{new}.{p}"] = sd[s + f"{old}.{p}"]
    return out


class _Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, width // 64)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x), self.ln_1(x), self.ln_1(x), need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width, layers):
        super().__init__()
        self.resblocks = nn.Sequential(*[_Block(width) for _ in range(layers)])


class _Visual(nn.Module):
    """OpenAI CLIP's visual-tower names, for a TorchScript archive built in the test."""

    def __init__(self, width, layers, patch, output_dim, grid):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(1 + grid * grid, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], 1) + self.positional_embedding
        x = self.transformer.resblocks(self.ln_pre(x).transpose(0, 1)).transpose(0, 1)
        return self.ln_post(x[:, 0]) @ self.proj


class _CLIP(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = _Visual(**CLIP)
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, x):
        return self.visual(x) * self.logit_scale


def _teacher_outputs(teacher):
    out = teacher(_video(img=64, seed=4))
    return out.cls_attn, out.streams, out.targets(_visible(n=5, seed=5))


def _write(tmp_path, fmt, sd):
    """One file per format, as that format's tool would write it."""
    if fmt == "openai raw":
        torch.save(sd, tmp_path / "v.pth")
        return tmp_path / "v.pth"
    if fmt == "openai torchscript":
        model = _CLIP()
        model.visual.load_state_dict(sd)
        torch.jit.script(model).save(str(tmp_path / "ViT-B-16.pt"))
        return tmp_path / "ViT-B-16.pt"
    if fmt == "open_clip":
        torch.save({"epoch": 32, "name": "vit", "state_dict": {f"module.visual.{k}": v for k, v in sd.items()}
                    | {"module.logit_scale": torch.tensor(4.6)}}, tmp_path / "epoch_32.pt")
        return tmp_path / "epoch_32.pt"
    if fmt == "timm safetensors":
        save_file({k: v.contiguous() for k, v in _to_timm(sd).items()}, tmp_path / "model.safetensors")
        return tmp_path / "model.safetensors"
    if fmt == "hf safetensors":
        save_file({k: v.contiguous() for k, v in _to_hf(sd).items()}, tmp_path / "model.safetensors")
        return tmp_path / "model.safetensors"
    if fmt == "hf bin":
        torch.save(_to_hf(sd), tmp_path / "pytorch_model.bin")
        return tmp_path / "pytorch_model.bin"
    raise AssertionError(fmt)


TEACHER_FORMATS = ["openai raw", "openai torchscript", "open_clip", "timm safetensors", "hf safetensors", "hf bin"]


@pytest.mark.parametrize("fmt", TEACHER_FORMATS)
def test_teacher_loads_from_every_clip_format_identically(tmp_path, fmt):
    sd = _openai()
    expected = _teacher_outputs(interop.load_teacher(sd, input_resolution=64, return_layers=2))
    path = _write(tmp_path, fmt, sd)
    if fmt == "openai torchscript":
        assert interop.is_torchscript_archive(str(path))
    loaded = interop.clip_visual_state_dict(path)
    assert sorted(loaded) == sorted(sd)
    for key in sd:
        torch.testing.assert_close(loaded[key], sd[key], atol=0, rtol=0, msg=key)
    teacher = interop.load_teacher(path, input_resolution=64, return_layers=2)
    for ours, theirs in zip(_teacher_outputs(teacher), expected):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_torchscript_archive_is_read_without_running_its_code(tmp_path, monkeypatch):
    path = _write(tmp_path, "openai torchscript", _openai())

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load must not be called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    assert "visual.conv1.weight" in interop.read_torchscript_state_dict(str(path))
    interop.load_teacher(path, input_resolution=64, return_layers=2)


def test_teacher_format_errors_name_the_problem(tmp_path):
    hf = _to_hf(_openai())
    del hf["visual_projection.weight"]
    with pytest.raises(ValueError, match="CLIPVisionModel has no output projection"):
        interop.load_teacher(hf)
    timm = _to_timm(_openai()) | {"head.bias": torch.ones(CLIP["output_dim"])}
    with pytest.raises(ValueError, match="non-zero 'head.bias'"):
        interop.load_teacher(timm)
    sd = _openai()
    del sd["ln_post.bias"]
    with pytest.raises(ValueError, match=r"1 missing key\(s\): ln_post.bias"):
        interop.load_teacher(sd, input_resolution=64, return_layers=2)


# --------------------------------------------------------------------------------------------
# Weights out
# --------------------------------------------------------------------------------------------


def _fake_pretrain_run(run_dir, sd, step):
    """A run-directory checkpoint as the pre-training loop writes it."""
    student = interop.load_student(sd, num_frames=T, img_size=IMG)
    optimizer = torch.optim.AdamW(student.parameters())
    config = {"data": {"num_frames": T, "img_size": IMG}, "student": {"patch_size": PATCH, "size": "tiny"}}
    ckpt.save_checkpoint(str(run_dir), step, student, optimizer, {"config": config, "data_position": 0}, keep_last=3)
    return student


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_export_round_trip_gives_identical_outputs(tmp_path, fmt, capsys):
    run_dir = tmp_path / "run"
    _fake_pretrain_run(run_dir, _stage1(seed=7), step=10)
    newest = _fake_pretrain_run(run_dir, _stage1(seed=8), step=20)
    out = tmp_path / f"exported.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    assert export.main([str(run_dir), "--out", str(out), "--format", fmt]) == 0  # a run dir: its newest checkpoint
    assert "step 20" in capsys.readouterr().out
    if fmt == "pth":
        keys = torch.load(out, weights_only=True).keys()
    else:
        from safetensors import safe_open

        with safe_open(str(out), "pt") as f:
            keys = f.keys()
            assert json.loads(f.metadata()["umt_fast"])["kind"] == "student"
    assert all(k.startswith(("encoder.", "clip_decoder.")) for k in keys)
    description = json.loads((tmp_path / "exported.json").read_text())
    assert (description["kind"], description["num_frames"], description["img_size"], description["step"]) == ("student", T, IMG, 20)
    reloaded = interop.load_student(out, num_frames=T, img_size=IMG)
    torch.testing.assert_close(_student_out(reloaded), _student_out(newest), atol=0, rtol=0)


def test_export_refuses_what_is_not_a_run_checkpoint(tmp_path, capsys):
    assert export.main([str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "neither a checkpoint nor a run directory" in capsys.readouterr().err
    (tmp_path / "half_written").mkdir()
    assert export.main([str(tmp_path / "half_written"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "half_written" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.safetensors")
