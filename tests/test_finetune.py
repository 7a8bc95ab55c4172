"""Fine-tuning, evaluation and feature extraction, end to end on the bundled sample clips."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from tests import umt_reference as ref
from umt_fast import evaluate, export, extract, interop
from umt_fast import finetune
from umt_fast.data import sample_clip_paths
from umt_fast.engine.optim import WarmupCosineSchedule
from umt_fast.data.labelled import multi_view_clip, multi_view_frame_indices, spatial_crop_offsets
from umt_fast.config.finetune import PRESETS, build_config, get_preset, validate
from umt_fast.models.classifier import VideoViT, VideoViTArch, head_dropout_scales
from umt_fast.engine.metrics import read_metrics

# Synthetic labels a tiny model can learn from a few steps: the two carphone clips (the same
# scene) share a class, the other two have one each. Chance is 1/3 of the clips.
LABELS = {"bigbuckbunny.mp4": 1, "bikes.mp4": 2, "carphone_distorted.mp4": 0, "carphone_pristine.mp4": 0}
SMALL = ["--data.img_size", "64", "--data.num_frames", "2", "--aug.rand_augment_ops", "1", "--aug.random_erasing", "0.25",
         "--aug.mixup", "0", "--aug.cutmix", "0", "--optim.lr", "0.064", "--optim.warmup_epochs", "2",
         "--log.every_steps", "4", "--eval.num_clips", "1", "--eval.num_crops", "1", "--data.num_workers", "1"]  # fmt: skip


def _write_list(path, extra=()):
    with open(path, "w") as f:
        for clip in sample_clip_paths():
            f.write(f"{clip},{LABELS[os.path.basename(clip)]}\n")
        for line in extra:
            f.write(line + "\n")
    return str(path)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """One 12-step fine-tuning run, shared by the tests below."""
    root = tmp_path_factory.mktemp("finetune")
    train_list = _write_list(root / "train.csv")
    (root / "classes.txt").write_text("carphone\nbunny\nbikes\n")
    run_dir = root / "run"
    args = ["--run-dir", str(run_dir), "--data.train_list", train_list, "--data.val_list", train_list,
            "--data.class_names", str(root / "classes.txt"), "--optim.epochs", "12", "--checkpoint.every_steps", "6",
            "--eval.every_steps", "6"] + SMALL  # fmt: skip
    assert finetune.main(args) == 0
    return {"root": root, "run_dir": run_dir, "list": train_list, "args": args}


def test_finetune_learns_the_labels_and_records_train_and_eval_top1(finetuned):
    run_dir = finetuned["run_dir"]
    for name in ("config.yaml", "config.json", "log.txt", "metrics.jsonl", "eval.json"):
        assert (run_dir / name).is_file(), name
    records = read_metrics(str(run_dir / "metrics.jsonl"))
    train = [r for r in records if "train/top1" in r]
    assert [r["step"] for r in train] == [4, 6, 8, 12]  # every 4 steps, and at every checkpoint
    assert {"loss", "lr", "clips/s", "data/skipped"} <= set(train[0])
    assert max(r["train/top1"] for r in train[-2:]) > 100 / 3 + 10, train  # well above chance
    evals = [r for r in records if "eval/top1" in r]
    assert [r["step"] for r in evals] == [6, 12] and evals[-1]["eval/views"] == 1
    assert evals[-1]["eval/top1"] > 100 / 3, evals
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["num_videos"] == 4 and report["worst_classes"][0]["name"] in ("carphone", "bunny", "bikes")
    assert "step 12/12" in (run_dir / "log.txt").read_text()
    assert [os.path.basename(p) for p in sorted(os.listdir(run_dir / "checkpoints"))] == ["step_00000006", "step_00000012"]


def test_finetune_resumes_from_its_newest_checkpoint(finetuned):
    args = [a if a != "12" else "14" for a in finetuned["args"]]  # a longer schedule: two more steps
    assert finetune.main(args) == 0
    records = read_metrics(str(finetuned["run_dir"] / "metrics.jsonl"))
    resume = [r for r in records if r.get("event") == "resume"]
    assert resume and resume[-1]["step"] == 12
    assert records[-1]["step"] == 14 or records[-2]["step"] == 14


def test_export_of_a_finetuned_run_loads_as_the_same_classifier(finetuned, tmp_path):
    out = tmp_path / "classifier.safetensors"
    assert export.main([str(finetuned["run_dir"]), "--out", str(out)]) == 0
    description = json.loads((tmp_path / "classifier.json").read_text())
    assert description["kind"] == "classifier" and description["class_names"] == ["carphone", "bunny", "bikes"]
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
    assert {"patch_embed.proj.weight", "pos_embed", "fc_norm.weight", "head.weight"} <= keys
    exported, _ = evaluate.load_classifier(str(out), None, None, None)
    from_run, _ = evaluate.load_classifier(str(finetuned["run_dir"]), None, None, None)
    video = torch.randn(2, 3, 2, 64, 64)
    torch.testing.assert_close(exported(video), from_run(video), atol=0, rtol=0)


def test_evaluate_cli_writes_json_and_a_table_and_reports_unreadable_videos(finetuned, tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    listing = _write_list(tmp_path / "val.csv", extra=[f"{bad},1"])
    out = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", str(finetuned["run_dir"]), "--list", listing, "--num-clips", "2",
                          "--num-workers", "0", "--out", str(out)]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert "top-1:" in captured.out and "worst classes:" in captured.out
    assert f"unreadable video skipped: {bad}" in captured.err
    report = json.loads(out.read_text())
    assert report["num_videos"] == 4 and report["views_per_video"] == 6 and 0 <= report["top1"] <= 100
    assert report["unreadable"][0]["path"] == str(bad)

    clip = sample_clip_paths()[1]
    assert evaluate.main(["--checkpoint", str(finetuned["run_dir"]), "--video", clip, "--num-clips", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{clip} (3 views):" and len(lines) == 4  # 3 classes: a top-3
    assert {line.split()[1] for line in lines[1:]} == {"carphone", "bunny", "bikes"}


class _ViewProbe(nn.Module):
    """Logits that depend on the view's pixels; records every view it sees."""

    def __init__(self):
        super().__init__()
        self.arch = VideoViTArch(width=8, depth=1, heads=1, num_frames=3, img_size=32, num_classes=4)
        self.seen = []

    def forward(self, video_BCTHW):
        self.seen.append(video_BCTHW.shape[0])
        means = video_BCTHW.mean(dim=(1, 2, 3, 4))
        return torch.stack([means * k for k in range(4)], dim=-1)


