"""`python -m umt_fast.finetune_qa`: the demo end to end (the loss falls, the evaluation's report and
counts, the exported model read back by `evaluate qa`), exact resume after a kill, the same losses
on 1 and 2 gloo ranks (DDP, FSDP2) with drop path on, the data of a global batch position at any
world size, the reference's answer weights, and config errors named before any work."""
import json
import os

import pytest
import torch

from tests.launch import kill_at_checkpoint, run_command
from tests.markers import needs_fsdp_on_cpu
from tests.tiny_text import tiny_text_weights
from umt_fast.config.qa import DEMO_QA, build_config
from umt_fast.engine.metrics import read_metrics
from umt_fast.finetune_qa import main
from umt_fast.recipes import finetune_qa as R

# The demo at 2 frames, shortened to 2 epochs = 4 steps (8 questions at batch 4), checkpoints at 2 and 4.
SHORT = ["--data.num_frames", "2", "--optim.epochs", "2", "--checkpoint.every_steps", "2"]
NUM_QUESTIONS = sum(len(qs) for qs in DEMO_QA.values())


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(run_dir / "metrics.jsonl")) if "loss" in r}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("qa") / "demo"
    assert main(["--run-dir", str(run_dir), "--eval.every_epochs", "1", "--eval.keep_best", "true"] + SHORT) == 0
    return run_dir


def test_the_demo_trains_its_loss_falls_and_it_answers_the_test_list(demo_run):
    losses = _losses(demo_run)
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses[4] < losses[1] - 1.0, losses
    assert (demo_run / "checkpoints" / "step_00000002").is_dir() and (demo_run / "checkpoints" / "step_00000004").is_dir()
    report = json.loads((demo_run / "qa_eval.json").read_text())
    answers = json.loads((demo_run / "demo_data" / "demo_answers.json").read_text())
    assert (report["step"], report["questions"], report["videos"], report["answers"]) == (4, NUM_QUESTIONS, 4, len(answers))
    assert (report["k"], report["num_frames"], report["img_size"]) == (4, 2, 64)
    preds = report["predictions"]
    assert len(preds) == NUM_QUESTIONS and all(p["prediction"] in answers for p in preds)
    correct = sum(p["prediction"] in ([p["answer"]] if isinstance(p["answer"], str) else p["answer"]) for p in preds)
    assert report["correct"] == correct and report["acc"] == pytest.approx(100.0 * correct / NUM_QUESTIONS)
    assert 0.0 <= report["acc"] <= 100.0 and report["unreadable"] == []
    evals = [r for r in read_metrics(str(demo_run / "metrics.jsonl")) if "eval/acc" in r]
    assert [r["step"] for r in evals] == [2, 4]  # eval.every_epochs 1: 2 steps per epoch
    assert (evals[-1]["eval/acc"], evals[-1]["eval/correct"]) == (report["acc"], correct)


def test_the_best_evaluation_and_its_model_are_kept(demo_run, tmp_path):
    """eval.keep_best: qa_eval_best.json is the first evaluation of the highest acc, and
    umt_qa_best.pth the weights it evaluated (`evaluate qa` on it answers as that report says)."""
    from umt_fast.evaluate import main as evaluate_main

    evals = [r for r in read_metrics(str(demo_run / "metrics.jsonl")) if "eval/acc" in r]
    accs = [r["eval/acc"] for r in evals]
    best = json.loads((demo_run / "qa_eval_best.json").read_text())
    assert best["acc"] == max(accs) and best["step"] == evals[accs.index(max(accs))]["step"]
    out = tmp_path / "qa.json"
    data = demo_run / "demo_data"
    assert evaluate_main(["qa", "--checkpoint", str(demo_run / R.BEST_EXPORT_NAME), "--text-weights", "minilm",
                          "--test-list", str(data / "demo_qa.json"), "--answer-list", str(data / "demo_answers.json"),
                          "--k", "4", "--out", str(out)]) == 0  # fmt: skip
    again = json.loads(out.read_text())
    assert [p["prediction"] for p in again["predictions"]] == [p["prediction"] for p in best["predictions"]]
    assert again["acc"] == best["acc"]


