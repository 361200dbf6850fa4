"""Benchmark of the MSDeformAttn operator with LoRA on value_proj: reference vs unfused vs fused.

For each shape it times forward and forward+backward and measures the peak memory of
  reference  the pure-PyTorch grid_sample operator on the explicitly LoRA-augmented value (the ground truth)
  plain      the compiled operator on the base value alone (no LoRA: the floor)
  unfused    value + scaling * (z @ B^T) materialised, then the compiled operator
  fused      peft_d2.ops.ms_deform_attn_lora (z sampled with the value, B applied afterwards)
and, to judge whether fusing LoRA of sampling_offsets / attention_weights into the operator could pay, the cost
of those two LoRA branches (q A^T B^T for both layers, forward+backward), which is all such a fusion could save.

Shapes: Mask2Former's pixel decoder on a 1024x1024 image (batch 2, levels 128^2, 64^2, 32^2, H=8, D=32, L=3,
P=4, Q=S: encoder self-attention, rank 8); on CPU by default a scaled-down 512x512 version of it (--full for the
real one), plus a small shape. CPU peak memory is the growth of the process's peak RSS in a fresh subprocess per
measurement (so each method starts clean); CUDA peak memory is torch.cuda.max_memory_allocated.

Beside each shape's table it prints the path MSDeformAttn's automatic rule picks (peft_d2.ops.choose_lora_path)
and fused / unfused timed head to head (interleaved rounds in this process: the table's per-method subprocesses
run one after the other, so on a busy machine only the head-to-head ratio is a fair comparison). --sweep times
fused against unfused head to head over a range of Q / S: the measurements the rule's CPU ratio comes from.
On CUDA the achieved bandwidth of each method (the bytes it must at least read and write) is compared with a
device-to-device copy measured in the same run.

    python tools/benchmark_msda.py                 # CPU, about 1-2 minutes on 2 cores
    python tools/benchmark_msda.py --sweep         # CPU, fused vs unfused over Q / S
    python tools/benchmark_msda.py --device cuda   # needs a CUDA build of peft_d2._C
    python tools/benchmark_msda.py --device cuda --dtype bfloat16 --shapes m2f decoder
"""

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's peft_d2, also in the measurement subprocesses

METHODS = ("reference", "plain", "unfused", "fused", "lora_offsets_attn")


