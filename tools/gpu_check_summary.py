"""Write summary.json of tools/gpu_check.sh from its record folder, and print it as a table.

    python tools/gpu_check_summary.py RECORD_DIR OUT_DIR/summary.json

RECORD_DIR holds one file per fact (mode, started, budget_s, gpu, ...) and steps/NN-NAME/, one file per
field of that step (name, status, exit_status, ms, timeout_s, log, junit, collected, ...). A step's junit
file (in OUT_DIR) gives its test counts. Standard library only: it runs under whatever python the check used.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import xml.etree.ElementTree as ET

FAILING = ("failed", "timed out", "skipped: out of time", "skipped: build failed")
INT_FIELDS = ("exit_status", "timeout_s", "collected", "budget_s", "started")


def read_fields(folder: str) -> dict:
    fields = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        with open(path, errors="replace") as f:
            value = f.read().strip()
        if name in INT_FIELDS:
            try:
                value = int(value)
            except ValueError:
                pass
        fields[name] = value
    return fields


def junit_counts(path: str) -> dict | None:
    """{"passed", "failed", "errors", "skipped", "total"} summed over the file's test suites."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {"total": 0, "failed": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        counts["total"] += int(suite.get("tests", 0))
        counts["failed"] += int(suite.get("failures", 0))
        counts["errors"] += int(suite.get("errors", 0))
        counts["skipped"] += int(suite.get("skipped", 0))
    counts["passed"] = counts["total"] - counts["failed"] - counts["errors"] - counts["skipped"]
    return {key: counts[key] for key in ("passed", "failed", "errors", "skipped", "total")}


def main(record_dir: str, output: str) -> int:
    out_dir = os.path.dirname(os.path.abspath(output))
    top = read_fields(record_dir)
    steps = []
    steps_dir = os.path.join(record_dir, "steps")
    for entry in sorted(os.listdir(steps_dir)) if os.path.isdir(steps_dir) else []:
        fields = read_fields(os.path.join(steps_dir, entry))
        step = {"name": fields.pop("name", entry.split("-", 1)[-1]), "status": fields.pop("status", "not finished"),
                "exit_status": fields.pop("exit_status", None)}
        ms = fields.pop("ms", None)
        step["seconds"] = None if ms is None else round(int(ms) / 1000, 1)
        junit = fields.pop("junit", None)
        if junit:
            step["junit"] = junit
            step["tests"] = junit_counts(os.path.join(out_dir, junit))
        step.update(fields)
        steps.append(step)

    environment = next((s for s in steps if s["name"] == "environment"), {})
    started = top.get("started")
    now = datetime.datetime.now(datetime.timezone.utc)
    summary = {
        "mode": top.get("mode"),
        "ok": not any(s["status"] in FAILING or s["status"] == "not finished" for s in steps),
        "started": None if not isinstance(started, int) else
        datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": None if not isinstance(started, int) else round(now.timestamp() - started, 1),
        "budget_s": top.get("budget_s"),
        "gpu_visible": top.get("gpu_visible") == "1",
        "gpu": top.get("gpu") or None,
        "cuda_arch_list": top.get("cuda_arch_list"),
        "python": top.get("python"),
        **{key: environment.get(key) for key in ("python_version", "torch", "torch_cuda", "nvcc",
                                                  "compute_sanitizer")},
        "steps": steps,
    }
    with open(output, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")

    print(f"\ngpu-check summary ({summary['mode']}, {summary['seconds']} s of {summary['budget_s']} s, "
          f"GPU: {summary['gpu'] or 'none visible'}): {output}")
    for step in steps:
        tests = step.get("tests")
        detail = (f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                  f"{tests['skipped']} skipped" if tests else
                  f"{step['collected']} collected" if "collected" in step else
                  f"wrote {step['json']}" if "json" in step else "")
        seconds = "-" if step["seconds"] is None else f"{step['seconds']:.0f}s"
        print(f"  {step['name']:<12} {step['status']:<22} {seconds:>6}  {detail}")
    print("  all passed" if summary["ok"] else "  NOT all passed")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
