"""One benchmark per umt_kernels op at UMT-L shapes, the reference timed beside the kernel
(and, for masking and the CLS row, the reference system's own path).

    pytest benchmarks/test_kernels.py --benchmark-group-by=param:op

The Triton rows run only on a GPU. ``extra_info`` holds GB/s for the bytes each op must move.
"""
from __future__ import annotations

import itertools

import pytest

from benchmarks.common import BASELINES, ON_GPU, OPS, SHAPES, bytes_moved, make_inputs, run_op, sync

IMPLS = ("triton", "reference", "reference_system")
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

    run()  # compile / warm up
    benchmark(run)
    if benchmark.stats:  # None under --benchmark-disable
        seconds = benchmark.stats.stats.mean
        benchmark.extra_info.update(op=op, impl=impl, shapes=str(SHAPES), GBps=bytes_moved(op, inputs) / seconds / 1e9)
