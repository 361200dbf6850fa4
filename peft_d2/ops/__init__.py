"""The multi-scale deformable attention operator (DESIGN.md principle 5).

`ms_deform_attn` and its fused-LoRA form `ms_deform_attn_lora` dispatch to the compiled kernels of peft_d2._C
(cuda, cpu) or to the pure-PyTorch reference; `backend_info()` says which runs and why.
"""

from ._extension import BACKENDS, ENV_VAR, MSDAFallbackWarning, backend_info, load_extension, select_backend
from .msda import ms_deform_attn, ms_deform_attn_lora
from .reference import lora_value_delta, ms_deform_attn_lora_reference, ms_deform_attn_reference

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "MSDAFallbackWarning",
    "backend_info",
    "load_extension",
    "lora_value_delta",
    "ms_deform_attn",
    "ms_deform_attn_lora",
    "ms_deform_attn_lora_reference",
    "ms_deform_attn_reference",
    "select_backend",
]
