"""Which path serves calls, and the pure-PyTorch fallback when the extension is absent."""

import os
import subprocess
import sys

import pytest
import torch

import bayesvlm_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_backend_names():
    assert bayesvlm_ext.backend("cpu") in ("cpu", "torch")
    assert bayesvlm_ext.backend(torch.device("cuda")) in ("cuda", "torch")
    assert bayesvlm_ext.backend("meta") == "torch"
    info = bayesvlm_ext.build_info()
    assert info["extension"] == bayesvlm_ext.has_extension()
    if info["extension"]:
        assert bayesvlm_ext.backend("cpu") == "cpu" and info["cpu_kernels"]


@pytest.mark.skipif(os.environ.get("CI") != "true" and not bayesvlm_ext.has_extension(),
                    reason="the extension is not built here")
def test_extension_is_built_in_ci():
    # `make test` builds the extension first; CI must exercise the compiled kernels, not the fallback.
    assert bayesvlm_ext.has_extension(), bayesvlm_ext.build_info()["load_error"]


def test_pure_pytorch_fallback_warns_once_and_matches():
    code = """
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import bayesvlm_ext
    import bayesvlm_ext.ops
assert bayesvlm_ext.backend("cpu") == "torch", bayesvlm_ext.backend("cpu")
assert sum("compiled extension not loaded" in str(w.message) for w in caught) == 1, [str(w.message) for w in caught]
g = torch.Generator().manual_seed(0)
phi = torch.randn(9, 4, generator=g, dtype=torch.float64)
C = torch.randn(4, 4, generator=g, dtype=torch.float64)
out = bayesvlm_ext.ops.kron_quadform(phi, C)
print(repr(out.tolist()))
"""
    env = dict(os.environ, BAYESVLM_EXT_DISABLE_EXTENSION="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    values = torch.tensor(eval(proc.stdout.strip()), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(9, 4, generator=g, dtype=torch.float64)
    C = torch.randn(4, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(values, bayesvlm_ext.ops.kron_quadform(phi, C), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not bayesvlm_ext.has_extension(), reason="the extension is not built here")
def test_another_build_of_the_library_loads_in_place_of_the_package_own(tmp_path):
    # BAYESVLM_EXT_LIBRARY is how `make test-sanitize-cpu` runs the tests against the AddressSanitizer build.
    copy = tmp_path / os.path.basename(bayesvlm_ext._extension._C.__file__)
    copy.write_bytes(open(bayesvlm_ext._extension._C.__file__, "rb").read())
    code = "import bayesvlm_ext, sys; print(bayesvlm_ext.build_info()); print(sys.modules.get('bayesvlm_ext._C'))"
    for path, loaded in ((str(copy), True), (str(tmp_path / "missing.so"), False)):
        env = dict(os.environ, BAYESVLM_EXT_LIBRARY=path)
        proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                              cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr
        info, module = proc.stdout.strip().splitlines()
        if loaded:
            assert "'cpu_kernels': True" in info and path in module
        else:  # a wrong path is reported, never silently replaced by the package's own build
            assert f"BAYESVLM_EXT_LIBRARY={path}: no such file" in info and module == "None"
