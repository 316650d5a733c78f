"""Builds the native extension monet._C (C++ CPU kernels always, CUDA kernels when possible).

Build switches (build-time configuration, read only here):
  MONET_BUILD_CUDA=0|1   force the CUDA half off/on (default: on when torch is a CUDA build and
                         nvcc is found)
  MONET_CUDA_ARCHS       semicolon list of compute capabilities, default "8.0;9.0" (A100, H100)
  CUDA_HOME              toolkit root; derived from the real nvcc binary when unset
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "monet" / "__init__.py").read_text()).group(1)


def find_cuda_home() -> str | None:
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = Path(nvcc).resolve()
    # The nvcc on PATH can be a small wrapper script that execs the toolkit's binary.
    try:
        text = real.read_text(errors="ignore")[:4096] if real.stat().st_size < 65536 else ""
    except OSError:
        text = ""
    m = re.search(r"(/\S+/bin/nvcc)", text)
    if m and Path(m.group(1)).exists():
        real = Path(m.group(1)).resolve()
    return str(real.parent.parent)


def extensions():
    import torch
    from torch.utils import cpp_extension

    want_cuda = os.environ.get("MONET_BUILD_CUDA", "auto")
    cuda_home = find_cuda_home()
    use_cuda = torch.version.cuda is not None and cuda_home is not None
    if want_cuda == "0":
        use_cuda = False
    elif want_cuda == "1" and not use_cuda:
        raise RuntimeError("MONET_BUILD_CUDA=1 but torch is not a CUDA build or nvcc was not found")

    archs = os.environ.get("MONET_CUDA_ARCHS", "8.0;9.0")
    sources = ["csrc/latent_ops.cpp", "csrc/module.cpp"]
    define = [
        f'-DMONET_VERSION="{VERSION}"',
        f'-DMONET_TORCH_VERSION="{torch.__version__}"',
    ]
    cxx = ["-O3", "-std=c++20", "-fopenmp", *define]
    if not use_cuda:
        return [cpp_extension.CppExtension("monet._C", sources, extra_compile_args={"cxx": cxx},
                                           extra_link_args=["-fopenmp"])]

    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home  # computed at import time from a possibly wrong guess
    gencode = []
    for a in archs.split(";"):
        cc = a.replace(".", "")
        gencode += ["-gencode", f"arch=compute_{cc},code=sm_{cc}"]
    define.append(f'-DMONET_CUDA_ARCHS="{archs}"')
    define.append("-DMONET_WITH_CUDA")
    cxx.append("-DMONET_WITH_CUDA")
    cxx.append(f'-DMONET_CUDA_ARCHS="{archs}"')
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", *gencode, *define]
    return [cpp_extension.CUDAExtension("monet._C", sources + ["csrc/latent_ops_cuda.cu"],
                                        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                                        extra_link_args=["-fopenmp"])]


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


setup(ext_modules=extensions(), cmdclass=cmdclass())
