"""The CUDA kernels on the CPU: csrc/cuda/ms_deform_attn_kernels.cuh, unchanged, compiled by g++ against HIP-CPU (a
header-only HIP runtime: one fiber per GPU thread, one TBB task per block, real atomics) through the mapping
header tests/hip_cpu/cuda_on_hip_cpu.h, launched by tests/hip_cpu/msda_emulated.cpp with the host code's grid and
block (num_blocks, kBlock of the same header), forward and backward against the float64 reference.

What this proves and what only a GPU shows: README, "The CUDA kernels on the CPU". Needs HIP-CPU (PEFT_D2_HIP_CPU=its
checkout; .ci/run sets it), TBB (libtbb-dev) and g++ >= 11; skipped with the reason otherwise, failed instead
where PEFT_D2_REQUIRE_HIP_CPU=1 (CI). PEFT_D2_EMULATION_BUILD=warp16|warp64 runs the whole module against one of
the deliberately broken builds, which must fail it. Binaries are cached in build/hip_cpu/, keyed by the hash of
every source that goes into them.
"""

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from peft_d2.ops.reference import ms_deform_attn_reference

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "csrc" / "cuda" / "ms_deform_attn_kernels.cuh"
SOURCES = [
    KERNELS,
    ROOT / "csrc" / "ms_deform_attn_sampling.h",
    ROOT / "tests" / "hip_cpu" / "cuda_on_hip_cpu.h",
    ROOT / "tests" / "hip_cpu" / "msda_emulated.cpp",
]
BUILD_DIR = ROOT / "build" / "hip_cpu"
HIP_CPU_VAR, REQUIRE_VAR, BUILD_VAR = "PEFT_D2_HIP_CPU", "PEFT_D2_REQUIRE_HIP_CPU", "PEFT_D2_EMULATION_BUILD"
CXX = os.environ.get("CXX", "g++")
FLAGS = ["-std=c++20", "-O1", "-DNDEBUG"]  # -O1: a third less compile time than -O2; the cases are small

# The two broken builds: a warp reduction over 16 lanes (the kernels' own loop, mutated in a copy), HIP-CPU's
# stock 64-wide warps.
REDUCTION = "for (int o = kWarp / 2; o > 0; o >>= 1)"
BROKEN = {"warp16": REDUCTION.replace("kWarp / 2", "kWarp / 4"), "warp64": None}
WARP_SIZE_64, WARP_SIZE_32 = "warpSize{64}", "warpSize{32}"


def _missing():
    """Why the emulation cannot be built here (what is missing and how to get it), or None."""
    hip = os.environ.get(HIP_CPU_VAR)
    if not hip:
        return (
            f"HIP-CPU not found: set {HIP_CPU_VAR} to a checkout of https://github.com/ROCm/HIP-CPU "
            "(header-only; in CI, .ci/run sets it)"
        )
    if not (Path(hip) / "include" / "hip" / "hip_runtime.h").is_file():
        return f"{HIP_CPU_VAR}={hip} holds no include/hip/hip_runtime.h (a HIP-CPU checkout is expected)"
    if shutil.which(CXX) is None:
        return f"no C++ compiler {CXX!r} (g++ >= 11 is needed: apt-get install g++)"
    version = subprocess.run([CXX, "-dumpfullversion", "-dumpversion"], capture_output=True, text=True).stdout
    if not version or int(version.split(".")[0]) < 11:
        return f"{CXX} {version.strip() or '?'} is too old: HIP-CPU needs g++ >= 11 (C++17 parallel algorithms)"
    probe = subprocess.run(
        [CXX, "-E", "-x", "c++", "-"], input="#include <tbb/version.h>\n", capture_output=True, text=True
    )
    if probe.returncode != 0:
        return "TBB not found (HIP-CPU runs blocks as TBB tasks): apt-get install libtbb-dev"
    return None


@pytest.fixture(scope="module")
def hip_cpu():
    reason = _missing()
    if reason:
        if os.environ.get(REQUIRE_VAR) == "1":
            pytest.fail(f"{REQUIRE_VAR}=1 but {reason}")
        pytest.skip(reason)