def test_the_exported_model_gives_the_same_answers_through_evaluate_qa(demo_run, tmp_path):
    from umt_fast.evaluate import main as evaluate_main

    out = tmp_path / "qa.json"
    data = demo_run / "demo_data"
    assert evaluate_main(["qa", "--checkpoint", str(demo_run / R.EXPORT_NAME), "--text-weights", "minilm",
                          "--test-list", str(data / "demo_qa.json"), "--answer-list", str(data / "demo_answers.json"),
                          "--k", "4", "--out", str(out)]) == 0  # fmt: skip
    theirs, ours = json.loads(out.read_text()), json.loads((demo_run / "qa_eval.json").read_text())
    assert (theirs["num_frames"], theirs["img_size"]) == (2, 64)  # read from the run's config.yaml
    assert [p["prediction"] for p in theirs["predictions"]] == [p["prediction"] for p in ours["predictions"]]
    assert theirs["acc"] == ours["acc"]


def test_resume_after_a_kill_continues_exactly(tmp_path):
    """With drop path on and the small text tower of tests/tiny_text.py."""
    args = SHORT + ["--text.weights", tiny_text_weights(), "--model.drop_path", "0.2", "--data.test_list", ""]
    straight_dir, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(["--run-dir", str(straight_dir)] + args) == 0
    kill_at_checkpoint("umt_fast.finetune_qa", killed, args, 2)
    assert main(["--run-dir", str(killed), "--resume", "auto"] + args) == 0
    straight, resumed = _losses(straight_dir), _losses(killed)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), (step, resumed, straight)


def test_a_qa_run_starts_from_the_exported_qa_model(demo_run, tmp_path):
    """model.init = <run_dir>/umt_qa.pth loads every weight (strict): the new run starts where the
    demo ended, well below the demo's first loss."""
    run_dir = tmp_path / "from_qa"
    assert main(["--run-dir", str(run_dir), "--init", str(demo_run / R.EXPORT_NAME), "--train.max_steps", "1",
                 "--data.test_list", ""] + SHORT) == 0  # fmt: skip
    assert _losses(run_dir)[1] < _losses(demo_run)[1] - 1.0
    assert "initialised the QA model (UMT_QA naming)" in (run_dir / "log.txt").read_text()


# ----------------------------------------------------------------------------------- any world size

# The small text tower of tests/tiny_text.py, at a learning rate that moves it within 3 steps.
DIST_ARGS = ["--text.weights", tiny_text_weights(), "--optim.lr", "1e-2", "--data.num_frames", "2",
             "--data.img_size", "32", "--train.global_batch_size", "4", "--train.batch_size", "0", "--model.drop_path", "0.2", "--text.dropout", "0", "--train.max_steps", "3",
             "--log.every_steps", "1", "--checkpoint.every_steps", "3", "--data.num_workers", "0"]  # fmt: skip


def _run(run_dir, nproc, *extra):
    records = run_command("umt_fast.finetune_qa", run_dir, nproc, DIST_ARGS + list(extra), port_base=33500)
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    evals = [r["eval/acc"] for r in records if "eval/acc" in r]
    return losses, evals


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("one") / "run", 1)


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=needs_fsdp_on_cpu)])
def test_two_ranks_give_the_one_rank_losses_at_the_same_global_batch(tmp_path, one_rank, strategy):
    (one, one_eval), (two, two_eval) = one_rank, _run(tmp_path / "run", 2, "--dist.strategy", strategy)
    assert sorted(one) == sorted(two) == [1, 2, 3]
    assert one[1] - one[3] > 0.5, one  # the updates matter
    for step in one:
        assert one[step] == pytest.approx(two[step], abs=1e-4), (step, one, two)
    assert len(one_eval) == len(two_eval) == 1 and one_eval == pytest.approx(two_eval)


def test_a_global_batch_position_holds_the_same_data_at_any_world_size(tmp_path):
    """Rank r's batch of step s at world size W is positions [r*b, (r+1)*b) of the one-rank batch of
    step s: the same questions, answers, weights, frames, crops and flips (the epoch boundary
    crossed at step 2), and a loader started at step s (a resume) continues exactly."""
    from umt_fast.models.text import load_tokenizer
    from umt_fast.recipes.qa import read_qa_json

    train, _ = R.write_demo_qa_lists(str(tmp_path))
    dataset = R.QADataset(R.qa_records(read_qa_json(train)), num_frames=2, img_size=32, seed=3)
    collate = R.QACollate(load_tokenizer("minilm"), max_q_len=25, max_a_len=5)
    steps = 3
    one = R.qa_loader(dataset, 4, collate)
    one = [next(one) for _ in range(steps)]
    ranks = [R.qa_loader(dataset, 2, collate, rank=r, world_size=2) for r in range(2)]
    two = [[next(loader) for loader in ranks] for _ in range(steps)]
    assert one[0]["positions"].tolist() == [0, 1, 2, 3] and one[2]["positions"].tolist() == [8, 9, 10, 11]
    assert {q for b in one[:2] for q in b["questions"]} == {q for qs in DEMO_QA.values() for q, _ in qs}  # one epoch
    for s in range(steps):
        for key in ("video", "positions", "question_ids", "question_mask", "answer_counts"):
            assert torch.equal(one[s][key], torch.cat([two[s][r][key] for r in range(2)])), (s, key)
        for key in ("answer_ids", "answer_mask", "answer_weights"):
            assert torch.equal(one[s][key], torch.cat([two[s][r][key] for r in range(2)])), (s, key)
        assert one[s]["answers"] == two[s][0]["answers"] + two[s][1]["answers"]
    resumed = next(R.qa_loader(dataset, 2, collate, 2, rank=1, world_size=2))
    assert torch.equal(resumed["video"], two[2][1]["video"]) and resumed["questions"] == two[2][1]["questions"]
    # another seed: another order or other crops
    other = next(R.qa_loader(R.QADataset(dataset.records, 2, 32, seed=4), 4, collate))
    assert not torch.equal(other["video"], one[0]["video"])


