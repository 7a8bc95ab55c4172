"""The evaluation commands: each one's demo lists on the sample clips, and each on two gloo
ranks, where each rank scores its share of the list (3 and 2 of 5 entries, one of them
unreadable) and together they give the one-process report."""
import json
import sys

import pytest
import torch

from tests.launch import start_ranks
from tests.test_qa import ANSWER_LIST, _qa_entries, tiny_bert, tiny_qa_file  # noqa: F401 (fixtures)
from tests.test_retrieval_mc import _clip_entries, tiny_stage2  # noqa: F401 (fixture)

NUM_FRAMES, IMG_SIZE = 2, 32
SIZE = ["--num-frames", str(NUM_FRAMES), "--img-size", str(IMG_SIZE)]

def _evaluate_each(commands_file: str) -> None:
    """One rank's body: every ``umt_fast.evaluate`` command line of the file, in turn."""
    from umt_fast.evaluate import main

    sys.exit(max(main(argv) for argv in json.load(open(commands_file))))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from umt_fast.models.classifier import VideoViT, VideoViTArch

    torch.manual_seed(0)
    model = VideoViT(VideoViTArch(width=128, depth=2, heads=2, num_frames=NUM_FRAMES, img_size=IMG_SIZE, num_classes=4))
    path = tmp_path_factory.mktemp("classifier") / "classifier.pth"
    torch.save(model.state_dict(), path)
    return path


def _commands(folder, stage2, qa_file, bert, classifier_file) -> list[list[str]]:
    """The five evaluations, each on a list of the 4 sample clips with a missing video third."""
    clips, mc = _clip_entries()
    missing = str(folder / "missing.mp4")
    (folder / "mc.json").write_text(json.dumps(mc[:2] + [{"video": missing, "caption": ["x", "y"], "answer": 1}] + mc[2:]))
    captions = ["a rabbit in the grass", "bikes on a road", "a man on the phone", "a red car"]
    retrieval = [{"video": c, "caption": [t, t + " today"]} for c, t in zip(clips, captions)]
    (folder / "ret.json").write_text(json.dumps(retrieval[:2] + [{"video": missing, "caption": "x"}] + retrieval[2:]))
    labelled = [f"{c},{i % 3}" for i, c in enumerate(clips)]
    (folder / "labels.csv").write_text("\n".join(labelled[:2] + [f"{missing},1"] + labelled[2:]) + "\n")
    (folder / "classes.txt").write_text("a rabbit\nbikes\na phone call\n")
    _, qa = _qa_entries()
    (folder / "qa.json").write_text(json.dumps(qa[:2] + [{"video": missing, "question": "what", "answer": "dog"}] + qa[2:]))
    (folder / "answers.json").write_text(json.dumps(ANSWER_LIST))
    stage2_args = ["--checkpoint", str(stage2), "--text-weights", "minilm", "--num-workers", "0", *SIZE]
    return [
        ["retrieval", *stage2_args, "--test-list", str(folder / "ret.json"), "--k", "3", "--batch-size", "2"],
        ["mc", *stage2_args, "--test-list", str(folder / "mc.json"), "--batch-size", "2"],
        ["zeroshot", *stage2_args, "--list", str(folder / "labels.csv"), "--class-names", str(folder / "classes.txt")],
        ["qa", "--checkpoint", str(qa_file), "--text-weights", bert, "--num-workers", "0", *SIZE, "--test-list",
         str(folder / "qa.json"), "--answer-list", str(folder / "answers.json"), "--k", "4", "--batch-size", "2"],
        ["--checkpoint", str(classifier_file), "--list", str(folder / "labels.csv"), "--num-workers", "0", *SIZE,
         "--patch-size", "16", "--num-clips", "2", "--num-crops", "1", "--batch-size", "2"],
    ]  # fmt: skip


def _same(one, two, where="report"):
    """Equal, floats within 1e-5 (the ranks batch their shares differently)."""
    if isinstance(one, dict):
        assert one.keys() == two.keys(), where
        for k in one:
            _same(one[k], two[k], f"{where}.{k}")
    elif isinstance(one, list):
        assert len(one) == len(two), where
        for i, (a, b) in enumerate(zip(one, two)):
            _same(a, b, f"{where}[{i}]")
    elif isinstance(one, float):
        assert one == pytest.approx(two, rel=1e-5, abs=1e-6), where
    else:
        assert one == two, where


