"""`python -m peft_d2.env`: versions and capabilities of this installation, for bug reports."""

import importlib
import os
import platform
import sys


def reference_dir() -> str:
    """Where tools/setup_env.sh unpacks the official Mask2Former sdist (the parity tests' reference):
    $PEFT_D2_REFS/maskformer2-0.1; PEFT_D2_REFS defaults to ${PEFT_D2_HOME:-~/.cache/peft_d2}/refs."""
    home = os.environ.get("PEFT_D2_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "peft_d2"
    )
    return os.path.join(os.environ.get("PEFT_D2_REFS") or os.path.join(home, "refs"), "maskformer2-0.1")


def _version(name):
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any import failure is information here
        return None, f"not importable ({type(e).__name__}: {e})"
    return mod, getattr(mod, "__version__", "unknown")


def _detectron2_origin():
    from importlib import metadata

    for dist in ("detectron2", "sal-detectron2"):
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        if dist == "sal-detectron2":
            return "registry redistribution sal-detectron2 (pure Python)"
        return "official build (distribution 'detectron2')"
    return "source checkout on sys.path"


def collect() -> list:
    rows = [("Python", sys.version.split()[0] + f" ({platform.platform()})")]
    torch, v = _version("torch")
    rows.append(("torch", v))
    if torch is not None:
        rows.append(("torch CUDA", f"{torch.version.cuda} (available: {torch.cuda.is_available()})"))
        if torch.cuda.is_available():
            rows.append(("GPU", torch.cuda.get_device_name(0)))
    rows.append(("torchvision", _version("torchvision")[1]))
    d2, v = _version("detectron2")
    rows.append(("detectron2", v))
    if d2 is not None:
        rows.append(("detectron2 from", f"{_detectron2_origin()} at {os.path.dirname(d2.__file__)}"))
        try:
            importlib.import_module("detectron2._C")
            rows.append(("detectron2._C", "available"))
        except Exception as e:  # noqa: BLE001
            rows.append(("detectron2._C", f"unavailable ({type(e).__name__}); deformable conv and fast COCOeval off"))
    import peft_d2

    rows.append(("peft_d2", f"{peft_d2.__version__} at {os.path.dirname(peft_d2.__file__)}"))
    try:
        from peft_d2 import ops

        info = ops.backend_info() if hasattr(ops, "backend_info") else {}
    except Exception as e:  # noqa: BLE001
        info = {"error": f"{type(e).__name__}: {e}"}
    if not info:
        try:
            importlib.import_module("peft_d2._C")
            info = {"peft_d2._C": "importable"}
        except Exception as e:  # noqa: BLE001
            info = {"peft_d2._C": f"unavailable ({type(e).__name__}: {e})", "operator backend": "reference"}
    for k, v in info.items():
        rows.append((k, str(v)))
    ref = reference_dir()
    rows.append(("Mask2Former reference", ref if os.path.isdir(ref) else f"missing ({ref})"))
    return rows


def main():
    rows = collect()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
