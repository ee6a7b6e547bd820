"""Build of the sparsekern distribution: the `sparse` package and its one extension, `sparse._C`.

The C++ CPU sources are always built (OpenMP, -O3, C++17, baseline ISA: AVX2/AVX-512 kernels are chosen at run
time). CUDA sources are added only when torch has CUDA and CUDA_HOME exists; SPARSEKERN_CUDA=1 forces them,
SPARSEKERN_CUDA=0 leaves them out. CUDA targets come from TORCH_CUDA_ARCH_LIST (default "8.0;9.0"; 8.0 is the
minimum: the kernels use cp.async, ldmatrix and mma.sp). SPARSEKERN_SANITIZE=1 builds with AddressSanitizer and UBSan.
Install with `pip install --no-build-isolation .` so the extension compiles against the torch you run.
"""

import glob
import os
import re

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("SPARSEKERN_CUDA", "auto").lower()
    if flag in ("0", "false", "no"):
        return False
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("1", "true", "yes"):
        if not available:
            raise RuntimeError(
                f"SPARSEKERN_CUDA=1 but torch.version.cuda={torch.version.cuda!r} and CUDA_HOME={CUDA_HOME!r}: "
                "install a CUDA build of torch and the CUDA toolkit"
            )
        return True
    return available


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    link = ["-fopenmp"]
    if os.environ.get("SPARSEKERN_SANITIZE") == "1":
        cxx = ["-O1", "-g", "-std=c++17", "-fopenmp", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
               "-DSPARSEKERN_SANITIZE"]
        link += ["-fsanitize=address,undefined"]
    if not _want_cuda():
        return CppExtension("sparse._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # The kernels use cp.async, ldmatrix and mma.sp (sm_80+); an older target would fail deep inside nvcc.
    # Named architectures ("Ampere", ...) are left to torch.
    old = [a for a in arch.replace(",", ";").replace(" ", ";").split(";")
           if re.fullmatch(r"\d+\.\d+[af]?(\+PTX)?", a) and float(re.match(r"\d+\.\d+", a).group()) < 8.0]
    if old:
        raise RuntimeError(f"TORCH_CUDA_ARCH_LIST={arch!r} has {old}: the CUDA kernels need compute capability 8.0+")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    return CUDAExtension(
        "sparse._C",
        sources + rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp"),
        extra_compile_args={
            "cxx": cxx + ["-DSPARSEKERN_WITH_CUDA"],
            "nvcc": ["-O3", "-std=c++17", "-DSPARSEKERN_WITH_CUDA"],
        },
        extra_link_args=link,
    )


setup(
    packages=["sparse", "sparse.prune", "sparse.kernels", "sparse.benchmarks"],
    package_dir={"sparse": "sparse", "sparse.kernels": "kernels", "sparse.benchmarks": "benchmarks"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
