"""Throughput guards: ``pytest benchmarks/`` (pytest-benchmark).

On a GPU the step runs the UMT-B/16 shapes (8 frames, 224 px, ratio 0.8) in bf16; on a CPU
the demo's tiny shapes, so the suite also runs on a laptop. Each benchmark records clips/s
(or rows/s) in ``extra_info`` so ``--benchmark-json`` output can be compared across commits.
"""
from __future__ import annotations

import pytest
import torch

import umt_kernels
from umt_fast.config import get_preset
from umt_fast.interop import build_teacher
from umt_fast.models import build_student
from umt_fast.engine.optim import build_optimizer
from umt_fast.recipes.pretrain import PretrainStep

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


def _step_setup():
    if ON_GPU:
        cfg = get_preset("umt_b16_k710")
        cfg.teacher.weights, batch = "none", 16
    else:
        cfg, batch = get_preset("demo"), 4
    teacher = build_teacher(cfg).to(DEVICE)
    if ON_GPU:
        teacher = teacher.to(torch.bfloat16)
    student = build_student(cfg, teacher.arch.output_dim).to(DEVICE)
    optimizer = build_optimizer(student, 1e-4, 0.05, (0.9, 0.95), 1e-8)
    step = PretrainStep(
        student, teacher, optimizer, mask_policy="attention", mask_ratio=cfg.mask.ratio, seed=0,
        device=DEVICE, autocast_dtype=torch.bfloat16 if ON_GPU else None,
    )
    S, T = cfg.data.img_size, cfg.data.num_frames
    video = torch.randint(0, 256, (batch, T, S, S, 3), dtype=torch.uint8, device=DEVICE)
    return step, video, batch, cfg.preset


def test_pretrain_step_throughput(benchmark):
    step_fn, video, batch, preset = _step_setup()
    counter = iter(range(10**9))

    def run():
        step_fn(video, next(counter))
        _sync()

    for i in range(2):
        loss = step_fn(video, next(counter))  # warm-up
        _sync()
        assert loss.dim() == 0 and torch.isfinite(loss)
    benchmark.pedantic(run, rounds=5, iterations=1)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info.update(preset=preset, batch=batch, device=str(DEVICE),
                                    clips_per_s=batch / benchmark.stats.stats.mean)


@pytest.mark.parametrize("groups,n,k", [(512, 196, 40)])
def test_attention_sampling_throughput(benchmark, groups, n, k):
    weights = torch.rand(groups, n, device=DEVICE)
    offsets = iter(range(10**9))

    def run():
        umt_kernels.sample_without_replacement(weights, k, seed=0, offset=next(offsets))
        _sync()

    assert umt_kernels.sample_without_replacement(weights, k, seed=0).shape == (groups, k)

    benchmark(run)
    if benchmark.stats:
        benchmark.extra_info.update(groups=groups, rows_per_s=groups / benchmark.stats.stats.mean)


def test_gather_patches_throughput(benchmark):
    B, T, S = (16, 8, 224) if ON_GPU else (4, 4, 112)
    video = torch.randn(B, 3, T, S, S, device=DEVICE)
    P = (S // 16) ** 2
    idx = torch.stack([torch.randperm(T * P, device=DEVICE)[: T * P // 5].sort().values for _ in range(B)])

    def run():
        umt_kernels.gather_patches(video, idx, 16)
        _sync()

    assert umt_kernels.gather_patches(video, idx, 16).shape == (B, T * P // 5, 3 * 16 * 16)

    benchmark(run)
    if benchmark.stats:
        benchmark.extra_info.update(clips_per_s=B / benchmark.stats.stats.mean)
