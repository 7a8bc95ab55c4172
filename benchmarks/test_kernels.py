"""One benchmark per umt_kernels op at UMT-L shapes, the reference timed beside the kernel
(and, for masking and the CLS row, the reference system's own path).

    pytest benchmarks/test_kernels.py --benchmark-group-by=param:op

The Triton rows run only on a GPU. ``extra_info`` holds GB/s for the bytes each op must move.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from benchmarks.common import BASELINES, ON_GPU, OPS, SHAPES, bytes_moved, make_inputs, run_op, sync

IMPLS = ("triton", "reference", "reference_system")
EXPECTED_SHAPES = {
    "sample_without_replacement": lambda s: (s.G, s.k),
    "select_and_gather": lambda s: (s.G, s.k, s.C),
    "cls_attention": lambda s: (s.G, s.N + 1),
    "gather_rows": lambda s: (s.G, s.k, s.C),
    "gather_patches": lambda s: (s.B, s.T * s.k, 3 * s.patch**2),
    "alignment_loss": lambda s: (),
}
_INPUTS = {}


def _inputs():
    if "x" not in _INPUTS:
        _INPUTS["x"] = make_inputs()
    return _INPUTS["x"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_kernel(benchmark, op, impl):
    if impl == "triton" and not ON_GPU:
        pytest.skip("Triton kernels are benchmarked on a GPU only")
    if impl == "reference_system" and op not in BASELINES:
        pytest.skip(f"no reference-system path for {op}")
    inputs, offsets = _inputs(), itertools.count()

    def run():
        run_op(op, impl, inputs, offset=next(offsets))
        sync()

    out = run_op(op, impl, inputs, offset=next(offsets))  # compile / warm up
    first = out[1] if isinstance(out, tuple) else out
    expected = EXPECTED_SHAPES[op](SHAPES)
    if impl == "reference_system" and op == "cls_attention":
        expected = (SHAPES.G, SHAPES.N)  # it returns the patch columns only
    assert first.shape == expected and torch.isfinite(first.float()).all()
    benchmark(run)
    if benchmark.stats:  # None under --benchmark-disable
        seconds = benchmark.stats.stats.mean
        benchmark.extra_info.update(op=op, impl=impl, shapes=str(SHAPES), GBps=bytes_moved(op, inputs) / seconds / 1e9)
