"""One-command check of the CUDA side of peft_d2 on a GPU machine; writes one results file.

Run from the repository root on a machine with Python, a CUDA build of torch, nvcc and ninja. Other
dependencies (detectron2's pure-Python redistribution, fvcore, iopath, pycocotools, ...) come as wheels in a
folder (--wheels) and are installed into a temporary target, put on PYTHONPATH of the stages and removed at
the end: nothing is installed into the system. Stages, in order:

  wheels     pip install --no-index --no-deps --target TMP  every *.whl of --wheels
  build      peft_d2._C with CUDA for the device's architecture, in place, against the torch found
  tests      pytest -m gpu (float32 to 1e-5, half types to 1e-2 against the float64 reference, fused and
             multi-adapter forms, gradients; a mixed batch of adapters served from one Mask2Former)
  memcheck   the operator's gpu tests under compute-sanitizer --tool memcheck  (where compute-sanitizer exists)
  racecheck  the same under --tool racecheck
  bench      tools/benchmark_msda.py at the Mask2Former shape and a decoder cross-attention shape, float32 and
             bfloat16: reference / unfused / fused / no-LoRA times, bandwidth against a device-to-device copy;
             tools/benchmark_multi_adapter.py on the Swin-B Mask2Former (16 images of 512 px, K = 1, 4, 16; then
             each of lora_backbone, adapters_1, mona, lora_dora, lora_conv alone, K = 1, 4)
  train      tools/benchmark_train.py: one training step of the Swin-B Mask2Former (COCO config, 1024 px,
             batch 2, AMP), full fine-tuning against the PEFT configs: step time and max_memory_allocated ratios

A stage that cannot run here is skipped with its reason (no CUDA, no nvcc, no compute-sanitizer, the build
failed). The exit status is non-zero when a stage failed, or when no CUDA device was found outside --dry-run.
--dry-run runs the wheel install (into a temporary target, removed afterwards) and prints, per stage, the
command it would run or why it would skip; CI runs it on CPU (tests/test_gpu_check.py).

    python tools/gpu_check.py --wheels ~/wheels         # everything; results in docs/gpu_check_results.md
    python tools/gpu_check.py --wheels ~/wheels --stages build tests
    python tools/gpu_check.py --dry-run --wheels ~/wheels         # the plan, on any machine
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("wheels", "build", "tests", "memcheck", "racecheck", "bench", "train")
SWIN_B = "configs/coco/instance-segmentation/swin/maskformer2_swin_base_IN21k_384_bs16_50ep.yaml"
OP_TESTS = "tests/test_ms_deform_attn.py"
SERVED = ("lora_backbone", "adapters_1", "mona", "lora_dora", "lora_conv")  # the bench stage's per-method serving rows
OUTPUT_LINES = 400  # per stage in the results file (the tail; benchmark tables are far shorter)


@dataclass
class Result:
    stage: str
    status: str  # ok | failed | skipped | planned
    reason: str = ""
    commands: list = field(default_factory=list)
    output: str = ""
    seconds: float = 0.0


@dataclass
class Context:
    args: argparse.Namespace
    python: str
    env: dict
    cuda: str | None  # why CUDA is unusable, or None
    arch: str | None  # e.g. "9.0"
    results: dict = field(default_factory=dict)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", help="folder of .whl files to install into a temporary target (no registry)")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "gpu_check_results.md"), help="the results file")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="stages to run")
    parser.add_argument("--dry-run", action="store_true", help="install the wheels, then only plan the other stages")
    parser.add_argument("--arch", help="TORCH_CUDA_ARCH_LIST for the build (default: the device's, e.g. 9.0)")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the stages (default: this one)")
    parser.add_argument("--train-methods", nargs="+", default=["all"], help="PEFT configs timed against full FT")
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per stage command")
    args = parser.parse_args(argv)
    if args.wheels is not None and not os.path.isdir(args.wheels):
        parser.error(f"--wheels {args.wheels}: no such folder (give the folder the wheels were downloaded into)")
    if args.wheels is not None and not _wheel_files(args.wheels):
        parser.error(f"--wheels {args.wheels}: the folder holds no .whl files")
    if args.arch is not None and not _valid_arch(args.arch):
        parser.error(f"--arch {args.arch!r}: expected a compute capability such as 8.0, 9.0 or 9.0a")
    if shutil.which(args.python) is None:
        parser.error(f"--python {args.python}: not an executable interpreter")
    if args.train_size <= 0 or args.train_batch <= 0 or args.timeout <= 0:
        parser.error("--train-size, --train-batch and --timeout must be positive")
    return args


def _valid_arch(arch):
    major, _, minor = arch.partition(".")
    return major.isdigit() and minor[:1].isdigit() and (minor[1:] in ("", "a", "f"))


def _wheel_files(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".whl"))


def probe_cuda(python, env):
    """(reason CUDA is unusable or None, the device's arch 'major.minor' or None), asked of the stages' torch."""
    code = (
        "import torch\n"
        "if torch.version.cuda is None: print('ERR torch ' + torch.__version__ + ' is a CPU-only build')\n"
        "elif not torch.cuda.is_available(): print('ERR torch ' + torch.__version__ + ' (CUDA ' + "
        "torch.version.cuda + '): torch.cuda.is_available() is False (no device or driver)')\n"
        "else: print('ARCH %d.%d' % torch.cuda.get_device_capability())\n"
    )
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    line = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode != 0 or not line:
        return f"could not import torch with {python}: {proc.stderr.strip()[-500:]}", None
    if line.startswith("ERR "):
        return line[4:], None
    return None, line.split()[1]


def run(ctx, result, cmd, env_extra=None):
    """Runs one command of a stage; True when it exited with 0. Its output goes to the result."""
    env = dict(ctx.env, **(env_extra or {}))
    print(f"  running: {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=ctx.args.timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        out, rc = out + f"\n[timed out after {e.timeout} s]", -1
    except OSError as e:
        out, rc = f"[could not start {cmd[0]}: {e}]", -1
    result.seconds += time.perf_counter() - t0
    result.output += f"$ {shlex.join(cmd)}\n{out.rstrip()}\n[exit {rc}]\n"
    if rc != 0:
        result.status = "failed"
        result.reason = result.reason or f"`{shlex.join(cmd)}` exited with {rc}"
    return rc == 0


# What the stages import besides torch; a GPU machine without a registry gets them as wheels (README "GPU check").
REQUIRED_MODULES = ("setuptools", "torchvision", "detectron2", "fvcore", "iopath", "pycocotools", "scipy",
                    "tabulate", "safetensors", "pytest")


def missing_modules(ctx, modules):
    """The modules the stages' interpreter cannot import (with the wheels' target on its path)."""
    code = (
        "import importlib, sys\n"
        "for m in sys.argv[1:]:\n"
        "    try: importlib.import_module(m)\n"
        "    except Exception as e: print(m, '(' + type(e).__name__ + ': ' + str(e)[:200] + ')')\n"
    )
    proc = subprocess.run([ctx.python, "-c", code, *modules], capture_output=True, text=True, env=ctx.env, cwd=ROOT)
    if proc.returncode != 0:
        return [f"(the import check itself failed: {proc.stderr.strip()[-300:]})"]
    return proc.stdout.strip().splitlines()


def stage_wheels(ctx, target):
    """pip install of every wheel in --wheels into `target` (real in --dry-run too: it writes nothing else), then
    the check that the stages' interpreter imports everything they need."""
    result = Result("wheels", "ok")
    if ctx.args.wheels:
        cmd = [ctx.python, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check",
               "--no-compile", "--target", target, *_wheel_files(ctx.args.wheels)]
        result.commands.append(shlex.join(cmd))
        if not run(ctx, result, cmd):
            return result
        installed = sorted(d[: -len(".dist-info")] for d in os.listdir(target) if d.endswith(".dist-info"))
        result.reason = f"{len(installed)} distributions into a temporary target: {', '.join(installed)}"
    else:
        result.reason = "no --wheels folder: the stages use what the interpreter has"
    missing = missing_modules(ctx, REQUIRED_MODULES)
    if missing:
        result.status = "failed"
        result.reason += f"; missing for the stages: {'; '.join(missing)} (README 'GPU check' lists the wheels)"
    return result


