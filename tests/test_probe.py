"""Frozen-feature probes (`python -m umt_fast.probe`): a linear or attentive head on a frozen
encoder, trained, checkpointed, resumed and evaluated by the fine-tuning recipe."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from tests import umt_reference as ref
from tests.launch import kill_at_checkpoint, run_command
from tests.markers import needs_fsdp_on_cpu
from tests.test_finetune import SMALL, _write_list
from umt_fast import evaluate, export, interop, probe
from umt_fast.config.finetune import PRESETS, build_config, build_probe_config, get_preset, probe_help_text, validate
from umt_fast.engine import checkpoint as ckpt
from umt_fast.engine.metrics import read_metrics
from umt_fast.engine.optim import WarmupCosineSchedule
from umt_fast.models.classifier import AttentivePooler, VideoViT, VideoViTArch
from umt_fast.recipes import finetune as recipe

CHANCE = 100 / 3  # the three classes of tests.test_finetune's labels
PROBE = SMALL + ["--log.every_steps", "1", "--data.num_workers", "0", "--optim.warmup_epochs", "1"]
HEAD_PREFIXES = ("probe.", "head.")


def _losses_by_step(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(run_dir / "metrics.jsonl")) if "loss" in r}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random tiny stage-1 file (the reference's naming) and a labelled list of the sample clips."""
    root = tmp_path_factory.mktemp("probe")
    sd = ref.random_student_state_dict(width=192, depth=4, heads=3, K=1, teacher_dim=16, seed=5)
    torch.save({"model": sd}, root / "stage1.pth")
    return {"root": root, "stage1": str(root / "stage1.pth"), "sd": sd, "list": _write_list(root / "train.csv")}


@pytest.fixture(scope="module")
def attentive_run(files):
    """One 12-step attentive probe of the stage-1 file, shared by the tests below."""
    run_dir = files["root"] / "attentive"
    args = ["--init", files["stage1"], "--data.train_list", files["list"], "--data.val_list", files["list"],
            "--optim.epochs", "12", "--checkpoint.every_steps", "4", "--eval.every_steps", "6"] + PROBE  # fmt: skip
    assert probe.main(["--run-dir", str(run_dir)] + args) == 0
    return {"run_dir": run_dir, "args": args}


def test_the_attentive_probe_learns_the_labels_above_chance(attentive_run):
    run_dir = attentive_run["run_dir"]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"]["probe"] == "attentive"  # the probe command's default
    assert "attentive probe of a frozen tiny backbone" in (run_dir / "log.txt").read_text()
    records = read_metrics(str(run_dir / "metrics.jsonl"))
    train = [r["train/top1"] for r in records if "train/top1" in r]
    assert len(train) == 12 and train[0] <= 50
    assert sum(train[-4:]) / 4 > CHANCE + 10, train
    evals = [r for r in records if "eval/top1" in r]
    assert [r["step"] for r in evals] == [6, 12] and evals[-1]["eval/top1"] > CHANCE, evals


def test_the_backbone_stays_bitwise_the_init_files_and_only_the_head_is_optimised(files, attentive_run):
    """Every backbone tensor of the final checkpoint is the stage-1 file's, bit for bit; the
    optimizer's state holds the head's parameters and nothing else."""
    weights, description = ckpt.read_run_checkpoint(str(attentive_run["run_dir"]))
    assert description["kind"] == "classifier" and description["step"] == 12
    encoder = interop.load_video_vit(files["stage1"], num_frames=2, img_size=64)  # the file's encoder, final norm too
    backbone = encoder.state_dict()
    assert {k for k in weights if not k.startswith(HEAD_PREFIXES)} == set(backbone)
    for name, tensor in backbone.items():
        assert torch.equal(weights[name], tensor), name
    state = ckpt.load_checkpoint(ckpt.resolve_checkpoint(str(attentive_run["run_dir"])))
    optimised = set(state["optimizer"]["state"])
    assert optimised == {k for k in weights if k.startswith(HEAD_PREFIXES)}
    assert {"probe.query", "probe.kv.weight", "head.weight"} <= optimised