def test_answers_are_weighted_by_their_share_as_the_reference():
    assert R.answers_with_weights("yes") == (["yes"], [1.0])
    answers, weights = R.answers_with_weights(["bikes", "bicycles", "bikes", "bikes"])
    assert answers == ["bikes", "bicycles"] and weights == pytest.approx([0.75, 0.25])
    # the reference adds 1/n per occurrence (not count / n): the same floats
    assert weights[0] == 1 / 4 + 1 / 4 + 1 / 4
    record = R.qa_records([{"path": "v.mp4", "question": "q", "answer": ["a", "b", "a"]}])[0]
    assert record.answers == ("a", "b") and record.weights == pytest.approx((2 / 3, 1 / 3))


# ----------------------------------------------------------------------------------- configs


def test_the_published_presets_hold_the_references_values():
    cfg = build_config(["--preset", "qa_msrvtt_l16", "--text.weights", "bert-large", "--data.train_list", "t.json"])
    assert (cfg.model.size, cfg.model.drop_path, cfg.text.fusion_layers) == ("large", 0.4, 5)
    assert (cfg.data.num_frames, cfg.data.img_size, cfg.data.max_q_len, cfg.data.max_a_len) == (12, 224, 25, 5)
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.warmup_epochs) == (4e-5, 5, 1)
    assert cfg.optim.min_lr == pytest.approx(4e-5 * 0.01)  # min_lr_multi 0.01
    assert (cfg.optim.betas, cfg.optim.weight_decay, cfg.train.batch_size, cfg.eval.k) == ((0.9, 0.999), 0.02, 32, 128)
    assert (cfg.eval.every_epochs, cfg.eval.keep_best) == (1, True)  # evaluated every epoch, ckpt_best kept
    assert cfg.train.activation_checkpointing == "all"
    cfg = build_config(["--preset", "qa_msrvtt_b16", "--text.weights", "bert-base", "--data.train_list", "t.json"])
    assert (cfg.model.size, cfg.model.drop_path, cfg.text.fusion_layers, cfg.optim.lr, cfg.optim.epochs) == \
        ("base", 0.2, 3, 2e-5, 8)
    # exp/finetuning/qa_msvd/{b16,l16}_25m.py and qa_anet/{b16,l16}_25m.py: drop_path_rate, lr, scheduler.epochs
    for preset, values in {"qa_msvd_b16": ("base", 0.2, 3, 6e-5, 6), "qa_msvd_l16": ("large", 0.4, 5, 6e-5, 6),
                           "qa_anet_b16": ("base", 0.2, 3, 4e-5, 12), "qa_anet_l16": ("large", 0.3, 5, 4e-5, 10)}.items():
        cfg = build_config(["--preset", preset, "--text.weights", "bert", "--data.train_list", "t.json"])
        assert (cfg.model.size, cfg.model.drop_path, cfg.text.fusion_layers, cfg.optim.lr, cfg.optim.epochs) == values
        assert (cfg.data.num_frames, cfg.data.max_q_len, cfg.data.max_a_len, cfg.train.batch_size) == (12, 25, 5, 32)


