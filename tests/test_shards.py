"""Training from a shard set: `prepare shard`'s manifest reads as the list it was made from (the
same per-step losses on 1 and 2 ranks, and after a kill mid-epoch and `--resume auto`), from a
real S3-compatible server (moto's server mode on 127.0.0.1) as from local disk, and bad data at
shard scale (a missing shard, a truncated one, a stale index, a corrupt member, an unreachable
object) is named and counted, never fatal, except a manifest none of whose shards is there."""
import json
import os
import shutil
import socket

import pytest

from tests.launch import kill_at_checkpoint, run_command, run_module
from umt_fast import prepare
from umt_fast.data import read_annotation_list
from umt_fast.data.decoding import VideoDecodeError, probe_video
from umt_fast.data.sample_clips import sample_clip_paths
from umt_fast.engine.metrics import read_metrics

SMALL = ["--data.img_size", "64", "--teacher.input_resolution", "64", "--data.num_workers", "0",
         "--log.every_steps", "1", "--train.global_batch_size", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """The sample clips' list and its shards, one clip per shard."""
    root = tmp_path_factory.mktemp("shards")
    listing = root / "clips.csv"
    listing.write_text("".join(f"{c},{i}\n" for i, c in enumerate(sample_clip_paths())))
    assert prepare.main(["shard", str(listing), "--out", str(root / "set"), "--shard-size", "1"]) == 0
    return listing, root / "set" / "manifest.json"


def _losses(run_dir, nproc, train_list, *args, env=None):
    records = run_command("umt_fast.pretrain", run_dir, nproc, SMALL + ["--data.train_list", str(train_list), *args],
                          port_base=29800, env=env)  # fmt: skip
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def list_losses(shard_set, tmp_path_factory):
    return _losses(tmp_path_factory.mktemp("list") / "run", 1, shard_set[0], "--train.max_steps", "5")


def test_a_manifest_reads_as_its_list(shard_set):
    listing, manifest = shard_set
    records, original = read_annotation_list(str(manifest)), read_annotation_list(str(listing))
    assert [r.label for r in records] == [r.label for r in original] == [0, 1, 2, 3]
    for record, source in zip(records, original):
        shard, member = record.path.split("#")
        assert shard.endswith(".tar") and member.startswith(f"{source.label:09d}.")
        assert probe_video(record.path).data == open(source.path, "rb").read()  # one ranged read: the file's bytes


@pytest.mark.parametrize("nproc", [1, 2])
def test_shards_train_with_the_losses_of_their_list(shard_set, list_losses, tmp_path, nproc):
    losses = _losses(tmp_path / "run", nproc, shard_set[1], "--train.max_steps", "5")
    assert losses.keys() == list_losses.keys()
    for step, loss in list_losses.items():
        assert losses[step] == pytest.approx(loss, abs=1e-5 if nproc == 1 else 1e-4), step


def test_a_kill_mid_epoch_then_resume_auto_is_exact_on_shards(shard_set, list_losses, tmp_path):
    run_dir = tmp_path / "killed"  # 4 clips at batch 2: an epoch is 2 steps, and step 3 is inside the second
    args = SMALL + ["--data.train_list", str(shard_set[1]), "--train.max_steps", "5", "--checkpoint.every_steps", "3"]
    kill_at_checkpoint("umt_fast.pretrain", run_dir, args, 3)
    resumed = _losses(run_dir, 1, shard_set[1], "--train.max_steps", "5", "--resume", "auto")
    assert resumed.keys() == list_losses.keys()
    for step, loss in list_losses.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-5), step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch):
    """moto's S3 server on 127.0.0.1, credentials and endpoint in the environment as s3fs reads them."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield server, env
    server.stop()


def test_shards_on_an_s3_server_train_as_local_shards_do(shard_set, list_losses, tmp_path, s3_server):
    import s3fs

    _, env = s3_server
    fs = s3fs.S3FileSystem()
    fs.mkdir("clips")
    fs.put(str(shard_set[1].parent) + "/", "clips/k/", recursive=True)
    run_dir = tmp_path / "run"
    losses = _losses(run_dir, 1, "s3://clips/k/manifest.json", "--train.max_steps", "5", env=env)
    for step, loss in list_losses.items():
        assert losses[step] == pytest.approx(loss, abs=1e-5), step
    written = "".join(open(os.path.join(root, f), errors="replace").read() for root, _, files in os.walk(run_dir)
                      for f in files if not f.endswith((".pt", ".safetensors", ".bin")))  # fmt: skip
    assert "testing-secret" not in written and "testing-key-id" not in written  # no credentials in the run

    server, _ = s3_server
    server.stop()  # now the objects are unreachable: named, after the retries
    records = read_annotation_list(str(shard_set[1]))
    remote = records[0].path.replace(str(shard_set[1].parent), "s3://clips/k")
    with pytest.raises(VideoDecodeError, match=r"unreachable after 3 tries") as err:
        probe_video(remote)
    assert "s3://clips/k/shard-000000.tar#000000000.mp4" in str(err.value)


def test_bad_shards_are_named_and_counted_never_fatal(shard_set, tmp_path, caplog):
    broken = tmp_path / "set"
    shutil.copytree(shard_set[1].parent, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    names = [s["name"] for s in manifest["shards"]]
    (broken / names[0]).unlink()  # a missing shard
    tar = broken / names[1]
    tar.write_bytes(tar.read_bytes()[:4096])  # a truncated one
    index = broken / names[2].replace(".tar", ".idx.json")
    stale = json.loads(index.read_text())
    index.write_text(json.dumps({k: [v[0] + 512, v[1]] for k, v in stale.items()}))  # an index that no longer fits
    member = json.loads((broken / names[3].replace(".tar", ".idx.json")).read_text())
    offset, _ = next(v for k, v in member.items() if not k.endswith(".json"))
    data = bytearray((broken / names[3]).read_bytes())
    data[offset:offset + 4096] = b"\x00" * 4096  # a corrupt member
    (broken / names[3]).write_bytes(bytes(data))

    records = read_annotation_list(str(broken / "manifest.json"))
    assert "2 of 4 shards cannot be read" in caplog.text  # missing, stale; the others fail when read
    reasons = []
    for record in records:
        with pytest.raises(VideoDecodeError) as err:
            probe_video(record.path)
        reasons.append(str(err.value))
    assert "shard-000000.tar#000000000" in reasons[0] and "missing shard" in reasons[0]
    assert "shard-000001.tar#000000001" in reasons[1] and "truncated shard" in reasons[1]
    assert "shard-000002.tar#000000002" in reasons[2] and "stale shard index" in reasons[2]
    assert "shard-000003.tar#000000003.mp4" in reasons[3]  # FFmpeg's reason for the corrupt member

    # a run over it counts them as bad videos and stops with the examples named, not with a crash
    proc = run_module("umt_fast.pretrain", ["--run-dir", str(tmp_path / "run"), "--data.train_list",
                                            str(broken / "manifest.json"), "--train.max_steps", "2"] + SMALL)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "could not be decoded" in proc.stderr and "shard-00000" in proc.stderr

    for name in names[1:]:
        (broken / name).unlink()
    with pytest.raises(FileNotFoundError, match="none of its 4 shards is there"):
        read_annotation_list(str(broken / "manifest.json"))


def test_a_good_shard_set_with_one_bad_shard_trains(shard_set, tmp_path):
    broken = tmp_path / "set"
    shutil.copytree(shard_set[1].parent, broken)
    tar = broken / "shard-000002.tar"
    tar.write_bytes(tar.read_bytes()[:2048])
    run_dir = tmp_path / "run"
    losses = _losses(run_dir, 1, broken / "manifest.json", "--train.max_steps", "4")
    assert sorted(losses) == [1, 2, 3, 4]
    records = read_metrics(str(run_dir / "metrics.jsonl"))
    assert sum(r.get("data/skipped", 0) for r in records) >= 1
    assert "shard-000002.tar#000000002.mp4" in (run_dir / "log.txt").read_text()


def test_finetuning_and_evaluation_read_a_manifest_as_their_list(shard_set):
    from umt_fast.data.annotations import read_labelled_list
    from umt_fast.data.labelled import FinetuneClipDataset, multi_view_clip

    listing, manifest = shard_set
    sharded, plain = read_labelled_list(str(manifest), num_classes=4), read_labelled_list(str(listing), num_classes=4)
    a = FinetuneClipDataset(sharded, num_frames=4, img_size=32, seed=0)[3]
    b = FinetuneClipDataset(plain, num_frames=4, img_size=32, seed=0)[3]
    assert a["label"] == b["label"] and (a["video"] == b["video"]).all()
    assert (multi_view_clip(sharded[1].path, 4, 32, 2, 3) == multi_view_clip(plain[1].path, 4, 32, 2, 3)).all()


def test_stage2_trains_on_caption_shards_as_on_its_json_lists(tmp_path):
    """Video and image caption lists made into shard sets: the same pairs, captions and losses."""
    from tests.tiny_text import tiny_text_weights
    from umt_fast.data.captions import read_caption_json, write_demo_caption_lists
    from umt_fast.pretrain_vl import main as pretrain_vl

    video_list, image_list = write_demo_caption_lists(str(tmp_path / "lists"))
    manifests = []
    for name, listing in (("videos", video_list), ("images", image_list)):
        assert prepare.main(["shard", listing, "--out", str(tmp_path / name), "--shard-size", "300000",
                             "--num-workers", "1"]) == 0  # fmt: skip
        manifests.append(str(tmp_path / name / "manifest.json"))
        sharded, plain = read_caption_json(manifests[-1]), read_caption_json(listing)
        assert [(e["media"], e["captions"]) for e in sharded] == [(e["media"], e["captions"]) for e in plain]
    image = read_caption_json(manifests[1])[0]
    assert image["media"] == "image" and "#" in image["path"]
    losses = []
    for videos, images in ((video_list, image_list), tuple(manifests)):
        run_dir = tmp_path / f"run{len(losses)}"
        assert pretrain_vl(["--run-dir", str(run_dir), "--data.video_list", videos, "--data.image_list", images,
                            "--optim.epochs", "3", "--train.max_steps", "2",
                            "--text.weights", tiny_text_weights()]) == 0  # fmt: skip
        losses.append([(r["step"], r["loss"], r["vtc"], r["mlm"]) for r in read_metrics(str(run_dir / "metrics.jsonl"))
                       if "loss" in r])  # fmt: skip
    assert len(losses[0]) == 2 and losses[0] == losses[1]


def test_a_labelled_shard_set_is_not_a_caption_list(shard_set):
    from umt_fast.data.captions import read_caption_json

    with pytest.raises(ValueError, match="stage 2 needs one made from a JSON caption list"):
        read_caption_json(str(shard_set[1]))