@pytest.mark.parametrize("num_clips,num_crops", [(2, 3), (3, 1)])
def test_evaluation_averages_exactly_clips_x_crops_views_per_video(num_clips, num_crops):
    paths = sample_clip_paths()[:2]
    probe = _ViewProbe()
    preds = evaluate.predict_videos(probe, paths, num_clips=num_clips, num_crops=num_crops, batch_size=4)
    views = num_clips * num_crops
    assert preds.views_per_video == views and sum(probe.seen) == 2 * views
    for row, path in enumerate(paths):
        clip_views = multi_view_clip(path, 3, 32, num_clips, num_crops)
        assert clip_views.shape == (views, 3, 32, 32, 3)
        expected = torch.stack([probe(evaluate.normalize_video(v[None])).softmax(-1)[0] for v in clip_views]).mean(0)
        torch.testing.assert_close(preds.probs[row], expected)


def test_view_geometry_follows_the_reference_test():
    from tests import umt_reference as ref

    # segments of 99 / 4 = 24.75 frames, starting at round(24.75 i) = 0, 25, 50, 74
    assert multi_view_frame_indices(100, 4, 1) == [[12, 37, 62, 86]]  # + int(24.75 / 2)
    assert multi_view_frame_indices(100, 4, 3)[0] == [6, 31, 56, 80]  # + int(24.75 / 4)
    for n in range(1, 70):
        for t, clips in ((1, 1), (4, 2), (8, 3), (16, 5)):
            want = [ref.reference_sparse_frame_indices(n, t, k, clips) for k in range(clips)]
            assert multi_view_frame_indices(n, t, clips) == want, (n, t, clips)
    assert spatial_crop_offsets(300, 224, 3) == [0, 38, 76] and spatial_crop_offsets(300, 224, 1) == [38]
    wide = multi_view_clip(sample_clip_paths()[1], 2, 48, 1, 3)  # bikes: 640x272, crops along the width
    assert not torch.equal(wide[0], wide[2])


