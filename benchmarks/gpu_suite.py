"""The one-command GPU check: kernel tests compiled for real, kernel and step benchmarks.

    python -m benchmarks.gpu_suite [--out DIR] [--skip-tests]

Prints a markdown table last (paste it into benchmarks/RESULTS.md) and writes
``gpu_suite.json`` to --out. Sections:
  1. the Triton kernel tests (tests/test_kernels_triton.py) compiled on this GPU;
  2. the card's measured copy bandwidth;
  3. each umt_kernels op at UMT-L shapes: Triton vs the plain-PyTorch reference vs, for masking
     and the CLS row, the reference system's path; GB/s against the copy bandwidth;
  4. the stage-1 training step (UMT-B and UMT-L shapes, random teacher, bf16): clips/s and
     model FLOP utilisation with the kernels vs the references, and a host-sync check.
Designed to finish in well under 5 minutes on an H100.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch

from benchmarks.common import BASELINES, OPS, UMT_L, bytes_moved, make_inputs, run_op

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


def _time_ms(fn, warmup: int = 3, reps: int = 20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def copy_bandwidth_gbps() -> float:
    src = torch.empty(1 << 28, dtype=torch.bfloat16, device="cuda")  # 512 MiB
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), warmup=2, reps=10)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def kernel_rows(copy_gbps: float) -> list[dict]:
    inputs = make_inputs(UMT_L)
    rows = []
    for op in OPS:
        for impl in ("triton", "reference", "reference_system"):
            if impl == "reference_system" and op not in BASELINES:
                continue
            offsets = iter(range(10**9))
            try:
                ms = _time_ms(lambda: run_op(op, impl, inputs, UMT_L, offset=next(offsets)))
                gbps = bytes_moved(op, inputs, UMT_L) / (ms * 1e-3) / 1e9
                rows.append({"op": op, "impl": impl, "ms": ms, "GB/s": gbps, "% copy bw": 100 * gbps / copy_gbps})
            except Exception as exc:  # keep going: one broken row must not hide the others
                rows.append({"op": op, "impl": impl, "error": f"{type(exc).__name__}: {exc}"[:200]})
    return rows


def _vit_forward_flops(tokens: int, seq: int, width: int, depth: int) -> float:
    """Matmul FLOPs of a ViT forward: 24 W^2 per token per block, plus 4 * seq * W for attention."""
    return depth * tokens * (24 * width * width + 4 * seq * width)


def step_rows(batch: int, peak_tflops: float | None) -> list[dict]:
    import umt_kernels
    from umt_fast.config import TEACHER_ARCHS, get_preset
    from umt_fast.masking import visible_tokens_per_clip
    from umt_fast.models import build_student, build_teacher
    from umt_fast.train.optim import build_optimizer
    from umt_fast.train.step import PretrainStep

    rows = []
    for preset in ("umt_b16_k710", "umt_l16_k710"):
        cfg = get_preset(preset)
        cfg.teacher.weights = "none"
        teacher = build_teacher(cfg).cuda().to(torch.bfloat16)
        student = build_student(cfg, teacher.arch.output_dim).cuda()
        optimizer = build_optimizer(student, 1e-4, 0.05, (0.9, 0.95), 1e-8)
        step = PretrainStep(student, teacher, optimizer, mask_policy="attention", mask_ratio=0.8, seed=0,
                            device=torch.device("cuda"), autocast_dtype=torch.bfloat16)
        S, T = cfg.data.img_size, cfg.data.num_frames
        video = torch.randint(0, 256, (batch, T, S, S, 3), dtype=torch.uint8, device="cuda")
        t_arch, s_arch = TEACHER_ARCHS[cfg.teacher.arch], student.arch
        P = (cfg.teacher.input_resolution // t_arch["patch_size"]) ** 2
        n_vis = visible_tokens_per_clip("attention", T, P, 0.8)
        flops = batch * (_vit_forward_flops(T * (P + 1), P + 1, t_arch["width"], t_arch["layers"])
                         + 3 * _vit_forward_flops(n_vis, n_vis, s_arch.width, s_arch.depth))
        for impl in ("triton", "reference"):
            try:
                counter = iter(range(10**9))
                with umt_kernels.backend(impl):
                    torch.cuda.reset_peak_memory_stats()
                    ms = _time_ms(lambda: step(video, next(counter)), warmup=3, reps=10)
                    sync_ok = "n/a"
                    if impl == "triton":
                        torch.cuda.synchronize()
                        torch.cuda.set_sync_debug_mode("error")
                        try:
                            step(video, next(counter))
                            sync_ok = "no host sync"
                        except RuntimeError as exc:
                            sync_ok = f"SYNC: {str(exc)[:80]}"
                        finally:
                            torch.cuda.set_sync_debug_mode("default")
                tflops = flops / (ms * 1e-3) / 1e12
                rows.append({
                    "preset": preset, "impl": impl, "batch": batch, "ms/step": ms, "clips/s": batch / (ms * 1e-3),
                    "TFLOP/s": tflops, "MFU %": 100 * tflops / peak_tflops if peak_tflops else None,
                    "peak GiB": torch.cuda.max_memory_allocated() / 2**30, "host syncs": sync_ok,
                })
            except Exception as exc:
                rows.append({"preset": preset, "impl": impl, "error": f"{type(exc).__name__}: {exc}"[:200]})
        del teacher, student, optimizer, step, video
        torch.cuda.empty_cache()
    return rows


def run_kernel_tests() -> dict:
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_kernels_triton.py", "-q", "-p", "no:cacheprovider"],
                          capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return {"returncode": proc.returncode, "summary": tail[-1] if tail else "", "seconds": time.time() - start,
            "failures": [line for line in tail if line.startswith("FAILED")][:10]}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return "" if v is None else str(v)


def markdown_table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_suite.json")
    parser.add_argument("--skip-tests", action="store_true", help="skip the kernel tests")
    parser.add_argument("--step-batch", type=int, default=32, help="clips per step in the step benchmark")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_suite needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    report = {"date": time.strftime("%Y-%m-%d"), "device": name, "torch": torch.__version__, "triton": triton.__version__,
              "capability": ".".join(map(str, torch.cuda.get_device_capability()))}
    print(json.dumps(report), flush=True)
    sections = [("tests", lambda: None if args.skip_tests else run_kernel_tests()),
                ("copy_GBps", copy_bandwidth_gbps),
                ("kernels", lambda: kernel_rows(report["copy_GBps"])),
                ("steps", lambda: step_rows(args.step_batch, peak))]
    for key, fn in sections:
        try:
            report[key] = fn()
        except Exception:
            report[key] = {"error": traceback.format_exc()[-1000:]}
        print(f"[{key}] done", flush=True)
        with open(os.path.join(args.out, "gpu_suite.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)

    print(f"\n## {report['date']} {name} (torch {report['torch']}, triton {report['triton']})")
    print(f"kernel tests: {report['tests']}")
    print(f"copy bandwidth: {_fmt(report['copy_GBps'])} GB/s\n")
    kernels = report["kernels"]
    if isinstance(kernels, list):
        by = {(r["op"], r["impl"]): r.get("ms") for r in kernels}
        fused = [by.get(("select_and_gather", i)) for i in ("triton", "reference_system")]
        attn = [by.get(("cls_attention", i)) for i in ("triton", "reference_system")]
        if None not in fused + attn:
            print(f"select_and_gather + cls_attention vs the reference system's path: "
                  f"{(fused[1] + attn[1]) / (fused[0] + attn[0]):.1f}x faster (target >= 5x)\n")
        print(markdown_table(kernels))
    else:
        print(kernels)
    print()
    print(markdown_table(report["steps"]) if isinstance(report["steps"], list) else report["steps"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
