"""MSDeformAttn operator: compiled kernels (cpu; cuda under the gpu marker) against the grid_sample reference,
the fused LoRA form against the explicitly augmented value, custom-op registration, dispatch and fallback."""

import importlib.util
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

from peft_d2 import ops
from peft_d2.env import reference_dir
from peft_d2.ops import _extension

OFFICIAL_FUNC = Path(reference_dir()) / "mask2former/modeling/pixel_decoder/ops/functions/ms_deform_attn_func.py"
NO_EXT = os.environ.get("PEFT_D2_NO_EXT") == "1"


def _require_kernel(device_type):
    ok, reason = _extension.kernel_status(device_type)
    if not ok:
        if NO_EXT or device_type == "cuda":
            pytest.skip(f"no compiled {device_type} kernel: {reason}")
        pytest.fail(
            f"the compiled {device_type} kernel is missing ({reason}); build it with "
            "`python setup.py build_ext --inplace` (or set PEFT_D2_NO_EXT=1 to skip these tests)"
        )


@pytest.fixture
def cpu_kernel(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    _require_kernel("cpu")


@pytest.fixture
def cuda_kernel(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    _require_kernel("cuda")


def levels_tensors(levels, device="cpu"):
    spatial_shapes = torch.tensor(levels, dtype=torch.long, device=device)
    sizes = spatial_shapes.prod(1)
    return spatial_shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def make_case(levels, N=2, H=3, D=24, Q=7, P=3, r=4, dtype=torch.float64, device="cpu", lo=-0.2, hi=1.2):
    """Random inputs: locations in [lo, hi] (some outside the level), weights not summing to one (some < 0)."""
    spatial_shapes, level_start_index = levels_tensors(levels, device)
    S = int(spatial_shapes.prod(1).sum())
    L = len(levels)
    kw = {"dtype": dtype, "device": device}
    return {
        "value": torch.randn(N, S, H, D, **kw),
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": torch.rand(N, Q, H, L, P, 2, **kw) * (hi - lo) + lo,
        "attention_weights": torch.rand(N, Q, H, L, P, **kw) * 1.5 - 0.25,
        "z": torch.randn(N, S, r, **kw),
        "lora_B": torch.randn(H * D, r, **kw),
    }


GEOMETRY = ("spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")


def geo(case):
    return [case[k] for k in GEOMETRY]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_close_rel(a, b, tol, what=""):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = rel_err(a.double(), b.double())
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def grads(fn, case, names):
    inputs = {k: v.detach().clone().requires_grad_(k in names) if torch.is_tensor(v) else v for k, v in case.items()}
    out = fn(inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(
        out.device, out.dtype
    )
    return out.detach(), dict(zip(names, torch.autograd.grad(out, [inputs[k] for k in names], g)))


def plain_fn(impl):
    return lambda c: impl(c["value"], *geo(c))


def lora_fn(impl, scaling=0.5):
    return lambda c: impl(c["value"], c["z"], c["lora_B"], scaling, *geo(c))


PLAIN_GRADS = ("value", "sampling_locations", "attention_weights")
LORA_GRADS = ("value", "z", "lora_B", "sampling_locations", "attention_weights")

CONFIGS = {
    # odd everything: H=3, L=5, P=3, D=24, a 1x1 level and non-square levels
    "odd": {"levels": [(7, 5), (4, 3), (2, 2), (1, 1), (3, 1)], "H": 3, "D": 24, "P": 3, "Q": 9},
    "m2f-like": {"levels": [(8, 8), (4, 4), (2, 2)], "H": 8, "D": 32, "P": 4, "Q": 20, "N": 1},
    "one-level": {"levels": [(5, 9)], "H": 1, "D": 5, "P": 1, "Q": 4},
}


# ---------------------------------------------------------------- CPU kernel vs reference (float64, 1e-10)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_cpu_matches_reference_float64(cpu_kernel, config):
    case = make_case(**CONFIGS[config])
    out, g = grads(plain_fn(ops.ms_deform_attn), case, PLAIN_GRADS)
    ref, g_ref = grads(plain_fn(ops.ms_deform_attn_reference), case, PLAIN_GRADS)
    assert_close_rel(out, ref, 1e-10, "output")
    for k in PLAIN_GRADS:
        assert_close_rel(g[k], g_ref[k], 1e-10, f"grad {k}")


def border_locations(size):
    """Normalised coordinates on and around every pixel centre and edge of a level of `size` (a power of two,
    so every value and grid_sample's own arithmetic on it are exact)."""
    pts = [0.0, 1.0, -0.5 / size, 1 + 0.5 / size, -1.0 / size, 1 + 1.0 / size, -2.0]
    for i in range(size + 1):
        pts += [i / size, (i + 0.5) / size]
    return torch.tensor(sorted(set(pts)), dtype=torch.float64)


def border_case():
    levels = [(8, 4), (2, 2), (1, 1)]
    N, H, D, P = 1, 2, 6, 2
    xs, ys = border_locations(4), border_locations(8)
    grid = torch.cartesian_prod(xs, ys)  # every (x, y) pair: corners, edges, centres, outside
    Q = grid.shape[0]
    case = make_case(levels, N=N, H=H, D=D, Q=Q, P=P)
    loc = grid.view(1, Q, 1, 1, 1, 2).expand(N, Q, H, len(levels), P, 2).clone()
    loc[..., 1, :] = torch.roll(loc[..., 1, :], 3, dims=1)  # other levels see other points of the same set
    case["sampling_locations"] = loc
    return case


def test_cpu_border_locations_float64(cpu_kernel):
    case = border_case()
    out, g = grads(plain_fn(ops.ms_deform_attn), case, PLAIN_GRADS)
    ref, g_ref = grads(plain_fn(ops.ms_deform_attn_reference), case, PLAIN_GRADS)
    assert_close_rel(out, ref, 1e-10, "output")
    for k in PLAIN_GRADS:
        assert_close_rel(g[k], g_ref[k], 1e-10, f"grad {k}")
    # the set reaches outside the level: some samples are exactly zero, some are not
    assert (out.abs().amax(-1) == 0).any() and (out.abs().amax(-1) > 0).any()


def test_cpu_odd_size_borders_forward(cpu_kernel):
    """Odd level sizes: pixel centres/edges are inexact in binary; bilinear is continuous, so outputs agree."""
    levels = [(3, 5), (1, 7)]
    xs = torch.tensor([0.0, 1.0, 0.1, 0.5, 0.3, 0.7, 1 / 3, 2 / 3, -0.1, 1.1], dtype=torch.float64)
    grid = torch.cartesian_prod(xs, xs)
    Q = grid.shape[0]
    case = make_case(levels, N=1, H=2, D=5, Q=Q, P=1)
    case["sampling_locations"] = grid.view(1, Q, 1, 1, 1, 2).expand(1, Q, 2, 2, 1, 2).clone()
    assert_close_rel(
        ops.ms_deform_attn(case["value"], *geo(case)),
        ops.ms_deform_attn_reference(case["value"], *geo(case)),
        1e-10,
        "output",
    )


def test_comparison_is_sensitive(cpu_kernel):
    """The checks above can fail: swapped (x, y) or shifted half a pixel gives clearly different outputs."""
    case = make_case(**CONFIGS["odd"])
    out = ops.ms_deform_attn(case["value"], *geo(case))
    swapped = dict(case, sampling_locations=case["sampling_locations"].flip(-1))
    assert rel_err(ops.ms_deform_attn_reference(swapped["value"], *geo(swapped)), out) > 1e-2
    shifted = dict(case, sampling_locations=case["sampling_locations"] + 0.5 / 7)
    assert rel_err(ops.ms_deform_attn_reference(shifted["value"], *geo(shifted)), out) > 1e-2


def test_cpu_float32_matches_reference(cpu_kernel):
    case = make_case(**CONFIGS["m2f-like"], dtype=torch.float32)
    out, g = grads(plain_fn(ops.ms_deform_attn), case, PLAIN_GRADS)
    c64 = {k: (v.double() if v.is_floating_point() else v) for k, v in case.items()}
    ref, g_ref = grads(plain_fn(ops.ms_deform_attn_reference), c64, PLAIN_GRADS)
    assert out.dtype == torch.float32
    assert_close_rel(out, ref, 1e-5, "output")
    for k in PLAIN_GRADS:
        assert_close_rel(g[k], g_ref[k], 1e-5, f"grad {k}")


def test_gradcheck_cpu(cpu_kernel):
    case = make_case([(3, 2), (1, 1)], N=1, H=2, D=3, Q=2, P=2, r=2)
    inputs = [case[k].requires_grad_() for k in ("value", "sampling_locations", "attention_weights")]
    ss, lsi = case["spatial_shapes"], case["level_start_index"]
    assert torch.autograd.gradcheck(lambda v, loc, a: ops.ms_deform_attn(v, ss, lsi, loc, a), inputs)
    z, B, scaling = case["z"].requires_grad_(), case["lora_B"].requires_grad_(), torch.tensor(0.7, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda v, z_, B_, s, loc, a: ops.ms_deform_attn_lora(v, z_, B_, s, ss, lsi, loc, a),
        [inputs[0], z, B, scaling.requires_grad_(), inputs[1], inputs[2]],
    )


# ---------------------------------------------------------------- fused LoRA


@pytest.mark.parametrize("config,r", [("odd", 5), ("m2f-like", 4), ("m2f-like", 8), ("m2f-like", 16), ("m2f-like", 3)])
def test_fused_lora_equals_augmented_value(cpu_kernel, config, r):
    """Every specialised (D=32, r) kernel and the generic one."""
    case = make_case(**CONFIGS[config], r=r)
    out, g = grads(lora_fn(ops.ms_deform_attn_lora, 0.5), case, LORA_GRADS)
    ref, g_ref = grads(lora_fn(ops.ms_deform_attn_lora_reference, 0.5), case, LORA_GRADS)
    assert_close_rel(out, ref, 1e-10, "output")
    for k in LORA_GRADS:
        assert_close_rel(g[k], g_ref[k], 1e-10, f"grad {k}")
    # and the LoRA term matters: the plain operator on the base value is far off
    assert rel_err(ops.ms_deform_attn(case["value"], *geo(case)), ref) > 1e-2


def test_fused_lora_reference_is_the_augmented_value():
    """The LoRA reference is literally ms_deform_attn_reference on value + scaling * z B^T viewed per head."""
    case = make_case(**CONFIGS["one-level"], r=3)
    N, S, H, D = case["value"].shape
    augmented = case["value"] + 0.25 * (case["z"] @ case["lora_B"].t()).view(N, S, H, D)
    assert_close_rel(
        ops.ms_deform_attn_lora_reference(case["value"], case["z"], case["lora_B"], 0.25, *geo(case)),
        ops.ms_deform_attn_reference(augmented, *geo(case)),
        1e-12,
        "output",
    )


def test_multi_adapter_equals_per_image_calls(cpu_kernel):
    K, r = 3, 4
    case = make_case(**dict(CONFIGS["odd"], N=4), r=r)
    H, D = case["value"].shape[2:]
    B = torch.randn(K, H * D, r, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([2, 0, 2, 1])
    scaling = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    out = ops.ms_deform_attn_lora(case["value"], case["z"], B, scaling, *geo(case), adapter_index=index)
    for n in range(4):
        one = {
            k: (v[n : n + 1] if k in ("value", "z", "sampling_locations", "attention_weights") else v)
            for k, v in case.items()
        }
        k = int(index[n])
        expected = ops.ms_deform_attn_lora(one["value"], one["z"], B[k], float(scaling[k]), *geo(one))
        assert_close_rel(out[n : n + 1], expected, 1e-12, f"image {n}")
    ref = ops.ms_deform_attn_lora_reference(case["value"], case["z"], B, scaling, *geo(case), adapter_index=index)
    assert_close_rel(out, ref, 1e-10, "output vs reference")
    g = torch.randn_like(out)
    (gB,) = torch.autograd.grad(out, B, g)
    (gB_ref,) = torch.autograd.grad(ref, B, g)
    assert_close_rel(gB, gB_ref, 1e-10, "grad lora_B")
    assert gB[1].abs().sum() > 0 and gB[0].abs().sum() > 0  # each used adapter gets a gradient


def test_lora_input_errors(cpu_kernel):
    case = make_case(**CONFIGS["one-level"], r=3)
    v, z, B = case["value"], case["z"], case["lora_B"]
    with pytest.raises(ValueError, match="z must be"):
        ops.ms_deform_attn_lora(v, z[:, :-1], B, 1.0, *geo(case))
    with pytest.raises(ValueError, match="lora_B must be"):
        ops.ms_deform_attn_lora(v, z, B[:-1], 1.0, *geo(case))
    with pytest.raises(ValueError, match="needs adapter_index"):
        ops.ms_deform_attn_lora(v, z, B.expand(2, -1, -1), 1.0, *geo(case))
    with pytest.raises(ValueError, match="adapter_index values must be in"):
        ops.ms_deform_attn_lora(v, z, B.expand(2, -1, -1), 1.0, *geo(case), adapter_index=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="only for a stacked lora_B"):
        ops.ms_deform_attn_lora(v, z, B, 1.0, *geo(case), adapter_index=torch.tensor([0, 0]))


# ---------------------------------------------------------------- fused or unfused LoRA: the rule and its override


def test_lora_path_rule_follows_queries_over_positions(monkeypatch):
    from peft_d2.ops import lora_path

    monkeypatch.delenv(ops.FUSED_ENV_VAR, raising=False)
    assert ops.fused_lora_mode() == "auto"
    for device, ratio in lora_path.LORA_FUSED_MAX_QUERY_RATIO.items():
        S = 10_000
        # Q = S (the pixel decoder's self-attention): unfused; Q << S (decoder cross-attention): fused
        assert ops.choose_lora_path(S, S, device)[0] == "unfused"
        assert ops.choose_lora_path(300, 21504, device)[0] == "fused"
        at = int(ratio * S)
        assert ops.use_fused_lora(at, S, device) and not ops.use_fused_lora(at + 1, S, device)
        path, why = ops.choose_lora_path(at + 1, S, device)
        assert path == "unfused" and f"> {ratio} on {device}" in why
    assert ops.choose_lora_path(1, 1, "mps")[0] == "unfused"  # devices without a measurement: the estimate
    assert ops.use_fused_lora(5, 0, "cpu") is False  # no positions: Q / max(1, S)


@pytest.mark.parametrize("raw,path", [("1", "fused"), ("0", "unfused"), (" AUTO ", None), ("", None)])
def test_fused_env_var_overrides(monkeypatch, raw, path):
    monkeypatch.setenv(ops.FUSED_ENV_VAR, raw)
    for q, s in ((10, 10), (1, 1000)):
        auto = "unfused" if q == s else "fused"
        assert ops.choose_lora_path(q, s, "cpu")[0] == (path or auto)


@pytest.mark.parametrize("raw", ["yes", "2", "fused"])
def test_fused_env_var_bad_value_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv(ops.FUSED_ENV_VAR, raw)
    with pytest.raises(ValueError, match=rf"PEFT_D2_MSDA_FUSED='{raw}': expected 0 .*, 1 .* or auto"):
        ops.choose_lora_path(1, 1, "cpu")


def _lora_msdeformattn(Q, levels=((8, 8), (4, 4)), d_model=64, heads=4, points=2):
    from peft_d2 import LoRAConfig
    from peft_d2.modeling.pixel_decoder.ms_deform_attn import MSDeformAttn
    from peft_d2.tuners.lora import add_lora

    torch.manual_seed(0)
    attn = MSDeformAttn(d_model, len(levels), heads, points).double()
    add_lora(attn.value_proj, LoRAConfig(r=4, alpha=8.0), "value_proj")
    with torch.no_grad():
        attn.value_proj.lora_B.normal_(std=0.1)
    spatial_shapes, level_start_index = levels_tensors(list(levels))
    S = int(spatial_shapes.prod(1).sum())
    inputs = {
        "query": torch.randn(2, Q, d_model, dtype=torch.float64),
        "reference_points": torch.rand(2, Q, len(levels), 2, dtype=torch.float64),
        "input_flatten": torch.randn(2, S, d_model, dtype=torch.float64, requires_grad=True),
        "input_spatial_shapes": spatial_shapes,
        "input_level_start_index": level_start_index,
        "input_padding_mask": torch.rand(2, S) < 0.1,
    }
    return attn, inputs, S


@pytest.mark.parametrize("Q_of", [lambda S: S, lambda S: 3])
def test_msdeformattn_dispatch_and_paths_agree(cpu_kernel, monkeypatch, Q_of):
    """MSDeformAttn runs the path the rule picks; both paths give the same output and gradients."""
    calls = []
    fused = ops.ms_deform_attn_lora
    monkeypatch.setattr(ops, "ms_deform_attn_lora", lambda *a, **k: calls.append(1) or fused(*a, **k))
    attn, inputs, S = _lora_msdeformattn(Q=Q_of(80))
    assert S == 80
    Q = inputs["query"].shape[1]
    results = {}
    for mode in ("auto", "0", "1"):
        monkeypatch.setenv(ops.FUSED_ENV_VAR, mode)
        before = len(calls)
        out = attn(**inputs)
        params = [inputs["input_flatten"], attn.value_proj.lora_A, attn.value_proj.lora_B]
        params += [attn.sampling_offsets.weight, attn.attention_weights.weight]
        results[mode] = (out.detach(), torch.autograd.grad(out.pow(2).sum(), params))
        ran_fused = len(calls) > before
        expected = {"0": False, "1": True, "auto": ops.use_fused_lora(Q, S, "cpu")}[mode]
        assert ran_fused == expected, mode
        assert attn.last_lora_path == ops.choose_lora_path(Q, S, "cpu")  # what ran, and why
        assert attn.last_lora_path[0] == ("fused" if ran_fused else "unfused")
    for mode in ("1", "auto"):
        torch.testing.assert_close(results[mode][0], results["0"][0], rtol=1e-10, atol=1e-12)
        for g, g0 in zip(results[mode][1], results["0"][1]):
            torch.testing.assert_close(g, g0, rtol=1e-10, atol=1e-12)


def test_msdeformattn_bad_fused_env_var_fails_before_any_change(cpu_kernel, monkeypatch):
    attn, inputs, _ = _lora_msdeformattn(Q=3)
    state = {k: v.clone() for k, v in attn.state_dict().items()}
    monkeypatch.setenv(ops.FUSED_ENV_VAR, "on")
    with pytest.raises(ValueError, match="PEFT_D2_MSDA_FUSED='on'"):
        attn(**inputs)
    assert all(torch.equal(v, attn.state_dict()[k]) for k, v in state.items())


# ---------------------------------------------------------------- input validation


def test_input_errors_name_the_argument(cpu_kernel):
    case = make_case(**CONFIGS["odd"])
    v, ss, lsi, loc, a = case["value"], *geo(case)
    with pytest.raises(ValueError, match="value must be"):
        ops.ms_deform_attn(v[0], ss, lsi, loc, a)
    with pytest.raises(ValueError, match="sampling_locations must be"):
        ops.ms_deform_attn(v, ss, lsi, loc[..., :1], a)
    with pytest.raises(ValueError, match="attention_weights must be"):
        ops.ms_deform_attn(v, ss, lsi, loc, a[:, :-1])
    with pytest.raises(ValueError, match=r"spatial_shapes must be \(L, 2\)"):
        ops.ms_deform_attn(v, ss[:-1], lsi, loc, a)
    bad = ss.clone()
    bad[0, 0] += 1
    with pytest.raises(ValueError, match="spatial_shapes sum of H_l\\*W_l is .* but value has S"):
        ops.ms_deform_attn(v, bad, lsi, loc, a)
    with pytest.raises(ValueError, match="level_start_index must be the exclusive prefix sum"):
        ops.ms_deform_attn(v, ss, lsi + 1, loc, a)
    with pytest.raises(ValueError, match="spatial_shapes must be an integer tensor"):
        ops.ms_deform_attn(v, ss.double(), lsi, loc, a)
    with pytest.raises(ValueError, match="value must be floating point"):
        ops.ms_deform_attn(v.long(), ss, lsi, loc, a)
    with pytest.raises(ValueError, match="sampling_locations is on meta but value is on cpu"):
        ops.ms_deform_attn(v, ss, lsi, loc.to("meta"), a)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_levels_as_int_pairs_equal_levels_as_tensors(cpu_kernel, monkeypatch, backend):
    """spatial_shapes as (H_l, W_l) ints (what the pixel decoder passes: no host read, and export can trace it)
    gives the same outputs and gradients as the tensors, on the kernel and on the reference, plain and fused."""
    monkeypatch.setenv(ops.ENV_VAR, backend)
    case = make_case(**CONFIGS["odd"])
    levels = [tuple(hw) for hw in case["spatial_shapes"].tolist()]
    as_pairs = {**case, "spatial_shapes": levels, "level_start_index": case["level_start_index"].tolist()}
    derived = {**case, "spatial_shapes": levels, "level_start_index": None}
    for fn, names in ((plain_fn(ops.ms_deform_attn), PLAIN_GRADS), (lora_fn(ops.ms_deform_attn_lora), LORA_GRADS)):
        out, g = grads(fn, case, names)
        for variant in (as_pairs, derived):
            out2, g2 = grads(fn, variant, names)
            torch.testing.assert_close(out2, out, rtol=0, atol=0)
            for k in names:
                torch.testing.assert_close(g2[k], g[k], rtol=0, atol=0)


def test_bad_int_pair_levels_name_the_argument(cpu_kernel):
    case = make_case(**CONFIGS["odd"])
    v, _, _, loc, a = case["value"], *geo(case)
    levels = [tuple(hw) for hw in case["spatial_shapes"].tolist()]
    with pytest.raises(ValueError, match="spatial_shapes must be an \\(L, 2\\) int64 tensor or a sequence"):
        ops.ms_deform_attn(v, [(2.0, 3.0)] + levels[1:], None, loc, a)
    with pytest.raises(ValueError, match="spatial_shapes has 2 levels but sampling_locations has L = 5"):
        ops.ms_deform_attn(v, levels[:2], None, loc, a)
    with pytest.raises(ValueError, match="spatial_shapes sum of H_l\\*W_l is .* but value has S"):
        ops.ms_deform_attn(v, [(levels[0][0] + 1, levels[0][1])] + levels[1:], None, loc, a)
    with pytest.raises(ValueError, match="level_start_index must be the exclusive prefix sum"):
        ops.ms_deform_attn(v, levels, [1, 2, 3], loc, a)


def test_kernel_checks_bad_levels_directly(cpu_kernel):
    """The compiled op checks what it indexes by even when called without the Python face."""
    case = make_case(**CONFIGS["odd"])
    bad = case["spatial_shapes"].clone()
    bad[-1, 0] += 1  # the last level: level_start_index stays consistent, the total does not
    with pytest.raises(RuntimeError, match="spatial_shapes sum"):
        torch.ops.peft_d2.ms_deform_attn_forward(case["value"], bad, *geo(case)[1:])
    with pytest.raises(RuntimeError, match="attention_weights must be"):
        torch.ops.peft_d2.ms_deform_attn_forward(case["value"], *geo(case)[:3], case["attention_weights"][..., :1])


# ---------------------------------------------------------------- custom-op registration, compile, autocast


def _op_samples(dtype, device="cpu"):
    case = make_case([(3, 4), (2, 1)], N=2, H=2, D=4, Q=3, P=2, r=2, dtype=dtype, device=device)
    v, z, (ss, lsi, loc, a) = case["value"], case["z"], geo(case)
    N, Q, H = loc.shape[:3]
    go = torch.randn(N, Q, H * v.shape[3], dtype=dtype, device=device)
    gzs = torch.randn(N, Q, H, z.shape[2], dtype=dtype, device=device)
    rg = [t.clone().requires_grad_() for t in (v, z, loc, a)]
    return [
        (torch.ops.peft_d2.ms_deform_attn_forward.default, (rg[0], ss, lsi, rg[2], rg[3])),
        (torch.ops.peft_d2.ms_deform_attn_forward.default, (v, ss, lsi, loc, a)),
        (torch.ops.peft_d2.ms_deform_attn_backward.default, (go, v, ss, lsi, loc, a)),
        (torch.ops.peft_d2.ms_deform_attn_lora_forward.default, (rg[0], rg[1], ss, lsi, rg[2], rg[3])),
        (torch.ops.peft_d2.ms_deform_attn_lora_backward.default, (go, gzs, v, z, ss, lsi, loc, a)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_cpu(cpu_kernel, dtype):
    for op, args in _op_samples(dtype):
        torch.library.opcheck(op, args)


def test_torch_compile_cpu(cpu_kernel):
    case = make_case(**CONFIGS["m2f-like"], dtype=torch.float32)

    def f(v, z, B, ss, lsi, loc, a):
        return (
            ops.ms_deform_attn(v, ss, lsi, loc, a).sum()
            + ops.ms_deform_attn_lora(v, z, B, 0.5, ss, lsi, loc, a).pow(2).mean()
        )

    args = [case[k] for k in ("value", "z", "lora_B", *GEOMETRY)]
    leaves_eager = [t.clone().requires_grad_(t.is_floating_point()) for t in args]
    leaves_comp = [t.clone().requires_grad_(t.is_floating_point()) for t in args]
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_out, comp_out = f(*leaves_eager), compiled(*leaves_comp)
    torch.testing.assert_close(comp_out, eager_out)
    eager_out.backward()
    comp_out.backward()
    for te, tc in zip(leaves_eager, leaves_comp):
        if te.grad is not None:
            torch.testing.assert_close(tc.grad, te.grad)


def test_torch_compile_inductor_cpu(cpu_kernel):
    case = make_case(**CONFIGS["one-level"], dtype=torch.float32)
    args = [case["value"], *geo(case)]
    torch._dynamo.reset()
    compiled = torch.compile(lambda v, ss, lsi, loc, a: ops.ms_deform_attn(v, ss, lsi, loc, a) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(*args), ops.ms_deform_attn(*args) * 2)


def test_autocast_cpu_computes_in_float32(cpu_kernel):
    case = make_case(**CONFIGS["m2f-like"], dtype=torch.float32)
    expected = ops.ms_deform_attn(case["value"], *geo(case))
    half = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in case.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.ms_deform_attn(half["value"], *geo(half))
        direct = torch.ops.peft_d2.ms_deform_attn_forward(half["value"], *geo(half))  # the C++ AutocastCPU kernel
        lora = ops.ms_deform_attn_lora(half["value"], half["z"], half["lora_B"], 0.5, *geo(half))
    assert out.dtype == direct.dtype == lora.dtype == torch.float32
    torch.testing.assert_close(out, direct)
    assert_close_rel(out, expected, 2e-2, "autocast output")
    # outside autocast, half inputs on CPU come back in their dtype (computed in float32)
    assert ops.ms_deform_attn(half["value"], *geo(half)).dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.peft_d2.ms_deform_attn_forward(half["value"], *geo(half))


# ---------------------------------------------------------------- backends, override, fallback


def _spy_reference(monkeypatch):
    from peft_d2.ops import msda as face

    calls = []
    real = face.ms_deform_attn_reference

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(face, "ms_deform_attn_reference", spy)
    return calls


def test_backend_override(cpu_kernel, monkeypatch):
    case = make_case(**CONFIGS["one-level"])
    calls = _spy_reference(monkeypatch)
    ops.ms_deform_attn(case["value"], *geo(case))
    assert calls == [] and ops.select_backend("cpu") == "cpu"
    monkeypatch.setenv(ops.ENV_VAR, "reference")
    out = ops.ms_deform_attn(case["value"], *geo(case))
    assert calls == [1] and ops.select_backend("cpu") == "reference"
    assert ops.backend_info()["backend_for_cpu"] == "reference"
    monkeypatch.setenv(ops.ENV_VAR, "cpu")
    torch.testing.assert_close(ops.ms_deform_attn(case["value"], *geo(case)), out)
    assert calls == [1]
    monkeypatch.setenv(ops.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="cannot run tensors on cpu"):
        ops.ms_deform_attn(case["value"], *geo(case))
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    with pytest.raises(ValueError, match="expected one of cuda, cpu, reference"):
        ops.ms_deform_attn(case["value"], *geo(case))


@pytest.fixture
def fresh_extension_state(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    _extension._reset_for_tests()
    yield
    monkeypatch.undo()
    _extension._reset_for_tests()


@pytest.mark.parametrize("how", ["import", "op-missing"])
def test_fallback_warns_once(fresh_extension_state, monkeypatch, how):
    if how == "import":
        monkeypatch.setitem(sys.modules, "peft_d2._C", None)  # import raises ImportError
        why = "could not be imported"
    else:
        monkeypatch.setattr(_extension, "_has_op", lambda name: False)
        why = "lacks the operators"
    calls = _spy_reference(monkeypatch)
    case = make_case(**CONFIGS["one-level"], r=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ops.ms_deform_attn(case["value"], *geo(case))
        ops.ms_deform_attn(case["value"], *geo(case))
        ops.ms_deform_attn_lora(case["value"], case["z"], case["lora_B"], 1.0, *geo(case))
    fallback = [w for w in caught if issubclass(w.category, ops.MSDAFallbackWarning)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    assert why in str(fallback[0].message)
    assert len(calls) == 2  # both plain calls ran the reference
    torch.testing.assert_close(out, ops.ms_deform_attn_reference(case["value"], *geo(case)))
    info = ops.backend_info()
    assert not info["extension_loaded"] and why in info["extension_error"]
    assert info["backend_for_cpu"].startswith("reference")


def test_backend_info_keys():
    info = ops.backend_info()
    for key in (
        "extension_loaded",
        "extension_error",
        "cpu_kernel",
        "cuda_kernel",
        "backend_for_cpu",
        "backend_for_cuda",
        "built_with_cuda",
        "cuda_available",
    ):
        assert key in info
    if info["extension_loaded"]:
        assert info["cpu_kernel"] and info["extension_error"] is None


# ---------------------------------------------------------------- the reference vs the official implementation


def _official_core():
    if not OFFICIAL_FUNC.is_file():
        pytest.skip(
            f"official Mask2Former sources not unpacked at {OFFICIAL_FUNC.parents[5]} "
            "(tools/fetch_reference.py puts the maskformer2-0.1 sdist there)"
        )
    spec = importlib.util.spec_from_file_location("_official_ms_deform_attn_func", OFFICIAL_FUNC)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its CUDA-op import is optional (caught inside)
    return module.ms_deform_attn_core_pytorch


@pytest.mark.parametrize("config", ["odd", "m2f-like"])
def test_reference_matches_official_mask2former(config):
    official = _official_core()
    case = make_case(**CONFIGS[config])

    def official_fn(c):
        return official(
            c["value"],
            [tuple(s) for s in c["spatial_shapes"].tolist()],
            c["sampling_locations"],
            c["attention_weights"],
        )

    out, g = grads(plain_fn(ops.ms_deform_attn_reference), case, PLAIN_GRADS)
    ref, g_ref = grads(official_fn, case, PLAIN_GRADS)
    assert_close_rel(out, ref, 1e-12, "output")
    for k in PLAIN_GRADS:
        assert_close_rel(g[k], g_ref[k], 1e-12, f"grad {k}")


# ---------------------------------------------------------------- CUDA (marker gpu)


def _to(case, device, dtype=None):
    return {
        k: v.to(device=device, dtype=dtype if (dtype and v.is_floating_point()) else v.dtype) for k, v in case.items()
    }


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("config", ["odd", "m2f-like"])
def test_cuda_matches_reference(cuda_kernel, dtype, tol, config):
    case = make_case(**CONFIGS[config], r=6)
    gpu = _to(case, "cuda", dtype)
    for fn, names in ((plain_fn, PLAIN_GRADS), (lora_fn, LORA_GRADS)):
        impl, ref_impl = (
            (ops.ms_deform_attn, ops.ms_deform_attn_reference)
            if fn is plain_fn
            else (ops.ms_deform_attn_lora, ops.ms_deform_attn_lora_reference)
        )
        out, g = grads(fn(impl), gpu, names)
        ref, g_ref = grads(fn(ref_impl), _to(gpu, "cpu", torch.float64), names)
        assert out.dtype == dtype and out.is_cuda
        assert_close_rel(out.cpu(), ref, tol, f"{impl.__name__} output")
        for k in names:
            assert g[k].dtype == dtype
            assert_close_rel(g[k].cpu(), g_ref[k], tol, f"{impl.__name__} grad {k}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_values_float_geometry(cuda_kernel, dtype):
    case = make_case(**CONFIGS["m2f-like"], dtype=torch.float32, device="cuda")
    v = case["value"].to(dtype)
    out = ops.ms_deform_attn(v, *geo(case))  # float32 locations/weights kept in float32
    assert out.dtype == dtype
    assert_close_rel(
        out.double(),
        ops.ms_deform_attn_reference(v.double(), *[t.double() if t.is_floating_point() else t for t in geo(case)]),
        1e-2,
        "out",
    )
    with torch.autocast("cuda", dtype=dtype):
        auto = torch.ops.peft_d2.ms_deform_attn_forward(case["value"], *geo(case))
    assert auto.dtype == dtype
    assert_close_rel(auto.float(), out.float(), 1e-2, "autocast")


@pytest.mark.gpu
def test_cuda_multi_adapter_and_gradcheck(cuda_kernel):
    case = _to(make_case(**dict(CONFIGS["odd"], N=3), r=3), "cuda")
    H, D = case["value"].shape[2:]
    B = torch.randn(2, H * D, 3, dtype=torch.float64, device="cuda")
    index = torch.tensor([1, 0, 1], device="cuda")
    out = ops.ms_deform_attn_lora(case["value"], case["z"], B, 0.3, *geo(case), adapter_index=index)
    ref = ops.ms_deform_attn_lora_reference(case["value"], case["z"], B, 0.3, *geo(case), adapter_index=index)
    assert_close_rel(out, ref, 1e-10, "multi-adapter float64")
    tiny = _to(make_case([(3, 2), (1, 1)], N=1, H=2, D=3, Q=2, P=2), "cuda")
    ss, lsi = tiny["spatial_shapes"], tiny["level_start_index"]
    inputs = [tiny[k].requires_grad_() for k in ("value", "sampling_locations", "attention_weights")]
    assert torch.autograd.gradcheck(lambda v, loc, a: ops.ms_deform_attn(v, ss, lsi, loc, a), inputs)


@pytest.mark.gpu
def test_opcheck_cuda(cuda_kernel):
    for op, args in _op_samples(torch.float32, "cuda"):
        torch.library.opcheck(op, args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_cuda_border_locations(cuda_kernel, dtype, tol):
    """Corners, edges, centres and points outside every level, plain and fused, outputs and gradients."""
    case = border_case()
    gpu = _to(case, "cuda", dtype)
    for fn, impl, ref_impl, names in (
        (plain_fn, ops.ms_deform_attn, ops.ms_deform_attn_reference, PLAIN_GRADS),
        (lora_fn, ops.ms_deform_attn_lora, ops.ms_deform_attn_lora_reference, LORA_GRADS),
    ):
        out, g = grads(fn(impl), gpu, names)
        ref, g_ref = grads(fn(ref_impl), _to(gpu, "cpu", torch.float64), names)
        assert_close_rel(out.cpu(), ref, tol, f"{impl.__name__} output")
        for k in names:
            assert_close_rel(g[k].cpu(), g_ref[k], tol, f"{impl.__name__} grad {k}")


@pytest.mark.gpu
def test_cuda_multi_adapter_gradients_float32(cuda_kernel):
    K, r = 3, 4
    case = make_case(**dict(CONFIGS["m2f-like"], N=3), r=r)
    H, D = case["value"].shape[2:]
    case["lora_B"] = torch.randn(K, H * D, r, dtype=torch.float64)
    index, scaling = torch.tensor([2, 0, 2]), torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    names = LORA_GRADS

    def fn(impl):
        return lambda c: impl(c["value"], c["z"], c["lora_B"], scaling.to(c["value"]), *geo(c),
                              adapter_index=index.to(c["value"].device))

    out, g = grads(fn(ops.ms_deform_attn_lora), _to(case, "cuda", torch.float32), names)
    ref, g_ref = grads(fn(ops.ms_deform_attn_lora_reference), case, names)
    assert_close_rel(out.cpu(), ref, 1e-5, "output")
    for k in names:
        assert_close_rel(g[k].cpu(), g_ref[k], 1e-5, f"grad {k}")
    assert g["lora_B"][1].abs().sum() == 0 and g["lora_B"][0].abs().sum() > 0  # adapter 1 is unused


@pytest.mark.gpu
def test_cuda_msdeformattn_fused_and_unfused_paths_agree(cuda_kernel, monkeypatch):
    attn, inputs, _ = _lora_msdeformattn(Q=5)
    attn = attn.float().cuda()
    inputs = {k: (v.detach().float() if v.is_floating_point() else v).cuda() for k, v in inputs.items()}
    inputs["input_flatten"].requires_grad_()
    results = {}
    for mode in ("0", "1"):
        monkeypatch.setenv(ops.FUSED_ENV_VAR, mode)
        out = attn(**inputs)
        params = [inputs["input_flatten"], attn.value_proj.lora_A, attn.value_proj.lora_B]
        results[mode] = (out.detach(), torch.autograd.grad(out.pow(2).sum(), params))
    assert_close_rel(results["1"][0], results["0"][0], 1e-5, "output")
    for g1, g0 in zip(results["1"][1], results["0"][1]):
        assert_close_rel(g1, g0, 1e-5, "gradient")


@pytest.mark.gpu
def test_cuda_op_asserts_on_levels_past_s(cuda_kernel):
    """The raw op (no Python checks, as in a compiled graph) stops with a device-side assert instead of reading
    past S when spatial_shapes claim more positions than value has; in a subprocess, since the assert ends the
    CUDA context."""
    import subprocess

    code = (
        "import torch, peft_d2.ops as ops\n"
        "ops.load_extension()\n"
        "v = torch.randn(1, 20, 2, 4, device='cuda')\n"
        "ss = torch.tensor([[4, 4], [3, 3]], device='cuda')\n"  # 16 + 9 = 25 > 20 positions
        "lsi = torch.tensor([0, 16], device='cuda')\n"
        "loc = torch.rand(1, 5, 2, 2, 3, 2, device='cuda')\n"
        "a = torch.rand(1, 5, 2, 2, 3, device='cuda')\n"
        "torch.ops.peft_d2.ms_deform_attn_forward(v, ss, lsi, loc, a)\n"
        "torch.cuda.synchronize()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "device-side assert" in proc.stderr, proc.stderr[-2000:]
