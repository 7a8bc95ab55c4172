"""CPU video decoding with PyAV: exact frames by index, decoding only what is needed.

A frame's index comes from its timestamp, not from how many frames were decoded before it:
    index = round((frame.pts - stream.start_time) * stream.time_base * stream.average_rate)
so that decoding can start at a keyframe in the middle of the video and still be exact. Only
what is needed is decoded: for each run of wanted frames, from the keyframe before it (a seek)
to the last frame of the run; the frames between runs are never decoded. Within a run, a frame
that nothing needs is skipped when it is a non-reference frame (most B-frames of H.264 and
HEVC): the decoder is told per packet to discard non-reference pictures (`skip_frame =
"NONREF"`) unless the packet's frame is wanted, or is the frame that would be shown at a wanted
index (see `_decode_needed`). No later frame depends on a non-reference frame, so the frames
kept are bit-identical to a full decode. Other codecs (VP9, AV1, MJPEG, ...) and HEVC with
temporal sub-layers decode every frame of a run, as before.
Every failure surfaces as a `VideoDecodeError` naming the file and the reason, so a data
loader can skip the video instead of crashing.
"""
from __future__ import annotations

import bisect
import collections
import contextlib
import io
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

__all__ = ["VideoDecodeError", "VideoInfo", "count_frames", "decode_frames", "probe_video"]

logger = logging.getLogger(__name__)

# Skip the non-reference frames that no wanted frame needs. False decodes every frame from the
# seek to the last frame of a run (the behaviour before; kept for comparison and as a way out
# should some decoder mishandle per-packet `skip_frame`).
SKIP_UNNEEDED_FRAMES = True

# How many packets past the current one the decoder may demux to learn that a frame is not
# needed (that some other frame is shown at the wanted index). H.264 and HEVC reorder at most 16
# frames, so the next frame in presentation order is within this window.
_LOOKAHEAD_PACKETS = 32

# What PyAV raises on unreadable input. av's errors subclass FFmpegError (and OSError or
# ValueError); EOFError comes from truncated streams.
_AV_ERRORS = (av.FFmpegError, OSError, EOFError)


class VideoDecodeError(Exception):
    """A video that cannot be decoded (or not far enough).

    Attributes:
        path: the video file.
        reason: what went wrong, in words.
        num_decodable_frames: when decoding ran out of frames, how many the stream really has
            (the metadata can overstate it); None otherwise.
    """

    def __init__(self, path: str, reason: str, num_decodable_frames: int | None = None):
        super().__init__(f"cannot decode video {path!r}: {reason}")
        self.path = path
        self.reason = reason
        self.num_decodable_frames = num_decodable_frames

    def __reduce__(self):
        return type(self), (self.path, self.reason, self.num_decodable_frames)


@contextlib.contextmanager
def _open_video(
    path: str, data: bytes | None = None
) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    """Open `path` (or its bytes `data`, already read) and its first video stream for
    single-threaded decoding.

    PyAV errors raised while the context is open are re-raised as VideoDecodeError.
    """
    if data is None:
        if not os.path.isfile(path):
            raise VideoDecodeError(path, "file not found")
        if os.path.getsize(path) == 0:
            raise VideoDecodeError(path, "empty file (0 bytes)")
    elif not data:
        raise VideoDecodeError(path, "empty file (0 bytes)")
    try:
        with av.open(path if data is None else io.BytesIO(data), metadata_errors="ignore") as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "no video stream")
            stream = container.streams.video[0]
            if stream.codec_context is None:
                raise VideoDecodeError(path, "unsupported video codec (FFmpeg has no decoder for it)")
            # One decoder thread: loader workers already parallelise over videos.
            stream.codec_context.thread_count = 1
            yield container, stream
    except _AV_ERRORS as e:
        raise VideoDecodeError(path, _describe(e, path)) from e


def _describe(e: Exception, path: str) -> str:
    """`e` in words, without repeating `path` (av's errors append the file name)."""
    strerror, filename = getattr(e, "strerror", None), getattr(e, "filename", None)
    if strerror:
        where = f" in {filename}" if filename and filename not in (path, "<none>") else ""
        return f"{type(e).__name__}: {strerror}{where}"
    return f"{type(e).__name__}: {e}"


