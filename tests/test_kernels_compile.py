"""Every Triton kernel launch umt_kernels makes, compiled ahead of time for sm_80 and sm_90.

Without a GPU the other kernel tests run in Triton's interpreter, which accepts code the
compiler rejects (return types that differ between branches, integer promotions, block-shape
rules). Here each launch goes through the real pipeline: TTIR, TTGIR, LLVM IR, PTX and, with
the ptxas bundled with triton, a cubin. No GPU is needed.

How: a worker process (this file run as a script, without TRITON_INTERPRET) puts a stand-in
driver in place that reports the target GPU, calls the public ops on CPU tensors that are
allocated but never touched (so UMT-L sizes cost no memory), and stops every launch at
triton's JIT cache hook. The argument types, constexprs, specialisations (strides equal to 1,
16-byte divisibility) and num_warps compiled are therefore exactly those of a real launch.

Checked per launch: every stage compiles, the PTX targets the arch, shared memory fits, no
register spills, and the memory-bound launches move their bulk data in 16-byte vectors.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import triton

import umt_kernels

ARCHS = (90, 80)
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # opt-in shared memory per block, H100 / A100
STAGES = ("ttir", "ttgir", "llir", "ptx", "cubin")
# Memory-bound launches at UMT shapes (by op: what must move in 16-byte vectors): scalar
# global accesses would cap them far below the copy bandwidth. The samplers are not memory-bound
# (a 32-pass radix select over a few hundred scores per row), and odd shapes cannot vectorise.
VECTORISED = {"select_and_gather": ("loads", "stores"), "gather_rows": ("loads", "stores"),
              "gather_patches": ("loads", "stores"), "cls_attention": ("loads",), "alignment_loss": ("loads",),
              "alignment_loss_backward": ("loads", "stores")}  # fmt: skip
# Stack bytes per thread a launch may use. Releases before 3.7 leave a few spilled bytes in
# some sampler launches (per ptxas -v: 3.6 spills 8 bytes into a 16-byte frame at k = 1, 3.5
# 8 bytes in uniform mode); from 3.7 on nothing spills.
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
MAX_STACK = 0 if TRITON_VERSION >= (3, 7) else 16

# UMT-L: B clips of T frames, N patches per frame, k kept per frame, C channels, H heads x D.
B, T, N, K, C, H, D = 64, 8, 196, 40, 1024, 16, 64
E = torch.empty  # never read: the launches are intercepted before the kernels run
bf16, fp32 = torch.bfloat16, torch.float32


def _sample(weights, k, mode="weighted", offset=3):
    umt_kernels.sample_without_replacement(weights, k, seed=0, offset=offset, row_offset=5, mode=mode)


def _select_and_gather(scores, x, k, offset=3):
    umt_kernels.select_and_gather(scores, x, k, seed=0, offset=offset, row_offset=5)


def _cls_attention(G, heads, tokens, head_dim, dtype):
    # As the teacher calls it: q[:, :, 0] and k, views of one [G, tokens, 3 * heads * head_dim] qkv.
    qkv = E(G, tokens, 3, heads, head_dim, dtype=dtype).permute(2, 0, 3, 1, 4)
    umt_kernels.cls_attention(qkv[0][:, :, 0], qkv[1], head_dim**-0.5)


def _gather_rows(x, kept):
    umt_kernels.gather_rows(x, torch.zeros(x.shape[0], kept, dtype=torch.int64))


def _gather_patches(video, kept, patch):
    umt_kernels.gather_patches(video, torch.zeros(video.shape[0], kept, dtype=torch.int64), patch)


def _loss(shape, dtype):
    umt_kernels.alignment_loss(E(*shape, dtype=dtype), E(*shape, dtype=dtype))


def _loss_backward(shape, dtype, need_s, need_t):
    torch.ops.umt_kernels.alignment_loss_backward(torch.ones(()), E(*shape, dtype=dtype), E(*shape, dtype=dtype), need_s, need_t)


# id -> (call making exactly one kernel launch, pytest marks)
CASES = {
    # sample_without_replacement: attention masking [B*T, N], tube [B, N], random [B, T*N]
    "sample-weighted-G512xN196-k40-fp32": (lambda: _sample(E(B * T, N), K), ()),
    "sample-weighted-G512xN196-k40-bf16": (lambda: _sample(E(B * T, N, dtype=bf16), K), ()),
    "sample-uniform-G64xN196-k40": (lambda: _sample(E(B, N), K, mode="uniform"), ()),
    "sample-uniform-G64xN1568-k320": (lambda: _sample(E(B, T * N), T * K, mode="uniform"), ()),
    "sample-weighted-G512xN196-k40-offset-tensor": (
        lambda: _sample(E(B * T, N), K, offset=torch.tensor(3)), ()),
    "sample-weighted-odd-G3xN7-k3-strided-fp32": (lambda: _sample(E(N, 3).t()[:, :7], 3), ()),
    "sample-uniform-odd-G5xN33-k1": (lambda: _sample(E(5, 33), 1, mode="uniform"), ()),
    "sample-topk-G512xN196-k40-bf16": (lambda: _sample(E(B * T, N, dtype=bf16), K, mode="topk"), ()),
    # select_and_gather: cls attention [B*T, N] (fp32) and the teacher's rows [B*T, N, C]
    "select_and_gather-G512xN196xC1024-k40-bf16": (lambda: _select_and_gather(E(B * T, N), E(B * T, N, C, dtype=bf16), K), ()),
    "select_and_gather-G512xN196xC1024-k40-fp32": (lambda: _select_and_gather(E(B * T, N), E(B * T, N, C), K), ()),
    # the teacher's use: the rows of its 6 tapped layers side by side, C = 6 x 1024
    "select_and_gather-G512xN196xC6144-k40-bf16": (lambda: _select_and_gather(E(B * T, N), E(B * T, N, 6 * C, dtype=bf16), K), ()),
    "select_and_gather-G512xN196xC1024-k40-offset-tensor": (
        lambda: _select_and_gather(E(B * T, N), E(B * T, N, C, dtype=bf16), K, offset=torch.tensor(3)), ()),
    "select_and_gather-odd-G3xN7xC5-k3-strided-fp32": (
        lambda: _select_and_gather(E(3, 7, dtype=bf16), E(3, 5, 7).transpose(1, 2), 3), ()),
    # cls_attention: one query over the 1 + N tokens of each frame
    "cls_attention-G512xH16xN197xD64-bf16": (lambda: _cls_attention(B * T, H, N + 1, D, bf16), ()),
    "cls_attention-G512xH16xN197xD64-fp32": (lambda: _cls_attention(B * T, H, N + 1, D, fp32), ()),
    "cls_attention-odd-G3xH2xN7xD5-fp32": (lambda: _cls_attention(3, 2, 7, 5, fp32), ()),
    # gather_rows: the teacher's targets, [B, T*N, C] rows at the T*k visible tokens
    "gather_rows-G64xN1568xC1024-k320-bf16": (lambda: _gather_rows(E(B, T * N, C, dtype=bf16), T * K), ()),
    "gather_rows-G64xN1568xC1024-k320-fp32": (lambda: _gather_rows(E(B, T * N, C), T * K), ()),
    "gather_rows-odd-G3xN7xC5-k3-unaligned-fp16": (lambda: _gather_rows(E(3, 7, 6, dtype=torch.float16)[:, :, 1:], 3), ()),
    # gather_patches: [B, 3, T, 224, 224] video, 16 x 16 patches
    "gather_patches-B64xT8x224x224-k320-p16-bf16": (lambda: _gather_patches(E(B, 3, T, 224, 224, dtype=bf16), T * K, 16), ()),
    "gather_patches-B64xT8x224x224-k320-p16-fp32": (lambda: _gather_patches(E(B, 3, T, 224, 224), T * K, 16), ()),
    "gather_patches-B64xT8x224x224-k320-p16-uint8": (
        lambda: _gather_patches(E(B, 3, T, 224, 224, dtype=torch.uint8), T * K, 16), ()),
    "gather_patches-odd-B2xC1xT3x8x12-k5-p4-fp32": (lambda: _gather_patches(E(2, 1, 3, 8, 12), 5, 4), ()),
    # alignment_loss: [layers, B, T*k, C] student and teacher
    "alignment_loss-6x64x320x1024-bf16": (lambda: _loss((6, B, T * K, C), bf16), ()),
    "alignment_loss-6x64x320x1024-fp32": (lambda: _loss((6, B, T * K, C), fp32), ()),
    "alignment_loss-odd-2x3x5-fp32": (lambda: _loss((2, 3, 5), fp32), ()),
    "alignment_loss_backward-student-6x64x320x1024-bf16": (lambda: _loss_backward((6, B, T * K, C), bf16, True, False), ()),
    "alignment_loss_backward-both-6x64x320x1024-fp32": (lambda: _loss_backward((6, B, T * K, C), fp32, True, True), ()),
    "alignment_loss_backward-teacher-odd-2x3x5-bf16": (lambda: _loss_backward((2, 3, 5), bf16, False, True), ()),
}


# ------------------------------------------------------------------------------- the worker


def _resource_usage(cubin: bytes, tool: str | None) -> dict:
    """Registers, local memory (spills) and stack per thread, from cuobjdump."""
    if tool is None:
        return {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True).stdout
    return {key.lower(): int(value) for key, value in re.findall(r"\b(REG|LOCAL|STACK):(\d+)", out)}


def _compile(fn, launch: dict, target, with_cubin: bool) -> dict:
    """Runs triton.compile's stages one by one, so a failure names the stage that failed."""
    from triton._C.libtriton import ir
    from triton.compiler.compiler import ASTSource, make_backend

    backend = make_backend(target)
    options = backend.parse_options({key: launch[key] for key in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion")})
    src = ASTSource(fn, launch["signature"], launch["constants"], launch["configs"][0])
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    stage, done, start = "ttir", [], time.perf_counter()
    try:
        ir_args = (options, backend.get_codegen_implementation(options), backend.get_module_map(), context)
        with_target = "target" in inspect.signature(src.make_ir).parameters  # from triton 3.5
        module = src.make_ir(target, *ir_args) if with_target else src.make_ir(*ir_args)
        stages: dict = {}
        backend.add_stages(stages, options, src.language)
        metadata = {"target": target, **options.__dict__}
        outputs = {}
        for stage, run_stage in stages.items():
            if stage == "cubin" and not with_cubin:
                break
            module = outputs[stage] = run_stage(module, metadata)
            done.append(stage)
    except Exception as error:  # noqa: BLE001 - reported to the test with the stage it came from
        return {"ok": False, "stage": stage, "error": f"{type(error).__name__}: {error}\n{error.__cause__ or ''}"}
    return {
        "ok": True,
        "stages": done,
        "seconds": time.perf_counter() - start,
        "shared": metadata["shared"],
        "num_warps": options.num_warps,
        "ptx_target": re.findall(r"^\.target\s+(\w+)", outputs["ptx"], re.M),
        "ptx_entries": re.findall(r"\.entry\s+(\w+)", outputs["ptx"]),
        "vector_loads": len(re.findall(r"\bld\.global(?:\.\w+)*\.v4\.", outputs["ptx"])),
        "vector_stores": len(re.findall(r"\bst\.global(?:\.\w+)*\.v4\.", outputs["ptx"])),
        "cubin": outputs.get("cubin"),
    }


def worker(arch: int, out) -> None:
    """Compiles every case for sm_<arch>, one JSON line per case written to ``out``."""
    try:
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton.runtime.driver import driver

        target = GPUTarget("cuda", arch, 32)
        make_backend(target)
    except Exception as error:  # noqa: BLE001
        print(json.dumps({"backend_error": f"{type(error).__name__}: {error}"}), file=out, flush=True)
        return
    try:
        with_cubin = subprocess.run([knobs.nvidia.ptxas.path, "--version"], capture_output=True).returncode == 0
    except Exception:  # noqa: BLE001 - no runnable ptxas: stop at PTX
        with_cubin = False
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cuobjdump = shutil.which("cuobjdump", path=str(bin_dir)) if with_cubin else None

    class TargetOnlyDriver:  # all the JIT asks of a driver before it compiles
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

        def get_current_target(self):
            return target

    launches = []

    def intercept(*, fn, compile, **_):
        launches.append((fn.jit_function, compile))
        return True  # handled: the JIT neither compiles nor launches

    import umt_kernels._backend

    driver.set_active(TargetOnlyDriver())
    knobs.runtime.jit_cache_hook = intercept
    umt_kernels._backend.INTERPRET = True  # lets the 'triton' backend accept CPU tensors
    umt_kernels.set_backend("triton")

    for case, (call, _) in CASES.items():
        launches.clear()
        try:
            call()
            assert len(launches) == 1, f"expected one kernel launch, got {len(launches)}"
        except Exception as error:  # noqa: BLE001
            result = {"ok": False, "stage": "launch", "error": f"{type(error).__name__}: {error}"}
        else:
            fn, launch = launches[0]
            result = _compile(fn, launch, target, with_cubin)
            result["kernel"] = fn.__name__
            result["signature"] = launch["signature"]
            cubin = result.pop("cubin", None)
            if cubin:
                result.update(cubin_bytes=len(cubin), **_resource_usage(cubin, cuobjdump))
        result["ptxas"] = with_cubin
        print(json.dumps({"case": case, **result}, default=str), file=out, flush=True)


# --------------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[int, dict[str, dict]]:
    """{arch: {case: result}}, one worker process per arch, run side by side."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {}
    for arch in ARCHS:
        folder = tmp_path_factory.mktemp(f"sm{arch}")
        with open(folder / "log", "w") as log:
            command = [sys.executable, __file__, str(arch), str(folder / "out")]
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs[arch] = (proc, folder)
    results = {}
    for arch, (proc, folder) in procs.items():
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out = folder / "out"
        lines = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
        if lines and "backend_error" in lines[0]:
            pytest.skip(f"the triton NVIDIA backend cannot be loaded: {lines[0]['backend_error']}")
        by_case = {line["case"]: line for line in lines}
        log = (folder / "log").read_text()[-4000:]
        for case in CASES:
            by_case.setdefault(case, {"ok": False, "stage": "worker", "error": f"the sm_{arch} worker died "
                                      f"(exit {proc.returncode}) before this case; its output ends:\n{log}"})
        results[arch] = by_case
    return results


@pytest.mark.parametrize("arch", ARCHS, ids=lambda arch: f"sm{arch}")
@pytest.mark.parametrize("case", [pytest.param(case, marks=marks, id=case) for case, (_, marks) in CASES.items()])
def test_kernel_compiles(compiled, case, arch):
    result = compiled[arch][case]
    if not result["ok"]:
        pytest.fail(f"{case} for sm_{arch} failed at {result['stage']}:\n{result['error']}", pytrace=False)
    assert result["stages"] == list(STAGES if result["ptxas"] else STAGES[:-1])
    assert result["ptx_target"] in ([f"sm_{arch}"], [f"sm_{arch}a"])
    assert result["ptx_entries"] == [result["kernel"]]
    assert result.get("cubin_bytes", 0) > 0 or not result["ptxas"]
    assert result["shared"] <= SHARED_LIMIT[arch], f"{result['shared']} bytes of shared memory"
    op = case.split("-")[0]
    if op in VECTORISED and "-odd-" not in case:
        for access in VECTORISED[op]:
            assert result[f"vector_{access}"] > 0, f"no 16-byte vector {access} in the PTX of {case}"
    if "reg" in result:  # cuobjdump ran: registers within a thread's 255, and no spills
        assert 0 < result["reg"] <= 255
        assert result["local"] == 0 and result["stack"] <= MAX_STACK, f"spills: {result}"


if __name__ == "__main__":  # the worker: python tests/test_kernels_compile.py ARCH OUT_FILE
    with open(sys.argv[2], "w") as results:
        worker(int(sys.argv[1]), results)
