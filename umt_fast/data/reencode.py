"""Re-encoding a video for fast training reads (``python -m umt_fast.prepare shard --reencode``).

A clip sampler seeks to the keyframe before its first frame and decodes from there, so the
decode cost of a clip grows with the keyframe interval and the picture size. Raw Kinetics
downloads often carry a 250-frame GOP at 720p or more; re-encoded at a constant frame rate,
a 320 px short side and a 1 s GOP, a clip decodes several times faster (see
``benchmarks/test_data.py``) and the shards shrink.

`reencode_video` decodes the first video stream and writes a new one, audio dropped:

* constant frame rate: output frame k (at ``t_k = k / fps`` from the first frame) is the source
  frame on screen at ``t_k``, the last one whose time is at most ``t_k``; the output covers the
  source's span (its last frame shown for one source-frame duration);
* ``short_side``: the picture resized (swscale, bicubic) so its shorter side has that many
  pixels, the aspect kept, both sides even for yuv420p;
* a fixed keyframe interval: an intra frame every ``keyframe_interval`` frames and no others
  (no scene-cut keyframes);
* ``max_seconds``: at most that much from the start;
* codec H.264 (libx264) or HEVC (libx265) in MP4, or VP9 (libvpx) in WebM, the one DALI's CPU
  backend decodes; quality by CRF. One encoder thread: shards are written in parallel.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from fractions import Fraction

import av

from umt_fast.data.decoding import VideoDecodeError, _open_video, remote_bytes

__all__ = ["CODECS", "ReencodeOptions", "reencode_video"]

CODECS = {"h264": ("libx264", "mp4", ".mp4"), "hevc": ("libx265", "mp4", ".mp4"), "vp9": ("libvpx-vp9", "webm", ".webm")}
"""--codec value -> (FFmpeg encoder, container, file extension)."""


@dataclass(frozen=True)
class ReencodeOptions:
    """How `reencode_video` rewrites a video (recorded in the shard set's manifest)."""

    codec: str = "h264"
    fps: float = 0.0
    """Constant output frame rate; 0 = the source's average rate."""
    short_side: int = 0
    """Pixels of the shorter side; 0 = the source's size (rounded down to even)."""
    keyframe_interval: float = 1.0
    """Seconds between keyframes (1.0: a 1 s GOP)."""
    max_seconds: float = 0.0
    """Keep at most this much from the start; 0 = all."""
    crf: int = 23
    """Constant rate factor (lower = better quality, larger files)."""

    def __post_init__(self):
        if self.codec not in CODECS:
            raise ValueError(f"--codec={self.codec!r}: choose one of {', '.join(CODECS)}")
        for name in ("fps", "short_side", "max_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 0")
        if self.short_side % 2:
            raise ValueError(f"--short-side={self.short_side} must be even (yuv420p)")
        if self.keyframe_interval <= 0:
            raise ValueError(f"--keyframe-interval={self.keyframe_interval} must be > 0 seconds")
        if not 0 <= self.crf <= 63:
            raise ValueError(f"--crf={self.crf} must be in [0, 63]")

    @property
    def extension(self) -> str:
        return CODECS[self.codec][2]

    def as_dict(self) -> dict:
        return asdict(self)


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``short_side`` (0: unchanged), aspect kept, even."""
    if short_side:
        scale = short_side / min(width, height)
        width, height = round(width * scale), round(height * scale)
    return max(2, width - width % 2), max(2, height - height % 2)


def _encoder_options(codec: str, gop: int, crf: int) -> dict[str, str]:
    if codec == "h264":
        return {"crf": str(crf), "preset": "veryfast", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
    if codec == "hevc":
        return {"crf": str(crf), "preset": "veryfast",
                "x265-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:log-level=error"}  # fmt: skip
    return {"crf": str(crf), "b": "0", "deadline": "realtime", "cpu-used": "8", "g": str(gop), "keyint_min": str(gop)}


def _constant_rate_frames(frames, fps: Fraction, max_seconds: float):
    """The decoded ``frames`` resampled to ``fps``: yields (k, frame) for output frame k, the
    source frame on screen at k / fps after the first frame (times compared exactly, as
    fractions of the stream's time base)."""
    shown, shown_at, step, start, k = None, Fraction(0), Fraction(0), None, 0
    limit = Fraction(max_seconds) if max_seconds else None
    for frame in frames:
        if frame.pts is not None and frame.time_base is not None:
            t = Fraction(frame.pts) * frame.time_base
        else:  # no timestamp: one source-frame step after the last
            t = shown_at + step + (start or 0) if shown is not None else Fraction(0)
        start = t if start is None else start
        t -= start
        if shown is not None:
            step = t - shown_at
            while k / fps < t and (limit is None or k / fps < limit):
                yield k, shown
                k += 1
        shown, shown_at = frame, t
    if shown is not None:
        end = shown_at + (step or 1 / fps)
        end = min(end, limit) if limit is not None else end
        while k / fps < end:
            yield k, shown
            k += 1


def reencode_video(path: str, options: ReencodeOptions) -> bytes:
    """The video at ``path`` (a file, shard member or URL) re-encoded as ``options`` say (see the
    module docstring): the new file's bytes. VideoDecodeError if the source cannot be read or
    holds no frame."""
    encoder, container_format, _ = CODECS[options.codec]
    with _open_video(path, remote_bytes(path)) as (source, stream):
        fps = Fraction(options.fps).limit_denominator(1001) if options.fps else Fraction(stream.average_rate or 25)
        width, height = output_size(stream.codec_context.width, stream.codec_context.height, options.short_side)
        gop = max(1, round(options.keyframe_interval * fps))
        out = io.BytesIO()
        written = 0
        with av.open(out, "w", format=container_format) as target:
            video = target.add_stream(encoder, rate=fps)
            video.width, video.height, video.pix_fmt = width, height, "yuv420p"
            video.codec_context.thread_count = 1
            video.codec_context.gop_size = gop
            video.options = _encoder_options(options.codec, gop, options.crf)
            decoded = source.decode(stream)
            for k, frame in _constant_rate_frames(decoded, fps, options.max_seconds):
                picture = frame.reformat(width=width, height=height, format="yuv420p", interpolation="BICUBIC")
                picture.pts, picture.time_base = k, 1 / fps
                picture.pict_type = av.video.frame.PictureType.NONE  # the source's frame types force none here
                for packet in video.encode(picture):
                    target.mux(packet)
                written += 1
            for packet in video.encode(None):
                target.mux(packet)
    if not written:
        raise VideoDecodeError(path, "no frame to re-encode")
    return out.getvalue()