def test_two_ranks_give_the_one_rank_reports(tmp_path, tiny_stage2, tiny_qa_file, tiny_bert, classifier, capsys):  # noqa: F811
    from umt_fast.evaluate import main as evaluate_main

    commands = _commands(tmp_path, tiny_stage2, tiny_qa_file, tiny_bert, classifier)
    names = ["retrieval", "mc", "zeroshot", "qa", "classifier"]
    for name, argv in zip(names, commands):
        assert evaluate_main(argv + ["--out", str(tmp_path / f"one_{name}.json")]) == 0, name
    capsys.readouterr()
    (tmp_path / "commands.json").write_text(json.dumps(
        [argv + ["--out", str(tmp_path / f"two_{name}.json")] for name, argv in zip(names, commands)]))
    ranks = start_ranks(_evaluate_each, (str(tmp_path / "commands.json"),), nproc=2, env={"OMP_NUM_THREADS": "1"})
    ranks.check()
    (out, err), (other_out, _) = ranks.output(0), ranks.output(1)
    assert out.count("wrote ") == len(names) and "wrote " not in other_out  # the main rank reports, once per command
    assert "evaluating on 2 ranks" in err
    for name in names:
        one = json.loads((tmp_path / f"one_{name}.json").read_text())
        two = json.loads((tmp_path / f"two_{name}.json").read_text())
        assert [u["path"] for u in one["unreadable"]] == [str(tmp_path / "missing.mp4")], name
        _same(one, two, name)
    qa = json.loads((tmp_path / "one_qa.json").read_text())
    assert qa["questions"] == 5 and len(qa["predictions"]) == 5
    assert json.loads((tmp_path / "one_retrieval.json").read_text())["vtm"]["t2v_r10"] == 100.0  # 4 videos


def test_each_command_runs_on_its_demo_lists(tmp_path, tiny_stage2, tiny_qa_file, tiny_bert, classifier, capsys):  # noqa: F811
    """'demo' (and fine-tuning's 'sample_clips') stand for lists of the 4 sample clips: every clip
    is read, each command's own demo content is there, and the report names the demo."""
    from umt_fast.data.captions import DEMO_VIDEO_CAPTIONS
    from umt_fast.evaluate import main as evaluate_main

    stage2 = ["--checkpoint", str(tiny_stage2), "--text-weights", "minilm", "--num-workers", "0", *SIZE]
    runs = {
        "retrieval": [*stage2, "--test-list", "demo", "--k", "2"],
        "mc": [*stage2, "--test-list", "demo"],
        "zeroshot": [*stage2, "--list", "sample_clips", "--class-names", "demo"],
        "qa": ["--checkpoint", str(tiny_qa_file), "--text-weights", tiny_bert, "--num-workers", "0", *SIZE,
               "--test-list", "demo", "--answer-list", "demo", "--k", "2"],
        "classifier": ["--checkpoint", str(classifier), "--list", "sample_clips", "--num-workers", "0", *SIZE,
                       "--patch-size", "16", "--num-clips", "1", "--num-crops", "1"],
    }  # fmt: skip
    reports = {}
    for name, argv in runs.items():
        out = tmp_path / f"{name}.json"
        assert evaluate_main(([] if name == "classifier" else [name]) + argv + ["--out", str(out)]) == 0, name
        reports[name] = json.loads(out.read_text())
        assert reports[name]["unreadable"] == [], name
    captured = capsys.readouterr()
    captions = [c for caps in DEMO_VIDEO_CAPTIONS.values() for c in caps]
    assert reports["retrieval"]["test_list"] == "demo" and reports["retrieval"]["vtm"]["t2v_r10"] == 100.0
    mc = reports["mc"]
    assert mc["videos"] == 4 and mc["candidates"] == 16 and [p["answer"] for p in mc["predictions"]] == [0, 1, 2, 3]
    assert reports["zeroshot"]["videos"] == 4 and reports["zeroshot"]["top5"] == 100.0  # 4 classes
    qa = reports["qa"]
    assert qa["videos"] == 4 and qa["questions"] >= 4 and all(p["prediction"] for p in qa["predictions"])
    assert reports["classifier"]["list"] == "sample_clips" and reports["classifier"]["num_videos"] == 4
    assert "zero-shot top-1" in captured.out and len(captions) > 4