def test_training_frames_are_the_random_frames_the_reference_draws():
    """A fine-tuning clip's frames are the reference's sparse training draw: the same frames from
    the same generator state, one per segment of [round(s i), round(s (i + 1))], ends included."""
    import random

    from tests import umt_reference as ref
    from umt_fast.data.transforms import sparse_random_indices

    for n in range(1, 70):
        for t in (1, 2, 4, 8, 16):
            for seed in range(3):
                want = ref.reference_sparse_frame_indices(n, t, -1, py_random=random.Random(seed))
                assert sparse_random_indices(n, t, random.Random(seed)) == want, (n, t, seed)
    rng = random.Random(0)
    drawn = [sparse_random_indices(9, 4, rng) for _ in range(400)]  # s = 2: [0, 2] [2, 4] [4, 6] [6, 8]
    assert [sorted({d[i] for d in drawn}) for i in range(4)] == [[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7, 8]]
    with pytest.raises(ValueError, match="num_video_frames"):
        sparse_random_indices(0, 4, rng)


def test_test_views_resize_as_the_reference_cv2_resize():
    """Evaluation views: the short side to the input size with the long side truncated, bilinear
    without antialiasing (the reference's cv2.INTER_LINEAR), then the crops along the long side:
    within one level of the exact float64 resize everywhere."""
    import numpy as np

    from tests import umt_reference as ref
    from umt_fast.data.decoding import count_frames, decode_frames

    for clip in sample_clip_paths()[:2]:  # 1280x720 and 640x272
        views = multi_view_clip(clip, 2, 48, 1, 3)
        frames = decode_frames(clip, multi_view_frame_indices(count_frames(clip), 2, 1)[0])
        new_h, new_w = ref.reference_short_side_size(frames.shape[1], frames.shape[2], 48)
        assert new_h == 48 and new_w == int(48 * frames.shape[2] / frames.shape[1])
        exact = ref.reference_bilinear_resize(frames.numpy(), new_h, new_w)
        for view, offset in zip(views, spatial_crop_offsets(new_w, 48, 3)):
            worst = np.abs(view.numpy().astype(np.float64) - exact[:, :, offset:offset + 48]).max()
            assert worst <= 1.0, (clip, offset, worst)


def test_training_crops_resize_as_the_reference_interpolate():
    """A training clip (RandAugment off): the random box of the clip's generator, resized
    bilinearly without antialiasing (the reference's F.interpolate on the crop), then the flip;
    within one level of the exact float64 resize (ours rounds to uint8 before normalising)."""
    import random

    import numpy as np

    from tests import umt_reference as ref
    from umt_fast.data.annotations import VideoRecord
    from umt_fast.data.decoding import decode_frames
    from umt_fast.data.labelled import FinetuneClipDataset
    from umt_fast.data.transforms import random_resized_crop_box

    clip = sample_clip_paths()[1]  # bikes, 640x272
    dataset = FinetuneClipDataset([VideoRecord(clip, 0)], num_frames=2, img_size=40, seed=0)
    frames = decode_frames(clip, [10, 200])
    for seed in range(4):
        rng = random.Random(seed)  # the draws augment makes, in its order: the box, then the flip
        x0, y0, w, h = random_resized_crop_box(640, 272, rng, scale=(0.08, 1.0))
        exact = ref.reference_bilinear_resize(frames[:, y0:y0 + h, x0:x0 + w].numpy(), 40, 40)
        if rng.random() < 0.5:
            exact = exact[:, :, ::-1]
        got = dataset.augment(frames, random.Random(seed)).numpy().astype(np.float64)
        assert np.abs(got - exact).max() <= 1.0, seed


