"""Run the benchmarks, print a summary and write `benchmarks/results/<device>.json`.

    python -m benchmarks.report                 # CPU; extra arguments go to pytest, e.g. -k quadform
    BAYESVLM_BENCH_DEVICE=cuda python -m benchmarks.report
    python -m benchmarks.report --no-memory     # skip the top-k memory measurements

Runs `pytest benchmarks --benchmark-only --benchmark-json=<tmp>` in a subprocess, then, per
benchmark group, prints each entry's median time and its ratio to the group's baseline (the entry
whose `extra_info["role"]` is "baseline": torch.mm for the moments, the PyTorch twin for kron_quadform)
and to the naive reference where the group has a separate one. Ratios are time / baseline time,
so below 1 is faster. It then measures the peak extra memory of top-k and of the chunked
baseline, each in a fresh process (benchmarks/memory.py), and checks the issue's targets (TARGETS)
on the numbers of this one run. The JSON records the device, torch and CUDA versions, threads,
shapes, medians, ratios, memory and each target with its measured value and whether it was met.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile

import torch

import bayesvlm_ext

from .conftest import DEVICE_ENV

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def device_description(device: torch.device) -> tuple[str, str]:
    """(human-readable device name, file-name slug), e.g. ("AMD EPYC", "cpu-amd-epyc")."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_model()
    cleaned = re.sub(r"\((R|TM|tm|r)\)|\bCPU\b|@.*$", " ", name)
    slug = re.sub(r"[^a-z0-9]+", "-", cleaned.lower()).strip("-") or "unknown"
    return name, f"{device.type}-{slug}"


def run_pytest(json_path: str, pytest_args: list[str]) -> int:
    command = [sys.executable, "-m", "pytest", os.path.relpath(BENCH_DIR, REPO_ROOT), "--benchmark-only",
               f"--benchmark-json={json_path}", *pytest_args]
    print("$", " ".join(command), flush=True)
    return subprocess.call(command, cwd=REPO_ROOT)


def summarise(raw: dict) -> list[dict]:
    """Per group: baseline and reference names, and each entry's median (ms) and ratios."""
    groups: dict[str, list[dict]] = {}
    for bench in raw["benchmarks"]:
        groups.setdefault(bench["group"], []).append(bench)
    summary = []
    for group, benches in groups.items():
        by_role = {b["extra_info"].get("role"): b for b in benches}
        baseline, reference = by_role.get("baseline"), by_role.get("reference")
        entries = []
        for bench in sorted(benches, key=lambda b: b["stats"]["median"]):
            median = bench["stats"]["median"]
            entries.append({
                "name": bench["name"],
                "role": bench["extra_info"].get("role"),
                "median_ms": 1e3 * median,
                "min_ms": 1e3 * bench["stats"]["min"],
                "iqr_ms": 1e3 * bench["stats"]["iqr"],
                "rounds": bench["stats"]["rounds"],
                "ratio_to_baseline": None if baseline is None else median / baseline["stats"]["median"],
                "ratio_to_reference": None if reference is None else median / reference["stats"]["median"],
            })
        summary.append({
            "group": group,
            "shape": benches[0]["extra_info"].get("shape"),
            "baseline": None if baseline is None else baseline["name"],
            "reference": None if reference is None else reference["name"],
            "results": entries,
        })
    return summary


# (description, device type, dtype, measured as a function of {key: median seconds} in the group, op, bound)
TARGETS = [
    ("moments kron / torch.mm", "cpu", "float32", "moments", lambda t: t["kron"] / t["mm"], "<=", 1.3),
    ("reference diag / moments kron", "cpu", "float32", "moments", lambda t: t["reference_diag"] / t["kron"], ">=",
     4.0),
    ("reference diag / fused diag", "cpu", "float32", "moments", lambda t: t["reference_diag"] / t["diag"], ">=",
     3.0),
    ("topk mean / chunked mm+topk", "cpu", "float32", "topk", lambda t: t["topk_mean"] / t["chunked_mm_topk"], "<=",
     1.2),
    ("topk pessimistic / chunked mm+topk", "cpu", "float32", "topk",
     lambda t: t["topk_pessimistic"] / t["chunked_mm_topk"], "<=", 1.2),
    ("kfac per-sample / fast factors (N = C = 4096)", "cpu", "float64", "kfac", lambda t: t["per_sample"] / t["fast"],
     ">=", 100.0),
] + [
    target
    for dtype in ("bfloat16", "float32")
    for target in (
        (f"moments kron / max(torch.mm, write outputs), {dtype}", "cuda", dtype, "moments",
         lambda t: t["kron"] / max(t["mm"], t["write_outputs"]), "<=", 1.3),
        (f"reference diag / moments kron, {dtype}", "cuda", dtype, "moments",
         lambda t: t["reference_diag"] / t["kron"], ">=", 5.0),
        (f"topk mean / chunked mm+topk, {dtype}", "cuda", dtype, "topk",
         lambda t: t["topk_mean"] / t["chunked_mm_topk"], "<", 1.0),
    )
]
MEMORY_TARGET_MB = {"cpu": 64.0, "cuda": 256.0}


