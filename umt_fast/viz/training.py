"""The mask figure during pre-training: every ``log.mask_figure_every_steps`` steps, the same
clip (the first readable clip of the training list, sampled as `load_eval_clip` does) is drawn
with the teacher's attention, the three policies' masks and the student's agreement with the
teacher, into ``<run_dir>/figures/mask_step_<step>.png`` and to the image sinks.

Drawing never changes the run: the student is put in eval mode and back, everything runs
under no_grad, the masks use explicit generators, and the global RNG states are restored
afterwards, so a run with figures logs the same losses as one without. A failure to draw is a
warning, never an error.
"""
from __future__ import annotations

import logging
import os

import torch

from umt_fast.engine import checkpoint as ckpt
from umt_fast.config import PretrainConfig

log = logging.getLogger(__name__)

FIGURE_DIR = "figures"
IMAGE_TAG = "mask_figure"
_MAX_CLIPS_TRIED = 4


def mask_figure_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, FIGURE_DIR, f"mask_step_{step:08d}.png")


class MaskFigureReporter:
    """Writes the mask figure at every multiple of ``cfg.log.mask_figure_every_steps``.

    Args:
        cfg: the run's config (data sampling, mask ratio and policy, seed, teacher description).
        clip_paths: the training list's videos, in list order; the first readable one is drawn.
        teacher, student: the run's models (the student's train/eval mode is restored).
        device, autocast_dtype: as in the training step.
    """

    def __init__(
        self,
        cfg: PretrainConfig,
        clip_paths: list[str],
        teacher: torch.nn.Module,
        student: torch.nn.Module,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
    ):
        self.cfg = cfg
        self.every_steps = cfg.log.mask_figure_every_steps
        self.clip_paths = clip_paths[:_MAX_CLIPS_TRIED]
        self.teacher = teacher
        self.student = student
        self.device = device
        self.autocast_dtype = autocast_dtype
        self._clip = None
        self._disabled = self.every_steps <= 0

    def due(self, step: int) -> bool:
        return not self._disabled and step % self.every_steps == 0

    def maybe_write(self, step: int, image_sink) -> str | None:
        """If ``step`` is due, draw the figure, save it and hand it to ``image_sink.write_image``.

        Returns:
            The PNG's path, or None (not due, disabled, or the drawing failed with a warning).
        """
        if not self.due(step):
            return None
        try:
            return self._write(step, image_sink)
        except ImportError as exc:
            self._disabled = True
            log.warning("mask figures are off: %s (pip install matplotlib)", exc)
        except Exception as exc:  # a picture must never stop a training run
            log.warning("could not draw the mask figure at step %d: %s: %s", step, type(exc).__name__, exc)
        return None

    def _eval_clip(self):
        from umt_fast.data import VideoDecodeError
        from umt_fast.viz.mask_figure import load_eval_clip

        if self._clip is None:
            errors = []
            for path in self.clip_paths:
                try:
                    self._clip = load_eval_clip(path, self.cfg.data.num_frames, self.cfg.data.img_size)
                    break
                except VideoDecodeError as exc:
                    errors.append(str(exc))
            else:
                self._disabled = True
                raise RuntimeError(f"none of the first training clips could be decoded ({'; '.join(errors)}); "
                                   "mask figures are off for this run")  # fmt: skip
        return self._clip

    def _write(self, step: int, image_sink) -> str:
        from umt_fast.viz.mask_figure import MaskFigureInfo, compute_mask_views, describe_teacher, draw_mask_figure
        from umt_fast.viz.render import save_figure

        cfg = self.cfg
        rng = ckpt.rng_state()
        was_training = self.student.training
        self.student.eval()
        try:
            clip = self._eval_clip()
            views = compute_mask_views(
                clip.frames_THWC, self.teacher, ratio=cfg.mask.ratio, seed=cfg.train.seed,
                student=self.student, student_policy=cfg.mask.policy,
                device=self.device, autocast_dtype=self.autocast_dtype,
            )  # fmt: skip
            teacher_desc, random_teacher = describe_teacher(
                cfg.teacher.arch, cfg.teacher.input_resolution, cfg.teacher.weights
            )
            info = MaskFigureInfo(
                clip_name=os.path.basename(clip.path), frame_indices=clip.frame_indices,
                num_video_frames=clip.num_video_frames, teacher=teacher_desc, random_teacher=random_teacher,
                seed=cfg.train.seed, step=step,
            )  # fmt: skip
            path = mask_figure_path(cfg.run_dir, step)
            image_HWC = save_figure(draw_mask_figure(views, info), path)
            image_sink.write_image(IMAGE_TAG, image_HWC, step)
        finally:
            self.student.train(was_training)
            ckpt.restore_rng_state(rng)
        return path