def _find_tool(name, env):
    found = shutil.which(name, path=env.get("PATH"))
    if found is None and env.get("CUDA_HOME"):
        candidate = os.path.join(env["CUDA_HOME"], "bin", name)
        found = candidate if os.access(candidate, os.X_OK) else None
    return found


def _pytest(ctx, *extra):
    return [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *extra]


def gpu_test_files():
    """The test files with tests marked gpu (collecting only them keeps the other tests' imports out)."""
    tests = os.path.join(ROOT, "tests")
    return sorted(
        f"tests/{f}"
        for f in os.listdir(tests)
        if f.startswith("test_") and f.endswith(".py") and "pytest.mark.gpu" in open(os.path.join(tests, f)).read()
    )


BUILD_CHECK = (
    "from peft_d2 import ops; info = ops.backend_info(); print(info); "
    "assert info['built_with_cuda'] and info['backend_for_cuda'] == 'cuda', 'the CUDA kernel is not in use'"
)


def plan(ctx, stage):
    """(why the stage cannot run here or None, [(command, extra environment)]) for a GPU stage."""
    why = f"no usable CUDA: {ctx.cuda}" if ctx.cuda else None
    if stage == "build":
        arch = ctx.args.arch or ctx.arch or "DEVICE_ARCH"
        missing = [t for t in ("nvcc", "ninja") if _find_tool(t, ctx.env) is None]
        if why is None and missing:
            why = f"{' and '.join(missing)} not found on PATH (nor under CUDA_HOME/bin)"
        return why, [
            ([ctx.python, "setup.py", "build_ext", "--inplace"], {"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch}),
            ([ctx.python, "-c", BUILD_CHECK], {}),
        ]
    if stage == "tests":
        return why, [(_pytest(ctx, *gpu_test_files()), {})]
    if stage in ("memcheck", "racecheck"):
        sanitizer = _find_tool("compute-sanitizer", ctx.env)
        if why is None and sanitizer is None:
            why = "compute-sanitizer not found on PATH (nor under CUDA_HOME/bin)"
        cmd = [sanitizer or "compute-sanitizer", "--tool", stage, "--error-exitcode", "1", *_pytest(ctx, OP_TESTS)]
        # without torch's caching allocator every tensor is its own allocation, so memcheck sees its bounds
        return why, [(cmd, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})]
    if stage == "bench":
        bench = [ctx.python, "tools/benchmark_msda.py", "--device", "cuda", "--shapes", "m2f", "decoder", "--dtype"]
        serve = [ctx.python, "tools/benchmark_multi_adapter.py", "--device", "cuda", "--base", SWIN_B, "--peft-dir",
                 "configs/coco/peft", "--size", "512", "--batch", "16", "--rounds", "5"]
        each = serve + ["--each", "--k", "1", "4", "--methods", *SERVED]
        return why, [(bench + ["float32"], {}), (bench + ["bfloat16"], {}), (serve + ["--k", "1", "4", "16"], {}),
                     (each, {})]
    if stage == "train":
        cmd = [ctx.python, "tools/benchmark_train.py", "--device", "cuda", "--amp", "--base", SWIN_B, "--peft-dir",
               "configs/coco/peft", "--size", str(ctx.args.train_size), "--batch", str(ctx.args.train_batch),
               "--steps", "1", "--rounds", "3", "--methods", *ctx.args.train_methods]
        return why, [(cmd, {})]
    raise ValueError(stage)


def run_stage(ctx, stage):
    why, commands = plan(ctx, stage)
    build = ctx.results.get("build")
    if why is None and stage != "build" and build is not None and build.status == "failed":
        why = "the build stage failed"
    result = Result(stage, "skipped" if why else ("planned" if ctx.args.dry_run else "ok"), why or "")
    for cmd, extra in commands:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in extra.items())
        result.commands.append(f"{prefix} {shlex.join(cmd)}".strip())
    if result.status == "ok":
        for cmd, extra in commands:
            if not run(ctx, result, cmd, extra):
                break
    return result


