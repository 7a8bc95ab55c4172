"""Retrieval fine-tuning (`python -m umt_fast.finetune_retrieval`, stage 2's engine with the ret_*
presets): paragraphs and match ids as the reference builds them, the presets' values against the
reference's configs, per-frame VTC, the demo end to end (loss falls, the end-of-training
retrieval evaluation written), a stage-2 init, exact resume, and the same losses on 1 and 2 ranks."""
import json
import re

import pytest
import torch
import torch.nn.functional as F

from tests.launch import run_command
from tests.markers import needs_fsdp_on_cpu
from tests.tiny_text import tiny_text_weights
from umt_fast.config.vl import build_config, build_retrieval_config, get_preset
from umt_fast.data.captions import CaptionRecord, clean_caption, join_paragraphs
from umt_fast.engine.metrics import read_metrics
from umt_fast.finetune_retrieval import main

# ----------------------------------------------------------------------------------- paragraphs


def _reference_paragraph(captions: list[str]) -> str:
    """The reference's paragraph caption, restated: dataset/caption_dataset.py
    ``preprocess_para_retrieval_data`` joins ``" ".join(d.pop("caption"))``, then the text goes
    through dataset/utils.py ``pre_text`` (max_l None: no word cut) when it is read."""
    text = " ".join(captions)
    text = re.sub(r"([,.'!?\"()*#:;~])", "", text.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = re.sub(r"\s{2,}", " ", text)
    return text.rstrip("\n").strip(" ")


ENTRIES = [
    {"media": "video", "path": "/d/a.mp4", "captions": ["A man walks in.", "He sits down ", " then - waves!"]},
    {"media": "video", "path": "/d/b.mp4", "captions": ["<person> opens a door", "", "the room/hall is dark;"]},
    {"media": "video", "path": "/d/c.mp4", "captions": ["One caption only"]},
    {"media": "video", "path": "/d/d.mp4", "captions": []},
]


def test_paragraphs_join_every_caption_as_the_reference_does():
    joined = join_paragraphs(ENTRIES)
    assert [e["path"] for e in joined] == [e["path"] for e in ENTRIES]
    assert ENTRIES[0]["captions"] == ["A man walks in.", "He sits down ", " then - waves!"]  # input left as it was
    for entry, out in zip(ENTRIES[:3], joined[:3]):
        assert len(out["captions"]) == 1
        assert clean_caption(out["captions"][0]) == _reference_paragraph(entry["captions"])
    assert joined[3]["captions"] == []
    assert clean_caption(joined[0]["captions"][0]) == "a man walks in he sits down then waves"
    # joined first, cleaned after: cleaning each caption and then joining would keep a double space
    assert " ".join(clean_caption(c) for c in ENTRIES[1]["captions"]) == "person opens a door  the room hall is dark"
    assert clean_caption(joined[1]["captions"][0]) == "person opens a door the room hall is dark"


def test_a_paragraph_is_cut_only_by_the_token_limit():
    from umt_fast.models.text import load_tokenizer, tokenize_captions

    captions = [f"sentence number {i} describes one more moment of the video" for i in range(30)]
    paragraph = join_paragraphs([{"media": "video", "path": "v.mp4", "captions": captions}])[0]["captions"][0]
    assert paragraph.split() == " ".join(captions).split()  # nothing dropped before tokenizing
    tokenizer = load_tokenizer("minilm")
    ids, mask = tokenize_captions(tokenizer, [paragraph], 64)
    pieces = tokenizer(_reference_paragraph(captions), add_special_tokens=False)["input_ids"]
    assert len(pieces) > 63
    assert ids[0].tolist() == [tokenizer.cls_token_id, *pieces[:63]] and int(mask.sum()) == 64


def test_match_ids_by_file_name_as_the_reference_keys_them():
    """The reference's retrieval training set keys its match ids by basename(video), so captions of
    one video in several entries are positives of each other."""
    from umt_fast.recipes.pretrain_vl import ids_by_file_name

    records = [CaptionRecord(p, c, i, "video") for i, (p, c) in enumerate(
        [("/x/v1.mp4", "a"), ("/x/v2.mp4", "b"), ("/x/v1.mp4", "c"), ("/y/v3.mp4", "d"), ("/z/v2.mp4", "e")])]
    assert [r.media_id for r in ids_by_file_name(records)] == [0, 1, 0, 2, 1]
    assert [r.caption for r in ids_by_file_name(records)] == ["a", "b", "c", "d", "e"]


# ----------------------------------------------------------------------------------- presets

# The reference's values, restated from multi_modality/exp/finetuning/<dir>/<size>_25m.py of
# OpenGVLab/unmasked_teacher: (num_frames, image_res, batch_size per GPU, max_txt_l, lr, epochs,
# warmup_epochs, drop_path_rate, embed_dim, is_paragraph_retrieval). All of them: criterion
# loss_weight vtc 1, vtm 1, uta 0, mlm 0; clip_teacher none; mask ratios 0; keep_temporal True;
# AdamW betas (0.9, 0.999), weight decay 0.02, no clipping; cosine with min_lr_multi 0.01; k_test 128;
# use_checkpoint on every block; text encoder bert (3 fusion layers) / bert_large (5).
REFERENCE = {
    "ret_msrvtt_9k_b16": ("ret_msrvtt/b16_25m.py", 12, 224, 32, 32, 1e-5, 10, 1, 0.2, 512, False),
    "ret_msrvtt_9k_l16": ("ret_msrvtt/l16_25m.py", 12, 224, 32, 32, 2e-5, 7, 1, 0.3, 768, False),
    "ret_didemo_b16": ("ret_didemo/b16_25m.py", 12, 224, 32, 64, 2e-5, 12, 1, 0.1, 512, True),
    "ret_didemo_l16": ("ret_didemo/l16_25m.py", 12, 224, 32, 64, 4e-5, 5, 1, 0.2, 768, True),
    "ret_anet_b16": ("ret_anet/b16_25m.py", 12, 224, 32, 150, 4e-5, 20, 1, 0.1, 512, True),
    "ret_anet_l16": ("ret_anet/l16_25m.py", 12, 224, 32, 150, 4e-5, 20, 1, 0.2, 768, True),
    "ret_msvd_b16": ("ret_msvd/b16_25m.py", 12, 224, 32, 64, 1e-5, 5, 0, 0.2, 512, False),
    "ret_msvd_l16": ("ret_msvd/l16_25m.py", 12, 224, 32, 64, 1e-5, 3, 0, 0.3, 768, False),
    "ret_lsmdc_b16": ("ret_lsmdc/b16_25m.py", 12, 224, 32, 96, 2e-5, 10, 1, 0.2, 512, False),
    "ret_lsmdc_l16": ("ret_lsmdc/l16_25m.py", 12, 224, 32, 96, 2e-5, 8, 1, 0.2, 768, False),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_each_preset_holds_its_reference_config(name):
    source, frames, res, batch, max_len, lr, epochs, warmup, drop_path, embed_dim, paragraph = REFERENCE[name]
    cfg = get_preset(name)
    large = name.endswith("_l16")
    assert (cfg.data.num_frames, cfg.data.img_size, cfg.train.batch_size, cfg.text.max_len) == (frames, res, batch, max_len), source
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.student.drop_path) == (lr, epochs, warmup, drop_path), source
    assert (cfg.model.embed_dim, cfg.data.paragraph) == (embed_dim, paragraph), source
    assert cfg.optim.min_lr == pytest.approx(lr * 0.01) and cfg.optim.warmup_lr == 0.0
    assert (cfg.optim.betas, cfg.optim.weight_decay) == ((0.9, 0.999), 0.02)
    assert (cfg.teacher.loss_weight, cfg.text.mlm_weight, cfg.mask.video_ratio, cfg.mask.image_ratio) == (0, 0, 0, 0)
    assert cfg.model.keep_temporal and cfg.data.video_ids == "file_name"
    assert (cfg.eval.k, cfg.train.vtm_group_size, cfg.train.activation_checkpointing) == (128, 32, "all")
    assert (cfg.eval.every_epochs, cfg.eval.keep_best) == (1, True)  # evaluated every epoch, ckpt_best kept
    assert cfg.data.max_seconds == (30.0 if "didemo" in name else 0.0)  # the reference's trimmed30
    assert (cfg.student.size, cfg.text.fusion_layers) == (("large", 5) if large else ("base", 3))
    assert cfg.teacher.output_dim() == embed_dim  # the stage-2 heads: CLIP-B/16 512, CLIP-L/14 768
    # a stage-2 file, a BERT folder and the lists are all it needs (no teacher weights)
    built = build_retrieval_config(["--preset", name, "--init", "s2.pth", "--text.weights", "bert",
                                    "--data.video_list", "train.json", "--data.test_list", "test.json"])  # fmt: skip
    assert built.preset == name and build_config(["--preset", name, "--text.weights", "bert",
                                                  "--data.video_list", "t.json"]).preset == name  # fmt: skip


def test_the_objective_switches_are_checked():
    with pytest.raises(ValueError, match="mask.video_ratio"):
        build_retrieval_config(["--mask.video_ratio", "0.5"])  # no teacher to choose the tokens
    for field, value in (("teacher.loss_weight", "-1"), ("text.mlm_weight", "-0.5"), ("mask.image_ratio", "1.0"),
                         ("eval.k", "0"), ("data.video_ids", "path")):
        with pytest.raises((ValueError, SystemExit)):
            build_retrieval_config([f"--{field}", value])
    with pytest.raises(ValueError, match="teacher.arch"):
        build_retrieval_config(["--teacher.arch", "timm:vit_small_patch14_dinov2"])
    with pytest.raises(ValueError, match="preset"):
        build_retrieval_config(["--preset", "demo_vl"])  # the command's presets are the retrieval ones
    assert build_retrieval_config([]).preset == "ret_demo"


# ----------------------------------------------------------------------------------- trimmed videos


def test_test_frames_are_the_middle_frames_the_reference_picks():
    """Stage 2, retrieval and QA read a test video's frames as the reference's vision-language code
    does: (b[i] + b[i+1] - 1) // 2 of each segment, a short video's last frame repeated."""
    from tests import umt_reference as ref
    from umt_fast.data.transforms import segment_middle_indices

    assert segment_middle_indices(8, 4) == [0, 2, 4, 6]  # segments of 2: their first frame
    assert segment_middle_indices(25, 4) == [2, 8, 14, 21]
    assert segment_middle_indices(3, 5) == [0, 1, 2, 2, 2]
    for n in range(1, 80):
        for t in (1, 2, 3, 4, 8, 12):
            assert segment_middle_indices(n, t) == ref.reference_test_frame_indices(n, 30.0, t), (n, t)


def test_training_frames_are_the_random_frames_the_reference_draws():
    """Stage 2, retrieval and QA training draw a video's frames as the reference's
    vision-language code does: a random frame of [b[i], b[i+1] - 1) per segment (never its last
    frame), the same draw from the same generator state; where a segment is one frame, distinct
    random frames, sorted; a short video's last frame repeated."""
    import itertools
    import random

    import numpy as np

    from tests import umt_reference as ref
    from umt_fast.data.transforms import segment_random_indices

    rng = random.Random(0)
    assert all(segment_random_indices(8, 4, rng) == [0, 2, 4, 6] for _ in range(20))  # segments of 2: the first
    drawn = [segment_random_indices(25, 4, rng) for _ in range(400)]  # segments [0, 6) [6, 12) [12, 18) [18, 25)
    assert [sorted({d[i] for d in drawn}) for i in range(4)] == [
        list(range(0, 5)), list(range(6, 11)), list(range(12, 17)), list(range(18, 24))]
    for n, t in itertools.product(range(1, 60), (1, 2, 3, 4, 8, 12)):
        bounds = np.linspace(0, n, min(n, t) + 1).astype(int)
        for seed in range(3):
            ours = segment_random_indices(n, t, random.Random(seed))
            if np.diff(bounds).min() >= 2:  # the reference's own draws, from the same state
                assert ours == ref.reference_train_frame_indices(n, t, random.Random(seed), None), (n, t, seed)
            else:  # its fallback: distinct frames, sorted, then the last repeated
                count = min(n, t)
                assert ours[:count] == sorted(set(ours[:count])) and len(set(ours)) == count, (n, t, ours)
                assert ours[count:] == ours[count - 1:count] * (t - count) and 0 <= min(ours) and max(ours) < n
    # where the reference falls back, every set of frames it can give, and only those, is drawn
    for n, t in ((5, 4), (6, 4), (3, 5)):
        ours = {tuple(segment_random_indices(n, t, random.Random(s))) for s in range(300)}
        theirs = {tuple(ref.reference_train_frame_indices(n, t, random.Random(s), np.random.RandomState(s)))
                  for s in range(300)}  # fmt: skip
        assert ours == theirs, (n, t)
    with pytest.raises(ValueError, match="num_video_frames"):
        segment_random_indices(0, 4, rng)


def test_video_and_image_resizes_are_the_reference_bicubic_ones(tmp_path):
    """Stage 2, retrieval and QA resize as the reference's transforms did on uint8 tensors
    (torchvision 0.13): bicubic without antialiasing, at test (the whole frame) and in training
    (the random crop, then the flip); an image as a one-frame video."""
    import random

    import skimage.data
    from PIL import Image

    from tests import umt_reference as ref
    from umt_fast.data import sample_clip_paths
    from umt_fast.data.captions import RRC_RATIO, RRC_SCALE, load_media
    from umt_fast.data.decoding import count_frames, decode_frames
    from umt_fast.data.transforms import random_resized_crop_box, segment_middle_indices, segment_random_indices

    clip = sample_clip_paths()[1]  # bikes, 640x272
    frames = decode_frames(clip, segment_middle_indices(count_frames(clip), 3)).permute(0, 3, 1, 2)
    assert torch.equal(load_media(clip, "video", 3, 48, None), ref.reference_vl_resize(frames, 48).permute(0, 2, 3, 1))
    for seed in range(4):
        rng = random.Random(seed)  # the draws load_media makes, in its order: frames, crop, flip
        indices = segment_random_indices(count_frames(clip), 3, rng)
        box = random_resized_crop_box(640, 272, rng, scale=RRC_SCALE, ratio=RRC_RATIO)
        flip = rng.random() < 0.5
        crop = ref.reference_vl_resize(decode_frames(clip, indices).permute(0, 3, 1, 2), 48, box)
        want = (crop.flip(-1) if flip else crop).permute(0, 2, 3, 1)
        assert torch.equal(load_media(clip, "video", 3, 48, random.Random(seed)), want), seed
    photo = skimage.data.astronaut()  # 512x512 RGB
    Image.fromarray(photo).save(tmp_path / "photo.png")
    want = ref.reference_vl_resize(torch.from_numpy(photo).permute(2, 0, 1)[None], 40).permute(0, 2, 3, 1)
    assert torch.equal(load_media(str(tmp_path / "photo.png"), "image", 4, 40, None), want)


@pytest.mark.parametrize("seconds", [1.0, 2.5, 1000.0])
def test_max_seconds_reads_the_frames_the_reference_trimmed30_reads(seconds):
    """data.max_seconds (DiDeMo's 30 in the presets) at test time: the middle frames of equal
    segments of the video's first int(seconds x fps) frames, as the reference's trimmed30 takes
    them (a video no longer than that: the whole video)."""
    import av

    from tests import umt_reference as ref
    from umt_fast.data import sample_clip_paths
    from umt_fast.data.captions import load_media
    from umt_fast.data.decoding import count_frames, decode_frames

    for clip in sample_clip_paths()[:2]:
        with av.open(clip) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate)
            vlen = sum(1 for _ in container.decode(stream))
        want = ref.reference_test_frame_indices(vlen, fps, 4, trimmed30=True, seconds=seconds)
        assert count_frames(clip, seconds) == (vlen if vlen / fps <= seconds else int(seconds * fps))
        frames = decode_frames(clip, want)
        expected = ref.reference_vl_resize(frames.permute(0, 3, 1, 2), 32).permute(0, 2, 3, 1)
        assert torch.equal(load_media(clip, "video", 4, 32, None, max_seconds=seconds), expected), (clip, seconds)
        if seconds < vlen / fps:
            assert max(want) < seconds * fps and load_media(clip, "video", 4, 32, None).ne(expected).any()


