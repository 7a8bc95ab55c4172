"""Weighted dataset mixes (--data.mix): every source drawn in proportion to its weight (within a
binomial bound, and exactly per block), the same records on every rank and in every process for
the same (seed, position), each source cycling through all its records before repeating one,
label offsets and label maps, the config's errors, and a training run over a mix."""
import itertools
import math

import pytest

from umt_fast.config import build_config
from umt_fast.data.annotations import VideoRecord
from umt_fast.data.dataset import PositionSampler
from umt_fast.data.mix import BLOCK, MixSource, SourceMix, _relabel, read_label_map


def test_sources_are_drawn_in_proportion_to_their_weights():
    mix = SourceMix([5, 50, 7], [1.0, 2.5, 0.5], seed=3)
    n = 20 * BLOCK + 317  # not a whole number of blocks
    counts = [0, 0, 0]
    for p in range(n):
        counts[mix.source_of(p)] += 1
    for s, w in enumerate([1 / 4, 2.5 / 4, 0.5 / 4]):
        bound = 4 * math.sqrt(w * (1 - w) / n)  # a 4-sigma binomial bound; the schedule is far tighter
        assert abs(counts[s] / n - w) < bound, (s, counts)
    assert mix.counts == [256, 640, 128]  # per block: exactly the weights' shares of 1024