def test_accuracy_report_names_the_worst_classes_and_their_confusions():
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    labels = torch.tensor([0, 1, 1, 2])
    report = evaluate.accuracy_report(probs, labels, ["a", "b", "c"])
    assert report["top1"] == 75.0 and report["top5"] == 100.0
    worst = report["worst_classes"][0]
    assert (worst["name"], worst["top1"], worst["confused_with"]) == ("b", 50.0, [{"label": 0, "name": "a", "count": 1}])
    assert "b" in evaluate.format_report(report)


def test_layer_decay_groups_and_the_head_init():
    cfg = get_preset("demo")
    cfg.optim.layer_decay = 0.5
    model = finetune.build_model(cfg, num_classes=3)
    groups = finetune.layer_decay_param_groups(model, 0.05, 0.5)
    scale_of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    depth = model.arch.depth  # 4
    assert scale_of[id(model.patch_embed.proj.weight)] == (0.5 ** (depth + 1), 0.05)
    assert scale_of[id(model.blocks[0].attn.qkv.weight)] == (0.5**depth, 0.05)
    assert scale_of[id(model.blocks[3].norm1.bias)] == (0.5, 0.0)
    assert scale_of[id(model.head.weight)] == (1.0, 0.05) and scale_of[id(model.fc_norm.weight)] == (1.0, 0.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = finetune.build_optimizer(model, cfg)
    WarmupCosineSchedule(peak_lr=1e-3, min_lr=1e-3, total_steps=10, warmup_steps=0).set_lr(optimizer, 5)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [1e-3 * 0.5**k for k in range(depth + 1, -1, -1)]


def test_mixing_targets_and_erasing():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mix = finetune.draw_mix(32, 48, 0.8, 1.0, 1.0, 0.5, rng)
        if mix.box is not None:
            y0, y1, x0, x1 = mix.box
            assert mix.lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (32 * 48))
        assert 0 <= mix.lam <= 1
    assert finetune.draw_mix(32, 32, 0.0, 0.0, 1.0, 0.5, rng).lam == 1.0
    targets = finetune.soft_targets(torch.tensor([0, 2, 1]), 4, smoothing=0.1, lam=0.7)
    torch.testing.assert_close(targets.sum(-1), torch.ones(3))
    assert targets[0, 0] == pytest.approx(0.7 * 0.925 + 0.3 * 0.025)  # own label 0, partner (flipped) label 1
    mask = finetune.random_erasing_mask(64, 16, 16, 1.0, np.random.default_rng(1))
    areas = mask.float().mean(dim=(1, 2, 3))
    assert mask.shape == (64, 1, 16, 16) and (areas > 0).float().mean() > 0.9 and (areas <= 1 / 3 + 0.05).all()
    assert finetune.random_erasing_mask(8, 16, 16, 0.0, np.random.default_rng(1)) is None