@pytest.mark.parametrize("kind", ["linear", "attentive"])
def test_the_frozen_backbone_gets_no_gradient_and_stays_out_of_the_optimizer(files, kind):
    """Three steps of the recipe's step with drop path and layer decay asked for: the backbone has
    no gradient and is bitwise unchanged, no block drops paths, the optimizer's groups hold exactly
    the head's parameters (all at lr scale 1), and the head moves."""
    cfg = build_probe_config(["--init", files["stage1"], "--model.probe", kind, "--model.drop_path", "0.3",
                              "--optim.layer_decay", "0.5", "--train.activation_checkpointing", "all"] + PROBE)  # fmt: skip
    model = recipe.build_model(cfg, num_classes=3)
    assert model.drop_probs == [0.0] * 4 and model.checkpoint_blocks == 0 and model.arch.final_norm
    optimizer = recipe.build_optimizer(model, cfg)
    head = {name for name, _ in model.named_parameters() if name.startswith(HEAD_PREFIXES)}
    name_of = {id(p): name for name, p in model.named_parameters()}
    assert {name_of[id(p)] for g in optimizer.param_groups for p in g["params"]} == head
    assert {g["lr_scale"] for g in optimizer.param_groups} == {1.0}
    assert all(not p.requires_grad for p in model.backbone_parameters()) and len(model.backbone_parameters()) > 40
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    step = recipe.FinetuneStep(model, optimizer, cfg, 3, torch.device("cpu"))
    schedule = WarmupCosineSchedule(peak_lr=1e-2, min_lr=1e-2, total_steps=3, warmup_steps=0)
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        schedule.set_lr(optimizer, i)
        video = torch.randint(0, 256, (4, 2, 64, 64, 3), dtype=torch.uint8, generator=g)
        loss, _ = step(video, torch.tensor([0, 1, 2, 0]), i)
        assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        if name in head:
            assert not torch.equal(p, before[name]), name
        else:
            assert p.grad is None and torch.equal(p, before[name]), name


def test_the_linear_probe_is_the_mean_of_the_encoders_tokens_then_a_linear(files):
    """float64: the stage-1 encoder restated in plain PyTorch (tests.umt_reference: the reference's
    patch embedding, table and blocks, then its final norm), the mean over tokens, then a Linear."""
    cfg = build_probe_config(["--init", files["stage1"], "--model.probe", "linear", "--data.num_frames", "2",
                              "--data.img_size", "32"])  # fmt: skip
    model = recipe.build_model(cfg, num_classes=5).double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(5, 192, generator=g, dtype=torch.float64))
        model.head.bias.copy_(torch.randn(5, generator=g, dtype=torch.float64))
    video = torch.randn(3, 3, 2, 32, 32, generator=g, dtype=torch.float64)
    sd = {k: v.double() for k, v in files["sd"].items()}
    w = sd["encoder.patch_embed.proj.weight"]
    x = F.conv3d(video, w, sd["encoder.patch_embed.proj.bias"], stride=(1, 16, 16)).flatten(2).transpose(1, 2)
    x = x + ref.finetune_sinusoid_table(x.shape[1], 192, cur_frame=2).double()
    for i in range(4):
        x = ref.vit_block(x, sd, f"encoder.blocks.{i}", heads=3)
    x = F.layer_norm(x, (192,), sd["encoder.norm.weight"], sd["encoder.norm.bias"], 1e-6)
    expected = F.linear(x.mean(1), model.head.weight, model.head.bias)
    with torch.no_grad():
        torch.testing.assert_close(model(video), expected, atol=1e-10, rtol=0)


def _restated_pooler(pooler: AttentivePooler, tokens_BND: torch.Tensor) -> torch.Tensor:
    """V-JEPA's depth-1 attentive pooler, head by head: q = query + concat_h softmax(q_h k_h^T /
    sqrt(d)) v_h, then q + MLP(LN(q)), with keys and values from LN(tokens)."""
    B, N, D = tokens_BND.shape
    H = pooler.heads
    d = D // H
    x = F.layer_norm(tokens_BND, (D,), pooler.norm1.weight, pooler.norm1.bias, 1e-6)
    query = pooler.query[0]  # [Q, D]
    q = query @ pooler.q.weight.T + pooler.q.bias
    w_kv, b_kv = pooler.kv.weight, pooler.kv.bias
    k = x @ w_kv[:D].T + b_kv[:D]
    v = x @ w_kv[D:].T + b_kv[D:]
    rows = []
    for b in range(B):
        heads = []
        for h in range(H):
            cols = slice(h * d, (h + 1) * d)
            weights = torch.softmax(q[:, cols] @ k[b, :, cols].T / math.sqrt(d), dim=-1)  # [Q, N]
            heads.append(weights @ v[b, :, cols])
        rows.append(query + torch.cat(heads, dim=-1))
    y = torch.stack(rows)
    h = F.layer_norm(y, (D,), pooler.norm2.weight, pooler.norm2.bias, 1e-6)
    h = F.gelu(h @ pooler.mlp.fc1.weight.T + pooler.mlp.fc1.bias) @ pooler.mlp.fc2.weight.T + pooler.mlp.fc2.bias
    return y + h