def _frame_rate(stream: av.video.stream.VideoStream, path: str) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise VideoDecodeError(path, "unknown frame rate")
    return Fraction(rate)


def _count_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    if stream.frames > 0:
        return stream.frames
    rate = stream.average_rate or stream.guessed_rate
    if rate:
        if stream.duration and stream.time_base:
            return round(stream.duration * stream.time_base * rate)
        if container.duration:
            return round(Fraction(container.duration, av.time_base) * rate)
    return sum(1 for packet in container.demux(stream) if packet.size > 0)


def remote_bytes(path: str) -> bytes | None:
    """The bytes of a shard member or a URL (`umt_fast.data.storage`); None for a local file,
    which FFmpeg opens itself."""
    from umt_fast.data.storage import needs_bytes, read_video_bytes  # storage imports this module

    return read_video_bytes(path) if needs_bytes(path) else None


def count_frames(path: str, max_seconds: float = 0.0) -> int:
    """Number of frames of the first video stream of `path`.

    From the container's frame count when it has one, else duration x frame rate, else by
    demuxing every packet. Metadata can overstate what is decodable; `decode_frames` reports
    the true count in `VideoDecodeError.num_decodable_frames` when it runs out. With
    ``max_seconds`` > 0, at most ``int(max_seconds x frame rate)``: the frames of the video's
    first ``max_seconds`` (the reference's ``trimmed30`` cut, which DiDeMo's recipes read).

    Raises:
        VideoDecodeError: unreadable file, no video stream, no frames, or (with ``max_seconds``)
            no frame rate.
    """
    with _open_video(path, remote_bytes(path)) as (container, stream):
        num_frames = _count_frames(container, stream)
        if max_seconds > 0:
            num_frames = min(num_frames, int(max_seconds * _frame_rate(stream, path)))
    if num_frames < 1:
        raise VideoDecodeError(path, "video stream has no frames")
    return num_frames


@dataclass(frozen=True)
class VideoInfo:
    """What a probe learns about a video without decoding a frame.

    Attributes:
        path: the video file.
        num_frames: video packets in the file, counted by demuxing (not read from the
            container's metadata, which a truncated file overstates).
        width, height: frame size in pixels.
        codec: FFmpeg's name of the video codec ("h264", "hevc", "vp9", "av1", "mjpeg", ...).
        keyframes: the frame indices of the keyframes, sorted (for `decode_frames`).
        data: the file's bytes when the probe was asked to keep them (for a decoder that
            reads from memory), else None.
    """

    path: str
    num_frames: int
    width: int
    height: int
    codec: str
    keyframes: tuple[int, ...] = field(default=(), repr=False, compare=False)
    data: bytes | None = field(default=None, repr=False, compare=False)


def probe_video(path: str, keep_bytes: bool = False) -> VideoInfo:
    """Open `path`, check that its first video stream can be decoded, count its frames.

    Reads packets only (no decoding): a few milliseconds for a 10 s clip.

    Args:
        path: the video file.
        keep_bytes: read the whole file into memory first, probe from there and return the
            bytes in `VideoInfo.data` (always, for a shard member or a URL: see
            `umt_fast.data.storage`; one read serves the probe and the decode).

    Raises:
        VideoDecodeError: missing or empty file, not a media file, no video stream, a codec
            FFmpeg cannot decode, unknown frame size, no frames, or a file that ends or breaks
            in the middle of its packets (truncated).
    """
    data = remote_bytes(path)
    if data is None and keep_bytes:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError as e:
            raise VideoDecodeError(path, "file not found") from e
        except OSError as e:
            raise VideoDecodeError(path, _describe(e, path)) from e
    with _open_video(path, data) as (container, stream):
        width, height = stream.codec_context.width, stream.codec_context.height
        codec = stream.codec_context.codec.canonical_name
        num_frames, keyframes = _scan_packets(container, stream, path)
    if num_frames < 1:
        raise VideoDecodeError(path, "video stream has no frames")
    if width < 1 or height < 1:
        raise VideoDecodeError(path, f"unknown frame size {width}x{height}")
    return VideoInfo(path, num_frames, width, height, codec, keyframes, data)


