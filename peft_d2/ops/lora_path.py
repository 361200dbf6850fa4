"""Which form of LoRA on value_proj an MSDeformAttn call runs: the fused operator or the unfused one.

Both compute the same thing (tests/test_ms_deform_attn.py holds outputs and gradients equal):
  unfused  value + s * z B^T materialised for all S positions, then `ms_deform_attn`: extra work ~ S;
  fused    `ms_deform_attn_lora`: z's r channels sampled beside the value for each of the Q queries' samples,
           B applied per head afterwards: extra work ~ Q.
So fusing pays when the queries are few against the positions (decoder-style cross-attention) and costs when
Q = S (the pixel decoder's self-attention). The rule: fused iff Q <= ratio(device) * S, with the ratio taken
from `python tools/benchmark_msda.py --sweep` (see CPU_RATIO). PEFT_D2_MSDA_FUSED=0|1|auto overrides it.
"""

import os

FUSED_ENV_VAR = "PEFT_D2_MSDA_FUSED"
FUSED_MODES = ("0", "1", "auto")

# Largest Q / S at which the fused path is the faster one, per device type.
# cpu: `python tools/benchmark_msda.py --sweep --threads 1 --repeats 7` on the project machine (float32, N=2,
#   S=5376, H=8, D=32, L=3, P=4, r=8): unfused / fused fwd+bwd = 3.2x at Q/S = 1/64, 1.27x at 1/8, 1.01x at 3/16,
#   0.95x at 1/4, 0.87x at 1/2, 0.77x at 1 (README "The deformable-attention operator"). The crossing lies
#   between 3/16 and 1/4.
# cuda: NOT measured (no GPU has run this code yet). A documented estimate: the fused CUDA kernel gives z's r
#   channels a second pass of the warp (C = D + r > 32 lanes), roughly doubling the kernel's forward work per
#   query, while the unfused path adds a few memory-bound passes over S * H * D; fused should pay only for
#   Q well below S. tools/gpu_check.py measures both paths at Q = S and Q << S; replace this with a measured value.
LORA_FUSED_MAX_QUERY_RATIO = {"cpu": 0.2, "cuda": 0.1}
DEFAULT_MAX_QUERY_RATIO = 0.1  # other devices (the reference backend): the conservative GPU estimate


def fused_lora_mode():
    """'0', '1' or 'auto' from PEFT_D2_MSDA_FUSED (unset or empty: 'auto'); any other value is an error."""
    raw = os.environ.get(FUSED_ENV_VAR, "")
    mode = raw.strip().lower() or "auto"
    if mode not in FUSED_MODES:
        raise ValueError(
            f"{FUSED_ENV_VAR}={raw!r}: expected 0 (always the unfused LoRA path), 1 (always fused) or auto "
            "(chosen per call by shape and device; the default when unset)"
        )
    return mode


def choose_lora_path(num_queries, num_positions, device_type):
    """('fused' | 'unfused', why) for an MSDeformAttn call with Q queries over S positions on `device_type`."""
    mode = fused_lora_mode()
    if mode != "auto":
        return ("fused" if mode == "1" else "unfused"), f"{FUSED_ENV_VAR}={mode}"
    ratio = LORA_FUSED_MAX_QUERY_RATIO.get(device_type, DEFAULT_MAX_QUERY_RATIO)
    q_over_s = num_queries / max(1, num_positions)
    path = "fused" if q_over_s <= ratio else "unfused"
    return path, f"auto: Q/S = {q_over_s:.3g} {'<=' if path == 'fused' else '>'} {ratio} on {device_type}"


def use_fused_lora(num_queries, num_positions, device_type):
    """True when `choose_lora_path` picks the fused operator."""
    return choose_lora_path(num_queries, num_positions, device_type)[0] == "fused"