# ----------------------------------------------------------------------------------- per-frame VTC


def test_per_frame_similarity_is_retrievals_mean_over_frames():
    from umt_fast.losses.vl import hard_negatives, similarity, vtc_loss
    from umt_fast.recipes.retrieval import vtc_similarity

    g = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(6, 3, 8, generator=g, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    expected = torch.stack([torch.stack([(v[i] @ t[j]).mean() for j in range(6)]) for i in range(6)])
    assert torch.allclose(similarity(v, t), expected)
    assert torch.allclose(similarity(v, t).t().float(), vtc_similarity(t, v), atol=1e-6)  # what the evaluation ranks by
    ids = torch.tensor([0, 0, 1, 2, 3, 4])
    temp = torch.tensor(0.1, dtype=torch.float64)
    logits = expected / 0.1
    target = (ids[:, None] == ids[None]).double()
    target = target / target.sum(1, keepdim=True)
    by_hand = (-(logits.log_softmax(1) * target).sum(1).mean() - (logits.t().log_softmax(1) * target).sum(1).mean()) / 2
    assert torch.allclose(vtc_loss(v, t, ids, temp), by_hand)
    # the hard negatives of per-frame features are those of their similarity (huge: the argmax)
    noise = torch.full((2, 6, 6), 0.5, dtype=torch.float64)
    neg_text, _, neg_video, _ = hard_negatives(v, t, ids, torch.tensor(1e-3), noise)
    masked = expected.masked_fill(ids[:, None] == ids[None], float("-inf"))
    assert neg_text.tolist() == masked.argmax(1).tolist() and neg_video.tolist() == masked.argmax(0).tolist()


def test_retrieval_step_has_no_host_sync_and_trains_only_its_terms():
    from tests.host_sync import forbid_host_syncs
    from umt_fast.engine.optim import build_optimizer
    from umt_fast.models.text import load_tokenizer, tokenize_captions
    from umt_fast.recipes.pretrain_vl import VLStep, build_model

    cfg = get_preset("ret_demo")
    cfg.student.drop_path = 0.1
    torch.manual_seed(0)
    model = build_model(cfg, cfg.teacher.output_dim())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("student.clip_decoder.", "text_encoder.cls.predictions.")) for n in frozen)
    assert model.text_encoder.bert.embeddings.word_embeddings.weight.requires_grad  # the tied decoder weight
    optimizer = build_optimizer(model, 1e-4, 0.02, (0.9, 0.999), 1e-8)
    tokenizer = load_tokenizer(cfg.text.weights)
    step = VLStep(model, None, optimizer, tokenizer, cfg, torch.device("cpu"), None)
    ids, mask = tokenize_captions(tokenizer, ["a dog runs", "two cats sleep", "a car", "rain"], cfg.text.max_len)
    media = torch.randint(0, 256, (4, 2, 64, 64, 3), dtype=torch.uint8)
    batch = {"media": media, "text_ids": ids, "text_mask": mask, "ids": torch.tensor([0, 0, 1, 2])}
    step("video", batch, 0)
    with forbid_host_syncs():
        losses = step("video", batch, 1)
    assert losses.shape == (5,) and losses[1] == 0 and losses[4] == 0  # UTA and MLM off
    assert losses[0] == pytest.approx(float(losses[2] + losses[3]))
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)