def test_activation_checkpointing_gives_the_same_gradients():
    arch = VideoViTArch(width=64, depth=2, heads=1, num_frames=2, img_size=32, num_classes=3)
    torch.manual_seed(0)
    plain = VideoViT(arch)
    checkpointed = VideoViT(arch)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_grad_checkpointing(True)
    video = torch.randn(2, 3, 2, 32, 32)
    for model in (plain, checkpointed):
        model(video).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_presets_and_config_errors(capsys):
    for name in PRESETS:
        cfg = get_preset(name)
        if not cfg.data.train_list:
            cfg.data.train_list = "train.csv"
        validate(cfg)
    cfg = build_config(["--preset", "umt_l16_ssv2", "--data.train_list", "x.csv"])
    assert (cfg.optim.layer_decay, cfg.model.drop_path, cfg.aug.flip, cfg.train.checkpointed_blocks(24)) == (0.85, 0.2, False, 12)
    with pytest.raises(ValueError, match=r"aug.switch_prob=1.5 is not allowed"):
        build_config(["--aug.switch_prob", "1.5"])
    with pytest.raises(ValueError, match="data.train_list is not set"):
        build_config(["--preset", "umt_b16_k400"])
    with pytest.raises(SystemExit) as e:
        finetune.main(["--eval.num_crops", "2"])
    assert e.value.code == 2 and "--eval.num_crops" in capsys.readouterr().err
    assert finetune.main(["--eval.num_clips", "0"]) == 2
    assert "eval.num_clips=0 is not allowed" in capsys.readouterr().err
    # a training list of the user's own is not evaluated on the demo's sample clips
    assert build_config([]).data.val_list == "sample_clips"
    assert build_config(["--data.train_list", "mine.csv"]).data.val_list == ""
    assert build_config(["--data.train_list", "mine.csv", "--data.val_list", "val.csv"]).data.val_list == "val.csv"
    # the older spelling of the global batch, on the command line and in a run's config.yaml
    assert build_config(["--train.batch_size", "6"]).train.global_batch_size == 6


def test_extract_writes_embeddings_deterministically_and_reports_unreadable_files(tmp_path, capsys):
    sd = ref.random_student_state_dict(width=64, depth=2, heads=1, K=1, teacher_dim=16, seed=3)
    torch.save({"model": sd}, tmp_path / "stage1.pth")
    clips = sample_clip_paths()
    bad = tmp_path / "missing.mp4"
    common = ["--checkpoint", str(tmp_path / "stage1.pth"), "--num-frames", "2", "--img-size", "32",
              "--num-workers", "0", "--batch-size", "3"]  # fmt: skip
    out = tmp_path / "features.safetensors"
    assert extract.main(common + ["--videos", *clips, str(bad), "--out", str(out), "--tokens"]) == 0
    err = capsys.readouterr().err
    assert f"unreadable video skipped: {bad}" in err and "extracted 5/5 videos" in err
    with safe_open(str(out), "pt") as f:
        embeddings, tokens = f.get_tensor("embeddings"), f.get_tensor("tokens")
        meta = json.loads(f.metadata()["umt_fast"])
    assert embeddings.shape == (4, 64) and tokens.shape == (4, 2 * 4, 64)
    assert meta["paths"] == clips and meta["unreadable"][0]["path"] == str(bad)
    torch.testing.assert_close(embeddings, tokens.mean(1))  # the mean of the final-normed tokens
    described = json.loads((tmp_path / "features.json").read_text())
    assert described["paths"] == clips and len(described["unreadable"]) == 1

    listing = tmp_path / "videos.csv"
    listing.write_text("".join(f"{c},0\n" for c in clips))
    assert extract.main(common + ["--videos", str(listing), "--out", str(tmp_path / "again.npy")]) == 0
    again = np.load(tmp_path / "again.npy")
    np.testing.assert_array_equal(again, embeddings.numpy())  # same features, run to run and batch to batch

    encoder = interop.load_video_vit(tmp_path / "stage1.pth", num_frames=2, img_size=32)
    one = extract.extract_features(encoder, clips[2:3])[1]
    torch.testing.assert_close(one[0], embeddings[2], atol=1e-5, rtol=0)


