"""The demo and the python/ examples run end to end (no weights, no network)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_demo_prints_its_table():
    out = run("-m", "bayesvlm_ext.demo")
    for expected in ("probit, kron", "mc (1000 samples), kron", "timings", "moments kron"):
        assert expected in out


def test_open_clip_example_self_test():
    run(os.path.join("python", "score_open_clip.py"), "--self-test")
