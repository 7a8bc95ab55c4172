"""The one-command GPU check: kernel tests compiled for real, kernel and step benchmarks.

    python -m benchmarks.gpu_suite [--out DIR] [--skip-tests] [--max-batch N] [--compile-modes blocks,model]
    python -m benchmarks.gpu_suite --tiny        # the same step rows with tiny models, on a CPU

Prints a markdown table last (paste it into benchmarks/RESULTS.md) and writes
``gpu_suite.json`` to --out. Sections:
  1. the card's measured bf16 matmul rate (the MFU denominator);
  2. the card's measured copy bandwidth;
  3. each umt_kernels op at UMT-L shapes: Triton vs the plain-PyTorch reference vs, for masking
     and the CLS row, the reference system's path; GB/s against the copy bandwidth; one teacher
     block ours vs the reference's way (LayerNorm and QuickGELU passes);
  4. the stage-1 step at UMT-B and UMT-L shapes (8 frames, 224 px, mask 0.8, random teacher,
     synthetic clips already on the GPU, the largest batch up to 64 that fits): teacher
     forward, student forward+backward and optimizer ms, step ms, clips/s, MFU from
     ``model_flops_per_clip``, peak memory and a host-sync check; the same step replayed from
     a CUDA graph; beside them the reference-style step (benchmarks/reference_style.py) and
     the ratios;
  5. the tests with GPU branches (kernels compiled for the card, attention backends, the
     step under torch.cuda.set_sync_debug_mode("error")), see GPU_TESTS.
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
from umt_fast.engine.flops import pretrain_flops_per_clip

GPU_TESTS = (  # the tests whose GPU branches only run here: kernels compiled, attention backends, host syncs,
    # CUDA-graph capture (step and whole run)
    "tests/test_kernels_triton.py", "tests/test_attention.py", "tests/test_step.py", "tests/test_models.py",
    "tests/test_pretrain.py::test_cuda_graph_run_resumes_and_tracks_the_eager_run", "tests/test_fp8_teacher.py",
)
A100_BF16_TFLOPS = 312.0  # dense peak, for the wall-clock projection of the published schedule
K710_CLIPS, STAGE1_EPOCHS, PUBLISHED_HOURS = 658_000, 200, 104


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


def teacher_block_rows() -> list[dict]:
    """One CLIP-L/14 teacher block at UMT-L batch 64 (64 x 8 frames x 197 tokens, bf16, no grad):
    ours (one-pass 16-bit LayerNorm, QuickGELU folded into one silu) against the reference's
    way (fp32-upcast LayerNorm, the literal three-op QuickGELU) in the same run."""
    from benchmarks.reference_style import teacher_block_forward
    from umt_fast.models.teacher import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(1024, 16).cuda().to(torch.bfloat16).eval()
    x = torch.randn(64 * 8, 197, 1024, device="cuda", dtype=torch.bfloat16)
    rows = []
    with torch.no_grad():
        ours = _time_ms(lambda: block(x))
        literal = _time_ms(lambda: teacher_block_forward(block, x))
        flops = 2 * x.shape[0] * x.shape[1] * (12 * 1024 * 1024 + 2 * 197 * 1024)
        for impl, ms in (("umt_fast", ours), ("reference way", literal)):
            rows.append({"op": "teacher block, UMT-L batch 64", "impl": impl, "ms": ms,
                         "TFLOP/s": flops / (ms * 1e-3) / 1e12})
        rows[0]["x reference way"] = literal / ours
    return rows


def fp8_teacher_rows(batch: int = 32) -> list[dict]:
    """The UMT-L teacher (CLIP-L/14 at 196 px, 8 frames) forward with its targets, bf16 against
    --teacher.precision fp8 (torch._scaled_mm, per-row x per-channel scales) in the same run,
    with the fp8 path's agreement: targets' mean cosine to bf16 (>= 0.999) and the attention
    masks' overlap (>= 90%). Target: >= 1.6x on an H100/H200."""
    import copy

    from umt_fast.masking import mask_and_targets
    from umt_fast.models.fp8 import quantize_teacher_fp8
    from umt_fast.models.teacher import CLIPVisionTeacher, TeacherArch

    torch.manual_seed(0)
    arch = TeacherArch(width=1024, layers=24, heads=16, patch_size=14, output_dim=768, input_resolution=196)
    bf16 = CLIPVisionTeacher(arch).cuda().to(torch.bfloat16)
    fp8 = quantize_teacher_fp8(copy.deepcopy(bf16))
    video = torch.randn(batch, 3, 8, 224, 224, device="cuda", dtype=torch.bfloat16)

    def forward(teacher):
        with torch.no_grad():
            return mask_and_targets(teacher(video), "attention", ratio=0.8, seed=0, offset=0)

    flops = batch * pretrain_flops_per_clip(arch, None, arch.grid, 0, num_frames=8, with_student=False)
    rows = []
    for impl, teacher in (("bf16", bf16), ("fp8", fp8)):
        ms = _time_ms(lambda: forward(teacher), warmup=2, reps=10)
        rows.append({"op": f"UMT-L teacher fwd + targets, batch {batch}", "impl": impl, "ms": ms,
                     "TFLOP/s": flops / (ms * 1e-3) / 1e12})
    (idx_a, t_a), (idx_b, _) = forward(bf16), forward(fp8)
    with torch.no_grad():
        t_b = fp8(video).targets(idx_a)  # on the bf16 mask's tokens
    same = (idx_a.unsqueeze(-1) == idx_b.unsqueeze(-2)).any(-1).float().mean().item()
    rows[1].update({"x bf16": rows[0]["ms"] / rows[1]["ms"], "mask overlap %": 100 * same,
                    "target cos": (t_a.float() * t_b.float()).sum(-1).mean().item()})
    return rows