def test_demo_preset_runs_on_the_sample_clips(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    assert finetune.main(["--run-dir", str(run_dir), "--train.max_steps", "2", "--log.every_steps", "1"]) == 0
    out = capsys.readouterr().out
    assert f"run directory: {run_dir}" in out and "eval:" in out and "on 4 videos x 6 views" in out
    records = read_metrics(str(run_dir / "metrics.jsonl"))
    assert [r["step"] for r in records if "train/top1" in r] == [1, 2]
    assert any("eval/top1" in r for r in records)
    assert (run_dir / "sample_clips.csv").is_file()


def test_init_from_a_pretraining_run_directory(tmp_path):
    from umt_fast.engine import checkpoint as ckpt

    sd = ref.random_student_state_dict(width=192, depth=4, heads=3, K=2, teacher_dim=16, seed=4)
    student = interop.load_student(sd, num_frames=4, img_size=112)
    config = {"data": {"num_frames": 4, "img_size": 112}, "student": {"patch_size": 16, "size": "tiny"}}
    ckpt.save_checkpoint(str(tmp_path / "pre"), 40, student, torch.optim.AdamW(student.parameters()),
                         {"config": config, "data_position": 0}, keep_last=1)  # fmt: skip
    cfg = get_preset("demo")
    cfg.model.init = str(tmp_path / "pre")
    model = finetune.build_model(cfg, num_classes=4)
    torch.testing.assert_close(model.blocks[3].attn.q_bias, sd["encoder.blocks.3.attn.q_bias"], atol=0, rtol=0)
    torch.testing.assert_close(model.patch_embed.proj.weight, sd["encoder.patch_embed.proj.weight"], atol=0, rtol=0)
    assert not model.arch.final_norm  # the encoder's final norm gives way to fc_norm after pooling


def test_help_lists_every_option():
    from umt_fast.config.finetune import all_field_names, help_text

    text = help_text()
    for name in all_field_names():
        assert f"--{name}" in text, name
    for shared in ("--train.compile", "--train.attention", "--train.global_batch_size", "--log.tensorboard",
                   "--log.wandb", "--train.batch_size", "--init"):  # fmt: skip
        assert shared in text, shared
    assert "layer-wise lr decay" in text.lower() or "Layer-wise lr decay" in text


def test_evaluate_dispatches_the_retrieval_subcommand(capsys):
    from umt_fast.evaluate import main as evaluate_main

    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["retrieval", "--help"])
    assert exit_info.value.code == 0
    assert "python -m umt_fast.evaluate retrieval" in capsys.readouterr().out


def test_head_dropout_is_drawn_per_global_clip():
    """Counter-based head dropout: the factors are 0 or 1 / (1 - p), about p of them 0, and
    clip b's factors depend only on its global index (two ranks of 3 clips draw what one rank
    of 6 draws); the classifier applies them only in training mode."""
    p, D = 0.3, 64
    whole = head_dropout_scales(p, 6, D, seed=1, offset=7, first_clip=0, device=torch.device("cpu"))
    halves = [head_dropout_scales(p, 3, D, seed=1, offset=7, first_clip=first, device=torch.device("cpu"))
              for first in (0, 3)]
    torch.testing.assert_close(torch.cat(halves), whole, rtol=0, atol=0)
    assert whole.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    assert abs((whole == 0).float().mean().item() - p) < 0.05
    other_step = head_dropout_scales(p, 6, D, seed=1, offset=8, first_clip=0, device=torch.device("cpu"))
    assert not torch.equal(other_step, whole)

    torch.manual_seed(0)
    model = VideoViT(VideoViTArch(width=D, depth=1, heads=1, num_frames=2, img_size=32, num_classes=5, head_dropout=p))
    video = torch.randn(6, 3, 2, 32, 32)
    model.train()
    pooled = model.forward_head(model.forward_features(video), pre_logits=True)
    expected = pooled * whole @ model.head.weight.t() + model.head.bias
    torch.testing.assert_close(model(video, None, whole), expected)
    model.eval()
    torch.testing.assert_close(model(video, None, whole), model(video))


