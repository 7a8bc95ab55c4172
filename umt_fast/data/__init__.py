"""Data pipeline: annotation lists, PyAV and DALI decoding, the reference's augmentation, the clip stream."""
from .annotations import VideoRecord, read_annotation_list
from .dali import DaliClipLoader, dali_available
from .dataset import (
    BadSampleBudget,
    ClipPlan,
    PositionSampler,
    PretrainClipDataset,
    SkippedVideo,
    build_pretrain_loader,
    collate_clips,
)
from .decoding import VideoDecodeError, VideoInfo, count_frames, decode_frames, probe_video
from .loaders import DECODERS, build_clip_loader, resolve_decoder
from .sample_clips import SAMPLE_CLIP_NAMES, sample_clip_paths, write_sample_clip_list
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MULTISCALE_CROP_SCALES,
    crop_resize_flip,
    fixed_crop_offsets,
    multiscale_crop_box,
    normalize_video,
    tsn_frame_indices,
)

__all__ = [
    "DECODERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MULTISCALE_CROP_SCALES",
    "SAMPLE_CLIP_NAMES",
    "BadSampleBudget",
    "ClipPlan",
    "DaliClipLoader",
    "PositionSampler",
    "PretrainClipDataset",
    "SkippedVideo",
    "VideoDecodeError",
    "VideoInfo",
    "VideoRecord",
    "build_clip_loader",
    "build_pretrain_loader",
    "collate_clips",
    "count_frames",
    "crop_resize_flip",
    "dali_available",
    "decode_frames",
    "fixed_crop_offsets",
    "multiscale_crop_box",
    "normalize_video",
    "probe_video",
    "read_annotation_list",
    "resolve_decoder",
    "sample_clip_paths",
    "tsn_frame_indices",
    "write_sample_clip_list",
]