def _hip_headers(hip):
    return sorted(p for p in Path(hip).rglob("*") if p.suffix in (".h", ".hpp", ".inl") and ".git" not in p.parts)


def _key(variant, flags, hip):
    h = hashlib.sha256(f"{variant} {BROKEN.get(variant)} {flags} {torch.__version__}".encode())
    h.update(subprocess.run([CXX, "--version"], capture_output=True).stdout)
    for p in SOURCES + _hip_headers(hip):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build(variant="cuda", f64_only=False):
    """The emulator binary: "cuda" (CUDA's 32-lane warps) or a broken build of BROKEN, with every dtype or float64
    alone (half the build time). Cached by the hash of its sources."""
    hip = Path(os.environ[HIP_CPU_VAR]).resolve()
    name, flags = (f"{variant}-f64", [*FLAGS, "-DMSDA_EMULATED_F64_ONLY"]) if f64_only else (variant, FLAGS)
    out = BUILD_DIR / f"{name}-{_key(variant, flags, hip)}"
    exe = out / "msda_emulated"
    if exe.is_file():
        return exe
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with open(BUILD_DIR / f".lock-{name}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist workers wait for one build
        if exe.is_file():
            return exe
        for stale in BUILD_DIR.glob(f"{name}-" + "?" * 16):
            shutil.rmtree(stale)
        out.mkdir()
        includes = []
        if variant != "warp64":  # a private copy with CUDA's warp size (the vendored HIP-CPU stays untouched)
            shutil.copytree(hip, out / "hip-cpu", ignore=shutil.ignore_patterns(".git"))
            constants = out / "hip-cpu" / "include" / "hip" / "hip_constants.h"
            text = constants.read_text()
            assert text.count(WARP_SIZE_64) == 1, f"{constants}: expected one {WARP_SIZE_64} to patch"
            constants.write_text(text.replace(WARP_SIZE_64, WARP_SIZE_32))
            hip = out / "hip-cpu"
        if variant == "warp16":  # the kernels with their reduction cut to 16 lanes, found first on the path
            text = KERNELS.read_text()
            assert text.count(REDUCTION) == 1, f"{KERNELS}: the warp reduction {REDUCTION!r} changed; update BROKEN"
            (out / "mutated" / "cuda").mkdir(parents=True)
            (out / "mutated" / "cuda" / KERNELS.name).write_text(text.replace(REDUCTION, BROKEN["warp16"]))
            includes.append(out / "mutated")
        includes += [ROOT / "csrc", ROOT / "tests" / "hip_cpu"]
        system = [hip / "include", Path(torch.__file__).parent / "include"]  # third-party headers
        cmd = [CXX, *flags, *(f"-I{p}" for p in includes), *(f"-isystem{p}" for p in system), str(SOURCES[-1])]
        cmd += ["-o", str(exe) + ".tmp", "-ltbb"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"building the emulated kernels failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}"
        os.replace(str(exe) + ".tmp", exe)
    return exe


@pytest.fixture(scope="module")
def emulator(hip_cpu):
    return build(os.environ.get(BUILD_VAR, "cuda"))


# ---------------------------------------------------------------- cases

# Every case runs in every dtype. Between them: D not a multiple of 32 and D + R > 32 (a second pass of the
# lanes), R = 0 and R > 0, one to four levels (non-square, 1x1), locations outside [0, 1] (zero padding),
# N * Q * H not a multiple of the 8 warps of a block, and many warps adding into the same rows at once.
CASES = {
    "four-levels": dict(levels=[(7, 5), (4, 3), (2, 2), (1, 1)], N=2, H=3, D=24, R=0, Q=9, P=3),  # 54 warps
    "lora": dict(levels=[(6, 4), (3, 2), (1, 3)], N=1, H=2, D=40, R=5, Q=7, P=2),  # 14 warps
    "one-level": dict(levels=[(5, 9)], N=1, H=1, D=5, R=3, Q=4, P=1),  # 4 warps: one block, half idle
    # every sample inside one 2x2 cell (one row of corners on the 1x2 level): 512 warps in 64 blocks, run as TBB
    # tasks on every core, all adding into the same few rows
    "contention": dict(levels=[(2, 2), (1, 2)], N=1, H=2, D=8, R=2, Q=256, P=4, cell=(0.3, 0.45)),
}
DTYPES = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# (value dtype, geometry dtype): the host code's dispatch, float32 geometry under half values included
DTYPE_PAIRS = [("f64", "f64"), ("f32", "f32"), ("f16", "f16"), ("bf16", "bf16"), ("f16", "f32"), ("bf16", "f32")]
# relative to the largest reference magnitude; the inputs are the same (rounded) numbers on both sides, so this
# is the kernels' own float32 accumulation and final rounding, and atomics' order in float64
TOL = {"f64": 1e-12, "f32": 1e-5, "f16": 2e-3, "bf16": 1e-2}
OUTPUTS = ("out", "zs", "grad_value", "grad_z", "grad_loc", "grad_attn")


def make_inputs(levels, N, H, D, R, Q, P, vt="f64", gt="f64", cell=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(levels, dtype=torch.long)
    sizes = ss.prod(1)
    lsi = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S, L = int(sizes.sum()), len(levels)
    lo, hi = cell or (-0.2, 1.2)

    def rand(*shape, scale=1.0, shift=0.0):
        return torch.rand(*shape, generator=g, dtype=torch.float64) * scale + shift

    v, geo = DTYPES[vt], DTYPES[gt]
    return {
        "value": torch.randn(N, S, H, D, generator=g, dtype=torch.float64).to(v),
        "z": torch.randn(N, S, R, generator=g, dtype=torch.float64).to(v),
        "ss": ss,
        "lsi": lsi,
        "loc": rand(N, Q, H, L, P, 2, scale=hi - lo, shift=lo).to(geo),
        "attn": rand(N, Q, H, L, P, scale=1.5, shift=-0.25).to(geo),  # not summing to one, some < 0
        "grad_out": torch.randn(N, Q, H * D, generator=g, dtype=torch.float64).to(v),
        "grad_zs": torch.randn(N, Q, H, R, generator=g, dtype=torch.float64).to(v),
    }


def run_emulated(exe, inputs, tmp_path, what=None):
    """Runs the kernels on `inputs`; returns the outputs as the host code returns them (its final casts)."""
    N, S, H, D = inputs["value"].shape
    _, Q, _, L, P, _ = inputs["loc"].shape
    R = inputs["z"].shape[2]
    names = {v: k for k, v in DTYPES.items()}
    vt, gt = inputs["value"].dtype, inputs["loc"].dtype
    (tmp_path / "meta").write_text(f"{names[vt]} {names[gt]} {N} {S} {H} {D} {R} {Q} {L} {P}\n")
    for k, t in inputs.items():
        t.contiguous().view(torch.uint8).numpy().tofile(tmp_path / f"{k}.bin")
    res = subprocess.run([str(exe), str(tmp_path), *([what] if what else [])], capture_output=True, text=True)
    if what:
        return res
    assert res.returncode == 0, f"the emulated kernels failed ({res.returncode}):\n{res.stderr[-4000:]}"

    def read(name, dtype, shape):
        data = bytearray((tmp_path / f"{name}.bin").read_bytes())
        return torch.frombuffer(data, dtype=dtype).view(shape) if data else torch.empty(shape, dtype=dtype)

    acc = torch.float64 if vt == torch.float64 else torch.float32  # at::opmath_type
    return {
        "out": read("out", vt, (N, Q, H * D)),
        "zs": read("zs", vt, (N, Q, H, R)),
        "grad_value": read("grad_value", acc, (N, S, H, D)).to(vt),
        "grad_z": read("grad_z", acc, (N, S, R)).to(vt),
        "grad_loc": read("grad_loc", acc, (N, Q, H, L, P, 2)).to(gt),
        "grad_attn": read("grad_attn", acc, (N, Q, H, L, P)).to(gt),
    }


def reference(inputs):
    """out, zs (z sampled per head) and the four gradients of <out, grad_out> + <zs, grad_zs>, in float64."""
    x = {k: inputs[k].double().requires_grad_() for k in ("value", "z", "loc", "attn")}
    N, S, H, _ = x["value"].shape
    R = x["z"].shape[2]
    geo = (inputs["ss"], inputs["lsi"], x["loc"], x["attn"])
    out = ms_deform_attn_reference(x["value"], *geo)
    loss = (out * inputs["grad_out"].double()).sum()
    zs = out.new_zeros(N, out.shape[1], H, R)
    if R:
        zs = ms_deform_attn_reference(x["z"][:, :, None].expand(N, S, H, R), *geo).view(N, -1, H, R)
        loss = loss + (zs * inputs["grad_zs"].double()).sum()
    grads = torch.autograd.grad(loss, list(x.values()), allow_unused=True)
    ref = {"out": out, "zs": zs}
    for k, gk in zip(x, grads):
        ref[f"grad_{k}"] = torch.zeros_like(x[k]) if gk is None else gk
    return {k: v.detach() for k, v in ref.items()}


def compare(got, ref, tol):
    """Relative error (max |got - ref| / max |ref|) of every output; the ones above tol."""
    errors = {}
    for k in OUTPUTS:
        assert got[k].shape == ref[k].shape, f"{k}: shape {tuple(got[k].shape)} != {tuple(ref[k].shape)}"
        if ref[k].numel():
            d = (got[k].double() - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30)
            errors[k] = float(d) if torch.isfinite(d) else float("inf")
    return errors, {k: e for k, e in errors.items() if not e <= tol}


def check_case(exe, case, vt, gt, tmp_path):
    inputs = make_inputs(**CASES[case], vt=vt, gt=gt)
    return compare(run_emulated(exe, inputs, tmp_path), reference(inputs), TOL[vt])


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("vt,gt", DTYPE_PAIRS, ids=[f"{v}-{g}" for v, g in DTYPE_PAIRS])
@pytest.mark.parametrize("case", list(CASES))
def test_emulated_kernels_match_reference(emulator, case, vt, gt, tmp_path):
    errors, failed = check_case(emulator, case, vt, gt, tmp_path)
    print(f"{case} {vt}/{gt}: " + ", ".join(f"{k} {e:.1e}" for k, e in errors.items()))
    assert not failed, f"{case} {vt} values, {gt} geometry: above {TOL[vt]:.0e}: {failed} (all: {errors})"


@pytest.mark.parametrize("what", ["forward", "backward"])
def test_level_past_S_fires_the_kernel_assert(emulator, what, tmp_path):
    inputs = make_inputs(levels=[(3, 3), (2, 2)], N=1, H=2, D=4, R=2, Q=3, P=2)
    inputs["value"], inputs["z"] = inputs["value"][:, :12], inputs["z"][:, :12]  # S = 12, the levels need 13
    res = run_emulated(emulator, inputs, tmp_path, what)
    assert res.returncode != 0, f"{what}: a level running past S went through:\n{res.stdout}{res.stderr}"
    assert re.search(
        r"block: \[\d+,0,0\], thread: \[\d+,0,0\] Assertion `.*start \+ Hl \* Wl <= d\.S` failed", res.stderr
    ), res.stderr


@pytest.mark.parametrize("variant", list(BROKEN))
def test_a_broken_build_is_caught(hip_cpu, variant, tmp_path):
    """The comparison above must fail on the kernels with a 16-lane reduction and on 64-wide warps: both break the
    warp sums of the location and weight gradients, and only those."""
    errors, failed = check_case(build(variant, f64_only=True), "four-levels", "f64", "f64", tmp_path)
    print(f"{variant}: " + ", ".join(f"{k} {e:.1e}" for k, e in errors.items()))
    assert set(failed) == {"grad_loc", "grad_attn"}, (
        f"{variant}: expected a mismatch of grad_loc and grad_attn only, got {failed} (all: {errors})"
    )


def test_device_code_lives_in_the_emulated_header():
    """The emulation compiles ms_deform_attn_kernels.cuh: a kernel written straight into a .cu would escape it."""
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        text = re.sub(r"//[^\n]*", "", cu.read_text())
        assert not re.search(r"__(global|device)__", text), f"{cu.name} defines device code; move it to {KERNELS.name}"
