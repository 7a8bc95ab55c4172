"""Synthetic videos written with PyAV, for tests and benchmarks (nothing is downloaded).

Two kinds of picture:
  - "index": a test pattern from which a decoded, cropped and resized frame tells what it is.
    Red is the frame's index (`INDEX_STEP` grey levels per frame), green rises from 0 at the
    top row to 255 at the bottom row, blue from 0 at the left column to 255 at the right one.
    `frame_index_of` and `crop_extent_of` read them back.
  - "motion": a smooth random texture panning across the frame, which a video codec compresses
    roughly like real footage (for decoding benchmarks).

`write_broken_videos` writes one file of every kind of bad video the loaders must survive.
"""
from __future__ import annotations

import os

import av
import numpy as np
import torch

__all__ = ["INDEX_STEP", "crop_extent_of", "frame_index_of", "write_broken_videos", "write_synthetic_video"]

INDEX_STEP = 8
"""Red grey levels per frame of the "index" pattern (so up to 32 distinguishable frames)."""


def _index_frame(i: int, width: int, height: int) -> np.ndarray:
    frame = np.empty((height, width, 3), np.uint8)
    frame[..., 0] = (i * INDEX_STEP) % 256
    frame[..., 1] = np.round(np.linspace(0, 255, height))[:, None]
    frame[..., 2] = np.round(np.linspace(0, 255, width))[None, :]
    return frame


def _motion_texture(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth random RGB texture twice the frame size: [2H, 2W, 3] uint8."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
    t = torch.from_numpy(coarse).permute(2, 0, 1)[None]
    smooth = torch.nn.functional.interpolate(t, size=(2 * height, 2 * width), mode="bicubic", align_corners=False)
    return smooth[0].permute(1, 2, 0).clamp(0, 255).to(torch.uint8).numpy()


def write_synthetic_video(
    path: str,
    *,
    num_frames: int = 16,
    width: int = 32,
    height: int = 32,
    fps: int = 25,
    codec: str = "libvpx-vp9",
    pattern: str = "index",
    gop: int | None = None,
    seed: int = 0,
    options: dict[str, str] | None = None,
) -> str:
    """Encode a synthetic video into `path` (container from its extension).

    Args:
        num_frames, width, height, fps: the video's shape and rate (even sizes for yuv420p).
        codec: an FFmpeg encoder PyAV ships: "libvpx-vp9", "libvpx" (VP8), "libx264", "mjpeg", ...
        pattern: "index" (a test pattern, see the module docstring) or "motion" (a panning texture).
        gop: keyframe interval in frames (None: the encoder's default, 250 for libx264).
        seed: the "motion" texture's seed.
        options: extra encoder options, e.g. {"preset": "veryfast"}.

    Returns:
        `path`.
    """
    if pattern not in ("index", "motion"):
        raise ValueError(f"pattern must be 'index' or 'motion', got {pattern!r}")
    texture = _motion_texture(width, height, seed) if pattern == "motion" else None
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
        if options:
            stream.options = dict(options)
        for i in range(num_frames):
            if texture is None:
                image = _index_frame(i, width, height)
            else:  # pan diagonally, a few pixels per frame, wrapping around the texture
                y, x = (3 * i) % height, (5 * i) % width
                image = np.ascontiguousarray(texture[y : y + height, x : x + width])
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def frame_index_of(frame_HWC: torch.Tensor | np.ndarray) -> int:
    """The frame index an "index" frame shows (from its mean red), after any crop or resize."""
    red = float(np.asarray(frame_HWC)[..., 0].astype(np.float64).mean())
    return round(red / INDEX_STEP)


def crop_extent_of(frame_HWC: torch.Tensor | np.ndarray, width: int, height: int) -> tuple[float, float, float, float]:
    """Where in a `width` x `height` "index" frame a crop (resized, unflipped) came from.

    Returns:
        (x_left, y_top, x_right, y_bottom) in source pixel coordinates of the crop's first and
        last pixel centres, estimated from the blue and green ramps.
    """
    f = np.asarray(frame_HWC).astype(np.float64)
    blue_row, green_col = f[..., 2].mean(axis=0), f[..., 1].mean(axis=1)
    x = blue_row * (width - 1) / 255
    y = green_col * (height - 1) / 255
    return x[0], y[0], x[-1], y[-1]


def write_broken_videos(directory: str, num_frames_needed: int) -> dict[str, str]:
    """One bad video of each kind in `directory`, for clips of `num_frames_needed` frames.

    Returns:
        kind -> path:
          "missing"         a path with no file
          "zero_bytes"      an empty file
          "truncated"       the first quarter of a 32-frame VP9 WebM (too few frames survive)
          "not_a_video"     a text file named .webm
          "short"           a valid VP9 WebM of num_frames_needed - 1 frames
          "unknown_codec"   a WebM whose codec id names no codec FFmpeg knows
          "corrupt_stream"  a VP9 WebM whose first keyframe is noise: it opens and its packets
                            demux, but decoding fails
    """
    os.makedirs(directory, exist_ok=True)
    join = lambda name: os.path.join(directory, name)  # noqa: E731
    good = write_synthetic_video(join("good_source.webm"), num_frames=max(32, num_frames_needed), width=64, height=48)
    with open(good, "rb") as f:
        data = f.read()
    with av.open(good) as container:
        keyframe = next(p for p in container.demux(container.streams.video[0]) if p.is_keyframe and p.size)
        keyframe_pos, keyframe_size = keyframe.pos, keyframe.size

    paths = {"missing": join("missing.webm")}
    files = {
        "zero_bytes": b"",
        "truncated": data[: len(data) // 4],
        "not_a_video": b"this is a text file, not a video\n" * 8,
        "unknown_codec": data.replace(b"V_VP9", b"V_XYZ", 1),
    }
    noise = np.random.default_rng(0).integers(0, 256, keyframe_size - 4, dtype=np.uint8).tobytes()
    corrupt = bytearray(data)
    corrupt[keyframe_pos + 4 : keyframe_pos + keyframe_size] = noise
    files["corrupt_stream"] = bytes(corrupt)
    for kind, content in files.items():
        paths[kind] = join(f"{kind}.webm")
        with open(paths[kind], "wb") as f:
            f.write(content)
    paths["short"] = write_synthetic_video(join("short.webm"), num_frames=num_frames_needed - 1, width=64, height=48)
    os.remove(good)
    return paths