def test_head_label_map_option_starts_kinetics_600_from_a_k710_file(tmp_path):
    from umt_fast.finetune import check_config as check_paths

    stage1 = ref.random_student_state_dict(width=192, depth=4, heads=3, K=1, teacher_dim=16, seed=6)
    k710 = ref.finetuned_state_dict(stage1, num_classes=710, seed=6)
    torch.save({"model": k710}, tmp_path / "k710.pth")
    label_map = list(range(710))[::-1][:600]
    (tmp_path / "label_mixto600.json").write_text(json.dumps(label_map))
    train_list = _write_list(tmp_path / "train.csv")
    args = ["--data.train_list", train_list, "--init", str(tmp_path / "k710.pth"), "--model.num_classes", "600",
            "--model.head_label_map", str(tmp_path / "label_mixto600.json")]  # fmt: skip
    cfg = build_config(args)
    check_paths(cfg)
    model = finetune.build_model(cfg, num_classes=600)
    torch.testing.assert_close(model.head.weight, k710["head.weight"][label_map], atol=0, rtol=0)
    torch.testing.assert_close(model.fc_norm.weight, k710["fc_norm.weight"], atol=0, rtol=0)
    video = torch.randn(1, 3, cfg.data.num_frames, cfg.data.img_size, cfg.data.img_size, dtype=torch.float64)
    whole = interop.load_video_vit(tmp_path / "k710.pth", num_frames=cfg.data.num_frames, img_size=cfg.data.img_size)
    with torch.no_grad():
        torch.testing.assert_close(model.double().eval()(video), whole.double()(video)[:, label_map], atol=1e-10, rtol=0)
    cfg.model.num_classes = 400  # a K710 head into 400 classes needs no map: its first 400 rows
    cfg.model.head_label_map = ""
    model = finetune.build_model(cfg, num_classes=400)
    torch.testing.assert_close(model.head.bias, k710["head.bias"][:400], atol=0, rtol=0)

    (tmp_path / "short.json").write_text(json.dumps(label_map[:599]))
    (tmp_path / "range.json").write_text(json.dumps(label_map[:599] + [710]))
    for name, message in (("short.json", "holds 599 rows, but the model has 600 classes"),
                          ("range.json", r"row 710 is outside \[0, 710\)")):  # fmt: skip
        cfg = build_config(args[:-1] + [str(tmp_path / name)])
        with pytest.raises(ValueError, match=rf"model.head_label_map='.*{name}' is not allowed: {message}"):
            check_paths(cfg)
    cfg = build_config(args[:4] + ["--model.num_classes", "0"] + args[6:])  # classes from the labels: 3
    check_paths(cfg)
    with pytest.raises(ValueError, match=r"model.head_label_map='.*' is not allowed: holds 600 rows, but the model has 3"):
        finetune.build_model(cfg, num_classes=3)
    with pytest.raises(FileNotFoundError, match=r"model.head_label_map='.*nothing.json': no such file"):
        check_paths(build_config(args[:-1] + [str(tmp_path / "nothing.json")]))
    with pytest.raises(ValueError, match=r"model.head_label_map='x.json' is not allowed: needs model.init"):
        build_config(["--data.train_list", train_list, "--model.head_label_map", "x.json"])


def test_extract_and_evaluate_check_their_output_before_the_work(tmp_path, capsys):
    """An output that cannot be written is refused before any video is decoded (a path under a
    file: unwritable even for root); --tokens with .npy writes both arrays and says so."""
    sd = ref.random_student_state_dict(width=64, depth=2, heads=1, K=1, teacher_dim=16, seed=3)
    torch.save({"model": sd}, tmp_path / "stage1.pth")
    (tmp_path / "a_file").write_text("")
    common = ["--checkpoint", str(tmp_path / "stage1.pth"), "--num-frames", "2", "--img-size", "32",
              "--num-workers", "0", "--videos", *sample_clip_paths()[:2]]  # fmt: skip
    assert extract.main(common + ["--out", str(tmp_path / "a_file" / "f.npy")]) == 2
    captured = capsys.readouterr()
    assert "--out" in captured.err and "cannot write there" in captured.err and "extracted" not in captured.err
    out = tmp_path / "tok.npy"
    assert extract.main(common + ["--out", str(out), "--tokens"]) == 0
    printed = capsys.readouterr().out
    assert np.load(out).shape == (2, 2 * 4, 64) and np.load(tmp_path / "tok_embeddings.npy").shape == (2, 64)
    assert "tokens [2, 8, 64]" in printed and "tok_embeddings.npy: embeddings [2, 64]" in printed
    assert set(json.loads((tmp_path / "tok.json").read_text())["arrays"]) == {"tok.npy", "tok_embeddings.npy"}
    assert evaluate.main(["--checkpoint", str(tmp_path / "stage1.pth"), "--list", "x.csv",
                          "--out", str(tmp_path / "a_file" / "r.json")]) == 2  # fmt: skip
    assert "cannot write there" in capsys.readouterr().err