def _pts_to_index(stream: av.video.stream.VideoStream, path: str):
    """pts -> frame index: round((pts - start_time) * time_base * frame rate)."""
    frames_per_tick = stream.time_base * _frame_rate(stream, path)
    start = stream.start_time or 0
    return lambda pts: round((pts - start) * frames_per_tick)


def _scan_packets(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, path: str
) -> tuple[int, tuple[int, ...]]:
    """Demux every packet of `stream`: (number of non-empty packets, sorted keyframe indices)."""
    index_of = _pts_to_index(stream, path)
    num_frames, keyframes = 0, set()
    try:
        for packet in container.demux(stream):
            if packet.size > 0:
                num_frames += 1
                if packet.is_keyframe and packet.pts is not None:
                    keyframes.add(index_of(packet.pts))
    except _AV_ERRORS as e:
        raise VideoDecodeError(path, f"truncated or corrupt after {num_frames} frames ({_describe(e, path)})") from e
    return num_frames, tuple(sorted(keyframes))


def _seek_runs(wanted: list[int], keyframes: Sequence[int]) -> list[list[int]]:
    """Split the sorted `wanted` into runs, each decoded after one seek: a new run starts at a
    wanted frame when a keyframe lies after the previous wanted frame and at or before it (so
    the frames in between need not be decoded)."""
    runs = [[wanted[0]]]
    for prev, index in zip(wanted, wanted[1:]):
        if bisect.bisect_right(keyframes, index) > bisect.bisect_right(keyframes, prev):
            runs.append([index])
        else:
            runs[-1].append(index)
    return runs


def _decode_packet(codec_context: av.video.codeccontext.VideoCodecContext, packet: av.Packet) -> list[av.VideoFrame]:
    """The frames the decoder returns after `packet` (a function of its own so that tests can
    count them)."""
    return codec_context.decode(packet)


def _discards_only_unused_frames(codec_context: av.video.codeccontext.VideoCodecContext) -> bool:
    """Whether this stream's decoder, told `skip_frame = "NONREF"` for a packet, discards only
    a frame that no other frame uses, and reads the setting per packet.

    H.264: yes (FFmpeg drops the slices with nal_ref_idc 0). HEVC: FFmpeg drops every
    "sub-layer non-reference" picture, which pictures of a higher temporal sub-layer may still
    use, so only when the stream has one temporal sub-layer, as the hvcC extradata of MP4 and
    Matroska says (numTemporalLayers, the 3 bits after the first 2 of byte 21). Any other codec
    (VP9, AV1, MJPEG, ...): not used; its frames are all decoded as before.
    """
    name = codec_context.codec.name
    if name == "h264":
        return True
    if name == "hevc":
        extradata = codec_context.extradata
        return extradata is not None and len(extradata) > 22 and extradata[0] == 1 and (extradata[21] >> 3) & 7 == 1
    return False


def _decode_needed(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    path: str,
    wanted: list[int],
    skip: bool,
) -> Iterator[av.VideoFrame]:
    """Decode `stream` from where the demuxer stands, yielding frames in presentation order.

    With `skip`, and a decoder that allows it (`_discards_only_unused_frames`: H.264, HEVC
    with one temporal sub-layer), the decoder discards the non-reference frames (`skip_frame =
    "NONREF"`, set per packet) of the packets whose frame nothing needs. The frame at index p is needed when p is
    in the sorted `wanted`, or when it may be the frame shown at the first wanted index w after
    p: it is not needed once a packet with an index in (p, w] has been demuxed, looking up to
    `_LOOKAHEAD_PACKETS` packets ahead (then the frame shown at w is a later one). A frame after
    the last wanted index is not needed once that index has a packet of its own (else the first
    frame after it tells that the index has none, see `_decode_wanted`). Packets without a
    timestamp are always decoded. Reference frames are always decoded, whatever the setting.

    A demux error met while looking ahead is raised only when decoding reaches that point, as
    it would be without the look-ahead.
    """
    codec_context = stream.codec_context
    packets = container.demux(stream)
    if not (skip and _discards_only_unused_frames(codec_context)):
        codec_context.skip_frame = "DEFAULT"
        for packet in packets:
            yield from _decode_packet(codec_context, packet)
        return

    index_of = _pts_to_index(stream, path)
    ahead: collections.deque[tuple[av.Packet, int | None]] = collections.deque()
    demuxed: list[int] = []  # sorted frame indices of the packets demuxed so far
    error: Exception | None = None
    exhausted = False

    def demux_one() -> bool:
        nonlocal error, exhausted
        if exhausted:
            return False
        try:
            packet = next(packets)
        except StopIteration:
            exhausted = True
            return False
        except _AV_ERRORS as e:
            error, exhausted = e, True
            return False
        index = index_of(packet.pts) if packet.pts is not None and packet.size > 0 else None
        if index is not None:
            bisect.insort(demuxed, index)
        ahead.append((packet, index))
        return True

    def demuxed_in(lo: int, hi: int) -> bool:
        """Whether a packet with an index in (lo, hi] has been demuxed."""
        i = bisect.bisect_right(demuxed, lo)
        return i < len(demuxed) and demuxed[i] <= hi

    wanted_set, last = set(wanted), wanted[-1]
    mode = None
    while ahead or demux_one():
        packet, index = ahead.popleft()
        unneeded = False
        if index is not None and index not in wanted_set:
            j = bisect.bisect_right(wanted, index)
            lo, hi = (index, wanted[j]) if j < len(wanted) else (last - 1, last)
            unneeded = demuxed_in(lo, hi)
            while not unneeded and len(ahead) < _LOOKAHEAD_PACKETS and demux_one():
                unneeded = demuxed_in(lo, hi)
        new_mode = "NONREF" if unneeded else "DEFAULT"
        if new_mode != mode:
            codec_context.skip_frame = mode = new_mode
        yield from _decode_packet(codec_context, packet)
    if error is not None:
        raise error


