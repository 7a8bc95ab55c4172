"""CPU video decoding with PyAV: exact frames by index, decoding only what is needed.

A frame's index comes from its timestamp, not from how many frames were decoded before it:
    index = round((frame.pts - stream.start_time) * stream.time_base * stream.average_rate)
so that decoding can start at a keyframe in the middle of the video and still be exact.
Every failure surfaces as a `VideoDecodeError` naming the file and the reason, so a data
loader can skip the video instead of crashing.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from fractions import Fraction

import av
import numpy as np
import torch

__all__ = ["VideoDecodeError", "count_frames", "decode_frames"]

logger = logging.getLogger(__name__)

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
def _open_video(path: str) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    """Open `path` and its first video stream for single-threaded decoding.

    PyAV errors raised while the context is open are re-raised as VideoDecodeError.
    """
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "file not found")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")
    try:
        with av.open(path, metadata_errors="ignore") as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "no video stream")
            stream = container.streams.video[0]
            # One decoder thread: loader workers already parallelise over videos.
            stream.codec_context.thread_count = 1
            yield container, stream
    except _AV_ERRORS as e:
        raise VideoDecodeError(path, _describe(e, path)) from e


def _describe(e: Exception, path: str) -> str:
    """`e` in words, without repeating `path` (av's errors append the file name)."""
    strerror, filename = getattr(e, "strerror", None), getattr(e, "filename", None)
    if strerror:
        where = f" in {filename}" if filename and filename != path else ""
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


def count_frames(path: str) -> int:
    """Number of frames of the first video stream of `path`.

    From the container's frame count when it has one, else duration x frame rate, else by
    demuxing every packet. Metadata can overstate what is decodable; `decode_frames` reports
    the true count in `VideoDecodeError.num_decodable_frames` when it runs out.

    Raises:
        VideoDecodeError: unreadable file, no video stream, or no frames.
    """
    with _open_video(path) as (container, stream):
        num_frames = _count_frames(container, stream)
    if num_frames < 1:
        raise VideoDecodeError(path, "video stream has no frames")
    return num_frames


def _decode_wanted(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    path: str,
    wanted: list[int],
    seek: bool,
) -> dict[int, np.ndarray] | None:
    """Decode the frames at the sorted, unique indices `wanted` into RGB arrays [H, W, 3].

    With `seek`, starts at the keyframe at or before `wanted[0]`; returns None if the seek
    failed or landed after `wanted[0]`, so the caller can decode from the start instead.
    A frame index that the timestamps skip (variable frame rate) gets the frame shown at
    that time, i.e. the previous one.
    """
    frames_per_tick = stream.time_base * _frame_rate(stream, path)
    start = stream.start_time or 0
    width, height = stream.codec_context.width, stream.codec_context.height

    def index_of(frame: av.VideoFrame) -> int:
        if frame.pts is None:
            raise VideoDecodeError(path, "frame without a timestamp")
        return round((frame.pts - start) * frames_per_tick)

    def rgb(frame: av.VideoFrame) -> np.ndarray:
        return frame.to_ndarray(format="rgb24", width=width, height=height)

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
    for frame in container.decode(stream):
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


def decode_frames(path: str, frame_indices: Sequence[int]) -> torch.Tensor:
    """Decode the frames at `frame_indices` (0-based) of the first video stream of `path`.

    Decodes only what is needed: seeks to the keyframe at or before the first needed frame,
    decodes forward and stops after the last one. Indices may repeat and come in any order.

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

    with _open_video(path) as (container, stream):
        frames = _decode_wanted(container, stream, path, wanted, seek=wanted[0] > 0)
    if frames is None:
        logger.debug("seek in %s did not reach frame %d; decoding from the start", path, wanted[0])
        with _open_video(path) as (container, stream):
            frames = _decode_wanted(container, stream, path, wanted, seek=False)
    assert frames is not None and len(frames) == len(wanted)
    return torch.from_numpy(np.stack([frames[i] for i in indices]))
