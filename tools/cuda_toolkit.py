"""Find the CUDA toolkit for the builds (setup.py imports this; the Makefile runs it for CMake).

The `nvcc` on PATH may be a wrapper script in another folder, so the toolkit root is asked of
nvcc itself (`nvcc -dryrun` prints `_HERE_`, its real bin folder) rather than taken from the
wrapper's location. A GPU is never needed.

    python tools/cuda_toolkit.py            # prints the toolkit root, or nothing
    python tools/cuda_toolkit.py --cmake    # prints the -D arguments CMake's find_package(Torch) needs
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile


def _root_reported_by_nvcc(nvcc):
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cu")
        with open(source, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            proc = subprocess.run([nvcc, "-dryrun", "-c", source, "-o", os.path.join(tmp, "probe.o")],
                                  capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    match = re.search(r"^#\$ _HERE_=(.+)$", proc.stdout + proc.stderr, re.MULTILINE)
    return None if match is None else os.path.dirname(os.path.realpath(match.group(1).strip()))


def find_cuda_home():
    """Toolkit root holding bin/nvcc and include/cuda_runtime.h: CUDA_HOME, CUDA_PATH, then nvcc's own."""
    candidates = [os.environ[var] for var in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(var)]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        reported = _root_reported_by_nvcc(nvcc)
        if reported is not None:
            candidates.append(reported)
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
                os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def _nvrtc_library(cuda_home):
    """libnvrtc from the toolkit, else from the NVIDIA wheels that a pip-installed torch depends on."""
    found = sorted(glob.glob(os.path.join(cuda_home, "lib64", "libnvrtc.so*")))
    if not found:
        import torch

        site = os.path.dirname(os.path.dirname(torch.__file__))
        found = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")) +
                       glob.glob(os.path.join(site, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")))
        found = [f for f in found if "builtins" not in f]
    return found[0] if found else None


def cmake_args():
    """Arguments for find_package(Torch) with a CUDA build of torch; empty without a toolkit."""
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return []
    args = [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}", f"-DCMAKE_CUDA_COMPILER={os.path.join(cuda_home, 'bin', 'nvcc')}"]
    nvrtc = _nvrtc_library(cuda_home)
    if nvrtc is not None:
        args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc}")
    return args


if __name__ == "__main__":
    if sys.argv[1:] == ["--cmake"]:
        print(" ".join(cmake_args()))
    else:
        print(find_cuda_home() or "")
