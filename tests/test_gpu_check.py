"""tools/gpu_check.py without a GPU: argument handling, the wheel install into a temporary target, the plan of
each stage and its skip reasons, the results file and the exit status."""

import base64
import hashlib
import os
import re
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check  # noqa: E402

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


def make_wheel(folder, name="peft_d2_probe_pkg", version="0.1"):
    """A minimal pure-Python wheel: one module with VALUE = 42, its METADATA, WHEEL and RECORD."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": "VALUE = 42\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test_gpu_check\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
    path = Path(folder) / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name_, text in files.items():
            z.writestr(name_, text)
    return path


def read_results(path):
    text = Path(path).read_text()
    rows = dict(re.findall(r"^\| (\w+) \| (\w+) \| \d+ \| .*\|$", text, re.M))
    return text, rows


@no_cuda
def test_dry_run_installs_wheels_into_a_temporary_target_and_skips_every_gpu_stage(tmp_path, monkeypatch, capsys):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels)
    # the import check reaches the wheel's module only through the temporary target on the stages' path
    monkeypatch.setattr(gpu_check, "REQUIRED_MODULES", gpu_check.REQUIRED_MODULES + ("peft_d2_probe_pkg",))
    out = tmp_path / "results.md"
    assert gpu_check.main(["--dry-run", "--wheels", str(wheels), "--out", str(out)]) == 0
    text, rows = read_results(out)
    assert rows.pop("wheels") == "ok"
    assert set(rows) == set(gpu_check.STAGES[1:]) and set(rows.values()) == {"skipped"}
    assert text.count("no usable CUDA: torch") >= len(rows)  # the reason, stage by stage
    for needle in ("- date: ", f"- torch: {torch.__version__}", "- command: `python tools/gpu_check.py --dry-run",
                   "- dry run: yes", "peft_d2_probe_pkg-0.1"):
        assert needle in text
    # the target was temporary and the interpreter's own packages are untouched
    target = re.search(r"--target (\S+)", text).group(1)
    assert not os.path.exists(target)
    with pytest.raises(ImportError):
        __import__("peft_d2_probe_pkg")
    printed = capsys.readouterr().out
    assert "[build] skipped: no usable CUDA" in printed and "not run: " in printed


@no_cuda
def test_run_without_cuda_exits_nonzero(tmp_path):
    out = tmp_path / "results.md"
    assert gpu_check.main(["--stages", "tests", "bench", "--out", str(out)]) == 2
    _, rows = read_results(out)
    assert rows == {"tests": "skipped", "bench": "skipped"}


def test_broken_wheel_fails_the_check(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip file")
    out = tmp_path / "results.md"
    assert gpu_check.main(["--dry-run", "--stages", "wheels", "--wheels", str(wheels), "--out", str(out)]) == 1
    text, rows = read_results(out)
    assert rows == {"wheels": "failed"} and "pip install --no-index --no-deps" in text


def test_missing_modules_fail_the_wheels_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "REQUIRED_MODULES", ("torch", "no_such_module_xyz"))
    out = tmp_path / "results.md"
    assert gpu_check.main(["--dry-run", "--stages", "wheels", "--out", str(out)]) == 1
    text, rows = read_results(out)
    assert rows == {"wheels": "failed"} and "missing for the stages: no_such_module_xyz (ModuleNotFoundError" in text


def test_plan_with_a_device(tmp_path, monkeypatch, capsys):
    """What each stage would run on a GPU machine (sm 9.0, every tool present)."""
    monkeypatch.setattr(gpu_check, "probe_cuda", lambda python, env: (None, "9.0"))
    monkeypatch.setattr(gpu_check, "_find_tool", lambda name, env: f"/opt/cuda/bin/{name}")
    out = tmp_path / "results.md"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--train-methods", "lora_msdeformattn"]) == 0
    text, rows = read_results(out)
    assert rows.pop("wheels") == "ok" and set(rows.values()) == {"planned"}
    assert "FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 " in text and "setup.py build_ext --inplace" in text
    assert "-m pytest -q -p no:cacheprovider -m gpu tests/test_ms_deform_attn.py" in text
    for tool in ("memcheck", "racecheck"):
        sanitizer = f"PYTORCH_NO_CUDA_MEMORY_CACHING=1 /opt/cuda/bin/compute-sanitizer --tool {tool} --error-exitcode 1"
        assert sanitizer in text
    for dtype in ("float32", "bfloat16"):
        assert f"benchmark_msda.py --device cuda --shapes m2f decoder --dtype {dtype}" in text
    serve, each = re.findall(r"benchmark_multi_adapter.py .*", text)
    assert f"--device cuda --base {gpu_check.SWIN_B} --peft-dir configs/coco/peft" in serve and "--k 1 4 16" in serve
    assert each.endswith("--each --k 1 4 --methods lora_backbone adapters_1 mona lora_dora lora_conv"), each
    assert "-m gpu" in text and "tests/test_multi_adapter.py" in text
    train = re.search(r"benchmark_train.py .*", text).group(0)
    assert "--amp" in train and "--size 1024 --batch 2" in train and "--methods lora_msdeformattn" in train
    # the files the plan names exist
    assert (ROOT / gpu_check.SWIN_B).is_file() and (ROOT / "configs/coco/peft/lora_msdeformattn.yaml").is_file()
    assert all((ROOT / f"configs/coco/peft/{m}.yaml").is_file() for m in gpu_check.SERVED)
    assert "would run: " in capsys.readouterr().out


def test_missing_tools_skip_with_their_names(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "probe_cuda", lambda python, env: (None, "8.0"))
    monkeypatch.setattr(gpu_check, "_find_tool", lambda name, env: None)
    out = tmp_path / "results.md"
    assert gpu_check.main(["--dry-run", "--stages", "build", "memcheck", "--out", str(out), "--arch", "9.0a"]) == 0
    text, rows = read_results(out)
    assert rows == {"build": "skipped", "memcheck": "skipped"}
    assert "nvcc and ninja not found" in text and "compute-sanitizer not found" in text
    assert "TORCH_CUDA_ARCH_LIST=9.0a" in text  # --arch wins over the device's


def test_a_failed_build_skips_the_stages_after_it(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "probe_cuda", lambda python, env: (None, "9.0"))
    monkeypatch.setattr(gpu_check, "_find_tool", lambda name, env: f"/opt/cuda/bin/{name}")
    monkeypatch.setattr(gpu_check, "BUILD_CHECK", "raise SystemExit(3)")
    monkeypatch.setattr(
        gpu_check, "plan",
        lambda ctx, stage, real=gpu_check.plan: (None, [([ctx.python, "-c", gpu_check.BUILD_CHECK], {})])
        if stage == "build" else real(ctx, stage),
    )
    out = tmp_path / "results.md"
    assert gpu_check.main(["--stages", "build", "tests", "--out", str(out)]) == 1
    text, rows = read_results(out)
    assert rows == {"build": "failed", "tests": "skipped"}
    assert "the build stage failed" in text and "[exit 3]" in text


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--wheels", "/no/such/folder"], "--wheels /no/such/folder: no such folder"),
        (["--wheels", "EMPTY"], "holds no .whl files"),
        (["--arch", "sm_90"], "--arch 'sm_90': expected a compute capability"),
        (["--stages", "deploy"], "invalid choice: 'deploy'"),
        (["--train-batch", "0"], "must be positive"),
        (["--python", "/no/such/python"], "--python /no/such/python: not an executable interpreter"),
    ],
)
def test_bad_arguments_are_named(tmp_path, capsys, argv, message):
    argv = [str(tmp_path) if a == "EMPTY" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        gpu_check.main(argv + ["--out", str(tmp_path / "results.md")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.md").exists()


def test_gpu_tests_exist_for_the_operator():
    files = gpu_check.gpu_test_files()
    assert "tests/test_ms_deform_attn.py" in files
    source = (ROOT / "tests/test_ms_deform_attn.py").read_text()
    assert source.count("@pytest.mark.gpu") >= 5
