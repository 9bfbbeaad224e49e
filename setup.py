"""Builds lor2c_ops._C: the CPU kernels always, the CUDA kernels only when the installed torch is
a CUDA build and a CUDA toolkit is found (the GPU itself is not needed to build).

Environment: LOR2C_SKIP_EXT=1 installs the pure-Python package only (Triton and reference
backends); LOR2C_SKIP_CUDA=1 builds the CPU kernels only; LOR2C_CUDA_ARCHS="80;90" picks the
GPU architectures (default sm_80 and sm_90).
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_reason(torch, cuda_home):
    if os.environ.get("LOR2C_SKIP_CUDA") == "1":
        return "LOR2C_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return "the installed torch is not a CUDA build"
    if cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME)"
    return None


def _extensions():
    if os.environ.get("LOR2C_SKIP_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++17", "-fno-math-errno", "-ffp-contract=fast", "-Wno-psabi", "-fopenmp"]
    reason = _cuda_reason(torch, CUDA_HOME)
    if reason is None:
        archs = os.environ.get("LOR2C_CUDA_ARCHS", "80;90").split(";")
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
        ext = CUDAExtension(
            "lor2c_ops._C",
            sources + rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp"),
            define_macros=[("LOR2C_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        print(f"lor2c_ops: building the CPU kernels only: {reason}")
        ext = CppExtension(
            "lor2c_ops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(
    packages=find_packages(include=["lor2c_ops", "lor2c_ops.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