def test_the_attentive_pooler_and_head_equal_an_explicit_restatement():
    """float64, 3 heads, 2 queries, norms and biases away from their init: the pooler's output,
    and the probe head's logits (the queries' mean through the Linear)."""
    torch.manual_seed(0)
    arch = VideoViTArch(width=48, depth=1, heads=1, num_frames=2, img_size=32, num_classes=7, final_norm=True,
                        probe="attentive", probe_queries=2, probe_heads=3)  # fmt: skip
    model = VideoViT(arch).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(HEAD_PREFIXES) and (p.ndim == 1 or name == "probe.query"):
                p.add_(0.3 * torch.randn_like(p))
            if name == "head.weight":
                p.normal_()
    pooler = model.probe
    assert pooler.heads == 3 and pooler.query.shape == (1, 2, 48)
    tokens = torch.randn(4, 10, 48, dtype=torch.float64)
    with torch.no_grad():
        expected = _restated_pooler(pooler, tokens)
        torch.testing.assert_close(pooler(tokens), expected, atol=1e-12, rtol=0)
        logits = F.linear(expected.mean(1), model.head.weight, model.head.bias)
        torch.testing.assert_close(model.forward_head(tokens), logits, atol=1e-12, rtol=0)
    assert model.embed(torch.randn(1, 3, 2, 32, 32, dtype=torch.float64))[0].shape == (1, 48)


def test_a_killed_probe_run_resumes_to_the_same_losses(files, attentive_run, tmp_path):
    killed = tmp_path / "killed"
    kill_at_checkpoint("umt_fast.probe", killed, attentive_run["args"], 4)
    steps_saved = [s for s, _ in ckpt.list_checkpoints(str(killed))]
    assert steps_saved and max(steps_saved) < 12, "the kill must land mid-run"
    assert probe.main(["--run-dir", str(killed), "--resume", "auto"] + attentive_run["args"]) == 0
    expected, got = _losses_by_step(attentive_run["run_dir"]), _losses_by_step(killed)
    assert sorted(got) == list(range(1, 13)) and got == expected
    resumed, straight = ckpt.read_run_checkpoint(str(killed))[0], ckpt.read_run_checkpoint(str(attentive_run["run_dir"]))[0]
    for name in ("probe.query", "probe.kv.weight", "head.weight"):
        assert torch.equal(resumed[name], straight[name]), name