def _decode_wanted(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    path: str,
    wanted: list[int],
    seek: bool,
    reformatter: VideoReformatter,
) -> dict[int, np.ndarray] | None:
    """Decode the frames at the sorted, unique indices `wanted` into RGB arrays [H, W, 3].

    With `seek`, starts at the keyframe at or before `wanted[0]`; returns None if the seek
    failed or landed after `wanted[0]`, so the caller can decode from the start instead.
    A frame index that the timestamps skip (variable frame rate) gets the frame shown at
    that time, i.e. the previous one. Non-reference frames that none of this needs are not
    decoded (`_decode_needed`).
    """
    frames_per_tick = stream.time_base * _frame_rate(stream, path)
    start = stream.start_time or 0
    width, height = stream.codec_context.width, stream.codec_context.height
    pts_to_index = _pts_to_index(stream, path)

    def index_of(frame: av.VideoFrame) -> int:
        if frame.pts is None:
            raise VideoDecodeError(path, "frame without a timestamp")
        return pts_to_index(frame.pts)

    def rgb(frame: av.VideoFrame) -> np.ndarray:
        # One reformatter for all frames: PyAV would set up a new swscale context per frame.
        return reformatter.reformat(frame, format="rgb24", width=width, height=height).to_ndarray()

    if seek:
        # The largest pts whose frame index still rounds to <= wanted[0].
        target = start + math.ceil((wanted[0] + Fraction(1, 2)) / frames_per_tick) - 1
        try:
            container.seek(target, stream=stream, backward=True, any_frame=False)
        except av.FFmpegError as e:
            logger.debug("seek failed in %s (%s); decoding from the start", path, e)
            return None

    out: dict[int, np.ndarray] = {}
    k, prev, last_index = 0, None, -1
    for frame in _decode_needed(container, stream, path, wanted, skip=SKIP_UNNEEDED_FRAMES):
        index = index_of(frame)
        if prev is None and seek and index > wanted[0]:
            return None
        if prev is not None and k < len(wanted) and wanted[k] < index:
            prev_rgb = rgb(prev)
            while k < len(wanted) and wanted[k] < index:
                out[wanted[k]] = prev_rgb
                k += 1
        if k < len(wanted) and wanted[k] <= index:
            frame_rgb = rgb(frame)
            while k < len(wanted) and wanted[k] <= index:
                out[wanted[k]] = frame_rgb
                k += 1
        if k == len(wanted):
            return out
        prev, last_index = frame, index

    if seek and prev is None:
        return None
    if prev is None:
        raise VideoDecodeError(path, "no decodable video frames", num_decodable_frames=0)
    raise VideoDecodeError(
        path,
        f"frame {wanted[k]} needed but the stream ends after frame {last_index}",
        num_decodable_frames=last_index + 1,
    )


