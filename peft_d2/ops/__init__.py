"""The multi-scale deformable attention operator (docs/design.md, principle 5).

`ms_deform_attn` and its fused-LoRA form `ms_deform_attn_lora` dispatch to the compiled kernels of peft_d2._C
(cuda, cpu) or to the pure-PyTorch reference; `backend_info()` says which runs and why. `choose_lora_path` says
whether MSDeformAttn runs LoRA on value_proj through the fused operator or the unfused one (lora_path.py).
"""

from ._extension import BACKENDS, ENV_VAR, MSDAFallbackWarning, backend_info, load_extension, select_backend
from .lora_path import FUSED_ENV_VAR, choose_lora_path, fused_lora_mode, use_fused_lora
from .msda import level_starts, ms_deform_attn, ms_deform_attn_lora
from .reference import lora_value_delta, ms_deform_attn_lora_reference, ms_deform_attn_reference

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "FUSED_ENV_VAR",
    "MSDAFallbackWarning",
    "backend_info",
    "choose_lora_path",
    "fused_lora_mode",
    "level_starts",
    "load_extension",
    "lora_value_delta",
    "ms_deform_attn",
    "ms_deform_attn_lora",
    "ms_deform_attn_lora_reference",
    "ms_deform_attn_reference",
    "select_backend",
    "use_fused_lora",
]