def test_the_mix_is_a_function_of_seed_and_position_alone():
    one, again = SourceMix([5, 50, 7], [1, 2, 1], seed=0), SourceMix([5, 50, 7], [1, 2, 1], seed=0)
    positions = range(3 * BLOCK)
    single = [one.record_index(p) for p in positions]
    assert single == [again.record_index(p) for p in reversed(positions)][::-1]  # any order, any process
    assert single != [SourceMix([5, 50, 7], [1, 2, 1], seed=1).record_index(p) for p in positions]
    # Two ranks read the positions of a global batch between them: together, the one rank's records.
    G = 8
    per_rank = [list(itertools.islice(PositionSampler(0, G, r, 2), 4 * G // 2)) for r in range(2)]
    merged = sorted(per_rank[0] + per_rank[1])
    assert merged == list(range(4 * G)) and [one.record_index(p) for p in merged] == single[: 4 * G]


def test_each_source_reads_all_its_records_before_repeating_one():
    mix = SourceMix([5, 50, 7], [1, 2, 1], seed=0)
    seen = {0: [], 1: [], 2: []}
    for p in range(2 * BLOCK):
        seen[mix.source_of(p)].append(mix.record_index(p))
    for s, (offset, size) in enumerate(zip(mix.offsets, mix.sizes)):
        first = seen[s][:size]
        assert sorted(first) == list(range(offset, offset + size)), s
    assert mix.record_index(10, attempt=1) != mix.record_index(10)  # a substitute comes from the same source
    s = mix.source_of(10)
    assert mix.offsets[s] <= mix.record_index(10, attempt=3) < mix.offsets[s] + mix.sizes[s]


def test_label_offsets_and_label_maps(tmp_path):
    records = [VideoRecord("a.mp4", 0, line=1), VideoRecord("b.mp4", 2, line=2)]
    assert [r.label for r in _relabel(records, MixSource("k600.csv", 1.0, label_offset=400))] == [400, 402]
    label_map = tmp_path / "k600_to_k710.txt"
    label_map.write_text("# k600 k710\n0 17\n2,5\n")
    assert read_label_map(str(label_map)) == {0: 17, 2: 5}
    assert [r.label for r in _relabel(records, MixSource("k600.csv", 1.0, label_map=str(label_map)))] == [17, 5]
    label_map.write_text("0 17\n")
    with pytest.raises(ValueError, match=r"k600.csv:2: label 2 is not in the label map"):
        _relabel(records, MixSource("k600.csv", 1.0, label_map=str(label_map)))
    label_map.write_text("0 17\nthree 4\n")
    with pytest.raises(ValueError, match=r"k600_to_k710.txt:2: 'three 4' is not 'source_label new_label'"):
        read_label_map(str(label_map))


@pytest.mark.parametrize("entry, message", [
    ("list=a.csv", r"data.mix\[0\]='list=a.csv' is not allowed: needs weight"),
    ("list=a.csv,weight=-1", r"data.mix\[0\].weight=-1.0 is not allowed"),
    ("list=a.csv,weight=1,label_offset=2,label_map=m.txt", "takes label_offset or label_map"),
    ("list=a.csv,weight=1,ratio=2", r"data.mix\[0\] key='ratio' is not allowed"),
])  # fmt: skip
def test_bad_mix_entries_are_refused_naming_the_entry(entry, message):
    with pytest.raises(ValueError, match=message):
        build_config(["--data.mix", entry])


def test_training_on_a_mix(tmp_path):
    from umt_fast.engine.metrics import read_metrics
    from umt_fast.pretrain import main

    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), "--train.max_steps", "2", "--log.every_steps", "1", "--data.img_size", "64",
            "--teacher.input_resolution", "64", "--data.mix", "list=sample_clips,weight=3",
            "list=sample_clips,weight=1,label_offset=10"]  # fmt: skip
    assert main(args) == 0
    assert "data.mix:" in (run_dir / "log.txt").read_text()
    assert [r["step"] for r in read_metrics(str(run_dir / "metrics.jsonl")) if "loss" in r] == [1, 2]
    from umt_fast.config import check_paths

    with pytest.raises(FileNotFoundError, match=r"data.mix\[0\].list='nope.csv': no such file"):
        check_paths(build_config(["--data.mix", "list=nope.csv,weight=1"]))


def _labelled_copies(tmp_path):
    """The sample clips as two labelled lists, K710-style: labels 0..3, and a K600-like copy whose
    label map sends its labels 0..3 to 4..7."""
    from umt_fast.data.sample_clips import sample_clip_paths

    clips = sample_clip_paths()
    first, second, label_map = tmp_path / "k400.csv", tmp_path / "k600.csv", tmp_path / "k600_to_k710.txt"
    first.write_text("".join(f"{c},{i}\n" for i, c in enumerate(clips)))
    second.write_text("".join(f"{c} {i}\n" for i, c in enumerate(clips)))
    label_map.write_text("".join(f"{i} {i + 4}\n" for i in range(4)))
    return str(first), str(second), str(label_map)


def test_finetuning_reads_a_mix_with_label_maps_in_proportion_to_the_weights(tmp_path):
    from umt_fast.config.finetune import build_config as finetune_config
    from umt_fast.data.labelled import FinetuneClipDataset
    from umt_fast.recipes.finetune import labelled_lists

    first, second, label_map = _labelled_copies(tmp_path)
    cfg = finetune_config(["--model.num_classes", "0", "--data.mix", f"list={first},weight=3",
                           f"list={second},weight=1,label_map={label_map}"])  # fmt: skip
    train, _, num_classes, mix = labelled_lists(cfg, None)
    assert num_classes == 8 and [r.label for r in train] == [0, 1, 2, 3, 4, 5, 6, 7]
    dataset = FinetuneClipDataset(train, 2, 32, seed=cfg.train.seed, mix=mix)
    labels = [train[dataset.record_index(p)].label for p in range(2 * BLOCK)]
    assert sum(label >= 4 for label in labels) == 2 * BLOCK // 4  # a quarter of every block: weight 1 of 4
    assert all((label >= 4) == (mix.source_of(p) == 1) for p, label in enumerate(labels))
    assert train[dataset.record_index(5, attempt=2)].label // 4 == train[dataset.record_index(5)].label // 4


def test_a_mix_label_out_of_range_names_its_list_and_line(tmp_path):
    from umt_fast.config.finetune import build_config as finetune_config
    from umt_fast.recipes.finetune import labelled_lists

    first, second, label_map = _labelled_copies(tmp_path)
    cfg = finetune_config(["--model.num_classes", "6", "--data.mix", f"list={first},weight=1",
                           f"list={second},weight=1,label_map={label_map}"])  # fmt: skip
    with pytest.raises(ValueError, match=r"k600.csv:3: label 6 \(after data.mix\[1\]'s label map\) is out of range"):
        labelled_lists(cfg, None)
    (tmp_path / "short_map.txt").write_text("0 4\n1 5\n")
    cfg = finetune_config(["--data.mix", f"list={second},weight=1,label_map={tmp_path / 'short_map.txt'}"])
    with pytest.raises(ValueError, match=r"k600.csv:3: label 2 is not in the label map"):
        labelled_lists(cfg, None)


def test_finetuning_on_a_mix_end_to_end(tmp_path):
    from umt_fast import finetune
    from umt_fast.engine.metrics import read_metrics

    first, second, label_map = _labelled_copies(tmp_path)
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), "--train.max_steps", "2", "--log.every_steps", "1", "--data.img_size", "32",
            "--data.num_frames", "2", "--model.num_classes", "0", "--data.val_list", "",
            "--data.mix", f"list={first},weight=1", f"list={second},weight=1,label_map={label_map}"]  # fmt: skip
    assert finetune.main(args) == 0
    assert "data.mix: " in (run_dir / "log.txt").read_text()
    assert [r["step"] for r in read_metrics(str(run_dir / "metrics.jsonl")) if "loss" in r] == [1, 2]
    assert finetune.main(args[:2] + ["--data.mix", f"list={tmp_path / 'nope.csv'},weight=1"]) == 2