def make_shape(name, batch, image, heads=8, head_dim=32, points=4, rank=8, strides=(8, 16, 32), queries=None):
    levels = [(image // s, image // s) for s in strides]
    S = sum(h * w for h, w in levels)
    return {
        "name": name,
        "N": batch,
        "levels": levels,
        "S": S,
        "Q": queries or S,
        "H": heads,
        "D": head_dim,
        "P": points,
        "r": rank,
        "d_model": heads * head_dim,
    }


def encoder_locations(shape, g):
    """Mask2Former encoder self-attention geometry: each query's reference point is its own pixel centre
    (normalised, shared by the levels); point p of head h is offset by (p + 1) pixels along the head's direction
    (the sampling_offsets bias initialisation) plus N(0, 1) pixels of trained spread."""
    N, H, P = shape["N"], shape["H"], shape["P"]
    refs = []
    for h_l, w_l in shape["levels"]:
        ys, xs = torch.meshgrid((torch.arange(h_l) + 0.5) / h_l, (torch.arange(w_l) + 0.5) / w_l, indexing="ij")
        refs.append(torch.stack([xs, ys], -1).reshape(-1, 2))
    ref = torch.cat(refs)
    if shape["Q"] != ref.shape[0]:  # decoder cross-attention: queries anywhere in the image
        ref = torch.rand(shape["Q"], 2, generator=g)
    Q, L = ref.shape[0], len(shape["levels"])
    theta = torch.arange(H) * (2 * torch.pi / H)
    direction = torch.stack([theta.cos(), theta.sin()], -1)
    direction = direction / direction.abs().max(-1, keepdim=True).values  # (H, 2), as in Deformable DETR's init
    offsets = direction.view(H, 1, 1, 2) * (torch.arange(P) + 1).view(1, 1, P, 1)  # (H, 1, P, 2) pixels
    offsets = offsets + torch.randn(N, Q, H, L, P, 2, generator=g)
    size = torch.tensor([[w, h] for h, w in shape["levels"]], dtype=torch.float32).view(1, 1, 1, L, 1, 2)
    return ref.view(1, Q, 1, 1, 1, 2) + offsets / size


# Mask DINO-style decoder cross-attention into the same 1024x1024 pyramid: few queries, so the unfused path's
# augmented value (all S positions) costs far more than the queries' own sampling.
DECODER = make_shape("decoder cross-attn (N=2, Q=300, 128/64/32)", 2, 1024, queries=300)
SHAPE_NAMES = ("m2f", "decoder", "small")


def shapes_for(device, full, names):
    """The named benchmark shapes; on CPU the Mask2Former one is scaled down to 512x512 unless `full`."""
    if device == "cuda" or full:
        big = make_shape("m2f-1024 (N=2, 128/64/32)", 2, 1024)
    else:
        big = make_shape("m2f-512, scaled down from 1024 (N=2, 64/32/16)", 2, 512)
    table = {"m2f": big, "decoder": DECODER, "small": make_shape("small (N=2, 16/8/4)", 2, 128)}
    return [table[n] for n in names]


def make_inputs(shape, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, S, Q, H, D, P, r = (shape[k] for k in ("N", "S", "Q", "H", "D", "P", "r"))
    L = len(shape["levels"])
    spatial_shapes = torch.tensor(shape["levels"], dtype=torch.long)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    x = {
        "value": torch.randn(N, S, H, D, generator=g),
        "z": torch.randn(N, S, r, generator=g),
        "lora_B": torch.randn(H * D, r, generator=g) * 0.1,
        "sampling_locations": encoder_locations(shape, g),
        "attention_weights": torch.softmax(torch.randn(N, Q, H, L * P, generator=g), -1).view(N, Q, H, L, P),
        "query": torch.randn(N, Q, shape["d_model"], generator=g),
    }
    x = {k: v.to(device=device, dtype=dtype) for k, v in x.items()}
    x["spatial_shapes"] = spatial_shapes.to(device)
    x["level_start_index"] = level_start_index.to(device)
    return x


def run_method(method, x, scaling=2.0):
    """Returns the output tensor and the list of leaf tensors that want gradients."""
    from peft_d2 import ops

    value, z, B = x["value"], x["z"], x["lora_B"]
    geo = (x["spatial_shapes"], x["level_start_index"], x["sampling_locations"], x["attention_weights"])
    N, S, H, D = value.shape
    if method == "reference":
        augmented = value + scaling * (z @ B.t()).view(N, S, H, D)
        return ops.ms_deform_attn_reference(augmented, *geo)
    if method == "plain":
        return ops.ms_deform_attn(value, *geo)
    if method == "unfused":
        augmented = value + scaling * (z @ B.t()).view(N, S, H, D)
        return ops.ms_deform_attn(augmented, *geo)
    if method == "fused":
        return ops.ms_deform_attn_lora(value, z, B, scaling, *geo)
    if method == "lora_offsets_attn":
        # the LoRA branches a fused sampling_offsets/attention_weights kernel would absorb
        q, A1, B1, A2, B2 = (x[k] for k in ("query", "A_off", "B_off", "A_attn", "B_attn"))
        return torch.cat([(q @ A1.t()) @ B1.t(), (q @ A2.t()) @ B2.t()], -1)
    raise ValueError(method)


def leaves(method, x):
    if method == "lora_offsets_attn":
        return [x[k] for k in ("A_off", "B_off", "A_attn", "B_attn")]
    names = ["value", "sampling_locations", "attention_weights"]
    if method != "plain":
        names += ["z", "lora_B"]
    return [x[k] for k in names]


def add_offset_lora(x, shape):
    g = torch.Generator().manual_seed(1)
    d, r, H, L, P = shape["d_model"], shape["r"], shape["H"], len(shape["levels"]), shape["P"]
    dev, dt = x["value"].device, x["value"].dtype
    for name, out in (("off", H * L * P * 2), ("attn", H * L * P)):
        x[f"A_{name}"] = (torch.randn(r, d, generator=g) * 0.05).to(dev, dt)
        x[f"B_{name}"] = (torch.randn(out, r, generator=g) * 0.05).to(dev, dt)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(method, shape, device, dtype, repeats):
    """Median forward and forward+backward seconds, and peak memory growth in bytes."""
    x = make_inputs(shape, device, dtype)
    add_offset_lora(x, shape)
    for t in leaves(method, x):
        t.requires_grad_(True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _rss_bytes()
    fwd, fwdbwd = [], []
    for i in range(repeats + 1):  # the first round warms up
        _sync(device)
        t0 = time.perf_counter()
        out = run_method(method, x)
        _sync(device)
        t1 = time.perf_counter()
        out.backward(torch.ones_like(out))
        _sync(device)
        t2 = time.perf_counter()
        for t in leaves(method, x):
            t.grad = None
        del out
        if i:
            fwd.append(t1 - t0)
            fwdbwd.append(t2 - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss_bytes() - base
    # the best round: this machine may be shared, and interference only ever adds time
    return {"fwd": min(fwd), "fwdbwd": min(fwdbwd), "peak": peak}


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss():
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_bytes():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(queue, method, shape, dtype, repeats, threads):
    if threads:
        torch.set_num_threads(threads)
    try:
        queue.put(measure(method, shape, "cpu", dtype, repeats))
    except Exception as e:  # reported in the table, not fatal
        queue.put({"error": f"{type(e).__name__}: {e}"})


def measure_isolated(method, shape, dtype, repeats, threads):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, method, shape, dtype, repeats, threads))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def check_agreement(shape, device):
    """Fused vs unfused vs reference on this shape's inputs (float64 on CPU, float32 on CUDA)."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    x = make_inputs(shape, device, dtype)
    outs = {m: run_method(m, x) for m in ("reference", "unfused", "fused")}
    scale = outs["reference"].abs().max().item()
    return {m: (outs[m] - outs["reference"]).abs().max().item() / scale for m in ("unfused", "fused")}


def min_bytes(method, shape, dtype, fwdbwd):
    """Bytes a method must at least move: its inputs read once and its outputs written once (forward), plus the
    gradients of those inputs written and the output's gradient read (forward+backward)."""
    N, S, Q, H, D, P, r = (shape[k] for k in ("N", "S", "Q", "H", "D", "P", "r"))
    L = len(shape["levels"])
    es = torch.finfo(dtype).bits // 8
    elems = N * S * H * D + N * Q * H * L * P * 3 + N * Q * H * D  # value, locations + weights, output
    if method in ("unfused", "fused", "reference"):
        elems += N * S * r + H * D * r  # z and B
    return elems * es * (2 if fwdbwd else 1)


def copy_bandwidth(device, nbytes=1 << 30, repeats=10):
    """Bytes per second of a device-to-device copy (read + write counted), best of `repeats`."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def head_to_head(shape, device, dtype, repeats):
    """Best fwd+bwd seconds of the unfused and the fused path on the same inputs, in interleaved rounds of one
    process (alternating which goes first), so that a busy machine slows both alike."""
    x = make_inputs(shape, device, dtype)
    for t in leaves("fused", x):
        t.requires_grad_(True)
    best = {"unfused": float("inf"), "fused": float("inf")}
    for i in range(repeats + 1):  # round 0 warms up
        for m in ("unfused", "fused") if i % 2 else ("fused", "unfused"):
            _sync(device)
            t0 = time.perf_counter()
            out = run_method(m, x)
            out.backward(torch.ones_like(out))
            _sync(device)
            if i:
                best[m] = min(best[m], time.perf_counter() - t0)
            for t in leaves(m, x):
                t.grad = None
            del out
    return best


def auto_summary(shape, device, dtype, repeats):
    """The path the automatic rule picks for this shape, beside both paths timed head to head."""
    from peft_d2 import ops

    path, why = ops.choose_lora_path(shape["Q"], shape["S"], device)
    best = head_to_head(shape, device, dtype, repeats)
    faster = "fused" if best["fused"] < best["unfused"] else "unfused"
    verdict = "auto is right" if path == faster else "AUTO PICKS THE SLOWER PATH"
    return (
        f"auto picks {path} ({why}); head to head, fwd+bwd best of {repeats}: unfused {best['unfused'] * 1e3:.1f} "
        f"ms, fused {best['fused'] * 1e3:.1f} ms, unfused/fused {best['unfused'] / best['fused']:.2f}x -> "
        f"{faster} is faster ({verdict})"
    )


SWEEP_FRACTIONS = (1 / 64, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 1)


def sweep(device, dtype, repeats, image=512):
    """Fused vs unfused fwd+bwd over Q / S on the Mask2Former pyramid, head to head."""
    from peft_d2 import ops

    S = make_shape("s", 2, image)["S"]
    print(f"sweep: fused vs unfused fwd+bwd, N=2, image {image} (S={S}), H=8, D=32, L=3, P=4, r=8; best of {repeats}")
    print(f"{'Q':>7}{'Q/S':>8}{'unfused ms':>12}{'fused ms':>10}{'unfused/fused':>15}  {'auto':<8}faster")
    wrong = 0
    for frac in SWEEP_FRACTIONS:
        Q = max(1, round(frac * S))
        best = head_to_head(make_shape("sweep", 2, image, queries=Q), device, dtype, repeats)
        path = ops.choose_lora_path(Q, S, device)[0]
        faster = "fused" if best["fused"] < best["unfused"] else "unfused"
        wrong += path != faster
        print(
            f"{Q:7d}{Q / S:8.3f}{best['unfused'] * 1e3:12.1f}{best['fused'] * 1e3:10.1f}"
            f"{best['unfused'] / best['fused']:14.2f}x  {path:<8}{faster}"
        )
    print(f"auto picked the slower path at {wrong} of {len(SWEEP_FRACTIONS)} ratios")
    return wrong


def fmt_ms(s):
    return f"{s * 1e3:9.1f}"


def fmt_mb(b):
    return f"{b / 2**20:8.0f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "float64"))
    parser.add_argument("--full", action="store_true", help="on CPU, the real 1024x1024 shape (slow)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per measurement (the best is reported)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    parser.add_argument("--skip-reference", action="store_true", help="leave out the slow reference")
    parser.add_argument(
        "--shapes", nargs="+", default=list(SHAPE_NAMES), choices=SHAPE_NAMES, help="which shapes to time"
    )
    parser.add_argument("--sweep", action="store_true", help="only fused vs unfused over a range of Q / S")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    from peft_d2 import ops

    info = ops.backend_info()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, threads "
        f"{args.threads or torch.get_num_threads()}, backend for {args.device}: {info['backend_for_' + args.device]}"
    )
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device")
        print(f"GPU: {torch.cuda.get_device_name()}")
    repeats = args.repeats or (20 if args.device == "cuda" else 3)
    if args.sweep:
        return sweep(args.device, dtype, repeats)
    shapes = shapes_for(args.device, args.full, args.shapes)
    if args.device == "cpu" and not args.full and "m2f" in args.shapes:
        print("CPU: the 1024x1024 shape is scaled down to 512x512 (4x fewer positions and queries); --full runs it")
    copy_bw = None
    if args.device == "cuda":
        copy_bw = copy_bandwidth("cuda")
        print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")

    methods = [m for m in METHODS if not (args.skip_reference and m == "reference")]
    agree = check_agreement(make_shape("check", 1, 64), args.device)
    print(
        f"agreement on a 64x64 check shape ({'float64' if args.device == 'cpu' else 'float32'}): "
        f"max |out - reference| / max |reference|: unfused {agree['unfused']:.1e}, fused {agree['fused']:.1e}"
    )
    for shape in shapes:
        print(
            f"\n== {shape['name']}: S={shape['S']}, Q={shape['Q']}, H={shape['H']}, D={shape['D']}, "
            f"L={len(shape['levels'])}, P={shape['P']}, r={shape['r']}"
        )
        results = {}
        for m in methods:
            if args.device == "cpu":
                results[m] = measure_isolated(m, shape, dtype, repeats, args.threads)
            else:
                results[m] = measure(m, shape, "cuda", dtype, repeats)
        base = results.get("reference")
        bw_head = f"{'f+b GB/s':>9}{'/copy':>7}" if copy_bw else ""
        print(
            f"{'method':<20}{'fwd ms':>9}{'fwd+bwd ms':>12}{'peak MiB':>9}  {'ref/this fwd':>12}{'ref/this f+b':>13}"
            f"{'unfused/this f+b':>17}{bw_head}"
        )
        for m in methods:
            res = results[m]
            if "error" in res:
                print(f"{m:<20} error: {res['error']}")
                continue
            ratios = ""
            if base and "error" not in base and m != "lora_offsets_attn":
                ratios = f"{base['fwd'] / res['fwd']:11.2f}x{base['fwdbwd'] / res['fwdbwd']:12.2f}x"
            else:
                ratios = " " * 25
            if "unfused" in results and "error" not in results["unfused"] and m != "lora_offsets_attn":
                ratios += f"{results['unfused']['fwdbwd'] / res['fwdbwd']:16.2f}x"
            else:
                ratios += " " * 17
            if copy_bw and m != "lora_offsets_attn":
                bw = min_bytes(m, shape, dtype, True) / res["fwdbwd"]
                ratios += f"{bw / 1e9:9.0f}{bw / copy_bw:7.2f}"
            print(f"{m:<20}{fmt_ms(res['fwd'])}{fmt_ms(res['fwdbwd']):>12}{fmt_mb(res['peak'])} {ratios}")
        print(auto_summary(shape, args.device, dtype, max(repeats, 5)))
        if "fused" in results and "lora_offsets_attn" in results and "error" not in results["fused"]:
            share = results["lora_offsets_attn"]["fwdbwd"] / results["fused"]["fwdbwd"]
            print(
                f"LoRA of sampling_offsets + attention_weights costs {share:.1%} of the fused operator's fwd+bwd: "
                "the most that fusing it into the kernel could save"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
