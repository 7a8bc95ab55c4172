"""Video decoding with NVIDIA DALI, following the same `ClipPlan`s as the PyAV path.

Our Python code decides what every sample reads (`PretrainClipDataset.sample_plan`: the record,
its TSN frame indices, the multi-scale crop box and the flip, seeded by sample position), and
feeds the plans to a DALI pipeline through external sources. DALI only executes them:

    file bytes, frame indices --decoders.video--> uint8 [T, H, W, 3]
      --resize(roi = crop box, size = img_size, linear, antialias)--> --flip--> uint8 [T, S, S, 3]

so both decoders read the same frames with the same crop by construction. The batch reaches the
training step as uint8 [B, T, S, S, 3] on the training device, and the step normalises it there
(`normalize_video`), exactly as it does for the PyAV path.

Two backends of one graph, chosen by the training device:
  - "gpu" (a CUDA device): the decoder runs on DALI's mixed backend (NVDEC: H.264, HEVC, AV1,
    MPEG-4, VP8, VP9, MJPEG), crop, resize and flip on the GPU, and the batch is copied into a
    torch tensor on the device on torch's current stream. THIS BACKEND HAS NEVER YET RUN ON A
    GPU: the code exists and follows DALI's documented API, but no test or measurement has
    exercised it. The lines that only it runs are marked "GPU backend only".
  - "cpu": the same graph on DALI's CPU backend, which decodes VP8, VP9 and MJPEG only. The test
    suite runs it on VP9 clips to check the sampling, crop, skip-on-corrupt and resume logic.

Bad videos: a probe in Python (PyAV, packets only) rejects missing, empty, non-video, too-short
files and codecs the backend cannot decode before DALI sees them. When DALI still fails on a
batch (a corrupt stream), the pipeline is rebuilt, the batch's samples are decoded one at a time
to find the culprits, and each is replaced by its next substitute, so shapes stay static.
"""
from __future__ import annotations

import functools
import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from .dataset import ClipPlan, PositionSampler, PretrainClipDataset, SkippedVideo

__all__ = ["DALI_CPU_CODECS", "DALI_GPU_CODECS", "DaliClipLoader", "dali_available"]

logger = logging.getLogger(__name__)

# FFmpeg codec names (as `probe_video` reports them) that each DALI backend decodes.
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
DALI_GPU_CODECS = DALI_CPU_CODECS | {"h264", "hevc", "av1", "mpeg4"}

_INSTALL_HINT = (
    "install NVIDIA DALI with `pip install 'umt_fast[gpu]'` (CUDA 12; `nvidia-dali-cuda130` for CUDA 13)"
)


@functools.cache
def dali_available() -> bool:
    """Whether `nvidia.dali` imports (the real wheels, not the placeholder package `nvidia-dali`)."""
    try:
        import nvidia.dali.fn  # noqa: F401
    except Exception as e:  # noqa: BLE001  (a broken install can raise anything on import)
        logger.debug("NVIDIA DALI is not usable: %s", e)
        return False
    return True