def test_config_errors_name_the_field_before_any_work(tmp_path, capsys):
    with pytest.raises(ValueError, match="text.weights"):
        build_config(["--preset", "qa_msrvtt_b16"])
    with pytest.raises(ValueError, match="data.train_list"):
        build_config(["--preset", "qa_msrvtt_b16", "--text.weights", "bert-base"])
    with pytest.raises(ValueError, match="data.answer_list"):
        build_config(["--data.answer_list", ""])
    with pytest.raises(ValueError, match="data.max_a_len"):
        build_config(["--data.max_a_len", "2"])
    with pytest.raises(ValueError, match="train.micro_batch_size"):
        build_config(["--train.micro_batch_size", "2"])
    run_dir = tmp_path / "r"
    for argv, field in [(["--data.img_size", "50"], "data.img_size"),
                        (["--data.train_list", str(tmp_path / "none.json")], "data.train_list"),
                        (["--model.init", str(tmp_path / "none.pth")], "model.init"),
                        (["--train.global_batch_size", "4", "--train.batch_size", "3"], "train.batch_size")]:  # fmt: skip
        assert main(["--run-dir", str(run_dir)] + argv) == 2
        err = capsys.readouterr().err
        assert field in err and err.startswith("error: "), err
        assert not run_dir.exists() or os.listdir(run_dir) == ["log.txt"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"video": "a.mp4", "question": "q", "answer": "a"}, {"video": "b.mp4", "question": "q"}]))
    assert main(["--run-dir", str(run_dir), "--data.train_list", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: data.train_list: {bad}: entry 1: missing \"answer\"" in err, err
    assert not run_dir.exists()
    with pytest.raises(SystemExit):
        main(["--data.max_q_lens", "3"])
    assert "--data.max_q_len" in capsys.readouterr().err  # the close match


def test_the_vision_encoders_drop_path_follows_the_given_factors():
    """Factors of 1 are no drop path; a 0 drops that question's branch of that block and no other
    question's (the factors of a question depend only on its index in the global batch)."""
    cfg = build_config(["--data.num_frames", "2", "--data.img_size", "32", "--model.drop_path", "0.5"])
    model = R.build_model(cfg, load_text=False)
    video = torch.randn(3, 3, 2, 32, 32)
    depth = model.vision_encoder.arch.depth
    ones = torch.ones(depth, 3, 2)
    with torch.no_grad():
        plain = model.eval().encode_vision(video)
        model.train()
        kept = model.encode_vision(video, ones)
        scales = ones.clone()
        scales[depth - 1, 1] = 0.0  # question 1 drops both branches of the last block
        dropped = model.encode_vision(video, scales)
    torch.testing.assert_close(kept, plain, rtol=0, atol=1e-6)
    assert torch.equal(dropped[[0, 2]], kept[[0, 2]]) and not torch.allclose(dropped[1], kept[1])


def test_the_qa_step_has_no_host_sync(tmp_path):
    """The step, seen op by op (tests/host_sync.py): the answers per question vary (2 and 1 here),
    drop path on, the decoder's repeats with their output size known on the host."""
    from tests.host_sync import forbid_host_syncs
    from umt_fast.engine.optim import build_optimizer
    from umt_fast.models.text import load_tokenizer

    cfg = build_config(["--data.num_frames", "2", "--data.img_size", "32", "--model.drop_path", "0.2"])
    torch.manual_seed(0)
    model = R.build_model(cfg, load_text=False).train()
    optimizer = build_optimizer(model, 1e-4, 0.02, (0.9, 0.999), 1e-8)
    step = R.QAStep(model, optimizer, cfg, torch.device("cpu"), None)
    records = [R.QARecord("a.mp4", "what is it", ("cat", "dog"), (0.5, 0.5)), R.QARecord("b.mp4", "who", ("a man",), (1.0,))]
    video = torch.randint(0, 256, (2, 2, 32, 32, 3), dtype=torch.uint8)
    batch = R.QACollate(load_tokenizer("minilm"), 25, 5)(
        [{"video": v, "record": r, "position": i, "skipped": []} for i, (v, r) in enumerate(zip(video, records))])
    assert batch["answer_counts"].tolist() == [2, 1] and batch["answer_ids"].shape == (3, 5)
    step(batch, 0)
    with forbid_host_syncs():
        loss = step(batch, 1)
    assert loss.shape == (1,)


def test_other_commands_name_a_qa_run_for_what_it_is(demo_run, capsys):
    from umt_fast import export
    from umt_fast.engine.checkpoint import read_run_checkpoint

    with pytest.raises(ValueError, match="is a video-QA fine-tuning run: its model is the run's umt_qa.pth"):
        read_run_checkpoint(str(demo_run))
    assert export.main([str(demo_run), "--out", str(demo_run / "x.safetensors")]) == 2
    assert "video-QA fine-tuning run" in capsys.readouterr().err