# ----------------------------------------------------------------------------------- end to end

SHORT = ["--optim.epochs", "12", "--checkpoint.every_steps", "3"]  # 12 steps of the demo's schedule


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ret") / "demo"
    assert main(["--run-dir", str(run_dir), "--optim.epochs", "40", "--checkpoint.every_steps", "20"]) == 0
    return run_dir


def _losses(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(str(run_dir / "metrics.jsonl")) if "loss" in r}


def test_demo_fine_tunes_and_writes_its_retrieval_evaluation(demo_run):
    records = _losses(demo_run)
    assert sorted(records) == list(range(1, 41))
    loss = [records[s]["loss"] for s in range(1, 41)]
    assert sum(loss[-8:]) / 8 < sum(loss[:8]) / 8 - 0.3, loss
    assert all(records[s]["uta"] == 0 and records[s]["mlm"] == 0 for s in records)
    assert all(r["video_steps"] == 1 and r["image_steps"] == 0 for r in records.values())
    report = json.loads((demo_run / "retrieval.json").read_text())
    assert (report["step"], report["videos"], report["num_frames"], report["img_size"]) == (40, 4, 2, 64)
    for scores in ("vtc", "vtm"):
        for d in ("t2v", "v2t"):
            r1, r5, r10 = (report[scores][f"{d}_r{k}"] for k in (1, 5, 10))
            assert 0 <= r1 <= r5 <= r10 == 100.0  # 4 videos: all in the top 10
    evals = [r for r in read_metrics(str(demo_run / "metrics.jsonl")) if "eval/vtm_t2v_r1" in r]
    assert [r["step"] for r in evals] == [40] and evals[0]["eval/vtm_t2v_r1"] == report["vtm"]["t2v_r1"]
    assert (demo_run / "umt_stage2.pth").is_file()


