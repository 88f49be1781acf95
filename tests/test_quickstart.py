"""The README's quickstart runs verbatim and prints what the README says it prints."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_blocks(heading: str) -> list[tuple[str, str]]:
    """(language, text) of the fenced blocks in the README section under `heading`."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index(heading):]
    section = section[:section.find("\n## ", 1)]
    return re.findall(r"^```(\w*)\n(.*?)^```", section, re.S | re.M)


def figures(text: str) -> list[tuple[str, float]]:
    return [(name, float(value)) for name, value in re.findall(r"(accuracy|NLPD|ECE) (\d+\.\d+)", text)]


def test_quickstart_runs_verbatim_and_prints_the_readme_figures():
    blocks = readme_blocks("## Quickstart")
    code = next(body for language, body in blocks if language == "python")
    printed = next(body for language, body in blocks if language == "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [line.split()[0] for line in printed.splitlines()], proc.stdout
    # Seeded data, model and fit: the same figures up to BLAS rounding on another CPU or thread count, which
    # can move the printed third decimal (an image crossing an ECE bin edge), not more.
    got, documented = figures(proc.stdout), figures(printed)
    assert [name for name, _ in got] == [name for name, _ in documented] and len(got) == 6, proc.stdout
    assert all(abs(a - b) <= 0.005 for (_, a), (_, b) in zip(got, documented)), (proc.stdout, printed)
    # What the quickstart is for: the posterior lowers NLPD and ECE under shift at the same accuracy.
    (_, map_acc), (_, map_nlpd), (_, map_ece), (_, acc), (_, nlpd), (_, ece) = got
    assert abs(acc - map_acc) < 0.01 and nlpd < map_nlpd and ece < map_ece
