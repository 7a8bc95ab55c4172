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
