"""Loading of peft_d2._C and the choice of backend (cuda | cpu | reference) for the MSDeformAttn operator."""

import importlib
import os
import threading
import warnings

import torch

BACKENDS = ("cuda", "cpu", "reference")
ENV_VAR = "PEFT_D2_MSDA_BACKEND"
OP_NAMES = (
    "ms_deform_attn_forward",
    "ms_deform_attn_backward",
    "ms_deform_attn_lora_forward",
    "ms_deform_attn_lora_backward",
)


class MSDAFallbackWarning(UserWarning):
    """The compiled operator is missing or unusable and the pure-PyTorch reference runs instead."""


class _State:
    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.tried = False
        self.module = None
        self.error = None
        self.warned = False
        self.kernels = {}  # device type -> (available, reason), filled once (dynamo traces only dict reads)


_state = _State()


def _reset_for_tests():
    """Forget the import attempt and the warning (tests monkeypatch the import and load again)."""
    _state.reset()


def load_extension():
    """Imports peft_d2._C once and registers autograd/fake implementations; returns the module or None."""
    if _state.tried:
        return _state.module
    with _state.lock:
        if _state.tried:
            return _state.module
        try:
            _C = importlib.import_module("peft_d2._C")
        except (ImportError, OSError) as e:
            _state.error = f"peft_d2._C could not be imported ({type(e).__name__}: {e})"
        else:
            missing = [name for name in OP_NAMES if not _has_op(name)]
            if missing:
                _state.error = f"peft_d2._C ({_C.__file__}) lacks the operators {missing}: rebuild it"
            else:
                from . import _registration

                _registration.register()
                _state.module = _C
        _state.tried = True
    return _state.module


def _has_op(name):
    try:
        getattr(torch.ops.peft_d2, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _has_kernel(device_type):
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"peft_d2::{n}", key) for n in OP_NAMES)


def kernel_status(device_type):
    """(available, reason): whether the compiled kernel for `device_type` ('cpu' or 'cuda') can run."""
    if not _state.tried:
        load_extension()
    status = _state.kernels.get(device_type)
    if status is None:
        status = _state.kernels[device_type] = _kernel_status(device_type)
    return status


def _kernel_status(device_type):
    if load_extension() is None:
        return False, _state.error
    if not _has_kernel(device_type):
        if device_type == "cuda":
            return False, "peft_d2._C was built without CUDA (no nvcc or a CPU-only torch at build time)"
        return False, "peft_d2._C has no CPU kernel registered"
    if device_type == "cuda" and not torch.cuda.is_available():
        return False, "CUDA is not available at run time"
    return True, None


def _override():
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value and value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(BACKENDS)} (or unset for automatic)")
    return value or None


def _warn_fallback(reason):
    if not _state.warned:
        _state.warned = True
        warnings.warn(
            f"peft_d2.ops.ms_deform_attn falls back to the pure-PyTorch reference (slow): {reason}",
            MSDAFallbackWarning,
            stacklevel=4,
        )


def select_backend(device_type):
    """The backend that runs tensors of `device_type`; warns once when the compiled kernel has to be skipped."""
    override = _override()
    if override == "reference":
        return "reference"
    if override is not None and override != device_type:
        raise ValueError(f"{ENV_VAR}={override} cannot run tensors on {device_type}: move the tensors or unset it")
    if device_type not in ("cpu", "cuda"):
        return "reference"
    ok, reason = kernel_status(device_type)
    if ok:
        return device_type
    _warn_fallback(reason)
    return "reference"


def backend_info():
    """What `python -m peft_d2.env` prints about the operator: the build and the backend per device."""
    load_extension()
    info = {
        "extension_loaded": _state.module is not None,
        "extension_error": _state.error,
        "extension_path": getattr(_state.module, "__file__", None),
        "built_with_cuda": bool(getattr(_state.module, "with_cuda", 0)),
        "cpu_kernel": _state.module is not None and _has_kernel("cpu"),
        "cuda_kernel": _state.module is not None and _has_kernel("cuda"),
        "cuda_available": torch.cuda.is_available(),
        "env_override": os.environ.get(ENV_VAR) or None,
    }
    for dev in ("cpu", "cuda"):
        try:
            override = _override()
        except ValueError as e:
            info[f"backend_for_{dev}"] = f"error: {e}"
            continue
        if override == "reference" or (override is None and dev == "cuda" and not torch.cuda.is_available()):
            info[f"backend_for_{dev}"] = "reference" if override else "reference (no CUDA device)"
        elif override is not None and override != dev:
            info[f"backend_for_{dev}"] = f"error: {ENV_VAR}={override} cannot run {dev} tensors"
        else:
            ok, reason = kernel_status(dev)
            info[f"backend_for_{dev}"] = dev if ok else f"reference ({reason})"
    return info
