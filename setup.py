"""Build bayesvlm_ext._C: CPU kernels always, CUDA kernels whenever a CUDA toolkit is found.

Environment knobs (all optional):
  BAYESVLM_EXT_FORCE_CPU=1    build the CPU kernels only, even when a toolkit is present
  BAYESVLM_EXT_FORCE_CUDA=1   fail unless the CUDA kernels can be built
  BAYESVLM_EXT_DEBUG=1        -O0 -g (and -G for device code)
  BAYESVLM_EXT_SANITIZE=1     CPU kernels only, built with AddressSanitizer and UBSan (`make sanitize-cpu`;
                              load the result with BAYESVLM_EXT_LIBRARY and LD_PRELOAD of libasan)
  TORCH_CUDA_ARCH_LIST        CUDA architectures, default "8.0;9.0"
  CUDA_HOME                   toolkit root; otherwise found from the real nvcc on PATH

The toolkit is found from what nvcc itself reports, not from the folder of the `nvcc` on
PATH, which may be a wrapper script. A GPU is never needed to build.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
from cuda_toolkit import find_cuda_home  # noqa: E402

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def extensions():
    force_cpu, force_cuda, debug = _flag("BAYESVLM_EXT_FORCE_CPU"), _flag("BAYESVLM_EXT_FORCE_CUDA"), _flag(
        "BAYESVLM_EXT_DEBUG")
    sanitize = _flag("BAYESVLM_EXT_SANITIZE")
    if sanitize and force_cuda:
        raise RuntimeError("BAYESVLM_EXT_SANITIZE builds the CPU kernels only; unset BAYESVLM_EXT_FORCE_CUDA")
    force_cpu = force_cpu or sanitize  # the sanitizers instrument host code; the CUDA kernels have compute-sanitizer
    if force_cpu and force_cuda:
        raise RuntimeError("BAYESVLM_EXT_FORCE_CPU and BAYESVLM_EXT_FORCE_CUDA are both set; pick one")
    cuda_home = None if force_cpu else find_cuda_home()
    if force_cuda and cuda_home is None:
        raise RuntimeError("BAYESVLM_EXT_FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import: set it first.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -g0: Python's own CFLAGS (which setuptools passes first) carry -g, and debug information for torch's headers
    # nearly doubles the compile time (pairwise_moments.cpp 27 -> 17 s, kron_quadform.cpp 15 -> 8 s) for a release
    # build that nobody steps through; BAYESVLM_EXT_DEBUG and the sanitizer build keep -g.
    cxx_flags = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    cxx_flags += ["-fopenmp"]
    extra = dict(include_dirs=[os.path.join(here, "csrc")], extra_link_args=["-fopenmp"])
    if sanitize:
        # Every out-of-bounds access and undefined operation aborts the process (no recovery), so a test
        # run fails on the first one; -O2 keeps the code (fused multiply-adds included) that of a release build.
        checks = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
        cxx_flags = ["-O2", "-g", "-fno-omit-frame-pointer", "-fopenmp", *checks]
        extra["extra_link_args"] += checks
    # C++20 (template lambdas) on every torch: torch 2.15 asks for it itself, older ones default to C++17.
    # -fno-math-errno: std::sqrt need not set errno (nothing reads it), so the epilogues' sqrt loops vectorise
    # (with it, GCC keeps a scalar sqrt and a library call per element); the results are the same bits.
    cxx_flags += ["-std=c++20", "-fno-math-errno"]
    if cuda_home is None:
        print("bayesvlm_ext: building CPU kernels only")
        return [CppExtension("bayesvlm_ext._C", sources, extra_compile_args={"cxx": cxx_flags}, **extra)]
    print(f"bayesvlm_ext: building CPU and CUDA kernels with the toolkit at {cuda_home} "
          f"for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    nvcc_flags = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]
    nvcc_flags += ["--expt-relaxed-constexpr", "-std=c++20"]
    return [CUDAExtension("bayesvlm_ext._C", sources, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                          **extra)]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


setup(
    packages=find_packages(include=["bayesvlm_ext", "bayesvlm_ext.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
)
