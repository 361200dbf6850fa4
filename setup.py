"""Build script of peft_d2.

peft_d2._C holds the multi-scale deformable attention operator: the CPU kernel is always built; the CUDA
kernel too when torch has CUDA and nvcc is found (FORCE_CUDA=1 forces it, e.g. on a GPU-less build
machine; FORCE_CUDA=0 builds the CPU kernel alone). PEFT_D2_NO_EXT=1 installs the Python package alone
(tools/setup_env.sh builds the extension in place afterwards).
"""

import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(ROOT, "peft_d2", "__init__.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def find_cuda_home():
    """CUDA_HOME, or the toolkit the `nvcc` on PATH really runs (it may be a wrapper script)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True).stderr
        out += subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True
        ).stderr
    except OSError:
        return None
    m = re.search(r"_HERE_=(\S+)", out)
    return os.path.dirname(m.group(1)) if m else os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def extensions():
    if os.environ.get("PEFT_D2_NO_EXT") == "1":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not sources:
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cuda_home = find_cuda_home()
    force = os.environ.get("FORCE_CUDA")
    if force == "0":  # CPU-only build even where CUDA is available
        use_cuda = False
    else:
        use_cuda = force == "1" or (torch.version.cuda is not None and cuda_home is not None)
    define_macros = []
    extra = {"cxx": ["-O3", "-std=c++20"]}
    ext_cls = cpp_extension.CppExtension
    if use_cuda:
        if cuda_home is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit found: set CUDA_HOME or put nvcc on PATH")
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]
        ext_cls = cpp_extension.CUDAExtension
    ext = ext_cls(
        "peft_d2._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        py_limited_api=False,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="peft_d2",
    version=read_version(),
    description="Parameter-efficient fine-tuning (LoRA, adapters, prefix, MoPEFT, COBOT, SFA) for detectron2 "
    "and Mask2Former",
    packages=find_packages(exclude=("tests", "tools", "configs")),
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
