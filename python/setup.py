# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""Builds dpo_kernels._C, the PyTorch C++ extension, from the repository's headers.

The extension is built against the torch installed in the running interpreter (install
with `pip install --no-build-isolation ./python`). CUDA kernels are compiled when torch was
built with CUDA, nvcc is found (CUDA_HOME) and the CUDA API (kernels/dpo/cuda/dpo.cuh) is
present; otherwise the build is CPU-only. Environment:
  DPO_KERNELS_CUDA=0|1   force the CUDA build off / on (on fails if it is impossible)
  EIGEN3_INCLUDE_DIR     Eigen headers (default /usr/include/eigen3, Debian's libeigen3-dev)
  DPO_KERNELS_NATIVE=0|1 compile the CPU kernels for the build machine's instruction set
                         (-march=native, default 1: pip builds on the machine it installs to;
                         set 0 for a portable wheel). Vectorised exp over the vocabulary is
                         most of the CPU time, and AVX2/AVX-512 do 2-4x the work of SSE2.
  DPO_KERNELS_CUDA_ARCHS compute capabilities of the CUDA kernels, as numbers joined by ';'
                         (default "80;90": A100 and H100/H200)
  MAX_JOBS               parallel compile jobs (torch's variable)
"""
import os
import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _version() -> str:
    text = (REPO / "include" / "dpo" / "version.hpp").read_text()
    parts = [re.search(rf"#define DPO_VERSION_{p} (\d+)", text).group(1) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(parts)


def _eigen_dir() -> str:
    candidates = [os.environ.get("EIGEN3_INCLUDE_DIR"), "/usr/include/eigen3", "/usr/local/include/eigen3"]
    for c in candidates:
        if c and (Path(c) / "Eigen" / "Core").exists():
            return c
    raise RuntimeError("Eigen 3 headers not found: install Debian's libeigen3-dev or set EIGEN3_INCLUDE_DIR")


def _want_cuda(torch_cuda: bool, cuda_home) -> bool:
    forced = os.environ.get("DPO_KERNELS_CUDA")
    # The CUDA kernels of the ops (csrc/cuda.cu) bind kernels/dpo/cuda/dpo.cuh; until both
    # exist the build is CPU-only, and CUDA tensors get the dispatcher's "no CUDA kernel" error.
    has_api = (REPO / "kernels" / "dpo" / "cuda" / "dpo.cuh").exists() and (HERE / "csrc" / "cuda.cu").exists()
    possible = torch_cuda and cuda_home is not None and has_api
    if forced == "0":
        return False
    if forced == "1" and not possible:
        raise RuntimeError(
            f"DPO_KERNELS_CUDA=1 but the CUDA build is impossible: torch CUDA={torch_cuda}, "
            f"CUDA_HOME={cuda_home}, kernels/dpo/cuda/dpo.cuh and csrc/cuda.cu present={has_api}"
        )
    return possible


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    if not (REPO / "include" / "dpo" / "dpo.hpp").exists():
        raise RuntimeError(f"{REPO / 'include'} not found: build from a checkout of the dpo repository")
    include_dirs = [str(REPO / "include"), str(REPO / "kernels"), str(HERE / "csrc"), _eigen_dir()]
    sources = ["csrc/ops.cpp", "csrc/cpu.cpp"]
    cxx = ["-O3", "-DNDEBUG", "-Wno-unused-parameter"]
    if os.environ.get("DPO_KERNELS_NATIVE", "1") != "0":
        cxx.append("-march=native")
    if _want_cuda(torch.version.cuda is not None, CUDA_HOME):
        # C++20: the headers of recent torch (2.15 here) refuse older standards in ATen.h.
        archs = [a for a in os.environ.get("DPO_KERNELS_CUDA_ARCHS", "80;90").split(";") if a]
        if not archs or not all(a.isdigit() for a in archs):
            raise RuntimeError(f"DPO_KERNELS_CUDA_ARCHS must be numbers joined by ';', got {archs!r}")
        nvcc = ["-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-std=c++20"]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        return [CUDAExtension("dpo_kernels._C", sources + ["csrc/cuda.cu"], include_dirs=include_dirs,
                              define_macros=[("DPO_KERNELS_WITH_CUDA", None)],
                              extra_compile_args={"cxx": cxx + ["-DDPO_KERNELS_WITH_CUDA"], "nvcc": nvcc})]
    return [CppExtension("dpo_kernels._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx})]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(version=_version(), ext_modules=_extensions(), cmdclass=_cmdclass())
