"""`python -m umt_fast.pretrain_vl`: the demo end to end (loss falls, reference-format export,
retrieval on it), exact resume, and config errors before any work."""
import json

import numpy as np
import torch
import yaml
import pytest

from umt_fast.config.vl import build_config
from umt_fast.pretrain_vl import main
from umt_fast.engine.metrics import read_metrics
from umt_fast.vl import retrieval

# The demo's schedule shortened to 3 epochs = 6 steps (2 per epoch: one video, one image step).
SHORT = ["--optim.epochs", "3", "--checkpoint.every_steps", "3"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vl") / "demo"
    assert main(["--run-dir", str(run_dir)] + SHORT) == 0
    return run_dir


def test_demo_vl_trains_its_loss_falls_and_exports(demo_run):
    records = [r for r in read_metrics(str(demo_run / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert sum(r["video_steps"] for r in records) == sum(r["image_steps"] for r in records) == 3
    first, last = records[0]["loss"] + records[1]["loss"], records[-2]["loss"] + records[-1]["loss"]
    assert last < first - 1.0, [r["loss"] for r in records]
    for name in ("uta", "vtc", "vtm", "mlm"):
        assert all(r[name] >= 0 for r in records)
    assert (demo_run / "checkpoints" / "step_00000003").is_dir()
    assert (demo_run / "checkpoints" / "step_00000006").is_dir()
    assert (demo_run / "umt_stage2.pth").is_file()


def test_retrieval_on_the_exported_demo_model(demo_run, capsys):
    out = demo_run / "retrieval.json"
    argv = ["--weights", str(demo_run / "umt_stage2.pth"), "--text-weights", "minilm",
            "--test-list", str(demo_run / "demo_data" / "demo_videos.json"), "--img-size", "112", "--k", "2",
            "--output", str(out)]  # fmt: skip
    assert retrieval.main(argv) == 0
    results = json.loads(out.read_text())
    for scores in ("vtc", "vtm"):
        for key in ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_medr", "v2t_r1", "v2t_medr"):
            assert key in results[scores]
        assert results[scores]["t2v_r10"] == 100.0  # 4 videos
    assert "R@1" in capsys.readouterr().out


def test_resume_continues_exactly(demo_run, tmp_path):
    run_dir = tmp_path / "resumed"
    assert main(["--run-dir", str(run_dir), "--train.max_steps", "1"] + SHORT) == 0
    assert main(["--run-dir", str(run_dir), "--train.max_steps", "2", "--resume", "auto"] + SHORT) == 0
    straight = {r["step"]: r["loss"] for r in read_metrics(str(demo_run / "metrics.jsonl")) if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in read_metrics(str(run_dir / "metrics.jsonl")) if "loss" in r}
    assert sorted(resumed) == [1, 2]
    for step in (1, 2):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6)


def test_published_presets_need_their_inputs_and_bad_values_are_named(tmp_path, capsys):
    with pytest.raises(ValueError, match="teacher.weights"):
        build_config(["--preset", "umt_b16_5m"])
    with pytest.raises(ValueError, match="text.weights"):
        build_config(["--preset", "umt_l16_25m", "--teacher.weights", "clip.pth"])
    cfg = build_config(["--preset", "umt_l16_25m", "--teacher.weights", "clip.pth", "--text.weights", "bert-large",
                        "--data.video_list", "webvid10m.json", "--data.image_list", "cc.json"])  # fmt: skip
    assert (cfg.student.size, cfg.teacher.arch, cfg.teacher.input_resolution) == ("large", "vit_l14", 196)
    assert cfg.model.embed_dim == 768  # the reference's exp/pretraining/l16_*.py (b16_*: 512)
    assert (cfg.text.fusion_layers, cfg.text.max_len, cfg.data.num_frames, cfg.train.batch_size) == (5, 32, 4, 128)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.betas, cfg.optim.weight_decay) == (1e-4, 1e-6, (0.9, 0.999), 0.02)
    assert (cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.mask.video_ratio, cfg.mask.image_ratio) == (10, 1, 0.8, 0.5)
    assert main(["--run-dir", str(tmp_path / "r"), "--mask.image_ratio", "1.5"]) == 2
    assert "mask.image_ratio" in capsys.readouterr().err
    assert main(["--run-dir", str(tmp_path / "r"), "--data.video_list", str(tmp_path / "none.json")]) == 2
    assert "data.video_list" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--text.fusion_layer", "2"])
    assert "--text.fusion_layers" in capsys.readouterr().err  # the close match


def test_compiled_blocks_give_the_eager_losses(demo_run, tmp_path):
    """--train.compile blocks (aot_eager here: tracing without code generation) over a video and
    an image step, each block compiled for both shapes."""
    run_dir = tmp_path / "compiled"
    from torch._dynamo.utils import counters

    args = ["--run-dir", str(run_dir), "--train.max_steps", "3", "--train.compile", "blocks",
            "--train.compile_backend", "aot_eager"] + SHORT
    counters.clear()
    assert main(args) == 0
    assert counters["stats"]["unique_graphs"] >= 4  # teacher, student, BERT and fusion blocks, at least
    straight = {r["step"]: r["loss"] for r in read_metrics(str(demo_run / "metrics.jsonl")) if "loss" in r}
    records = [r for r in read_metrics(str(run_dir / "metrics.jsonl")) if "loss" in r]
    assert {r["video_steps"] > 0 for r in records} == {True, False}  # both media ran
    for r in records:
        assert r["loss"] == pytest.approx(straight[r["step"]], rel=1e-4, abs=1e-5)


def test_a_stage2_run_where_another_stage_is_expected(demo_run, tmp_path, capsys):
    """extract reads a stage-2 run's vision tower; the mask figure and a stage-2 --init name the
    stage of the run they were given and what they expect."""
    from umt_fast import extract, visualize
    from umt_fast.data import sample_clip_paths

    clip = sample_clip_paths()[0]
    out = tmp_path / "f.npy"
    assert extract.main(["--checkpoint", str(demo_run), "--videos", clip, "--out", str(out), "--num-workers", "0"]) == 0
    assert np.load(out).shape == (1, 192)  # the tiny student's width
    assert visualize.main(["mask", clip, "--checkpoint", str(demo_run), "--out", str(tmp_path / "m.png")]) == 2
    assert "is a stage-2 (vision-language) run; the mask figure's student row compares a stage-1 student" in \
        capsys.readouterr().err


def test_retrieval_reads_the_runs_input_size_and_skips_unreadable_videos(demo_run, tmp_path, capsys):
    entries = json.loads((demo_run / "demo_data" / "demo_videos.json").read_text())
    entries.append({"video": str(tmp_path / "missing.mp4"), "caption": "a video that is not there"})
    listing = tmp_path / "test.json"
    listing.write_text(json.dumps(entries))
    out = tmp_path / "r.json"
    argv = ["--checkpoint", str(demo_run), "--text-weights", "minilm", "--test-list", str(listing), "--k", "2",
            "--out", str(out)]  # fmt: skip
    assert retrieval.main(argv) == 0
    report = json.loads(out.read_text())
    saved = yaml.safe_load((demo_run / "config.yaml").read_text())["data"]
    assert (report["num_frames"], report["img_size"]) == (saved["num_frames"], saved["img_size"])  # not 4 x 224
    assert [u["path"] for u in report["unreadable"]] == [str(tmp_path / "missing.mp4")]
    err = capsys.readouterr().err
    assert "unreadable video skipped" in err and f"read {len(entries)}/{len(entries)}" in err
    assert report["vtc"]["t2v_r10"] == 100.0  # over the readable videos


def test_zeroshot_classification_of_the_demo_model(demo_run, tmp_path, capsys):
    """evaluate zeroshot: the report equals top-1 / top-5 computed by hand from the model's own
    embeddings (class = the normalised mean of its prompts' embeddings, score = the mean over
    frames of the cosine)."""
    import torch.nn.functional as F

    from umt_fast.data import sample_clip_paths
    from umt_fast.data.captions import load_media
    from umt_fast.data.transforms import normalize_video
    from umt_fast.evaluate import main as evaluate_main
    from umt_fast.models.text import tokenize_captions
    from umt_fast.recipes.retrieval import load_stage2_model

    clips = sample_clip_paths()
    listing = tmp_path / "test.csv"
    listing.write_text("".join(f"{c},{i % 3}\n" for i, c in enumerate(clips)))
    (tmp_path / "classes.txt").write_text("a rabbit\nbikes\na phone call\n")
    templates = tmp_path / "templates.txt"
    templates.write_text("{}\na video of {}.\n")
    out = tmp_path / "zs.json"
    assert evaluate_main(["zeroshot", "--checkpoint", str(demo_run), "--text-weights", "minilm", "--list", str(listing),
                          "--class-names", str(tmp_path / "classes.txt"), "--templates", str(templates),
                          "--out", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    saved = yaml.safe_load((demo_run / "config.yaml").read_text())["data"]
    model, tokenizer = load_stage2_model(str(demo_run), "minilm", saved["num_frames"], saved["img_size"])
    with torch.no_grad():
        prompts = [t.format(n) for n in ("a rabbit", "bikes", "a phone call") for t in ("{}", "a video of {}.")]
        ids, mask = tokenize_captions(tokenizer, prompts, 32)
        text = F.normalize(model.encode_text(ids, mask)[1].view(3, 2, -1).mean(1), dim=-1)
        videos = torch.stack([load_media(c, "video", saved["num_frames"], saved["img_size"], rng=None) for c in clips])
        frames = model.encode_vision_test(normalize_video(videos))[1]  # [V, T, E] unit vectors
        scores = torch.einsum("ce,vte->vct", text, frames).mean(-1)
    labels = torch.tensor([i % 3 for i in range(len(clips))])
    assert report["top1"] == pytest.approx(100.0 * (scores.argmax(1) == labels).float().mean().item())
    assert report["top5"] == 100.0 and report["videos"] == 4  # 3 classes: every label is in the top 5
    assert "zero-shot top-1" in capsys.readouterr().out


def test_evaluation_media_decoded_in_worker_processes_equal_those_decoded_here(tmp_path, capsys):
    from umt_fast.data.captions import write_demo_caption_lists
    from umt_fast.recipes.retrieval import load_entries

    video_list, image_list = write_demo_caption_lists(str(tmp_path / "lists"))
    entries = [{"media": m, "path": p} for m, lst in (("video", video_list), ("image", image_list))
               for p in (e.get(m) for e in json.load(open(lst)))]  # fmt: skip
    entries.insert(2, {"media": "video", "path": str(tmp_path / "gone.mp4")})
    here, workers = load_entries(entries, 2, 32), load_entries(entries, 2, 32, num_workers=2)
    assert [e["path"] for e in workers[0]] == [e["path"] for e in here[0]] == [e["path"] for e in entries if "gone" not in e["path"]]
    assert all(torch.equal(a, b) for a, b in zip(here[1], workers[1])) and len(here[1]) == len(entries) - 1
    assert workers[2] == here[2] and here[2][0][0].endswith("gone.mp4")