model_flops_per_clip = pretrain_flops_per_clip  # the name this suite's JSON and tests used


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = _time(lambda: a @ b, device, warmup=3, reps=10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _time(fn, device: torch.device, warmup: int = 3, reps: int = 10) -> float:
    if device.type == "cuda":
        return _time_ms(fn, warmup, reps)
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def _build(preset: str, device: torch.device, tiny: bool):
    from umt_fast.config import get_preset
    from umt_fast.interop import build_teacher
    from umt_fast.models import build_student

    cfg = get_preset(preset)
    cfg.teacher.weights = "none"
    if tiny:
        cfg.data.img_size = cfg.teacher.input_resolution = 64
    torch.manual_seed(0)
    teacher = build_teacher(cfg).to(device)
    if device.type == "cuda":
        teacher = teacher.to(torch.bfloat16)
    student = build_student(cfg, teacher.arch.output_dim).to(device)
    return cfg, teacher, student


def _largest_batch(try_batch, batches):
    """Runs ``try_batch(b)`` for b in ``batches`` (descending) until one fits in memory."""
    for batch in batches:
        try:
            return batch, try_batch(batch)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    raise RuntimeError(f"not even a batch of {batches[-1]} fits")


def step_rows(
    device: torch.device, tiny: bool, matmul_tflops: float, max_batch: int = 64, compile_modes: tuple[str, ...] = ()
) -> list[dict]:
    """Per preset: our step (with its parts), replayed from a CUDA graph (GPU), compiled per
    ``compile_modes`` (``blocks``/``model``, as --train.compile), and the reference-style step,
    each at the largest batch that fits (up to ``max_batch``), synthetic uint8 clips already on
    the device."""
    import umt_kernels
    from benchmarks.reference_style import ReferenceStyleStep
    from umt_fast.losses import alignment_loss
    from umt_fast.masking import mask_and_targets, visible_tokens_per_clip
    from umt_fast.engine.optim import build_optimizer
    from umt_fast.recipes.pretrain import PretrainStep
    from umt_fast.data.transforms import normalize_video

    on_gpu = device.type == "cuda"
    autocast = torch.bfloat16 if on_gpu else None
    reps = 3 if tiny else 5
    presets = ("demo",) if tiny else ("umt_b16_k710", "umt_l16_k710")
    batches = (2,) if tiny else tuple(b for b in (64, 48, 32, 16, 8) if b <= max_batch)
    rows = []
    for preset in presets:
        cfg, teacher, student = _build(preset, device, tiny)
        S, T = cfg.data.img_size, cfg.data.num_frames
        P = student.arch.patches_per_frame
        flops = model_flops_per_clip(teacher.arch, student.arch, teacher.arch.grid,
                                     visible_tokens_per_clip("attention", T, P, cfg.mask.ratio))

        def ours(batch):
            optimizer = build_optimizer(student, 1e-4, 0.05, (0.9, 0.95), 1e-8)
            step = PretrainStep(student, teacher, optimizer, mask_policy="attention", mask_ratio=cfg.mask.ratio,
                                seed=0, device=device, autocast_dtype=autocast)
            video_u8 = torch.randint(0, 256, (batch, T, S, S, 3), dtype=torch.uint8, device=device)
            counter = iter(range(10**9))
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            step_ms = _time(lambda: step(video_u8, next(counter)), device, warmup=2, reps=reps)
            peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
            video = normalize_video(video_u8)

            def teacher_part():
                with torch.no_grad(), step._autocast():
                    return mask_and_targets(teacher(video), "attention", ratio=cfg.mask.ratio, seed=0, offset=0)

            idx, targets = teacher_part()

            def student_part():
                with step._autocast():
                    alignment_loss(student(video, idx), targets).backward()

            parts = {"teacher fwd ms": _time(teacher_part, device, 1, reps),
                     "student fwd+bwd ms": _time(student_part, device, 1, reps),
                     "optimizer ms": _time(optimizer.step, device, 1, reps)}
            sync = "n/a (CPU)"
            if on_gpu:
                torch.cuda.set_sync_debug_mode("error")
                try:
                    step(video_u8, next(counter))
                    sync = "none"
                except RuntimeError as exc:
                    sync = f"SYNC: {str(exc)[:60]}"
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            return step_ms, parts, peak, sync

        def graphed(batch):
            from umt_fast.engine.cuda_graph import CUDAGraphStep

            optimizer = build_optimizer(student, 1e-4, 0.05, (0.9, 0.95), 1e-8, capturable=True)
            step = CUDAGraphStep(PretrainStep(student, teacher, optimizer, mask_policy="attention",
                                              mask_ratio=cfg.mask.ratio, seed=0, device=device, autocast_dtype=autocast),
                                 warmup_steps=2)
            video_u8 = torch.randint(0, 256, (batch, T, S, S, 3), dtype=torch.uint8, device=device)
            counter = iter(range(10**9))
            torch.cuda.reset_peak_memory_stats()
            ms = _time(lambda: step(video_u8, next(counter)), device, warmup=3, reps=reps)
            return ms, torch.cuda.max_memory_allocated() / 2**30

        def compiled(mode):
            def run(batch):
                import copy

                from umt_fast.recipes.pretrain import _compile

                c_student, c_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
                _compile(c_student, c_teacher, mode, "aot_eager" if tiny else "inductor")
                optimizer = build_optimizer(c_student, 1e-4, 0.05, (0.9, 0.95), 1e-8)
                step = PretrainStep(c_student, c_teacher, optimizer, mask_policy="attention", mask_ratio=cfg.mask.ratio,
                                    seed=0, device=device, autocast_dtype=autocast)
                video_u8 = torch.randint(0, 256, (batch, T, S, S, 3), dtype=torch.uint8, device=device)
                counter = iter(range(10**9))
                step(video_u8, next(counter))  # compiles
                if on_gpu:
                    torch.cuda.reset_peak_memory_stats()
                ms = _time(lambda: step(video_u8, next(counter)), device, warmup=2, reps=reps)
                return ms, torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
            return run

        def reference_style(batch):
            ref_student = type(student)(student.arch).to(device)
            ref_student.load_state_dict(student.state_dict())
            ref_teacher = teacher.to(torch.float16) if on_gpu else teacher
            step = ReferenceStyleStep(ref_student, ref_teacher, cfg.mask.ratio, device)
            video_u8 = torch.randint(0, 256, (batch, T, S, S, 3), dtype=torch.uint8, device=device)
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            ms = _time(lambda: step(video_u8, 0), device, warmup=2, reps=reps)
            peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
            if on_gpu:
                teacher.to(torch.bfloat16)
            return ms, peak

        def fp8_teacher_step(batch):
            import copy

            from umt_fast.models.fp8 import quantize_teacher_fp8

            optimizer = build_optimizer(student, 1e-4, 0.05, (0.9, 0.95), 1e-8)
            step = PretrainStep(student, quantize_teacher_fp8(copy.deepcopy(teacher)), optimizer,
                                mask_policy="attention", mask_ratio=cfg.mask.ratio, seed=0, device=device,
                                autocast_dtype=autocast)  # fmt: skip
            video_u8 = torch.randint(0, 256, (batch, T, S, S, 3), dtype=torch.uint8, device=device)
            counter = iter(range(10**9))
            torch.cuda.reset_peak_memory_stats()
            ms = _time(lambda: step(video_u8, next(counter)), device, warmup=2, reps=reps)
            return ms, torch.cuda.max_memory_allocated() / 2**30

        results = {}
        fp8_ok = on_gpu and torch.cuda.get_device_capability() >= (8, 9)
        paths = [("umt_fast", ours)] + ([("umt_fast + CUDA graphs", graphed)] if on_gpu else [])
        paths += [("umt_fast + fp8 teacher", fp8_teacher_step)] if fp8_ok else []
        paths += [(f"umt_fast + compile {mode}", compiled(mode)) for mode in compile_modes]
        for name, fn in paths + [("reference-style", reference_style)]:
            try:
                batch, out = _largest_batch(fn, batches)
                step_ms = out[0]
                tflops = batch * flops / (step_ms * 1e-3) / 1e12
                row = {"preset": preset, "path": name, "batch": batch, "step ms": step_ms,
                       "clips/s": batch / (step_ms * 1e-3), "model TFLOP/s": tflops,
                       "MFU % (of measured matmul)": 100 * tflops / matmul_tflops}
                if name == "umt_fast":
                    row.update(out[1])
                    row.update({"peak GiB": out[2], "host syncs": out[3]})
                else:
                    row["peak GiB"] = out[1]
                results[name] = row
            except Exception as exc:
                results[name] = {"preset": preset, "path": name, "error": f"{type(exc).__name__}: {exc}"[:200]}
            rows.append(results[name])
        for name, _ in paths:
            if "clips/s" in results[name] and "clips/s" in results["reference-style"]:
                results[name]["x reference-style"] = results[name]["clips/s"] / results["reference-style"]["clips/s"]
        del teacher, student
        if on_gpu:
            torch.cuda.empty_cache()
    return rows


def run_kernel_tests() -> dict:
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", *GPU_TESTS, "-q", "-p", "no:cacheprovider"],
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_suite.json")
    parser.add_argument("--skip-tests", action="store_true", help="skip the kernel tests")
    parser.add_argument("--max-batch", type=int, default=64, help="largest step batch to try")
    parser.add_argument("--compile-modes", default="",
                        help="comma-separated --train.compile modes (blocks,model) to add as step rows; compiling "
                             "UMT-B and UMT-L takes minutes, so they are off by default")
    parser.add_argument("--tiny", action="store_true",
                        help="the demo's tiny models at batch 2, no kernel tests or kernel rows: runs on a CPU in seconds")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.tiny:
        print("gpu_suite needs a CUDA device (or --tiny for the CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if on_gpu else "cpu")
    import triton

    name = torch.cuda.get_device_name() if on_gpu else "CPU"
    report = {"date": time.strftime("%Y-%m-%d"), "device": name, "torch": torch.__version__, "triton": triton.__version__}
    if on_gpu:
        report["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    print(json.dumps(report), flush=True)
    sections = [("matmul_TFLOPs", lambda: measured_matmul_tflops(device, torch.bfloat16 if on_gpu else torch.float32))]
    if on_gpu and not args.tiny:
        sections += [("copy_GBps", copy_bandwidth_gbps),
                     ("kernels", lambda: kernel_rows(report["copy_GBps"])),
                     ("teacher_block", teacher_block_rows)]
        if torch.cuda.get_device_capability() >= (8, 9):
            sections.append(("fp8_teacher", fp8_teacher_rows))
    compile_modes = tuple(m for m in args.compile_modes.split(",") if m)
    unknown = set(compile_modes) - {"blocks", "model"}
    if unknown:
        parser.error(f"--compile-modes takes blocks and/or model, got {sorted(unknown)}")
    sections.append(("steps", lambda: step_rows(device, args.tiny, report["matmul_TFLOPs"], args.max_batch, compile_modes)))
    if on_gpu and not args.tiny and not args.skip_tests:
        # Last: the least predictable in time. gpu_suite.json is rewritten after every section,
        # so a run stopped here still has every figure.
        sections.append(("tests", run_kernel_tests))
    for key, fn in sections:
        try:
            report[key] = fn()
        except Exception:
            report[key] = {"error": traceback.format_exc()[-1000:]}
        print(f"[{key}] done", flush=True)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_suite.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)

    print(f"\n## {report['date']} {name} (torch {report['torch']}, triton {report['triton']})")
    print(f"measured matmul rate: {_fmt(report['matmul_TFLOPs'])} TFLOP/s ({'bf16' if on_gpu else 'fp32'})")
    if "tests" in report:
        print(f"kernel tests: {report['tests']}")
    if "copy_GBps" in report:
        print(f"copy bandwidth: {_fmt(report['copy_GBps'])} GB/s\n")
    kernels = report.get("kernels")
    if isinstance(kernels, list):
        by = {(r["op"], r["impl"]): r.get("ms") for r in kernels}
        fused = [by.get(("select_and_gather", i)) for i in ("triton", "reference_system")]
        attn = [by.get(("cls_attention", i)) for i in ("triton", "reference_system")]
        if None not in fused + attn:
            print(f"select_and_gather + cls_attention vs the reference system's path: "
                  f"{(fused[1] + attn[1]) / (fused[0] + attn[0]):.1f}x faster (target >= 5x)\n")
        print(markdown_table(kernels))
    elif kernels is not None:
        print(kernels)
    for key in ("teacher_block", "fp8_teacher"):
        block = report.get(key)
        if block is not None:
            print()
            print(markdown_table(block) if isinstance(block, list) else block)
    print()
    steps = report["steps"]
    if isinstance(steps, list):
        ours = [r for r in steps if r.get("preset") == "umt_l16_k710" and r.get("path", "").startswith("umt_fast")
                and "clips/s" in r]
        large = max(ours, key=lambda r: r["clips/s"], default=None)  # eager or CUDA graphs, the faster
        if large:
            mfu = large["MFU % (of measured matmul)"] / 100
            flops = large["model TFLOP/s"] * 1e12 / large["clips/s"]
            hours = STAGE1_EPOCHS * K710_CLIPS * flops / (32 * A100_BF16_TFLOPS * 1e12 * mfu) / 3600
            print(f"projected UMT-L stage 1 (200 epochs x 658K clips) on 32 A100s at the MFU of {large['path']} "
                  f"({100 * mfu:.1f}% of "
                  f"312 TFLOP/s, assuming the same utilisation there): {hours:.0f} h (published: ~{PUBLISHED_HOURS} h)\n")
        print(markdown_table(steps))
    else:
        print(steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
