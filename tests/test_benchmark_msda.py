"""tools/benchmark_msda.py's pieces that the GPU check and the fused/unfused rule rely on, on a tiny CPU shape."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import benchmark_msda as bench  # noqa: E402


@pytest.fixture
def tiny():
    return bench.make_shape("tiny", 1, 64, heads=2, head_dim=8, points=2, rank=4, queries=12)


def test_unfused_and_fused_agree_with_the_reference(tiny):
    x = bench.make_inputs(tiny, "cpu", torch.float64)
    ref = bench.run_method("reference", x)
    for m in ("unfused", "fused"):
        torch.testing.assert_close(bench.run_method(m, x), ref, rtol=1e-10, atol=1e-12)


def test_head_to_head_and_auto_summary(tiny, monkeypatch):
    best = bench.head_to_head(tiny, "cpu", torch.float32, repeats=2)
    assert set(best) == {"unfused", "fused"} and all(0 < t < 60 for t in best.values())
    monkeypatch.delenv("PEFT_D2_MSDA_FUSED", raising=False)
    line = bench.auto_summary(tiny, "cpu", torch.float32, repeats=1)
    assert line.startswith("auto picks fused (auto: Q/S = 0.143 <= 0.2 on cpu); head to head")
    assert "is faster (" in line
    monkeypatch.setenv("PEFT_D2_MSDA_FUSED", "0")
    assert bench.auto_summary(tiny, "cpu", torch.float32, repeats=1).startswith("auto picks unfused (PEFT_D2")


def test_min_bytes_counts_inputs_and_outputs(tiny):
    N, S, Q, H, D, P, r, L = 1, tiny["S"], 12, 2, 8, 2, 4, 3
    plain = (N * S * H * D + N * Q * H * L * P * 3 + N * Q * H * D) * 4
    assert bench.min_bytes("plain", tiny, torch.float32, fwdbwd=False) == plain
    assert bench.min_bytes("fused", tiny, torch.float32, fwdbwd=False) == plain + (N * S * r + H * D * r) * 4
    assert bench.min_bytes("plain", tiny, torch.bfloat16, fwdbwd=True) == plain  # half the bytes, twice the passes


def test_shapes_the_gpu_check_names():
    big, dec = bench.shapes_for("cuda", False, ["m2f", "decoder"])
    assert big["levels"] == [(128, 128), (64, 64), (32, 32)] and big["Q"] == big["S"] == 21504
    assert (big["N"], big["H"], big["D"], big["P"], big["r"]) == (2, 8, 32, 4, 8)
    assert dec["S"] == 21504 and dec["Q"] == 300
    (cpu_big,) = bench.shapes_for("cpu", False, ["m2f"])
    assert cpu_big["S"] == 5376