def test_starts_from_a_stage2_file_and_evaluates_every_n_steps(demo_run, tmp_path):
    """--init the demo's exported stage-2 file: the first step (before its update) already has the
    trained model's loss; eval.every_steps adds evaluations on the way."""
    run_dir = tmp_path / "from_stage2"
    assert main(["--run-dir", str(run_dir), "--init", str(demo_run / "umt_stage2.pth"), "--train.max_steps", "2",
                 "--eval.every_steps", "1"] + SHORT) == 0  # fmt: skip
    fresh, trained = _losses(demo_run)[1]["loss"], _losses(run_dir)[1]["loss"]
    assert trained < fresh - 0.3, (trained, fresh)
    evals = [r["step"] for r in read_metrics(str(run_dir / "metrics.jsonl")) if "eval/vtc_t2v_r1" in r]
    assert evals == [1, 2]


def test_evaluates_every_epoch_and_keeps_the_best(demo_run, tmp_path):
    """eval.every_epochs 1 and eval.keep_best (the presets'; the demo has 1 step per epoch): every
    step evaluated, retrieval_best.json the first evaluation of the highest VTM r_mean (a resumed
    run beats the best of the run so far, not its own), and umt_stage2_best.pth the weights it
    evaluated: `evaluate retrieval` on that file gives the same report."""
    from umt_fast.evaluate import main as evaluate_main

    run_dir = tmp_path / "best"
    args = ["--run-dir", str(run_dir), "--init", str(demo_run / "umt_stage2.pth"), "--eval.every_epochs", "1",
            "--eval.keep_best", "true"] + SHORT  # fmt: skip
    assert main(args + ["--train.max_steps", "2"]) == 0
    assert main(args + ["--train.max_steps", "4", "--resume", "auto"]) == 0
    evals = [r for r in read_metrics(str(run_dir / "metrics.jsonl")) if "eval/vtm_r_mean" in r]
    assert [r["step"] for r in evals] == [1, 2, 3, 4]
    scores = [r["eval/vtm_r_mean"] for r in evals]
    best = json.loads((run_dir / "retrieval_best.json").read_text())
    assert best["vtm"]["r_mean"] == max(scores) and best["step"] == evals[scores.index(max(scores))]["step"]
    r = best["vtm"]
    assert r["r_mean"] == pytest.approx(sum(r[f"{d}_r{k}"] for d in ("t2v", "v2t") for k in (1, 5, 10)) / 6)
    out = tmp_path / "again.json"
    assert evaluate_main(["retrieval", "--checkpoint", str(run_dir / "umt_stage2_best.pth"), "--text-weights", "minilm",
                          "--test-list", "demo", "--num-workers", "0", "--out", str(out)]) == 0  # fmt: skip
    again = json.loads(out.read_text())
    assert (again["num_frames"], again["img_size"]) == (best["num_frames"], best["img_size"])
    assert again["vtm"] == pytest.approx(best["vtm"], abs=1e-6) and again["vtc"] == pytest.approx(best["vtc"], abs=1e-6)


