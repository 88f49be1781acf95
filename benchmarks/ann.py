"""Approximate candidates with exact scores against exact streaming search, and FAISS flat against exact `topk`.

`python -m benchmarks.ann [--rows 1000000] [--dim 512] [--queries 256] [--out PATH]` writes
benchmarks/results/ann-cpu.json and prints the README's tables. One process, every figure against a baseline
measured in the same run; nothing else should run on the machine meanwhile.

Data (generated, seeded; no download): M kron-form gallery embeddings around 2000 cluster centres (real
embeddings are clustered; on structureless Gaussian data every ANN structure degrades), D = 512, float32,
per-item scalar alpha log-uniform over two decades (rho = ||mu||^2 / tr(S) from about 3 to 300, so that the
uncertainty-aware orders differ from the mean's), and N query embeddings near random gallery items, each with
its own kron covariance. One shard of M rows per index (the ANN structure is per shard: at this scale use
shards of 1M rows or more, else each query probes every shard's structure).

Measured:
  1. exact `search` per score (the baseline), median of 2 passes over the N queries;
  2. per ANN structure (ivf-flat, ivf-pq, hnsw; AnnSpec defaults) and candidate count C (and nprobe for IVF):
     time of one search of the N queries (median of 3), the proposal alone, recall@10 of every score against
     exact search, index size and build time;
  3. the bound that mean-ordered candidates put on recall: the share of each score's exact top-10 inside the
     exact mean top-C (what a perfect engine proposing by mean would find);
  4. FAISS IndexFlatIP against `topk(score="mean")` and "probit" at N x 200k and 16 x M (exact search).
The 10M extrapolation is stated in the README: exact search and the IVF proposal scale with M (nlist is capped
by the training sample), the re-scoring with N C only, HNSW's proposal with about log M.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time

import torch

from bayesvlm_ext import EmbeddingDistribution, search, topk
from bayesvlm_ext.index import AnnSpec, save_index
from bayesvlm_ext.index.ann import ann_vectors, faiss_module, propose, query_vectors, search_params

OUT = os.path.join(os.path.dirname(__file__), "results", "ann-cpu.json")
SCORES = ["mean", "pessimistic", "optimistic", "probit"]
K = 10
LOGIT_SCALE = math.log(100.0)
# (candidates C, nprobe) for IVF, (C, ef_search) for HNSW
CONFIGS = {"ivf-flat": [(c, p) for p in (4, 8, 32) for c in (10, 50, 200)],
           "ivf-pq": [(c, p) for p in (8, 32) for c in (50, 200, 1000)],
           "hnsw": [(10, 64), (50, 128), (50, 512), (200, 512), (1000, 1000)]}
SPECS = {kind: AnnSpec(kind) for kind in CONFIGS}  # the defaults (HNSW's take ~10 minutes to build for 1M items)


def spd_unit_trace(d: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(d + 8, d, generator=generator, dtype=torch.float64) * torch.logspace(0, -1, d, dtype=torch.float64)
    b = x.T @ x
    return (b / torch.trace(b)).float()


def make_data(rows: int, dim: int, queries: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(2000, dim, generator=g), dim=1)
    means = torch.empty(rows, dim)
    for start in range(0, rows, 100_000):
        stop = min(start + 100_000, rows)
        labels = torch.randint(2000, (stop - start,), generator=g)
        means[start:stop] = centres[labels] + 0.6 / math.sqrt(dim) * torch.randn(stop - start, dim, generator=g)
    alpha = torch.exp(torch.empty(rows).uniform_(math.log(3e-3), math.log(3e-1), generator=g))
    gallery_b, query_b = spd_unit_trace(dim, g), spd_unit_trace(dim, g)
    picked = torch.randperm(rows, generator=g)[:queries]
    query_means = means[picked] + 0.3 / math.sqrt(dim) * torch.randn(queries, dim, generator=g)
    query_alpha = torch.full((queries,), 0.02)
    q = EmbeddingDistribution.kron(query_means, query_alpha, query_b)
    gallery = EmbeddingDistribution.kron(means, alpha, gallery_b).precompute(against=q)
    return gallery, q


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact))
    return hits / exact.numel()


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def flat_baseline(gallery: EmbeddingDistribution, queries: EmbeddingDistribution, rows: int) -> list[dict]:
    """FAISS IndexFlatIP (exact inner product over the ANN vectors) against exact `topk`, same queries and k."""
    faiss = faiss_module()
    results = []
    for n, m in ((len(queries), min(200_000, rows)), (16, rows)):
        part, q = gallery[:m], queries[:n]
        flat = faiss.IndexFlatIP(gallery.dim)
        flat.add(ann_vectors(part))
        vectors = query_vectors(q)
        entry = {"queries": n, "gallery": m, "k": K}
        entry["faiss_flat_ip_s"], (_, faiss_rows) = median_time(lambda: flat.search(vectors, K), 3)
        found = {}
        for score in ("mean", "probit"):
            seconds, (_, found[score], _, _) = median_time(lambda: topk(q, part, K, score, logit_scale=LOGIT_SCALE), 3)
            entry[f"topk_{score}_s"] = seconds
            entry[f"topk_{score}_vs_faiss"] = seconds / entry["faiss_flat_ip_s"]
        # the same top-10 by mean: FAISS ranks the very vectors whose inner product orders the mean logit
        entry["mean_top10_agreement"] = recall(torch.from_numpy(faiss_rows), found["mean"])
        results.append(entry)

    return results


def tables(report: dict) -> str:
    """The README's markdown tables from a report."""
    ms = lambda seconds: f"{1e3 * seconds:.1f} ms"  # noqa: E731
    lines = [f"Exact search of {report['queries']} queries x {report['rows']:,} items (D = {report['dim']}), k = "
             f"{report['k']}: " + ", ".join(f"{score} {ms(v['search_s'])}" for score, v in report["exact"].items()),
             "", "| structure | C | nprobe / ef | propose | search (probit) | speed-up | recall@10 mean / pess. / "
             "opt. / probit | index (ANN part) | build |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for kind, entry in report["ann"].items():
        for run in entry["runs"]:
            recall_text = " / ".join(f"{run['recall'][s]:.3f}" for s in SCORES)
            knob = run["nprobe"] if run["nprobe"] is not None else run["ef_search"]
            lines.append(f"| {kind} | {run['candidates']} | {knob} | {ms(run['propose_s'])} | "
                         f"{ms(run['search_s']['probit'])} | {run['speedup_probit']:.1f}x | {recall_text} | "
                         f"{entry['index_bytes'] / 2**30:.2f} GiB ({entry['ann_bytes'] / 2**20:.0f} MiB) | "
                         f"{entry['build_s']:.0f} s |")
    lines += ["", "| exact mean top-C holds this share of each score's exact top-10 | " +
              " | ".join(f"C = {c}" for c in report["mean_order_bound"]["mean"]) + " |",
              "| --- |" + " ---: |" * len(report["mean_order_bound"]["mean"])]
    for score, bound in report["mean_order_bound"].items():
        lines.append(f"| {score} | " + " | ".join(f"{v:.3f}" for v in bound.values()) + " |")
    lines += ["", "| exact top-10 | FAISS IndexFlatIP | topk mean | vs FAISS | topk probit | vs FAISS |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for entry in report["flat_baseline"]:
        lines.append(f"| {entry['queries']} x {entry['gallery']:,} | {ms(entry['faiss_flat_ip_s'])} | "
                     f"{ms(entry['topk_mean_s'])} | {entry['topk_mean_vs_faiss']:.2f}x | "
                     f"{ms(entry['topk_probit_s'])} | {entry['topk_probit_vs_faiss']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--workdir", default=None, help="where the indexes are written (default: a temporary folder)")
    parser.add_argument("--tables", default=None, help="only print the tables of this report JSON")
    args = parser.parse_args()
    if args.tables is not None:
        with open(args.tables) as f:
            print(tables(json.load(f)))
        return
    faiss = faiss_module()
    report = {"rows": args.rows, "dim": args.dim, "queries": args.queries, "k": K, "torch_threads":
              torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(), "faiss": faiss.__version__,
              "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    start = time.perf_counter()
    gallery, queries = make_data(args.rows, args.dim, args.queries)
    report["generate_s"] = time.perf_counter() - start
    rho = (gallery.sq_norm / gallery.trace()).quantile(torch.tensor([0.05, 0.5, 0.95])).tolist()
    report["gallery_rho_p5_p50_p95"] = rho
    print(f"generated {args.rows} x {args.dim} in {report['generate_s']:.1f} s; rho p5/p50/p95 = "
          f"{', '.join(f'{r:.0f}' for r in rho)}", flush=True)

    report["flat_baseline"] = flat_baseline(gallery, queries, args.rows)
    print(json.dumps(report["flat_baseline"], indent=1), flush=True)

    workdir = args.workdir or tempfile.mkdtemp(prefix="bayesvlm-ann-")
    try:
        start = time.perf_counter()
        plain = save_index(os.path.join(workdir, "exact"), gallery, shard_rows=args.rows, logit_scale=LOGIT_SCALE)
        report["exact_index"] = {"build_s": time.perf_counter() - start,
                                 "bytes": folder_bytes(os.path.join(workdir, "exact", plain.generation))}
        exact, report["exact"] = {}, {}
        for score in SCORES:
            seconds, result = median_time(lambda: search(plain, queries, K, score), 2)
            exact[score] = result[1]
            report["exact"][score] = {"search_s": seconds}
        # what mean-ordered candidates can find at best: each score's exact top-10 inside the exact mean top-C
        counts = sorted({c for configs in CONFIGS.values() for c, _ in configs})
        mean_order = search(plain, queries, max(counts), "mean")[1]
        report["mean_order_bound"] = {score: {str(c): recall(
            torch.stack([torch.tensor([r for r in row.tolist() if r in set(top.tolist())][:K] + [-1] * K)[:K]
                         for row, top in zip(exact[score], mean_order[:, :c])]), exact[score]) for c in counts}
            for score in SCORES}
        print(json.dumps({"exact": report["exact"], "mean_order_bound": report["mean_order_bound"]}, indent=1),
              flush=True)

        report["ann"] = {}
        for kind, configs in CONFIGS.items():
            folder = os.path.join(workdir, kind)
            start = time.perf_counter()
            index = save_index(folder, gallery, shard_rows=args.rows, ann=SPECS[kind], logit_scale=LOGIT_SCALE)
            entry = {"spec": SPECS[kind].to_dict(), "build_s": time.perf_counter() - start,
                     "ann_bytes": os.path.getsize(os.path.join(folder, index.generation, "ann-00000.faiss")),
                     "index_bytes": folder_bytes(os.path.join(folder, index.generation)), "runs": []}
            structure = index.ann_index(0)
            vectors = query_vectors(queries)
            for count, setting in configs:
                knob = "ef_search" if kind == "hnsw" else "nprobe"
                options = {"candidates": count, knob: setting}
                params = search_params(structure, index.ann, count, *((None, setting) if kind == "hnsw" else
                                                                        (setting, None)))
                run = {"candidates": count, "nprobe": None, "ef_search": None}
                run[knob] = max(count, setting) if kind == "hnsw" else setting
                run["propose_s"], _ = median_time(lambda: propose(structure, vectors, count, params), 3)
                run["recall"], run["search_s"] = {}, {}
                for score in SCORES:
                    if count < K:
                        continue
                    seconds, result = median_time(lambda: search(index, queries, K, score, **options), 3)
                    run["search_s"][score] = seconds
                    run["recall"][score] = recall(result[1], exact[score])
                run["speedup_probit"] = report["exact"]["probit"]["search_s"] / run["search_s"]["probit"]
                entry["runs"].append(run)
                print(kind, json.dumps(run), flush=True)
            report["ann"][kind] = entry
            index = structure = None
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(tables(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