def test_evaluate_and_export_read_a_probe_run(attentive_run, files, tmp_path, capsys):
    """`umt_fast.evaluate --checkpoint RUN` scores the probe as the run's own last evaluation did;
    an export with its description loads as the same model; without one it is refused in one line."""
    run_dir = attentive_run["run_dir"]
    out = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", str(run_dir), "--list", files["list"], "--num-clips", "1", "--num-crops", "1",
                          "--num-workers", "0", "--out", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["top1"] == json.loads((run_dir / "eval.json").read_text())["top1"]
    capsys.readouterr()

    exported = tmp_path / "probe.safetensors"
    assert export.main([str(run_dir), "--out", str(exported)]) == 0
    from_file, known = evaluate.load_classifier(str(exported), None, None, None)
    from_run, _ = evaluate.load_classifier(str(run_dir), None, None, None)
    assert from_file.arch.probe == "attentive" and (known["num_frames"], known["img_size"]) == (2, 64)
    video = torch.randn(2, 3, 2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(from_file(video), from_run(video), atol=0, rtol=0)
    os.remove(tmp_path / "probe.json")
    with pytest.raises(ValueError, match="holds an attentive probe .* but no description of it"):
        evaluate.load_classifier(str(exported), 2, 64, 16)
    assert evaluate.main(["--checkpoint", str(exported), "--list", files["list"], "--num-frames", "2",
                          "--img-size", "64"]) == 2  # fmt: skip
    assert "no description of it" in capsys.readouterr().err


def test_a_linear_probe_run_trains_evaluates_and_exports(files, tmp_path):
    run_dir = tmp_path / "linear"
    args = ["--init", files["stage1"], "--model.probe", "linear", "--data.train_list", files["list"],
            "--data.val_list", files["list"], "--optim.epochs", "3"] + PROBE  # fmt: skip
    assert probe.main(["--run-dir", str(run_dir)] + args) == 0
    assert any("eval/top1" in r for r in read_metrics(str(run_dir / "metrics.jsonl")))
    weights, _ = ckpt.read_run_checkpoint(str(run_dir))
    assert {k for k in weights if k.startswith(("head.", "probe.", "fc_norm."))} == {"head.weight", "head.bias"}
    exported = tmp_path / "linear.pth"
    assert export.main([str(run_dir), "--out", str(exported)]) == 0
    os.remove(tmp_path / "linear.json")  # a head without fc_norm: known as a linear probe even so
    from_file, _ = evaluate.load_classifier(str(exported), 2, 64, 16)
    from_run, _ = evaluate.load_classifier(str(run_dir), None, None, None)
    assert from_file.arch.probe == from_run.arch.probe == "linear"
    video = torch.randn(2, 3, 2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(from_file(video), from_run(video), atol=0, rtol=0)


@pytest.fixture(scope="module")
def one_rank_run(files, tmp_path_factory):
    """A 3-step attentive probe in one process, and its arguments."""
    run_dir = tmp_path_factory.mktemp("probe_one") / "run"
    args = ["--init", files["stage1"], "--data.train_list", files["list"], "--optim.epochs", "3"] + PROBE
    records = run_command("umt_fast.probe", run_dir, 1, args, 0)
    return {"run_dir": run_dir, "args": args, "loss": {r["step"]: r["loss"] for r in records if "loss" in r}}


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=needs_fsdp_on_cpu)])
def test_probe_on_two_ranks_matches_one_process(files, one_rank_run, strategy, tmp_path):
    """Two gloo ranks under DDP or FSDP2: the per-step losses of one process, the head trained
    alike, and the backbone still the init file's, bit for bit."""
    records = run_command("umt_fast.probe", tmp_path / "run", 2, one_rank_run["args"] + ["--dist.strategy", strategy],
                          29650 if strategy == "ddp" else 29690)  # fmt: skip
    two, one = {r["step"]: r["loss"] for r in records if "loss" in r}, one_rank_run["loss"]
    assert sorted(two) == sorted(one) == [1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5), step
    weights = ckpt.read_run_checkpoint(str(tmp_path / "run"))[0]
    head = ckpt.read_run_checkpoint(str(one_rank_run["run_dir"]))[0]["head.weight"]
    torch.testing.assert_close(weights["head.weight"], head, atol=1e-5, rtol=0)
    for name, tensor in interop.load_video_vit(files["stage1"], num_frames=2, img_size=64).state_dict().items():
        assert torch.equal(weights[name], tensor), name


def test_the_probe_command_its_presets_and_its_errors():
    cfg = build_probe_config([])
    assert (cfg.preset, cfg.model.probe, cfg.data.train_list) == ("probe_demo", "attentive", "sample_clips")
    assert build_config([]).model.probe == "none"  # fine-tuning's default stays
    cfg = build_probe_config(["--preset", "umt_b16_k400", "--data.train_list", "x.csv"])
    assert (cfg.model.probe, cfg.model.drop_path) == ("attentive", 0.0)  # every preset, probed
    assert build_probe_config(["--model.probe", "linear"]).model.probe == "linear"
    cfg = build_probe_config(["--preset", "probe_b16_k400", "--data.train_list", "x.csv"])
    assert (cfg.model.size, cfg.model.probe, cfg.model.num_classes, cfg.model.probe_queries) == ("base", "attentive", 400, 1)
    assert (cfg.optim.epochs, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_epochs, cfg.optim.min_lr) == (20, 1e-3, 0.01, 0, 0.0)
    assert (cfg.train.global_batch_size, cfg.data.repeated_aug, cfg.aug.mixup, cfg.aug.label_smoothing) == (256, 1, 0.0, 0.0)
    assert (cfg.eval.num_clips, cfg.eval.num_crops) == (8, 3)
    assert get_preset("probe_l16_k400").model.size == "large"
    for name in PRESETS:
        cfg = get_preset(name)
        cfg.data.train_list = cfg.data.train_list or "train.csv"
        validate(cfg)
    with pytest.raises(ValueError, match=r"model.probe_heads=5 is not allowed: must be 0 .* divide the width of a 'tiny' model \(192\)"):
        build_probe_config(["--model.probe_heads", "5"])
    with pytest.raises(ValueError, match=r"model.probe_queries=0 is not allowed"):
        build_probe_config(["--model.probe_queries", "0"])
    with pytest.raises(ValueError, match=r"model.head_label_map='m.json' is not allowed: does not apply to a probe"):
        build_probe_config(["--init", "x.pth", "--model.head_label_map", "m.json"])
    text = probe_help_text()
    assert "python -m umt_fast.probe" in text and "--model.probe" in text and "probe_b16_k400" in text
    assert "default 'probe_demo'" in text

