"""The gauntlet over the standard library on a GPU, and how repeatable its numbers are.

    python scripts/gpu_gauntlet.py --out docs/bench-gauntlet-gpu.json

1. `esper library init` in a temporary workspace (the 20 standard blueprints);
2. `esper forge --once --device cuda` builds the `fast` and `standard` kernels of every blueprint
   for one linear and one conv2d interface: several forge processes on the one workspace, as
   an operator would run them (claims keep them apart);
3. `esper bench --once --device cuda` judges every kernel, each in its sandboxed child;
4. variance: the gauntlet again, `--repeats` more times per VALIDATED kernel, in this process
   (the same `run_gauntlet` the child runs). With `--no-bench`, step 3 is skipped and every
   kernel is run `--repeats` times in this process (the variance figure alone, faster). For each key metric, the coefficient of variation
   (CV%) across the identical runs; the figure is its median and 90th percentile over kernels
   (HLD E.5 stage 1: < 5%).

Needs a CUDA device. Prints one line per kernel and writes every number to --out; stops
starting new repeats when --budget-s runs out, so the file is always written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from esper.contracts import KernelStatus
from esper.library import init_workspace
from esper.urza import Urza
from esper.workspace import Workspace
from pipelines.urabrask.bench import BenchOptions, run_bench
from pipelines.urabrask.gauntlet import GauntletJob, run_gauntlet

KEY_METRICS = ("latency_ms_mean", "latency_ms_p50", "train_step_ms_mean", "memory_mb_peak",
               "precision_drift_vs_fp64")
ESPER = [sys.executable, "-c", "import sys; from esper_cli.main import main; sys.argv[0] = 'esper'; main()"]


def cv_pct(values: list[float]) -> float:
    mean = statistics.fmean(values)
    return 100.0 * statistics.pstdev(values) / mean if mean else 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--interface", action="append",
                        default=None, help="default: linear:512:128 and conv2d:64:32:1")
    parser.add_argument("--forges", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument("--device", default="cuda", help="cpu only to try the script out")
    parser.add_argument("--pipelines", default="fast,standard")
    parser.add_argument("--bench", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    interfaces = args.interface or ["linear:512:128", "conv2d:64:32:1"]
    started = time.monotonic()

    ws = Workspace(Path(tempfile.mkdtemp()) / "ws")
    init_workspace(ws)
    forge_cmd = [*ESPER, "--workspace", str(ws.root), "--json", "forge", "--once", "--device",
                 args.device, "--pipelines", args.pipelines,
                 *[f"--interface={i}" for i in interfaces]]
    forges = [subprocess.Popen([*forge_cmd, "--worker-id", f"forge-{n}"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for n in range(args.forges)]
    forge_summaries = []
    for proc in forges:
        out, err = proc.communicate()
        if proc.returncode != 0:
            print(err[-2000:], file=sys.stderr)
        forge_summaries.append(json.loads(out) if out.strip() else {"error": err[-500:]})
    forge_s = time.monotonic() - started
    built = sum(len(s.get("built", [])) for s in forge_summaries)
    failed = [f for s in forge_summaries for f in s.get("failed", [])]
    print(f"forge: {built} kernels built, {len(failed)} failed by {args.forges} forges in "
          f"{forge_s:.1f} s")

    bench_started = time.monotonic()
    summary = None
    if args.bench:
        summary = run_bench(ws, None, BenchOptions(device=args.device, worker_id="bench-gpu"),
                            once=True, progress=print)
        print(f"bench: {summary.validated} validated, {summary.rejected} rejected in "
              f"{time.monotonic() - bench_started:.1f} s")
    bench_s = time.monotonic() - bench_started

    rows = []
    with Urza.open(ws) as urza:
        kernels = urza.list_kernels()
        for kernel in kernels:
            report = kernel.validation_report
            row = {"kernel": kernel.id, "blueprint": urza.get_blueprint(kernel.blueprint_id).name,
                   "pipeline": kernel.compilation_pipeline.value, "interface": str(kernel.interface),
                   "status": kernel.status.value, "tags": kernel.tags,
                   "reason": report.rejection_reason if report else kernel.status_reason,
                   "bench": report.benchmark_results if report else {},
                   "baseline": report.baseline_comparison if report else {},
                   "risk_score": report.risk_score if report else None, "repeats": []}
            rows.append(row)
        hardware = next((k.validation_report.hardware_context for k in kernels
                         if k.validation_report is not None), {})
        if not args.bench and args.device != "cpu":
            from pipelines.urabrask.gauntlet import hardware_context

            hardware = hardware_context(args.device)
        for row in rows:
            if row["status"] != KernelStatus.VALIDATED.value and args.bench:
                continue
            for _ in range(args.repeats):
                if time.monotonic() - started > args.budget_s:
                    break
                result = run_gauntlet(urza, GauntletJob(kernel_id=row["kernel"], device=args.device))
                row["repeats"].append(result.metrics if result.passed else {"failed": result.reason})
            runs = ([row["bench"]] if args.bench else []) + [r for r in row["repeats"]
                                                             if "failed" not in r]
            failed = [r["failed"] for r in row["repeats"] if "failed" in r]
            if failed:
                print(f"{row['kernel']:38} {row['blueprint']:22} FAILED: {failed[0]}")
            if len(runs) >= 2:
                row["cv_pct_across_runs"] = {m: cv_pct([r[m] for r in runs]) for m in KEY_METRICS
                                             if all(m in r for r in runs)}
            print(f"{row['kernel']:38} {row['blueprint']:22} {row['pipeline']:8} "
                  f"{(runs[0] if runs else {}).get('latency_ms_mean', float('nan')):8.4f} ms  "
                  f"cv across runs {row.get('cv_pct_across_runs', {}).get('latency_ms_mean', float('nan')):5.2f}%  "
                  f"{' '.join(row['tags'])}")
        verify = urza.verify()

    figure = {}
    for metric in KEY_METRICS:
        values = [r["cv_pct_across_runs"][metric] for r in rows
                  if metric in r.get("cv_pct_across_runs", {})]
        if values:
            figure[metric] = {"kernels": len(values), "median_cv_pct": statistics.median(values),
                              "p90_cv_pct": percentile(values, 0.9), "max_cv_pct": max(values),
                              "under_5pct": sum(v < 5.0 for v in values)}
    within = [r["latency_cv_pct"] for row in rows
              for r in [row["bench"], *row["repeats"]] if "latency_cv_pct" in r]
    result = {
        "device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda, "hardware_context": hardware, "interfaces": interfaces,
        "forges": args.forges, "forge_seconds": forge_s, "kernels_built": built,
        "forge_failures": failed, "bench_seconds": bench_s,
        "bench_summary": summary.to_jsonable() if summary is not None else None,
        "repeats": args.repeats, "variance_across_runs": figure,
        "within_run_latency_cv_pct": {"median": statistics.median(within) if within else None,
                                      "max": max(within) if within else None},
        "verify_ok": verify.ok, "verify_problems": verify.problems,
        "total_seconds": time.monotonic() - started, "kernels": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    for metric, f in figure.items():
        print(f"variance {metric:26} median CV {f['median_cv_pct']:.2f}%  p90 {f['p90_cv_pct']:.2f}%"
              f"  max {f['max_cv_pct']:.2f}%  ({f['under_5pct']}/{f['kernels']} under 5%)")


if __name__ == "__main__":
    main()