def test_a_resume_continues_the_run_not_the_preset(tmp_path, capsys):
    """Resuming with just --run-dir (what an interrupted run prints) keeps the run's own list and
    classes; changed options are printed and kept in a history, config.yaml keeps the original;
    a change of the model or data is refused unless --allow-config-changes."""
    from umt_fast.config.cli import saved_run_config

    train_list = _write_list(tmp_path / "train.csv")
    run_dir = str(tmp_path / "run")
    first = ["--run-dir", run_dir, "--data.train_list", train_list, "--optim.epochs", "12", "--train.max_steps", "2",
             "--checkpoint.every_steps", "2"] + SMALL  # fmt: skip
    assert finetune.main(first) == 0
    original = open(os.path.join(run_dir, "config.yaml")).read()
    capsys.readouterr()
    assert finetune.main(["--run-dir", run_dir, "--train.max_steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "with the config it trained with, changing train.max_steps: 2 -> 3" in err
    assert "resumed from step 2" in open(os.path.join(run_dir, "log.txt")).read()
    assert open(os.path.join(run_dir, "config.yaml")).read() == original
    saved = saved_run_config(run_dir)
    assert saved["data"]["train_list"] == train_list and saved["train"]["max_steps"] == 3
    assert [r["step"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r][-1] == 3

    assert finetune.main(["--run-dir", run_dir, "--train.max_steps", "4", "--model.num_classes", "7"]) == 2
    err = capsys.readouterr().err
    assert "would change its model or data: model.num_classes: 0 -> 7" in err and "--allow-config-changes" in err
    assert finetune.main(["--run-dir", run_dir, "--train.max_steps", "4", "--data.val_list", train_list]) == 2
    assert finetune.main(["--run-dir", run_dir, "--train.max_steps", "4", "--data.val_list", train_list,
                          "--allow-config-changes"]) == 0  # fmt: skip
    assert saved_run_config(run_dir)["data"]["val_list"] == train_list


@pytest.mark.parametrize("line, message", [
    ("{clip},cat", "has no label"), ("{clip},0.0", "has no label"), ("{clip},0 extra", "has no label"),
    ("{clip},-1", "label -1 is out of range: labels must be in [0, 3) for 3 classes"),
    ("{clip},3", "label 3 is out of range: labels must be in [0, 3) for 3 classes")])  # fmt: skip
def test_every_label_is_checked_before_any_work(tmp_path, capsys, line, message):
    """In the training list, the validation list and evaluate --list: an integer in [0, classes),
    or one line naming the file and the line; nothing is created."""
    clip = sample_clip_paths()[0]
    good = _write_list(tmp_path / "train.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{clip},0\n{clip},1\n{clip},2\n" + line.format(clip=clip) + "\n")
    run_dir = tmp_path / "run"
    for lists in (["--data.train_list", str(bad), "--model.num_classes", "3"],
                  ["--data.train_list", good, "--data.val_list", str(bad)]):  # fmt: skip
        assert finetune.main(["--run-dir", str(run_dir)] + lists) == 2
        assert f"{bad}:4: " in capsys.readouterr().err and not run_dir.exists()
    exported = tmp_path / "cls.pth"  # a 3-class classifier for evaluate
    classifier = VideoViT(VideoViTArch(width=64, depth=2, heads=1, num_frames=2, img_size=32, num_classes=3))
    torch.save({"model": classifier.state_dict()}, exported)
    assert evaluate.main(["--checkpoint", str(exported), "--list", str(bad), "--num-frames", "2", "--img-size", "32"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:4: " in err and message.split(":")[0] in err