def check_targets(raw: dict, device_type: str) -> list[dict]:
    """Each target of TARGETS for this device type, measured on this run's medians."""
    medians: dict[tuple[str, str], dict[str, float]] = {}
    for bench in raw["benchmarks"]:
        info = bench["extra_info"]
        medians.setdefault((info.get("kind"), info.get("dtype")), {})[info.get("key")] = bench["stats"]["median"]
    results = []
    for description, target_device, dtype, kind, measure, op, bound in TARGETS:
        if target_device != device_type:
            continue
        try:
            value = measure(medians[(kind, dtype)])
        except KeyError:
            results.append({"target": description, "bound": f"{op} {bound}", "measured": None, "met": None})
            continue
        met = {"<=": value <= bound, ">=": value >= bound, "<": value < bound}[op]
        results.append({"target": description, "bound": f"{op} {bound}", "measured": value, "met": met})
    return results


def measure_memory(device_type: str) -> list[dict]:
    """Peak extra memory of top-k and of the chunked baseline, each in a fresh process."""
    dtypes = ["bfloat16", "float32"] if device_type == "cuda" else ["float32"]
    runs = []
    for dtype in dtypes:
        for impl, score in (("chunked_mm_topk", None), ("topk", "mean"), ("topk", "pessimistic")):
            command = [sys.executable, "-m", "benchmarks.memory", "--impl", impl, "--dtype", dtype]
            if score:
                command += ["--score", score]
            out = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
            run = json.loads(out.strip().splitlines()[-1])
            run["target_mb"] = MEMORY_TARGET_MB[device_type] if impl == "topk" else None
            run["met"] = None if impl != "topk" else run["extra_mb"] < MEMORY_TARGET_MB[device_type]
            runs.append(run)
    return runs


def print_table(summary: list[dict]) -> None:
    def ratio(value):
        return "-" if value is None else f"{value:.2f}x"

    for group in summary:
        print(f"\n{group['group']}  (baseline: {group['baseline']}"
              + (f", reference: {group['reference']})" if group["reference"] else ")"))
        print(f"  {'name':<52} {'median ms':>10} {'vs baseline':>12} {'vs reference':>13}")
        for entry in group["results"]:
            print(f"  {entry['name']:<52} {entry['median_ms']:>10.2f} {ratio(entry['ratio_to_baseline']):>12} "
                  f"{ratio(entry['ratio_to_reference']):>13}")


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: ""}[met]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="results file (default: benchmarks/results/<device>.json)")
    parser.add_argument("--no-memory", action="store_true", help="skip the top-k memory measurements")
    args, pytest_args = parser.parse_known_args(argv)
    device = torch.device(os.environ.get(DEVICE_ENV, "cpu"))
    name, slug = device_description(device)

    with tempfile.TemporaryDirectory() as folder:
        json_path = os.path.join(folder, "benchmark.json")
        status = run_pytest(json_path, pytest_args)
        if status != 0 or not os.path.isfile(json_path):
            print(f"benchmarks failed (pytest exit status {status}); no results written", file=sys.stderr)
            return status or 1
        with open(json_path) as f:
            raw = json.load(f)

    summary = summarise(raw)
    threads = {b["extra_info"].get("threads") for b in raw["benchmarks"]} - {None}
    result = {
        "device": name,
        "device_type": device.type,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads.pop() if len(threads) == 1 else sorted(threads),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "bayesvlm_ext": bayesvlm_ext.__version__,
        "backend": bayesvlm_ext.backend(device),
        "python": platform.python_version(),
        "datetime": raw.get("datetime") or datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "groups": summary,
        "targets": check_targets(raw, device.type),
        "memory": [] if args.no_memory else measure_memory(device.type),
    }
    print_table(summary)
    print("\ntargets (this run)")
    for target in result["targets"]:
        value = "-" if target["measured"] is None else f"{target['measured']:.2f}"
        print(f"  {target['target']:<55} {value:>8}  {target['bound']:<8} {_verdict(target['met'])}")
    for run in result["memory"]:
        name = run["impl"] + (f" {run['score']}" if run["score"] else "") + f" {run['dtype']}"
        bound = f"< {run['target_mb']:.0f} MB" if run["target_mb"] else ""
        print(f"  peak extra memory {name:<37} {run['extra_mb']:>6.1f} MB  {bound:<8} {_verdict(run['met'])}")
    output = args.output or os.path.join(BENCH_DIR, "results", f"{slug}.json")
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"\nwrote {os.path.relpath(output, REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