def test_resume_continues_exactly(tmp_path):
    """With paragraphs too: the demo's 4 clips, one caption each (1 step per epoch)."""
    straight_dir, run_dir = tmp_path / "straight", tmp_path / "resumed"
    args = ["--data.test_list", "", "--data.paragraph", "true", "--text.weights", tiny_text_weights()] + SHORT
    assert main(["--run-dir", str(straight_dir), "--train.max_steps", "4"] + args) == 0
    assert main(["--run-dir", str(run_dir), "--train.max_steps", "2"] + args) == 0
    assert main(["--run-dir", str(run_dir), "--train.max_steps", "4", "--resume", "auto"] + args) == 0
    straight, resumed = _losses(straight_dir), _losses(run_dir)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        for name in ("loss", "vtc", "vtm"):
            assert resumed[step][name] == pytest.approx(straight[step][name], rel=1e-5, abs=1e-6), (step, name)


TWO_RANK_ARGS = ["--text.weights", tiny_text_weights(), "--train.global_batch_size", "4", "--train.batch_size", "0",
                 "--train.vtm_group_size", "2", "--student.drop_path", "0.1", "--train.max_steps", "3", "--log.every_steps", "1",
                 "--data.num_workers", "0"] + SHORT  # fmt: skip


def _ranks(run_dir, nproc: int, *extra) -> tuple[dict[int, dict], dict]:
    records = run_command("umt_fast.finetune_retrieval", run_dir, nproc, TWO_RANK_ARGS + list(extra), 33500)
    return {r["step"]: r for r in records if "loss" in r}, json.loads((run_dir / "retrieval.json").read_text())


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return _ranks(tmp_path_factory.mktemp("one") / "run", 1)


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=needs_fsdp_on_cpu)])
def test_two_ranks_give_the_one_rank_losses_and_evaluation(one_rank, tmp_path, strategy):
    """Drop path on, text dropout off (the demo's): the same steps at the same global batch, and the
    same evaluation of the same weights (under FSDP2 from the gathered weights)."""
    (one, one_report), (two, two_report) = one_rank, _ranks(tmp_path / "two", 2, "--dist.strategy", strategy)
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        for name in ("loss", "vtc", "vtm"):
            assert one[step][name] == pytest.approx(two[step][name], abs=1e-4), (step, name)
    for scores in ("vtc", "vtm"):
        assert one_report[scores] == pytest.approx(two_report[scores], abs=1e-6)