def header(ctx, argv):
    command = shlex.join(["python", "tools/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        "# peft_d2 GPU check",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}",
        f"- command: `{command}`",
        f"- host: {platform.node()} ({platform.platform()}), Python {platform.python_version()}",
    ]
    info = subprocess.run(
        [ctx.python, "-c", "import torch; print(torch.__version__, torch.version.cuda, "
         "torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"],
        capture_output=True, text=True, env=ctx.env, cwd=ROOT,
    )
    parts = info.stdout.split(maxsplit=2) if info.returncode == 0 else []
    if len(parts) == 3:
        lines += [f"- torch: {parts[0]} (CUDA {parts[1]})", f"- device: {parts[2].strip()}" +
                  (f" (sm {ctx.arch})" if ctx.arch else "")]
    else:
        lines.append(f"- torch: not importable by {ctx.python}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    lines.append(f"- commit: {commit.stdout.strip() or 'unknown'}")
    lines.append(f"- dry run: {'yes' if ctx.args.dry_run else 'no'}")
    return lines


def report(ctx, lines):
    lines += ["", "| stage | status | seconds | reason |", "|---|---|---|---|"]
    for r in ctx.results.values():
        lines.append(f"| {r.stage} | {r.status} | {r.seconds:.0f} | {r.reason.replace('|', '/')} |")
    for r in ctx.results.values():
        if not (r.commands or r.output):
            continue
        lines += ["", f"## {r.stage}: {r.status}", ""]
        lines += [f"    {c}" for c in r.commands]
        if r.output:
            tail = r.output.splitlines()[-OUTPUT_LINES:]
            lines += ["", "```", *tail, "```"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="peft_d2_gpu_check_") as target:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (target, ROOT, env.get("PYTHONPATH")) if p)
        env["PATH"] = os.pathsep.join(p for p in (os.path.join(target, "bin"), env.get("PATH")) if p)  # e.g. ninja
        env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
        ctx = Context(args, args.python, env, None, None)

        def record(result):
            ctx.results[result.stage] = result
            print(f"[{result.stage}] {result.status}{': ' + result.reason if result.reason else ''}", flush=True)
            for c in result.commands if result.status in ("planned", "skipped") else ():
                print(f"    {'would run' if result.status == 'planned' else 'not run'}: {c}")

        if "wheels" in args.stages:
            record(stage_wheels(ctx, target))
        ctx.cuda, ctx.arch = probe_cuda(args.python, env)
        for stage in STAGES[1:]:
            if stage in args.stages:
                record(run_stage(ctx, stage))
        text = report(ctx, header(ctx, argv))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    failed = [r.stage for r in ctx.results.values() if r.status == "failed"]
    print(f"results: {args.out}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    if ctx.cuda and not args.dry_run:
        print(f"nothing was checked on a GPU: {ctx.cuda} (--dry-run plans the stages without one)")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
