# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""Builds dpo_kernels._C, the PyTorch C++ extension, from the repository's headers.

The extension is built against the torch installed in the running interpreter (install
with `pip install --no-build-isolation ./python`). CUDA kernels are compiled when torch was
built with CUDA, nvcc is found (CUDA_HOME) and the CUDA API (kernels/dpo/cuda/dpo.cuh) is
present; otherwise the build is CPU-only. Environment:
  DPO_KERNELS_CUDA=0|1   force the CUDA build off / on (on fails if it is impossible)
  EIGEN3_INCLUDE_DIR     Eigen headers (default /usr/include/eigen3, Debian's libeigen3-dev)
  DPO_KERNELS_NATIVE=0|1 add -march=native (default 0). Not needed for speed: the CPU row
                         kernels are compiled for SSE2, AVX2 and AVX-512 and pick the best one
                         the running CPU has (docs/performance.md, "Instruction sets"), and so
                         are the fused head's GEMMs (csrc/gemm_isa.h), so the default build is
                         a portable x86-64 wheel at native speed. 1 ties the extension to CPUs
                         like the build machine's.
  DPO_KERNELS_CUDA_ARCHS compute capabilities of the CUDA kernels, as numbers joined by ';'
                         (default "80;90": A100 and H100/H200)
  MAX_JOBS               parallel compile jobs (torch's variable)
"""
import os
import re
from pathlib import Path

import setuptools
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


def _link_cxx() -> list:
    """The command that links the extension: $CXX when set (setuptools and torch use it), else
    the interpreter's configured C++ compiler."""
    import shlex
    import sysconfig

    return shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")


def _shared_libstdcxx_args(torch_module) -> list:
    """Link flags that make the extension use the libstdc++ that torch runs with, or [].

    Some toolchains' g++ (a wrapper on one CUDA image, whose libstdc++ exists only as a static
    archive) link libstdc++ statically into shared objects. The extension then carries its own
    copy beside torch's shared one, and the two share data symbols: the process crashed the
    first time the extension formatted a number (any error message). A probe library tells:
    when its stream code is defined inside it, link the extension against the libstdc++.so.6
    this process (with torch) has loaded instead; the static archive then adds nothing.
    """
    import subprocess
    import tempfile

    probe = "#include <sstream>\n#include <string>\nstd::string f(long x) { std::ostringstream s; s << x; return s.str(); }\n"
    with tempfile.TemporaryDirectory() as d:
        src, lib = Path(d) / "probe.cpp", Path(d) / "probe.so"
        src.write_text(probe)
        try:
            subprocess.run(_link_cxx() + ["-shared", "-fPIC", "-O1", str(src), "-o", str(lib)], check=True,
                           capture_output=True)
            nm = subprocess.run(["nm", "-D", "--defined-only", str(lib)], check=True, capture_output=True,
                                text=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return []  # no probe possible: the build itself reports a broken compiler
    if "_ZNSo9_M_insertIlEERSoT_" not in nm:  # std::ostream::_M_insert<long>: libstdc++.so's
        return []
    loaded = [line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
              if line.rstrip().endswith("/libstdc++.so.6") or "/libstdc++.so.6." in line]
    if not loaded:
        raise RuntimeError(f"{' '.join(_link_cxx())} links libstdc++ statically into shared libraries, and the "
                           f"libstdc++.so.6 that torch {torch_module.__version__} uses was not found to link "
                           "against instead: set CXX to a compiler that links it dynamically (e.g. /usr/bin/g++)")
    lib_dir = str(Path(loaded[0]).parent)
    print(f"dpo_kernels: {' '.join(_link_cxx())} links libstdc++ statically; linking the extension against "
          f"{loaded[0]} (torch's) instead")
    return [f"-L{lib_dir}", "-l:libstdc++.so.6"]


# The fused head's Eigen GEMM compiled once more per instruction set, each file with its own
# flags (csrc/gemm_isa.h; csrc/gemm_select.cpp picks one at run time). x86-64 with GCC or
# Clang only, as the row kernels' variants (include/dpo/cpu/isa.hpp).
_GEMM_VARIANTS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl"],
}


def _gemm_variants() -> dict:
    import platform
    import sysconfig

    if platform.machine().lower() not in ("x86_64", "amd64") or sysconfig.get_platform().startswith("win"):
        return {}
    return _GEMM_VARIANTS


def _cxx_flags() -> list:
    cxx = ["-O3", "-DNDEBUG", "-Wno-unused-parameter"]
    if os.environ.get("DPO_KERNELS_NATIVE", "0") == "1":
        cxx.append("-march=native")
    if _gemm_variants():
        cxx.append("-DDPO_KERNELS_GEMM_VARIANTS")
    return cxx


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    if not (REPO / "include" / "dpo" / "dpo.hpp").exists():
        raise RuntimeError(f"{REPO / 'include'} not found: build from a checkout of the dpo repository")
    include_dirs = [str(REPO / "include"), str(REPO / "kernels"), str(HERE / "csrc"), _eigen_dir()]
    sources = ["csrc/ops.cpp", "csrc/cpu.cpp", "csrc/shard.cpp", "csrc/linear.cpp", "csrc/linear_dpo.cpp",
               "csrc/gemm_select.cpp"]
    link = _shared_libstdcxx_args(torch)
    cxx = _cxx_flags()
    if _want_cuda(torch.version.cuda is not None, CUDA_HOME):
        # No -std: torch passes its own standard to g++ and nvcc alike (C++17 in torch 2.11,
        # C++20 in 2.15), and every translation unit of the extension must use the same one.
        archs = [a for a in os.environ.get("DPO_KERNELS_CUDA_ARCHS", "80;90").split(";") if a]
        if not archs or not all(a.isdigit() for a in archs):
            raise RuntimeError(f"DPO_KERNELS_CUDA_ARCHS must be numbers joined by ';', got {archs!r}")
        nvcc = ["-O3", "-DNDEBUG", "--expt-relaxed-constexpr"]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        return [CUDAExtension("dpo_kernels._C", sources + ["csrc/cuda.cu", "csrc/cuda_linear.cu", "csrc/cuda_shard.cu",
                                                          "csrc/cuda_linear_shard.cu"], include_dirs=include_dirs,
                              define_macros=[("DPO_KERNELS_WITH_CUDA", None)],
                              extra_compile_args={"cxx": cxx + ["-DDPO_KERNELS_WITH_CUDA"], "nvcc": nvcc},
                              extra_link_args=link)]
    return [CppExtension("dpo_kernels._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                         extra_link_args=link)]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension):
        """torch's build, plus the GEMM variant files compiled first, each with its own flags
        (an extension has one set of flags for all its sources), linked in as objects."""

        def build_extension(self, ext):
            objects = []
            for level, flags in _gemm_variants().items():
                source = str(HERE / "csrc" / f"gemm_{level}.cpp")
                objects += self.compiler.compile([source], output_dir=self.build_temp, include_dirs=ext.include_dirs,
                                                 extra_postargs={"cxx": _cxx_flags() + flags})
            # After the extension's own objects on the link line: where a weak symbol the
            # variant files share with them (from the C++ library's headers) was not inlined,
            # the linker keeps the baseline copy (gemm_isa.h: Eigen itself is renamed).
            ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

    return {"build_ext": Build.with_options(use_ninja=True)}


def _license() -> dict:
    """The license, set here rather than in pyproject.toml: setuptools 77+ reads the SPDX form
    (license_expression), and the older ones a build machine may have (Ubuntu 24.04's 68,
    Debian 12's 66; `--no-build-isolation` uses them) reject it in pyproject.toml and take the
    text form (license)."""
    major = int(re.match(r"\d+", setuptools.__version__).group())
    return {"license_expression": "Apache-2.0"} if major >= 77 else {"license": "Apache-2.0"}


setup(version=_version(), ext_modules=_extensions(), cmdclass=_cmdclass(), **_license())