def decode_frames(path: str, frame_indices: Sequence[int], keyframes: Sequence[int] | None = None,
                  data: bytes | None = None) -> torch.Tensor:  # fmt: skip
    """Decode the frames at `frame_indices` (0-based) of the first video stream of `path`.

    Decodes only what is needed: the wanted frames are split into runs at keyframes; for each
    run, seeks to the keyframe at or before its first frame and decodes forward to its last.
    Indices may repeat and come in any order.

    Args:
        keyframes: the video's keyframe indices (`probe_video(path).keyframes`); found by
            demuxing the file when None.
        data: the video's bytes (`probe_video(path).data`), decoded from memory; read here
            when None and `path` is a shard member or a URL.

    Returns:
        uint8 [T, H, W, 3] RGB, T = len(frame_indices), in the order of `frame_indices`.

    Raises:
        ValueError: `frame_indices` is empty or has a negative index.
        VideoDecodeError: the file is missing, empty, truncated, not a video, has fewer
            decodable frames than needed, or FFmpeg fails on it.
    """
    indices = [int(i) for i in frame_indices]
    if not indices or min(indices) < 0:
        raise ValueError(f"frame_indices must be non-empty and >= 0, got {indices}")
    wanted = sorted(set(indices))
    reformatter = VideoReformatter()

    if data is None:
        data = remote_bytes(path)
    frames: dict[int, np.ndarray] | None = {}
    with _open_video(path, data) as (container, stream):
        if keyframes is None:
            _, keyframes = _scan_packets(container, stream, path)
        for run in _seek_runs(wanted, sorted(keyframes)):
            # Always seek: the scan or the previous run left the demuxer further on.
            got = _decode_wanted(container, stream, path, run, seek=True, reformatter=reformatter)
            if got is None:
                frames = None
                break
            frames.update(got)
    if frames is None:
        logger.debug("a seek in %s did not land before the frame wanted; decoding from the start", path)
        with _open_video(path, data) as (container, stream):
            frames = _decode_wanted(container, stream, path, wanted, seek=False, reformatter=reformatter)
    assert frames is not None and len(frames) == len(wanted)
    return torch.from_numpy(np.stack([frames[i] for i in indices]))


def scan_video(path: str) -> dict:
    """Everything `python -m umt_fast.prepare scan` records about one video; never raises.

    Returns a JSON-able dict: ``path``, ``ok`` and, when not ok, ``reason``; when readable also
    ``frames`` (packets counted by demuxing), ``fps``, ``duration_s``, ``constant_frame_rate``
    (every pts step the same), ``width``, ``height``, ``codec``, ``keyframe_interval``
    (mean frames between keyframes), ``bitrate_kbps`` and ``size_bytes``. Decodability is
    checked by decoding the first, middle and last frames.
    """
    record: dict = {"path": path, "ok": False}
    try:
        info = probe_video(path)
        with _open_video(path) as (container, stream):
            fps = float(_frame_rate(stream, path))
            pts = sorted(p.pts for p in container.demux(stream) if p.size > 0 and p.pts is not None)
            steps = {b - a for a, b in zip(pts, pts[1:])}
            duration = info.num_frames / fps
            if stream.duration and stream.time_base:
                duration = float(stream.duration * stream.time_base)
        last = info.num_frames - 1
        decode_frames(path, sorted({0, last // 2, last}), keyframes=info.keyframes)
        size = os.path.getsize(path)
        gaps = [b - a for a, b in zip(info.keyframes, info.keyframes[1:])]
        record.update(
            ok=True, frames=info.num_frames, fps=round(fps, 3), duration_s=round(duration, 3),
            constant_frame_rate=len(steps) <= 1 or max(steps) - min(steps) <= 1, width=info.width,
            height=info.height, codec=info.codec,
            keyframe_interval=round(sum(gaps) / len(gaps), 1) if gaps else float(info.num_frames),
            bitrate_kbps=round(size * 8 / max(duration, 1e-9) / 1000, 1), size_bytes=size,
        )  # fmt: skip
    except VideoDecodeError as e:
        record["reason"] = e.reason
    except Exception as e:  # a scan reports every file and stops on none
        record["reason"] = f"{type(e).__name__}: {e}"
    return record
