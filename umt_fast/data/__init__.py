"""Data pipeline: annotation lists, PyAV decoding, the reference's augmentation, the clip stream."""
from .annotations import VideoRecord, read_annotation_list
from .dataset import BadSampleBudget, PositionSampler, PretrainClipDataset, build_pretrain_loader, collate_clips
from .decoding import VideoDecodeError, count_frames, decode_frames
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
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MULTISCALE_CROP_SCALES",
    "SAMPLE_CLIP_NAMES",
    "BadSampleBudget",
    "PositionSampler",
    "PretrainClipDataset",
    "VideoDecodeError",
    "VideoRecord",
    "build_pretrain_loader",
    "collate_clips",
    "count_frames",
    "crop_resize_flip",
    "decode_frames",
    "fixed_crop_offsets",
    "multiscale_crop_box",
    "normalize_video",
    "read_annotation_list",
    "sample_clip_paths",
    "tsn_frame_indices",
    "write_sample_clip_list",
]