class _DaliRunError(Exception):
    """DALI failed on a batch; `reason` is its message in one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _dali_reason(error: Exception) -> str:
    """The useful line of a DALI error: what follows "encountered:", without the C++ context."""
    text = str(error)
    _, found, tail = text.partition("encountered:")
    lines = [line.strip() for line in (tail if found else text).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("C++ context", "Current pipeline object"))]
    message = lines[0] if lines else type(error).__name__
    _, failed, after = message.partition("failed: ")
    return f"DALI: {after if failed else message}"


class DaliClipLoader:
    """Endless batches of pre-training clips decoded by DALI, like `build_pretrain_loader`'s.

    Yields {"video": uint8 [B, T, S, S, 3] on `device`, "positions": int64 [B],
    "record_indices": int64 [B], "skipped": list[str], "skip_reasons": list[str]}: the same
    positions (`PositionSampler`), records, frames, crops and flips as the PyAV loader, up to
    the two decoders' colour conversion and resampling (a few grey levels).

    Args:
        dataset: the clip stream; its `sample_plan` decides everything random.
        batch_size: clips per batch (this rank's micro-batch).
        start_position: the first sample position (step * global batch on resume).
        device: where the batches go; a CUDA device selects the GPU backend, anything else
            DALI's CPU backend.
        num_threads: DALI's CPU threads, and the threads that probe and read the next
            batches' files while DALI decodes.
        global_batch_size, rank, world_size: how the global batch is split (see
            `PositionSampler`).
        lookahead_batches: batches whose files are probed and read ahead.
    """

    def __init__(
        self,
        dataset: PretrainClipDataset,
        batch_size: int,
        start_position: int,
        *,
        device: torch.device | str = "cpu",
        num_threads: int = 4,
        global_batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        lookahead_batches: int = 2,
    ):
        if not dali_available():
            raise ImportError(f"the DALI data path needs NVIDIA DALI, which is not importable: {_INSTALL_HINT}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.backend = "gpu" if self.device.type == "cuda" else "cpu"
        self.codecs = DALI_GPU_CODECS if self.backend == "gpu" else DALI_CPU_CODECS
        self.num_threads = num_threads
        self._positions = iter(PositionSampler(start_position, global_batch_size, rank, world_size))
        self._lookahead = lookahead_batches * batch_size
        self._probes = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="dali-probe")
        self._pending: deque[Future[ClipPlan]] = deque()
        self._pipeline = None

    # ------------------------------------------------------------------ the DALI graph

    def _build_pipeline(self):
        from nvidia.dali import fn, pipeline_def, types

        size = self.dataset.img_size
        on_gpu = self.backend == "gpu"
        if on_gpu:  # GPU backend only
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        else:
            device_id = None  # a CPU-only pipeline: no CUDA needed

        @pipeline_def(
            batch_size=self.batch_size, num_threads=self.num_threads, device_id=device_id,
            exec_dynamic=True, prefetch_queue_depth=1,
        )  # fmt: skip
        def clip_pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
            # "mixed" = NVDEC, output on the GPU (GPU backend only); "cpu" = libavcodec.
            video_FHWC = fn.decoders.video(encoded, device="mixed" if on_gpu else "cpu", frames=frames)
            video_FHWC = fn.resize(
                video_FHWC, roi_start=roi_start, roi_end=roi_end, roi_relative=False, size=[size, size],
                interp_type=types.INTERP_LINEAR, antialias=True,
            )  # fmt: skip
            return fn.flip(video_FHWC, horizontal=flip)

        pipeline = clip_pipeline()
        pipeline.build()
        return pipeline

    def _run(self, plans: list[ClipPlan]) -> torch.Tensor:
        """Decode and augment `plans` in one DALI run: uint8 [len(plans), T, S, S, 3] on the device.

        Raises:
            _DaliRunError: DALI failed on some sample (the pipeline is rebuilt on next use).
        """
        if self._pipeline is None:
            self._pipeline = self._build_pipeline()
        pipeline = self._pipeline
        # ROI coordinates follow the frame's spatial layout (H, W): (y, x).
        pipeline.feed_input("encoded", [np.frombuffer(p.video.data, dtype=np.uint8) for p in plans])
        pipeline.feed_input("frames", [np.asarray(p.frame_indices, dtype=np.int32) for p in plans])
        pipeline.feed_input("roi_start", [np.array([p.crop_box[1], p.crop_box[0]], np.float32) for p in plans])
        pipeline.feed_input(
            "roi_end",
            [np.array([p.crop_box[1] + p.crop_box[3], p.crop_box[0] + p.crop_box[2]], np.float32) for p in plans],
        )
        pipeline.feed_input("flip", [np.array(int(p.flip), dtype=np.int32) for p in plans])
        try:
            (video,) = pipeline.run()
        except RuntimeError as e:
            self._pipeline = None  # DALI says the pipeline object is no longer valid
            raise _DaliRunError(_dali_reason(e)) from e
        return self._to_torch(video.as_tensor())

    def _to_torch(self, video) -> torch.Tensor:
        if self.backend == "cpu":
            return torch.from_numpy(np.array(video))  # a copy: DALI reuses its buffers
        # GPU backend only: copy into a tensor of torch's caching allocator, ordered on
        # torch's current stream, so the step can use it without a host sync.
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(video.shape(), dtype=torch.uint8, device=self.device)
        feed_ndarray(video, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out

    # ------------------------------------------------------------------ plans and batches

    def _plan(self, position: int) -> ClipPlan:
        return self.dataset.sample_plan(position, keep_bytes=True, codecs=self.codecs)

    def _replan(self, plan: ClipPlan, reason: str) -> ClipPlan:
        skipped = (*plan.skipped, SkippedVideo(plan.path, reason))
        return self.dataset.sample_plan(plan.position, plan.attempt + 1, skipped, keep_bytes=True, codecs=self.codecs)

    def _fill(self) -> None:
        while len(self._pending) < self._lookahead + self.batch_size:
            self._pending.append(self._probes.submit(self._plan, next(self._positions)))

    def _decode(self, plans: list[ClipPlan]) -> tuple[torch.Tensor, list[ClipPlan]]:
        """Decode `plans`, replacing every video DALI fails on by its next substitute.

        Returns:
            (uint8 [B, T, S, S, 3], the plans followed).
        """
        try:
            return self._run(plans), plans
        except _DaliRunError as e:
            logger.debug("DALI failed on a batch (%s); decoding its samples one at a time", e.reason)
        plans = list(plans)
        clips: dict[int, torch.Tensor] = {}
        todo = list(range(len(plans)))
        while todo:
            failed = []
            for i in todo:
                try:
                    clips[i] = self._run([plans[i]])[0]
                except _DaliRunError as e:
                    plans[i] = self._replan(plans[i], e.reason)
                    failed.append(i)
            todo = failed
        return torch.stack([clips[i] for i in range(len(plans))]), plans

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        self._fill()
        plans = [self._pending.popleft().result() for _ in range(self.batch_size)]
        self._fill()  # the next batches' files are probed and read while DALI decodes this one
        video, plans = self._decode(plans)
        skipped = [s for p in plans for s in p.skipped]
        return {
            "video": video,
            "positions": torch.tensor([p.position for p in plans], dtype=torch.long),
            "record_indices": torch.tensor([p.record_index for p in plans], dtype=torch.long),
            "skipped": [s.path for s in skipped],
            "skip_reasons": [s.reason for s in skipped],
        }

    def close(self) -> None:
        """Stop the probe threads and drop the pipeline."""
        self._probes.shutdown(wait=False, cancel_futures=True)
        self._pending.clear()
        self._pipeline = None

    def __del__(self):
        probes = getattr(self, "_probes", None)
        if probes is not None:
            probes.shutdown(wait=False, cancel_futures=True)
